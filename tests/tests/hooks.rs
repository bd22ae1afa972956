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
