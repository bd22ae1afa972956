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

    // A SIGHUP changes nothing for a worker (its default action would have stopped it).
    assert!(Command::new("kill").args(["-HUP", &w.process.0.id().to_string()]).status().unwrap().success());
    until("the SIGHUP is logged", || async { read(&w.log).contains("SIGHUP") }).await;
    assert!(w.process.0.try_wait().unwrap().is_none(), "a SIGHUP stopped the worker");
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

/// PROXY protocol on RTMP (issue #18): behind a load balancer that sends the header (v1 or
/// v2), ffmpeg publishes and plays, and the decisions carry the clients' addresses; the
/// trusted peer without a header is refused; anyone else's PROXY header is garbage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_behind_a_proxy_protocol_load_balancer_sees_the_clients() {
    let plane = Plane::start("proxyproto").await;
    let http = plane.http.clone();
    let open = json!({"publish": {"methods": ["open"]}, "play": {"methods": ["open"]}});
    post(&http, plane.cp, "/v1/apps", json!({"name": "px", "policy": open})).await;
    let w = media_worker(&plane, "w1", &[("SLUICE_PROXY_PROTOCOL_FROM", "127.0.0.1/32")]);
    ready_at_head(&http, &plane.store, w.admin).await;
    let v1 = proxy_relay(w.rtmp, None, b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 1935\r\n".to_vec()).await;
    let mut v2_header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2_header.extend_from_slice(&[0x21, 0x21, 0, 36]);
    v2_header.extend_from_slice(&"2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap().octets());
    v2_header.extend_from_slice(&"2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    v2_header.extend_from_slice(&4711u16.to_be_bytes());
    v2_header.extend_from_slice(&1935u16.to_be_bytes());
    let v2 = proxy_relay(w.rtmp, None, v2_header).await;

    let mut publisher = ffmpeg_testsrc("flv", &format!("rtmp://127.0.0.1:{v1}/px/cam"), 40).spawn().unwrap();
    until_live(&http, plane.cp, "px", "cam").await;
    let url = format!("rtmp://127.0.0.1:{v2}/px/cam");
    let played = tokio::task::spawn_blocking(move || ffmpeg_play(&url)).await.unwrap();
    assert!(played.status.success() && stderr(&played).contains("frame="), "{}", stderr(&played));
    // The trusted peer itself, without a header: refused.
    let direct = format!("rtmp://127.0.0.1:{}/px/cam", w.rtmp);
    let refused = tokio::task::spawn_blocking(move || ffmpeg_play(&direct)).await.unwrap();
    assert!(!refused.status.success(), "a connection from the proxy without its header played");
    // Someone else (127.0.0.2) claiming an address with a PROXY header: just garbage.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut spoof = socket.connect(format!("127.0.0.1:{}", w.rtmp).parse().unwrap()).await.unwrap();
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        spoof.write_all(b"PROXY TCP4 198.51.100.99 127.0.0.1 1 1935\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(20), spoof.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0, "the worker answered a PROXY header from an untrusted peer");
    }

    let clients = || async {
        let (_, body) = get(&http, format!("http://127.0.0.1:{}/v1/decisions?app=px", plane.cp)).await;
        body["decisions"].as_array().cloned().unwrap_or_default()
    };
    until("both decisions are in the log", || async { clients().await.len() >= 2 }).await;
    let rows = clients().await;
    let seen: Vec<(String, String)> = rows
        .iter()
        .map(|d| (d["action"].as_str().unwrap().to_owned(), d["client_ip"].as_str().unwrap().to_owned()))
        .collect();
    assert!(seen.contains(&("publish".into(), "203.0.113.9".into())), "{seen:?}");
    assert!(seen.contains(&("play".into(), "2001:db8::7".into())), "{seen:?}");
    assert!(!format!("{seen:?}").contains("198.51.100.99"), "{seen:?}");
    let _ = publisher.kill();
    let _ = publisher.wait();
}

/// A rolling upgrade (issue #18): control planes go first, so a worker may meet an event type
/// it does not know. It skips it at its position (counted in `sluice_events_skipped_total`,
/// logged) and follows on, instead of stopping at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_worker_skips_an_event_it_does_not_know_and_follows_on() {
    use sluice_events::dist;
    use sluice_events::event::{AppCreated, GENESIS, Metadata, RecordedEvent, StreamRegistered};
    let nats = sluice_tests::Nats::start().unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: dist::EVENTS_STREAM.into(),
        subjects: vec![dist::EVENTS_SUBJECTS.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let app = sluice_events::AppName::parse("up").unwrap();
    let recorded = |position: u64, event: sluice_events::Event| RecordedEvent {
        position: sluice_events::Position(position),
        event_id: uuid::Uuid::new_v4(),
        stream: "app-up".into(),
        version: position - 1,
        event,
        metadata: Metadata::default(),
        recorded_at: sluice_events::Timestamp(1_800_000_000_000),
        hash: GENESIS,
    };
    let first = recorded(1, AppCreated { app: app.clone(), policy: Default::default() }.into());
    // What a newer control plane wrote: a type this build has never heard of.
    let newer = String::from_utf8(dist::encode_event(&recorded(
        2,
        AppCreated { app: app.clone(), policy: Default::default() }.into(),
    )))
    .unwrap()
    .replace("\"AppCreated\"", "\"AppSuspended\"");
    let name = sluice_events::StreamName::parse("cam").unwrap();
    let third = recorded(3, StreamRegistered { plays: None, app, name, publish_name: None, description: None }.into());
    for payload in [dist::encode_event(&first), newer.into_bytes(), dist::encode_event(&third)] {
        js.publish("sluice.ev.app", payload.into()).await.unwrap().await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let admin = sluice_tests::free_port();
    let log = dir.path().join("w.log");
    let _w = worker(&nats.url(), admin, &dir.path().join("w"), "w-old", &log);
    let http = reqwest::Client::new();
    ready_at(&http, admin, 3).await;
    assert_eq!(worker_metric(&http, admin, "sluice_events_skipped_total").await, Some(1.0));
    assert!(read(&log).contains("AppSuspended"), "the skip is logged with its type");
}

/// The operator's daily CLI (issue #18): `streams kick` ends live sessions on every worker
/// (players only, then one address's publisher), without refusing the next attempt;
/// `decisions tail` and `events --follow` print the log as it grows, one JSON line an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_kicks_sessions_and_follows_the_log_from_the_cli() {
    let plane = Plane::start("kick").await;
    let http = plane.http.clone();
    let open = json!({"publish": {"methods": ["open"]}, "play": {"methods": ["open"]}});
    post(&http, plane.cp, "/v1/apps", json!({"name": "k", "policy": open})).await;
    let w = media_worker(&plane, "w1", &[]);
    ready_at_head(&http, &plane.store, w.admin).await;
    let api = format!("http://127.0.0.1:{}", plane.cp);
    let cli = |args: &[&str]| {
        let mut c = Command::new(sluice_tests::binary("sluice-control"));
        c.args(args).env_clear().env("SLUICE_API_URL", &api).env("SLUICE_API_KEY", ADMIN);
        c
    };
    let (decisions_out, events_out) = (plane.dir.path().join("decisions.jsonl"), plane.dir.path().join("events.jsonl"));
    let mut tail = cli(&["decisions", "tail", "--after", "0"])
        .stdout(std::fs::File::create(&decisions_out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut follow = cli(&["events", "--follow"])
        .stdout(std::fs::File::create(&events_out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let url = format!("rtmp://127.0.0.1:{}/k/cam", w.rtmp);
    let publisher = ffmpeg_testsrc("flv", &url, 60).spawn().unwrap();
    until_live(&http, plane.cp, "k", "cam").await;
    let player = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-rw_timeout", "10000000", "-i", &url, "-t", "60", "-f", "null", "-"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    until("the player is counted", || async {
        get(&http, format!("{api}/v1/stats/streams/k/cam")).await.1["players"].as_u64().is_some_and(|p| p >= 1)
    })
    .await;

    // Players only: the player ends, the publisher goes on.
    let out = cli(&["streams", "kick", "k", "cam", "--action", "play"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"position\""));
    let ended = tokio::task::spawn_blocking(move || wait_bounded(player, Duration::from_secs(30))).await.unwrap();
    assert!(ended.is_some(), "the kicked player did not end");
    let mut publisher = publisher;
    assert!(publisher.try_wait().unwrap().is_none(), "kicking players ended the publisher");
    until("the kick is logged", || async { read(&w.log).contains("session kicked by an operator") }).await;
    // The publisher from 127.0.0.1: it ends; a new one is admitted (a kick refuses nothing).
    let out =
        cli(&["streams", "kick", "k", "cam", "--action", "publish", "--client-ip", "127.0.0.1"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ended = tokio::task::spawn_blocking(move || wait_bounded(publisher, Duration::from_secs(30))).await.unwrap();
    assert!(ended.is_some(), "the kicked publisher did not end");
    let again = ffmpeg_testsrc("flv", &url, 2).output().unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    // Bad input is refused with the API's reason.
    let out = cli(&["streams", "kick", "k", "cam", "--action", "sideways"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("400"), "{}", String::from_utf8_lossy(&out.stderr));

    // What the followers printed: every line one JSON value.
    until("both kicks reached the event follower", || async {
        read(&events_out).lines().filter(|l| l.contains("\"SessionsKicked\"")).count() == 2
    })
    .await;
    until("the decisions reached the decision tail", || async {
        read(&decisions_out).lines().filter(|l| l.contains("\"allowed\"")).count() >= 3
    })
    .await;
    for line in read(&decisions_out).lines().chain(read(&events_out).lines()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v.is_object(), "{line}");
    }
    assert!(!read(&decisions_out).contains("SessionsKicked"), "decisions tail prints decisions only");
    let _ = tail.kill();
    let _ = tail.wait();
    let _ = follow.kill();
    let _ = follow.wait();
}

/// Control-plane shutdown (issue #18): what the log holds reaches SLUICE_EVENTS before the
/// relay stops. NATS is frozen (SIGSTOP) while changes are written, so the relay falls behind;
/// NATS is thawed and the control plane told to stop at once: it exits 0 only after the
/// stream has the log's head, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_control_plane_relays_the_logs_head_first() {
    let plane = Plane::start("flush").await;
    let http = plane.http.clone();
    post(&http, plane.cp, "/v1/apps", json!({"name": "f"})).await;
    let js = async_nats::jetstream::new(async_nats::connect(plane.nats.url()).await.unwrap());
    let last_relayed = || {
        let js = js.clone();
        async move {
            match js.get_stream(sluice_events::dist::EVENTS_STREAM).await {
                Ok(mut s) => s.info().await.map(|i| i.state.last_sequence).unwrap_or(0),
                Err(_) => 0,
            }
        }
    };
    let head = || async { plane.store.head().await.unwrap().0 };
    until("the relay is caught up", || async { last_relayed().await == head().await }).await;
    let nats_pid = plane.nats.pid().to_string();
    let signal = |sig: &str, pid: &str| {
        assert!(Command::new("kill").args([sig, pid]).status().unwrap().success(), "kill {sig} {pid}");
    };
    signal("-STOP", &nats_pid);
    for i in 0..20 {
        post(&http, plane.cp, "/v1/apps/f/streams", json!({"name": format!("cam{i}")})).await;
    }
    let target = head().await;
    signal("-CONT", &nats_pid);
    let mut control = plane.control;
    signal("-TERM", &control.0.id().to_string());
    let status = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(40) {
            if let Some(s) = control.0.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    })
    .await
    .unwrap()
    .expect("the control plane exits");
    assert!(status.success(), "{status:?}");
    assert_eq!(last_relayed().await, target, "the stream has the log's head");
    let log = read(&plane.dir.path().join("cp.log"));
    assert!(log.contains("the log's head is in SLUICE_EVENTS"), "{log}");
}
