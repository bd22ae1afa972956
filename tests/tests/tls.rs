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
/// A test CA in `dir` (`ca.pem`, `ca.key`).
fn test_ca(dir: &Path) {
    let ca = ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    openssl(
        dir,
        &[&ca[..], &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=sluice-test-ca"]].concat(),
    );
}

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
    test_ca(d);
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

/// NATS with TLS and authentication (issue #18): nats-server requires TLS and a user; the
/// control plane logs in with a password in its URL, the worker with an NKey seed file, both
/// trusting the test CA (`SLUICE_NATS_CA_FILE`). The worker follows the log and its
/// heartbeats reach the control plane; a client without TLS gets nothing; the password is
/// never printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_planes_reach_nats_over_tls_with_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    test_ca(d);
    let (cert, key) = make_cert(d, "nats");
    let worker_key = nkeys::KeyPair::new_user();
    let seed_file = d.join("worker.nk");
    std::fs::write(&seed_file, worker_key.seed().unwrap()).unwrap();
    let conf = format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\" }}\nauthorization {{ users = [ {{ user: \"control\", password: \"control-nats-pass\" }}, {{ nkey: \"{}\" }} ] }}",
        cert.display(),
        key.display(),
        worker_key.public_key()
    );
    let nats = sluice_tests::Nats::start_with_config(&conf).unwrap();
    let ca = d.join("ca.pem").to_str().unwrap().to_owned();
    let url = format!("tls://control:control-nats-pass@127.0.0.1:{}", nats.port);

    let pg = sluice_tests::Postgres::start().unwrap();
    let db = pg.create_database("natstls").await.unwrap();
    let cp = sluice_tests::free_port();
    let control = control_with(&db, &url, cp, "cp-nats", &d.join("cp.log"), &[("SLUICE_NATS_CA_FILE", ca.as_str())]);
    let (admin, seed) = (sluice_tests::free_port(), seed_file.to_str().unwrap().to_owned());
    let worker_url = format!("tls://127.0.0.1:{}", nats.port);
    let _worker = worker_with(
        &worker_url,
        admin,
        &d.join("w"),
        "w-tls",
        &d.join("w.log"),
        &[("SLUICE_NATS_CA_FILE", ca.as_str()), ("SLUICE_NATS_NKEY_SEED_FILE", seed.as_str())],
    );
    let http = reqwest::Client::new();
    post(&http, cp, "/v1/apps", json!({"name": "over-tls"})).await;
    let mut synced = false;
    for _ in 0..300 {
        let (code, body) = get(&http, format!("http://127.0.0.1:{admin}/ready")).await;
        if code == 200 && body["synced"] == true {
            synced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        synced,
        "the worker follows the log over NATS with TLS\n--- cp ---\n{}\n--- worker ---\n{}",
        read(&d.join("cp.log")),
        read(&d.join("w.log"))
    );
    until("its heartbeats reach the control plane", || async {
        let (_, body) = get(&http, format!("http://127.0.0.1:{cp}/v1/nodes")).await;
        body.to_string().contains("w-tls")
    })
    .await;
    // No TLS and no credentials: nats-server lets no one in.
    let plain = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(format!("nats://127.0.0.1:{}", nats.port))
        .await;
    assert!(plain.is_err(), "a client without TLS or credentials connected");
    for log in ["cp.log", "w.log"] {
        assert!(!read(&d.join(log)).contains("control-nats-pass"), "{log} holds the password");
    }
    let out = Command::new(sluice_tests::binary("sluice-control"))
        .arg("check-config")
        .env("SLUICE_DATABASE_URL", &db)
        .env("SLUICE_NATS_URL", &url)
        .env("SLUICE_NATS_CA_FILE", &ca)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("tls://control:***@127.0.0.1") && !printed.contains("control-nats-pass"), "{printed}");
    drop(control);
}

/// RTMPS (issue #18): a worker serves RTMP inside TLS on its own listener. ffmpeg publishes
/// and plays over `rtmps://` verifying the test CA; a client that does not trust the CA, and
/// plain RTMP on the RTMPS port, get nothing; the certificate is swapped on SIGHUP for new
/// handshakes while the publisher's TLS connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmps_carries_publish_and_play_and_reloads_its_certificate() {
    let plane = Plane::start("rtmps").await;
    let d = plane.dir.path();
    test_ca(d);
    let (first, first_key) = make_cert(d, "first");
    let (second, second_key) = make_cert(d, "second");
    let (cert, key) = (d.join("rtmps.pem"), d.join("rtmps.key"));
    std::fs::copy(&first, &cert).unwrap();
    std::fs::copy(&first_key, &key).unwrap();
    let http = plane.http.clone();
    let open = json!({"publish": {"methods": ["open"]}, "play": {"methods": ["open"]}});
    post(&http, plane.cp, "/v1/apps", json!({"name": "secure", "policy": open})).await;
    let rtmps = sluice_tests::free_port();
    let listen = format!("127.0.0.1:{rtmps}");
    let (c, k) = (cert.to_str().unwrap().to_owned(), key.to_str().unwrap().to_owned());
    let w = media_worker(
        &plane,
        "w1",
        &[
            ("SLUICE_RTMPS_LISTEN", &listen),
            ("SLUICE_RTMPS_CERT", &c),
            ("SLUICE_RTMPS_KEY", &k),
            // A load balancer at 127.0.0.2 sends PROXY headers; everyone else connects directly.
            ("SLUICE_PROXY_PROTOCOL_FROM", "127.0.0.2/32"),
        ],
    );
    ready_at_head(&http, &plane.store, w.admin).await;
    assert!(presented_subject(rtmps).contains("first"), "{}", presented_subject(rtmps));
    let ca = d.join("ca.pem").to_str().unwrap().to_owned();
    let url = format!("rtmps://127.0.0.1:{rtmps}/secure/cam");
    // ffmpeg's TLS options, given before the output, reach the rtmps:// output's tls:// layer.
    let publisher = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-re", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=15", "-f", "lavfi"])
        .args(["-i", "sine", "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "15"])
        .args(["-c:a", "aac", "-t", "40", "-tls_verify", "1", "-ca_file", &ca, "-f", "flv", &url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    until_live(&http, plane.cp, "secure", "cam").await;
    let play = |extra: &[&str]| {
        let mut cmd = Command::new("ffmpeg");
        cmd.args(["-hide_banner", "-nostdin", "-rw_timeout", "10000000"])
            .args(extra)
            .args(["-i", &url, "-t", "3", "-f", "null", "-"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        cmd
    };
    let played = play(&["-tls_verify", "1", "-ca_file", &ca]).output().unwrap();
    assert!(played.status.success() && stderr(&played).contains("frame="), "{}", stderr(&played));
    // A player that verifies against another CA is refused by its own TLS layer.
    let other = tempfile::tempdir().unwrap();
    test_ca(other.path());
    let other_ca = other.path().join("ca.pem").to_str().unwrap().to_owned();
    let refused = play(&["-tls_verify", "1", "-ca_file", &other_ca]).output().unwrap();
    assert!(!refused.status.success(), "{}", stderr(&refused));
    // Through the load balancer: the PROXY header, then TLS; the decision sees the client.
    let relay = proxy_relay(
        rtmps,
        Some("127.0.0.2".parse().unwrap()),
        b"PROXY TCP4 203.0.113.77 127.0.0.1 5555 1936\r\n".to_vec(),
    )
    .await;
    let relayed = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-rw_timeout", "10000000", "-tls_verify", "1", "-ca_file", &ca])
        .args(["-i", &format!("rtmps://127.0.0.1:{relay}/secure/cam"), "-t", "3", "-f", "null", "-"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(relayed.status.success() && stderr(&relayed).contains("frame="), "{}", stderr(&relayed));
    until("the proxied play is in the log with the client's address", || async {
        let (_, body) = get(&http, format!("http://127.0.0.1:{}/v1/decisions?app=secure", plane.cp)).await;
        body["decisions"].as_array().into_iter().flatten().any(|d| d["client_ip"] == "203.0.113.77")
    })
    .await;
    // Plain RTMP on the RTMPS port: the handshake is not TLS, nothing is served.
    let plain = ffmpeg_play(&format!("rtmp://127.0.0.1:{rtmps}/secure/cam"));
    assert!(!plain.status.success() && !stderr(&plain).contains("frame="), "{}", stderr(&plain));

    // A new certificate, and the worker told: new handshakes get it, the publisher goes on.
    std::fs::copy(&second, &cert).unwrap();
    std::fs::copy(&second_key, &key).unwrap();
    assert!(Command::new("kill").args(["-HUP", &w.process.0.id().to_string()]).status().unwrap().success());
    until("new handshakes get the new certificate", || async {
        tokio::task::spawn_blocking(move || presented_subject(rtmps)).await.unwrap().contains("second")
    })
    .await;
    let played = play(&["-tls_verify", "1", "-ca_file", &ca]).output().unwrap();
    assert!(played.status.success() && stderr(&played).contains("frame="), "{}", stderr(&played));
    let out = tokio::task::spawn_blocking(move || wait_bounded(publisher, Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("the publisher ran to its end");
    assert!(out.status.success(), "the reload disturbed the publisher: {}", stderr(&out));
    assert!(read(&w.log).contains("RTMPS certificate reloaded"));
    let decisions = recorded(&plane.store, "w1").await;
    assert!(decisions.iter().filter(|d| d.2).count() >= 3, "{decisions:?}");
}
