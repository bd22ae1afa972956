//! A bounded `SLUICE_EVENTS` (issue #19): the events no worker receives (decisions, the API
//! audit, API keys) expire after `SLUICE_EVENTS_AUDIT_TTL_SECS` while the access tables' events
//! stay, and a `max_age` (`SLUICE_EVENTS_MAX_AGE_SECS`) bounds the rest: a worker that falls
//! behind the retained range (here: cut off from NATS while it ages out) catches up from the
//! newest snapshot instead of following on over the gap.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use serde_json::json;
use sluice_control_plane::EventStore;

mod cluster;
use cluster::*;

/// A TCP forwarder to NATS that can be cut (every connection closed, new ones refused) and
/// opened again: a worker's network partition, NATS itself untouched.
struct Gate {
    port: u16,
    open: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Gate {
    async fn start(target: u16) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (o, l) = (open.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { continue };
                l.lock().unwrap().push(tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }));
            }
        });
        Gate { port, open, links }
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn reopen(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

fn get_blocking_code(port: u16, path: &str) -> Option<u16> {
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", &format!("Authorization: Bearer {NODE_SECRET}")])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).parse().ok()
}

/// `sluice-dataplane rebuild --from-log` against `nats_url`.
fn rebuild_from_log(nats_url: &str, state_dir: &std::path::Path) -> std::process::Output {
    std::process::Command::new(sluice_tests::binary("sluice-dataplane"))
        .args(["rebuild", "--from-log"])
        .env_clear()
        .env("SLUICE_NATS_URL", nats_url)
        .env("SLUICE_SEALING_KEY", SEALING_KEY)
        .env("SLUICE_STATE_DIR", state_dir)
        .output()
        .unwrap()
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap()
}

async fn events_info(js: &async_nats::jetstream::Context) -> async_nats::jetstream::stream::Info {
    js.get_stream(sluice_events::dist::EVENTS_STREAM).await.unwrap().get_info().await.unwrap()
}

async fn has_subject(js: &async_nats::jetstream::Context, subject: &str) -> bool {
    let stream = js.get_stream(sluice_events::dist::EVENTS_STREAM).await.unwrap();
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(_) => true,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => false,
        Err(e) => panic!("{e}"),
    }
}

async fn access_digest(http: &reqwest::Client, port: u16) -> (u64, String) {
    let (_, s) = get(http, format!("http://127.0.0.1:{port}/state")).await;
    (s["position"].as_u64().unwrap(), s["access_digest"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_expires_from_the_stream_and_the_tables_stay() {
    let pg = sluice_tests::Postgres::start().unwrap();
    let url = pg.create_database("ttl").await.unwrap();
    let nats = sluice_tests::Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cp = sluice_tests::free_port();
    // The stream as an earlier release made it (no TTL allowed): the relay updates it.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: sluice_events::dist::EVENTS_STREAM.into(),
        subjects: vec![sluice_events::dist::EVENTS_SUBJECTS.into()],
        duplicate_window: std::time::Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
    let retention = [("SLUICE_EVENTS_MAX_AGE_SECS", "0"), ("SLUICE_EVENTS_AUDIT_TTL_SECS", "1")];
    let _control = control_with(&url, &nats.url(), cp, "cp-1", &dir.path().join("cp.log"), &retention);
    let http = reqwest::Client::new();
    let store = EventStore::start(sluice_control_plane::connect(&url).await.unwrap());
    post(&http, cp, "/v1/apps", json!({"name": "keep"})).await;
    post(&http, cp, "/v1/apps/keep/streams", json!({"name": "cam"})).await;
    one_time_token(&http, cp, "keep", "cam", "play").await;
    // Reads the API records in its audit (sluice.ev.api): what the TTL is for.
    for _ in 0..20 {
        get(&http, format!("http://127.0.0.1:{cp}/v1/apps")).await;
    }
    // The audit is appended once a second: wait for it in the log, then on the stream.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let audit_at = Arc::new(Mutex::new(0i64));
    until("the API audit is in the log", || async {
        let p: Option<i64> = sqlx::query_scalar("SELECT max(position) FROM events WHERE type = 'ApiAccessed'")
            .fetch_one(&pool)
            .await
            .unwrap();
        *audit_at.lock().unwrap() = p.unwrap_or(0);
        p.is_some()
    })
    .await;
    let audit_at = *audit_at.lock().unwrap() as u64;
    let head = store.head().await.unwrap().0;
    until("the relay published the head", || async { events_info(&js).await.state.last_sequence >= head }).await;
    let info = events_info(&js).await;
    assert!(info.config.allow_message_ttl && info.config.max_age.is_zero(), "{:?}", info.config);
    // Published (the stream's last sequence is past it), then expired; the log keeps it.
    let stream = js.get_stream(sluice_events::dist::EVENTS_STREAM).await.unwrap();
    until("the audit expired from SLUICE_EVENTS", || async {
        stream.get_raw_message(audit_at).await.is_err() && !has_subject(&js, "sluice.ev.api").await
    })
    .await;
    for subject in ["sluice.ev.app", "sluice.ev.stream", "sluice.ev.token"] {
        assert!(has_subject(&js, subject).await, "{subject} expired");
    }
    let info = events_info(&js).await;
    assert!(info.state.messages < info.state.last_sequence, "{:?}", info.state);

    // A worker started now boots from the snapshot or folds what is left, over the gaps, to
    // the log's access tables; so does `rebuild --from-log`.
    let w = sluice_tests::free_port();
    let _worker = worker(&nats.url(), w, &dir.path().join("w"), "w1", &dir.path().join("w.log"));
    ready_at_head(&http, &store, w).await;
    let expected = folded(&store).await.access_digest().to_hex();
    assert_eq!(access_digest(&http, w).await.1, expected);
    let out = rebuild_from_log(&nats.url(), &dir.path().join("rebuild"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains(&expected), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_behind_the_retained_range_catches_up_from_the_newest_snapshot() {
    let pg = sluice_tests::Postgres::start().unwrap();
    let url = pg.create_database("aged").await.unwrap();
    let nats = sluice_tests::Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cp = sluice_tests::free_port();
    // Snapshots every second (the harness's setting), messages kept 4 s.
    let retention = [("SLUICE_EVENTS_MAX_AGE_SECS", "4"), ("SLUICE_EVENTS_AUDIT_TTL_SECS", "1")];
    let _control = control_with(&url, &nats.url(), cp, "cp-1", &dir.path().join("cp.log"), &retention);
    let http = reqwest::Client::new();
    let store = EventStore::start(sluice_control_plane::connect(&url).await.unwrap());
    post(&http, cp, "/v1/apps", json!({"name": "aged"})).await;
    post(&http, cp, "/v1/apps/aged/streams", json!({"name": "before"})).await;

    let gate = Gate::start(port_of(&nats.url())).await;
    let w = sluice_tests::free_port();
    let log = dir.path().join("w.log");
    let _worker = worker(&format!("nats://127.0.0.1:{}", gate.port), w, &dir.path().join("w"), "w1", &log);
    let head = store.head().await.unwrap().0;
    let ok = sluice_tests::eventually(WAIT, || {
        get_blocking_code(w, &format!("/wait?position={head}&timeout_ms=200")) == Some(200)
    });
    assert!(ok, "{}", read(&log));
    ready_at_head(&http, &store, w).await;
    let (cut_at, _) = access_digest(&http, w).await;

    // Cut off, the worker misses changes of its tables, and they age out of the stream.
    gate.cut();
    post(&http, cp, "/v1/apps/aged/streams", json!({"name": "during"})).await;
    one_time_token(&http, cp, "aged", "during", "publish").await;
    let r = http.delete(format!("http://127.0.0.1:{cp}/v1/apps/aged/streams/before")).bearer_auth(ADMIN).send().await;
    assert_eq!(r.unwrap().status(), 204);
    let missed = store.head().await.unwrap().0;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    until("what the worker missed aged out of SLUICE_EVENTS", || async {
        let info = events_info(&js).await;
        info.state.last_sequence >= missed && info.state.first_sequence > missed
    })
    .await;
    assert!(events_info(&js).await.state.first_sequence > cut_at + 1);

    // Back on the network: it notices the gap and takes the newest snapshot, not the events
    // after it alone (which would leave "before" live and "during" unknown for ever).
    gate.reopen();
    until("the worker caught up from the snapshot", || async {
        worker_metric(&http, w, "sluice_snapshot_catch_ups_total").await.unwrap_or(0.0) >= 1.0
    })
    .await;
    assert!(read(&log).contains("caught up from the newest snapshot"), "{}", read(&log));
    // And follows on: a change made now arrives as an event.
    post(&http, cp, "/v1/apps/aged/streams", json!({"name": "after"})).await;
    ready_at_head(&http, &store, w).await;
    let expected = folded(&store).await;
    let streams: Vec<String> =
        expected.apps[&sluice_events::AppName::parse("aged").unwrap()].streams.keys().map(|s| s.to_string()).collect();
    assert_eq!(streams, ["after", "during"]);
    until("the worker's tables are the log's", || async {
        access_digest(&http, w).await.1 == expected.access_digest().to_hex()
    })
    .await;
    // rebuild --from-log cannot fold a stream that lost its beginning: it says so.
    let out = rebuild_from_log(&nats.url(), &dir.path().join("rebuild"));
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && text.contains("rebuild --from-snapshot"), "{text}");
}
