//! The console (`/console`) in a real browser: Debian's Chromium, headless, driven over
//! WebDriver (chromedriver) against a real control plane and worker, with real ffmpeg
//! publishing and playing. And the console's session at the HTTP boundary: the cookie's
//! attributes, CSRF, tampered and missing sessions, bad sign-in bodies, the page's policy.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use sluice_tests::{Running, free_port, wait_for_port};

mod cluster;
use cluster::*;

/// Where the test writes its screenshots: `target/tmp/console/`.
fn shots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// chromedriver on a free port, and a headless Chromium session through it.
async fn browser() -> (Running, Client) {
    let port = free_port();
    let driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (ops/lib.sh ensure_browser installs chromium-driver)");
    let driver = Running(driver);
    assert!(wait_for_port(port, WAIT), "chromedriver did not listen");
    let caps = json!({"goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--window-size=1280,1000", "--no-first-run", "--disable-extensions",
    ]}});
    let Value::Object(caps) = caps else { unreachable!() };
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session");
    (driver, client)
}

/// Waits for `css` and answers its text, retrying while the page re-renders it.
async fn text(c: &Client, css: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(el) = c.find(Locator::Css(css)).await
            && let Ok(t) = el.text().await
        {
            return t;
        }
        assert!(Instant::now() < deadline, "no element {css}: {}", c.source().await.unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `css` is on the page.
async fn present(c: &Client, css: &str) {
    let _ = text(c, css).await;
}

/// Clicks `css` once it is there (again if the page replaced it meanwhile).
async fn click(c: &Client, css: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(el) = c.find(Locator::Css(css)).await
            && el.click().await.is_ok()
        {
            return;
        }
        assert!(Instant::now() < deadline, "cannot click {css}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn fill(c: &Client, css: &str, value: &str) {
    let el = c.wait().at_most(WAIT).for_element(Locator::Css(css)).await.unwrap();
    el.clear().await.unwrap();
    el.send_keys(value).await.unwrap();
}

async fn count(c: &Client, css: &str) -> usize {
    c.find_all(Locator::Css(css)).await.map(|v| v.len()).unwrap_or(0)
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(shots().join(format!("{name}.png")), png).unwrap();
}

async fn until_browser<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A `fetch` from the page, as the console's script would make it: the status.
async fn page_fetch(c: &Client, method: &str, path: &str, body: Value, with_csrf: bool) -> u64 {
    let script = r"
        const [method, path, body, withCsrf, done] = arguments;
        const headers = {'Content-Type': 'application/json'};
        if (withCsrf) headers['X-CSRF-Token'] = S.csrf;
        const init = {method, headers, credentials: 'same-origin'};
        if (method !== 'GET') init.body = JSON.stringify(body);
        fetch(path, init)
            .then((r) => done(r.status), () => done(0));";
    let args = vec![json!(method), json!(path), body, json!(with_csrf)];
    c.execute_async(script, args).await.unwrap().as_u64().unwrap()
}

/// A control plane whose public media URLs are the worker's, and that worker.
async fn plane_with_worker(db: &str) -> (Plane, MediaWorker) {
    let pg = sluice_tests::Postgres::start().unwrap();
    let url = pg.create_database(db).await.unwrap();
    let nats = sluice_tests::Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = sluice_control_plane::EventStore::start(sluice_control_plane::connect(&url).await.unwrap());
    let (cp, rtmp, srt) = (free_port(), free_port(), free_port());
    let (public_rtmp, public_srt) = (format!("rtmp://127.0.0.1:{rtmp}"), format!("srt://127.0.0.1:{srt}"));
    let settings = [("SLUICE_PUBLIC_RTMP_URL", public_rtmp.as_str()), ("SLUICE_PUBLIC_SRT_URL", public_srt.as_str())];
    let control = control_with(&url, &nats.url(), cp, "cp-1", &dir.path().join("cp.log"), &settings);
    let plane = Plane { pg, url, nats, dir, http: reqwest::Client::new(), store, cp, control };
    let admin = free_port();
    let log = plane.dir.path().join("w1.log");
    let (rtmp_listen, srt_listen) = (format!("127.0.0.1:{rtmp}"), format!("127.0.0.1:{srt}"));
    let extra = [("SLUICE_RTMP_LISTEN", rtmp_listen.as_str()), ("SLUICE_SRT_LISTEN", srt_listen.as_str())];
    let process = worker_with(&plane.nats.url(), admin, &plane.dir.path().join("w1"), "w1", &log, &extra);
    (plane, MediaWorker { admin, rtmp, srt, log, process })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_a_stream_from_the_console_in_a_real_browser() {
    let (plane, worker) = plane_with_worker("console").await;
    let (http, cp) = (plane.http.clone(), plane.cp);
    ready_at_head(&http, &plane.store, worker.admin).await;
    let (_driver, c) = browser().await;
    let base = format!("http://127.0.0.1:{cp}");

    // Sign in with the admin key: the overview shows the worker.
    c.goto(&format!("{base}/console")).await.unwrap();
    fill(&c, "#signin-key", ADMIN).await;
    shot(&c, "signin").await;
    click(&c, "#signin-submit").await;
    present(&c, "#fig-head").await;
    until_browser("the worker on the overview", || async { text(&c, "#fig-workers").await == "1" }).await;
    // The key is in no URL and none of the page's storage; the cookie is out of the script's reach.
    let storage =
        c.execute("return [localStorage.length, sessionStorage.length, document.cookie]", vec![]).await.unwrap();
    assert_eq!(storage, json!([0, 0, ""]), "the session is an HttpOnly cookie only");
    assert!(!c.current_url().await.unwrap().as_str().contains(ADMIN));

    // Create an app and give it one-time tokens for publishing.
    c.goto(&format!("{base}/console#/apps")).await.unwrap();
    fill(&c, "#new-app-name", "studio").await;
    click(&c, "#new-app button[type=submit]").await;
    present(&c, "#policy-save").await;
    click(&c, "[data-method=publish-open]").await;
    click(&c, "[data-method=publish-one_time_token]").await;
    shot(&c, "app").await;
    click(&c, "#policy-save").await;
    until("the policy saved through the console", || async {
        let (_, app) = get(&http, format!("http://127.0.0.1:{cp}/v1/apps/studio")).await;
        app["policy"]["publish"]["methods"] == json!(["one_time_token"])
    })
    .await;

    // Register a stream and issue a publish token: the console shows the URLs.
    c.goto(&format!("{base}/console#/streams?app=studio")).await.unwrap();
    fill(&c, "#new-stream-name", "cam").await;
    click(&c, "#new-stream button[type=submit]").await;
    present(&c, "#issue-token").await;
    ready_at_head(&http, &plane.store, worker.admin).await;
    click(&c, "#issue-token button[type=submit]").await;
    let rtmp_url = text(&c, "#rtmp-url").await;
    assert!(rtmp_url.starts_with(&format!("rtmp://127.0.0.1:{}/studio/cam?token=", worker.rtmp)), "{rtmp_url}");
    let obs = (text(&c, "#obs-server").await, text(&c, "#obs-key").await);
    assert_eq!(obs.0, format!("rtmp://127.0.0.1:{}/studio", worker.rtmp));
    assert!(obs.1.starts_with("cam?token="), "{obs:?}");
    let srt = text(&c, "#srt-url-vlc").await;
    assert!(srt.starts_with(&format!("srt://127.0.0.1:{}?streamid=%23!%3A%3Ar%3Dstudio%2Fcam", worker.srt)), "{srt}");
    shot(&c, "stream").await;

    // Publish with the URL the console showed; the overview shows it live.
    ready_at_head(&http, &plane.store, worker.admin).await;
    let mut publisher = ffmpeg_testsrc("flv", &rtmp_url, 120).spawn().unwrap();
    c.goto(&format!("{base}/console#/overview")).await.unwrap();
    present(&c, "tr[data-stream='studio/cam']").await;
    assert_eq!(text(&c, "tr[data-stream='studio/cam'] td.publisher").await, "127.0.0.1", "the publisher's address");
    // README shows this one: taken once the notices have faded (a few seconds).
    until_browser("the notices gone", || async { count(&c, "#toast div").await == 0 }).await;
    shot(&c, "overview").await;
    // Readable on a phone's width: nothing wider than the screen but the tables' own scroll.
    c.set_window_size(390, 844).await.unwrap();
    let overflow = c.execute("return document.documentElement.scrollWidth - window.innerWidth", vec![]).await.unwrap();
    assert!(overflow.as_i64().unwrap() <= 0, "the page scrolls sideways on a narrow screen: {overflow}");
    shot(&c, "overview-narrow").await;
    c.set_window_size(1280, 1000).await.unwrap();

    // The decisions page: the tail shows a play as it happens; its explanation replays it.
    c.goto(&format!("{base}/console#/decisions")).await.unwrap();
    present(&c, "#decision-filters").await;
    click(&c, "#tail").await;
    until_browser("the tail is open", || async { text(&c, "#tail-status").await.contains("following") }).await;
    let before = count(&c, "#decision-rows tr").await;
    let player = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-rw_timeout", "20000000", "-i"])
        .arg(format!("rtmp://127.0.0.1:{}/studio/cam", worker.rtmp))
        .args(["-f", "null", "-"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    until_browser("the play decision in the tail", || async {
        count(&c, "#decision-rows tr").await > before
            && text(&c, "#decision-rows tr:first-child").await.contains("play")
    })
    .await;
    shot(&c, "decisions").await;
    click(&c, "#decision-rows tr:first-child button[data-explain]").await;
    let matches = text(&c, "#explain-matches").await;
    assert!(matches.starts_with("matches"), "{matches}");
    assert!(!text(&c, "#explain-rule").await.is_empty());
    shot(&c, "explain").await;

    // Live sessions: kick the players; ffmpeg's player ends, the publisher goes on.
    c.goto(&format!("{base}/console#/sessions")).await.unwrap();
    present(&c, "button[data-kick='studio/cam/play']").await;
    until_browser("the player counted", || async {
        let (_, s) = get(&http, format!("http://127.0.0.1:{cp}/v1/stats/streams/studio/cam")).await;
        s["players"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    shot(&c, "sessions").await;
    click(&c, "button[data-kick='studio/cam/play']").await;
    let ended = wait_bounded(player, WAIT);
    assert!(ended.is_some(), "the kicked player did not end");
    assert!(publisher.try_wait().unwrap().is_none(), "the publisher was kicked too");

    // A write from the page without the CSRF token is refused, and changes nothing.
    assert_eq!(page_fetch(&c, "POST", "/v1/apps", json!({"name": "nocsrf"}), false).await, 403);
    let (code, _) = get(&http, format!("http://127.0.0.1:{cp}/v1/apps/nocsrf")).await;
    assert_eq!(code, 404);

    // Keys: create a read key, shown once.
    c.goto(&format!("{base}/console#/keys")).await.unwrap();
    fill(&c, "#new-key-name", "viewer").await;
    c.find(Locator::Css("#new-key-role")).await.unwrap().select_by_value("read").await.unwrap();
    click(&c, "#new-key button[type=submit]").await;
    let read_key = text(&c, "#key-secret").await;
    assert!(read_key.len() > 20, "{read_key}");
    shot(&c, "keys").await;

    // Edit the stream: its description saved through the console.
    c.goto(&format!("{base}/console#/stream?app=studio&name=cam")).await.unwrap();
    fill(&c, "#edit-description", "Main camera").await;
    click(&c, "#edit-stream button[type=submit]").await;
    until("the description saved", || async {
        let (_, s) = get(&http, format!("http://127.0.0.1:{cp}/v1/apps/studio/streams/cam")).await;
        s["description"] == "Main camera"
    })
    .await;

    // Subscribers: one added with its QR code.
    c.goto(&format!("{base}/console#/subscribers?app=studio&stream=cam")).await.unwrap();
    fill(&c, "#new-subscriber-id", "alice").await;
    click(&c, "#new-subscriber button[type=submit]").await;
    assert!(text(&c, "#subscriber-uri").await.starts_with("otpauth://totp/"));
    present(&c, "#subscriber-qr").await;
    let drawn = c
        .execute("return document.getElementById('subscriber-qr').naturalWidth", vec![])
        .await
        .unwrap()
        .as_u64()
        .unwrap_or(0);
    assert!(drawn >= 200, "the QR code did not load ({drawn} px)");
    shot(&c, "subscribers").await;

    // Sign out; sign in with the read key: no write controls, and a forged write is refused.
    click(&c, "#signout").await;
    present(&c, "#signin-key").await;
    assert_eq!(page_fetch(&c, "GET", "/console/session", json!(null), false).await, 401, "signed out");
    fill(&c, "#signin-key", &read_key).await;
    click(&c, "#signin-submit").await;
    until_browser("signed in with the read key", || async { text(&c, "#who").await.ends_with("(read)") }).await;
    c.goto(&format!("{base}/console#/apps")).await.unwrap();
    present(&c, "a[href='#/app?name=studio']").await;
    assert_eq!(count(&c, "#new-app").await, 0, "a read key sees no create form");
    c.goto(&format!("{base}/console#/app?name=studio")).await.unwrap();
    present(&c, "#policy").await;
    assert_eq!(count(&c, "#policy-save").await, 0);
    assert_eq!(count(&c, "button[data-rotate]").await, 0);
    assert_eq!(count(&c, "li[data-role=admin]:not([hidden])").await, 0, "the Keys page is hidden");
    c.goto(&format!("{base}/console#/stream?app=studio&name=cam")).await.unwrap();
    present(&c, "h1").await;
    until_browser("the stream page", || async { text(&c, "h1").await.contains("studio/cam") }).await;
    assert_eq!(count(&c, "#issue-token").await, 0);
    assert_eq!(count(&c, "button[data-kick]").await, 0);
    shot(&c, "read-only").await;
    assert_eq!(page_fetch(&c, "POST", "/v1/apps", json!({"name": "forged"}), true).await, 403);
    assert_eq!(page_fetch(&c, "DELETE", "/v1/apps/studio", json!({}), true).await, 403);
    let (code, _) = get(&http, format!("http://127.0.0.1:{cp}/v1/apps/studio")).await;
    assert_eq!(code, 200, "the app is still there");

    c.close().await.unwrap();
    let _ = publisher.kill();
    let _ = publisher.wait();
}

/// The session at the HTTP boundary, without a browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_session_is_a_sealed_http_only_cookie_and_writes_need_its_csrf_token() {
    let plane = Plane::start("console_session").await;
    let (http, cp) = (reqwest::Client::new(), plane.cp);
    let base = format!("http://127.0.0.1:{cp}");
    let writer = post(&http, cp, "/v1/keys", json!({"name": "ops", "role": "write"})).await;
    let writer = writer["secret"].as_str().unwrap().to_owned();

    // The page: a strict policy, no inline script.
    let page = http.get(format!("{base}/console")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(html.contains("<script src=\"/console/app.js\" defer></script>") && !html.contains("<script>"));
    for asset in ["/console/app.js", "/console/app.css"] {
        assert_eq!(http.get(format!("{base}{asset}")).send().await.unwrap().status(), 200, "{asset}");
    }

    // Bad sign-ins: clear errors, no cookie.
    let sign_in = |body: String, content_type: &'static str| {
        http.post(format!("{base}/console/session")).header("content-type", content_type).body(body).send()
    };
    for (body, status) in [
        ("{\"key\": ", 400),
        ("{\"key\": 5}", 400),
        ("{\"key\": \"x\", \"remember\": true}", 400),
        ("{}", 400),
        ("{\"key\": \"sk_not_a_key_at_all_0123456789\"}", 401),
        ("{\"user\": \"admin\", \"password\": \"guess\"}", 401),
    ] {
        let r = sign_in(body.to_owned(), "application/json").await.unwrap();
        assert_eq!(r.status(), status, "{body}");
        assert!(r.headers().get("set-cookie").is_none(), "{body}");
        let problem: Value = r.json().await.unwrap();
        assert!(!problem["detail"].as_str().unwrap_or("").contains("sk_not"), "a secret echoed: {problem}");
    }
    let r = sign_in(json!({"key": writer}).to_string(), "text/plain").await.unwrap();
    assert_eq!(r.status(), 415);

    // A good one: the cookie's attributes, the CSRF token in the body only.
    let r = sign_in(json!({"key": writer}).to_string(), "application/json").await.unwrap();
    assert_eq!(r.status(), 201);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(cookie.contains(attribute), "{attribute} in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP here");
    assert!(!cookie.contains(&writer), "the key in clear in the cookie");
    let session: Value = r.json().await.unwrap();
    assert_eq!(session["role"], "write");
    let csrf = session["csrf"].as_str().unwrap().to_owned();
    let value = cookie.split(';').next().unwrap().to_owned();
    let with = |method: reqwest::Method, path: &str, cookie: &str| {
        http.request(method, format!("{base}{path}")).header("cookie", cookie.to_owned())
    };

    // Reads with the cookie alone; writes need the CSRF token too.
    let r = with(reqwest::Method::GET, "/console/session", &value).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["csrf"], csrf.as_str());
    assert_eq!(with(reqwest::Method::GET, "/v1/apps", &value).send().await.unwrap().status(), 200);
    let create = |name: &str| json!({"name": name});
    let r = with(reqwest::Method::POST, "/v1/apps", &value).json(&create("a1")).send().await.unwrap();
    assert_eq!(r.status(), 403, "no CSRF token");
    let r = with(reqwest::Method::POST, "/v1/apps", &value)
        .header("x-csrf-token", "0".repeat(csrf.len()))
        .json(&create("a2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a wrong CSRF token");
    let r = with(reqwest::Method::POST, "/v1/apps", &value)
        .header("x-csrf-token", &csrf)
        .json(&create("a3"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // The role is the key's: a write key may not set a policy through the console either.
    let r = with(reqwest::Method::PUT, "/v1/apps/a3/policy", &value)
        .header("x-csrf-token", &csrf)
        .json(&json!({"publish": {"methods": ["open"]}, "play": {"methods": ["open"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    for name in ["a1", "a2"] {
        let (code, _) = get(&http, format!("{base}/v1/apps/{name}")).await;
        assert_eq!(code, 404, "{name} created without its CSRF token");
    }

    // The QR code of a provisioning URI, and its bad inputs.
    let r = with(reqwest::Method::POST, "/console/qr", &value)
        .header("x-csrf-token", &csrf)
        .json(&json!({"text": "otpauth://totp/Sluice:alice?secret=JBSWY3DPEHPK3PXP"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/svg+xml");
    assert!(r.text().await.unwrap().starts_with("<?xml"));
    for body in [json!({"text": ""}), json!({"text": "x".repeat(1025)}), json!({"text": 1}), json!({"txt": "a"})] {
        let r =
            with(reqwest::Method::POST, "/console/qr", &value).header("x-csrf-token", &csrf).json(&body).send().await;
        assert_eq!(r.unwrap().status(), 400, "{body}");
    }

    // A tampered or foreign cookie is no session.
    let (name, sealed) = value.split_once('=').unwrap();
    let mut tampered: Vec<char> = sealed.chars().collect();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == 'A' { 'B' } else { 'A' };
    let tampered = format!("{name}={}", tampered.into_iter().collect::<String>());
    for bad in [tampered.as_str(), "sluice_console=garbage", "sluice_console=k1.AAAA.BBBB"] {
        let r = with(reqwest::Method::GET, "/v1/apps", bad).send().await.unwrap();
        assert_eq!(r.status(), 401, "{bad}");
    }

    // A revoked key ends its console sessions at once.
    let keys: Value =
        http.get(format!("{base}/v1/keys")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let id = keys["keys"].as_array().unwrap().iter().find(|k| k["name"] == "ops").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = http.delete(format!("{base}/v1/keys/{id}")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), 204);
    until("the revoked key's session refused", || async {
        with(reqwest::Method::GET, "/v1/apps", &value).send().await.unwrap().status() == 401
    })
    .await;

    // Signing out clears the cookie.
    let r = http.delete(format!("{base}/console/session")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));

    // The live figures the console reads.
    let (code, live) = get(&http, format!("{base}/v1/stats/streams")).await;
    assert_eq!((code, live), (200, json!({"streams": []})));
    let (code, log) = get(&http, format!("{base}/v1/log")).await;
    assert_eq!(code, 200);
    assert!(log["head"].as_u64().unwrap() > 0, "{log}");
    let r = http
        .get(format!("{base}/v1/decisions/stream"))
        .bearer_auth(ADMIN)
        .header("last-event-id", "-3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http.get(format!("{base}/v1/decisions/stream?format=csv")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), 400);
}

/// The other credentials the API takes sign in too: the static admin's user and password, and
/// an API JWT (its role, its expiry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_static_admin_and_an_api_jwt_sign_in_with_their_roles() {
    const JWT_SECRET: &str = "an-api-jwt-secret-of-at-least-32-bytes!";
    let pg = sluice_tests::Postgres::start().unwrap();
    let url = pg.create_database("console_creds").await.unwrap();
    let nats = sluice_tests::Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cp = free_port();
    let settings = [
        ("SLUICE_ADMIN_USERNAME", "operator"),
        ("SLUICE_ADMIN_PASSWORD", "a-long-admin-password"),
        ("SLUICE_API_JWT_SECRET", JWT_SECRET),
    ];
    let _control = control_with(&url, &nats.url(), cp, "cp-1", &dir.path().join("cp.log"), &settings);
    let http = reqwest::Client::new();
    let sign_in = |body: Value| http.post(format!("http://127.0.0.1:{cp}/console/session")).json(&body).send();
    let jwt = |role: &str, exp: u64| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({"sub": "ci", "role": role, "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        )
        .unwrap()
    };
    let r = sign_in(json!({"user": "operator", "password": "a-long-admin-password"})).await.unwrap();
    assert_eq!(r.status(), 201);
    let session: Value = r.json().await.unwrap();
    assert_eq!((session["role"].as_str(), session["subject"].as_str()), (Some("admin"), Some("basic:operator")));
    let r = sign_in(json!({"key": jwt("write", now_secs() + 600)})).await.unwrap();
    assert_eq!(r.status(), 201);
    let session: Value = r.json().await.unwrap();
    assert_eq!((session["role"].as_str(), session["subject"].as_str()), (Some("write"), Some("jwt:ci")));
    let r = sign_in(json!({"key": jwt("admin", now_secs() - 600)})).await.unwrap();
    assert_eq!(r.status(), 401, "an expired JWT");
    assert!(r.headers().get("set-cookie").is_none());
    let r = sign_in(json!({"user": "operator", "password": "not-the-password"})).await.unwrap();
    assert_eq!(r.status(), 401);
}
