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
    let ams_token = one_time_token(&http, plane.cp, "ams", "cam1", "publish").await;
    let rtmp_token = one_time_token(&http, plane.cp, "gated", "obs", "publish").await;
    let w = media_worker(&plane, "w1", &[("SLUICE_FAILURE_BACKOFF_AFTER", "0")]);
    ready_at_head(&http, &plane.store, w.admin).await;

    // Ant Media's SRT ingest form publishes (it was taken for a play: 1404).
    assert_eq!(reject_code(w.srt, "ams/cam1,token=guess").await, 1403, "a wrong token, as a publisher");
    let ams = srt_publisher(w.srt, &format!("ams/cam1,token={ams_token}")).await;
    until("the Ant Media publisher is live", || async {
        worker_metric(&http, w.admin, "sluice_live_streams").await == Some(1.0)
    })
    .await;
    // Its `,play` flag plays; a percent-encoded access-control streamid plays too.
    assert_eq!(reject_code(w.srt, "ams/cam1,play").await, 0);
    assert_eq!(reject_code(w.srt, "%23!%3A%3Ar%3Dams%2Fcam1%2Cm%3Drequest").await, 0, "percent-encoded");
    assert_eq!(reject_code(w.srt, "%23!%3A%3Ar%3Dams%2Fnowhere").await, 1404, "no m: request");

    // SLS's plain names: the secret publish name publishes (bare, in SLS's app `live`), the
    // public name plays, with or without the app and SLS's domain.
    assert_eq!(reject_code(w.srt, "cam").await, 1404, "the public name plays, and nothing is live");
    let sls = srt_publisher(w.srt, "sec-4f1c9e").await;
    until("the SLS publisher is live", || async {
        worker_metric(&http, w.admin, "sluice_live_streams").await == Some(2.0)
    })
    .await;
    assert_eq!(reject_code(w.srt, "live/cam").await, 0);
    assert_eq!(reject_code(w.srt, "uplive.sls.com/live/cam").await, 0);
    assert_eq!(reject_code(w.srt, "cam").await, 0);
    assert_eq!(reject_code(w.srt, "live/sec-4f1c9e").await, 1409, "the publish name publishes: busy");
    // Another player id for the same publisher, through SLS's API, plays it.
    let second = json!({"publisher": "sec-4f1c9e", "player": "cam-b"});
    assert_eq!(post(&http, plane.cp, "/api/stream-ids", second).await["status"], "success");
    until("the second player id plays", || async { reject_code(w.srt, "cam-b").await == 0 }).await;
    assert_eq!(reject_code(w.srt, "live/cam-b").await, 0);

    // What cannot be read is refused 1400 and recorded (`malformed`, under `-`/`-`), with
    // nothing of the raw streamid kept; explain has nothing to replay.
    assert_eq!(reject_code(w.srt, "#!::m=publish,t=secret-in-a-bad-streamid").await, 1400);
    let malformed = || async {
        let (_, body) = get(&http, format!("http://127.0.0.1:{}/v1/decisions?reason=malformed", plane.cp)).await;
        body["decisions"].as_array().cloned().unwrap_or_default()
    };
    until("the malformed request is in the log", || async { !malformed().await.is_empty() }).await;
    let row = malformed().await[0].clone();
    assert_eq!(
        (row["app"].as_str(), row["stream"].as_str(), row["allowed"].as_bool()),
        (Some("-"), Some("-"), Some(false))
    );
    let (_, explained) =
        get(&http, format!("http://127.0.0.1:{}/v1/decisions/{}/explain", plane.cp, row["id"].as_str().unwrap())).await;
    assert_eq!(explained["matches"], true, "{explained}");
    assert!(explained["rule"].as_str().unwrap().contains("could not be read"), "{explained}");
    let records = decision_records(&plane.store, "w1").await;
    assert!(!format!("{records:?}").contains("secret-in-a-bad-streamid"), "the raw streamid is not kept");

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

/// Pipelined RTMP commands (issue #17): `connect`, `createStream` and `play` in one write,
/// without waiting for each answer, as the protocol allows and nginx-rtmp serves. Each is
/// answered in order; before, the `play` was refused ("Can't play before connecting") and the
/// client got nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_rtmp_commands_are_served_in_order() {
    use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn command(name: &str, txn: f64, object: Option<&[(&str, &str)]>, args: &[&str]) -> Vec<u8> {
        let mut p = vec![0x02];
        string(&mut p, name);
        p.push(0x00);
        p.extend_from_slice(&txn.to_be_bytes());
        match object {
            Some(props) => {
                p.push(0x03);
                for (k, v) in props {
                    string(&mut p, k);
                    p.push(0x02);
                    string(&mut p, v);
                }
                p.extend_from_slice(&[0, 0, 9]);
            }
            None => p.push(0x05),
        }
        for a in args {
            p.push(0x02);
            string(&mut p, a);
        }
        p
    }
    fn chunk(csid: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![csid, 0, 0, 0];
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.push(20);
        out.extend_from_slice(&stream_id.to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    let plane = Plane::start("pipelined").await;
    let w = media_worker(&plane, "w1", &[]);
    ready_at_head(&plane.http, &plane.store, w.admin).await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", w.rtmp)).await.unwrap();
    let mut hs = Handshake::new(PeerType::Client);
    stream.write_all(&hs.generate_outbound_p0_and_p1().unwrap()).await.unwrap();
    let mut buf = vec![0u8; 16384];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed during the handshake");
        match hs.process_bytes(&buf[..n]).unwrap() {
            HandshakeProcessResult::InProgress { response_bytes } => stream.write_all(&response_bytes).await.unwrap(),
            HandshakeProcessResult::Completed { response_bytes, .. } => {
                stream.write_all(&response_bytes).await.unwrap();
                break;
            }
        }
    }
    // One write: connect (app `live`, SLS's open app), createStream, play on stream 1.
    let tc_url = format!("rtmp://127.0.0.1:{}/live", w.rtmp);
    let mut all = chunk(3, 0, &command("connect", 1.0, Some(&[("app", "live"), ("tcUrl", &tc_url)]), &[]));
    all.extend(chunk(3, 0, &command("createStream", 2.0, None, &[])));
    all.extend(chunk(8, 1, &command("play", 0.0, None, &["cam"])));
    stream.write_all(&all).await.unwrap();
    // The play is decided (`cam` is no registered stream of SLS's app: refused, with its status).
    let mut said = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !String::from_utf8_lossy(&said).contains("NetStream.Play.StreamNotFound")
        && tokio::time::Instant::now() < deadline
    {
        match tokio::time::timeout(std::time::Duration::from_secs(1), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => said.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let said = String::from_utf8_lossy(&said);
    assert!(!said.contains("Can't play before connecting"), "{said}");
    assert!(said.contains("NetConnection.Connect.Success") && said.contains("NetStream.Play.StreamNotFound"), "{said}");
    until("the play's decision is in the log", || async {
        decision_records(&plane.store, "w1").await.iter().any(|d| d.request.stream.as_str() == "cam")
    })
    .await;
}

/// Stream JWTs from a JWKS, end to end (issue #17): a key rotated in at the identity provider
/// is fetched early when a worker meets a JWT with its unknown `kid` (at most once per
/// `SLUICE_JWKS_KID_REFETCH_SECS`), not only at the next period (an hour here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_with_an_unknown_kid_makes_the_control_plane_refetch_the_jwks() {
    use serde_json::Value;
    let full: Value = serde_json::from_str(include_str!("../../events/tests/fixtures/jwks.json")).unwrap();
    let ec_only = json!({"keys": full["keys"].as_array().unwrap().iter().filter(|k| k["kty"] == "EC").cloned().collect::<Vec<_>>()});
    let served = std::sync::Arc::new(std::sync::Mutex::new(ec_only));
    let idp = {
        let served = served.clone();
        axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let body = served.lock().unwrap().clone();
                async move { axum::Json(body) }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, idp).await.unwrap() });

    let pg = sluice_tests::Postgres::start().unwrap();
    let db = pg.create_database("kid").await.unwrap();
    let nats = sluice_tests::Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = sluice_control_plane::EventStore::start(sluice_control_plane::connect(&db).await.unwrap());
    let cp = sluice_tests::free_port();
    let settings = [("SLUICE_JWKS_REFRESH_SECS", "3600"), ("SLUICE_JWKS_KID_REFETCH_SECS", "1")];
    let control = control_with(&db, &nats.url(), cp, "cp-1", &dir.path().join("cp.log"), &settings);
    let plane = Plane { pg, url: db, nats, dir, http: reqwest::Client::new(), store, cp, control };
    let http = plane.http.clone();
    let policy = json!({"publish": {"methods": ["jwt"]}, "play": {"methods": ["open"]}, "jwt": {"jwks_url": url}});
    post(&http, cp, "/v1/apps", json!({"name": "jw", "policy": policy})).await;
    until("the first set is fetched", || async {
        get(&http, format!("http://127.0.0.1:{cp}/v1/apps/jw")).await.1["jwks"]["keys"] == 1
    })
    .await;
    let w = media_worker(&plane, "w1", &[("SLUICE_FAILURE_BACKOFF_AFTER", "0")]);
    ready_at_head(&http, &plane.store, w.admin).await;

    // The identity provider rotates the RSA key in; the control plane would see it in an hour.
    *served.lock().unwrap() = full;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let claims = json!({"sub": "enc-1", "app": "jw", "stream": "cam", "action": "publish", "exp": 4_102_444_800i64});
    let key = jsonwebtoken::EncodingKey::from_rsa_der(include_bytes!("../../events/tests/fixtures/rsa.der"));
    let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    let decide = || {
        let http = http.clone();
        let body = json!({"app": "jw", "stream": format!("cam?token={token}"), "action": "publish", "client_ip": "203.0.113.9"});
        async move {
            let r = http
                .post(format!("http://127.0.0.1:{}/v1/decide", w.admin))
                .bearer_auth(NODE_SECRET)
                .json(&body)
                .send()
                .await
                .unwrap();
            r.json::<Value>().await.unwrap()["reason"].as_str().unwrap_or_default().to_owned()
        }
    };
    assert_eq!(decide().await, "jwt_key_unknown");
    // That refusal reaches the control plane, which fetches the set again; the worker learns
    // the new key through the log.
    until("the rotated key is admitted", || async { decide().await == "allowed" }).await;
}

/// GStreamer 1.22 as a user runs it (issue #17): `rtmp2sink` publishes with the token in the
/// URL and `rtmp2src` plays; `srtsink` publishes with the access-control streamid, which a
/// GStreamer URI must percent-encode (`#` starts a fragment); a refused `rtmp2sink` ends with an
/// error rather than waiting for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gstreamer_publishes_and_plays_over_rtmp_and_srt() {
    let plane = Plane::start("gstreamer").await;
    let http = plane.http.clone();
    let gated = json!({"publish": {"methods": ["one_time_token"]}, "play": {"methods": ["open"]}});
    post(&http, plane.cp, "/v1/apps", json!({"name": "gst", "policy": gated})).await;
    let rtmp_token = one_time_token(&http, plane.cp, "gst", "rtmp1", "publish").await;
    let srt_token = one_time_token(&http, plane.cp, "gst", "srt1", "publish").await;
    let w = media_worker(&plane, "w1", &[("SLUICE_FAILURE_BACKOFF_AFTER", "0")]);
    ready_at_head(&http, &plane.store, w.admin).await;
    let source = "videotestsrc is-live=true num-buffers=450 ! video/x-raw,width=320,height=240,framerate=15/1 ! \
                  x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15";
    let launch = |pipeline: String| {
        std::process::Command::new("gst-launch-1.0")
            .args(pipeline.split_whitespace())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // RTMP: publish with the token, play it back.
    let rtmp_url = format!("rtmp://127.0.0.1:{}/gst/rtmp1?token={rtmp_token}", w.rtmp);
    let mut publisher = launch(format!("{source} ! flvmux streamable=true ! rtmp2sink location={rtmp_url}"));
    until_live(&http, plane.cp, "gst", "rtmp1").await;
    let play = format!("rtmp2src location=rtmp://127.0.0.1:{}/gst/rtmp1 num-buffers=30 ! fakesink", w.rtmp);
    let played = tokio::task::spawn_blocking(move || wait_bounded(launch(play), std::time::Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(played.as_ref().is_some_and(|o| o.status.success()), "rtmp2src played: {played:?}");
    let _ = publisher.kill();
    let _ = publisher.wait();
    // A refused publish (a wrong token) ends with an error, and says why.
    let refused = format!(
        "{source} ! flvmux streamable=true ! rtmp2sink location=rtmp://127.0.0.1:{}/gst/rtmp2?token=guess",
        w.rtmp
    );
    let out = tokio::task::spawn_blocking(move || wait_bounded(launch(refused), std::time::Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("a refused rtmp2sink ends");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // rtmp2sink prints the status it got: "Failed to connect: publish denied; …
    // "description": "token_not_found", "code": "NetStream.Publish.BadName"".
    assert!(!out.status.success() && said.contains("token_not_found"), "{said}");
    // SRT: srtsink with the access-control streamid, percent-encoded in the URI.
    let sid = format!("%23!%3A%3Ar%3Dgst%2Fsrt1%2Cm%3Dpublish%2Ct%3D{srt_token}");
    let mut srt = launch(format!("{source} ! mpegtsmux ! srtsink uri=srt://127.0.0.1:{}?streamid={sid}", w.srt));
    until_live(&http, plane.cp, "gst", "srt1").await;
    let _ = srt.kill();
    let _ = srt.wait();
}

/// Ant Media's REST v2 around a real publisher (issue #17): the `/totp` helper's code
/// publishes with ffmpeg, the broadcast shows `broadcasting` over RTMP, and the admission is
/// a `connected` connection event and in the subscriber's stats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ant_media_rest_v2_follows_a_real_publisher() {
    let plane = Plane::start("amsrest").await;
    let http = plane.http.clone();
    let policy = json!({"publish": {"methods": ["totp"]}, "play": {"methods": ["open"]}});
    post(&http, plane.cp, "/v1/apps", json!({"name": "LiveApp", "policy": policy})).await;
    post(&http, plane.cp, "/LiveApp/rest/v2/broadcasts/create", json!({"streamId": "stream1"})).await;
    let sub = json!({"subscriberId": "publisherA", "type": "publish"});
    assert_eq!(post(&http, plane.cp, "/LiveApp/rest/v2/broadcasts/stream1/subscribers", sub).await["success"], true);
    let w = media_worker(&plane, "w1", &[]);
    ready_at_head(&http, &plane.store, w.admin).await;
    let base = format!("http://127.0.0.1:{}/LiveApp/rest/v2/broadcasts", plane.cp);
    let (_, b) = get(&http, format!("{base}/stream1")).await;
    assert_eq!((b["status"].as_str(), b["publishType"].as_str()), (Some("created"), None));

    let (_, totp) = get(&http, format!("{base}/stream1/subscribers/publisherA/totp")).await;
    let code = totp["dataId"].as_str().unwrap().to_owned();
    let url = format!("rtmp://127.0.0.1:{}/LiveApp/stream1?subscriberId=publisherA&subscriberCode={code}", w.rtmp);
    let mut ffmpeg = ffmpeg_testsrc("flv", &url, 30).spawn().unwrap();
    until_live(&http, plane.cp, "LiveApp", "stream1").await;
    let (_, b) = get(&http, format!("{base}/stream1")).await;
    assert_eq!((b["status"].as_str(), b["publishType"].as_str()), (Some("broadcasting"), Some("RTMP")), "{b}");
    assert!(b["startTime"].as_i64().unwrap() > 0 && b["receivedBytes"].as_u64().unwrap() > 0, "{b}");

    let events = || async { get(&http, format!("{base}/stream1/connection-events/0/10")).await.1 };
    until("the admission is a connection event", || async { events().await.as_array().is_some_and(|a| !a.is_empty()) })
        .await;
    let e = events().await[0].clone();
    assert_eq!(
        (e["eventType"].as_str(), e["type"].as_str(), e["eventProtocol"].as_str()),
        (Some("connected"), Some("publish"), Some("rtmp")),
        "{e}"
    );
    assert_eq!(
        (e["subscriberId"].as_str(), e["streamId"].as_str(), e["instanceIP"].as_str()),
        (Some("publisherA"), Some("stream1"), Some("w1"))
    );
    let (_, other) = get(&http, format!("{base}/stream1/connection-events/0/10?subscriberId=someoneElse")).await;
    assert_eq!(other, json!([]));
    let (_, stats) = get(&http, format!("{base}/stream1/subscriber-stats/list/0/10")).await;
    assert_eq!(stats[0]["subscriberId"], "publisherA");
    assert_eq!(stats[0]["connectionEvents"].as_array().unwrap().len(), 1, "{stats}");
    // Another player name for the stream plays it over RTMP (the media is the publisher's).
    let extra =
        post(&http, plane.cp, "/v1/apps/LiveApp/streams", json!({"name": "stream1-b", "plays": "stream1"})).await;
    assert_eq!(extra["plays"], "stream1");
    let url = format!("rtmp://127.0.0.1:{}/LiveApp/stream1-b", w.rtmp);
    let played = tokio::task::spawn_blocking(move || ffmpeg_play(&url)).await.unwrap();
    assert!(played.status.success() && stderr(&played).contains("frame="), "{}", stderr(&played));
    let _ = ffmpeg.kill();
    let _ = ffmpeg.wait();
}

/// NOALBS (NOALBS/nginx-obs-automatic-low-bitrate-switching) switches scenes on `/stats`.
/// Its three SRT server types, transcribed from `src/stream_servers/openirl.rs`, `sls.rs` and
/// `belabox.rs`: the request (a GET of the configured stats URL, 200 required), where each
/// looks (`publisher`, or `publishers[<publisher>]`) and the struct it parses. Each must
/// parse Sluice's `/stats` while the publisher is live and find nothing once it is gone
/// (NOALBS's offline scene).
mod noalbs {
    use serde::Deserialize;
    use serde_json::Value;

    /// `openirl.rs` `Stat` (OpenIRL type; stats URL `/stats/<player>`).
    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    pub struct OpenIrlStat {
        pub bitrate: u32,
        pub buffer: u32,
        pub dropped_pkts: u64,
        #[serde(default)]
        pub latency: Option<u16>,
        #[serde(default)]
        pub rtt: Option<f64>,
        pub uptime: u64,
    }

    /// `sls.rs` `Stat` (SrtLiveServer type; stats URL `/stats/<player>?legacy=1`, publisher
    /// `live`).
    #[derive(Deserialize, Debug)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    pub struct SlsStat {
        pub bitrate: i64,
        pub bytes_rcv_drop: u64,
        pub bytes_rcv_loss: u64,
        pub mbps_bandwidth: f64,
        pub mbps_recv_rate: f64,
        pub ms_rcv_buf: i32,
        pub pkt_rcv_drop: i32,
        pub pkt_rcv_loss: i32,
        pub rtt: f64,
        pub uptime: i64,
    }

    /// `belabox.rs` `Stat` (Belabox type; stats URL `/stats/<player>?belabox=1`, publisher
    /// `live`).
    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    pub struct BelaboxStat {
        pub bitrate: i64,
        pub rtt: f64,
        pub dropped_pkts: i32,
    }

    /// `get_stats` of each type: `None` is NOALBS's offline.
    pub async fn get(url: &str) -> Option<Value> {
        let res = reqwest::get(url).await.ok()?;
        if res.status() != reqwest::StatusCode::OK {
            return None;
        }
        serde_json::from_str(&res.text().await.ok()?).ok()
    }

    pub async fn openirl(url: &str) -> Option<OpenIrlStat> {
        let data = get(url).await?;
        serde_json::from_value(data.get("publisher")?.to_owned()).ok()
    }

    pub async fn sls(url: &str, publisher: &str) -> Option<SlsStat> {
        let data = get(url).await?;
        serde_json::from_value(data["publishers"][publisher].to_owned()).ok()
    }

    pub async fn belabox(url: &str, publisher: &str) -> Option<BelaboxStat> {
        let data = get(url).await?;
        serde_json::from_value(data["publishers"][publisher].to_owned()).ok()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noalbs_reads_sluice_stats_as_each_of_its_srt_server_types() {
    let plane = Plane::start("noalbs").await;
    let http = plane.http.clone();
    let open = json!({"publish": {"methods": ["open"]}, "play": {"methods": ["open"]}});
    put_policy(&http, plane.cp, "live", &open).await;
    let sid = json!({"publisher": "publish_feed1", "player": "play_feed1"});
    assert_eq!(post(&http, plane.cp, "/api/stream-ids", sid).await["status"], "success");
    let w = media_worker(&plane, "w1", &[]);
    ready_at_head(&http, &plane.store, w.admin).await;
    let stats = format!("http://127.0.0.1:{}/stats/play_feed1", plane.cp);
    let (openirl, legacy, belabox) = (stats.clone(), format!("{stats}?legacy=1"), format!("{stats}?belabox=1"));
    // Registered, nothing live: every type sees it offline.
    assert!(noalbs::openirl(&openirl).await.is_none());
    assert!(noalbs::sls(&legacy, "live").await.is_none());
    assert!(noalbs::belabox(&belabox, "live").await.is_none());

    let publisher = srt_publisher(w.srt, "publish_feed1").await;
    until("every NOALBS type reads the live publisher", || async {
        noalbs::openirl(&openirl).await.is_some_and(|s| s.bitrate > 0 && s.uptime < 3600)
            && noalbs::sls(&legacy, "live").await.is_some_and(|s| s.bitrate > 0)
            && noalbs::belabox(&belabox, "live").await.is_some_and(|s| s.bitrate > 0)
    })
    .await;
    let s = noalbs::openirl(&openirl).await.unwrap();
    assert!(s.rtt.is_some() && s.latency.is_some(), "{s:?}");

    publisher.abort();
    until("every NOALBS type sees the publisher gone", || async {
        noalbs::openirl(&openirl).await.is_none()
            && noalbs::sls(&legacy, "live").await.is_none()
            && noalbs::belabox(&belabox, "live").await.is_none()
    })
    .await;
}
