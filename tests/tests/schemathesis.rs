//! A bounded schemathesis run (issue #16) against the real control plane, Postgres and NATS,
//! with an admin key: every operation of `/v1/openapi.json`, a fixed seed and example count.
//! It must find no 5xx, no response outside its documented schema and content type (errors
//! are problem+json outside the SLS and Ant Media envelopes), and no accepted request the
//! schema says is invalid. schemathesis comes from PyPI into the project's `.venv`
//! (`ops/lib.sh ensure_schemathesis`, which `ops/test` runs): a missing one fails this test.
#![allow(clippy::unwrap_used)]

use std::process::Command;

mod cluster;
use cluster::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let bin = sluice_tests::workspace_root().join(".venv/bin/schemathesis");
    assert!(bin.exists(), "{} is missing: run `bash -c 'source ops/lib.sh; ensure_schemathesis'`", bin.display());
    let plane = Plane::start("schemathesis").await;
    let dir = plane.dir.path().join("schemathesis");
    let out = tokio::task::spawn_blocking({
        let (bin, cp, dir) = (bin.clone(), plane.cp, dir.clone());
        move || {
            Command::new(bin)
                .arg("run")
                .arg(format!("http://127.0.0.1:{cp}/v1/openapi.json"))
                .args(["--header", &format!("Authorization: Bearer {ADMIN}")])
                .args([
                    "--checks",
                    "not_a_server_error,response_schema_conformance,content_type_conformance,negative_data_rejection",
                ])
                .args(["--max-examples", "8", "--seed", "20261130", "--workers", "1", "--request-timeout", "10"])
                .args(["--report", "junit", "--report-dir"])
                .arg(&dir)
                .env("SCHEMATHESIS_HOOKS", "")
                .env("NO_COLOR", "1")
                .current_dir(dir.parent().unwrap())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "schemathesis found failures:\n{stdout}\n{stderr}");
    // It ran something: the summary counts operations tested.
    assert!(stdout.contains("passed"), "{stdout}");
}
