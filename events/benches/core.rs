//! `cargo bench -p sluice-events --bench core`
//!
//! On a state of 100k streams and 1M one-time tokens:
//! - `apply` throughput and the state's resident memory;
//! - `decide` per method, as criterion means and as per-call percentiles (p50/p99/p99.9),
//!   because the targets are stated as p99.
//!
//! Percentiles are written to `target/bench-core.json`.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // a benchmark reads the clock and /proc

use std::hint::black_box;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use base64::Engine as _;
use criterion::{Criterion, criterion_group};
use sluice_events::decide::{stream_hash, stream_hmac, totp_code};
use sluice_events::event::*;
use sluice_events::*;

const T0: Timestamp = Timestamp(1_800_000_000_000);
const HASH_SECRET: &[u8] = b"bench-hash-secret-0123456789";
const JWT_SECRET: &[u8] = b"bench-jwt-secret-0123456789-0123456789";
const TOTP_SECRET: &[u8] = b"12345678901234567890";
const STREAMS: u64 = 100_000;
const TOKENS: u64 = 1_000_000;

fn key() -> SealingKey {
    SealingKey::new("bench", [9; 32])
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

fn app(n: &str) -> AppName {
    AppName::parse(n).unwrap()
}

fn policy(methods: &[Method]) -> Policy {
    let ap =
        ActionPolicy { methods: methods.iter().copied().collect(), cidrs: vec![], accept_undefined_streams: false };
    Policy { publish: ap.clone(), play: ap, ..Policy::default() }
}

struct World {
    state: AuthState,
    apply_events_per_sec: f64,
    state_bytes: u64,
}

/// One app per method, 100k streams spread over them, 1M tokens on the `otp` app.
fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let k = key();
        let mut events: Vec<Event> = Vec::new();
        for (name, methods) in [
            ("open", &[Method::Open][..]),
            ("hash", &[Method::Hash]),
            ("hmac", &[Method::Hmac]),
            ("otp", &[Method::OneTimeToken]),
            ("jwt", &[Method::Jwt]),
            ("totp", &[Method::Totp]),
        ] {
            events.push(AppCreated { app: app(name), policy: policy(methods) }.into());
            for kind in [SecretKind::Hash, SecretKind::Jwt] {
                let secret = if kind == SecretKind::Jwt { JWT_SECRET } else { HASH_SECRET };
                let purpose = sluice_events::state::app_secret_purpose(&app(name), kind);
                events
                    .push(AppSecretRotated { app: app(name), kind, secret: k.seal(&purpose, secret, [1; 24]) }.into());
            }
        }
        let apps = ["open", "hash", "hmac", "otp", "jwt", "totp"];
        for i in 0..STREAMS {
            let a = apps[(i % apps.len() as u64) as usize];
            events.push(
                StreamRegistered {
                    plays: None,
                    app: app(a),
                    name: StreamName::parse(&format!("s{i}")).unwrap(),
                    publish_name: None,
                    description: None,
                }
                .into(),
            );
        }
        let sub = SubscriberId::parse("alice").unwrap();
        let s5 = StreamName::parse("s5").unwrap();
        events.push(
            SubscriberAdded {
                app: app("totp"),
                stream: s5.clone(),
                subscriber_id: sub.clone(),
                action: None,
                secret: k.seal(
                    &sluice_events::state::subscriber_secret_purpose(&app("totp"), &s5, &sub),
                    TOTP_SECRET,
                    [2; 24],
                ),
            }
            .into(),
        );
        // 1M tokens on the otp app's streams (s3, s9, s15, … are otp's).
        for t in 0..TOKENS {
            let stream = 3 + 6 * (t % (STREAMS / 6));
            events.push(
                TokenIssued {
                    token_sha256: Sha256Digest::of(format!("tok-{t}").as_bytes()),
                    app: app("otp"),
                    stream: StreamName::parse(&format!("s{stream}")).unwrap(),
                    action: Action::Play,
                    expires_at: Some(T0.plus_secs(86_400)),
                }
                .into(),
            );
        }
        let recorded: Vec<RecordedEvent> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| RecordedEvent {
                position: Position(i as u64 + 1),
                event_id: uuid::Uuid::from_u128(i as u128),
                stream: String::new(),
                version: 0,
                event,
                metadata: Metadata::default(),
                recorded_at: T0,
                hash: GENESIS,
            })
            .collect();
        let before = rss_bytes();
        let mut state = AuthState::with_keyring(Arc::new(Keyring::new(key())));
        let started = Instant::now();
        for r in &recorded {
            state.apply(r).unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        let state_bytes = rss_bytes().saturating_sub(before);
        let n = recorded.len() as f64;
        drop(recorded);
        World { state, apply_events_per_sec: n / secs, state_bytes }
    })
}

fn req(app_name: &str, stream: &str, action: Action, credential: Credential) -> AccessRequest {
    AccessRequest {
        id: uuid::Uuid::nil(),
        app: app(app_name),
        stream: StreamName::parse(stream).unwrap(),
        action,
        protocol: Protocol::Rtmp,
        client_ip: "10.0.0.1".parse().unwrap(),
        credential,
        client_id: None,
    }
}

/// The requests, one per method, each of which is allowed.
fn cases() -> Vec<(&'static str, AccessRequest)> {
    let exp = T0.as_secs() + 600;
    let hash = stream_hash("s1", Action::Publish, HASH_SECRET).to_hex();
    let mac =
        base64::engine::general_purpose::STANDARD.encode(stream_hmac("s2", Action::Play, exp, HASH_SECRET).unwrap());
    let jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"stream": "s4", "action": "play", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET),
    )
    .unwrap();
    let code = totp_code(TOTP_SECRET, 6, 60, (T0.as_secs() / 60) as u64).unwrap();
    vec![
        ("open (registered-only registry)", req("open", "s0", Action::Publish, Credential::default())),
        ("hash", req("hash", "s1", Action::Publish, Credential::token(&hash))),
        ("hmac", req("hmac", "s2", Action::Play, Credential { expires: Some(exp), ..Credential::token(&mac) })),
        ("one_time_token (1M tokens)", req("otp", "s3", Action::Play, Credential::token("tok-0"))),
        ("jwt_hs256", req("jwt", "s4", Action::Play, Credential::token(&jwt))),
        (
            "totp",
            req(
                "totp",
                "s5",
                Action::Publish,
                Credential {
                    subscriber_id: Some(SubscriberId::parse("alice").unwrap()),
                    subscriber_code: Some(SecretString::new(code)),
                    ..Credential::default()
                },
            ),
        ),
        ("deny: unregistered stream", req("open", "nope", Action::Publish, Credential::default())),
    ]
}

fn bench_decide(c: &mut Criterion) {
    let w = world();
    let mut g = c.benchmark_group("decide");
    for (name, r) in cases() {
        let d = decide(&w.state, &r, T0);
        assert_eq!(d.is_allow(), !name.starts_with("deny"), "{name}: {d:?}");
        g.bench_function(name, |b| b.iter(|| decide(black_box(&w.state), black_box(&r), T0)));
    }
    g.finish();
}

fn percentiles() -> serde_json::Value {
    let w = world();
    let mut out = serde_json::Map::new();
    for (name, r) in cases() {
        let n = if name.starts_with("jwt") || name.starts_with("totp") { 100_000 } else { 300_000 };
        let mut ns: Vec<u64> = Vec::with_capacity(n);
        for _ in 0..10_000 {
            black_box(decide(&w.state, &r, T0));
        }
        for _ in 0..n {
            let t = Instant::now();
            black_box(decide(black_box(&w.state), black_box(&r), T0));
            ns.push(t.elapsed().as_nanos() as u64);
        }
        ns.sort_unstable();
        let p = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)];
        println!("decide {name:<34} p50 {:>6} ns  p99 {:>6} ns  p99.9 {:>6} ns", p(0.50), p(0.99), p(0.999));
        out.insert(name.into(), serde_json::json!({"p50_ns": p(0.5), "p99_ns": p(0.99), "p999_ns": p(0.999)}));
    }
    out.into()
}

criterion_group!(benches, bench_decide);

fn main() {
    let w = world();
    println!(
        "apply: {:.0} events/s over {} events; AuthState resident size {:.0} MiB ({} streams, {} tokens)",
        w.apply_events_per_sec,
        w.state.position(),
        w.state_bytes as f64 / (1024.0 * 1024.0),
        STREAMS,
        TOKENS
    );
    let digest_started = Instant::now();
    let digest = w.state.digest();
    println!("digest: {} in {:.0} ms", &digest.to_hex()[..16], digest_started.elapsed().as_secs_f64() * 1e3);
    // A worker's cold start from a snapshot of this state (the bytes a worker would read from
    // its local file or NATS): encode once, then decode three times and keep the best.
    let encode_started = Instant::now();
    let digest = w.state.access_digest();
    let digest_ms = encode_started.elapsed().as_secs_f64() * 1e3;
    let bytes = state::snapshot::encode_with_digest(&w.state, digest);
    let encode_ms = encode_started.elapsed().as_secs_f64() * 1e3 - digest_ms;
    let mut decode_ms = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let (booted, _) = state::snapshot::decode(&bytes, Some(Arc::new(Keyring::new(key())))).unwrap();
        decode_ms = decode_ms.min(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(booted.tokens.len() as u64, TOKENS);
        drop(booted);
    }
    println!(
        "snapshot: {:.1} MiB; access digest {digest_ms:.0} ms, encode {encode_ms:.0} ms, decode (cold start) {decode_ms:.0} ms",
        bytes.len() as f64 / (1024.0 * 1024.0)
    );
    let pct = percentiles();
    let report = serde_json::json!({
        "snapshot_bytes": bytes.len(),
        "snapshot_encode_ms": encode_ms,
        "snapshot_decode_ms": decode_ms,
        "apply_events_per_sec": w.apply_events_per_sec,
        "state_resident_bytes": w.state_bytes,
        "decide": pct,
    });
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-core.json");
    let _ = std::fs::write(path, serde_json::to_string_pretty(&report).unwrap());
    benches();
    Criterion::default().configure_from_args().final_summary();
}
