//! What the end-to-end tests share: the real binaries started with test settings, HTTP
//! helpers, polling, and the log folded straight from Postgres.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_control_plane::EventStore;
use sluice_events::{AuthState, Keyring, Position, SealingKey};
use sluice_tests::{Running, binary, wait_for_port};

pub const SEALING_KEY: &str = "c2x1aWNlLXRlc3Qtc2VhbGluZy1rZXktMzItYnl0ZXM=";
pub const ADMIN: &str = "sk_distribution_test_admin_key_0123456789";
pub const WAIT: Duration = Duration::from_secs(30);

pub fn control(pg_url: &str, nats_url: &str, port: u16, instance: &str, log: &Path) -> Running {
    control_with(pg_url, nats_url, port, instance, log, &[])
}

/// `control` with settings overridden (`("SLUICE_…", value)`).
pub fn control_with(
    pg_url: &str,
    nats_url: &str,
    port: u16,
    instance: &str,
    log: &Path,
    extra: &[(&str, &str)],
) -> Running {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut cmd = Command::new(binary("sluice-control"));
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLUICE_DATABASE_URL", pg_url)
        .env("SLUICE_NATS_URL", nats_url)
        .env("SLUICE_SEALING_KEY", SEALING_KEY)
        .env("SLUICE_BOOTSTRAP_ADMIN_KEY", ADMIN)
        .env("SLUICE_API_LISTEN", format!("127.0.0.1:{port}"))
        .env("SLUICE_INSTANCE_ID", instance)
        .env("SLUICE_SNAPSHOT_EVERY_EVENTS", "3")
        .env("SLUICE_SNAPSHOT_EVERY_SECS", "1")
        .env("SLUICE_NODE_STALE_SECS", "3")
        .env("SLUICE_CHECKPOINT_EVERY_EVENTS", "5")
        .env("SLUICE_RATE_LIMIT_API", "100000")
        .env("SLUICE_RATE_LIMIT_STATS", "100000")
        .env("SLUICE_RATE_LIMIT_CONFIG", "100000")
        .env("SLUICE_LOG", "info,sqlx=warn,async_nats=warn");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let child = cmd.stdout(out.try_clone().unwrap()).stderr(out).spawn().unwrap();
    assert!(wait_for_port(port, WAIT), "control plane on {port} did not start: {}", read(log));
    Running(child)
}

pub fn worker(nats_url: &str, admin_port: u16, dir: &Path, node: &str, log: &Path) -> Running {
    worker_with(nats_url, admin_port, dir, node, log, &[])
}

/// `worker` with settings overridden. Unless given, RTMP and SRT listen on free loopback ports.
pub fn worker_with(
    nats_url: &str,
    admin_port: u16,
    dir: &Path,
    node: &str,
    log: &Path,
    extra: &[(&str, &str)],
) -> Running {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let rtmp = format!("127.0.0.1:{}", sluice_tests::free_port());
    let mut cmd = Command::new(binary("sluice-dataplane"));
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLUICE_NATS_URL", nats_url)
        .env("SLUICE_SEALING_KEY", SEALING_KEY)
        .env("SLUICE_NODE_ID", node)
        .env("SLUICE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("SLUICE_STATE_DIR", dir)
        .env("SLUICE_HEARTBEAT_SECS", "1")
        .env("SLUICE_SNAPSHOT_EVERY_SECS", "1")
        .env("SLUICE_LOG", "info,async_nats=warn")
        .env("SLUICE_RTMP_LISTEN", rtmp)
        .env("SLUICE_SRT_LISTEN", format!("127.0.0.1:{}", sluice_tests::free_port()));
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let child = cmd.stdout(out.try_clone().unwrap()).stderr(out).stdin(Stdio::null()).spawn().unwrap();
    assert!(wait_for_port(admin_port, WAIT), "worker did not start: {}", read(log));
    Running(child)
}

pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

pub async fn get(http: &reqwest::Client, url: String) -> (u16, Value) {
    match http.get(&url).bearer_auth(ADMIN).send().await {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or(Value::Null)),
        Err(_) => (0, Value::Null),
    }
}

pub async fn post(http: &reqwest::Client, port: u16, path: &str, body: Value) -> Value {
    let r = http.post(format!("http://127.0.0.1:{port}{path}")).bearer_auth(ADMIN).json(&body).send().await.unwrap();
    assert!(r.status().is_success(), "POST {path}: {}", r.status());
    r.json().await.unwrap_or(Value::Null)
}

/// Polls an async condition.
pub async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// The worker-visible state at the log's head, folded here from Postgres.
pub async fn folded(store: &EventStore) -> AuthState {
    let ring = Arc::new(Keyring::new(SealingKey::from_base64(SEALING_KEY).unwrap()));
    let mut state = AuthState::for_data_plane(Some(ring));
    let mut after = Position(0);
    loop {
        let page = store.read_all(after, 1000).await.unwrap();
        if page.is_empty() {
            return state;
        }
        for e in &page {
            state.apply(e).unwrap();
            after = e.position;
        }
    }
}

/// ffmpeg publishing `secs` of a generated test pattern (H.264 + AAC, a keyframe a second) in
/// `format` (`flv` for RTMP, `mpegts` for SRT) to `url`.
pub fn ffmpeg_testsrc(format: &str, url: &str, secs: u32) -> Command {
    let mut c = Command::new("ffmpeg");
    c.args(["-hide_banner", "-nostdin", "-re", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=15", "-f", "lavfi"])
        .args(["-i", "sine", "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "15"])
        .args(["-c:a", "aac", "-t", &secs.to_string(), "-f", format, url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// ffmpeg playing `url` for 3 s of media into the null muxer (10 s I/O timeout).
pub fn ffmpeg_play(url: &str) -> Output {
    Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-rw_timeout", "10000000", "-i", url, "-t", "3", "-f", "null", "-"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Waits for a child with a bound; kills it if the bound passes.
pub fn wait_bounded(mut child: Child, bound: Duration) -> Option<Output> {
    let started = Instant::now();
    while started.elapsed() < bound {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    None
}

/// Every decision `node` put in the log: (app, action, allowed, final reason).
pub async fn recorded(store: &EventStore, node: &str) -> Vec<(String, String, bool, String)> {
    store
        .read_stream(&format!("decisions-{node}"))
        .await
        .unwrap()
        .iter()
        .filter_map(|e| match &e.event {
            sluice_events::Event::AccessDecided(d) => Some((
                d.decision.request.app.as_str().to_owned(),
                d.decision.request.action.as_str().to_owned(),
                d.decision.allowed,
                d.decision.final_reason.as_str().to_owned(),
            )),
            _ => None,
        })
        .collect()
}
