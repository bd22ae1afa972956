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
    let srt_token = one_time_token(&http, plane.cp, "gated", "cam", "play").await;
    let rtmp_token = one_time_token(&http, plane.cp, "gated", "cam", "play").await;
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
    until("the stream is live", || async { worker_metric(&http, admin, "sluice_live_streams").await == Some(1.0) })
        .await;
    assert_eq!(reject_code(srt, &srt_play).await, 0, "the SRT token was spent by its refused play");
    assert_eq!(reject_code(srt, &srt_play).await, 1403, "and it is one-time");

    // The log has the refusals as they were: not_live (nothing claimed), then the allow. The
    // two not_live plays come from one address for one stream, so they may be one record
    // with a count of 2 (identical refusals within a second are coalesced).
    let not_live = |records: &[sluice_events::DecisionRecord]| -> u64 {
        records.iter().filter(|d| d.final_reason.as_str() == "not_live").map(|d| d.repeats.map_or(1, |r| r.count)).sum()
    };
    until("the decisions are in the log", || async {
        let records = decision_records(&plane.store, "w1").await;
        records.iter().any(|d| d.allowed && d.request.action.as_str() == "play") && not_live(&records) == 2
    })
    .await;
    let records = decision_records(&plane.store, "w1").await;
    assert_eq!(not_live(&records), 2);
    let plays: Vec<(bool, String)> = records
        .into_iter()
        .filter(|d| d.request.action.as_str() == "play")
        .map(|d| (d.allowed, d.final_reason.as_str().to_owned()))
        .collect();
    assert!(plays.iter().any(|p| p.1 == "token_not_found"), "{plays:?}");
    assert!(plays.iter().any(|p| p.0), "{plays:?}");
    feeding.abort();
}

/// Issue #16 item 9: a client retrying a refused request (GStreamer's `srtsrc` every ~10 ms)
/// adds about one record per second per reason to the log, not one per attempt; every attempt
/// is still counted, and an allow is recorded on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrying_client_adds_about_one_record_per_second_and_every_attempt_is_counted() {
    let plane = Plane::start("retrying").await;
    let http = plane.http.clone();
    let policy = json!({"publish": {"methods": ["open"]}, "play": {"methods": ["one_time_token"]}});
    post(&http, plane.cp, "/v1/apps", json!({"name": "gated", "policy": policy})).await;
    post(&http, plane.cp, "/v1/apps/gated/streams", json!({"name": "cam"})).await;
    let w = media_worker(&plane, "w1", &[]);
    ready_at_head(&http, &plane.store, w.admin).await;

    const ATTEMPTS: u64 = 300;
    let started = Instant::now();
    for _ in 0..ATTEMPTS {
        let code = reject_code(w.srt, "#!::r=gated/cam,m=request,t=guess").await;
        // A wrong token, then the penalty box once the address has failed often enough.
        assert!(code == 1403 || code == 1429, "{code}");
    }
    let secs = started.elapsed().as_secs();
    let counted = |records: &[sluice_events::DecisionRecord]| -> u64 {
        records.iter().filter(|d| !d.allowed).map(|d| d.repeats.map_or(1, |r| r.count)).sum()
    };
    until("every attempt is counted in the log", || async {
        counted(&decision_records(&plane.store, "w1").await) == ATTEMPTS
    })
    .await;
    let records = decision_records(&plane.store, "w1").await;
    let reasons: std::collections::BTreeSet<&str> = records.iter().map(|d| d.final_reason.as_str()).collect();
    // One record per reason per window (1 s), plus the one that closes each reason's run.
    let bound = reasons.len() as u64 * (secs + 2);
    assert!((records.len() as u64) <= bound, "{} records for {ATTEMPTS} attempts in {secs} s", records.len());
    assert!(records.iter().any(|d| d.repeats.is_some_and(|r| r.count > 1 && r.first <= r.last)));
    let coalesced = worker_metric(&http, w.admin, "sluice_refusals_coalesced_total").await.unwrap_or(0.0) as u64;
    assert!(coalesced >= ATTEMPTS - records.len() as u64, "{coalesced} held");
}
