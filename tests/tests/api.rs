//! The REST API against a real Postgres 15, through `Router::oneshot` (the whole layer stack:
//! allow-list, audit, rate limits, body limit): every credential kind, every resource, the
//! compatibility shapes, and the bad-input cases of issue 3.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use base64::Engine as _;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sluice_control_plane::api::ApiState;
use sluice_control_plane::api::routes::Route;
use sluice_control_plane::config::Config;
use sluice_control_plane::{EventStore, bootstrap, connect, store};
use sluice_events::{AccessRequest, Outcome, Position, Protocol};
use sluice_tests::Postgres;
use tower::ServiceExt;

const ADMIN: &str = "sk_test_admin_secret_0123456789abcdef";
const SEALING: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const API_JWT_SECRET: &str = "an-api-jwt-secret-of-at-least-32-bytes!!";

struct Api {
    pg: Postgres,
    router: Router,
    state: ApiState,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    /// The body exactly as sent (compatibility shapes are compared byte for byte).
    text: String,
}

async fn given_api(extra: &[(&str, &str)]) -> Api {
    let pg = Postgres::start().unwrap();
    let mut env: std::collections::BTreeMap<String, String> = [
        ("SLUICE_DATABASE_URL", pg.url()),
        ("SLUICE_SEALING_KEY", SEALING.into()),
        ("SLUICE_BOOTSTRAP_ADMIN_KEY", ADMIN.into()),
        ("SLUICE_INSTANCE_ID", "test".into()),
        ("SLUICE_RATE_LIMIT_API", "100000".into()),
        ("SLUICE_RATE_LIMIT_CONFIG", "100000".into()),
        ("SLUICE_RATE_LIMIT_STATS", "100000".into()),
        ("SLUICE_API_JWT_SECRET", API_JWT_SECRET.into()),
        ("SLUICE_ADMIN_USERNAME", "root".into()),
        ("SLUICE_ADMIN_PASSWORD", "correct horse battery".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (k, v) in extra {
        env.insert((*k).to_owned(), (*v).to_owned());
    }
    let config = Config::load(None, env).unwrap();
    let pool = connect(&config.database_url).await.unwrap();
    store::migrate(&pool).await.unwrap();
    let store = EventStore::start(pool);
    bootstrap::run(&store, Some(ADMIN), &config.sls_app, sluice_control_plane::clock::now()).await.unwrap();
    let (router, state) = sluice_control_plane::api::build(&config, store).await.unwrap();
    let router = router.layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
    Api { pg, router, state }
}

impl Api {
    async fn send(&self, req: Request<Body>) -> Reply {
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Reply { status, headers, body, text: String::from_utf8_lossy(&bytes).into_owned() }
    }

    async fn call(&self, method: Method, path: &str, auth: Option<&str>, body: Option<Value>) -> Reply {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let req = match body {
            Some(b) => req.header("content-type", "application/json").body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        };
        self.send(req.unwrap()).await
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        self.call(method, path, Some(&format!("Bearer {ADMIN}")), body).await
    }

    async fn raw(&self, method: Method, path: &str, content_type: Option<&str>, body: &'static [u8]) -> Reply {
        let mut req = Request::builder().method(method).uri(path).header("authorization", format!("Bearer {ADMIN}"));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        self.send(req.body(Body::from(body)).unwrap()).await
    }

    async fn key(&self, role: &str, extra: Value) -> (String, String) {
        let mut body = json!({"name": format!("{role} key"), "role": role});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let r = self.admin(Method::POST, "/v1/keys", Some(body)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        (r.body["id"].as_str().unwrap().to_owned(), r.body["secret"].as_str().unwrap().to_owned())
    }

    async fn log(&self) -> Vec<sluice_events::RecordedEvent> {
        self.state.writer.store().read_all(Position::ZERO, 10_000).await.unwrap()
    }
}

fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

fn basic(user: &str, secret: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}")))
}

fn problem_type(r: &Reply) -> &str {
    r.body["type"].as_str().unwrap_or("")
}

fn now_secs() -> i64 {
    sluice_control_plane::clock::now().as_secs()
}

#[tokio::test]
async fn api_keys_every_credential_kind_and_role() {
    let api = given_api(&[]).await;
    // No credentials: 401 with a challenge, problem+json.
    let r = api.call(Method::GET, "/v1/apps", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.headers["www-authenticate"].to_str().unwrap().contains("Bearer"));
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(problem_type(&r), "https://sluice.dev/problems/unauthorized");

    let (id, secret) = api.key("write", json!({})).await;
    let (_, reader) = api.key("read", json!({})).await;
    // Bearer and Basic(id:secret) are the same key.
    assert_eq!(api.call(Method::GET, "/v1/apps", Some(&bearer(&secret)), None).await.status, StatusCode::OK);
    assert_eq!(api.call(Method::GET, "/v1/apps", Some(&basic(&id, &secret)), None).await.status, StatusCode::OK);
    assert_eq!(
        api.call(Method::GET, "/v1/apps", Some(&basic(&id, "wrong")), None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let r = api.call(Method::GET, "/v1/apps", Some("Basic !!!not-base64"), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(!r.body.to_string().contains("not-base64"), "never echo credentials");
    // Roles: write may not manage keys, read may not write.
    assert_eq!(api.call(Method::GET, "/v1/keys", Some(&bearer(&secret)), None).await.status, StatusCode::FORBIDDEN);
    let r = api.call(Method::POST, "/v1/apps", Some(&bearer(&reader)), Some(json!({"name": "x"}))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(problem_type(&r), "https://sluice.dev/problems/forbidden");
    // The static admin (SRS style).
    let r = api.call(Method::GET, "/v1/keys", Some(&basic("root", "correct horse battery")), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        api.call(Method::GET, "/v1/keys", Some(&basic("root", "wrong password!")), None).await.status,
        StatusCode::UNAUTHORIZED
    );
    // The secret is shown once: never in a list or a get.
    let listed = api.admin(Method::GET, "/v1/keys", None).await;
    assert!(!listed.body.to_string().contains(&secret));
    assert!(listed.body["keys"].as_array().unwrap().iter().any(|k| k["id"] == id.as_str()));
    // Revoked: 401.
    let r = api.admin(Method::DELETE, &format!("/v1/keys/{id}"), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.headers.contains_key("sluice-position"));
    let r = api.call(Method::GET, "/v1/apps", Some(&bearer(&secret)), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body["detail"].as_str().unwrap().contains("revoked"));
    assert_eq!(api.admin(Method::DELETE, &format!("/v1/keys/{id}"), None).await.status, StatusCode::NOT_FOUND);
    // CIDR-bound key used from elsewhere: 403.
    let (_, far) = api.key("read", json!({"cidrs": ["10.0.0.0/8"]})).await;
    assert_eq!(api.call(Method::GET, "/v1/apps", Some(&bearer(&far)), None).await.status, StatusCode::FORBIDDEN);
    // Expiring key: works, then 401.
    let (_, brief) = api.key("read", json!({"expires_at": now_secs() + 1})).await;
    assert_eq!(api.call(Method::GET, "/v1/apps", Some(&bearer(&brief)), None).await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = api.call(Method::GET, "/v1/apps", Some(&bearer(&brief)), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body["detail"].as_str().unwrap().contains("expired"));
    // Expiry in the past and invalid CIDRs are refused at creation.
    let r = api.admin(Method::POST, "/v1/keys", Some(json!({"name": "x", "role": "read", "expires_at": 1}))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r =
        api.admin(Method::POST, "/v1/keys", Some(json!({"name": "x", "role": "read", "cidrs": ["10.0.0.0/33"]}))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = api.admin(Method::POST, "/v1/keys", Some(json!({"name": "x", "role": "root"}))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // No key secret reaches the log.
    assert!(!format!("{:?}", api.log().await).contains(&reader));
}

fn api_jwt(claims: Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test]
async fn api_jwts_are_verified_and_carry_the_role() {
    let api = given_api(&[]).await;
    let exp = now_secs() + 300;
    let admin = api_jwt(json!({"sub": "ops", "role": "admin", "exp": exp}), API_JWT_SECRET.as_bytes());
    assert_eq!(api.call(Method::GET, "/v1/keys", Some(&bearer(&admin)), None).await.status, StatusCode::OK);
    // Ant Media sends the bare token.
    assert_eq!(api.call(Method::GET, "/v1/keys", Some(&admin), None).await.status, StatusCode::OK);
    let reader = api_jwt(json!({"sub": "ops", "role": "read", "exp": exp}), API_JWT_SECRET.as_bytes());
    assert_eq!(api.call(Method::GET, "/v1/keys", Some(&bearer(&reader)), None).await.status, StatusCode::FORBIDDEN);
    let wrong_key = api_jwt(json!({"role": "admin", "exp": exp}), b"some-other-secret-of-32-bytes-or-more!!");
    assert_eq!(
        api.call(Method::GET, "/v1/keys", Some(&bearer(&wrong_key)), None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let expired = api_jwt(json!({"role": "admin", "exp": now_secs() - 60}), API_JWT_SECRET.as_bytes());
    assert_eq!(api.call(Method::GET, "/v1/keys", Some(&bearer(&expired)), None).await.status, StatusCode::UNAUTHORIZED);
    let no_exp = api_jwt(json!({"role": "admin"}), API_JWT_SECRET.as_bytes());
    assert_eq!(api.call(Method::GET, "/v1/keys", Some(&bearer(&no_exp)), None).await.status, StatusCode::UNAUTHORIZED);
    // Tampered payload: the signature no longer matches.
    let mut parts: Vec<String> = reader.split('.').map(str::to_owned).collect();
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"sub": "ops", "role": "admin", "exp": exp}).to_string());
    let tampered = parts.join(".");
    assert_eq!(
        api.call(Method::GET, "/v1/keys", Some(&bearer(&tampered)), None).await.status,
        StatusCode::UNAUTHORIZED
    );
    // alg: none.
    let none_header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let unsigned = format!("{none_header}.{}.", parts[1]);
    assert_eq!(
        api.call(Method::GET, "/v1/keys", Some(&bearer(&unsigned)), None).await.status,
        StatusCode::UNAUTHORIZED
    );
}

/// `nbf` and `iat` are checked against the clock, with `SLUICE_API_JWT_LEEWAY_SECS` of leeway:
/// a token valid from next year, or issued in the future, is refused today (issue #16, item 3).
#[tokio::test]
async fn api_jwts_not_yet_valid_or_issued_in_the_future_are_refused() {
    let api = given_api(&[("SLUICE_API_JWT_LEEWAY_SECS", "30")]).await;
    let (now, exp) = (now_secs(), now_secs() + 400 * 86_400);
    let api = &api;
    let call = |claims: Value| {
        let token = api_jwt(claims, API_JWT_SECRET.as_bytes());
        async move { api.call(Method::GET, "/v1/keys", Some(&bearer(&token)), None).await.status }
    };
    let next_year = now + 365 * 86_400;
    assert_eq!(call(json!({"role": "admin", "exp": exp, "nbf": next_year})).await, StatusCode::UNAUTHORIZED);
    assert_eq!(call(json!({"role": "admin", "exp": exp, "iat": next_year})).await, StatusCode::UNAUTHORIZED);
    assert_eq!(call(json!({"role": "admin", "exp": exp, "nbf": now + 120})).await, StatusCode::UNAUTHORIZED);
    // Within the leeway (a clock a little ahead at the issuer), and in the past: accepted.
    assert_eq!(call(json!({"role": "admin", "exp": exp, "nbf": now + 10, "iat": now + 10})).await, StatusCode::OK);
    assert_eq!(call(json!({"role": "admin", "exp": exp, "nbf": now - 60, "iat": now - 60})).await, StatusCode::OK);
    // Not numbers: refused, not ignored.
    assert_eq!(call(json!({"role": "admin", "exp": exp, "nbf": "soon"})).await, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn api_jwts_from_a_jwks_url_and_its_forced_refresh() {
    // The identity provider: a real HTTP server serving a JWK set, empty at first.
    let jwks = std::sync::Arc::new(std::sync::Mutex::new(json!({"keys": []})));
    let served = jwks.clone();
    let idp = Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let v = served.lock().unwrap().clone();
            async move { axum::Json(v) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, idp).await.unwrap() });
    let api = given_api(&[("SLUICE_API_JWT_JWKS_URL", &url), ("SLUICE_API_JWT_ROLE_CLAIM", "sluice_role")]).await;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let key = jsonwebtoken::EncodingKey::from_rsa_der(include_bytes!("../../events/tests/fixtures/rsa.der"));
    let token =
        jsonwebtoken::encode(&header, &json!({"sub": "ci", "sluice_role": "admin", "exp": now_secs() + 300}), &key)
            .unwrap();
    // Not in the JWKS yet.
    assert_eq!(api.call(Method::GET, "/v1/keys", Some(&bearer(&token)), None).await.status, StatusCode::UNAUTHORIZED);
    *jwks.lock().unwrap() = serde_json::from_str(include_str!("../../events/tests/fixtures/jwks.json")).unwrap();
    let r = api.admin(Method::POST, "/v1/auth/jwks/refresh", None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(r.body["keys"].as_u64().unwrap() >= 1);
    assert_eq!(api.call(Method::GET, "/v1/keys", Some(&bearer(&token)), None).await.status, StatusCode::OK);
    // The same header with HS256 signed by the RSA public key text: algorithm confusion.
    let public = include_bytes!("../../events/tests/fixtures/rsa.pub.pem");
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sluice_role": "admin", "exp": now_secs() + 300}),
        &jsonwebtoken::EncodingKey::from_secret(public),
    )
    .unwrap();
    assert_eq!(
        api.call(Method::GET, "/v1/keys", Some(&bearer(&confused)), None).await.status,
        StatusCode::UNAUTHORIZED
    );
}

/// Stream JWTs from a JWKS (issue #17): the control plane fetches the app's `jwt.jwks_url`,
/// records the public keys (`JwksRefreshed`), and the state every worker folds verifies RS256
/// and ES256 offline; a rotated set (a new `kid`) is picked up; a failing fetch keeps the last
/// keys and says so in the app's view and `/metrics`. Before, nothing fetched it.
#[tokio::test]
async fn stream_jwts_are_verified_from_the_apps_jwks() {
    let full: Value = serde_json::from_str(include_str!("../../events/tests/fixtures/jwks.json")).unwrap();
    // At first the identity provider serves the EC key alone.
    let ec_only = json!({"keys": full["keys"].as_array().unwrap().iter().filter(|k| k["kty"] == "EC").cloned().collect::<Vec<_>>()});
    let jwks = std::sync::Arc::new(std::sync::Mutex::new((200u16, ec_only)));
    let served = jwks.clone();
    let idp = Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let (status, body) = served.lock().unwrap().clone();
            async move { (StatusCode::from_u16(status).unwrap(), axum::Json(body)) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, idp).await.unwrap() });
    let api = given_api(&[("SLUICE_WEBHOOK_ALLOWED", "127.0.0.1"), ("SLUICE_JWKS_REFRESH_SECS", "1")]).await;
    let policy = json!({"publish": {"methods": ["jwt"]}, "play": {"methods": ["jwt"]}, "jwt": {"jwks_url": url}});
    let r = api.admin(Method::POST, "/v1/apps", Some(json!({"name": "live2", "policy": policy}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let jwks_view = || async { api.admin(Method::GET, "/v1/apps/live2", None).await.body["jwks"].clone() };
    let poll = |want: fn(&Value) -> bool| async move {
        // Up to 30 s: the fetch runs every second, but a loaded machine may be slow.
        for _ in 0..300 {
            let v = jwks_view().await;
            if want(&v) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the app's JWKS view never got there: {}", jwks_view().await);
    };
    let v = poll(|v| v["keys"] == 1).await;
    assert!(v["fetched_at"].is_i64() && v["last_error"].is_null(), "{v}");
    let decide = |token: String| {
        let req = AccessRequest {
            id: uuid::Uuid::new_v4(),
            app: sluice_events::AppName::parse("live2").unwrap(),
            stream: sluice_events::StreamName::parse("cam").unwrap(),
            action: sluice_events::Action::Publish,
            protocol: Protocol::Rtmp,
            client_ip: "127.0.0.1".parse().unwrap(),
            credential: sluice_events::Credential::token(&token),
            client_id: None,
        };
        sluice_events::decide(&api.state.writer.projection().current(), &req, sluice_control_plane::clock::now()).reason
    };
    let claims = json!({"sub": "enc-1", "app": "live2", "stream": "cam", "action": "publish", "exp": now_secs() + 300});
    let sign = |alg: jsonwebtoken::Algorithm, kid: &str, key: jsonwebtoken::EncodingKey| {
        let mut h = jsonwebtoken::Header::new(alg);
        h.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&h, &claims, &key).unwrap()
    };
    let ec_kid =
        full["keys"].as_array().unwrap().iter().find(|k| k["kty"] == "EC").unwrap()["kid"].as_str().unwrap().to_owned();
    let es = sign(
        jsonwebtoken::Algorithm::ES256,
        &ec_kid,
        jsonwebtoken::EncodingKey::from_ec_der(include_bytes!("../../events/tests/fixtures/ec.pk8.der")),
    );
    let rs = sign(
        jsonwebtoken::Algorithm::RS256,
        "rsa-1",
        jsonwebtoken::EncodingKey::from_rsa_der(include_bytes!("../../events/tests/fixtures/rsa.der")),
    );
    assert_eq!(decide(es.clone()), sluice_events::Reason::Allowed, "ES256 from the fetched set");
    assert_eq!(decide(rs.clone()), sluice_events::Reason::JwtKeyUnknown, "not in the set yet");
    // A rotation: the RSA key joins the set; the next fetch records it.
    jwks.lock().unwrap().1 = full.clone();
    poll(|v| v["keys"] == 2).await;
    assert_eq!(decide(rs.clone()), sluice_events::Reason::Allowed, "RS256 after the rotation");
    let refreshed = api.log().await.iter().filter(|e| e.event.event_type() == "JwksRefreshed").count();
    assert_eq!(refreshed, 2, "one event per change, not per fetch");
    // The identity provider fails: the keys stay, and the view and the metric say so.
    jwks.lock().unwrap().0 = 500;
    let v = poll(|v| v["last_error"].is_string()).await;
    assert_eq!(v["keys"], 2, "{v}");
    assert!(v["last_error"].as_str().unwrap().contains("500"), "{v}");
    assert_eq!(decide(rs), sluice_events::Reason::Allowed, "the last keys are kept");
    let text = api.call(Method::GET, "/metrics", None, None).await.text;
    let failures = text.lines().find_map(|l| l.strip_prefix("sluice_jwks_refresh_failures_total ")).unwrap_or("0");
    assert_ne!(failures, "0", "{text}");
}

#[tokio::test]
async fn apps_policy_and_streams_round_trip_with_positions() {
    let api = given_api(&[]).await;
    let r = api.admin(Method::POST, "/v1/apps", Some(json!({"name": "studio"}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let position: u64 = r.headers["sluice-position"].to_str().unwrap().parse().unwrap();
    assert!(position > 0);
    assert_eq!(r.body["policy"]["publish"]["methods"], json!(["open"]));
    assert_eq!(api.admin(Method::POST, "/v1/apps", Some(json!({"name": "studio"}))).await.status, StatusCode::CONFLICT);
    // Policy: replace and read back.
    let policy = json!({
        "publish": {"methods": ["one_time_token", "jwt"], "cidrs": ["10.0.0.0/8"], "accept_undefined_streams": false},
        "play": {"methods": ["hash", "hmac", "totp"], "cidrs": [], "accept_undefined_streams": false},
        "totp": {"period_secs": 30, "digits": 6}
    });
    let r = api.admin(Method::PUT, "/v1/apps/studio/policy", Some(policy.clone())).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = api.admin(Method::GET, "/v1/apps/studio/policy", None).await;
    assert_eq!(r.body["publish"]["methods"], json!(["one_time_token", "jwt"]));
    assert_eq!(r.body["totp"]["period_secs"], 30);
    let mut bad = policy.clone();
    bad["publish"]["method"] = json!("typo");
    let r = api.admin(Method::PUT, "/v1/apps/studio/policy", Some(bad)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body["detail"].as_str().unwrap().contains("publish.method"), "{:?}", r.body);
    let webhook_without_url = json!({"publish": {"methods": ["webhook"]}, "play": {"methods": ["open"]}});
    let r = api.admin(Method::PUT, "/v1/apps/studio/policy", Some(webhook_without_url)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Streams: register, read back at once, page, update, delete.
    for n in ["cam-a", "cam-b", "cam-c"] {
        let r = api.admin(Method::POST, "/v1/apps/studio/streams", Some(json!({"name": n}))).await;
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(api.admin(Method::GET, &format!("/v1/apps/studio/streams/{n}"), None).await.status, StatusCode::OK);
    }
    let r = api
        .admin(
            Method::POST,
            "/v1/apps/studio/streams",
            Some(json!({"name": "cam-d", "publish_name": "secret-key-d", "description": "desk"})),
        )
        .await;
    assert_eq!(r.body["publish_name"], "secret-key-d");
    let page1 = api.admin(Method::GET, "/v1/apps/studio/streams?limit=2", None).await;
    assert_eq!(page1.body["streams"].as_array().unwrap().len(), 2);
    assert_eq!(page1.body["next"], "cam-b");
    let page2 = api.admin(Method::GET, "/v1/apps/studio/streams?limit=2&after=cam-b", None).await;
    assert_eq!(page2.body["streams"][0]["name"], "cam-c");
    assert_eq!(page2.body["next"], Value::Null);
    let r = api.admin(Method::PATCH, "/v1/apps/studio/streams/cam-d", Some(json!({"description": null}))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["description"], Value::Null);
    assert_eq!(r.body["publish_name"], "secret-key-d", "an absent field is kept");
    let r =
        api.admin(Method::PATCH, "/v1/apps/studio/streams/cam-a", Some(json!({"publish_name": "secret-key-d"}))).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(api.admin(Method::DELETE, "/v1/apps/studio/streams/cam-a", None).await.status, StatusCode::NO_CONTENT);
    assert_eq!(api.admin(Method::GET, "/v1/apps/studio/streams/cam-a", None).await.status, StatusCode::NOT_FOUND);
    assert_eq!(api.admin(Method::DELETE, "/v1/apps/studio/streams/cam-a", None).await.status, StatusCode::NOT_FOUND);
    assert_eq!(api.admin(Method::GET, "/v1/apps/nope/streams", None).await.status, StatusCode::NOT_FOUND);
    let r = api.admin(Method::GET, "/v1/apps", None).await;
    let names: Vec<&str> = r.body["apps"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["live", "studio"]);
    assert_eq!(api.admin(Method::DELETE, "/v1/apps/studio", None).await.status, StatusCode::NO_CONTENT);
    assert_eq!(api.admin(Method::GET, "/v1/apps/studio", None).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_writes_nothing() {
    let api = given_api(&[("SLUICE_MAX_BODY_BYTES", "2048")]).await;
    api.admin(Method::POST, "/v1/apps", Some(json!({"name": "studio"}))).await;
    let before = api.log().await.len();
    let post = "/v1/apps/studio/streams";
    let cases: Vec<(&str, Reply, StatusCode, &str)> = vec![
        (
            "malformed",
            api.raw(Method::POST, post, Some("application/json"), b"{\"name\": ").await,
            StatusCode::BAD_REQUEST,
            "malformed JSON",
        ),
        (
            "not an object",
            api.raw(Method::POST, post, Some("application/json"), b"[]").await,
            StatusCode::BAD_REQUEST,
            "expected a JSON object",
        ),
        (
            "no content type",
            api.raw(Method::POST, post, None, b"{\"name\":\"a\"}").await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "JSON",
        ),
        (
            "text/plain",
            api.raw(Method::POST, post, Some("text/plain"), b"{\"name\":\"a\"}").await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "JSON",
        ),
        (
            "unknown field",
            api.admin(Method::POST, post, Some(json!({"name": "a", "colour": "red"}))).await,
            StatusCode::BAD_REQUEST,
            "unknown field `colour`",
        ),
        (
            "wrong type",
            api.admin(Method::POST, post, Some(json!({"name": 7}))).await,
            StatusCode::BAD_REQUEST,
            "invalid type",
        ),
        (
            "missing",
            api.admin(Method::POST, post, Some(json!({}))).await,
            StatusCode::BAD_REQUEST,
            "missing field `name`",
        ),
        (
            "empty name",
            api.admin(Method::POST, post, Some(json!({"name": ""}))).await,
            StatusCode::BAD_REQUEST,
            "empty",
        ),
        (
            "slash",
            api.admin(Method::POST, post, Some(json!({"name": "a/b"}))).await,
            StatusCode::BAD_REQUEST,
            "stream name",
        ),
        (
            "control",
            api.admin(Method::POST, post, Some(json!({"name": "a\u{7}"}))).await,
            StatusCode::BAD_REQUEST,
            "stream name",
        ),
        (
            "oversized name",
            api.admin(Method::POST, post, Some(json!({"name": "x".repeat(129)}))).await,
            StatusCode::BAD_REQUEST,
            "stream name",
        ),
        (
            "control in description",
            api.admin(Method::POST, post, Some(json!({"name": "ok", "description": "a\u{0}b"}))).await,
            StatusCode::BAD_REQUEST,
            "control characters",
        ),
        (
            "oversized body",
            api.admin(Method::POST, post, Some(json!({"name": "ok", "description": "d".repeat(4000)}))).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "limit",
        ),
        (
            "past expiry",
            api.admin(Method::POST, "/v1/keys", Some(json!({"name": "k", "role": "read", "expires_at": 1000}))).await,
            StatusCode::BAD_REQUEST,
            "future",
        ),
        (
            "bad b32 length",
            api.admin(
                Method::POST,
                "/v1/apps/studio/streams/s/subscribers",
                Some(json!({"id": "u1", "secret_b32": "ABCDEFG"})),
            )
            .await,
            StatusCode::BAD_REQUEST,
            "multiple of 8",
        ),
        (
            "short b32",
            api.admin(
                Method::POST,
                "/v1/apps/studio/streams/s/subscribers",
                Some(json!({"id": "u1", "secret_b32": "MZXW6YTB"})),
            )
            .await,
            StatusCode::BAD_REQUEST,
            "16 bytes",
        ),
        (
            "bad b32 alphabet",
            api.admin(
                Method::POST,
                "/v1/apps/studio/streams/s/subscribers",
                Some(json!({"id": "u1", "secret_b32": "11111111111111111111111111111111"})),
            )
            .await,
            StatusCode::BAD_REQUEST,
            "base32",
        ),
        (
            "bad limit",
            api.admin(Method::GET, "/v1/apps/studio/streams?limit=0", None).await,
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            "unknown query",
            api.admin(Method::GET, "/v1/apps/studio/streams?colour=1", None).await,
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            "unknown app",
            api.admin(Method::POST, "/v1/apps/ghost/streams", Some(json!({"name": "a"}))).await,
            StatusCode::NOT_FOUND,
            "ghost",
        ),
        ("unknown route", api.admin(Method::GET, "/v1/nothing-here", None).await, StatusCode::NOT_FOUND, "route"),
        (
            "unknown secret kind",
            api.admin(Method::POST, "/v1/apps/studio/secrets/ssh", None).await,
            StatusCode::NOT_FOUND,
            "secret kind",
        ),
        (
            "short jwt secret",
            api.admin(Method::POST, "/v1/apps/studio/secrets/jwt", Some(json!({"secret": "short"}))).await,
            StatusCode::BAD_REQUEST,
            "32 bytes",
        ),
        (
            "SRT passphrase over 79 bytes",
            api.admin(Method::POST, "/v1/apps/studio/secrets/srt_passphrase", Some(json!({"secret": "p".repeat(80)})))
                .await,
            StatusCode::BAD_REQUEST,
            "at most 79",
        ),
        (
            "removing a secret that is not set",
            api.admin(Method::DELETE, "/v1/apps/studio/secrets/srt_passphrase", None).await,
            StatusCode::NOT_FOUND,
            "secret",
        ),
        (
            "removing an unknown secret kind",
            api.admin(Method::DELETE, "/v1/apps/studio/secrets/nope", None).await,
            StatusCode::NOT_FOUND,
            "secret kind",
        ),
        (
            // The document says the methods are unique (schemathesis found it accepted).
            "a method listed twice",
            api.admin(
                Method::PUT,
                "/v1/apps/studio/policy",
                Some(json!({"publish": {"methods": ["jwt", "jwt"]}, "play": {"methods": ["open"]}})),
            )
            .await,
            StatusCode::BAD_REQUEST,
            "listed twice",
        ),
    ];
    for (name, reply, status, needle) in &cases {
        assert_eq!(reply.status, *status, "{name}: {:?}", reply.body);
        if reply.status != StatusCode::BAD_REQUEST || !needle.is_empty() {
            let detail = reply.body["detail"].as_str().unwrap_or_default();
            assert!(detail.contains(needle), "{name}: {detail:?} should mention {needle:?}");
        }
    }
    assert_eq!(api.log().await.len(), before, "no bad request wrote an event");
    // Duplicate: 409, and still one stream.
    assert_eq!(api.admin(Method::POST, post, Some(json!({"name": "a"}))).await.status, StatusCode::CREATED);
    let r = api.admin(Method::POST, post, Some(json!({"name": "a"}))).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(problem_type(&r), "https://sluice.dev/problems/already-exists");
    // Long app, stream and subscriber names together outgrew the log's stream name (a 500
    // schemathesis found); the log names such a stream by a digest now.
    let app = "a".repeat(64);
    assert_eq!(api.admin(Method::POST, "/v1/apps", Some(json!({"name": app}))).await.status, StatusCode::CREATED);
    let path = format!("/v1/apps/{app}/streams/{}/subscribers", "s".repeat(128));
    let r = api.admin(Method::POST, &path, Some(json!({"id": "x".repeat(127)}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
}

#[tokio::test]
async fn tokens_jwts_hashes_and_subscribers_pass_decide() {
    let api = given_api(&[]).await;
    api.admin(Method::POST, "/v1/apps", Some(json!({"name": "studio"}))).await;
    let policy = json!({
        "publish": {"methods": ["one_time_token", "jwt", "totp"], "accept_undefined_streams": false},
        "play": {"methods": ["hash", "hmac"], "accept_undefined_streams": false}
    });
    assert_eq!(api.admin(Method::PUT, "/v1/apps/studio/policy", Some(policy)).await.status, StatusCode::OK);
    api.admin(Method::POST, "/v1/apps/studio/streams", Some(json!({"name": "cam", "publish_name": "cam-key"}))).await;
    let state = || api.state.writer.projection().current();
    let decide_url = |url: &str, action: sluice_events::Action| {
        let rest = url.strip_prefix("rtmp://127.0.0.1:1935/").unwrap();
        let (app, key) = rest.split_once('/').unwrap();
        let target = sluice_events::wire::parse_rtmp(app, key).unwrap();
        let req = AccessRequest {
            id: uuid::Uuid::new_v4(),
            app: target.app,
            stream: target.stream,
            action,
            protocol: Protocol::Rtmp,
            client_ip: "127.0.0.1".parse().unwrap(),
            credential: target.credential,
            client_id: None,
        };
        sluice_events::decide(&state(), &req, sluice_control_plane::clock::now())
    };
    use sluice_events::Action::{Play, Publish};
    // One-time token: the URL uses the publish name, decide allows and asks to consume it.
    let r = api
        .admin(
            Method::POST,
            "/v1/apps/studio/streams/cam/tokens",
            Some(json!({"action": "publish", "expires_in": 600})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let url = r.body["rtmp_url"].as_str().unwrap();
    assert!(url.starts_with("rtmp://127.0.0.1:1935/studio/cam-key?token="), "{url}");
    assert!(r.body["srt_streamid"].as_str().unwrap().starts_with("#!::r=studio/cam-key,m=publish,t="));
    let d = decide_url(url, Publish);
    assert_eq!(d.outcome, Outcome::Allow, "{d:?}");
    let token_id = r.body["id"].as_str().unwrap().to_owned();
    let listed = api.admin(Method::GET, "/v1/apps/studio/streams/cam/tokens", None).await;
    assert_eq!(listed.body["tokens"][0]["id"], token_id.as_str());
    assert_eq!(listed.body["tokens"][0]["status"], "active");
    assert!(!listed.body.to_string().contains(r.body["token"].as_str().unwrap()));
    let r2 = api.admin(Method::DELETE, &format!("/v1/apps/studio/streams/cam/tokens/{token_id}"), None).await;
    assert_eq!(r2.status, StatusCode::NO_CONTENT);
    assert_eq!(decide_url(url, Publish).outcome, Outcome::Deny);
    // JWT: needs the app's JWT secret first.
    let r = api.admin(Method::POST, "/v1/apps/studio/streams/cam/jwt", Some(json!({"action": "publish"}))).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let s = api.admin(Method::POST, "/v1/apps/studio/secrets/jwt", None).await;
    assert_eq!(s.status, StatusCode::OK);
    assert!(s.body["secret"].as_str().unwrap().len() >= 32);
    assert!(!format!("{:?}", api.log().await).contains(s.body["secret"].as_str().unwrap()), "sealed in the log");
    let r = api
        .admin(Method::POST, "/v1/apps/studio/streams/cam/jwt", Some(json!({"action": "publish", "expires_in": 60})))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(decide_url(r.body["rtmp_url"].as_str().unwrap(), Publish).outcome, Outcome::Allow);
    assert_eq!(
        decide_url(&r.body["rtmp_url"].as_str().unwrap().replace("cam-key", "cam"), Publish).outcome,
        Outcome::Deny
    );
    // Hash and HMAC.
    api.admin(Method::POST, "/v1/apps/studio/secrets/hash", Some(json!({"secret": "a-hash-secret-of-16+"}))).await;
    let r = api.admin(Method::POST, "/v1/apps/studio/streams/cam/hash", Some(json!({"action": "play"}))).await;
    assert_eq!(r.body["method"], "hash");
    assert_eq!(decide_url(r.body["rtmp_url"].as_str().unwrap(), Play).outcome, Outcome::Allow);
    let r = api
        .admin(Method::POST, "/v1/apps/studio/streams/cam/hash", Some(json!({"action": "play", "expires_in": 60})))
        .await;
    assert_eq!(r.body["method"], "hmac");
    assert!(r.body["rtmp_url"].as_str().unwrap().contains("&expires="));
    assert_eq!(decide_url(r.body["rtmp_url"].as_str().unwrap(), Play).outcome, Outcome::Allow);
    // TOTP subscriber with a generated secret.
    let r = api
        .admin(
            Method::POST,
            "/v1/apps/studio/streams/cam/subscribers",
            Some(json!({"id": "anchor", "action": "publish"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let b32 = r.body["secret_b32"].as_str().unwrap();
    assert!(r.body["otpauth_uri"].as_str().unwrap().starts_with("otpauth://totp/Sluice:studio%2Fcam%2Fanchor?secret="));
    let secret = base32::decode(base32::Alphabet::Rfc4648 { padding: false }, b32).unwrap();
    let step = (now_secs() / 60) as u64;
    let code = sluice_events::decide::totp_code(&secret, 6, 60, step).unwrap();
    let url = format!("rtmp://127.0.0.1:1935/studio/cam-key?subscriberId=anchor&subscriberCode={code}");
    assert_eq!(decide_url(&url, Publish).outcome, Outcome::Allow);
    let r = api.admin(Method::POST, "/v1/apps/studio/streams/cam/subscribers", Some(json!({"id": "anchor"}))).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = api
        .admin(Method::POST, "/v1/apps/studio/streams/cam/subscribers/anchor/block", Some(json!({"seconds": 300})))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(decide_url(&url, Publish).outcome, Outcome::Deny);
    let listed = api.admin(Method::GET, "/v1/apps/studio/streams/cam/subscribers", None).await;
    assert_eq!(listed.body["subscribers"][0]["id"], "anchor");
    assert!(!listed.body.to_string().contains(b32));
    assert_eq!(
        api.admin(Method::DELETE, "/v1/apps/studio/streams/cam/subscribers/anchor", None).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.admin(Method::DELETE, "/v1/apps/studio/streams/cam/subscribers/anchor", None).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn sls_compatibility_shapes() {
    let api = given_api(&[]).await;
    let admin = bearer(ADMIN);
    let r = api
        .call(
            Method::POST,
            "/api/stream-ids",
            Some(&admin),
            Some(json!({"publisher": "studio_1", "player": "live_stream", "description": "Main studio feed"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    insta::assert_snapshot!("sls_add", r.text);
    let r = api
        .call(
            Method::POST,
            "/api/stream-ids",
            Some(&admin),
            Some(json!({"publisher": "other", "player": "live_stream"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    insta::assert_snapshot!("sls_add_conflict", r.text);
    let r = api.call(Method::GET, "/api/stream-ids", Some(&admin), None).await;
    insta::assert_snapshot!("sls_list", r.text);
    let r = api.call(Method::GET, "/api/stream-ids", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    insta::assert_snapshot!("sls_401", r.text);
    // OpenIRL's wording (slscore/SLSApiServer.cpp): a key it does not know, a body that is
    // not JSON, a body without its two fields; CORS on every SLS route, 204 to a preflight.
    let r = api.call(Method::GET, "/api/stream-ids", Some(&bearer("nosuchkey0123456789")), None).await;
    assert_eq!((r.status, r.body["message"].as_str()), (StatusCode::UNAUTHORIZED, Some("Invalid API key")));
    let r = api
        .send(
            Request::builder()
                .method(Method::POST)
                .uri("/api/stream-ids")
                .header("authorization", &admin)
                .header("content-type", "application/json")
                .body(Body::from("{\"publisher\": "))
                .unwrap(),
        )
        .await;
    assert_eq!((r.status, r.body["message"].as_str()), (StatusCode::BAD_REQUEST, Some("Invalid JSON body")));
    let r = api.call(Method::POST, "/api/stream-ids", Some(&admin), Some(json!({"player": "x"}))).await;
    assert_eq!(r.body["message"], "Missing or invalid required fields: publisher, player", "{:?}", r.body);
    let r =
        api.send(Request::builder().method(Method::OPTIONS).uri("/api/stream-ids").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(r.headers["access-control-allow-origin"], "*");
    assert_eq!(r.headers["access-control-allow-methods"], "GET, POST, DELETE, OPTIONS");
    assert_eq!(api.call(Method::GET, "/stats/nobody", None, None).await.headers["access-control-allow-origin"], "*");
    // `POST /api/keys {}`: SLS's defaults, a read key named "New API Key".
    let r = api.call(Method::POST, "/api/keys", Some(&admin), Some(json!({}))).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let keys = api.admin(Method::GET, "/v1/keys", None).await;
    assert!(
        keys.body["keys"].as_array().unwrap().iter().any(|k| k["name"] == "New API Key" && k["role"] == "read"),
        "{:?}",
        keys.body
    );
    let r = api
        .call(Method::POST, "/api/keys", Some(&admin), Some(json!({"name": "Frontend App", "permissions": "read"})))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["status"], "success");
    assert_eq!(r.body["message"], "Save this key securely. It cannot be retrieved again.");
    let reader = r.body["api_key"].as_str().unwrap().to_owned();
    let r = api.call(Method::DELETE, "/api/stream-ids/live_stream", Some(&bearer(&reader)), None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    insta::assert_snapshot!("sls_403", r.text);
    // A registered stream with no publisher, as OpenIRL/srt-live-server's code answers it
    // (slscore/SLSManager.cpp, generate_json_for_publisher): 200, a message, no publisher (a
    // zero-filled one made the management UI show every stream online).
    let r = api.call(Method::GET, "/stats/live_stream", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    insta::assert_snapshot!("sls_stats", r.text);
    let r = api.call(Method::GET, "/stats/live_stream?legacy=1&reset=1", None, None).await;
    insta::assert_snapshot!("sls_stats_legacy", r.text);
    let r = api.call(Method::GET, "/stats/nobody", None, None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    insta::assert_snapshot!("sls_stats_404", r.text);
    // A publisher key is looked up too, but only a live one (find_publisher_by_player_key).
    assert_eq!(api.call(Method::GET, "/stats/studio_1", None, None).await.status, StatusCode::NOT_FOUND);
    // More player ids for the same publisher (the UI's "add player"), listed with it; the
    // stats of one are the publisher's.
    for player in ["live_b", "live_c"] {
        let body = json!({"publisher": "studio_1", "player": player});
        let r = api.call(Method::POST, "/api/stream-ids", Some(&admin), Some(body)).await;
        assert_eq!((r.status, r.body["status"].as_str()), (StatusCode::OK, Some("success")), "{:?}", r.body);
    }
    let listed = |r: &Reply| -> Vec<(String, String)> {
        r.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d["publisher"].as_str().unwrap().to_owned(), d["player"].as_str().unwrap().to_owned()))
            .collect()
    };
    let r = api.call(Method::GET, "/api/stream-ids", Some(&admin), None).await;
    assert_eq!(
        listed(&r),
        [("studio_1", "live_b"), ("studio_1", "live_c"), ("studio_1", "live_stream")]
            .map(|(a, b)| (a.into(), b.into()))
    );
    let r = api.call(Method::GET, "/stats/live_b", None, None).await;
    assert_eq!((r.status, r.body["message"].as_str()), (StatusCode::OK, Some("Publisher is currently not streaming")));
    let r = api.call(Method::DELETE, "/api/stream-ids/live_stream", Some(&admin), None).await;
    assert_eq!(r.status, StatusCode::OK);
    insta::assert_snapshot!("sls_delete", r.text);
    // The first player id went; the publisher and its other player ids stay.
    let r = api.call(Method::GET, "/api/stream-ids", Some(&admin), None).await;
    assert_eq!(listed(&r), [("studio_1", "live_b"), ("studio_1", "live_c")].map(|(a, b)| (a.into(), b.into())));
    // Stream ids in SLS's streamid forms (`host/app/name`, `app/name`) name the stream in
    // SLS's app; another app is refused.
    let body = json!({"publisher": "uplive.sls.com/live/pub_y", "player": "live/play_y", "description": ""});
    let r = api.call(Method::POST, "/api/stream-ids", Some(&admin), Some(body)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = api.call(Method::GET, "/api/stream-ids", Some(&admin), None).await;
    assert!(listed(&r).contains(&("pub_y".into(), "play_y".into())), "{:?}", r.body);
    let row = r.body["data"].as_array().unwrap().iter().find(|d| d["player"] == "play_y").unwrap().clone();
    assert!(row.get("description").is_none(), "an empty description is omitted: {row}");
    let r = api.call(Method::GET, "/stats/live%2Fplay_y", None, None).await;
    assert_eq!((r.status, r.body["message"].as_str()), (StatusCode::OK, Some("Publisher is currently not streaming")));
    let body = json!({"publisher": "other/pub_z", "player": "play_z"});
    let r = api.call(Method::POST, "/api/stream-ids", Some(&admin), Some(body)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = api.call(Method::DELETE, "/api/stream-ids/uplive.sls.com%2Flive%2Fplay_y", Some(&admin), None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = api.call(Method::DELETE, "/api/stream-ids/live_stream", Some(&admin), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    insta::assert_snapshot!("sls_delete_404", r.text);
    let r = api.call(Method::POST, "/api/stream-ids", Some(&admin), Some(json!({"player": "x"}))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["status"], "error");
    let r = api.call(Method::GET, "/health", None, None).await;
    assert_eq!(r.body["status"], "ok");
    // The SLS app is registered-only with the names as credential.
    let state = api.state.writer.projection().current();
    let live = state.apps.get(&sluice_events::AppName::parse("live").unwrap()).unwrap();
    assert!(!live.policy.publish.accept_undefined_streams);
}

#[tokio::test]
async fn sls_rate_limit_storm_then_recovery() {
    let api = given_api(&[("SLUICE_RATE_LIMIT_STATS", "600")]).await;
    api.call(Method::POST, "/api/stream-ids", Some(&bearer(ADMIN)), Some(json!({"publisher": "p", "player": "q"})))
        .await;
    let mut limited = None;
    for _ in 0..700 {
        let r = api.call(Method::GET, "/stats/q", None, None).await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = limited.expect("the storm was limited");
    assert_eq!(r.body, json!({"status": "error", "message": "Rate limit exceeded"}));
    assert!(r.headers.contains_key("retry-after"));
    // Other classes are separate.
    assert_eq!(api.call(Method::GET, "/api/stream-ids", Some(&bearer(ADMIN)), None).await.status, StatusCode::OK);
    // 600/min replenishes one every 100 ms.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(api.call(Method::GET, "/stats/q", None, None).await.status, StatusCode::OK);
    // The native API's 429 is problem+json.
    let api = given_api(&[("SLUICE_RATE_LIMIT_CONFIG", "2")]).await;
    api.admin(Method::GET, "/v1/keys", None).await;
    api.admin(Method::GET, "/v1/keys", None).await;
    let r = api.admin(Method::GET, "/v1/keys", None).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(problem_type(&r), "https://sluice.dev/problems/rate-limited");
    assert!(r.headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
}

#[tokio::test]
async fn antmedia_compatibility_shapes() {
    let api = given_api(&[]).await;
    let admin = bearer(ADMIN);
    api.admin(
        Method::POST,
        "/v1/apps",
        Some(json!({"name": "LiveApp", "policy": {
            "publish": {"methods": ["one_time_token", "jwt", "totp"]},
            "play": {"methods": ["one_time_token"]}
        }})),
    )
    .await;
    let r = api
        .call(
            Method::POST,
            "/LiveApp/rest/v2/broadcasts/create",
            Some(&admin),
            Some(json!({"streamId": "stream1", "name": "My stream", "publishType": "RTMP"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["streamId"], "stream1");
    assert_eq!(r.body["status"], "created");
    let exp = now_secs() + 3600;
    let r = api
        .call(
            Method::GET,
            &format!("/LiveApp/rest/v2/broadcasts/stream1/token?expireDate={exp}&type=publish"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["streamId"], "stream1");
    assert_eq!(r.body["expireDate"], exp);
    assert_eq!(r.body["type"], "publish");
    assert!(r.body["tokenId"].as_str().unwrap().len() >= 24);
    let shape =
        r.text.replace(r.body["tokenId"].as_str().unwrap(), "<token>").replace(&exp.to_string(), "<expireDate>");
    insta::assert_snapshot!("ams_token", shape);
    let r = api.call(Method::GET, "/LiveApp/rest/v2/broadcasts/stream1/token?type=publish", Some(&admin), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["success"], false);
    let r = api
        .call(
            Method::GET,
            &format!("/LiveApp/rest/v2/broadcasts/stream1/jwt-token?expireDate={exp}&type=play"),
            Some(&admin),
            None,
        )
        .await;
    // Ant's token calls answer every refusal 400 with a `Result`.
    assert_eq!((r.status, r.body["success"].as_bool()), (StatusCode::BAD_REQUEST, Some(false)), "no JWT secret yet");
    api.admin(Method::POST, "/v1/apps/LiveApp/secrets/jwt", None).await;
    let r = api
        .call(
            Method::GET,
            &format!("/LiveApp/rest/v2/broadcasts/stream1/jwt-token?expireDate={exp}&type=play"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["tokenId"].as_str().unwrap().split('.').count(), 3);
    let sub = json!({"subscriberId": "publisherA", "b32Secret": "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", "type": "publish"});
    let r = api
        .call(Method::POST, "/LiveApp/rest/v2/broadcasts/stream1/subscribers", Some(&admin), Some(sub.clone()))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    insta::assert_snapshot!("ams_result", r.text);
    let r = api
        .call(
            Method::POST,
            "/LiveApp/rest/v2/broadcasts/stream1/subscribers",
            Some(&admin),
            Some(json!({"subscriberId": "b", "b32Secret": "mysecret", "type": "play"})),
        )
        .await;
    // Ant answers a refused add 200 with `success: false` (BroadcastRestService.addSubscriber).
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["success"], false);
    // Seed 004's "mysecret" is 5 bytes: Sluice keeps RFC 4226's 128-bit floor (a deliberate
    // difference from Ant Media, which takes it), and says so.
    assert!(r.body["message"].as_str().unwrap().contains("16 bytes"), "{:?}", r.body);
    // Ant's own members are accepted as its clients send them back; `b32Secret` is generated
    // when absent; a `streamId` naming another stream is refused.
    let ant = json!({"subscriberId": "c", "streamId": "stream1", "subscriberName": "Cam C", "type": "play",
                     "connected": false, "currentConcurrentConnections": 0, "concurrentConnectionsLimit": 1});
    let r = api.call(Method::POST, "/LiveApp/rest/v2/broadcasts/stream1/subscribers", Some(&admin), Some(ant)).await;
    assert_eq!((r.status, r.body["success"].as_bool()), (StatusCode::OK, Some(true)), "{:?}", r.body);
    let other = json!({"subscriberId": "d", "streamId": "stream2"});
    let r = api.call(Method::POST, "/LiveApp/rest/v2/broadcasts/stream1/subscribers", Some(&admin), Some(other)).await;
    assert_eq!((r.status, r.body["success"].as_bool()), (StatusCode::OK, Some(false)), "{:?}", r.body);
    let r = api.call(Method::DELETE, "/LiveApp/rest/v2/broadcasts/stream1/subscribers/c", Some(&admin), None).await;
    assert_eq!(r.body["success"], true);
    let r =
        api.call(Method::GET, "/LiveApp/rest/v2/broadcasts/stream1/subscribers/list/0/10", Some(&admin), None).await;
    insta::assert_snapshot!("ams_subscribers", r.text);
    let r = api
        .call(Method::DELETE, "/LiveApp/rest/v2/broadcasts/stream1/subscribers/publisherA", Some(&admin), None)
        .await;
    assert_eq!(r.body["success"], true);
    let r =
        api.call(Method::GET, "/LiveApp/rest/v2/broadcasts/stream1/subscribers/list/0/10", Some(&admin), None).await;
    assert_eq!(r.body, json!([]));
    let r = api
        .call(
            Method::GET,
            &format!("/LiveApp/rest/v2/broadcasts/stream1/token?expireDate={exp}&type=publish"),
            None,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.body["success"], false);
}

/// Ant Media's REST v2 beyond tokens and subscribers, shapes checked byte for byte against
/// Ant Media Server's code (`src/main/java/io/antmedia/rest/BroadcastRestService.java` for
/// paths, verbs and which `Result` each answers; `datastore/db/types/Token.java`,
/// `Subscriber.java`, `ConnectionEvent.java`, `Broadcast.java` and `rest/model/Result.java`
/// for members and their order).
#[tokio::test]
async fn antmedia_rest_v2_drop_in() {
    let api = given_api(&[]).await;
    let admin = bearer(ADMIN);
    let call = |method: Method, path: &str, body: Option<Value>| {
        let (admin, path) = (admin.clone(), path.to_owned());
        let api = &api;
        async move { api.call(method, &path, Some(&admin), body).await }
    };
    api.admin(
        Method::POST,
        "/v1/apps",
        Some(json!({"name": "LiveApp", "policy": {
            "publish": {"methods": ["one_time_token", "totp"]},
            "play": {"methods": ["one_time_token", "totp"]}
        }})),
    )
    .await;
    for id in ["stream1", "stream2"] {
        let r =
            call(Method::POST, "/LiveApp/rest/v2/broadcasts/create", Some(json!({"streamId": id, "name": id}))).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    // A broadcast, and the list; an unknown one is 404 with no body, as Ant's getBroadcast.
    let r = call(Method::GET, "/LiveApp/rest/v2/broadcasts/stream1", None).await;
    assert_eq!(r.status, StatusCode::OK);
    insta::assert_snapshot!("ams_broadcast", r.text);
    let r = call(Method::GET, "/LiveApp/rest/v2/broadcasts/list/0/50", None).await;
    let ids: Vec<&str> = r.body.as_array().unwrap().iter().map(|b| b["streamId"].as_str().unwrap()).collect();
    assert_eq!(ids, ["stream1", "stream2"]);
    let r = call(Method::GET, "/LiveApp/rest/v2/broadcasts/list/1/50", None).await;
    assert_eq!(r.body.as_array().unwrap().len(), 1, "offset");
    let r = call(Method::GET, "/LiveApp/rest/v2/broadcasts/nothing", None).await;
    assert_eq!((r.status, r.text.as_str()), (StatusCode::NOT_FOUND, ""));
    let r = call(Method::GET, "/NoApp/rest/v2/broadcasts/list/0/10", None).await;
    assert_eq!((r.status, r.body.clone()), (StatusCode::OK, json!([])), "an unknown app lists nothing");

    // Tokens: listed (tokenId is Sluice's id, never the token), validated without being used
    // up, revoked all at once.
    let exp = now_secs() + 3600;
    let mut issued = Vec::new();
    for kind in ["publish", "play"] {
        let path = format!("/LiveApp/rest/v2/broadcasts/stream1/token?expireDate={exp}&type={kind}");
        issued.push(call(Method::GET, &path, None).await.body["tokenId"].as_str().unwrap().to_owned());
    }
    let r = call(Method::GET, "/LiveApp/rest/v2/broadcasts/stream1/tokens/list/0/10", None).await;
    let listed = r.body.as_array().unwrap().clone();
    assert_eq!(listed.len(), 2);
    for t in &listed {
        assert!(!issued.contains(&t["tokenId"].as_str().unwrap().to_owned()), "a listed token is not the token");
        assert_eq!(t["expireDate"], exp);
    }
    let shape = r.text.replace(&exp.to_string(), "<expireDate>");
    let shape = listed.iter().fold(shape, |s, t| s.replace(t["tokenId"].as_str().unwrap(), "<id>"));
    insta::assert_snapshot!("ams_token_list", shape);
    let validate = |token: &str, stream: &str, kind: &str| json!({"tokenId": token, "streamId": stream, "type": kind, "expireDate": exp, "roomId": null});
    for (body, valid) in [
        (validate(&issued[0], "stream1", "publish"), true),
        (validate(&issued[0], "stream1", "publish"), true),
        (validate(&issued[0], "stream2", "publish"), false),
        (validate(&issued[0], "stream1", "play"), false),
        (validate("guess", "stream1", "publish"), false),
    ] {
        let r = call(Method::POST, "/LiveApp/rest/v2/broadcasts/validate-token", Some(body.clone())).await;
        assert_eq!((r.status, r.body["success"].as_bool()), (StatusCode::OK, Some(valid)), "{body}");
    }
    let r = call(Method::POST, "/LiveApp/rest/v2/broadcasts/validate-token", Some(json!({"tokenId": "x"}))).await;
    assert_eq!((r.status, r.body["success"].as_bool()), (StatusCode::OK, Some(false)), "a partial Token");
    // What cannot be read stays 400 (Jersey refuses it before the service runs): a body of
    // the wrong type, a path parameter that is not a number.
    let r = call(Method::POST, "/LiveApp/rest/v2/broadcasts/validate-token", Some(json!([null, null]))).await;
    assert_eq!((r.status, r.body["success"].as_bool()), (StatusCode::BAD_REQUEST, Some(false)));
    let r = call(Method::GET, "/LiveApp/rest/v2/broadcasts/list/x/10", None).await;
    assert_eq!((r.status, r.body["success"].as_bool()), (StatusCode::BAD_REQUEST, Some(false)), "{}", r.text);
    assert_eq!(r.headers["content-type"], "application/json");
    let r = call(Method::DELETE, "/LiveApp/rest/v2/broadcasts/stream1/tokens", None).await;
    insta::assert_snapshot!("ams_revoke_tokens", r.text);
    let r = call(Method::GET, "/LiveApp/rest/v2/broadcasts/stream1/tokens/list/0/10", None).await;
    assert_eq!(r.body, json!([]));
    let r = call(
        Method::POST,
        "/LiveApp/rest/v2/broadcasts/validate-token",
        Some(validate(&issued[0], "stream1", "publish")),
    )
    .await;
    assert_eq!(r.body["success"], false, "revoked");

    // Subscribers: the /totp helper gives the code the media path accepts; a block names its
    // type; all of a stream's subscribers go at once.
    let secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";
    for id in ["publisherA", "viewerB"] {
        let body =
            json!({"subscriberId": id, "b32Secret": secret, "type": if id == "viewerB" { "play" } else { "publish" }});
        assert_eq!(
            call(Method::POST, "/LiveApp/rest/v2/broadcasts/stream1/subscribers", Some(body)).await.body["success"],
            true
        );
    }
    let before = now_secs() / 60;
    let r = call(Method::GET, "/LiveApp/rest/v2/broadcasts/stream1/subscribers/publisherA/totp", None).await;
    let after = now_secs() / 60;
    assert_eq!((r.status, r.body["success"].as_bool()), (StatusCode::OK, Some(true)), "{:?}", r.body);
    let code = r.body["dataId"].as_str().unwrap().to_owned();
    let bytes = base32::decode(base32::Alphabet::Rfc4648 { padding: false }, secret).unwrap();
    let expected: Vec<String> = [before, after]
        .iter()
        .map(|step| sluice_events::decide::totp_code(&bytes, 6, 60, *step as u64).unwrap())
        .collect();
    assert!(expected.contains(&code), "{code} is the subscriber's current code");
    insta::assert_snapshot!("ams_totp", r.text.replace(&code, "<code>"));
    let r = call(Method::GET, "/LiveApp/rest/v2/broadcasts/stream1/subscribers/nobody/totp", None).await;
    assert_eq!((r.status, r.body["success"].as_bool()), (StatusCode::OK, Some(false)));
    let r = call(Method::PUT, "/LiveApp/rest/v2/broadcasts/stream1/subscribers/viewerB/block/300/play", None).await;
    assert_eq!((r.status, r.body["success"].as_bool()), (StatusCode::OK, Some(true)), "{:?}", r.body);
    let r = call(Method::PUT, "/LiveApp/rest/v2/broadcasts/stream1/subscribers/viewerB/block/300/both", None).await;
    assert_eq!((r.status, r.body["success"].as_bool()), (StatusCode::OK, Some(false)), "an unknown type");
    let r = call(Method::PUT, "/LiveApp/rest/v2/broadcasts/stream1/subscribers/nobody/block/300/play", None).await;
    assert_eq!((r.status, r.body["success"].as_bool()), (StatusCode::OK, Some(false)), "an unknown subscriber");
    let state = api.state.writer.projection().current();
    let viewer = &state.apps[&sluice_events::AppName::parse("LiveApp").unwrap()].subscribers[&(
        sluice_events::StreamName::parse("stream1").unwrap(),
        sluice_events::SubscriberId::parse("viewerB").unwrap(),
    )];
    assert_eq!(viewer.blocked_action, Some(sluice_events::Action::Play));
    let r = call(Method::GET, "/LiveApp/rest/v2/broadcasts/stream1/subscribers/list/0/10", None).await;
    let blocked_until = r.body[1]["blockedUntilUnitTimeStampMs"].as_i64().unwrap();
    assert!(blocked_until > (now_secs() + 290) * 1000, "{blocked_until}");
    insta::assert_snapshot!("ams_subscriber_list_blocked", r.text.replace(&blocked_until.to_string(), "<until>"));
    // No admission yet: no connection events (the e2e suite has a real one).
    let r = call(Method::GET, "/LiveApp/rest/v2/broadcasts/stream1/connection-events/0/10", None).await;
    assert_eq!((r.status, r.body.clone()), (StatusCode::OK, json!([])));
    let r = call(Method::GET, "/LiveApp/rest/v2/broadcasts/stream1/subscriber-stats/list/0/10", None).await;
    insta::assert_snapshot!("ams_subscriber_stats", r.text);
    let r = call(Method::DELETE, "/LiveApp/rest/v2/broadcasts/stream1/subscribers", None).await;
    assert_eq!(r.body["success"], true);
    let r = call(Method::GET, "/LiveApp/rest/v2/broadcasts/stream1/subscribers/list/0/10", None).await;
    assert_eq!(r.body, json!([]));

    // Deleting a broadcast; a second delete is Ant's `success: false`, with 200.
    let r = call(Method::DELETE, "/LiveApp/rest/v2/broadcasts/stream2", None).await;
    assert_eq!((r.status, r.body["success"].as_bool()), (StatusCode::OK, Some(true)));
    let r = call(Method::DELETE, "/LiveApp/rest/v2/broadcasts/stream2", None).await;
    assert_eq!((r.status, r.body["success"].as_bool()), (StatusCode::OK, Some(false)));
    assert_eq!(call(Method::GET, "/LiveApp/rest/v2/broadcasts/stream2", None).await.status, StatusCode::NOT_FOUND);
    // A read key may look, not change.
    let (_, read) = api.key("read", json!({})).await;
    let r = api.call(Method::GET, "/LiveApp/rest/v2/broadcasts/list/0/10", Some(&bearer(&read)), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = api.call(Method::DELETE, "/LiveApp/rest/v2/broadcasts/stream1", Some(&bearer(&read)), None).await;
    assert_eq!((r.status, r.body["success"].as_bool()), (StatusCode::FORBIDDEN, Some(false)));
}

#[tokio::test]
async fn idempotency_keys_apply_a_retried_post_once() {
    let api = given_api(&[]).await;
    api.admin(Method::POST, "/v1/apps", Some(json!({"name": "studio"}))).await;
    let post_named = |key: &'static str, name: &str| {
        Request::builder()
            .method(Method::POST)
            .uri("/v1/apps/studio/streams")
            .header("authorization", bearer(ADMIN))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(Body::from(json!({"name": name}).to_string()))
            .unwrap()
    };
    let post = |key: &'static str| post_named(key, "cam");
    let first = api.send(post("retry-1")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = api.send(post("retry-1")).await;
    assert_eq!(again.status, StatusCode::CREATED, "{:?}", again.body);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.headers["sluice-position"], first.headers["sluice-position"]);
    let registered = api.log().await.iter().filter(|e| e.event.event_type() == "StreamRegistered").count();
    assert_eq!(registered, 1);
    // A different key is a different request: the stream exists now.
    assert_eq!(api.send(post("retry-2")).await.status, StatusCode::CONFLICT);
    // The same key with another body is not a retry: 422 problem+json, and nothing written
    // (issue #16 item 13; it answered `replayed` before).
    let reused = api.send(post_named("retry-1", "cam2")).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY, "{:?}", reused.body);
    assert_eq!(reused.headers["content-type"], "application/problem+json");
    assert!(reused.headers.get("idempotent-replayed").is_none());
    assert!(reused.body["detail"].as_str().unwrap().contains("Idempotency-Key"), "{:?}", reused.body);
    let streams = api.admin(Method::GET, "/v1/apps/studio/streams/cam2", None).await;
    assert_eq!(streams.status, StatusCode::NOT_FOUND);
    // The same key on another path is another request too.
    let other_path = Request::builder()
        .method(Method::POST)
        .uri("/v1/apps")
        .header("authorization", bearer(ADMIN))
        .header("content-type", "application/json")
        .header("idempotency-key", "retry-1")
        .body(Body::from(json!({"name": "other"}).to_string()))
        .unwrap();
    assert_eq!(api.send(other_path).await.status, StatusCode::CREATED, "keys are scoped by method and path");
    // A body over the limit under a key: 413 problem+json before anything is digested or written.
    let huge = Request::builder()
        .method(Method::POST)
        .uri("/v1/apps")
        .header("authorization", bearer(ADMIN))
        .header("content-type", "application/json")
        .header("idempotency-key", "big-1")
        .body(Body::from(vec![b' '; 200 * 1024]))
        .unwrap();
    let r = api.send(huge).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    // A replayed key creation never hands out a secret that was not the one stored.
    let key = |path: &'static str, body: Value| {
        Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("authorization", bearer(ADMIN))
            .header("content-type", "application/json")
            .header("idempotency-key", "key-1")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let first = api.send(key("/v1/keys", json!({"name": "k", "role": "read"}))).await;
    assert!(first.body["secret"].is_string());
    let again = api.send(key("/v1/keys", json!({"name": "k", "role": "read"}))).await;
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert!(again.body.get("secret").is_none(), "{:?}", again.body);
    let sls = api.send(key("/api/keys", json!({"name": "s", "permissions": "read"}))).await;
    assert_eq!(sls.status, StatusCode::OK);
    let sls_again = api.send(key("/api/keys", json!({"name": "s", "permissions": "read"}))).await;
    assert_eq!(sls_again.status, StatusCode::CONFLICT);
    assert_eq!(sls_again.body["status"], "error");
}

#[tokio::test]
async fn concurrent_conflicting_writes_lose_no_update() {
    let api = given_api(&[]).await;
    api.admin(Method::POST, "/v1/apps", Some(json!({"name": "studio"}))).await;
    // 100 racing registrations of one name: exactly one wins.
    let registrations = futures::future::join_all((0..100).map(|i| {
        let body = json!({"name": "cam", "description": format!("writer {i}")});
        api.admin(Method::POST, "/v1/apps/studio/streams", Some(body))
    }))
    .await;
    let won = registrations.iter().filter(|r| r.status == StatusCode::CREATED).count();
    let lost = registrations.iter().filter(|r| r.status == StatusCode::CONFLICT).count();
    assert_eq!((won, lost), (1, 99));
    // 100 racing updates: each one that answered 200 is in the log at its own version.
    let updates = futures::future::join_all((0..100).map(|i| {
        api.admin(Method::PATCH, "/v1/apps/studio/streams/cam", Some(json!({"description": format!("update {i}")})))
    }))
    .await;
    let ok: Vec<&Reply> = updates.iter().filter(|r| r.status == StatusCode::OK).collect();
    assert!(updates.iter().all(|r| r.status == StatusCode::OK || r.status == StatusCode::CONFLICT));
    let log = api.state.writer.store().read_stream("stream-studio.cam").await.unwrap();
    assert_eq!(log.len(), 1 + ok.len(), "one event per successful write, none for a 409");
    assert_eq!(log.iter().map(|e| e.version).collect::<Vec<_>>(), (0..log.len() as u64).collect::<Vec<_>>());
    // Each retry round lets at least the first writer at the current version through.
    assert!(!ok.is_empty());
    let final_description =
        api.admin(Method::GET, "/v1/apps/studio/streams/cam", None).await.body["description"].clone();
    let sluice_events::Event::StreamUpdated(last) = &log.last().unwrap().event else { panic!("not an update") };
    assert_eq!(final_description, json!(last.description), "the projection shows the last committed write");
}

#[tokio::test]
async fn postgres_down_is_a_503_and_reads_go_on() {
    let mut api = given_api(&[]).await;
    api.admin(Method::POST, "/v1/apps", Some(json!({"name": "studio"}))).await;
    api.pg.stop();
    let r = api.admin(Method::POST, "/v1/apps/studio/streams", Some(json!({"name": "cam"}))).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert!(r.body["detail"].as_str().unwrap().contains("nothing was written"));
    // Reads come from the projection.
    let r = api.admin(Method::GET, "/v1/apps/studio", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["streams"], 0);
    assert_eq!(api.call(Method::GET, "/ready", None, None).await.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_client_hammering_unknown_routes_adds_a_bounded_audit() {
    let api = given_api(&[]).await;
    // 3,000 anonymous calls to paths that match no route (the hostile review's case).
    for i in 0..3000 {
        let r = api.call(Method::GET, &format!("/v1/scan-{i}"), None, None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
    let mut calls = 0;
    let mut entries = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let log = api.log().await;
        let batches: Vec<_> = log
            .iter()
            .filter_map(|e| match &e.event {
                sluice_events::Event::ApiAccessed(b) => Some(b.clone()),
                _ => None,
            })
            .collect();
        let scans: Vec<_> = batches.iter().flat_map(|b| b.entries.iter()).filter(|a| a.route == "(no route)").collect();
        calls = scans.iter().map(|a| a.count).sum::<u64>();
        entries = scans.len();
        if calls == 3000 {
            break;
        }
    }
    // Every call is counted; the entries are one per batch at most (a batch gathers for
    // about a second), not one per call.
    assert_eq!(calls, 3000);
    let batches = api.log().await.iter().filter(|e| e.event.event_type() == "ApiAccessed").count();
    assert!(entries <= batches && entries < 100, "{entries} entries in {batches} batches");
    assert!(!api.log().await.iter().any(|e| format!("{:?}", e.event).contains("scan-")), "no scanned path recorded");
}

#[tokio::test]
async fn events_audit_and_last_used() {
    let api = given_api(&[]).await;
    api.admin(Method::POST, "/v1/apps", Some(json!({"name": "studio"}))).await;
    let r = api.admin(Method::GET, "/v1/events?after=0&limit=2", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["events"].as_array().unwrap().len(), 2);
    assert_eq!(r.body["events"][0]["type"], "ApiKeyCreated");
    assert_eq!(r.body["next_after"], 2);
    assert!(!r.body.to_string().contains(ADMIN));
    let r = api.admin(Method::GET, "/v1/events?after=2", None).await;
    assert_eq!(r.body["events"][0]["type"], "AppCreated");
    // The audit arrives in batches (about once a second), not per request.
    let mut found = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let log = api.log().await;
        if let Some(e) = log.iter().find(|e| e.event.event_type() == "ApiAccessed") {
            found = Some(e.clone());
            break;
        }
    }
    let e = found.expect("an ApiAccessed batch");
    let sluice_events::Event::ApiAccessed(batch) = &e.event else { unreachable!() };
    assert_eq!(batch.instance, "test");
    assert!(batch.entries.iter().map(|a| a.count).sum::<u64>() >= 3);
    assert!(
        batch.entries.iter().any(|a| a.subject == "key:bootstrap-admin" && a.route == "/v1/apps" && a.status == 201)
    );
    // The two identical GETs are one entry with a count (issue #16 item 9).
    let gets = batch.entries.iter().find(|a| a.route == "/v1/events" && a.method == "GET").unwrap();
    assert_eq!((gets.count, gets.last.is_some()), (2, true), "{gets:?}");
    let key = api.admin(Method::GET, "/v1/keys/bootstrap-admin", None).await;
    assert!(key.body["last_used"].as_i64().unwrap() >= now_secs() - 60);
    let r = api.call(Method::GET, "/v1/events", Some(&basic("root", "correct horse battery")), None).await;
    assert_eq!(r.status, StatusCode::OK);
    // Server-Sent Events: the first frame is the first event.
    let req = Request::builder()
        .uri("/v1/events/stream?after=0")
        .header("authorization", bearer(ADMIN))
        .body(Body::empty())
        .unwrap();
    let res = api.router.clone().oneshot(req).await.unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame()).await.unwrap().unwrap().unwrap();
    let text = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
    assert!(text.contains("event: ApiKeyCreated") && text.contains("id: 1"), "{text}");
}

#[tokio::test]
async fn allow_list_cors_and_csp() {
    let api = given_api(&[
        ("SLUICE_REMOTE_ALLOWED_CIDRS", "10.0.0.0/8"),
        ("SLUICE_CORS_ALLOWED_ORIGINS", "https://console.example"),
        ("SLUICE_CONTENT_SECURITY_POLICY", "default-src 'self'"),
    ])
    .await;
    let r = api.admin(Method::GET, "/v1/apps", None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.body["detail"].as_str().unwrap().contains("remote_allowed_cidrs"));
    let r = api.call(Method::GET, "/health", None, None).await;
    assert_eq!(r.status, StatusCode::OK, "probes are outside the allow-list");
    assert_eq!(r.headers["content-security-policy"], "default-src 'self'");
    let req = Request::builder()
        .method(Method::OPTIONS)
        .uri("/v1/apps")
        .header("origin", "https://console.example")
        .header("access-control-request-method", "POST")
        .body(Body::empty())
        .unwrap();
    let r = api.send(req).await;
    assert_eq!(r.headers["access-control-allow-origin"], "https://console.example");
}

#[tokio::test]
async fn openapi_is_committed_and_every_documented_route_is_served() {
    let api = given_api(&[]).await;
    let served = api.call(Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(served.status, StatusCode::OK);
    let text = sluice_control_plane::api::openapi::document_text();
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), served.body);
    let path = sluice_tests::workspace_root().join("schemas/openapi.json");
    if std::env::var_os("SLUICE_UPDATE_SCHEMAS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == text,
        "schemas/openapi.json is stale: run SLUICE_UPDATE_SCHEMAS=1 cargo test -p sluice-tests --test api openapi"
    );
    let doc = served.body;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            if path.ends_with("/events/stream") || path.ends_with("/decisions/stream") {
                // An endless SSE body; served and read in events_audit_and_last_used and the
                // console's browser test.
                continue;
            }
            let concrete =
                path.split('/').map(|s| if s.starts_with('{') { "x1" } else { s }).collect::<Vec<_>>().join("/");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = api.admin(m, &concrete, None).await;
            assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            let detail = r.body.get("detail").and_then(Value::as_str).unwrap_or_default();
            assert!(!detail.starts_with("route "), "{method} {path} is documented but not routed");
        }
    }
}

/// A concrete path for a route's template (`{x}` → `x1`).
fn concrete(template: &str) -> String {
    template.split('/').map(|s| if s.starts_with('{') { "x1" } else { s }).collect::<Vec<_>>().join("/")
}

/// A request to `route` from `ip`, with `auth` (no body: every guard answers before one is read).
fn guarded_request(route: &Route, ip: [u8; 4], auth: Option<&str>) -> Request<Body> {
    let mut req = Request::builder().method(route.method.clone()).uri(concrete(route.path));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let mut req = req.body(Body::empty()).unwrap();
    req.extensions_mut().insert(axum::extract::ConnectInfo(SocketAddr::from((ip, 40000))));
    req
}

/// Every route of the table: without credentials a route that declares a role answers 401,
/// with a key one role short 403; one that declares none never asks. The handler never runs
/// for either, whatever the route.
#[tokio::test]
async fn every_route_enforces_the_role_its_row_declares() {
    use sluice_control_plane::api::routes::table;
    use sluice_events::Role;
    let api = given_api(&[]).await;
    let (_, read) = api.key("read", json!({})).await;
    let (_, write) = api.key("write", json!({})).await;
    let routes = table();
    assert!(routes.len() >= 45, "{} routes", routes.len());
    for route in &routes {
        let what = format!("{} {}", route.method, route.path);
        let anonymous = api.send(guarded_request(route, [127, 0, 0, 1], None)).await.status;
        let short = match route.guard.role {
            None => {
                assert_ne!(anonymous, StatusCode::UNAUTHORIZED, "{what} declares no role");
                continue;
            }
            Some(Role::Read) => {
                assert_eq!(anonymous, StatusCode::UNAUTHORIZED, "{what}");
                continue;
            }
            Some(Role::Write) => &read,
            Some(Role::Admin) => &write,
        };
        assert_eq!(anonymous, StatusCode::UNAUTHORIZED, "{what} without credentials");
        let r = api.send(guarded_request(route, [127, 0, 0, 1], Some(&bearer(short)))).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{what} with a key one role short: {:?}", r.body);
    }
}

/// Every route of the table counts against the rate class its row declares, and no other: with
/// one request a minute per class, a request to another route of the same class from the same
/// address uses the route's one, and a route of another class is not affected.
#[tokio::test]
async fn every_route_counts_against_the_rate_class_its_row_declares() {
    use sluice_control_plane::api::limits::Class;
    use sluice_control_plane::api::routes::table;
    let api = given_api(&[
        ("SLUICE_RATE_LIMIT_API", "1"),
        ("SLUICE_RATE_LIMIT_STATS", "1"),
        ("SLUICE_RATE_LIMIT_CONFIG", "1"),
        ("SLUICE_REMOTE_ALLOWED_CIDRS", "127.0.0.0/8"),
    ])
    .await;
    let routes = table();
    // Per class, a route whose request ends (not the SSE tail) to spend the class's one request.
    let spender =
        |class: Class| routes.iter().find(|r| r.guard.class == Some(class) && !r.path.ends_with("/stream")).unwrap();
    let admin = bearer(ADMIN);
    for (i, route) in routes.iter().enumerate() {
        let what = format!("{} {}", route.method, route.path);
        // A fresh address per route: 127.0.<i>.<class>.
        for (k, class) in Class::ALL.into_iter().enumerate() {
            if route.produces == "text/event-stream" && route.guard.class != Some(class) {
                continue; // admitted, it would stream for ever; refused, it is checked
            }
            let ip = [127, 0, i as u8 + 1, k as u8 + 1];
            let spent = api.send(guarded_request(spender(class), ip, Some(&admin))).await.status;
            assert_ne!(spent, StatusCode::TOO_MANY_REQUESTS, "the first {} request", class.as_str());
            let r = api.send(guarded_request(route, ip, Some(&admin))).await;
            if route.guard.class == Some(class) {
                assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{what} counts against {}", class.as_str());
            } else {
                assert_ne!(r.status, StatusCode::TOO_MANY_REQUESTS, "{what} does not count against {}", class.as_str());
            }
        }
    }
}

/// Issue #16, item 13: the smaller API defects a hostile review found.
#[tokio::test]
async fn positions_past_i64_query_errors_and_wrong_methods_are_problems_and_app_names_ignore_case() {
    let api = given_api(&[]).await;
    // A position beyond the log's range is refused, not read as position 1.
    let r = api.admin(Method::GET, "/v1/events?after=9223372036854775808", None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    // A query string of the wrong type: problem+json naming it.
    let r = api.admin(Method::GET, "/v1/events?limit=many", None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert!(r.body["detail"].as_str().unwrap().contains("limit"), "{:?}", r.body);
    let r = api.admin(Method::GET, "/v1/events?colour=red", None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "unknown query parameters are refused too");
    assert_eq!(r.headers["content-type"], "application/problem+json");
    // A method the path does not serve: 405 problem+json, with Allow.
    let r = api.admin(Method::PUT, "/v1/keys", None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert!(r.headers.contains_key("allow"), "{:?}", r.headers);
    // App names are one namespace whatever their case.
    assert_eq!(api.admin(Method::POST, "/v1/apps", Some(json!({"name": "Studio"}))).await.status, StatusCode::CREATED);
    let r = api.admin(Method::POST, "/v1/apps", Some(json!({"name": "studio"}))).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("Studio"), "{:?}", r.body);
}

/// Issue #16, item 1: a `write` key cannot end up with a policy it could not set directly: it
/// may create an app with the default policy, but not with a policy of its choice, and it may
/// not delete an app (deleting and re-creating was the way around `PUT …/policy`).
#[tokio::test]
async fn a_write_key_cannot_set_a_policy_by_deleting_and_recreating_the_app() {
    let api = given_api(&[]).await;
    let (_, write) = api.key("write", json!({})).await;
    let locked = json!({"publish": {"methods": ["one_time_token"]}, "play": {"methods": ["one_time_token"]}});
    let r = api.admin(Method::POST, "/v1/apps", Some(json!({"name": "studio", "policy": locked}))).await;
    assert_eq!(r.status, StatusCode::CREATED);
    // The ways around PUT …/policy, each refused.
    let r = api.call(Method::DELETE, "/v1/apps/studio", Some(&bearer(&write)), None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "a write key deleted the app: {:?}", r.body);
    let open = json!({"publish": {"methods": ["open"]}, "play": {"methods": ["open"]},
                      "webhook": {"url": "http://127.0.0.1:18999/internal/admin"}});
    let r =
        api.call(Method::POST, "/v1/apps", Some(&bearer(&write)), Some(json!({"name": "other", "policy": open}))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "a write key chose a policy: {:?}", r.body);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    // What a write key may still do: create an app with the default policy.
    let r = api.call(Method::POST, "/v1/apps", Some(&bearer(&write)), Some(json!({"name": "plain"}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    // The policy is as the admin set it; admin deletes.
    let r = api.admin(Method::GET, "/v1/apps/studio/policy", None).await;
    assert_eq!(r.body["publish"]["methods"], json!(["one_time_token"]));
    assert_eq!(api.admin(Method::DELETE, "/v1/apps/plain", None).await.status, StatusCode::NO_CONTENT);
}

/// Issue #16, item 1: a policy's webhook may not point at the workers' own network (loopback,
/// private, link-local and the metadata address) unless `SLUICE_WEBHOOK_ALLOWED` lists it.
#[tokio::test]
async fn webhook_urls_to_internal_addresses_are_refused_unless_listed() {
    let hooked = |url: &str| json!({"publish": {"methods": ["webhook"]}, "play": {"methods": ["open"]}, "webhook": {"url": url}});
    let api = given_api(&[]).await;
    api.admin(Method::POST, "/v1/apps", Some(json!({"name": "studio"}))).await;
    for url in [
        "http://127.0.0.1:18999/internal/admin",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.7/hook",
        "http://[::1]:8080/",
        "http://localhost:9935/v1/decide",
    ] {
        let r = api.admin(Method::PUT, "/v1/apps/studio/policy", Some(hooked(url))).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{url}: {:?}", r.body);
        assert!(r.body["detail"].as_str().unwrap().contains("SLUICE_WEBHOOK_ALLOWED"), "{url}: {:?}", r.body);
        let r = api.admin(Method::POST, "/v1/apps", Some(json!({"name": "other", "policy": hooked(url)}))).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{url} at creation: {:?}", r.body);
    }
    // Listed, it is accepted.
    let api = given_api(&[("SLUICE_WEBHOOK_ALLOWED", "127.0.0.1,10.0.0.0/8")]).await;
    api.admin(Method::POST, "/v1/apps", Some(json!({"name": "studio"}))).await;
    for url in ["http://127.0.0.1:18999/hook", "http://10.0.0.7/hook"] {
        let r = api.admin(Method::PUT, "/v1/apps/studio/policy", Some(hooked(url))).await;
        assert_eq!(r.status, StatusCode::OK, "{url}: {:?}", r.body);
    }
}

/// `GET /v1/apps` as admin, with one more header.
async fn get_with(api: &Api, header: Option<(&str, &str)>) -> StatusCode {
    let mut req =
        Request::builder().method(Method::GET).uri("/v1/apps").header("authorization", format!("Bearer {ADMIN}"));
    if let Some((k, v)) = header {
        req = req.header(k, v);
    }
    api.send(req.body(Body::empty()).unwrap()).await.status
}

/// Behind a reverse proxy (issue #18): from a trusted proxy, `X-Forwarded-For` and
/// `Forwarded` name the client, and the allow-list, the audit and the rate limits see it; from
/// anyone else the headers change nothing.
#[tokio::test]
async fn a_trusted_proxy_names_the_client_and_no_one_else_can() {
    // The test's peer (127.0.0.1) is the proxy; clients come from 203.0.113.0/24.
    let api =
        given_api(&[("SLUICE_TRUSTED_PROXIES", "127.0.0.1/32"), ("SLUICE_REMOTE_ALLOWED_CIDRS", "203.0.113.0/24")])
            .await;
    assert_eq!(get_with(&api, None).await, StatusCode::FORBIDDEN, "the proxy itself is not a client");
    assert_eq!(get_with(&api, Some(("x-forwarded-for", "203.0.113.7"))).await, StatusCode::OK);
    assert_eq!(get_with(&api, Some(("forwarded", "for=\"203.0.113.8:5000\";proto=https"))).await, StatusCode::OK);
    assert_eq!(get_with(&api, Some(("x-forwarded-for", "198.51.100.1"))).await, StatusCode::FORBIDDEN);
    // A client cannot smuggle an allowed address through the proxy.
    assert_eq!(get_with(&api, Some(("x-forwarded-for", "203.0.113.7, 198.51.100.1"))).await, StatusCode::FORBIDDEN);
    // The audit has the client, not the proxy (the allow-list's refusals are not audited).
    let audited = || async {
        let log = api.log().await;
        format!("{:?}", log.iter().filter(|e| e.event.event_type() == "ApiAccessed").collect::<Vec<_>>())
    };
    let mut seen = String::new();
    for _ in 0..100 {
        seen = audited().await;
        if seen.contains("203.0.113.7") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(seen.contains("203.0.113.7") && !seen.contains("127.0.0.1"), "{seen}");

    // Without trusted proxies (the default) the headers are ignored: no spoofing.
    let api = given_api(&[("SLUICE_REMOTE_ALLOWED_CIDRS", "203.0.113.0/24")]).await;
    assert_eq!(get_with(&api, Some(("x-forwarded-for", "203.0.113.7"))).await, StatusCode::FORBIDDEN);
    assert_eq!(get_with(&api, Some(("forwarded", "for=203.0.113.7"))).await, StatusCode::FORBIDDEN);
}
