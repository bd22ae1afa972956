//! Refusals that do not depend on the credential come before anything is claimed (issue #16,
//! item 4): a play of a stream nobody publishes is refused `not_live` with its one-time token
//! unspent, over SRT and RTMP, and the log records the refusal as such.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use bytes::Bytes;
use futures::SinkExt as _;
use serde_json::json;

mod cluster;
use cluster::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_play_of_a_stream_not_live_spends_no_token_and_is_recorded_not_live() {
    let plane = Plane::start("notlive").await;
    let http = plane.http.clone();
    let policy = json!({"publish": {"methods": ["open"]}, "play": {"methods": ["one_time_token"]}});
    post(&http, plane.cp, "/v1/apps", json!({"name": "gated", "policy": policy})).await;
    post(&http, plane.cp, "/v1/apps/gated/streams", json!({"name": "cam"})).await;
    let token = |http: reqwest::Client, cp: u16| async move {
        let t = post(&http, cp, "/v1/apps/gated/streams/cam/tokens", json!({"action": "play"})).await;
        t["token"].as_str().unwrap().to_owned()
    };
    let (srt_token, rtmp_token) = (token(http.clone(), plane.cp).await, token(http.clone(), plane.cp).await);
    let w = media_worker(&plane, "w1", &[]);
    let (admin, rtmp, srt) = (w.admin, w.rtmp, w.srt);
    ready_at_head(&http, &plane.store, admin).await;

    // Nothing is live: both plays are refused, SRT with 1404, RTMP with StreamNotFound.
    let srt_play = format!("#!::r=gated/cam,m=request,t={srt_token}");
    assert_eq!(reject_code(srt, &srt_play).await, 1404);
    let rtmp_play = format!("rtmp://127.0.0.1:{rtmp}/gated/cam?token={rtmp_token}");
    let out = tokio::task::spawn_blocking({
        let u = rtmp_play.clone();
        move || ffmpeg_play(&u)
    })
    .await
    .unwrap();
    assert!(!out.status.success() && stderr(&out).contains("not_live"), "{}", stderr(&out));
    // A wrong token is refused for what it is, live or not.
    assert_eq!(reject_code(srt, "#!::r=gated/cam,m=request,t=guess").await, 1403);

    // Once the stream is live, the same tokens play: they were not spent.
    let mut socket = call(srt, "#!::r=gated/cam,m=publish", srt_tokio::SrtSocket::builder()).await.unwrap();
    let feeding = tokio::spawn(async move {
        let packet = Bytes::from(vec![0x47u8; 188 * 7]);
        while socket.send((Instant::now(), packet.clone())).await.is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
    until("the stream is live", || async {
        let text = http.get(format!("http://127.0.0.1:{admin}/metrics")).send().await.unwrap().text().await.unwrap();
        text.lines().any(|l| l == "sluice_live_streams 1")
    })
    .await;
    assert_eq!(reject_code(srt, &srt_play).await, 0, "the SRT token was spent by its refused play");
    assert_eq!(reject_code(srt, &srt_play).await, 1403, "and it is one-time");

    // The log has the refusals as they were: not_live (nothing claimed), then the allow.
    until("the decisions are in the log", || async {
        decision_records(&plane.store, "w1").await.iter().any(|d| d.allowed && d.request.action.as_str() == "play")
    })
    .await;
    let plays: Vec<(bool, String)> = decision_records(&plane.store, "w1")
        .await
        .into_iter()
        .filter(|d| d.request.action.as_str() == "play")
        .map(|d| (d.allowed, d.final_reason.as_str().to_owned()))
        .collect();
    assert_eq!(plays.iter().filter(|p| p.1 == "not_live").count(), 2, "{plays:?}");
    assert!(plays.iter().any(|p| p.1 == "token_not_found"), "{plays:?}");
    assert!(plays.iter().any(|p| p.0), "{plays:?}");
    feeding.abort();
}
