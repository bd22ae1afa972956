//! The log's archive path (issue #19, "a log that stays bounded"): the events table is
//! partitioned by position ranges; `sluice-control archive` writes whole old partitions to
//! verifiable segment files (first and last hash, a signed anchor) and detaches them, never a
//! DELETE. Afterwards one log still reads from genesis: `verify-log` walks the segments and
//! the table as one chain, a control plane restarted on it folds the same state, explain of an
//! archived decision reads its segment, and appends go on with every stream's version. A
//! segment edited or missing is refused by name.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use serde_json::json;
use sluice_control_plane::EventStore;

mod cluster;
use cluster::*;

fn control_cli(url: &str, dir: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(sluice_tests::binary("sluice-control"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLUICE_DATABASE_URL", url)
        .env("SLUICE_NATS_URL", "nats://127.0.0.1:1")
        .env("SLUICE_SEALING_KEY", SEALING_KEY)
        .env("SLUICE_ARCHIVE_DIR", dir.join("archive"))
        .env("SLUICE_ANCHOR_FILE", dir.join("anchors.jsonl"))
        .env("SLUICE_LOG", "warn")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

async fn count(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_ranges_move_to_segments_and_the_log_still_reads_as_one() {
    let pg = sluice_tests::Postgres::start().unwrap();
    let url = pg.create_database("arch").await.unwrap();
    let nats = sluice_tests::Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = control_cli(&url, dir.path(), &["migrate"]);
    assert!(ok, "{out}");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    // Partitions of 100 positions (a million in production), so a few hundred events fill some.
    sqlx::query("UPDATE log_settings SET partition_size = 100").execute(&pool).await.unwrap();
    let archive_env = [
        ("SLUICE_ARCHIVE_DIR", dir.path().join("archive").to_string_lossy().into_owned()),
        ("SLUICE_ANCHOR_FILE", dir.path().join("anchors.jsonl").to_string_lossy().into_owned()),
    ];
    let extra: Vec<(&str, &str)> = archive_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cp = sluice_tests::free_port();
    let cp_log = dir.path().join("cp.log");
    let control = control_with(&url, &nats.url(), cp, "cp-1", &cp_log, &extra);
    let http = reqwest::Client::new();
    let store = EventStore::start(sluice_control_plane::connect(&url).await.unwrap());

    // Early in the log: an app, streams, a decision made with a one-time token.
    let policy = json!({"publish": {"methods": ["one_time_token"]}, "play": {"methods": ["open"]}});
    post(&http, cp, "/v1/apps", json!({"name": "early", "policy": policy})).await;
    post(&http, cp, "/v1/apps/early/streams", json!({"name": "cam"})).await;
    post(&http, cp, "/v1/apps/early/streams", json!({"name": "gone-later"})).await;
    let token = one_time_token(&http, cp, "early", "cam", "publish").await;
    let w = sluice_tests::free_port();
    let _worker = worker(&nats.url(), w, &dir.path().join("w"), "w1", &dir.path().join("w.log"));
    ready_at_head(&http, &store, w).await;
    let publish = json!({"app": "early", "stream": format!("cam?token={token}"), "action": "publish", "client_ip": "198.51.100.9"});
    let (code, d) = decide(&http, w, publish).await;
    assert_eq!(code, 200, "{d}");
    let decision = d["decision_id"].as_str().unwrap().to_owned();
    until("the decision is in the read model", || async {
        get(&http, format!("http://127.0.0.1:{cp}/v1/decisions/{decision}")).await.0 == 200
    })
    .await;
    // Then the log grows past three partitions.
    let mut i = 0;
    while store.head().await.unwrap().0 < 360 {
        post(&http, cp, "/v1/apps/early/streams", json!({"name": format!("s{i}")})).await;
        i += 1;
    }
    let head = store.head().await.unwrap().0;
    let (ok, verified_before) = control_cli(&url, dir.path(), &["verify-log"]);
    assert!(ok, "{verified_before}");
    let partitions_before = count(&pool, "SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass").await;

    // Archive all but the newest 50 events' partitions: 1..300 in three segments.
    let (ok, out) = control_cli(&url, dir.path(), &["archive", "--keep", "50"]);
    assert!(ok, "{out}");
    assert!(out.contains("archived 1..100 (100 events") && out.contains("archived 201..300"), "{out}");
    assert!(out.contains("the live log starts at 301"), "{out}");
    let segments: Vec<String> = std::fs::read_dir(dir.path().join("archive"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(segments.len(), 3, "{segments:?}");
    let partitions_after = count(&pool, "SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass").await;
    assert_eq!(partitions_after, partitions_before - 3);
    assert_eq!(count(&pool, "SELECT min(position) FROM events").await, 301);
    // Detached and dropped, not deleted: the append-only trigger never fired, the rows are gone.
    assert_eq!(count(&pool, "SELECT count(*) FROM events WHERE position <= 300").await, 0);

    // verify-log walks the segments and the table as one chain, past the same head and hash
    // (the running control plane may have appended its audit meanwhile).
    let (ok, out) = control_cli(&url, dir.path(), &["verify-log"]);
    assert!(ok, "{out}");
    let first_line = |s: &str| s.lines().find(|l| l.starts_with("ok:")).unwrap_or_default().to_owned();
    let head_and_hash = |s: &str| {
        let line = first_line(s);
        let words: Vec<&str> = line.split_whitespace().collect();
        (words.get(1).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0), words.last().unwrap_or(&"").to_string())
    };
    let (before_head, before_hash) = head_and_hash(&verified_before);
    assert!(head_and_hash(&out).0 >= before_head, "{out}");
    store.set_archive_dir(Some(dir.path().join("archive")));
    let at = store.hash_at(sluice_events::Position(before_head)).await.unwrap().unwrap();
    assert_eq!(at.to_hex(), before_hash, "{verified_before}");
    assert!(out.contains("archived: 3 segment(s)"), "{out}");

    // A control plane restarted on it folds the same state (archived streams included).
    drop(control);
    let control = control_with(&url, &nats.url(), cp, "cp-1", &cp_log, &extra);
    let (_, body) = get(&http, format!("http://127.0.0.1:{cp}/v1/apps/early/streams?limit=1000")).await;
    let names: Vec<&str> = body["streams"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"cam") && names.contains(&"gone-later") && names.contains(&"s0"), "{names:?}");
    // Explain of a decision whose state is archived reads it from the segment.
    let (code, explained) = get(&http, format!("http://127.0.0.1:{cp}/v1/decisions/{decision}/explain")).await;
    assert_eq!((code, explained["matches"].as_bool()), (200, Some(true)), "{explained}");
    // Appends go on: a stream whose every event is archived keeps its version.
    let r = http.delete(format!("http://127.0.0.1:{cp}/v1/apps/early/streams/gone-later")).bearer_auth(ADMIN).send();
    assert_eq!(r.await.unwrap().status(), 204);
    let r = http.delete(format!("http://127.0.0.1:{cp}/v1/apps/early/streams/s1")).bearer_auth(ADMIN).send();
    assert_eq!(r.await.unwrap().status(), 204);
    put_policy(&http, cp, "early", &json!({"publish": {"methods": ["open"]}, "play": {"methods": ["open"]}})).await;
    let now = store.head().await.unwrap().0;
    assert!(now > head);
    let (ok, out) = control_cli(&url, dir.path(), &["verify-log"]);
    let verified: u64 = first_line(&out).split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(ok && verified >= now, "{out}");
    drop(control);

    // A segment edited by one byte: verify-log and serve refuse it by name.
    let first = dir.path().join("archive").join(segments.iter().min().unwrap());
    let text = std::fs::read_to_string(&first).unwrap();
    assert!(text.contains("early"));
    std::fs::write(&first, text.replacen("early", "earlz", 1)).unwrap();
    let (ok, out) = control_cli(&url, dir.path(), &["verify-log"]);
    assert!(!ok && out.contains("archive segment") && out.contains("SHA-256"), "{out}");
    let refused_log = dir.path().join("cp-refused.log");
    let refused = control_on(&url, &nats.url(), &refused_log, &extra);
    assert!(
        sluice_tests::eventually(WAIT, || read(&refused_log).contains("archive segment")),
        "{}",
        read(&refused_log)
    );
    drop(refused);
    std::fs::write(&first, text).unwrap();
    // Without the archive directory the start names the setting.
    let missing_log = dir.path().join("cp-missing.log");
    let missing = control_on(&url, &nats.url(), &missing_log, &[]);
    assert!(
        sluice_tests::eventually(WAIT, || read(&missing_log).contains("SLUICE_ARCHIVE_DIR")),
        "{}",
        read(&missing_log)
    );
    drop(missing);
}

/// `sluice-control serve` that may refuse to start (so no wait for its port).
fn control_on(url: &str, nats: &str, log: &Path, extra: &[(&str, &str)]) -> sluice_tests::Running {
    let out = std::fs::File::create(log).unwrap();
    let mut cmd = std::process::Command::new(sluice_tests::binary("sluice-control"));
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLUICE_DATABASE_URL", url)
        .env("SLUICE_NATS_URL", nats)
        .env("SLUICE_SEALING_KEY", SEALING_KEY)
        .env("SLUICE_API_LISTEN", format!("127.0.0.1:{}", sluice_tests::free_port()));
    for (k, v) in extra {
        cmd.env(k, v);
    }
    sluice_tests::Running(cmd.stdout(out.try_clone().unwrap()).stderr(out).spawn().unwrap())
}
