//! A log that cannot be silently rewritten (issue #16 items 6, 7, 8), with the real binaries,
//! Postgres and NATS, tampered with as a database superuser would (triggers off through
//! `session_replication_role = replica`):
//! - an edited row (a policy turned `open`): `serve` refuses to start, naming the position;
//! - the newest rows deleted: the hash chain still holds, but the signed anchor does not:
//!   `verify-log` and `serve` refuse the truncated log;
//! - an edit with every later hash recomputed: the chain holds, the anchor does not;
//! - rows deleted and the log written on past NATS (no anchor covering them): the relay
//!   compares content, stops, `/ready` says why, `/metrics` counts it, and `reseed-nats` is
//!   the way out.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_events::event::{CanonicalJson, CanonicalRow, GENESIS, chain_hash_row};
use sluice_events::{Position, Timestamp};
use sluice_tests::{Nats, Postgres, Running, free_port};
use sqlx::{PgPool, Row};

mod cluster;
use cluster::*;

/// Runs `sql` as the superuser with the log's triggers off.
async fn as_superuser(pool: &PgPool, sql: &str) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica").execute(&mut *tx).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
}

/// Recomputes every hash from `from` on, as an attacker who knows the chain's recipe would.
async fn rehash_from(pool: &PgPool, from: i64) {
    let rows = sqlx::query(
        "SELECT position, event_id, stream, version, type, type_version, data::text AS data, \
         metadata::text AS metadata, recorded_at, hash FROM events ORDER BY position",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut prev = GENESIS;
    let mut updates = Vec::new();
    for row in &rows {
        let position: i64 = row.get("position");
        let event_id: uuid::Uuid = row.get("event_id");
        let (stream, event_type): (String, String) = (row.get("stream"), row.get("type"));
        let (data, metadata): (String, String) = (row.get("data"), row.get("metadata"));
        let at: chrono::DateTime<chrono::Utc> = row.get("recorded_at");
        let canonical = CanonicalRow {
            position: Position(position as u64),
            event_id: &event_id,
            stream: &stream,
            version: row.get::<i64, _>("version") as u64,
            event_type: &event_type,
            type_version: row.get::<i16, _>("type_version") as u16,
            recorded_at: Timestamp(at.timestamp_millis()),
            data: CanonicalJson::Written(data.as_bytes()),
            metadata: CanonicalJson::Written(metadata.as_bytes()),
        };
        let (hash, _) = chain_hash_row(&prev, &canonical);
        if position >= from {
            updates.push((position, hash));
        }
        prev = hash;
    }
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica").execute(&mut *tx).await.unwrap();
    for (position, hash) in updates {
        sqlx::query("UPDATE events SET hash = $1 WHERE position = $2")
            .bind(hash.0.to_vec())
            .bind(position)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

fn verify_log(url: &str, anchors: &Path) -> (bool, String) {
    let out = Command::new(sluice_tests::binary("sluice-control"))
        .arg("verify-log")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLUICE_DATABASE_URL", url)
        .env("SLUICE_SEALING_KEY", SEALING_KEY)
        .env("SLUICE_NATS_URL", "nats://127.0.0.1:9")
        .env("SLUICE_ANCHOR_FILE", anchors)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `serve` and waits for it to exit on its own (it must refuse): its log.
fn serve_refuses(url: &str, nats: &str, anchors: &Path, log: &Path) -> String {
    let port = free_port();
    let anchor_file = anchors.display().to_string();
    let mut cp = Running(
        Command::new(sluice_tests::binary("sluice-control"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SLUICE_DATABASE_URL", url)
            .env("SLUICE_NATS_URL", nats)
            .env("SLUICE_SEALING_KEY", SEALING_KEY)
            .env("SLUICE_API_LISTEN", format!("127.0.0.1:{port}"))
            .env("SLUICE_ANCHOR_FILE", &anchor_file)
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(std::fs::File::options().append(true).open(log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some(status) = cp.0.try_wait().unwrap() {
            assert!(!status.success(), "serve exited 0 on a tampered log");
            return read(log);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("serve kept serving a tampered log: {}", read(log));
}

fn anchored_at(anchors: &Path) -> u64 {
    read(anchors)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["position"].as_u64())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_rewritten_or_truncated_log_is_refused_and_never_served() {
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("tamper").await.unwrap();
    let nats = Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let anchors = dir.path().join("anchors.jsonl");
    let anchor_file = anchors.display().to_string();
    let pool = sluice_control_plane::connect(&url).await.unwrap();
    let store = sluice_control_plane::EventStore::start(pool.clone());
    let http = reqwest::Client::new();
    let cp = free_port();
    let settings = [("SLUICE_ANCHOR_FILE", anchor_file.as_str()), ("SLUICE_ANCHOR_EVERY_SECS", "1")];
    let control = control_with(&url, &nats.url(), cp, "cp-1", &dir.path().join("cp.log"), &settings);
    let policy = json!({"publish": {"methods": ["one_time_token"]}, "play": {"methods": ["open"]}});
    post(&http, cp, "/v1/apps", json!({"name": "vault", "policy": policy})).await;
    for i in 0..3 {
        post(&http, cp, "/v1/apps/vault/streams", json!({"name": format!("cam{i}")})).await;
    }
    let head = store.head().await.unwrap().0;
    until("the head is anchored", || async { anchored_at(&anchors) >= head }).await;
    drop(control);
    let (ok, out) = verify_log(&url, &anchors);
    assert!(ok && out.contains("anchored: agrees"), "{out}");
    let head = store.head().await.unwrap().0;

    // 1. A policy turned `open` in place (item 6): the chain breaks there, and serve refuses
    //    to start rather than serve it (and snapshot it to the workers).
    let app_row: i64 =
        sqlx::query_scalar("SELECT position FROM events WHERE type = 'AppCreated' AND data::text LIKE '%vault%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let edit = format!(
        "UPDATE events SET data = replace(data::text, '\"one_time_token\"', '\"open\"')::json WHERE position = {app_row}"
    );
    let original = read_data(&pool, app_row).await;
    as_superuser(&pool, &edit).await;
    assert!(read_data(&pool, app_row).await.contains("\"open\""), "the edit took");
    let (ok, out) = verify_log(&url, &anchors);
    assert!(!ok && out.contains(&format!("BROKEN at position {app_row}")), "{out}");
    let log = serve_refuses(&url, &nats.url(), &anchors, &dir.path().join("serve-1.log"));
    assert!(log.contains(&format!("hash chain broken at position {app_row}")), "{log}");
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica").execute(&mut *tx).await.unwrap();
    sqlx::query("UPDATE events SET data = $1::json WHERE position = $2")
        .bind(&original)
        .bind(app_row)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(verify_log(&url, &anchors).0, "the edit undone, the log is whole again");

    // 2. The newest rows deleted (item 8): every remaining hash is right, so only the anchor
    //    can tell. Kept aside to put back.
    as_superuser(
        &pool,
        &format!(
            "CREATE TABLE kept AS SELECT * FROM events WHERE position > {}; DELETE FROM events WHERE position > {}",
            head - 2,
            head - 2
        ),
    )
    .await;
    let (ok, out) = verify_log(&url, &anchors);
    assert!(!ok && out.contains("BROKEN at anchored position") && out.contains("rows were deleted"), "{out}");
    let log = serve_refuses(&url, &nats.url(), &anchors, &dir.path().join("serve-2.log"));
    assert!(log.contains("refusing to serve this log") && log.contains("rows were deleted"), "{log}");
    as_superuser(&pool, "INSERT INTO events SELECT * FROM kept; DROP TABLE kept").await;
    assert!(verify_log(&url, &anchors).0);

    // 3. The edit again, with every later hash recomputed (item 8): the chain holds, the
    //    anchor does not.
    as_superuser(&pool, &edit).await;
    rehash_from(&pool, app_row).await;
    let (ok, out) = verify_log(&url, &anchors);
    assert!(out.contains("ok:"), "the chain itself holds after the rehash: {out}");
    assert!(!ok && out.contains("BROKEN at anchored position") && out.contains("rewritten"), "{out}");
    let log = serve_refuses(&url, &nats.url(), &anchors, &dir.path().join("serve-3.log"));
    assert!(log.contains("disagrees with its anchor"), "{log}");
}

async fn read_data(pool: &PgPool, position: i64) -> String {
    sqlx::query_scalar("SELECT data::text FROM events WHERE position = $1")
        .bind(position)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Item 7: rows deleted under the relay (no anchor covers them yet: anchoring is slow here)
/// and the log written on past the stream's last sequence. The relay compares the stream's
/// last message with the log's row at that position, stops, and says so; `reseed-nats`
/// publishes the log again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_refuses_to_resume_onto_a_different_log() {
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("diverge").await.unwrap();
    let nats = Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pool = sluice_control_plane::connect(&url).await.unwrap();
    let store = sluice_control_plane::EventStore::start(pool.clone());
    let http = reqwest::Client::new();
    let settings = [("SLUICE_ANCHOR_EVERY_SECS", "3600")];
    let cp = free_port();
    let log = dir.path().join("cp.log");
    let control = control_with(&url, &nats.url(), cp, "cp-1", &log, &settings);
    post(&http, cp, "/v1/apps", json!({"name": "studio"})).await;
    for i in 0..4 {
        post(&http, cp, "/v1/apps/studio/streams", json!({"name": format!("cam{i}")})).await;
    }
    let head = store.head().await.unwrap().0;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let last_relayed = || {
        let js = js.clone();
        async move {
            // Not made yet (the relay starts a moment after the API): nothing relayed.
            match js.get_stream(sluice_events::dist::EVENTS_STREAM).await {
                Ok(mut s) => s.info().await.map_or(0, |i| i.state.last_sequence),
                Err(_) => 0,
            }
        }
    };
    until("the relay has the head", || async { last_relayed().await >= head }).await;
    drop(control);
    let relayed = last_relayed().await;
    as_superuser(&pool, &format!("DELETE FROM events WHERE position > {}", relayed - 3)).await;
    let control = control_with(&url, &nats.url(), cp, "cp-1", &log, &settings);
    // Written on past the stream: the same positions, other content.
    for i in 0..6 {
        post(&http, cp, "/v1/apps/studio/streams", json!({"name": format!("other{i}")})).await;
    }
    assert!(store.head().await.unwrap().0 > relayed, "the log is past the stream again");
    let ready = || async {
        let r = http.get(format!("http://127.0.0.1:{cp}/ready")).send().await.unwrap();
        (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
    };
    // (`/ready` is also 503 while the projection catches up: wait for this reason.)
    until("/ready reports the divergence", || async { ready().await.1["relay_diverged_at"].is_u64() }).await;
    let (_, body) = ready().await;
    assert_eq!(body["relay_diverged_at"].as_u64(), Some(relayed), "{body}");
    assert!(body["detail"].as_str().unwrap().contains("re-seed NATS"), "{body}");
    let metrics = http.get(format!("http://127.0.0.1:{cp}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("sluice_relay_diverged_total ") && !l.ends_with(" 0")), "{metrics}");
    assert!(last_relayed().await == relayed, "nothing of the other log was relayed");

    // The way out: re-seed NATS from the log; the relay publishes it from position 1.
    let out = Command::new(sluice_tests::binary("sluice-control"))
        .arg("reseed-nats")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLUICE_DATABASE_URL", &url)
        .env("SLUICE_NATS_URL", nats.url())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log_head = store.head().await.unwrap().0;
    until("the relay republished the log", || async { ready().await.0 == 200 }).await;
    until("the stream holds the whole log", || async {
        js.get_stream(sluice_events::dist::EVENTS_STREAM).await.is_ok() && last_relayed().await >= log_head
    })
    .await;
    drop(control);
}

/// Backup and restore (issue #18): `pg_dump` of the log, more writes, then Postgres restored
/// from that older dump. `serve` refuses the shorter log (its anchors cover positions it no
/// longer has); `reseed-nats --after-restore` retires those anchors and NATS's copy of the
/// newer log; the control plane then serves the restored log, relays it from position 1, and
/// a worker started empty agrees with it (same access digest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_comes_back_consistent_with_one_command() {
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("restore").await.unwrap();
    let nats = Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let anchors = d.join("anchors.jsonl");
    let anchors_env = anchors.to_str().unwrap().to_owned();
    let settings = [("SLUICE_ANCHOR_EVERY_SECS", "1"), ("SLUICE_ANCHOR_FILE", anchors_env.as_str())];
    let http = reqwest::Client::new();
    let cp = free_port();
    let store = sluice_control_plane::EventStore::start(sluice_control_plane::connect(&url).await.unwrap());
    let anchored_head = |store: &sluice_control_plane::EventStore| {
        let (store, anchors) = (store.clone(), anchors.clone());
        async move {
            let head = store.head().await.unwrap().0;
            std::fs::read_to_string(&anchors).unwrap_or_default().lines().any(|l| {
                serde_json::from_str::<serde_json::Value>(l).ok().and_then(|a| a["position"].as_u64()) == Some(head)
            })
        }
    };
    let control = control_with(&url, &nats.url(), cp, "cp-1", &d.join("cp.log"), &settings);
    post(&http, cp, "/v1/apps", json!({"name": "before"})).await;
    until("the head is anchored", || anchored_head(&store)).await;
    // The backup.
    let dump = d.join("log.dump");
    // (Postgres's tools run as `postgres`, which cannot write into this test's directory.)
    let shared_dump = std::env::temp_dir().join(format!("sluice-restore-{}.dump", pg.port));
    let out = sluice_tests::pg_command("pg_dump").arg("-Fc").arg("-f").arg(&shared_dump).arg(&url).output().unwrap();
    assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::copy(&shared_dump, &dump).unwrap();
    // Life goes on after it.
    post(&http, cp, "/v1/apps", json!({"name": "after"})).await;
    until("the newer head is anchored", || anchored_head(&store)).await;
    drop(control);

    // Postgres is restored from the older dump.
    let admin = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    sqlx::query("DROP DATABASE restore WITH (FORCE)").execute(&admin).await.unwrap();
    sqlx::query("CREATE DATABASE restore TEMPLATE template0").execute(&admin).await.unwrap();
    let out =
        sluice_tests::pg_command("pg_restore").args(["--no-owner", "-d", &url]).arg(&shared_dump).output().unwrap();
    let _ = std::fs::remove_file(&shared_dump);
    assert!(out.status.success(), "pg_restore: {}", String::from_utf8_lossy(&out.stderr));

    // `serve` refuses the shorter log: its anchors cover positions the log no longer has.
    let refused = sluice_control::serve_once(&url, &nats.url(), &anchors_env);
    assert!(refused.contains("rows were deleted"), "{refused}");

    // The one command for a deliberate restore.
    let out = Command::new(sluice_tests::binary("sluice-control"))
        .args(["reseed-nats", "--after-restore"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLUICE_DATABASE_URL", &url)
        .env("SLUICE_NATS_URL", nats.url())
        .env("SLUICE_ANCHOR_FILE", &anchors_env)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("deleted the anchors") && said.contains("moved"), "{said}");

    let control = control_with(&url, &nats.url(), cp, "cp-1", &d.join("cp2.log"), &settings);
    let (_, apps) = get(&http, format!("http://127.0.0.1:{cp}/v1/apps")).await;
    let names = apps.to_string();
    assert!(names.contains("\"before\"") && !names.contains("\"after\""), "{names}");
    until("the control plane is ready on the restored log", || async {
        get(&http, format!("http://127.0.0.1:{cp}/ready")).await.0 == 200
    })
    .await;
    // A worker started empty follows the restored log and agrees with it.
    let w = free_port();
    let _worker = worker(&nats.url(), w, &d.join("w"), "w1", &d.join("w.log"));
    let head = store.head().await.unwrap().0;
    ready_at(&http, w, head).await;
    until("the worker's access digest matches the control plane's", || async {
        let (_, body) = get(&http, format!("http://127.0.0.1:{cp}/v1/nodes")).await;
        body["nodes"].as_array().is_some_and(|n| n.iter().any(|n| n["node_id"] == "w1" && n["digest_match"] == true))
    })
    .await;
    drop(control);
}

/// `serve` run once against `url` with the test's settings, until it exits (bounded): what it
/// printed.
mod sluice_control {
    pub fn serve_once(url: &str, nats: &str, anchors: &str) -> String {
        let child = std::process::Command::new(sluice_tests::binary("sluice-control"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SLUICE_DATABASE_URL", url)
            .env("SLUICE_NATS_URL", nats)
            .env("SLUICE_SEALING_KEY", super::SEALING_KEY)
            .env("SLUICE_API_LISTEN", format!("127.0.0.1:{}", sluice_tests::free_port()))
            .env("SLUICE_ANCHOR_FILE", anchors)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out =
            super::wait_bounded(child, std::time::Duration::from_secs(60)).expect("serve exits on a truncated log");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }
}

/// `verify-log --from P` (issue #18) resumes from the anchor at P: only the rows after it are
/// walked, from the anchor's signed hash; a position with no anchor is refused, naming the
/// anchors there are. Not on a terminal, it prints no progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_log_resumes_from_an_anchor() {
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("resume").await.unwrap();
    let nats = Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let anchors = dir.path().join("anchors.jsonl");
    let anchors_env = anchors.to_str().unwrap().to_owned();
    let settings = [("SLUICE_ANCHOR_EVERY_SECS", "1"), ("SLUICE_ANCHOR_FILE", anchors_env.as_str())];
    let cp = free_port();
    let store = sluice_control_plane::EventStore::start(sluice_control_plane::connect(&url).await.unwrap());
    let control = control_with(&url, &nats.url(), cp, "cp-1", &dir.path().join("cp.log"), &settings);
    let http = reqwest::Client::new();
    post(&http, cp, "/v1/apps", json!({"name": "studio"})).await;
    let anchored = || {
        let text = std::fs::read_to_string(&anchors).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["position"].as_u64()).max()
    };
    until("an anchor is written", || async { anchored().is_some() }).await;
    let at = anchored().unwrap();
    for i in 0..5 {
        post(&http, cp, "/v1/apps/studio/streams", json!({"name": format!("cam{i}")})).await;
    }
    drop(control);
    let head = store.head().await.unwrap().0;
    let run = |from: &str| {
        Command::new(sluice_tests::binary("sluice-control"))
            .args(["verify-log", "--from", from])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SLUICE_DATABASE_URL", &url)
            .env("SLUICE_SEALING_KEY", SEALING_KEY)
            .env("SLUICE_NATS_URL", "nats://127.0.0.1:9")
            .env("SLUICE_ANCHOR_FILE", &anchors_env)
            .output()
            .unwrap()
    };
    let out = run(&at.to_string());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains(&format!("ok: {} events, head {head}", head - at)), "{said}");
    assert!(out.stderr.is_empty(), "no progress off a terminal: {}", String::from_utf8_lossy(&out.stderr));
    let out = run("999999");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no anchor at position 999999"));
    // The whole walk still agrees.
    assert!(verify_log(&url, &anchors).0);
    // On a terminal (`script` gives them one), the long operations show their progress:
    // position, events per second, time left.
    let on_terminal = |binary: &str, args: &str| {
        let line = format!("{} {args}", sluice_tests::binary(binary).display());
        let out = Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SLUICE_DATABASE_URL", &url)
            .env("SLUICE_SEALING_KEY", SEALING_KEY)
            .env("SLUICE_NATS_URL", nats.url())
            .env("SLUICE_ANCHOR_FILE", &anchors_env)
            .output()
            .unwrap();
        assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let shown = on_terminal("sluice-control", "verify-log");
    assert!(shown.contains(&format!("verified {head}/{head} (")) && shown.contains("events/s"), "{shown}");
    let shown = on_terminal("sluice-control", "replay");
    assert!(shown.contains(&format!("replay {head}/{head} (")) && shown.contains("events/s"), "{shown}");
    // The worker folds SLUICE_EVENTS, which may lack the log's last audit events (written as
    // the control plane stopped, after its relay): its own last position is the target.
    let shown = on_terminal("sluice-dataplane", "rebuild --from-log");
    let folded: u64 = shown
        .split("position ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no position printed: {shown}"));
    assert!(folded > 0 && folded <= head, "{shown}");
    assert!(shown.contains(&format!("rebuild {folded}/{folded} (")) && shown.contains("events/s"), "{shown}");
}
