//! Every access method over RTMP with real ffmpeg against the real worker, control plane,
//! Postgres and NATS: the right credential publishes and a player decodes frames, the wrong
//! one makes ffmpeg fail with the reason code in its output, and every decision is in the log
//! with that reason. Then the cluster cases: one one-time token raced on two workers is
//! admitted once, and killing the control plane mid-stream changes nothing for the media.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_control_plane::EventStore;
use sluice_tests::{Nats, Postgres, free_port};

mod cluster;
use cluster::*;

fn publisher(file: &str, url: &str) -> Command {
    let mut c = Command::new("ffmpeg");
    c.args(["-hide_banner", "-nostdin", "-re", "-i", file, "-c", "copy", "-f", "flv", url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// One method under test: URLs for the right and the wrong credential, publish and play.
#[derive(Debug, Clone)]
struct Case {
    app: String,
    publish: String,
    play: String,
    /// A wrong publish URL and the reason it must be refused with.
    wrong_publish: Option<(String, &'static str)>,
    wrong_play: Option<(String, &'static str)>,
}

/// Runs a case: the wrong credentials fail with their reason, the right publisher streams
/// and a player decodes frames, and the publisher runs to its end undisturbed.
fn run_case(file: &str, cp: u16, case: &Case) {
    let name = &case.app;
    if let Some((url, reason)) = &case.wrong_publish {
        let out = publisher(file, url).arg("-t").arg("1").output().unwrap();
        assert!(!out.status.success(), "{name}: the wrong publish credential streamed");
        assert!(stderr(&out).contains(reason), "{name}: no `{reason}` in ffmpeg's output: {}", stderr(&out));
    }
    let live = publisher(file, &case.publish).spawn().unwrap();
    wait_live(cp, &case.app, "cam");
    let out = ffmpeg_play(&case.play);
    assert!(
        out.status.success() && stderr(&out).contains("frame="),
        "{name}: the player got no frames: {}",
        stderr(&out)
    );
    if let Some((url, reason)) = &case.wrong_play {
        let out = ffmpeg_play(url);
        assert!(!out.status.success(), "{name}: the wrong play credential played");
        assert!(stderr(&out).contains(reason), "{name}: no `{reason}` in ffmpeg's output: {}", stderr(&out));
    }
    let ended = wait_bounded(live, Duration::from_secs(40)).expect("the publisher ran to its end");
    assert!(ended.status.success(), "{name}: the publisher was disturbed: {}", stderr(&ended));
}

async fn put(http: &reqwest::Client, port: u16, path: &str, body: Value) {
    let r = http.put(format!("http://127.0.0.1:{port}{path}")).bearer_auth(ADMIN).json(&body).send().await.unwrap();
    assert!(r.status().is_success(), "PUT {path}: {}", r.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_admits_the_right_credential_and_refuses_the_wrong_one_over_rtmp() {
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("methods").await.unwrap();
    let nats = Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let store = EventStore::start(sluice_control_plane::connect(&url).await.unwrap());
    let rtmp = free_port();
    let base = format!("rtmp://127.0.0.1:{rtmp}");
    let cp = free_port();
    let _cp =
        control_with(&url, &nats.url(), cp, "cp-1", &dir.path().join("cp.log"), &[("SLUICE_PUBLIC_RTMP_URL", &base)]);
    let file = tokio::task::spawn_blocking({
        let d = dir.path().to_owned();
        move || media_file(&d, "flv", 14)
    });
    let hook = webhook().await;
    let mut cases = Vec::new();
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

    // Open.
    app("open", json!({"publish": {"methods": ["open"]}, "play": {"methods": ["open"]}})).await;
    cases.push(Case {
        app: "open".into(),
        publish: format!("{base}/open/cam-key"),
        play: format!("{base}/open/cam"),
        wrong_publish: None,
        wrong_play: None,
    });
    // Registered streams only, and the publish name kept secret from players.
    let closed = json!({"publish": {"methods": ["open"], "accept_undefined_streams": false}, "play": {"methods": ["open"], "accept_undefined_streams": false}});
    app("registry", closed).await;
    cases.push(Case {
        app: "registry".into(),
        publish: format!("{base}/registry/cam-key"),
        play: format!("{base}/registry/cam"),
        wrong_publish: Some((format!("{base}/registry/cam"), "publish_name_required")),
        wrong_play: Some((format!("{base}/registry/elsewhere"), "stream_not_registered")),
    });
    // One-time tokens.
    app("once", both(json!(["one_time_token"]))).await;
    let token = |action: &str| {
        let http = http.clone();
        let action = action.to_owned();
        async move {
            post(&http, cp, "/v1/apps/once/streams/cam/tokens", json!({"action": action})).await["rtmp_url"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    cases.push(Case {
        app: "once".into(),
        publish: token("publish").await,
        play: token("play").await,
        wrong_publish: Some((format!("{base}/once/cam-key?token=not-a-token"), "token_not_found")),
        wrong_play: Some((token("publish").await.replace("cam-key", "cam"), "token_wrong_action")),
    });
    // Hash and HMAC: sha256(stream + role + secret), with an expiry for HMAC.
    for (name, expires) in [("hash", None), ("hmac", Some(600))] {
        app(name, both(json!([name]))).await;
        post(&http, cp, &format!("/v1/apps/{name}/secrets/hash"), json!({"secret": "a-hash-secret-of-16+"})).await;
        let mut urls = Vec::new();
        for action in ["publish", "play"] {
            let mut body = json!({"action": action});
            if let Some(e) = expires {
                body["expires_in"] = json!(e);
            }
            let r = post(&http, cp, &format!("/v1/apps/{name}/streams/cam/hash"), body).await;
            assert_eq!(r["method"], name);
            urls.push(r["rtmp_url"].as_str().unwrap().to_owned());
        }
        let reason = if name == "hash" { "hash_mismatch" } else { "hmac_mismatch" };
        cases.push(Case {
            app: name.into(),
            publish: urls[0].clone(),
            play: urls[1].clone(),
            wrong_publish: Some((tamper(&urls[0], "token="), reason)),
            wrong_play: Some((tamper(&urls[1], "token="), reason)),
        });
    }
    // JWT (HS256 under the app's secret).
    app("jwt", both(json!(["jwt"]))).await;
    post(&http, cp, "/v1/apps/jwt/secrets/jwt", json!({})).await;
    let mut jwts = Vec::new();
    for action in ["publish", "play"] {
        let r = post(&http, cp, "/v1/apps/jwt/streams/cam/jwt", json!({"action": action, "expires_in": 600})).await;
        jwts.push(r["rtmp_url"].as_str().unwrap().to_owned());
    }
    cases.push(Case {
        app: "jwt".into(),
        publish: jwts[0].clone(),
        play: jwts[1].clone(),
        // The signature is the token's last part.
        wrong_publish: Some((tamper(&jwts[0], &jwts[0][..jwts[0].rfind('.').unwrap() + 1]), "jwt_bad_signature")),
        wrong_play: Some((jwts[0].replace("cam-key", "cam"), "jwt_wrong_action")),
    });
    // TOTP: a subscriber's code (each code is accepted once).
    app("totp", json!({"publish": {"methods": ["totp"]}, "play": {"methods": ["open"]}, "totp": {"period_secs": 30, "digits": 6}}))
        .await;
    let r =
        post(&http, cp, "/v1/apps/totp/streams/cam/subscribers", json!({"id": "anchor", "action": "publish"})).await;
    let secret =
        base32::decode(base32::Alphabet::Rfc4648 { padding: false }, r["secret_b32"].as_str().unwrap()).unwrap();
    let code = sluice_events::decide::totp_code(&secret, 6, 30, now_secs() / 30).unwrap();
    let wrong = format!("{:06}", (code.parse::<u32>().unwrap() + 1) % 1_000_000);
    cases.push(Case {
        app: "totp".into(),
        publish: format!("{base}/totp/cam-key?subscriberId=anchor&subscriberCode={code}"),
        play: format!("{base}/totp/cam"),
        wrong_publish: Some((
            format!("{base}/totp/cam-key?subscriberId=anchor&subscriberCode={wrong}"),
            "totp_invalid",
        )),
        wrong_play: None,
    });
    // CIDR gates: loopback may, others may not.
    app("cidr", json!({"publish": {"methods": ["open"], "cidrs": ["127.0.0.0/8"]}, "play": {"methods": ["open"], "cidrs": ["127.0.0.0/8"]}}))
        .await;
    app("cidr-closed", json!({"publish": {"methods": ["open"], "cidrs": ["192.0.2.0/24"]}, "play": {"methods": ["open"], "cidrs": ["192.0.2.0/24"]}}))
        .await;
    cases.push(Case {
        app: "cidr".into(),
        publish: format!("{base}/cidr/cam-key"),
        play: format!("{base}/cidr/cam"),
        wrong_publish: Some((format!("{base}/cidr-closed/cam-key"), "cidr_denied")),
        wrong_play: Some((format!("{base}/cidr-closed/cam"), "cidr_denied")),
    });
    // Webhook.
    app("hook", both(json!(["open"]))).await;
    post(&http, cp, "/v1/apps/hook/secrets/webhook", json!({})).await;
    put(
        &http,
        cp,
        "/v1/apps/hook/policy",
        json!({"publish": {"methods": ["webhook"]}, "play": {"methods": ["webhook"]}, "webhook": {"url": format!("http://127.0.0.1:{hook}/hook"), "timeout_ms": 1000}}),
    )
    .await;
    cases.push(Case {
        app: "hook".into(),
        publish: format!("{base}/hook/cam-key?token=good"),
        play: format!("{base}/hook/cam?token=good"),
        wrong_publish: Some((format!("{base}/hook/cam-key?token=bad"), "webhook_denied")),
        wrong_play: Some((format!("{base}/hook/cam?token=bad"), "webhook_denied")),
    });
    // Any of two methods: a JWT or a hash admits; a credential for neither does not.
    app("anyof", both(json!(["jwt", "hash"]))).await;
    post(&http, cp, "/v1/apps/anyof/secrets/jwt", json!({})).await;
    post(&http, cp, "/v1/apps/anyof/secrets/hash", json!({"secret": "another-hash-secret-16"})).await;
    let jwt = post(&http, cp, "/v1/apps/anyof/streams/cam/jwt", json!({"action": "publish", "expires_in": 600})).await;
    let hash = post(&http, cp, "/v1/apps/anyof/streams/cam/hash", json!({"action": "play"})).await;
    let hash_url = hash["rtmp_url"].as_str().unwrap().to_owned();
    cases.push(Case {
        app: "anyof".into(),
        publish: jwt["rtmp_url"].as_str().unwrap().to_owned(),
        play: hash_url.clone(),
        wrong_publish: Some((format!("{base}/anyof/cam-key"), "credential_missing")),
        wrong_play: Some((tamper(&hash_url, "token="), "hash_mismatch")),
    });

    let admin = free_port();
    let w_log = dir.path().join("w1.log");
    let listen = format!("127.0.0.1:{rtmp}");
    // Wrong credentials are the point here: no penalty box for loopback in this test. Four
    // media threads: most players land on another thread than their publisher.
    let _w = worker_with(
        &nats.url(),
        admin,
        &dir.path().join("w1"),
        "w1",
        &w_log,
        &[("SLUICE_RTMP_LISTEN", &listen), ("SLUICE_FAILURE_BACKOFF_AFTER", "0"), ("SLUICE_RTMP_THREADS", "4")],
    );
    ready_at_head(&http, &store, admin).await;
    let file = file.await.unwrap();

    // Every case at once: each app has its own stream.
    let runs: Vec<_> = cases
        .iter()
        .cloned()
        .map(|case| {
            let file = file.clone();
            tokio::task::spawn_blocking(move || run_case(&file, cp, &case))
        })
        .collect();
    for r in runs {
        if let Err(e) = r.await {
            panic!("{e}\nworker log:\n{}", read(&w_log));
        }
    }

    // Players on another media thread than their publisher got a relayed copy (ten players,
    // four threads: all ten on their publisher's thread has odds of one in a million).
    assert!(read(&w_log).contains("RTMP stream relayed from another media thread"), "{}", read(&w_log));
    // When the publisher leaves, every player ends cleanly, whichever thread it is on.
    let live = publisher(&file, &format!("{base}/open/last")).args(["-t", "6"]).spawn().unwrap();
    until_live(&http, cp, "open", "last").await;
    let watchers: Vec<Child> = (0..6)
        .map(|_| {
            Command::new("ffmpeg")
                .args(["-hide_banner", "-nostdin", "-i", &format!("{base}/open/last"), "-f", "null", "-"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let published = tokio::task::spawn_blocking(move || wait_bounded(live, Duration::from_secs(30))).await.unwrap();
    assert!(published.is_some_and(|o| o.status.success()));
    for w in watchers {
        let out = tokio::task::spawn_blocking(move || wait_bounded(w, Duration::from_secs(15))).await.unwrap();
        let out = out.expect("a player still running 15 s after its publisher left");
        assert!(stderr(&out).contains("frame="), "{}", stderr(&out));
    }

    // Every attempt is in the log with the reason ffmpeg showed.
    let expected: Vec<(String, &str, bool, &str)> = cases
        .iter()
        .flat_map(|c| {
            let mut v = vec![(c.app.clone(), "publish", true, "allowed"), (c.app.clone(), "play", true, "allowed")];
            if let Some((_, r)) = &c.wrong_publish {
                v.push((c.app.clone(), "publish", false, *r));
            }
            if let Some((_, r)) = &c.wrong_play {
                v.push((c.app.clone(), "play", false, *r));
            }
            v
        })
        .map(|(app, action, allowed, reason)| {
            // A wrong URL aimed at another app is recorded under that app.
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_raced_on_two_workers_publishes_once_and_the_media_outlives_the_control_plane() {
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("race").await.unwrap();
    let nats = Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let store = EventStore::start(sluice_control_plane::connect(&url).await.unwrap());
    let cp = free_port();
    let cp_log = dir.path().join("cp.log");
    let mut control_plane = control(&url, &nats.url(), cp, "cp-1", &cp_log);
    let file = tokio::task::spawn_blocking({
        let d = dir.path().to_owned();
        move || media_file(&d, "flv", 14)
    });
    let policy = json!({"publish": {"methods": ["one_time_token"]}, "play": {"methods": ["open"]}});
    post(&http, cp, "/v1/apps", json!({"name": "race", "policy": policy})).await;
    post(&http, cp, "/v1/apps/race/streams", json!({"name": "cam"})).await;
    let token = post(&http, cp, "/v1/apps/race/streams/cam/tokens", json!({"action": "publish"})).await;
    let token = token["token"].as_str().unwrap().to_owned();
    let mut workers = Vec::new();
    for node in ["w1", "w2"] {
        let (admin, rtmp) = (free_port(), free_port());
        let listen = format!("127.0.0.1:{rtmp}");
        let log = dir.path().join(format!("{node}.log"));
        let running =
            worker_with(&nats.url(), admin, &dir.path().join(node), node, &log, &[("SLUICE_RTMP_LISTEN", &listen)]);
        workers.push((node, admin, rtmp, running));
    }
    let head = store.head().await.unwrap().0;
    for (_, admin, ..) in &workers {
        ready_at(&http, *admin, head).await;
    }
    let file = file.await.unwrap();

    // The same token on both workers at once: one streams, the other is refused: by the
    // stream's cluster-wide publisher slot (`stream_busy`), or, had the winner already left, by
    // the token's cluster-wide claim (`token_consumed`). Either way the token is never spent
    // twice.
    let urls: Vec<String> =
        workers.iter().map(|(_, _, rtmp, _)| format!("rtmp://127.0.0.1:{rtmp}/race/cam?token={token}")).collect();
    let mut racers: Vec<Child> = urls.iter().map(|u| publisher(&file, u).spawn().unwrap()).collect();
    let started = Instant::now();
    let loser = loop {
        assert!(started.elapsed() < Duration::from_secs(20), "neither racer was refused");
        if let Some(i) = (0..2).find(|i| racers[*i].try_wait().unwrap().is_some()) {
            break i;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let winner = 1 - loser;
    let lost = racers.remove(loser).wait_with_output().unwrap();
    assert!(!lost.status.success());
    assert!(stderr(&lost).contains("stream_busy") || stderr(&lost).contains("token_consumed"), "{}", stderr(&lost));
    let live = racers.pop().unwrap();
    let (node, _, rtmp, _) = &workers[winner];
    let node = *node;
    let rtmp = *rtmp;

    // The control plane dies (SIGKILL) mid-stream: the publisher goes on, a new player is
    // admitted and decodes frames, a wrong token is still refused.
    control_plane.0.kill().unwrap();
    control_plane.0.wait().unwrap();
    let out =
        tokio::task::spawn_blocking(move || ffmpeg_play(&format!("rtmp://127.0.0.1:{rtmp}/race/cam"))).await.unwrap();
    assert!(out.status.success() && stderr(&out).contains("frame="), "{}", stderr(&out));
    let wrong = tokio::task::spawn_blocking({
        let file = file.clone();
        move || publisher(&file, &format!("rtmp://127.0.0.1:{rtmp}/race/other?token=guess")).output().unwrap()
    })
    .await
    .unwrap();
    assert!(stderr(&wrong).contains("token_not_found"), "{}", stderr(&wrong));
    let ended = tokio::task::spawn_blocking(move || wait_bounded(live, Duration::from_secs(40))).await.unwrap();
    let ended = ended.expect("the winner ran to its end");
    assert!(ended.status.success(), "the winner was disturbed: {}", stderr(&ended));

    // Back up, the control plane takes in what both workers decided meanwhile: the token was
    // admitted once, refused once.
    drop(control_plane);
    let _control_plane = control(&url, &nats.url(), cp, "cp-1", &cp_log);
    let loser_node = workers[loser].0;
    until("both workers' decisions are in the log", || async {
        let won = recorded(&store, node).await;
        let lost = recorded(&store, loser_node).await;
        won.iter().filter(|d| d.1 == "publish").count() >= 2 && !lost.is_empty()
    })
    .await;
    let won = recorded(&store, node).await;
    let lost = recorded(&store, loser_node).await;
    let publishes: Vec<_> = won.iter().chain(&lost).filter(|d| d.0 == "race" && d.1 == "publish").collect();
    let admitted = publishes.iter().filter(|d| d.2).count();
    assert_eq!(admitted, 1, "{publishes:?}");
    assert!(lost.iter().any(|d| !d.2 && (d.3 == "stream_busy" || d.3 == "token_consumed")), "{lost:?}");
    assert!(won.iter().any(|d| !d.2 && d.3 == "token_not_found"), "{won:?}");
    assert!(won.iter().any(|d| d.1 == "play" && d.2), "{won:?}");
}
