//! The real binaries against a real Postgres: serve/bootstrap/health, verify-log, replay,
//! migrate, and the one-line errors for bad settings.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sluice_events::{AuthState, Position, Sha256Digest};
use sluice_tests::{Postgres, Running, binary, free_port, http_get};

const SEALING_KEY: &str = "c2x1aWNlLXRlc3Qtc2VhbGluZy1rZXktMzItYnl0ZXM=";

fn control(pg_url: &str) -> Command {
    let mut c = Command::new(binary("sluice-control"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLUICE_DATABASE_URL", pg_url)
        .env("SLUICE_SEALING_KEY", SEALING_KEY)
        // No NATS here: the relay and heartbeat listener retry quietly in the background
        // (never against a developer's own NATS on the default port).
        .env("SLUICE_NATS_URL", "nats://127.0.0.1:9")
        .env("SLUICE_LOG", "warn");
    c
}

/// Starts `serve` and waits for its "listening" line; returns the process and what it printed.
fn serve(pg_url: &str, port: u16, extra: &[(&str, &str)]) -> (Running, Vec<String>) {
    let mut cmd = control(pg_url);
    cmd.arg("serve").env("SLUICE_API_LISTEN", format!("127.0.0.1:{port}")).stdout(Stdio::piped()).stderr(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let running = Running(child);
    let mut lines = Vec::new();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("serve printed its listening line");
        let done = line.contains("listening on");
        lines.push(line);
        if done {
            return (running, lines);
        }
    }
}

fn run(mut c: Command) -> Output {
    c.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn first_start_bootstraps_once_and_serves_health() {
    let pg = Postgres::start().unwrap();
    let port = free_port();
    let (server, lines) = serve(&pg.url(), port, &[]);
    let key_line = lines.iter().find(|l| l.contains("SLUICE_ADMIN_KEY=")).expect("admin key printed on first start");
    let secret = key_line.trim().trim_start_matches("SLUICE_ADMIN_KEY=").to_owned();
    // Letters and digits only (tools extract SLS keys with `[A-Za-z0-9]+`), and SLS's own line.
    assert!(secret.starts_with("sk") && secret.len() == 45, "{secret}");
    assert!(secret.chars().all(|c| c.is_ascii_alphanumeric()), "{secret}");
    assert!(lines.iter().any(|l| l.trim() == format!("Generated default admin API key: {secret}")), "{lines:?}");

    let (status, body) = http_get(port, "/health").unwrap();
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["service"], "sluice-control");
    assert!(body["version"].is_string());
    let (status, ready) = http_get(port, "/ready").unwrap();
    assert_eq!(status, 200, "{ready}");

    // The log holds the key's hash and the SLS app, never the key itself.
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let rows: Vec<(String, serde_json::Value, serde_json::Value)> =
        sqlx::query_as("SELECT type, data, metadata FROM events ORDER BY position").fetch_all(&pool).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), vec!["ApiKeyCreated", "AppCreated"]);
    assert_eq!(rows[0].1["secret_sha256"], Sha256Digest::of(secret.as_bytes()).to_hex());
    assert_eq!(rows[0].1["role"], "admin");
    assert_eq!(rows[1].1["app"], "live");
    assert_eq!(rows[1].1["policy"]["publish"]["accept_undefined_streams"], false);
    let all: String = sqlx::query_scalar("SELECT string_agg(data::text || metadata::text, '') FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!all.contains(&secret));
    drop(server);

    // A restart does not bootstrap again and prints no key.
    let (server, lines) = serve(&pg.url(), port, &[]);
    assert!(!lines.iter().any(|l| l.contains("SLUICE_ADMIN_KEY")), "{lines:?}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&pool).await.unwrap();
    assert_eq!(n, 2);
    drop(server);
}

#[tokio::test]
async fn supplied_bootstrap_key_is_recorded_as_a_hash_and_not_printed() {
    let pg = Postgres::start().unwrap();
    let supplied = "automation-supplied-admin-key-0123456789";
    let (server, lines) = serve(&pg.url(), free_port(), &[("SLUICE_BOOTSTRAP_ADMIN_KEY", supplied)]);
    assert!(!lines.iter().any(|l| l.contains(supplied)));
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let hash: String = sqlx::query_scalar("SELECT data->>'secret_sha256' FROM events WHERE type = 'ApiKeyCreated'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(hash, Sha256Digest::of(supplied.as_bytes()).to_hex());
    drop(server);
}

#[tokio::test]
async fn verify_log_and_replay_from_the_command_line() {
    let pg = Postgres::start().unwrap();
    let (server, _) = serve(&pg.url(), free_port(), &[]);
    drop(server);

    let ok = run({
        let mut c = control(&pg.url());
        c.arg("verify-log");
        c
    });
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stdout(&ok).starts_with("ok: 2 events, head 2, head hash "), "{}", stdout(&ok));

    // replay prints the digest of the folded log; fold it here too and compare.
    let out = run({
        let mut c = control(&pg.url());
        c.arg("replay");
        c
    });
    let pool = sluice_control_plane::connect(&pg.url()).await.unwrap();
    let store = sluice_control_plane::EventStore::start(pool.clone());
    let mut state = AuthState::new();
    for e in store.read_all(Position::ZERO, 100).await.unwrap() {
        state.apply(&e).unwrap();
    }
    assert_eq!(
        stdout(&out).trim(),
        format!("position 2 digest {} access_digest {}", state.digest().to_hex(), state.access_digest().to_hex())
    );
    let out = run({
        let mut c = control(&pg.url());
        c.args(["replay", "--to", "1"]);
        c
    });
    assert!(stdout(&out).starts_with("position 1 digest "), "{}", stdout(&out));

    // Tamper with history: verify-log fails and names the position.
    sqlx::query("ALTER TABLE events DISABLE TRIGGER events_no_update_delete").execute(&pool).await.unwrap();
    sqlx::query("UPDATE events SET data = jsonb_set(data::jsonb, '{role}', '\"read\"') WHERE position = 1")
        .execute(&pool)
        .await
        .unwrap();
    let bad = run({
        let mut c = control(&pg.url());
        c.arg("verify-log");
        c
    });
    assert_eq!(bad.status.code(), Some(1));
    assert!(stdout(&bad).starts_with("BROKEN at position 1: hash chain broken"), "{}", stdout(&bad));
}

#[test]
fn migrate_is_idempotent() {
    let pg = Postgres::start().unwrap();
    for _ in 0..2 {
        let out = run({
            let mut c = control(&pg.url());
            c.arg("migrate");
            c
        });
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out).trim(), "migrations applied");
    }
}

#[test]
fn bad_settings_stop_with_one_clear_line() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("SLUICE_API_LISTEN", "nope")],
            "sluice-control: invalid setting SLUICE_API_LISTEN (from the environment): expected host:port like 127.0.0.1:8080",
        ),
        (
            &[("SLUICE_SEALING_KEY", "dG9vIHNob3J0")],
            "sluice-control: invalid setting SLUICE_SEALING_KEY (from the environment): expected base64 of 32 random bytes",
        ),
        (
            &[("SLUICE_DATABASE_URL", "mysql://root:hunter2@db/x")],
            "sluice-control: invalid setting SLUICE_DATABASE_URL (from the environment): expected a postgres:// URL (hosts as h1:port,h2:port; target_session_attrs read-write, primary or any)",
        ),
        (
            &[("SLUICE_BOOTSTRAP_ADMIN_KEY", "short")],
            "sluice-control: invalid setting SLUICE_BOOTSTRAP_ADMIN_KEY (from the environment): expected 24 to 256 characters without spaces",
        ),
    ];
    for (env, want) in cases {
        let mut c = control("postgres://postgres@127.0.0.1:1/postgres");
        c.arg("serve");
        for (k, v) in *env {
            c.env(k, v);
        }
        let out = run(c);
        assert_eq!(out.status.code(), Some(2), "{env:?}");
        assert_eq!(stderr(&out).trim_end(), *want);
        assert!(!stderr(&out).contains("hunter2"));
    }
    let mut c = control("");
    c.env_remove("SLUICE_DATABASE_URL").arg("migrate");
    let out = run(c);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("sluice-control: missing setting SLUICE_DATABASE_URL"), "{}", stderr(&out));
    // Unknown keys in the config file are refused too.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("control.toml");
    std::fs::write(&file, "api_lisen = \"127.0.0.1:1\"\n").unwrap();
    let mut c = control("postgres://postgres@127.0.0.1:1/postgres");
    c.arg("--config").arg(&file).arg("migrate");
    let out = run(c);
    assert_eq!(stderr(&out).trim_end(), "sluice-control: unknown setting `api_lisen` in the config file");
}

#[test]
fn serve_without_a_sealing_key_or_without_postgres_says_so() {
    let mut c = control("postgres://postgres@127.0.0.1:1/postgres");
    c.env_remove("SLUICE_SEALING_KEY").arg("serve");
    let out = run(c);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("Postgres is unreachable") || stderr(&out).contains("SLUICE_SEALING_KEY"),
        "{}",
        stderr(&out)
    );

    let pg = Postgres::start().unwrap();
    let mut c = control(&pg.url());
    c.env_remove("SLUICE_SEALING_KEY").arg("serve");
    let out = run(c);
    assert!(stderr(&out).contains("missing setting SLUICE_SEALING_KEY"), "{}", stderr(&out));

    let mut c = control(&format!("postgres://postgres@127.0.0.1:{}/postgres", free_port()));
    c.arg("migrate");
    let out = run(c);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with("sluice-control: Postgres is unreachable"), "{}", stderr(&out));
}

#[test]
fn dataplane_check_config() {
    let mut c = Command::new(binary("sluice-dataplane"));
    c.env_clear().arg("check-config");
    let out = run(c);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("sluice-dataplane: missing setting SLUICE_SEALING_KEY"));
    let mut c = Command::new(binary("sluice-dataplane"));
    c.env_clear().env("SLUICE_SEALING_KEY", SEALING_KEY).env("SLUICE_NODE_ID", "edge-7").arg("check-config");
    let out = run(c);
    assert!(out.status.success());
    assert!(stdout(&out).contains("edge-7") && !stdout(&out).contains(SEALING_KEY));
}

/// The README walk-through with the operator CLI against a real server (real sockets, so the
/// allow-list sees the real peer address): a key, an app, a stream, a token.
#[tokio::test]
async fn operator_cli_creates_a_key_an_app_a_stream_and_a_token() {
    let pg = Postgres::start().unwrap();
    let admin = "operator-cli-admin-key-0123456789abcdef";
    let port = free_port();
    let (server, _) = serve(&pg.url(), port, &[("SLUICE_BOOTSTRAP_ADMIN_KEY", admin)]);
    let cli = |key: &str, args: &[&str]| {
        let mut c = Command::new(binary("sluice-control"));
        c.env_clear().env("SLUICE_API_URL", format!("http://127.0.0.1:{port}")).env("SLUICE_API_KEY", key).args(args);
        run(c)
    };
    let out = cli(admin, &["keys", "create", "--name", "encoder", "--role", "write"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let created: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let writer = created["secret"].as_str().unwrap().to_owned();
    assert_eq!(created["role"], "write");
    let out = cli(&writer, &["apps", "create", "studio"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&writer, &["streams", "create", "studio", "cam1", "--publish-name", "cam1-key"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&writer, &["streams", "token", "studio", "cam1", "--action", "publish", "--expires-in", "600"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(token["rtmp_url"].as_str().unwrap().contains("/studio/cam1-key?token="));
    let out = cli(&writer, &["streams", "list", "studio"]);
    assert!(stdout(&out).contains("\"cam1\""));
    // What operators do daily: a stream's tokens and revoking one, the audit, the workers, the log.
    let out = cli(&writer, &["streams", "tokens", "studio", "cam1"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let id = listed["tokens"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(listed["tokens"][0]["status"], "active");
    let out = cli(&writer, &["streams", "revoke-token", "studio", "cam1", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&writer, &["streams", "tokens", "studio", "cam1"]);
    assert!(stdout(&out).contains("\"revoked\""), "{}", stdout(&out));
    let out = cli(&writer, &["decisions", "list", "--app", "studio", "--outcome", "deny", "--limit", "10"]);
    assert!(out.status.success() && stdout(&out).contains("\"decisions\""), "{}", stderr(&out));
    let out = cli(&writer, &["decisions", "list", "--outcome", "maybe"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("400"), "{}", stderr(&out));
    let out = cli(&writer, &["nodes"]);
    assert!(out.status.success() && stdout(&out).contains("\"nodes\""), "{}", stderr(&out));
    let out = cli(admin, &["events", "--limit", "3"]);
    let page: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 3, "{page}");
    // Errors: one line with the status and the problem's detail; exit 1.
    let out = cli(&writer, &["keys", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).trim(), "sluice-control: 403 Forbidden: Insufficient permissions");
    let out = cli(&writer, &["apps", "create", "studio"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("409 Conflict"), "{}", stderr(&out));
    let out = cli("wrong-key", &["apps", "list"]);
    assert!(stderr(&out).contains("401 Unauthorized"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("wrong-key"));
    drop(server);
}

/// The API audit batch that is not yet written when `serve` gets SIGTERM is written before it
/// exits (issue #16, item 13): shutdown waits for the batcher's last batch.
#[tokio::test]
async fn the_api_audit_batch_is_written_at_sigterm() {
    let pg = Postgres::start().unwrap();
    let key = "audit-flush-admin-key-0123456789abcdef";
    let port = free_port();
    let (mut server, _) = serve(&pg.url(), port, &[("SLUICE_BOOTSTRAP_ADMIN_KEY", key)]);
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let r = http.get(format!("http://127.0.0.1:{port}/v1/apps")).bearer_auth(key).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    // At once: the batch (up to a second) has not gone out yet.
    let term = std::process::Command::new("kill").args(["-TERM", &server.0.id().to_string()]).status().unwrap();
    assert!(term.success());
    let exit = server.0.wait().unwrap();
    assert!(exit.success(), "serve exits cleanly on SIGTERM: {exit:?}");
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let batches: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT data::jsonb FROM events WHERE type = 'ApiAccessed'").fetch_all(&pool).await.unwrap();
    let calls = batches
        .iter()
        .flat_map(|b| b["entries"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["route"] == "/v1/apps")
        .map(|e| e["count"].as_u64().unwrap_or(1))
        .sum::<u64>();
    assert_eq!(calls, 3, "{batches:?}");
}

#[test]
fn shell_completions_cover_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(sluice_tests::binary("sluice-control")).args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let script = String::from_utf8_lossy(&out.stdout);
        for sub in ["serve", "check-config", "verify-log", "explain", "streams", "completions"] {
            assert!(script.contains(sub), "{shell} completions lack {sub}");
        }
    }
    let out = Command::new(sluice_tests::binary("sluice-control")).args(["completions", "tcsh"]).output().unwrap();
    assert!(!out.status.success(), "an unknown shell is refused");
}
