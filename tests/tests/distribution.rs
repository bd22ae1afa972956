//! Distribution end to end, with the real binaries, Postgres and NATS: the relay puts the
//! log into `SLUICE_EVENTS` with sequence == position, a second control plane takes the relay
//! over when the first dies, workers boot from snapshots and follow the feed, `GET /v1/nodes`
//! shows them with zero lag and a matching digest, and a worker restarted with NATS and the
//! control plane both down boots from its local snapshot with the same state. A NATS outage
//! loses nothing: writes made meanwhile reach the stream and the worker when it returns.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use sluice_control_plane::EventStore;
use sluice_events::{AuthState, Position};
use sluice_tests::{Nats, Postgres, free_port};

mod cluster;
use cluster::*;

/// `SLUICE_EVENTS` holds exactly the log up to `head`, message k being position k.
async fn assert_stream_is_the_log(nats_url: &str, head: Position) {
    let client = async_nats::connect(nats_url).await.unwrap();
    let stream = async_nats::jetstream::new(client).get_stream("SLUICE_EVENTS").await.unwrap();
    // Audit events may have been relayed since `head` was read; the first `head` are checked.
    assert!(stream.get_info().await.unwrap().state.last_sequence >= head.0);
    for seq in 1..=head.0 {
        let raw = stream.get_raw_message(seq).await.unwrap();
        assert_eq!(sluice_events::dist::decode_event(&raw.payload).unwrap().position.0, seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_follow_the_log_through_nats_and_keep_their_state_through_outages() {
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("dist").await.unwrap();
    let mut nats = Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let (cp_a, cp_b) = (free_port(), free_port());
    let a = control(&url, &nats.url(), cp_a, "cp-a", &dir.path().join("cp-a.log"));

    post(&http, cp_a, "/v1/apps", json!({"name": "studio"})).await;
    for i in 1..=5 {
        post(&http, cp_a, "/v1/apps/studio/streams", json!({"name": format!("cam{i}")})).await;
    }
    post(&http, cp_a, "/v1/apps/studio/streams/cam1/tokens", json!({"action": "publish", "expires_in": 600})).await;

    // A worker boots (from the NATS snapshot once there is one) and follows the feed.
    let w_dir = dir.path().join("w1");
    let w_log = dir.path().join("w1.log");
    let (w_port, probe_port) = (free_port(), free_port());
    let probe = format!("127.0.0.1:{probe_port}");
    let mut w = worker_with(&nats.url(), w_port, &w_dir, "edge-1", &w_log, &[("SLUICE_PROBE_LISTEN", &probe)]);
    until("the worker is ready", || async { get(&http, format!("http://127.0.0.1:{w_port}/ready")).await.0 == 200 })
        .await;
    // The node API wants the node credential; probes and metrics do not (issue #16 item 2),
    // and the probe listener serves nothing else.
    for path in ["/state", "/wait?position=1", "/spool"] {
        let url = format!("http://127.0.0.1:{w_port}{path}");
        assert_eq!(http.get(&url).send().await.unwrap().status(), 401, "{path} without a credential");
        let wrong = http.get(&url).bearer_auth("not-the-node-secret-0123456789").send().await.unwrap();
        assert_eq!(wrong.status(), 401, "{path} with a wrong credential");
        assert_eq!(http.get(format!("http://{probe}{path}")).send().await.unwrap().status(), 404, "{path} on probes");
    }
    let decide = json!({"app": "studio", "stream": "cam1", "action": "play", "client_ip": "192.0.2.1"});
    let r = http.post(format!("http://127.0.0.1:{w_port}/v1/decide")).json(&decide).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized", "{body}");
    assert_eq!(http.post(format!("http://{probe}/v1/decide")).json(&decide).send().await.unwrap().status(), 404);
    for base in [format!("127.0.0.1:{w_port}"), probe.clone()] {
        for path in ["/health", "/ready", "/metrics"] {
            let r = http.get(format!("http://{base}{path}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{base}{path} is open");
        }
    }

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let store = EventStore::start(pool);
    // Compared with the log: audit batches may land meanwhile, but they change no access
    // table, so the access digest at any later position is the head's.
    let head = store.head().await.unwrap();
    let expected = folded(&store).await;
    assert_eq!(expected.apps[&sluice_events::AppName::parse("studio").unwrap()].streams.len(), 5);
    until("the worker applied the whole log", || async {
        let (_, s) = get(&http, format!("http://127.0.0.1:{w_port}/state")).await;
        s["position"].as_u64() >= Some(head.0)
    })
    .await;
    let (_, s) = get(&http, format!("http://127.0.0.1:{w_port}/state")).await;
    assert_eq!(s["access_digest"], expected.access_digest().to_hex(), "{s}");
    // Read-your-writes at the edge: /wait answers at once for an applied position, 504 for a
    // position that does not exist yet.
    let (code, _) = get(&http, format!("http://127.0.0.1:{w_port}/wait?position={}", head.0)).await;
    assert_eq!(code, 200);
    let (code, body) =
        get(&http, format!("http://127.0.0.1:{w_port}/wait?position={}&timeout_ms=200", head.0 + 1000)).await;
    assert_eq!((code, body["waited_for"].as_u64()), (504, Some(head.0 + 1000)));
    // Bad input on the admin port: a clear 400, and the worker goes on.
    for bad in ["/wait", "/wait?position=abc", "/wait?position=-1", "/wait?position=1&timeout_ms=x"] {
        let r = http.get(format!("http://127.0.0.1:{w_port}{bad}")).bearer_auth(NODE_SECRET).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{bad}");
    }
    assert_eq!(get(&http, format!("http://127.0.0.1:{w_port}/ready")).await.0, 200);
    assert_eq!((s["streams"].as_u64(), s["tokens"].as_u64()), (Some(5), Some(1)));

    // SLUICE_EVENTS holds the log with sequence == position, no gap, no duplicate.
    assert_stream_is_the_log(&nats.url(), head).await;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    // The snapshot manifest in KV points at a stored, decodable body.
    let kv = js.get_key_value("sluice-snapshots").await.unwrap();
    let manifest: sluice_events::dist::SnapshotManifest =
        serde_json::from_slice(&kv.get("data-plane").await.unwrap().unwrap()).unwrap();
    assert!(manifest.position.0 >= 3, "{manifest:?}");

    // GET /v1/nodes: the worker, live, zero lag, same digest.
    until("GET /v1/nodes shows edge-1 in sync", || async {
        let (code, body) = get(&http, format!("http://127.0.0.1:{cp_a}/v1/nodes")).await;
        let n = &body["nodes"][0];
        code == 200 && n["node_id"] == "edge-1" && n["lag"] == 0 && n["digest_match"] == true && n["stale"] == false
    })
    .await;

    // A second control plane waits for the relay lock; when the first dies it takes over.
    let b = control(&url, &nats.url(), cp_b, "cp-b", &dir.path().join("cp-b.log"));
    drop(a);
    post(&http, cp_b, "/v1/apps/studio/streams", json!({"name": "cam6"})).await;
    until("the worker sees cam6 through the new relay", || async {
        let (_, s) = get(&http, format!("http://127.0.0.1:{w_port}/state")).await;
        s["streams"].as_u64() == Some(6)
    })
    .await;
    assert!(read(&dir.path().join("cp-b.log")).contains("this instance is the relay"));

    // NATS goes away: the worker keeps its state and stays ready.
    nats.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, ready) = get(&http, format!("http://127.0.0.1:{w_port}/ready")).await;
    assert_eq!((code, ready["ready"].as_bool()), (200, Some(true)), "{ready}");
    // Writes go on meanwhile (Postgres is the truth); when NATS is back the relay resumes
    // from the stream's last sequence and the worker catches up.
    post(&http, cp_b, "/v1/apps/studio/streams", json!({"name": "cam7"})).await;
    nats.restart().unwrap();
    until("the worker catches up after the NATS outage", || async {
        let (_, s) = get(&http, format!("http://127.0.0.1:{w_port}/state")).await;
        s["streams"].as_u64() == Some(7) && s["synced"] == true
    })
    .await;
    let head = store.head().await.unwrap();
    until("SLUICE_EVENTS holds the whole log again", || async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream("SLUICE_EVENTS").await.unwrap();
        stream.get_info().await.unwrap().state.last_sequence >= head.0
    })
    .await;
    assert_stream_is_the_log(&nats.url(), head).await;
    nats.stop();
    let (_, before) = get(&http, format!("http://127.0.0.1:{w_port}/state")).await;
    // Once the local snapshot holds the last change, restart the worker with NATS and both
    // control planes down.
    let local = w_dir.join("snapshot.bin");
    let at = before["position"].as_u64().unwrap();
    until("the local snapshot holds the last change", || async {
        std::fs::read(&local)
            .ok()
            .and_then(|b| sluice_events::state::snapshot::info(&b).ok())
            .is_some_and(|i| i.position.0 >= at)
    })
    .await;
    drop(b);
    w.0.kill().unwrap();
    w.0.wait().unwrap();
    w = worker("nats://127.0.0.1:9", w_port, &w_dir, "edge-1", &w_log);
    until("the restarted worker is ready from its local snapshot", || async {
        get(&http, format!("http://127.0.0.1:{w_port}/ready")).await.0 == 200
    })
    .await;
    let (_, after) = get(&http, format!("http://127.0.0.1:{w_port}/state")).await;
    assert_eq!(after["access_digest"], before["access_digest"]);
    assert_eq!(after["streams"].as_u64(), Some(7));
    assert!(read(&w_log).contains("source=\"local\""), "{}", read(&w_log));
    drop(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_local_snapshots_are_set_aside_with_a_clear_line() {
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("dist_bad").await.unwrap();
    let nats = Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let cp = free_port();
    let _a = control(&url, &nats.url(), cp, "cp", &dir.path().join("cp.log"));
    post(&http, cp, "/v1/apps", json!({"name": "studio"})).await;
    post(&http, cp, "/v1/apps/studio/streams", json!({"name": "cam1"})).await;

    let w_dir = dir.path().join("w");
    std::fs::create_dir_all(&w_dir).unwrap();
    let snapshot = w_dir.join("snapshot.bin");
    // 1. garbage; 2. a valid header from a future schema version.
    let mut future = sluice_events::state::snapshot::encode(&AuthState::new());
    future[16..18].copy_from_slice(&99u16.to_le_bytes());
    for (bad, says) in [(b"garbage".to_vec(), "snapshot truncated: 7 bytes"), (future, "schema 99 is newer")] {
        std::fs::write(&snapshot, &bad).unwrap();
        let log = dir.path().join("w.log");
        let _ = std::fs::remove_file(&log);
        let port = free_port();
        let w = worker(&nats.url(), port, &w_dir, "edge-2", &log);
        until("the worker is ready from NATS", || async {
            let (_, s) = get(&http, format!("http://127.0.0.1:{port}/state")).await;
            s["ready"] == true && s["streams"].as_u64() == Some(1)
        })
        .await;
        let text = read(&log);
        assert!(text.contains("local snapshot rejected") && text.contains(says), "{text}");
        assert!(w_dir.join("snapshot.bin.rejected").exists());
        drop(w);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_publish_leaves_no_gap_and_no_duplicate() {
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("relaykill").await.unwrap();
    let nats = Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let log = dir.path().join("cp.log");
    let port = free_port();
    let mut cp = control(&url, &nats.url(), port, "cp-1", &log);
    post(&http, port, "/v1/apps", json!({"name": "studio"})).await;
    // Writers keep the relay busy with batches in flight while the process is killed (SIGKILL:
    // no shutdown path runs) between publishes and their acknowledgements. They write until
    // the control plane is gone, and it is killed once 200 writes are answered: mid-burst by
    // construction, however fast or slow the machine is.
    let answered = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (http, answered) = (http.clone(), answered.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    let url = format!("http://127.0.0.1:{port}/v1/apps/studio/streams");
                    let body = json!({"name": format!("w{w}-{i}")});
                    match http.post(url).bearer_auth(ADMIN).json(&body).send().await {
                        Ok(r) if r.status().is_success() => answered.fetch_add(1, Ordering::Relaxed),
                        _ => return,
                    };
                }
            })
        })
        .collect();
    until("200 writes are answered", || async { answered.load(Ordering::Relaxed) >= 200 }).await;
    cp.0.kill().unwrap();
    let _ = cp.0.wait();
    futures::future::join_all(writers).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let store = EventStore::start(pool);
    // The successor resumes from the stream's last sequence; more writes follow.
    let _cp = control(&url, &nats.url(), port, "cp-1", &log);
    for i in 0..5 {
        post(&http, port, "/v1/apps/studio/streams", json!({"name": format!("after-{i}")})).await;
    }
    let head = store.head().await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    until("the relay has caught up with the log", || async {
        js.get_stream("SLUICE_EVENTS").await.unwrap().get_info().await.unwrap().state.last_sequence >= head.0
    })
    .await;
    let head = store.head().await.unwrap();
    assert_stream_is_the_log(&nats.url(), head).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_snapshot_newer_than_the_nats_one_is_the_one_booted() {
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("newer").await.unwrap();
    let nats = Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let port = free_port();
    // NATS snapshots every 20 events only, so the worker's own (every second) gets ahead.
    let _cp = control_with(
        &url,
        &nats.url(),
        port,
        "cp-1",
        &dir.path().join("cp.log"),
        &[("SLUICE_SNAPSHOT_EVERY_EVENTS", "20"), ("SLUICE_SNAPSHOT_EVERY_SECS", "3600")],
    );
    post(&http, port, "/v1/apps", json!({"name": "studio"})).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let store = EventStore::start(pool);
    let mut i = 0;
    while store.head().await.unwrap().0 < 22 {
        post(&http, port, "/v1/apps/studio/streams", json!({"name": format!("cam{i}")})).await;
        i += 1;
    }
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let kv = js.get_key_value("sluice-snapshots").await.unwrap();
    let manifest = || async {
        let bytes = kv.get("data-plane").await.ok().flatten()?;
        serde_json::from_slice::<sluice_events::dist::SnapshotManifest>(&bytes).ok()
    };
    until("a NATS snapshot exists", || async { manifest().await.is_some() }).await;
    let nats_at = manifest().await.unwrap().position.0;
    for j in 0..3 {
        post(&http, port, "/v1/apps/studio/streams", json!({"name": format!("late{j}")})).await;
    }
    let w_dir = dir.path().join("w1");
    let w_log = dir.path().join("w1.log");
    let w_port = free_port();
    let mut w = worker(&nats.url(), w_port, &w_dir, "w1", &w_log);
    let head = store.head().await.unwrap().0;
    assert!(head > nats_at);
    ready_at(&http, w_port, head).await;
    let local = w_dir.join("snapshot.bin");
    until("its local snapshot is at the head", || async {
        std::fs::read(&local)
            .ok()
            .and_then(|b| sluice_events::state::snapshot::info(&b).ok())
            .is_some_and(|i| i.position.0 >= head)
    })
    .await;
    assert_eq!(manifest().await.unwrap().position.0, nats_at, "the NATS snapshot stayed older");

    w.0.kill().unwrap();
    let _ = w.0.wait();
    let before = read(&w_log).len();
    let _w = worker(&nats.url(), w_port, &w_dir, "w1", &w_log);
    until("the restarted worker booted", || async { read(&w_log)[before..].contains("state booted") }).await;
    let boot = read(&w_log)[before..].to_owned();
    assert!(boot.contains("local snapshot is as new as the NATS one or newer; using it"), "{boot}");
    assert!(boot.contains("source=\"local\"") || boot.contains("source=local"), "{boot}");
    let (_, state) = get(&http, format!("http://127.0.0.1:{w_port}/state")).await;
    assert!(state["position"].as_u64().unwrap() >= head, "{state}");
}
