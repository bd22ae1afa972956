//! `cargo bench -p sluice-tests --bench store`
//!
//! Event-store throughput against a real Postgres 15 with fsync and synchronous_commit on
//! (each append is durable before it returns). The same run measures pgbench's raw inserts
//! as the denominators:
//! - 1 writer;
//! - 8 concurrent writers;
//! - 100 events per append;
//! - raw single-row INSERT with 1 and 4 clients;
//! - raw 100-row INSERT batches.
//!
//! Results are printed and written to `target/bench-store.json`.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use sluice_control_plane::store::{self, ExpectedVersion};
use sluice_control_plane::{EventStore, connect};
use sluice_events::decision::RecordedRequest;
use sluice_events::event::{AccessDecided, TokenIssued};
use sluice_events::{
    Action, AppName, Decision, DecisionRecord, Event, Metadata, Method, NewEvent, NodeId, Outcome, Position, Protocol,
    Reason, Sha256Digest, StreamName, Timestamp,
};
use sluice_tests::{Durability, Postgres};
use uuid::Uuid;

const RUN: Duration = Duration::from_secs(8);

/// A one-event append: a token issued on its own stream (expects no stream).
fn token_append() -> (String, Vec<NewEvent>) {
    let event: Event = TokenIssued {
        token_sha256: Sha256Digest::of(Uuid::new_v4().as_bytes()),
        app: AppName::parse("live").unwrap(),
        stream: StreamName::parse("cam1").unwrap(),
        action: Action::Play,
        expires_at: Some(Timestamp(1_900_000_000_000)),
    }
    .into();
    (event.log_stream(), vec![NewEvent { event_id: Uuid::now_v7(), event }])
}

/// A batched append as decision ingest makes it: `n` decisions of one node.
fn decisions_append(node: &str, n: usize) -> (String, Vec<NewEvent>) {
    let events: Vec<NewEvent> = (0..n)
        .map(|i| {
            let event: Event = AccessDecided {
                decision: DecisionRecord {
                    decision: Decision {
                        id: Uuid::now_v7(),
                        outcome: Outcome::Allow,
                        reason: Reason::Allowed,
                        method: Some(Method::OneTimeToken),
                        subject: Some("token:5b1d0e5f2a6b9d8c".into()),
                        stream: StreamName::parse("cam1").unwrap(),
                        position: Position(41),
                        effects: vec![],
                    },
                    allowed: true,
                    final_reason: Reason::Allowed,
                    request: RecordedRequest {
                        app: AppName::parse("live").unwrap(),
                        stream: StreamName::parse("cam1").unwrap(),
                        action: Action::Play,
                        protocol: Protocol::Rtmp,
                        client_ip: "10.1.2.3".parse().unwrap(),
                        subscriber_id: None,
                        expires: None,
                        credential: None,
                        client_id: None,
                    },
                    decided_at: Timestamp(1_800_000_000_000),
                    node: Some(NodeId::parse(node).unwrap()),
                    webhook: None,
                    sequence: Some(i as u64),
                    publisher_slot: None,
                    repeats: None,
                },
            }
            .into();
            NewEvent { event_id: Uuid::now_v7(), event }
        })
        .collect();
    (format!("decisions-{node}"), events)
}

fn meta() -> Metadata {
    Metadata { actor: Some("key:bench".into()), request_id: Some("bench".into()), ..Metadata::default() }
}

/// `writers` tasks append `per_append` events per call until RUN passes; returns events/s
/// and appends/s. Every append is durable (committed with fsync) before it returns.
async fn run_appends(store: &EventStore, writers: usize, per_append: usize) -> (f64, f64) {
    run_appends_for(store, writers, per_append, RUN).await
}

async fn run_appends_for(store: &EventStore, writers: usize, per_append: usize, run: Duration) -> (f64, f64) {
    let deadline = Instant::now() + run;
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let s = store.clone();
            tokio::spawn(async move {
                let (mut events, mut appends) = (0u64, 0u64);
                let node = format!("bench-{w}-{}", Uuid::new_v4().simple());
                while Instant::now() < deadline {
                    let (stream, new, expected) = if per_append == 1 {
                        let (stream, new) = token_append();
                        (stream, new, ExpectedVersion::NoStream)
                    } else {
                        let (stream, new) = decisions_append(&node, per_append);
                        (stream, new, ExpectedVersion::Any)
                    };
                    s.append(&stream, expected, new, meta()).await.unwrap();
                    events += per_append as u64;
                    appends += 1;
                }
                (events, appends)
            })
        })
        .collect();
    let (mut events, mut appends) = (0u64, 0u64);
    for t in tasks {
        let (e, a) = t.await.unwrap();
        events += e;
        appends += a;
    }
    let secs = started.elapsed().as_secs_f64();
    (events as f64 / secs, appends as f64 / secs)
}

fn pgbench(pg: &Postgres, script: &str, clients: u32) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("script.sql");
    std::fs::write(&file, script).unwrap();
    let bin = std::env::var_os("SLUICE_PG_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into())
        .join("pgbench");
    let out = Command::new(bin)
        .args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres", "-n"])
        .args(["-c", &clients.to_string(), "-j", &clients.to_string(), "-T", &RUN.as_secs().to_string(), "-f"])
        .arg(&file)
        .arg("postgres")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("pgbench failed: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

/// CPU time (user + system, ms) of every process whose name starts with `name`.
fn cpu_ms(name: &str) -> f64 {
    let tick_ms = 1000.0 / 100.0; // USER_HZ
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        if !stat[open + 1..close].starts_with(name) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        total += ticks * tick_ms;
    }
    total
}

fn main() {
    let pg = Postgres::start_with(Durability::Durable).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let report = rt.block_on(async {
        // SLUICE_BENCH_SOCKET=1 connects over the Unix socket instead of TCP.
        let url = if std::env::var_os("SLUICE_BENCH_SOCKET").is_some() { pg.socket_url() } else { pg.url() };
        let pool = connect(&url).await.unwrap();
        store::migrate(&pool).await.unwrap();
        let store = EventStore::start(pool.clone());
        // SLUICE_BENCH_PROBE="1x100,8x1": only these scenarios (writers x events per append),
        // in this order on one table, for quick comparisons while profiling.
        if let Ok(probe) = std::env::var("SLUICE_BENCH_PROBE") {
            for scenario in probe.split(',') {
                let (w, n) = scenario.split_once('x').expect("SLUICE_BENCH_PROBE: WxN,WxN,…");
                let cpu = (cpu_ms("store-"), cpu_ms("postgres"));
                let (x, per_s) = run_appends(&store, w.trim().parse().unwrap(), n.trim().parse().unwrap()).await;
                let appends = per_s * RUN.as_secs_f64();
                let (client, server) = (cpu_ms("store-") - cpu.0, cpu_ms("postgres") - cpu.1);
                println!(
                    "probe {scenario} {x:.0}/s, {:.0} µs/append, CPU per append: bench {:.0} µs, Postgres {:.0} µs",
                    1e6 / per_s,
                    client * 1e3 / appends,
                    server * 1e3 / appends
                );
            }
            return None;
        }
        // Warm-up.
        run_appends(&store, 2, 1).await;
        let (one, _) = run_appends(&store, 1, 1).await;
        println!("sluice append, 1 writer, 1 event/append      {one:>9.0} appends/s");
        let (eight, _) = run_appends(&store, 8, 1).await;
        println!("sluice append, 8 writers, 1 event/append     {eight:>9.0} appends/s");
        let (batched, per_s) = run_appends(&store, 1, 100).await;
        println!("sluice append, 1 writer, 100 decisions/append   {batched:>9.0} events/s ({per_s:.0} appends/s)");
        let (batched4, _) = run_appends(&store, 4, 100).await;
        println!("sluice append, 4 writers, 100 decisions/append  {batched4:>9.0} events/s");
        let started = Instant::now();
        let report = store.verify().await.unwrap();
        let verify_rate = report.events as f64 / started.elapsed().as_secs_f64();
        println!("verify-log over {} events                 {verify_rate:>9.0} events/s", report.events);
        // What `serve` pays at start (issue #16 item 6): the log read with its chain checked,
        // against the same read unchecked, and the whole checked fold (the projection).
        let read = |checked: bool| {
            let store = store.clone();
            async move {
                let started = Instant::now();
                let (mut after, mut prev) = (sluice_events::Position::ZERO, sluice_events::event::GENESIS);
                loop {
                    let page = if checked {
                        store.read_chained(after, prev, 5000).await.unwrap()
                    } else {
                        store.read_all(after, 5000).await.unwrap()
                    };
                    let Some(last) = page.last() else { break };
                    (after, prev) = (last.position, last.hash);
                }
                started.elapsed().as_secs_f64()
            }
        };
        let unchecked = read(false).await;
        let checked = read(true).await;
        println!("read the log, unchecked / chain checked    {unchecked:.2} s / {checked:.2} s");
        let started = Instant::now();
        let projection = sluice_control_plane::projection::Projection::start(&store, None).await.unwrap();
        let fold = started.elapsed().as_secs_f64();
        println!("serve's checked fold over {} events      {fold:.2} s", projection.position().0);

        // The archive path (issue #19): the log topped up to SLUICE_BENCH_ARCHIVE_EVENTS
        // (default 3,000,000) with batches of decisions, then every whole partition (a million
        // positions) that ends 500,000 events before the head archived to segment files;
        // verify-log and the checked fold then read the segments and the table as one log.
        let target: u64 =
            std::env::var("SLUICE_BENCH_ARCHIVE_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(3_000_000);
        let started = Instant::now();
        while store.head().await.unwrap().0 < target {
            run_appends_for(&store, 4, 100, Duration::from_secs(2)).await;
        }
        let topped = store.head().await.unwrap().0;
        println!("log topped up to {topped} events in {:.1} s", started.elapsed().as_secs_f64());
        sqlx::query("CHECKPOINT").execute(&pool).await.unwrap();
        sqlx::query("VACUUM ANALYZE events").execute(&pool).await.unwrap();
        run_appends(&store, 2, 1).await;
        let (big_one, _) = run_appends(&store, 1, 1).await;
        let (big_batched, _) = run_appends(&store, 4, 100).await;
        println!("at {topped} events, before archiving: 1 writer {big_one:.0} appends/s, 4 x 100 {big_batched:.0} events/s");
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let archived = store
            .archive(dir.path(), 500_000, |p, h| format!("{{\"position\":{},\"hash\":\"{}\"}}", p.0, h.to_hex()))
            .await
            .unwrap();
        let archive_s = started.elapsed().as_secs_f64();
        let archived_events: u64 = archived.iter().map(|a| a.events).sum();
        let segment_bytes: u64 = archived.iter().map(|a| a.bytes).sum();
        println!(
            "archive: {} partitions, {archived_events} events, {:.0} MiB of segments in {archive_s:.1} s ({:.0} events/s)",
            archived.len(),
            segment_bytes as f64 / 1048576.0,
            archived_events as f64 / archive_s
        );
        let live: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&pool).await.unwrap();
        println!("rows left in Postgres {live}");
        store.set_archive_dir(Some(dir.path().to_owned()));
        let started = Instant::now();
        let across = store.verify().await.unwrap();
        let verify_across = across.events as f64 / started.elapsed().as_secs_f64();
        println!("verify-log over segments + table, {} events {verify_across:>9.0} events/s", across.events);
        let started = Instant::now();
        let projection = sluice_control_plane::projection::Projection::start(&store, None).await.unwrap();
        let fold_across = started.elapsed().as_secs_f64();
        println!("serve's checked fold over segments + table, {} events {fold_across:.2} s", projection.position().0);
        // The same footing as the first runs: the top-up's dirty pages flushed and the live
        // partitions analysed, before appending again.
        sqlx::query("CHECKPOINT").execute(&pool).await.unwrap();
        sqlx::query("VACUUM ANALYZE events").execute(&pool).await.unwrap();
        // And the same warm-up as the first runs (the reads above went through 1.7 GB of
        // segments and the whole table: the live partition's pages are cold again).
        run_appends(&store, 2, 1).await;
        let (after_one, _) = run_appends(&store, 1, 1).await;
        let (after_batched, _) = run_appends(&store, 4, 100).await;
        println!(
            "after archiving: 1 writer {after_one:.0} appends/s, 4 x 100 {after_batched:.0} events/s, paths {:?}",
            store.append_paths()
        );

        sqlx::query("CREATE TABLE raw (id bigserial PRIMARY KEY, data jsonb NOT NULL)").execute(&pool).await.unwrap();
        Some(serde_json::json!({"one": one, "eight": eight, "batched": batched, "batched4": batched4, "verify": verify_rate, "events": report.events, "read_unchecked_s": unchecked, "read_checked_s": checked, "checked_fold_s": fold,
            "archive": {"events_before": topped, "partitions": archived.len(), "archived_events": archived_events, "segment_bytes": segment_bytes, "archive_s": archive_s, "rows_left": live, "verify_across_per_s": verify_across, "fold_across_s": fold_across, "appends_big_one": big_one, "appends_big_4x100": big_batched, "appends_after_one": after_one, "appends_after_4x100": after_batched}}))
    });
    // A probe stops here; the cluster stops when `pg` drops.
    let Some(report) = report else { return };
    let row = r#"INSERT INTO raw (data) VALUES ('{"token_sha256":"5b1d0e5f2a6b9d8c5b1d0e5f2a6b9d8c5b1d0e5f2a6b9d8c5b1d0e5f2a6b9d8c","app":"live","stream":"cam1","action":"play","expires_at":1900000000000}');"#;
    let raw1 = pgbench(&pg, row, 1);
    println!("pgbench raw INSERT, 1 client                 {raw1:>9.0} rows/s");
    let raw4 = pgbench(&pg, row, 4);
    println!("pgbench raw INSERT, 4 clients                {raw4:>9.0} rows/s");
    let raw8 = pgbench(&pg, row, 8);
    println!("pgbench raw INSERT, 8 clients                {raw8:>9.0} rows/s");
    let batch = r#"INSERT INTO raw (data) SELECT '{"token_sha256":"5b1d0e5f2a6b9d8c5b1d0e5f2a6b9d8c5b1d0e5f2a6b9d8c5b1d0e5f2a6b9d8c","app":"live","stream":"cam1","action":"play","expires_at":1900000000000}'::jsonb FROM generate_series(1, 100);"#;
    let raw_batch = pgbench(&pg, batch, 1) * 100.0;
    println!("pgbench raw 100-row INSERT, 1 client         {raw_batch:>9.0} rows/s");
    let mut report = report;
    report["pgbench_raw_1"] = raw1.into();
    report["pgbench_raw_4"] = raw4.into();
    report["pgbench_raw_8"] = raw8.into();
    report["pgbench_raw_batch100"] = raw_batch.into();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-store.json");
    let _ = std::fs::write(path, serde_json::to_string_pretty(&report).unwrap());
}
