//! Postgres with a streaming standby (issue #19): under a write load through the API the primary
//! is SIGKILLed and the standby promoted; the control plane, given both servers in one multi-host
//! URL, follows the promotion and serves on without a restart. With synchronous replication no
//! acknowledged write is lost. With asynchronous replication the writes the standby never
//! received are lost: the running control plane refuses to move to a primary that lacks what it
//! served, and a control plane started on it refuses the log (anchors) or stops its relay
//! (`SLUICE_EVENTS` ahead) rather than publish a different history.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

mod cluster;
use cluster::*;

/// Registers streams `s0`, `s1`, … until `stop`; the names the API acknowledged.
fn write_load(cp: u16, stop: Arc<std::sync::atomic::AtomicBool>) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
        let mut acknowledged = Vec::new();
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            let name = format!("s{n}");
            let r = http
                .post(format!("http://127.0.0.1:{cp}/v1/apps/ha/streams"))
                .bearer_auth(ADMIN)
                .json(&json!({"name": name}))
                .send()
                .await;
            if r.is_ok_and(|r| r.status() == 201) {
                acknowledged.push(name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        acknowledged
    })
}

async fn sql(url: &str, statement: &str) {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(statement.to_owned())).execute(&pool).await.unwrap();
    pool.close().await;
}

async fn streams_on(cp: u16) -> Vec<String> {
    let (_, body) = get(&reqwest::Client::new(), format!("http://127.0.0.1:{cp}/v1/apps/ha/streams?limit=1000")).await;
    body["streams"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_synchronous_replication_a_promotion_loses_no_acknowledged_write() {
    let mut primary = sluice_tests::Postgres::start_with(sluice_tests::Durability::Durable).unwrap();
    let url = primary.create_database("ha").await.unwrap();
    sql(&primary.url(), "ALTER SYSTEM SET synchronous_standby_names = '*'").await;
    sql(&primary.url(), "SELECT pg_reload_conf()").await;
    let standby = primary.start_standby().unwrap();
    let admin = primary.url();
    until("the standby replicates synchronously", || {
        let admin = admin.clone();
        async move {
            let pool = sqlx::PgPool::connect(&admin).await.unwrap();
            let state: Option<String> = sqlx::query_scalar("SELECT sync_state FROM pg_stat_replication LIMIT 1")
                .fetch_optional(&pool)
                .await
                .unwrap();
            pool.close().await;
            state.as_deref() == Some("sync")
        }
    })
    .await;
    let nats = sluice_tests::Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cp = sluice_tests::free_port();
    // One URL naming both servers, as libpq takes it: the control plane writes to whichever
    // is the primary and follows a promotion without a restart.
    let both = both_servers(&url, &standby.url_for("ha"));
    let log = dir.path().join("cp1.log");
    let _control = control_with(&both, &nats.url(), cp, "cp-1", &log, &[]);
    let http = reqwest::Client::new();
    post(&http, cp, "/v1/apps", json!({"name": "ha"})).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = write_load(cp, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    primary.kill().unwrap();
    let killed = Instant::now();
    standby.promote().unwrap();
    // The promoted standby inherited `synchronous_standby_names` from the primary's settings:
    // with no standby of its own, every commit would wait for ever. A real failover promotes
    // with a second standby attached, or resets it (docs/operations.md).
    sql(&standby.url(), "ALTER SYSTEM RESET synchronous_standby_names").await;
    sql(&standby.url(), "SELECT pg_reload_conf()").await;
    let first: Arc<Mutex<Option<Duration>>> = Arc::default();
    until("writes succeed again through the same control plane", || {
        let (http, first) = (http.clone(), first.clone());
        async move {
            let r = http
                .post(format!("http://127.0.0.1:{cp}/v1/apps/ha/streams"))
                .bearer_auth(ADMIN)
                .json(&json!({"name": "after"}))
                .send()
                .await;
            let ok = r.is_ok_and(|r| r.status() == 201);
            if ok {
                *first.lock().unwrap() = Some(killed.elapsed());
            }
            ok
        }
    })
    .await;
    // The load goes on a little on the new primary, then stops.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acknowledged = load.await.unwrap();
    assert!(acknowledged.len() > 20, "{} writes acknowledged", acknowledged.len());
    assert!(read(&log).contains("the Postgres primary moved"), "{}", read(&log));
    let present = streams_on(cp).await;
    let lost: Vec<&String> = acknowledged.iter().filter(|n| !present.contains(n)).collect();
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
    println!(
        "synchronous standby: {} writes acknowledged, 0 lost; writes again {:?} after the primary was killed \
         (promotion, and the running control plane following it)",
        acknowledged.len(),
        first.lock().unwrap().unwrap()
    );
}

/// One libpq multi-host URL naming the servers of two single-host URLs of database `ha`.
fn both_servers(primary: &str, standby: &str) -> String {
    let authority = |url: &str| {
        let rest = url.split_once('@').unwrap().1;
        rest[..rest.find('/').unwrap()].to_owned()
    };
    format!("postgres://postgres@{},{}/ha?target_session_attrs=read-write", authority(primary), authority(standby))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_asynchronous_replication_lost_writes_stop_the_relay_instead_of_a_new_history() {
    let mut primary = sluice_tests::Postgres::start_with(sluice_tests::Durability::Durable).unwrap();
    let url = primary.create_database("ha").await.unwrap();
    let standby = primary.start_standby().unwrap();
    let nats = sluice_tests::Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cp = sluice_tests::free_port();
    let both = both_servers(&url, &standby.url_for("ha"));
    let log1 = dir.path().join("cp1.log");
    let control = control_with(&both, &nats.url(), cp, "cp-1", &log1, &[]);
    let http = reqwest::Client::new();
    post(&http, cp, "/v1/apps", json!({"name": "ha"})).await;
    // The standby has everything so far; then it stops receiving (its WAL receiver frozen), as
    // a lagging asynchronous standby does, while the primary goes on acknowledging and the relay
    // publishes those writes to SLUICE_EVENTS.
    let standby_admin = standby.url();
    until("the standby has replayed the app", || {
        let u = standby.url_for("ha");
        async move {
            let Ok(pool) = sqlx::PgPool::connect(&u).await else { return false };
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE type = 'AppCreated'")
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
            pool.close().await;
            n >= 2
        }
    })
    .await;
    let pool = sqlx::PgPool::connect(&standby_admin).await.unwrap();
    let receiver: i32 = sqlx::query_scalar("SELECT pid FROM pg_stat_wal_receiver").fetch_one(&pool).await.unwrap();
    pool.close().await;
    assert!(std::process::Command::new("kill").args(["-STOP", &receiver.to_string()]).status().unwrap().success());
    for i in 0..20 {
        post(&http, cp, "/v1/apps/ha/streams", json!({"name": format!("lost{i}")})).await;
    }
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let head = {
        let store = sluice_control_plane::EventStore::start(sluice_control_plane::connect(&url).await.unwrap());
        store.head().await.unwrap().0
    };
    until("the relay published the writes the standby lacks", || async {
        match js.get_stream(sluice_events::dist::EVENTS_STREAM).await {
            Ok(mut s) => s.info().await.is_ok_and(|i| i.state.last_sequence >= head),
            Err(_) => false,
        }
    })
    .await;
    primary.kill().unwrap();
    // What the frozen receiver has in its socket buffers it never reads: it dies unread.
    let _ = std::process::Command::new("kill").args(["-KILL", &receiver.to_string()]).status();
    standby.promote().unwrap();
    // The running control plane, following the primary, sees the promoted standby lacks the
    // last event it served and does not write to it.
    let refused = sluice_tests::eventually(WAIT, || read(&log1).contains("lacks what this control plane served"));
    assert!(refused, "the running control plane moved to a standby that lost writes: {}", read(&log1));
    assert!(!read(&log1).contains("the Postgres primary moved"), "{}", read(&log1));
    drop(control);

    // The log lost its tail; the anchors and the stream still have it. The control plane refuses
    // to serve a log shorter than a signed anchor, or, when no anchor covered the lost writes
    // yet, its relay refuses to go on from a stream ahead of the log: never a second history.
    let cp2 = sluice_tests::free_port();
    let log = dir.path().join("cp2.log");
    let out = std::fs::File::create(&log).unwrap();
    let _control2 = sluice_tests::Running(
        std::process::Command::new(sluice_tests::binary("sluice-control"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SLUICE_DATABASE_URL", standby.url_for("ha"))
            .env("SLUICE_NATS_URL", nats.url())
            .env("SLUICE_SEALING_KEY", SEALING_KEY)
            .env("SLUICE_API_LISTEN", format!("127.0.0.1:{cp2}"))
            .env("SLUICE_INSTANCE_ID", "cp-2")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    );
    let noticed = sluice_tests::eventually(WAIT, || {
        let text = read(&log);
        text.contains("refusing to serve this log") || text.contains("SLUICE_EVENTS is ahead of the log")
    });
    assert!(noticed, "the lost tail went unnoticed: {}", read(&log));
    let standby_log =
        sluice_control_plane::EventStore::start(sluice_control_plane::connect(&standby.url_for("ha")).await.unwrap());
    assert!(standby_log.head().await.unwrap().0 < head, "the promoted standby lacks the last writes");
}
