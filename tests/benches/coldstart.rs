//! `cargo bench -p sluice-tests --bench coldstart`
//!
//! Worker cold start from NATS: a state of 100,000 streams and 1,000,000 one-time tokens
//! (six apps, each with sealed hash and JWT secrets) is stored in NATS exactly as the relay
//! stores it (object store body + KV manifest); then `sync::boot` of a worker with an empty
//! state directory is timed: connect, read the manifest, download the body, check and decode
//! it into a ready state. Five runs, median and max printed.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use sluice_events::event::{AppCreated, AppSecretRotated, StreamRegistered, TokenIssued};
use sluice_events::{
    Action, ActionPolicy, AppName, AuthState, Event, Keyring, Metadata, Method, Policy, Position, RecordedEvent,
    SealingKey, SecretKind, Sha256Digest, StreamName, Timestamp,
};
use sluice_tests::Nats;

const STREAMS: u64 = 100_000;
const TOKENS: u64 = 1_000_000;
const KEY: &str = "c2x1aWNlLXRlc3Qtc2VhbGluZy1rZXktMzItYnl0ZXM=";

fn state(key: &SealingKey) -> AuthState {
    let app = |n: &str| AppName::parse(n).unwrap();
    let mut events: Vec<Event> = Vec::new();
    let apps = ["open", "hash", "hmac", "otp", "jwt", "totp"];
    let methods = [Method::Open, Method::Hash, Method::Hmac, Method::OneTimeToken, Method::Jwt, Method::Totp];
    for (name, m) in apps.iter().zip(methods) {
        let ap = ActionPolicy { methods: [m].into_iter().collect(), cidrs: vec![], accept_undefined_streams: false };
        events.push(
            AppCreated { app: app(name), policy: Policy { publish: ap.clone(), play: ap, ..Policy::default() } }.into(),
        );
        for kind in [SecretKind::Hash, SecretKind::Jwt] {
            let purpose = sluice_events::state::app_secret_purpose(&app(name), kind);
            let secret = key.seal(&purpose, b"bench-secret-0123456789-0123456789", [1; 24]);
            events.push(AppSecretRotated { app: app(name), kind, secret }.into());
        }
    }
    for i in 0..STREAMS {
        let a = apps[(i % apps.len() as u64) as usize];
        let name = StreamName::parse(&format!("s{i}")).unwrap();
        events.push(StreamRegistered { plays: None, app: app(a), name, publish_name: None, description: None }.into());
    }
    for t in 0..TOKENS {
        let stream = 3 + 6 * (t % (STREAMS / 6));
        events.push(
            TokenIssued {
                token_sha256: Sha256Digest::of(format!("tok-{t}").as_bytes()),
                app: app("otp"),
                stream: StreamName::parse(&format!("s{stream}")).unwrap(),
                action: Action::Play,
                expires_at: Some(Timestamp(1_900_000_000_000)),
            }
            .into(),
        );
    }
    let mut state = AuthState::for_data_plane(Some(Arc::new(Keyring::new(key.clone()))));
    for (i, event) in events.into_iter().enumerate() {
        state
            .apply(&RecordedEvent {
                position: Position(i as u64 + 1),
                event_id: uuid::Uuid::from_u128(i as u128),
                stream: String::new(),
                version: 0,
                event,
                metadata: Metadata::default(),
                recorded_at: Timestamp(0),
                hash: Sha256Digest([0; 32]),
            })
            .unwrap();
    }
    state
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let nats = Nats::start().unwrap();
        let key = SealingKey::from_base64(KEY).unwrap();
        let state = Arc::new(state(&key));
        let position = state.position();
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let t = Instant::now();
        sluice_control_plane::relay::publish_snapshot(&js, state).await.unwrap();
        println!("relay: digest, encode and upload of the snapshot: {:.0} ms", t.elapsed().as_secs_f64() * 1000.0);

        let dir = tempfile::tempdir().unwrap();
        let env: BTreeMap<String, String> = [
            ("SLUICE_SEALING_KEY", KEY.to_owned()),
            ("SLUICE_NATS_URL", nats.url()),
            ("SLUICE_STATE_DIR", dir.path().display().to_string()),
            ("SLUICE_NODE_ID", "bench".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let config = sluice_data_plane::config::Config::load(None, env).unwrap();
        let mut times = Vec::new();
        for _ in 0..5 {
            let keyring = Arc::new(Keyring::new(key.clone()));
            let t = Instant::now();
            let (booted, info, source) = sluice_data_plane::sync::boot(&config, keyring).await;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!((source, booted.position()), ("nats", position));
            assert!(info.is_some());
        }
        times.sort_by(f64::total_cmp);
        println!(
            "worker cold start from NATS ({STREAMS} streams, {TOKENS} tokens): median {:.0} ms, max {:.0} ms",
            times[2], times[4]
        );
    });
}
