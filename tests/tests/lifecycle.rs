//! Running it in production (issue #18): a worker drains on SIGTERM. `/ready` turns 503 at
//! once, RTMP stops accepting and SRT answers 1503, live sessions go on (a player keeps
//! receiving), and the worker exits 0 once they end, within `SLUICE_DRAIN_SECS`; a second
//! SIGTERM stops it at once.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

mod cluster;
use cluster::*;

fn sigterm(pid: u32) {
    let ok = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill -TERM {pid}");
}

/// Waits (bounded) for the worker to exit; its exit status.
async fn exited(w: &mut MediaWorker, bound: Duration) -> Option<std::process::ExitStatus> {
    let started = tokio::time::Instant::now();
    while started.elapsed() < bound {
        if let Some(status) = w.process.0.try_wait().unwrap() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_worker_and_live_sessions_go_on() {
    let plane = Plane::start("drain").await;
    let http = plane.http.clone();
    let open = json!({"publish": {"methods": ["open"]}, "play": {"methods": ["open"]}});
    post(&http, plane.cp, "/v1/apps", json!({"name": "d", "policy": open})).await;
    let mut w = media_worker(&plane, "w1", &[("SLUICE_DRAIN_SECS", "120"), ("SLUICE_LOG_FORMAT", "json")]);
    ready_at_head(&http, &plane.store, w.admin).await;
    let url = format!("rtmp://127.0.0.1:{}/d/cam", w.rtmp);
    let mut publisher = ffmpeg_testsrc("flv", &url, 60).spawn().unwrap();
    until_live(&http, plane.cp, "d", "cam").await;
    // A player that wants 6 s of media.
    let player = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-rw_timeout", "10000000", "-i", &url, "-t", "6", "-f", "null", "-"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    until("the player is counted", || async {
        get(&http, format!("http://127.0.0.1:{}/v1/stats/streams/d/cam", plane.cp)).await.1["players"]
            .as_u64()
            .is_some_and(|p| p >= 1)
    })
    .await;

    sigterm(w.process.0.id());
    until("/ready is 503 and says draining", || async {
        let (code, body) = get(&http, format!("http://127.0.0.1:{}/ready", w.admin)).await;
        code == 503 && body["draining"] == true
    })
    .await;
    // No one new: RTMP's port is closed, an SRT caller is told to try elsewhere (1503).
    let rtmp_port = w.rtmp;
    until("the RTMP listener is closed", || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", rtmp_port)).await.is_err()
    })
    .await;
    assert_eq!(reject_code(w.srt, "d/cam").await, 1503);
    // The player got all it asked for through the drain.
    let out = tokio::task::spawn_blocking(move || wait_bounded(player, Duration::from_secs(40)))
        .await
        .unwrap()
        .expect("the player ended");
    let said = stderr(&out);
    assert!(out.status.success() && said.contains("frame="), "{said}");
    assert!(w.process.0.try_wait().unwrap().is_none(), "the publisher is still live: the worker waits");
    // The last session ends: the worker exits 0, long before the drain time is up.
    let _ = publisher.kill();
    let _ = publisher.wait();
    let status = exited(&mut w, Duration::from_secs(60)).await.expect("the drained worker exits");
    assert!(status.success(), "{status:?}");
    // SLUICE_LOG_FORMAT=json: every line is one JSON object, with the event's fields.
    let lines = json_lines(&read(&w.log));
    let drain = lines.iter().find(|l| l["message"].as_str().is_some_and(|m| m.starts_with("draining"))).unwrap();
    assert_eq!(
        (drain["level"].as_str(), drain["live"].as_u64(), drain["drain_secs"].as_u64()),
        (Some("INFO"), Some(2), Some(120)),
        "{drain}"
    );
    assert!(lines.iter().any(|l| l["message"] == "drained: no live sessions left"));
    assert!(lines.iter().any(|l| l["node"] == "w1" && l["message"] == "sluice-dataplane serving"));
}

/// Every line of a JSON log, parsed (a line that is not JSON fails the test).
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_logs_json_lines() {
    let pg = sluice_tests::Postgres::start().unwrap();
    let url = pg.create_database("jsonlog").await.unwrap();
    let nats = sluice_tests::Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (port, log) = (sluice_tests::free_port(), dir.path().join("cp.log"));
    let cp = control_with(&url, &nats.url(), port, "cp-json", &log, &[("SLUICE_LOG_FORMAT", "json")]);
    let http = reqwest::Client::new();
    post(&http, port, "/v1/apps", json!({"name": "logged"})).await;
    drop(cp);
    let lines = json_lines(&read(&log));
    assert!(lines.len() > 2, "{lines:?}");
    assert!(lines.iter().all(|l| l["timestamp"].is_string() && l["level"].is_string() && l["target"].is_string()));
    // A wrong format is refused at start.
    let out = Command::new(sluice_tests::binary("sluice-control"))
        .arg("check-config")
        .env("SLUICE_LOG_FORMAT", "yaml")
        .env("SLUICE_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected text or json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_the_worker_at_once() {
    let plane = Plane::start("drain2").await;
    let http = plane.http.clone();
    let open = json!({"publish": {"methods": ["open"]}, "play": {"methods": ["open"]}});
    post(&http, plane.cp, "/v1/apps", json!({"name": "d", "policy": open})).await;
    let mut w = media_worker(&plane, "w1", &[("SLUICE_DRAIN_SECS", "600")]);
    ready_at_head(&http, &plane.store, w.admin).await;
    let mut publisher = ffmpeg_testsrc("flv", &format!("rtmp://127.0.0.1:{}/d/cam", w.rtmp), 120).spawn().unwrap();
    until_live(&http, plane.cp, "d", "cam").await;
    sigterm(w.process.0.id());
    until("draining", || async {
        get(&http, format!("http://127.0.0.1:{}/ready", w.admin)).await.1["draining"] == true
    })
    .await;
    assert!(w.process.0.try_wait().unwrap().is_none(), "a live publisher holds the drain");
    sigterm(w.process.0.id());
    // Far below the 600 s drain.
    let status = exited(&mut w, Duration::from_secs(60)).await.expect("the second SIGTERM stops the worker");
    assert!(status.success(), "{status:?}");
    assert!(read(&w.log).contains("second signal: stopping now"));
    let _ = publisher.kill();
    let _ = publisher.wait();
}

/// systemd's notify protocol, without systemd: a datagram socket as `NOTIFY_SOCKET`. Each
/// binary says `READY=1` once it serves, pings `WATCHDOG=1` every half `WATCHDOG_USEC`, and
/// says `STOPPING=1` on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_planes_speak_systemds_notify_protocol() {
    let pg = sluice_tests::Postgres::start().unwrap();
    let url = pg.create_database("notify").await.unwrap();
    let nats = sluice_tests::Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let heard = |socket: &std::os::unix::net::UnixDatagram, what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 512];
        while std::time::Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == what)
            {
                return true;
            }
        }
        false
    };
    for plane in ["control", "worker"] {
        let path = dir.path().join(format!("{plane}.notify"));
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let notify = path.to_str().unwrap().to_owned();
        let env = [("NOTIFY_SOCKET", notify.as_str()), ("WATCHDOG_USEC", "400000")];
        let log = dir.path().join(format!("{plane}.log"));
        let mut running = if plane == "control" {
            control_with(&url, &nats.url(), sluice_tests::free_port(), "cp-notify", &log, &env)
        } else {
            let state = dir.path().join("w");
            worker_with(&nats.url(), sluice_tests::free_port(), &state, "w-notify", &log, &env)
        };
        assert!(heard(&socket, "READY=1"), "{plane}: READY=1 ({})", read(&log));
        assert!(heard(&socket, "WATCHDOG=1"), "{plane}: WATCHDOG=1");
        sigterm(running.0.id());
        assert!(heard(&socket, "STOPPING=1"), "{plane}: STOPPING=1");
        let status = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(30) {
                if let Some(s) = running.0.try_wait().unwrap() {
                    return Some(s);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            None
        })
        .await
        .unwrap();
        assert!(status.is_some_and(|s| s.success()), "{plane} exits 0 after SIGTERM: {status:?}");
    }
}
