//! `cargo bench -p sluice-control-plane --bench api`
//!
//! The per-request work in front of every REST handler, on a state holding 10,000 API keys:
//! the client's rate-limit check (governor, keyed by IP) plus the bearer key check (SHA-256
//! of the presented secret, lookup by digest, constant-time compare, revocation, expiry and
//! CIDR). Target: ≤ 1 µs together. The HTTP figures come from `ops/bench/api-http` (wrk).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, criterion_group, criterion_main};
use sluice_control_plane::api::auth::Authenticator;
use sluice_control_plane::api::limits::{Class, Limiters};
use sluice_control_plane::config::Config;
use sluice_events::event::{ApiKeyCreated, GENESIS};
use sluice_events::*;

const T0: Timestamp = Timestamp(1_800_000_000_000);
const KEYS: u64 = 10_000;

fn state() -> AuthState {
    let mut state = AuthState::new();
    for i in 0..KEYS {
        let secret = format!("sk_bench_secret_{i:08}");
        let event = Event::ApiKeyCreated(ApiKeyCreated {
            key_id: KeyId::parse(&format!("key{i}")).unwrap(),
            name: format!("key {i}"),
            role: Role::Write,
            secret_sha256: Sha256Digest::of(secret.as_bytes()),
            cidrs: vec![Cidr::parse("127.0.0.0/8").unwrap()],
            expires_at: None,
        });
        state
            .apply(&RecordedEvent {
                position: Position(i + 1),
                event_id: uuid::Uuid::from_u128(i as u128),
                stream: String::new(),
                version: 0,
                event,
                metadata: Metadata::default(),
                recorded_at: T0,
                hash: GENESIS,
            })
            .unwrap();
    }
    state
}

fn bench(c: &mut Criterion) {
    let env: BTreeMap<String, String> = [
        ("SLUICE_DATABASE_URL", "postgres://u@127.0.0.1/db"),
        ("SLUICE_SEALING_KEY", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let config = Config::load(None, env).unwrap();
    let auth = Authenticator::new(&config.api);
    let limiters = Limiters::new(u32::MAX, u32::MAX, u32::MAX);
    let state = state();
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let header = "Bearer sk_bench_secret_00004242";

    c.bench_function("rate limit check", |b| b.iter(|| limiters.check(Class::Api, black_box(ip)).unwrap()));
    c.bench_function("bearer key check", |b| {
        b.iter(|| auth.authenticate(Some(black_box(header)), &state, ip, T0).unwrap())
    });
    c.bench_function("rate limit + bearer key check", |b| {
        b.iter(|| {
            limiters.check(Class::Api, black_box(ip)).unwrap();
            auth.authenticate(Some(black_box(header)), &state, ip, T0).unwrap()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
