//! SRT end to end with real ffmpeg and srt-live-transmit against the real worker, control
//! plane, Postgres and NATS: publish and play decided from the streamid before the handshake
//! ends, refusals as SRT reject codes, relay to several players, every decision in the log.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_control_plane::EventStore;
use sluice_tests::{Nats, Postgres, free_port};

mod cluster;
use cluster::*;

fn srt_url(port: u16, streamid: &str) -> String {
    // ffmpeg does not percent-decode `streamid`: it goes raw (STACK.md).
    format!("srt://127.0.0.1:{port}?streamid={streamid}")
}

/// srt-live-transmit as a caller for `secs`: its verbose log (with the reject reason if
/// refused) and what it received (written to stdout, `file://con`).
fn transmit(url: &str, secs: u64) -> (String, Vec<u8>) {
    let child = Command::new("srt-live-transmit")
        .args(["-v", "-a:no", "-t", &secs.to_string(), url, "file://con"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = child;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs + 5) && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let o = child.wait_with_output().unwrap();
    (String::from_utf8_lossy(&o.stderr).into_owned(), o.stdout)
}

/// A tiny SRT caller (srt-tokio) that reads the reject code off the handshake: the code
/// libsrt reports (1000 + status), 0 when accepted.
async fn reject_code(port: u16, streamid: &str) -> i32 {
    let addr = format!("127.0.0.1:{port}");
    let call = srt_tokio::SrtSocket::builder().call(addr.as_str(), Some(streamid));
    let e = match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(_)) => return 0,
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
    ];
    codes.iter().find(|(name, _)| reason.contains(name)).map(|(_, c)| *c).unwrap_or_else(|| panic!("{reason}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srt_callers_are_decided_from_the_streamid_refused_with_reject_codes_and_relayed() {
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("srt").await.unwrap();
    let nats = Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let store = EventStore::start(sluice_control_plane::connect(&url).await.unwrap());
    let cp = free_port();
    let _cp = control(&url, &nats.url(), cp, "cp-1", &dir.path().join("cp.log"));
    let policy = json!({
        "publish": {"methods": ["one_time_token"], "accept_undefined_streams": false},
        "play": {"methods": ["one_time_token", "open"], "accept_undefined_streams": false},
    });
    post(&http, cp, "/v1/apps", json!({"name": "studio", "policy": policy})).await;
    post(&http, cp, "/v1/apps/studio/streams", json!({"name": "cam1"})).await;
    post(&http, cp, "/v1/apps/studio/streams", json!({"name": "idle"})).await;
    let token = post(&http, cp, "/v1/apps/studio/streams/cam1/tokens", json!({"action": "publish"})).await;
    let token = token["token"].as_str().unwrap().to_owned();
    let (admin, srt) = (free_port(), free_port());
    let w_log = dir.path().join("w1.log");
    let listen = format!("127.0.0.1:{srt}");
    let _w = worker_with(
        &nats.url(),
        admin,
        &dir.path().join("w1"),
        "w1",
        &w_log,
        &[("SLUICE_SRT_LISTEN", &listen), ("SLUICE_FAILURE_BACKOFF_AFTER", "0")],
    );
    let head = store.head().await.unwrap().0;
    until("the worker has the head", || async {
        get(&http, format!("http://127.0.0.1:{admin}/wait?position={head}&timeout_ms=500")).await.0 == 200
    })
    .await;
    assert!(read(&w_log).contains("SRT on srt-tokio"), "{}", read(&w_log));

    // Random datagrams to the port change nothing.
    let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let _ = junk.send_to(&i.to_be_bytes().repeat(1 + (i as usize % 40)), ("127.0.0.1", srt));
    }

    // A wrong token is refused during the handshake with 1403.
    let wrong = tokio::task::spawn_blocking({
        let u = srt_url(srt, "#!::r=studio/cam1,m=publish,t=guess");
        move || transmit(&u, 3)
    })
    .await
    .unwrap();
    assert!(wrong.0.contains("REJECT") && wrong.1.is_empty(), "{}", wrong.0);
    assert_eq!(reject_code(srt, "#!::r=studio/cam1,m=publish,t=guess").await, 1403);
    // Ant Media's form has no mode, so it plays: nothing is live yet.
    assert_eq!(reject_code(srt, "studio/cam1,token=guess").await, 1404, "Ant Media's form");
    assert_eq!(reject_code(srt, "#!::m=publish").await, 1400, "no resource");

    // The right one publishes (standard streamid form).
    let url = format!("{}&pkt_size=1316", srt_url(srt, &format!("#!::r=studio/cam1,m=publish,t={token}")));
    let live = ffmpeg_testsrc("mpegts", &url, 20).spawn().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A second publisher, even with a valid credential, is refused with 1409 and its token
    // stays unburnt.
    let spare = post(&http, cp, "/v1/apps/studio/streams/cam1/tokens", json!({"action": "publish"})).await;
    let spare = spare["token"].as_str().unwrap().to_owned();
    assert_eq!(reject_code(srt, &format!("#!::r=studio/cam1,m=publish,t={spare}")).await, 1409);
    // Nothing live to play on a registered stream, and an unknown stream: 1404.
    assert_eq!(reject_code(srt, "#!::r=studio/idle,m=request").await, 1404);
    assert_eq!(reject_code(srt, "#!::r=studio/nowhere,m=request").await, 1404);
    // Players: ffmpeg decodes frames (standard form), srt-live-transmit receives TS (Ant
    // Media's form, plain app/stream).
    let played = tokio::task::spawn_blocking({
        let u = srt_url(srt, "#!::r=studio/cam1,m=request");
        move || ffmpeg_play(&u)
    });
    let ts = tokio::task::spawn_blocking({
        let u = srt_url(srt, "studio/cam1");
        move || transmit(&u, 4)
    });
    let played = played.await.unwrap();
    assert!(played.status.success() && stderr(&played).contains("frame="), "{}", stderr(&played));
    let (_, bytes) = ts.await.unwrap();
    assert!(bytes.len() > 50 * 188, "srt-live-transmit received {} bytes", bytes.len());
    assert!(bytes.iter().step_by(188).take(50).all(|b| *b == 0x47), "MPEG-TS packets (sync byte 0x47)");
    // The live stream's figures reach the control plane.
    until("the control plane sees the SRT stream", || async {
        let (code, st) = get(&http, format!("http://127.0.0.1:{cp}/v1/stats/streams/studio/cam1")).await;
        code == 200 && st["live"] == true && st["bytes_in"].as_u64() > Some(10_000)
    })
    .await;
    // Revoking the publisher's stream ends it.
    let r = http
        .delete(format!("http://127.0.0.1:{cp}/v1/apps/studio/streams/cam1"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let ended = tokio::task::spawn_blocking(move || wait_bounded(live, Duration::from_secs(20))).await.unwrap();
    assert!(ended.is_some(), "the SRT publisher outlived its stream's deletion");
    until("the kick is logged", || async { read(&w_log).contains("SRT session ended: no longer allowed") }).await;

    // Every decision is in the log with its reason.
    until("the decisions are in the log", || async { recorded(&store, "w1").await.len() >= 7 }).await;
    let log = recorded(&store, "w1").await;
    let has = |action: &str, allowed: bool, reason: &str| {
        log.iter().any(|(a, ac, al, r)| a == "studio" && ac == action && *al == allowed && r == reason)
    };
    assert!(has("publish", false, "token_not_found"), "{log:?}");
    assert!(has("publish", true, "allowed"), "{log:?}");
    assert!(has("publish", false, "stream_busy"), "{log:?}");
    assert!(has("play", false, "stream_not_registered"), "{log:?}");
    assert!(has("play", true, "allowed"), "{log:?}");
    assert_eq!(get(&http, format!("http://127.0.0.1:{admin}/health")).await.0, 200);
}
