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
/// The workers' node credential: the same bearer as the control plane's admin key, so one
/// test client reaches both (production keeps them apart; nothing here relies on it).
pub const NODE_SECRET: &str = ADMIN;
pub const WAIT: Duration = Duration::from_secs(30);

/// A throwaway database `db` on a fresh Postgres, a NATS server, a temp dir, and one control
/// plane (`cp-1`, admin key `ADMIN`) on them, listening on `cp`.
pub struct Plane {
    pub pg: sluice_tests::Postgres,
    pub url: String,
    pub nats: sluice_tests::Nats,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    pub store: EventStore,
    pub cp: u16,
    pub control: Running,
}

impl Plane {
    pub async fn start(db: &str) -> Plane {
        let pg = sluice_tests::Postgres::start().unwrap();
        let url = pg.create_database(db).await.unwrap();
        let nats = sluice_tests::Nats::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = EventStore::start(sluice_control_plane::connect(&url).await.unwrap());
        let cp = sluice_tests::free_port();
        let control = control(&url, &nats.url(), cp, "cp-1", &dir.path().join("cp.log"));
        Plane { pg, url, nats, dir, http: reqwest::Client::new(), store, cp, control }
    }
}

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
        // The tests' webhook receivers listen on loopback.
        .env("SLUICE_WEBHOOK_ALLOWED", "127.0.0.1")
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
        .env("SLUICE_WEBHOOK_ALLOWED", "127.0.0.1")
        .env("SLUICE_NODE_SECRET", NODE_SECRET)
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

/// `POST /v1/decide` on a worker's node API (status 0 when the worker does not answer).
pub async fn decide(http: &reqwest::Client, admin: u16, body: Value) -> (u16, Value) {
    match http.post(format!("http://127.0.0.1:{admin}/v1/decide")).bearer_auth(NODE_SECRET).json(&body).send().await {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or(Value::Null)),
        Err(_) => (0, Value::Null),
    }
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

/// A one-time token for `action` on `app/stream`, issued through the API.
pub async fn one_time_token(http: &reqwest::Client, cp: u16, app: &str, stream: &str, action: &str) -> String {
    let t =
        post(http, cp, &format!("/v1/apps/{app}/streams/{stream}/tokens"), serde_json::json!({"action": action})).await;
    t["token"].as_str().unwrap().to_owned()
}

/// Replaces `app`'s policy through the API.
pub async fn put_policy(http: &reqwest::Client, port: u16, app: &str, policy: &Value) {
    let r = http
        .put(format!("http://127.0.0.1:{port}/v1/apps/{app}/policy"))
        .bearer_auth(ADMIN)
        .json(policy)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "PUT {app} policy");
}

/// A value from a worker's Prometheus `/metrics` (on its admin port), if the series is there.
pub async fn worker_metric(http: &reqwest::Client, admin: u16, name: &str) -> Option<f64> {
    let text = http.get(format!("http://127.0.0.1:{admin}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
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
/// Waits until the worker with admin `port` has applied `position` of the log.
/// Waits until the worker with admin `port` has applied `position` and decides (`/ready`: it
/// marks itself ready once its catch-up is complete, a moment after it applied the position).
pub async fn ready_at(http: &reqwest::Client, port: u16, position: u64) {
    until("the worker has applied the position and decides", || async {
        get(http, format!("http://127.0.0.1:{port}/wait?position={position}&timeout_ms=500")).await.0 == 200
            && get(http, format!("http://127.0.0.1:{port}/ready")).await.0 == 200
    })
    .await;
}

/// Waits until the worker with admin `port` has applied the log's current head.
pub async fn ready_at_head(http: &reqwest::Client, store: &EventStore, port: u16) {
    let head = store.head().await.unwrap().0;
    ready_at(http, port, head).await;
}

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

/// The frames ffmpeg says it decoded (its last `frame=` figure), 0 if none.
pub fn frames(out: &Output) -> u64 {
    String::from_utf8_lossy(&out.stderr)
        .rsplit("frame=")
        .next()
        .and_then(|rest| rest.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
        .unwrap_or(0)
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

/// Every decision `node` put in the log, as recorded.
pub async fn decision_records(store: &EventStore, node: &str) -> Vec<sluice_events::DecisionRecord> {
    store
        .read_stream(&format!("decisions-{node}"))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.event {
            sluice_events::Event::AccessDecided(d) => Some(d.decision),
            _ => None,
        })
        .collect()
}

/// Every decision `node` put in the log: (app, action, allowed, final reason).
pub async fn recorded(store: &EventStore, node: &str) -> Vec<(String, String, bool, String)> {
    decision_records(store, node)
        .await
        .into_iter()
        .map(|d| {
            (
                d.request.app.as_str().to_owned(),
                d.request.action.as_str().to_owned(),
                d.allowed,
                d.final_reason.as_str().to_owned(),
            )
        })
        .collect()
}

/// An H.264 + AAC test file (keyframe every second) of `secs` in `format` (`flv`, `mpegts`),
/// made once so publishers only copy it.
pub fn media_file(dir: &Path, format: &str, secs: u32) -> String {
    let path = dir.join(format!("media.{format}"));
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-y", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=15"])
        .args(["-f", "lavfi", "-i", "sine", "-c:v", "libx264", "-preset", "ultrafast", "-g", "15"])
        .args(["-c:a", "aac", "-t", &secs.to_string(), "-f", format])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    path.to_string_lossy().into_owned()
}

/// Changes one character of the credential in `url` (or streamid) after `marker`.
pub fn tamper(url: &str, marker: &str) -> String {
    let at = url.find(marker).unwrap() + marker.len();
    let mut bytes = url.as_bytes().to_vec();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    String::from_utf8(bytes).unwrap()
}

/// A webhook receiver that allows `token=good` and refuses everything else; its port.
pub async fn webhook() -> u16 {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(|body: axum::body::Bytes| async move {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if v["query"].as_str().is_some_and(|q| q.contains("token=good")) {
                axum::http::StatusCode::OK
            } else {
                axum::http::StatusCode::FORBIDDEN
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

pub fn now_secs() -> u64 {
    sluice_control_plane::clock::now().as_secs() as u64
}

pub fn srt_url(port: u16, streamid: &str) -> String {
    // ffmpeg does not percent-decode `streamid`: it goes raw (STACK.md).
    format!("srt://127.0.0.1:{port}?streamid={streamid}")
}

/// A tiny SRT caller (srt-tokio) that reads the reject code off the handshake: the code
/// libsrt reports (1000 + status), 0 when accepted.
pub async fn reject_code(port: u16, streamid: &str) -> i32 {
    reject_code_with(port, streamid, None).await
}

/// `reject_code` for a caller that encrypts with `passphrase` (AES-128).
pub async fn reject_code_with(port: u16, streamid: &str, passphrase: Option<&str>) -> i32 {
    let builder = srt_tokio::SrtSocket::builder();
    let builder = match passphrase {
        Some(p) => builder.encryption(16, p),
        None => builder,
    };
    call(port, streamid, builder).await.map(|_| 0).unwrap_or_else(|code| code)
}

/// An srt-tokio caller: the socket, or the code it was refused with (see `reject_code`).
pub async fn call(
    port: u16,
    streamid: &str,
    builder: srt_tokio::SrtSocketBuilder,
) -> Result<srt_tokio::SrtSocket, i32> {
    let addr = format!("127.0.0.1:{port}");
    let call = builder.call(addr.as_str(), Some(streamid));
    let e = match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(socket)) => return Ok(socket),
        Ok(Err(e)) => e,
        Err(_) => panic!("no answer to {streamid}"),
    };
    // srt-tokio keeps the reason private; its Debug names it (`Rejected(Server(Forbidden))`).
    let reason = format!("{:?}", e.get_ref().unwrap());
    let codes = [
        ("Forbidden", 1403),
        ("Notfound", 1404),
        ("Conflict", 1409),
        ("BadRequest", 1400),
        ("Overload", 1402),
        ("ServerUnrecognized(2429)", 1429),
        ("Down", 1503),
        // Core codes: SRT_REJ_BADSECRET, SRT_REJ_UNSECURE.
        ("BadSecret", 10),
        ("Unsecure", 11),
    ];
    Err(codes.iter().find(|(name, _)| reason.contains(name)).map(|(_, c)| *c).unwrap_or_else(|| panic!("{reason}")))
}

/// `GET` with the admin key, blocking (for tests that run on a plain thread): the JSON body of
/// a 200, else `None`.
pub fn get_blocking(port: u16, path: &str) -> Option<Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN}\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| serde_json::from_str(body).ok()).flatten()
}

/// Whether the control plane on `cp` sees `app/stream` live with media coming in (from the
/// workers' heartbeats): its publisher is admitted and sending.
fn is_live(stats: Option<Value>) -> bool {
    stats.is_some_and(|s| s["live"] == true && s["bytes_in"].as_u64() > Some(0))
}

/// Blocks until `app/stream` is live with media coming in (see `is_live`).
pub fn wait_live(cp: u16, app: &str, stream: &str) {
    let path = format!("/v1/stats/streams/{app}/{stream}");
    assert!(sluice_tests::eventually(WAIT, || is_live(get_blocking(cp, &path))), "{app}/{stream} never went live");
}

/// Waits until `app/stream` is live with media coming in (see `is_live`).
pub async fn until_live(http: &reqwest::Client, cp: u16, app: &str, stream: &str) {
    let url = format!("http://127.0.0.1:{cp}/v1/stats/streams/{app}/{stream}");
    until(&format!("{app}/{stream} is live"), || async {
        let (code, v) = get(http, url.clone()).await;
        code == 200 && is_live(Some(v))
    })
    .await;
}

/// A worker of `plane` with RTMP and SRT on ports of its own, and what a test needs of it.
pub struct MediaWorker {
    pub admin: u16,
    pub rtmp: u16,
    pub srt: u16,
    pub log: std::path::PathBuf,
    pub process: Running,
}

/// Starts worker `node` on `plane` (its state and log in the plane's dir), with `extra` settings.
pub fn media_worker(plane: &Plane, node: &str, extra: &[(&str, &str)]) -> MediaWorker {
    let (admin, rtmp, srt) = (sluice_tests::free_port(), sluice_tests::free_port(), sluice_tests::free_port());
    let log = plane.dir.path().join(format!("{node}.log"));
    let (rtmp_listen, srt_listen) = (format!("127.0.0.1:{rtmp}"), format!("127.0.0.1:{srt}"));
    let mut settings = vec![("SLUICE_RTMP_LISTEN", rtmp_listen.as_str()), ("SLUICE_SRT_LISTEN", srt_listen.as_str())];
    settings.extend_from_slice(extra);
    let process = worker_with(&plane.nats.url(), admin, &plane.dir.path().join(node), node, &log, &settings);
    MediaWorker { admin, rtmp, srt, log, process }
}

/// A TCP relay in front of a worker's RTMP (or RTMPS) port that opens each connection with
/// `header` (HAProxy's `send-proxy`), from the loopback address `source` if given, then copies
/// both ways. Its port.
pub async fn proxy_relay(worker_port: u16, source: Option<std::net::IpAddr>, header: Vec<u8>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let header = header.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt as _;
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                if let Some(ip) = source {
                    socket.bind(std::net::SocketAddr::new(ip, 0)).unwrap();
                }
                let Ok(mut upstream) = socket.connect(([127, 0, 0, 1], worker_port).into()).await else { return };
                if upstream.write_all(&header).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    port
}
