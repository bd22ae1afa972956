//! One publisher per stream, whatever the protocol and whichever worker: real ffmpeg (RTMP) and
//! a real SRT caller against two real workers sharing one NATS; the lease of a SIGKILLed
//! worker frees the stream once it expires; every refusal is `stream_busy` in the log.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::SinkExt as _;
use serde_json::json;
use sluice_events::decision::SlotScope;

mod cluster;
use cluster::*;

/// How long a lease lives unrenewed in this test.
const LEASE_SECS: u64 = 2;

fn start_worker(plane: &Plane, node: &str) -> MediaWorker {
    let lease = LEASE_SECS.to_string();
    media_worker(plane, node, &[("SLUICE_PUBLISH_LEASE_SECS", &lease), ("SLUICE_FAILURE_BACKOFF_AFTER", "0")])
}

/// An SRT publisher (srt-tokio) that keeps sending until the returned sender is dropped.
async fn srt_publisher(port: u16, streamid: &str) -> Result<tokio::sync::oneshot::Sender<()>, i32> {
    let mut socket = call(port, streamid, srt_tokio::SrtSocket::builder()).await?;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let packet = Bytes::from(vec![0x47u8; 188 * 7]);
        loop {
            if socket.send((Instant::now(), packet.clone())).await.is_err() {
                return;
            }
            tokio::select! {
                _ = &mut stopped => break,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        let _ = socket.close().await;
    });
    Ok(stop)
}

/// The decisions of `node` in the log: (stream, action, allowed, reason, publisher slot).
async fn decisions(plane: &Plane, node: &str) -> Vec<(String, String, bool, String, Option<SlotScope>)> {
    decision_records(&plane.store, node)
        .await
        .into_iter()
        .map(|d| {
            let (stream, action) = (d.request.stream.as_str().to_owned(), d.request.action.as_str().to_owned());
            (stream, action, d.allowed, d.final_reason.as_str().to_owned(), d.publisher_slot)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publisher_per_stream_across_protocols_and_workers_and_a_dead_workers_lease_expires() {
    let plane = Plane::start("slot").await;
    let http = plane.http.clone();
    let open = json!({"publish": {"methods": ["open"]}, "play": {"methods": ["open"]}});
    post(&http, plane.cp, "/v1/apps", json!({"name": "tv", "policy": open})).await;
    let w1 = start_worker(&plane, "w1");
    let w2 = start_worker(&plane, "w2");
    ready_at_head(&http, &plane.store, w1.admin).await;
    ready_at_head(&http, &plane.store, w2.admin).await;

    // Given an RTMP publisher live on w1.
    let rtmp1 = format!("rtmp://127.0.0.1:{}/tv/cam", w1.rtmp);
    let publisher = ffmpeg_testsrc("flv", &rtmp1, 60).spawn().unwrap();
    until("the RTMP publisher is live on w1", || async {
        worker_metric(&http, w1.admin, "sluice_live_streams").await == Some(1.0)
    })
    .await;

    // When the same stream is published over SRT on the same worker: refused, 1409.
    assert_eq!(reject_code(w1.srt, "#!::r=tv/cam,m=publish").await, 1409, "SRT after RTMP on one worker");
    // Over SRT and over RTMP on another worker: refused too.
    assert_eq!(reject_code(w2.srt, "#!::r=tv/cam,m=publish").await, 1409, "SRT on another worker");
    let rtmp2 = format!("rtmp://127.0.0.1:{}/tv/cam", w2.rtmp);
    let second = tokio::task::spawn_blocking({
        let u = rtmp2.clone();
        move || ffmpeg_testsrc("flv", &u, 2).output().unwrap()
    })
    .await
    .unwrap();
    assert!(!second.status.success() && stderr(&second).contains("stream_busy"), "{}", stderr(&second));
    // Players are not publishers: one plays on w1 meanwhile.
    let played = tokio::task::spawn_blocking({
        let u = rtmp1.clone();
        move || ffmpeg_play(&u)
    })
    .await
    .unwrap();
    assert!(played.status.success() && stderr(&played).contains("frame="), "{}", stderr(&played));

    // The other way round: an SRT publisher holds `cam2` on w2, so RTMP on w1 is refused.
    let srt_holder = srt_publisher(w2.srt, "#!::r=tv/cam2,m=publish").await.expect("SRT publisher admitted");
    let rtmp_cam2 = tokio::task::spawn_blocking({
        let u = format!("rtmp://127.0.0.1:{}/tv/cam2", w1.rtmp);
        move || ffmpeg_testsrc("flv", &u, 2).output().unwrap()
    })
    .await
    .unwrap();
    assert!(!rtmp_cam2.status.success() && stderr(&rtmp_cam2).contains("stream_busy"), "{}", stderr(&rtmp_cam2));
    // Once it leaves, its lease is deleted: the stream is free at once, not after the lease.
    drop(srt_holder);
    until("cam2 is free again", || async { reject_code(w1.srt, "#!::r=tv/cam2,m=publish").await == 0 }).await;

    // Every refusal on w1 is in the log as stream_busy, and its admitted publish says the
    // cluster's lease held the slot.
    until("w1's decisions are in the log", || async {
        let d = decisions(&plane, "w1").await;
        d.iter().any(|d| d.0 == "cam" && d.1 == "publish" && !d.2 && d.3 == "stream_busy")
            && d.iter().any(|d| d.0 == "cam" && d.1 == "publish" && d.2 && d.4 == Some(SlotScope::Cluster))
    })
    .await;

    // When w1 dies without a word (SIGKILL), its lease expires and w2 may publish `cam`.
    let mut w1 = w1;
    w1.process.0.kill().unwrap();
    let _ = w1.process.0.wait();
    let mut publisher = publisher;
    let _ = publisher.kill();
    let _ = publisher.wait();
    until("w1's lease on cam expired", || async { reject_code(w2.srt, "#!::r=tv/cam,m=publish").await == 0 }).await;

    // Then w2's refusals are in the log as stream_busy too, and each publish it admitted says
    // the cluster's lease held its slot.
    until("w2's decisions are in the log", || async {
        decisions(&plane, "w2").await.iter().any(|d| d.0 == "cam" && d.2)
    })
    .await;
    let w2_decisions = decisions(&plane, "w2").await;
    assert!(
        w2_decisions.iter().any(|d| d.0 == "cam" && d.1 == "publish" && !d.2 && d.3 == "stream_busy"),
        "{w2_decisions:?}"
    );
    for d in w2_decisions.iter().filter(|d| d.1 == "publish") {
        assert_eq!(d.4.is_some(), d.2, "only an allowed publish records its slot: {d:?}");
        if d.2 {
            assert_eq!(d.4, Some(SlotScope::Cluster), "{d:?}");
        }
    }

    // NATS away: w2 admits a publisher on its own slot alone, and its decision says so once it
    // reaches the log.
    let mut plane = plane;
    plane.nats.stop();
    let offline = srt_publisher(w2.srt, "#!::r=tv/offline,m=publish").await.expect("admitted on the local slot");
    plane.nats.restart().unwrap();
    until("the offline publish is in the log, on the local slot", || async {
        decisions(&plane, "w2").await.iter().any(|d| d.0 == "offline" && d.2 && d.4 == Some(SlotScope::Local))
    })
    .await;
    drop(offline);
    assert!(!read(&w2.log).contains("panicked"), "{}", read(&w2.log));
    assert!(!read(&w1.log).contains("panicked"), "{}", read(&w1.log));
}
