//! Every access method over SRT with real ffmpeg against the real worker, control plane,
//! Postgres and NATS: the credential rides in the streamid (`#!::r=app/stream,m=…,t=…`, as
//! the API's `srt_streamid` gives it); the right one publishes and a player decodes frames,
//! the wrong one is rejected during the handshake with the documented code, and every
//! decision is in the log with its reason. Then the control plane is killed mid-stream: the
//! publisher goes on, new callers are still decided, and the log gets their decisions after.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use sluice_control_plane::EventStore;
use sluice_tests::{Nats, Postgres, free_port};

mod cluster;
use cluster::*;

fn publisher(file: &str, port: u16, streamid: &str) -> Command {
    let mut c = Command::new("ffmpeg");
    let url = format!("{}&pkt_size=1316", srt_url(port, streamid));
    c.args(["-hide_banner", "-nostdin", "-re", "-i", file, "-c", "copy", "-f", "mpegts", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// One method: streamids for the right and the wrong credential, publish and play.
#[derive(Debug, Clone)]
struct Case {
    app: String,
    publish: String,
    play: String,
    /// A wrong streamid, the reason it is refused with, and the reject code.
    wrong_publish: Option<(String, &'static str, i32)>,
    wrong_play: Option<(String, &'static str, i32)>,
}

async fn run_case(file: String, port: u16, cp: u16, case: Case) {
    let name = &case.app;
    if let Some((sid, _, code)) = &case.wrong_publish {
        assert_eq!(reject_code(port, sid).await, *code, "{name}: {sid}");
    }
    let live = publisher(&file, port, &case.publish).spawn().unwrap();
    until_live(&reqwest::Client::new(), cp, &case.app, "cam").await;
    let url = srt_url(port, &case.play);
    let out = tokio::task::spawn_blocking(move || ffmpeg_play(&url)).await.unwrap();
    assert!(out.status.success() && stderr(&out).contains("frame="), "{name}: no frames: {}", stderr(&out));
    if let Some((sid, _, code)) = &case.wrong_play {
        assert_eq!(reject_code(port, sid).await, *code, "{name}: {sid}");
    }
    let ended = tokio::task::spawn_blocking(move || wait_bounded(live, Duration::from_secs(40))).await.unwrap();
    let ended = ended.expect("the publisher ran to its end");
    assert!(ended.status.success(), "{name}: the publisher was disturbed: {}", stderr(&ended));
}

fn sid(v: &Value) -> String {
    v["srt_streamid"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_over_srt_and_the_media_outlives_the_control_plane() {
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("srt_methods").await.unwrap();
    let nats = Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let store = EventStore::start(sluice_control_plane::connect(&url).await.unwrap());
    let cp = free_port();
    let cp_log = dir.path().join("cp.log");
    let mut control_plane = control(&url, &nats.url(), cp, "cp-1", &cp_log);
    let file = tokio::task::spawn_blocking({
        let d = dir.path().to_owned();
        move || media_file(&d, "mpegts", 12)
    });
    let hook = webhook().await;
    let app = |name: &str, policy: Value| {
        let http = http.clone();
        let name = name.to_owned();
        async move {
            post(&http, cp, "/v1/apps", json!({"name": name, "policy": policy})).await;
            post(&http, cp, &format!("/v1/apps/{name}/streams"), json!({"name": "cam", "publish_name": "cam-key"}))
                .await;
        }
    };
    let both = |m: Value| json!({"publish": {"methods": m.clone()}, "play": {"methods": m}});
    let mut cases = Vec::new();
    let plain = |app: &str| Case {
        app: app.into(),
        publish: format!("#!::r={app}/cam-key,m=publish"),
        play: format!("#!::r={app}/cam,m=request"),
        wrong_publish: None,
        wrong_play: None,
    };

    app("open", both(json!(["open"]))).await;
    cases.push(plain("open"));
    let closed = json!({"publish": {"methods": ["open"], "accept_undefined_streams": false}, "play": {"methods": ["open"], "accept_undefined_streams": false}});
    app("registry", closed).await;
    cases.push(Case {
        wrong_publish: Some(("#!::r=registry/cam,m=publish".into(), "publish_name_required", 1403)),
        wrong_play: Some(("#!::r=registry/elsewhere,m=request".into(), "stream_not_registered", 1404)),
        ..plain("registry")
    });
    app("once", both(json!(["one_time_token"]))).await;
    let token = |action: &str| {
        let http = http.clone();
        let body = json!({"action": action});
        async move { sid(&post(&http, cp, "/v1/apps/once/streams/cam/tokens", body).await) }
    };
    let spare_publish = token("publish").await;
    cases.push(Case {
        app: "once".into(),
        publish: token("publish").await,
        play: token("play").await,
        wrong_publish: Some(("#!::r=once/cam-key,m=publish,t=not-a-token".into(), "token_not_found", 1403)),
        wrong_play: Some((
            spare_publish.replace("cam-key", "cam").replace("m=publish", "m=request"),
            "token_wrong_action",
            1403,
        )),
    });
    for (name, expires) in [("hash", None), ("hmac", Some(600))] {
        app(name, both(json!([name]))).await;
        post(&http, cp, &format!("/v1/apps/{name}/secrets/hash"), json!({"secret": "a-hash-secret-of-16+"})).await;
        let mut sids = Vec::new();
        for action in ["publish", "play"] {
            let mut body = json!({"action": action});
            if let Some(e) = expires {
                body["expires_in"] = json!(e);
            }
            sids.push(sid(&post(&http, cp, &format!("/v1/apps/{name}/streams/cam/hash"), body).await));
        }
        let reason = if name == "hash" { "hash_mismatch" } else { "hmac_mismatch" };
        cases.push(Case {
            app: name.into(),
            publish: sids[0].clone(),
            play: sids[1].clone(),
            wrong_publish: Some((tamper(&sids[0], ",t="), reason, 1403)),
            wrong_play: Some((tamper(&sids[1], ",t="), reason, 1403)),
        });
    }
    app("jwt", both(json!(["jwt"]))).await;
    post(&http, cp, "/v1/apps/jwt/secrets/jwt", json!({})).await;
    let mut jwts = Vec::new();
    for action in ["publish", "play"] {
        let body = json!({"action": action, "expires_in": 600});
        jwts.push(sid(&post(&http, cp, "/v1/apps/jwt/streams/cam/jwt", body).await));
    }
    cases.push(Case {
        app: "jwt".into(),
        publish: jwts[0].clone(),
        play: jwts[1].clone(),
        // The signature is the token's last part.
        wrong_publish: Some((tamper(&jwts[0], &jwts[0][..jwts[0].rfind('.').unwrap() + 1]), "jwt_bad_signature", 1403)),
        wrong_play: Some((
            jwts[0].replace("cam-key", "cam").replace("m=publish", "m=request"),
            "jwt_wrong_action",
            1403,
        )),
    });
    app("totp", json!({"publish": {"methods": ["totp"]}, "play": {"methods": ["open"]}, "totp": {"period_secs": 30, "digits": 6}}))
        .await;
    let r =
        post(&http, cp, "/v1/apps/totp/streams/cam/subscribers", json!({"id": "anchor", "action": "publish"})).await;
    let secret =
        base32::decode(base32::Alphabet::Rfc4648 { padding: false }, r["secret_b32"].as_str().unwrap()).unwrap();
    let code = sluice_events::decide::totp_code(&secret, 6, 30, now_secs() / 30).unwrap();
    let wrong = format!("{:06}", (code.parse::<u32>().unwrap() + 1) % 1_000_000);
    cases.push(Case {
        publish: format!("#!::r=totp/cam-key,m=publish,u=anchor,s={code}"),
        wrong_publish: Some((format!("#!::r=totp/cam-key,m=publish,u=anchor,s={wrong}"), "totp_invalid", 1403)),
        ..plain("totp")
    });
    let cidr =
        |c: &str| json!({"publish": {"methods": ["open"], "cidrs": [c]}, "play": {"methods": ["open"], "cidrs": [c]}});
    app("cidr", cidr("127.0.0.0/8")).await;
    app("cidr-closed", cidr("192.0.2.0/24")).await;
    cases.push(Case {
        wrong_publish: Some(("#!::r=cidr-closed/cam-key,m=publish".into(), "cidr_denied", 1403)),
        wrong_play: Some(("#!::r=cidr-closed/cam,m=request".into(), "cidr_denied", 1403)),
        ..plain("cidr")
    });
    app("hook", both(json!(["open"]))).await;
    post(&http, cp, "/v1/apps/hook/secrets/webhook", json!({})).await;
    let hooked = json!({"publish": {"methods": ["webhook"]}, "play": {"methods": ["webhook"]}, "webhook": {"url": format!("http://127.0.0.1:{hook}/hook"), "timeout_ms": 1000}});
    put_policy(&http, cp, "hook", &hooked).await;
    cases.push(Case {
        app: "hook".into(),
        publish: "#!::r=hook/cam-key,m=publish,t=good".into(),
        play: "#!::r=hook/cam,m=request,t=good".into(),
        wrong_publish: Some(("#!::r=hook/cam-key,m=publish,t=bad".into(), "webhook_denied", 1403)),
        wrong_play: Some(("#!::r=hook/cam,m=request,t=bad".into(), "webhook_denied", 1403)),
    });
    app("anyof", both(json!(["jwt", "hash"]))).await;
    post(&http, cp, "/v1/apps/anyof/secrets/jwt", json!({})).await;
    post(&http, cp, "/v1/apps/anyof/secrets/hash", json!({"secret": "another-hash-secret-16"})).await;
    let jwt = post(&http, cp, "/v1/apps/anyof/streams/cam/jwt", json!({"action": "publish", "expires_in": 600})).await;
    let hash = sid(&post(&http, cp, "/v1/apps/anyof/streams/cam/hash", json!({"action": "play"})).await);
    cases.push(Case {
        app: "anyof".into(),
        publish: sid(&jwt),
        play: hash.clone(),
        wrong_publish: Some(("#!::r=anyof/cam-key,m=publish".into(), "credential_missing", 1403)),
        wrong_play: Some((tamper(&hash, ",t="), "hash_mismatch", 1403)),
    });

    let (admin, srt) = (free_port(), free_port());
    let w_log = dir.path().join("w1.log");
    let listen = format!("127.0.0.1:{srt}");
    // Wrong credentials are the point here: no penalty box for loopback in this test.
    let _w = worker_with(
        &nats.url(),
        admin,
        &dir.path().join("w1"),
        "w1",
        &w_log,
        &[("SLUICE_SRT_LISTEN", &listen), ("SLUICE_FAILURE_BACKOFF_AFTER", "0")],
    );
    ready_at_head(&http, &store, admin).await;
    let file = file.await.unwrap();

    // Every case at once: each app has its own stream.
    let runs: Vec<_> = cases.iter().cloned().map(|case| tokio::spawn(run_case(file.clone(), srt, cp, case))).collect();
    for r in runs {
        if let Err(e) = r.await {
            panic!("{e}\nworker log:\n{}", read(&w_log));
        }
    }
    let expected: Vec<(String, &str, bool, &str)> = cases
        .iter()
        .flat_map(|c| {
            let mut v = vec![(c.app.clone(), "publish", true, "allowed"), (c.app.clone(), "play", true, "allowed")];
            if let Some((_, r, _)) = &c.wrong_publish {
                v.push((c.app.clone(), "publish", false, *r));
            }
            if let Some((_, r, _)) = &c.wrong_play {
                v.push((c.app.clone(), "play", false, *r));
            }
            v
        })
        .map(|(app, action, allowed, reason)| {
            // A wrong streamid aimed at another app is recorded under that app.
            let app = if app == "cidr" && !allowed { "cidr-closed".to_owned() } else { app };
            (app, action, allowed, reason)
        })
        .collect();
    until("every decision is in the log", || async { recorded(&store, "w1").await.len() >= expected.len() }).await;
    let log = recorded(&store, "w1").await;
    for (app, action, allowed, reason) in &expected {
        assert!(
            log.iter().any(|(a, ac, al, r)| a == app && ac == action && al == allowed && r == reason),
            "{app} {action} {allowed} {reason} not in {log:?}"
        );
    }

    // The control plane dies (SIGKILL) mid-stream: the publisher goes on, a new player is
    // admitted and decodes, a wrong token is still refused, a valid one-time token is
    // admitted from the worker's own state.
    let live = publisher(&file, srt, "#!::r=open/after,m=publish").spawn().unwrap();
    let token = token("publish").await;
    until("the publish is in the log", || async { recorded(&store, "w1").await.len() > expected.len() }).await;
    let before = recorded(&store, "w1").await.len();
    control_plane.0.kill().unwrap();
    control_plane.0.wait().unwrap();
    let play = srt_url(srt, "#!::r=open/after,m=request");
    let out = tokio::task::spawn_blocking(move || ffmpeg_play(&play)).await.unwrap();
    assert!(out.status.success() && stderr(&out).contains("frame="), "{}", stderr(&out));
    assert_eq!(reject_code(srt, "#!::r=once/cam-key,m=publish,t=guess").await, 1403);
    assert_eq!(reject_code(srt, &token).await, 0, "a one-time token issued before the outage");
    // Once the first has gone (its stream is busy until the worker sees it close): refused.
    let mut again = reject_code(srt, &token).await;
    for _ in 0..50 {
        if again != 1409 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        again = reject_code(srt, &token).await;
    }
    assert_eq!(again, 1403, "and only once");
    let ended = tokio::task::spawn_blocking(move || wait_bounded(live, Duration::from_secs(40))).await.unwrap();
    let ended = ended.expect("the publisher ran to its end");
    assert!(ended.status.success(), "the publisher was disturbed: {}", stderr(&ended));

    // Back up, the control plane takes in what the worker decided meanwhile.
    drop(control_plane);
    let _control_plane = control(&url, &nats.url(), cp, "cp-1", &cp_log);
    until("the outage's four decisions are in the log", || async { recorded(&store, "w1").await.len() >= before + 4 })
        .await;
    let log = recorded(&store, "w1").await;
    let outage = &log[before..];
    assert!(outage.iter().any(|d| d.0 == "open" && d.1 == "play" && d.2), "{outage:?}");
    assert!(outage.iter().any(|d| d.0 == "once" && !d.2 && d.3 == "token_not_found"), "{outage:?}");
    assert!(outage.iter().any(|d| d.0 == "once" && d.2), "{outage:?}");
    assert!(outage.iter().any(|d| d.0 == "once" && !d.2 && d.3 == "token_consumed"), "{outage:?}");
}
