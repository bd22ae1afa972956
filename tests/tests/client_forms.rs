//! The URLs people already type (issue #17, media URL forms), with real clients and the real
//! worker: Ant Media's SRT ingest form publishes, SLS's plain names take the mode of the name
//! (a secret publish name publishes, the public name plays, a bare name is in SLS's app), a
//! percent-encoded `#!::` streamid (what VLC users must write) is decoded, and an RTMP
//! credential on the connect URL (nginx-rtmp's convention, OBS's Server field) counts.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use bytes::Bytes;
use futures::SinkExt as _;
use serde_json::json;

mod cluster;
use cluster::*;

/// An srt-tokio publisher on `streamid` feeding TS-sized packets until dropped.
async fn srt_publisher(port: u16, streamid: &str) -> tokio::task::JoinHandle<()> {
    let mut socket = call(port, streamid, srt_tokio::SrtSocket::builder()).await.unwrap();
    tokio::spawn(async move {
        let packet = Bytes::from(vec![0x47u8; 188 * 7]);
        while socket.send((Instant::now(), packet.clone())).await.is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
}

async fn live_streams(http: &reqwest::Client, admin: u16) -> u64 {
    let text = http.get(format!("http://127.0.0.1:{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix("sluice_live_streams ")).and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_urls_people_already_type_are_decided_as_they_mean() {
    let plane = Plane::start("forms").await;
    let http = plane.http.clone();
    let gated = json!({"publish": {"methods": ["one_time_token"]}, "play": {"methods": ["open"]}});
    let open = json!({"publish": {"methods": ["open"]}, "play": {"methods": ["open"]}});
    post(&http, plane.cp, "/v1/apps", json!({"name": "ams", "policy": gated})).await;
    post(&http, plane.cp, "/v1/apps", json!({"name": "gated", "policy": gated})).await;
    // `live` is SLS's app, made at bootstrap.
    put_policy(&http, plane.cp, "live", &open).await;
    post(&http, plane.cp, "/v1/apps/live/streams", json!({"name": "cam", "publish_name": "sec-4f1c9e"})).await;
    let token = |app: &'static str, stream: &'static str| {
        let http = http.clone();
        let cp = plane.cp;
        async move {
            let t =
                post(&http, cp, &format!("/v1/apps/{app}/streams/{stream}/tokens"), json!({"action": "publish"})).await;
            t["token"].as_str().unwrap().to_owned()
        }
    };
    let (ams_token, rtmp_token) = (token("ams", "cam1").await, token("gated", "obs").await);
    let w = media_worker(&plane, "w1", &[("SLUICE_FAILURE_BACKOFF_AFTER", "0")]);
    ready_at_head(&http, &plane.store, w.admin).await;

    // Ant Media's SRT ingest form publishes (it was taken for a play: 1404).
    assert_eq!(reject_code(w.srt, "ams/cam1,token=guess").await, 1403, "a wrong token, as a publisher");
    let ams = srt_publisher(w.srt, &format!("ams/cam1,token={ams_token}")).await;
    until("the Ant Media publisher is live", || async { live_streams(&http, w.admin).await == 1 }).await;
    // Its `,play` flag plays; a percent-encoded access-control streamid plays too.
    assert_eq!(reject_code(w.srt, "ams/cam1,play").await, 0);
    assert_eq!(reject_code(w.srt, "%23!%3A%3Ar%3Dams%2Fcam1%2Cm%3Drequest").await, 0, "percent-encoded");
    assert_eq!(reject_code(w.srt, "%23!%3A%3Ar%3Dams%2Fnowhere").await, 1404, "no m: request");

    // SLS's plain names: the secret publish name publishes (bare, in SLS's app `live`), the
    // public name plays, with or without the app and SLS's domain.
    assert_eq!(reject_code(w.srt, "cam").await, 1404, "the public name plays, and nothing is live");
    let sls = srt_publisher(w.srt, "sec-4f1c9e").await;
    until("the SLS publisher is live", || async { live_streams(&http, w.admin).await == 2 }).await;
    assert_eq!(reject_code(w.srt, "live/cam").await, 0);
    assert_eq!(reject_code(w.srt, "uplive.sls.com/live/cam").await, 0);
    assert_eq!(reject_code(w.srt, "cam").await, 0);
    assert_eq!(reject_code(w.srt, "live/sec-4f1c9e").await, 1409, "the publish name publishes: busy");

    // RTMP with the credential on the connect URL (the app's query), as OBS sends it with the
    // token in its Server field: ffmpeg's -rtmp_app sets exactly that.
    let mut rtmp = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-re", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=15"])
        .args(["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "15", "-t", "20", "-f", "flv"])
        .args(["-rtmp_app", &format!("gated?token={rtmp_token}"), "-rtmp_playpath", "obs"])
        .arg(format!("rtmp://127.0.0.1:{}/", w.rtmp))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    until_live(&http, plane.cp, "gated", "obs").await;
    let _ = rtmp.kill();
    let _ = rtmp.wait();
    ams.abort();
    sls.abort();
}

/// Refusals every player shows (issue #17): an RTMP refusal goes out as nginx-rtmp and SRS
/// send it, `onStatus` with level `error`, the code and the reason, then the `_error` result.
/// rtmpdump (librtmp) acts on the status code and prints it; ffmpeg prints the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_refusals_are_shown_by_librtmp_and_ffmpeg() {
    let plane = Plane::start("refusals_shown").await;
    let http = plane.http.clone();
    let secure = json!({"publish": {"methods": ["open"]}, "play": {"methods": ["one_time_token"]}});
    post(&http, plane.cp, "/v1/apps", json!({"name": "secure", "policy": secure})).await;
    let w = media_worker(&plane, "w1", &[("SLUICE_FAILURE_BACKOFF_AFTER", "0")]);
    ready_at_head(&http, &plane.store, w.admin).await;
    let url = format!("rtmp://127.0.0.1:{}/secure/cam", w.rtmp);
    let out = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            std::process::Command::new("rtmpdump")
                .args(["-r", &url, "-o", "/dev/null", "--timeout", "10", "-m", "10"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("Closing connection: NetStream.Play.Failed"), "rtmpdump shows the refusal: {said}");
    let out = tokio::task::spawn_blocking(move || ffmpeg_play(&url)).await.unwrap();
    let said = stderr(&out);
    assert!(!out.status.success() && said.contains("credential_missing"), "ffmpeg shows the reason: {said}");
}
