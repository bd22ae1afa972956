//! TLS (issue #18): the REST API over HTTPS with a certificate from files (a test CA made
//! with openssl), refused in plain HTTP on that port, and the certificate swapped on SIGHUP
//! for new connections while an open one (a Server-Sent Events tail) goes on.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

mod cluster;
use cluster::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A server certificate for 127.0.0.1 named `cn`, signed by the test CA in `dir`.
fn make_cert(dir: &Path, cn: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (key, csr, pem) = (format!("{cn}.key"), format!("{cn}.csr"), format!("{cn}.pem"));
    let subject = format!("/CN={cn}");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subject,
        ],
    );
    std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    );
    (dir.join(pem), dir.join(key))
}

/// The subject the server on `port` presents to a new connection.
fn presented_subject(port: u16) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", "127.0.0.1"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find(|l| l.starts_with("subject=")).unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_https_and_reloads_its_certificate_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=sluice-test-ca",
        ],
    );
    let (first, first_key) = make_cert(d, "first");
    let (second, second_key) = make_cert(d, "second");
    let (cert, key) = (d.join("api.pem"), d.join("api.key"));
    std::fs::copy(&first, &cert).unwrap();
    std::fs::copy(&first_key, &key).unwrap();

    let pg = sluice_tests::Postgres::start().unwrap();
    let url = pg.create_database("tls").await.unwrap();
    let nats = sluice_tests::Nats::start().unwrap();
    let port = sluice_tests::free_port();
    let (c, k) = (cert.to_str().unwrap().to_owned(), key.to_str().unwrap().to_owned());
    let env = [("SLUICE_API_TLS_CERT", c.as_str()), ("SLUICE_API_TLS_KEY", k.as_str())];
    let control = control_with(&url, &nats.url(), port, "cp-tls", &d.join("cp.log"), &env);
    let ca = reqwest::Certificate::from_pem(&std::fs::read(d.join("ca.pem")).unwrap()).unwrap();
    let https = reqwest::Client::builder().add_root_certificate(ca).build().unwrap();
    let base = format!("https://127.0.0.1:{port}");
    until("the API answers over HTTPS", || async {
        https.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    // Plain HTTP on the HTTPS port gets nothing.
    let plain = reqwest::Client::new().get(format!("http://127.0.0.1:{port}/health")).send().await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    assert!(presented_subject(port).contains("CN=first") || presented_subject(port).contains("CN = first"));

    // An open tail of the log, over one TLS connection.
    let mut tail = https.get(format!("{base}/v1/events/stream")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(tail.status(), 200);

    // The certificate is replaced and the control plane told.
    std::fs::copy(&second, &cert).unwrap();
    std::fs::copy(&second_key, &key).unwrap();
    assert!(Command::new("kill").args(["-HUP", &control.0.id().to_string()]).status().unwrap().success());
    until("new connections get the new certificate", || async {
        tokio::task::spawn_blocking(move || presented_subject(port)).await.unwrap().contains("second")
    })
    .await;
    // A new connection works, and the old one still carries the log.
    let r =
        https.post(format!("{base}/v1/apps")).bearer_auth(ADMIN).json(&json!({"name": "after-reload"})).send().await;
    assert_eq!(r.unwrap().status(), 201);
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.contains("after-reload") && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), tail.chunk()).await {
            Ok(Ok(Some(chunk))) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            _ => break,
        }
    }
    assert!(seen.contains("after-reload"), "the open connection carried the new event: {seen}");
    assert!(read(&d.join("cp.log")).contains("certificate reloaded"));
    drop(control);
}
