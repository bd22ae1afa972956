//! The Debian packages (issue #18): `ops/package` builds them (from the debug binaries the
//! suite built),
//! each holds its binary, its systemd unit and its commented example configuration;
//! `dpkg -i` installs them (user `sluice`, `/var/lib/sluice`, a sealing key), the units pass
//! `systemd-analyze verify`, and both installed binaries start with the installed examples,
//! pointed at this test's Postgres and NATS. Then `dpkg --purge` removes them.
//!
//! Installing needs root (as CI runs); run as another user, the packages are extracted with
//! `dpkg-deb -x` instead and the rest is the same.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

mod cluster;
use cluster::*;

fn ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{c:?}: {text}");
    text
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The example with `key = value` lines replaced (uncommented if they were commented out).
fn configured(example: &Path, set: &[(&str, String)]) -> String {
    let text = std::fs::read_to_string(example).unwrap();
    let mut lines: Vec<String> = Vec::new();
    for line in text.lines() {
        let bare = line.trim_start_matches('#').trim_start();
        match set.iter().find(|(k, _)| bare.starts_with(&format!("{k} ="))) {
            Some((k, v)) => lines.push(format!("{k} = {v}")),
            None => lines.push(line.to_owned()),
        }
    }
    lines.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_packages_install_and_both_binaries_run_with_their_example_configs() {
    let dir = tempfile::tempdir().unwrap();
    let debs = dir.path().join("debs");
    let root_dir = sluice_tests::workspace_root();
    ok(Command::new("bash").arg(root_dir.join("ops/package")).args(["--debug", "--no-build", "--out"]).arg(&debs));
    let version = env!("CARGO_PKG_VERSION");
    let arch = ok(Command::new("dpkg").arg("--print-architecture")).trim().to_owned();
    let deb = |pkg: &str| debs.join(format!("{pkg}_{version}_{arch}.deb"));
    for (pkg, conf) in [("sluice-control", "control"), ("sluice-dataplane", "dataplane")] {
        let contents = ok(Command::new("dpkg-deb").arg("--contents").arg(deb(pkg)));
        for path in [
            format!("./usr/bin/{pkg}"),
            format!("./lib/systemd/system/{pkg}.service"),
            format!("./etc/sluice/{conf}.toml"),
        ] {
            assert!(contents.contains(&path), "{pkg} holds {path}: {contents}");
        }
        let info = ok(Command::new("dpkg-deb").arg("--info").arg(deb(pkg)));
        assert!(info.contains(&format!("Package: {pkg}")) && info.contains("conffiles"), "{info}");
    }

    let installed = is_root();
    let prefix: PathBuf = if installed {
        ok(Command::new("dpkg").arg("-i").arg(deb("sluice-control")).arg(deb("sluice-dataplane")));
        ok(Command::new("getent").args(["passwd", "sluice"]));
        let key = std::fs::metadata("/etc/sluice/sealing.key").expect("postinst made a sealing key");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(key.permissions().mode() & 0o777, 0o640);
        // The units as installed: systemd's own checker finds nothing to say.
        for unit in ["sluice-control", "sluice-dataplane"] {
            let out = Command::new("systemd-analyze")
                .args(["verify", &format!("/lib/systemd/system/{unit}.service")])
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success() && !said.contains(unit), "systemd-analyze verify {unit}: {said}");
        }
        PathBuf::from("/")
    } else {
        let x = dir.path().join("root");
        for pkg in ["sluice-control", "sluice-dataplane"] {
            ok(Command::new("dpkg-deb").arg("-x").arg(deb(pkg)).arg(&x));
        }
        x
    };

    // Both installed binaries, with the installed examples pointed at this test's services.
    let pg = sluice_tests::Postgres::start().unwrap();
    let url = pg.create_database("packaged").await.unwrap();
    let nats = sluice_tests::Nats::start().unwrap();
    let (api, admin) = (sluice_tests::free_port(), sluice_tests::free_port());
    let q = |s: String| format!("\"{s}\"");
    let control_conf = dir.path().join("control.toml");
    std::fs::write(
        &control_conf,
        configured(
            &prefix.join("etc/sluice/control.toml"),
            &[
                ("database_url", q(url.clone())),
                ("nats_url", q(nats.url())),
                ("api_listen", q(format!("127.0.0.1:{api}"))),
                ("sealing_key_file", q(String::new())),
            ],
        )
        .replace("sealing_key_file = \"\"", ""),
    )
    .unwrap();
    let worker_conf = dir.path().join("dataplane.toml");
    std::fs::write(
        &worker_conf,
        configured(
            &prefix.join("etc/sluice/dataplane.toml"),
            &[
                ("nats_url", q(nats.url())),
                ("state_dir", q(dir.path().join("state").display().to_string())),
                ("admin_listen", q(format!("127.0.0.1:{admin}"))),
                ("rtmp_listen", q(format!("127.0.0.1:{}", sluice_tests::free_port()))),
                ("srt_listen", q(format!("127.0.0.1:{}", sluice_tests::free_port()))),
                ("sealing_key_file", q(String::new())),
            ],
        )
        .replace("sealing_key_file = \"\"", ""),
    )
    .unwrap();
    let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
    let control = sluice_tests::Running(
        Command::new(prefix.join("usr/bin/sluice-control"))
            .arg("--config")
            .arg(&control_conf)
            .arg("serve")
            .env("SLUICE_SEALING_KEY", SEALING_KEY)
            .env("SLUICE_BOOTSTRAP_ADMIN_KEY", ADMIN)
            .stdout(log("control.log"))
            .stderr(log("control.err"))
            .spawn()
            .unwrap(),
    );
    let worker = sluice_tests::Running(
        Command::new(prefix.join("usr/bin/sluice-dataplane"))
            .arg("--config")
            .arg(&worker_conf)
            .arg("run")
            .env("SLUICE_SEALING_KEY", SEALING_KEY)
            .stdout(log("worker.log"))
            .stderr(log("worker.err"))
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    for (what, port) in [("control plane", api), ("worker", admin)] {
        until(&format!("the packaged {what} is ready"), || async {
            get(&http, format!("http://127.0.0.1:{port}/ready")).await.0 == 200
        })
        .await;
    }
    drop(worker);
    drop(control);
    if installed {
        ok(Command::new("dpkg").args(["--purge", "sluice-control", "sluice-dataplane"]));
        assert!(!Path::new("/usr/bin/sluice-control").exists());
    }
}
