//! The worker deciding for a media server it does not replace (issue #22): real nginx-rtmp
//! (Debian's `nginx` + `libnginx-mod-rtmp`) with `on_publish`, `on_play`, `on_update` and
//! `on_done` pointing at the worker's hooks, real ffmpeg publishing and playing through nginx.
//! And the hook endpoint's bad input, which admits nothing.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_tests::{Running, free_port, wait_for_port};

mod cluster;
use cluster::*;

const HOOK_SECRET: &str = "hook-secret-for-the-tests-0123";

/// nginx-rtmp on a free port, its notify hooks at the worker's `hooks` port.
fn nginx(dir: &std::path::Path, hooks: u16) -> (Running, u16) {
    let port = free_port();
    let hook = format!("http://127.0.0.1:{hooks}/hooks/nginx-rtmp/{HOOK_SECRET}");
    let conf = format!(
        "load_module /usr/lib/nginx/modules/ngx_rtmp_module.so;
worker_processes 1;
master_process off;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
rtmp {{ server {{
  listen 127.0.0.1:{port};
  chunk_size 4096;
  notify_method post;
  application tv {{
    live on;
    on_publish {hook};
    on_play {hook};
    on_update {hook};
    notify_update_timeout 2s;
    on_publish_done {hook};
    on_play_done {hook};
  }}
}} }}
",
        dir = dir.display()
    );
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (ops/lib.sh ensure_media_clients installs nginx and libnginx-mod-rtmp)");
    assert!(wait_for_port(port, WAIT), "nginx did not listen: {}", read(&dir.join("error.log")));
    (Running(child), port)
}

/// The credential query of a URL the API answered (`…/tv/cam?token=…`).
fn query_of(url: &Value) -> String {
    url.as_str().unwrap().split_once('?').unwrap().1.to_owned()
}

/// Decisions the worker recorded for `stream`, oldest first, once `n` are there.
async fn decisions_of(http: &reqwest::Client, cp: u16, stream: &str, n: usize) -> Vec<Value> {
    let url = format!("http://127.0.0.1:{cp}/v1/decisions?app=tv&stream={stream}&limit=100");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, page) = get(http, url.clone()).await;
        let mut rows = page["decisions"].as_array().cloned().unwrap_or_default();
        if rows.len() >= n {
            rows.reverse();
            return rows;
        }
        assert!(Instant::now() < deadline, "{n} decisions for {stream}: {rows:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_rtmp_asks_the_worker_and_a_revoked_stream_ends_in_nginx() {
    let Plane { pg: _pg, url: _, nats, dir, http, store, cp, control: _cp } = Plane::start("hooks").await;
    let publish = json!({"methods": ["one_time_token", "hash", "jwt"], "accept_undefined_streams": false});
    let policy = json!({"publish": publish, "play": {"methods": ["open"]}});
    post(&http, cp, "/v1/apps", json!({"name": "tv", "policy": policy})).await;
    post(&http, cp, "/v1/apps/tv/secrets/hash", json!({"secret": "a-hash-secret-of-16+"})).await;
    post(&http, cp, "/v1/apps/tv/secrets/jwt", json!({"secret": "a-jwt-secret-of-at-least-32-bytes!!"})).await;
    for (name, publish_name) in [("cam", None), ("hashed", None), ("signed", None), ("show", Some("show-key"))] {
        post(&http, cp, "/v1/apps/tv/streams", json!({"name": name, "publish_name": publish_name})).await;
    }
    let (admin, hooks) = (free_port(), free_port());
    let hooks_listen = format!("127.0.0.1:{hooks}");
    let settings = [("SLUICE_HOOKS_SECRET", HOOK_SECRET), ("SLUICE_HOOKS_LISTEN", hooks_listen.as_str())];
    let _w = worker_with(&nats.url(), admin, &dir.path().join("w1"), "w1", &dir.path().join("w1.log"), &settings);
    assert!(wait_for_port(hooks, WAIT), "the hooks listener: {}", read(&dir.path().join("w1.log")));
    let (_nginx, ngx) = nginx(&dir.path().join("nginx"), hooks);
    let base = format!("rtmp://127.0.0.1:{ngx}/tv");

    // A one-time token: admitted once through nginx, refused the second time.
    let token = one_time_token(&http, cp, "tv", "cam", "publish").await;
    ready_at_head(&http, &store, admin).await;
    let url = format!("{base}/cam?token={token}");
    let mut publisher = ffmpeg_testsrc("flv", &url, 120).spawn().unwrap();
    let played = ffmpeg_play(&format!("{base}/cam"));
    assert!(played.status.success(), "a player through nginx: {}", stderr(&played));
    until("tv/cam held by the worker", || async {
        let (_, s) = get(&http, format!("http://127.0.0.1:{cp}/v1/stats/streams/tv/cam")).await;
        s["live"] == true
    })
    .await;
    let _ = publisher.kill();
    let _ = publisher.wait();
    // nginx's on_publish_done released the stream: the token's second use is refused for
    // what it is, not because the stream is busy.
    until("the stream no longer live", || async {
        let (_, s) = get(&http, format!("http://127.0.0.1:{cp}/v1/stats/streams/tv/cam")).await;
        s["live"] == false
    })
    .await;
    let again = wait_bounded(ffmpeg_testsrc("flv", &url, 5).spawn().unwrap(), WAIT).expect("the second use ends");
    assert!(!again.status.success(), "the token admitted twice");
    let rows = decisions_of(&http, cp, "cam", 3).await;
    let reasons: Vec<_> = rows.iter().map(|r| (r["action"].as_str().unwrap(), r["reason"].as_str().unwrap())).collect();
    assert!(
        reasons.contains(&("publish", "allowed")) && reasons.contains(&("publish", "token_consumed")),
        "{reasons:?}"
    );
    assert!(reasons.contains(&("play", "allowed")), "{reasons:?}");

    // Revocation: deleting the stream ends the nginx session at its next on_update.
    let token = one_time_token(&http, cp, "tv", "cam", "publish").await;
    ready_at_head(&http, &store, admin).await;
    let mut publisher = ffmpeg_testsrc("flv", &format!("{base}/cam?token={token}"), 120).spawn().unwrap();
    decisions_of(&http, cp, "cam", 4).await;
    until("tv/cam held by the worker", || async {
        let (_, s) = get(&http, format!("http://127.0.0.1:{cp}/v1/stats/streams/tv/cam")).await;
        s["live"] == true
    })
    .await;
    let deleted = Instant::now();
    let r = http.delete(format!("http://127.0.0.1:{cp}/v1/apps/tv/streams/cam")).bearer_auth(ADMIN).send().await;
    assert_eq!(r.unwrap().status(), 204);
    let ended = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        while started.elapsed() < WAIT && publisher.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let ended = publisher.try_wait().unwrap().is_some();
        let _ = publisher.kill();
        let _ = publisher.wait();
        ended
    })
    .await
    .unwrap();
    assert!(
        ended,
        "the revoked publisher still publishes through nginx:\n{}\n{}",
        read(&dir.path().join("nginx/error.log")),
        read(&dir.path().join("w1.log"))
    );
    println!("revoked publisher ended {:?} after the DELETE", deleted.elapsed());

    // A hash and a stream JWT admit; a wrong credential is refused and nginx closes.
    for (stream, path) in [("hashed", "hash"), ("signed", "jwt")] {
        let issued =
            post(&http, cp, &format!("/v1/apps/tv/streams/{stream}/{path}"), json!({"action": "publish"})).await;
        let mut publisher = ffmpeg_testsrc("flv", &format!("{base}/{stream}?{}", query_of(&issued["rtmp_url"])), 4);
        let out = wait_bounded(publisher.spawn().unwrap(), WAIT).unwrap();
        assert!(out.status.success(), "{stream}: {}", stderr(&out));
    }
    let wrong = wait_bounded(ffmpeg_testsrc("flv", &format!("{base}/hashed?token=wrong"), 4).spawn().unwrap(), WAIT);
    assert!(!wrong.unwrap().status.success(), "a wrong hash published");

    // The secret publish name is redirected to the public name, which players play.
    let token = one_time_token(&http, cp, "tv", "show", "publish").await;
    ready_at_head(&http, &store, admin).await;
    let mut show = ffmpeg_testsrc("flv", &format!("{base}/show-key?token={token}"), 60).spawn().unwrap();
    let played = ffmpeg_play(&format!("{base}/show"));
    assert!(played.status.success(), "the public name plays: {}", stderr(&played));
    let _ = show.kill();
    let _ = show.wait();

    // Every decision is in the log with the node, the protocol and nginx's client id, and its
    // explanation replays it.
    for stream in ["hashed", "signed", "show"] {
        for row in decisions_of(&http, cp, stream, 1).await {
            assert_eq!((row["node"].as_str(), row["protocol"].as_str()), (Some("w1"), Some("rtmp")), "{row}");
            let id = row["id"].as_str().unwrap();
            let (_, one) = get(&http, format!("http://127.0.0.1:{cp}/v1/decisions/{id}")).await;
            let client_id = one["record"]["request"]["client_id"].as_str().unwrap_or("");
            assert!(client_id.parse::<u64>().is_ok(), "nginx's clientid recorded: {one}");
            let (_, explained) = get(&http, format!("http://127.0.0.1:{cp}/v1/decisions/{id}/explain")).await;
            assert_eq!(explained["matches"], true, "{explained}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hooks_refuse_bad_input_clearly_and_admit_nothing() {
    let Plane { pg: _pg, url: _, nats, dir, http, store, cp, control: _cp } = Plane::start("hooks_input").await;
    post(&http, cp, "/v1/apps", json!({"name": "tv"})).await;
    let (admin, hooks) = (free_port(), free_port());
    let hooks_listen = format!("127.0.0.1:{hooks}");
    let settings = [
        ("SLUICE_HOOKS_SECRET", HOOK_SECRET),
        ("SLUICE_HOOKS_LISTEN", hooks_listen.as_str()),
        ("SLUICE_HOOKS_ALLOWED", "127.0.0.1/32"),
    ];
    let _w = worker_with(&nats.url(), admin, &dir.path().join("w1"), "w1", &dir.path().join("w1.log"), &settings);
    assert!(wait_for_port(hooks, WAIT));
    ready_at_head(&http, &store, admin).await;
    let url = format!("http://127.0.0.1:{hooks}/hooks/nginx-rtmp/{HOOK_SECRET}");
    let form = "app=tv&flashver=FMLE&swfurl=&tcurl=rtmp://127.0.0.1/tv&pageurl=&addr=127.0.0.1&clientid=9";
    let send = |url: String, content_type: &'static str, body: String| {
        http.post(url).header("content-type", content_type).body(body).send()
    };
    let form_type = "application/x-www-form-urlencoded";
    let cases: Vec<(String, &str, String, u16, &str)> = vec![
        (url.clone(), form_type, format!("{form}&call=play&name=cam"), 200, "allowed"),
        (
            url.replace(HOOK_SECRET, "not-the-secret"),
            form_type,
            format!("{form}&call=play&name=cam"),
            403,
            "wrong hook secret",
        ),
        (url.clone(), "application/json", format!("{form}&call=play&name=cam"), 415, "x-www-form-urlencoded"),
        (url.replace("nginx-rtmp", "wowza"), form_type, format!("{form}&call=play&name=cam"), 404, "no such hook"),
        (url.clone(), form_type, format!("{form}&name=cam"), 400, "missing `call`"),
        (url.clone(), form_type, format!("{form}&call=publish"), 400, "missing `name`"),
        (url.clone(), form_type, "call=play&name=cam&app=tv&addr=127.0.0.1".into(), 400, "missing `clientid`"),
        (
            url.clone(),
            form_type,
            format!("{}&call=play&name=cam", form.replace("addr=127.0.0.1", "addr=nowhere")),
            400,
            "not an IP",
        ),
        (url.clone(), form_type, format!("{form}&call=format_disk&name=cam"), 400, "unknown call"),
        (url.clone(), form_type, format!("{form}&call=play&name=..%2F..%2Fetc"), 400, "stream"),
        (url.clone(), form_type, format!("{form}&call=play&name=cam&pad={}", "x".repeat(20_000)), 413, ""),
    ];
    for (url, content_type, body, status, says) in cases {
        let r = send(url, content_type, body.clone()).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{}", &body[..body.len().min(120)]);
        let text = r.text().await.unwrap();
        assert!(text.contains(says), "{status}: {text}");
        assert!(!text.contains(HOOK_SECRET));
    }
    // From an address outside SLUICE_HOOKS_ALLOWED.
    let other =
        reqwest::Client::builder().local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap()).build().unwrap();
    let r = other.post(&url).header("content-type", form_type).body(format!("{form}&call=play&name=cam")).send().await;
    assert_eq!(r.unwrap().status(), 403);
    // Only the one good request was decided.
    until("the one decision recorded", || async {
        let (_, page) = get(&http, format!("http://127.0.0.1:{cp}/v1/decisions")).await;
        page["decisions"].as_array().map(Vec::len) == Some(1)
    })
    .await;
    // Updates and the end of a session it never admitted answer 200 (nginx keeps going).
    let r = send(url.clone(), form_type, format!("{form}&call=update_play&time=5&timestamp=5000&name=cam")).await;
    assert_eq!(r.unwrap().status(), 200);
    let r = send(url.clone(), form_type, format!("{form}&call=play_done&name=cam")).await;
    assert_eq!(r.unwrap().status(), 200);
}

/// What the fake media server API received: (method, path, body).
type Calls = std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>;

/// A stand-in for SRS's HTTP API and MediaMTX's control API, answering as their code does and
/// noting each call.
async fn media_server_api() -> (u16, Calls) {
    let calls = Calls::default();
    let app = axum::Router::new().fallback(api_call).with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, calls)
}

async fn api_call(
    axum::extract::State(calls): axum::extract::State<Calls>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
    let body = axum::body::to_bytes(req.into_body(), 1 << 16).await.unwrap_or_default();
    calls.lock().unwrap().push((method.clone(), path.clone(), String::from_utf8_lossy(&body).into_owned()));
    if path.starts_with("/api/v1/clients/") && method == "DELETE" {
        // SRS: `srs_api_response` of {"code":0,"server":…,"service":…,"pid":…}.
        return axum::Json(json!({"code": 0, "server": "vid-test", "service": "test", "pid": "1"})).into_response();
    }
    if path.starts_with("/v3/") && (path.contains("/kick/") || path.contains("/get/")) {
        return axum::http::StatusCode::OK.into_response();
    }
    axum::http::StatusCode::NOT_FOUND.into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srs_and_mediamtx_hooks_answer_as_their_code_expects_and_kick_revoked_sessions() {
    let Plane { pg: _pg, url: _, nats, dir, http, store, cp, control: _cp } = Plane::start("hooks_peers").await;
    let publish = json!({"methods": ["one_time_token"], "accept_undefined_streams": false});
    post(&http, cp, "/v1/apps", json!({"name": "tv", "policy": {"publish": publish, "play": {"methods": ["open"]}}}))
        .await;
    for name in ["cam", "mtx"] {
        post(&http, cp, "/v1/apps/tv/streams", json!({"name": name})).await;
    }
    let (api, calls) = media_server_api().await;
    let (admin, hooks) = (free_port(), free_port());
    let (hooks_listen, api_url) = (format!("127.0.0.1:{hooks}"), format!("http://127.0.0.1:{api}"));
    let settings = [
        ("SLUICE_HOOKS_SECRET", HOOK_SECRET),
        ("SLUICE_HOOKS_LISTEN", hooks_listen.as_str()),
        ("SLUICE_HOOKS_SRS_API", api_url.as_str()),
        ("SLUICE_HOOKS_MEDIAMTX_API", api_url.as_str()),
    ];
    let _w = worker_with(&nats.url(), admin, &dir.path().join("w1"), "w1", &dir.path().join("w1.log"), &settings);
    assert!(wait_for_port(hooks, WAIT));
    let srs = format!("http://127.0.0.1:{hooks}/hooks/srs/{HOOK_SECRET}");
    let mtx = format!("http://127.0.0.1:{hooks}/hooks/mediamtx/{HOOK_SECRET}");
    let send = |url: &str, body: Value| http.post(url).json(&body).send();

    // SRS: the body of `SrsHttpHooks::on_publish` (trunk/src/app/srs_app_http_hooks.cpp, SRS 6
    // develop at 101382a, 2024-10-15), member for member.
    let token = one_time_token(&http, cp, "tv", "cam", "publish").await;
    ready_at_head(&http, &store, admin).await;
    let on_publish = |client_id: &str, token: &str| {
        json!({
            "server_id": "vid-0xk989d", "service_id": "8c1ou06d", "action": "on_publish",
            "client_id": client_id, "ip": "192.0.2.10", "vhost": "__defaultVhost__", "app": "tv",
            "tcUrl": "rtmp://127.0.0.1:1935/tv", "stream": "cam", "param": format!("?token={token}"),
            "stream_url": "/tv/cam", "stream_id": "vid-3h8h21s"
        })
    };
    let r = send(&srs, on_publish("341w361a", &token)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), r#"{"code":0}"#, "SRS reads 200 and code 0 as go on");
    // A second publisher with the same token: refused (not 200, code not 0).
    let r = send(&srs, on_publish("9xk2", &token)).await.unwrap();
    assert_eq!(r.status(), 403);
    let refused: Value = r.json().await.unwrap();
    assert_ne!(refused["code"], 0, "{refused}");
    // `on_play` (the same file: pageUrl instead of stream_url's neighbours) over WebRTC.
    let on_play = json!({
        "server_id": "vid-0xk989d", "service_id": "8c1ou06d", "action": "on_play", "client_id": "77p0",
        "ip": "192.0.2.11", "vhost": "__defaultVhost__", "app": "tv", "stream": "cam",
        "tcUrl": "webrtc://127.0.0.1/tv", "param": "", "pageUrl": "", "stream_url": "/tv/cam", "stream_id": "vid-3h8h21s"
    });
    let r = send(&srs, on_play).await.unwrap();
    assert_eq!((r.status().as_u16(), r.text().await.unwrap()), (200, r#"{"code":0}"#.to_owned()));
    // Revoked: deleting the stream kicks the publisher through SRS's API.
    let r = http.delete(format!("http://127.0.0.1:{cp}/v1/apps/tv/streams/cam")).bearer_auth(ADMIN).send().await;
    assert_eq!(r.unwrap().status(), 204);
    until("SRS's API asked to kick the publisher", || async {
        calls.lock().unwrap().iter().any(|(m, p, b)| m == "DELETE" && p == "/api/v1/clients/341w361a" && b.is_empty())
    })
    .await;
    let mut on_unpublish = on_publish("341w361a", &token);
    on_unpublish["action"] = json!("on_unpublish");
    let r = send(&srs, on_unpublish).await.unwrap();
    assert_eq!((r.status().as_u16(), r.text().await.unwrap()), (200, r#"{"code":0}"#.to_owned()));

    // MediaMTX: the body of `authenticateHTTP` (internal/auth/manager.go at 3e09466,
    // 2026-08-22), member for member.
    let token = one_time_token(&http, cp, "tv", "mtx", "publish").await;
    ready_at_head(&http, &store, admin).await;
    let id = "5f0c4a5e-9d1b-4b8e-8f53-0e1d6a3c2b11";
    let publish = json!({
        "ip": "192.0.2.20", "user": "", "password": "", "token": "", "action": "publish", "path": "tv/mtx",
        "protocol": "rtmp", "id": id, "query": format!("token={token}"), "userAgent": "obs-studio"
    });
    let r = send(&mtx, publish.clone()).await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = send(&mtx, publish).await.unwrap();
    assert_eq!(r.status(), 401, "the token's second use");
    let read = json!({
        "ip": "192.0.2.21", "user": "", "password": "", "token": "", "action": "read", "path": "tv/mtx",
        "protocol": "hls", "id": null, "query": "", "userAgent": "hls.js"
    });
    assert_eq!(send(&mtx, read).await.unwrap().status(), 200);
    let api_call = json!({"ip": "127.0.0.1", "user": "", "password": "", "token": "", "action": "api", "path": "",
        "protocol": "", "id": null, "query": "", "userAgent": "curl"});
    assert_eq!(send(&mtx, api_call).await.unwrap().status(), 401);
    let r = http.delete(format!("http://127.0.0.1:{cp}/v1/apps/tv/streams/mtx")).bearer_auth(ADMIN).send().await;
    assert_eq!(r.unwrap().status(), 204);
    until("MediaMTX's API asked to kick the publisher", || async {
        calls
            .lock()
            .unwrap()
            .iter()
            .any(|(m, p, b)| m == "POST" && *p == format!("/v3/rtmpconns/kick/{id}") && b.is_empty())
    })
    .await;

    // Each decision recorded with the protocol the media server reported and its client id.
    let (_, page) = get(&http, format!("http://127.0.0.1:{cp}/v1/decisions?app=tv&limit=100")).await;
    let rows = page["decisions"].as_array().unwrap();
    let protocols: std::collections::BTreeSet<_> = rows.iter().map(|r| r["protocol"].as_str().unwrap()).collect();
    assert!(protocols.contains("webrtc") && protocols.contains("hls") && protocols.contains("rtmp"), "{protocols:?}");
    for row in rows {
        let (_, explained) =
            get(&http, format!("http://127.0.0.1:{cp}/v1/decisions/{}/explain", row["id"].as_str().unwrap())).await;
        assert_eq!(explained["matches"], true, "{explained}");
    }

    // Bad input on both: clear 4xx, nothing decided.
    let before = rows.len();
    let cases = [
        (
            &srs,
            json!({"action": "on_publish", "ip": "192.0.2.1", "app": "tv", "stream": "cam"}),
            400,
            "missing `client_id`",
        ),
        (&srs, json!({"action": "on_format", "client_id": "1"}), 400, "unknown action"),
        (
            &srs,
            json!({"action": "on_play", "client_id": "1", "ip": "x", "app": "tv", "stream": "cam"}),
            400,
            "not an IP",
        ),
        (&srs, json!({"client_id": "1"}), 400, "action"),
        (
            &mtx,
            json!({"ip": "192.0.2.1", "action": "read", "path": "tv/cam", "protocol": "gopher"}),
            400,
            "unknown protocol",
        ),
        (&mtx, json!({"ip": "192.0.2.1", "action": "read", "path": "nocam", "protocol": "rtsp"}), 400, "app/stream"),
        (&mtx, json!({"ip": "192.0.2.1", "action": 7, "path": "tv/cam", "protocol": "rtsp"}), 400, "body"),
    ];
    for (url, body, status, says) in cases {
        let r = send(url, body.clone()).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        assert!(r.text().await.unwrap().contains(says), "{body}");
    }
    let r = http.post(&srs).header("content-type", "text/plain").body("{}").send().await.unwrap();
    assert_eq!(r.status(), 415);
    for url in [&srs, &mtx] {
        let wrong = url.replace(HOOK_SECRET, "another-secret-of-the-same-size");
        let r = http.post(&wrong).json(&json!({"action": "on_play"})).send().await.unwrap();
        assert_eq!(r.status(), 403, "{url}");
        let r =
            http.post(url).header("content-type", "application/json").body(vec![b' '; 20_000]).send().await.unwrap();
        assert_eq!(r.status(), 413, "{url}");
    }
    let (_, page) = get(&http, format!("http://127.0.0.1:{cp}/v1/decisions?app=tv&limit=100")).await;
    assert_eq!(page["decisions"].as_array().unwrap().len(), before, "a bad request was decided");
}
