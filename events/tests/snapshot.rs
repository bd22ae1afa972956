//! Data-plane snapshots: a worker booted from one decides exactly as the state it was taken
//! from, agrees on the access digest, holds no API keys, and bad bytes are typed errors.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use proptest::prelude::*;
use sluice_events::event::*;
use sluice_events::state::snapshot::{self, SnapshotError};
use sluice_events::*;
use support::*;

fn alice() -> SubscriberId {
    SubscriberId::parse("alice").unwrap()
}

/// Every kind of table a worker holds, plus an API key it must not.
fn rich() -> Given {
    let mut w = world(&[Method::OneTimeToken, Method::Hash, Method::Jwt, Method::Totp]);
    w.and([
        ApiKeyCreated {
            key_id: KeyId::parse("k1").unwrap(),
            name: "ops".into(),
            role: Role::Admin,
            secret_sha256: Sha256Digest::of(b"sk_secret"),
            cidrs: vec![],
            expires_at: None,
        }
        .into(),
        TokenIssued {
            token_sha256: Sha256Digest::of(b"tok-used"),
            app: app(),
            stream: name("cam2"),
            action: Action::Play,
            expires_at: None,
        }
        .into(),
        TokenConsumed { token_sha256: Sha256Digest::of(b"tok-used"), decision_id: None, node: None }.into(),
        TokenIssued {
            token_sha256: Sha256Digest::of(b"tok-revoked"),
            app: app(),
            stream: name("cam2"),
            action: Action::Play,
            expires_at: None,
        }
        .into(),
        TokenRevoked { token_sha256: Sha256Digest::of(b"tok-revoked") }.into(),
        SubscriberBlocked {
            app: app(),
            stream: name("cam1"),
            subscriber_id: alice(),
            until: T0.plus_secs(-10),
            action: None,
        }
        .into(),
        TotpStepUsed { app: app(), stream: name("cam1"), subscriber_id: alice(), step: 3 }.into(),
        SessionsKicked { app: app(), stream: name("cam1"), action: None, client_ip: None }.into(),
        NodeRegistered {
            node_id: NodeId::parse("edge-1").unwrap(),
            version: "0.1.0".into(),
            protocols: vec![Protocol::Rtmp],
        }
        .into(),
    ]);
    w
}

fn ring() -> Option<Arc<Keyring>> {
    Some(Arc::new(Keyring::new(key())))
}

fn requests() -> Vec<AccessRequest> {
    vec![
        request(
            Action::Publish,
            "cam1-key",
            Credential { token: Some(SecretString::new("tok-publish")), ..Credential::default() },
        ),
        request(
            Action::Play,
            "cam2",
            Credential { token: Some(SecretString::new("tok-used")), ..Credential::default() },
        ),
        request(
            Action::Play,
            "cam2",
            Credential { token: Some(SecretString::new("tok-revoked")), ..Credential::default() },
        ),
        request(Action::Publish, "cam1-key", hash_token("cam1", Action::Publish, HASH_SECRET)),
        request(Action::Play, "cam2", jwt_hs(serde_json::json!({"stream": "cam2", "exp": 1_900_000_000}), JWT_SECRET)),
        request(Action::Play, "cam2", jwt_rs(serde_json::json!({"stream": "cam2", "exp": 1_900_000_000}))),
        request(Action::Publish, "cam1-key", totp("alice", T0, 0)),
        request(Action::Play, "nope", Credential::default()),
    ]
}

#[test]
fn a_worker_booted_from_a_snapshot_decides_as_the_state_it_came_from() {
    let w = rich();
    let bytes = snapshot::encode(&w.state);
    let (booted, info) = snapshot::decode(&bytes, ring()).unwrap();
    assert_eq!(info.position, w.state.position());
    assert_eq!(info.digest, w.state.access_digest());
    assert_eq!(booted.access_digest(), w.state.access_digest());
    assert!(booted.is_data_plane());
    assert!(booted.api_keys.is_empty(), "a worker never holds API keys");
    for req in requests() {
        let (a, b) = (decide(&w.state, &req, T0), decide(&booted, &req, T0));
        assert_eq!((a.outcome, a.reason), (b.outcome, b.reason), "{req:?}");
    }
    let outcomes: Vec<Outcome> = requests().iter().map(|r| decide(&booted, r, T0).outcome).collect();
    assert!(outcomes.contains(&Outcome::Allow) && outcomes.contains(&Outcome::Deny), "{outcomes:?}");
    // The API key's secret digest is not in the bytes.
    let needle = Sha256Digest::of(b"sk_secret").0;
    let raw_len = bytes.len();
    assert!(!bytes.windows(32).any(|win| win == needle), "{raw_len} bytes");
}

#[test]
fn a_worker_folding_the_log_agrees_with_the_control_plane_on_the_access_digest() {
    let w = rich();
    let mut worker = AuthState::for_data_plane(ring());
    for e in &w.log {
        worker.apply(e).unwrap();
    }
    assert!(worker.api_keys.is_empty());
    assert_eq!(worker.access_digest(), w.state.access_digest());
    assert_ne!(worker.digest(), w.state.digest(), "the full digest covers API keys");
    // And a snapshot keeps folding from where it was taken.
    let (mut booted, _) = snapshot::decode(&snapshot::encode(&w.state), ring()).unwrap();
    let next = record(w.log.len() as u64 + 1, StreamDeleted { app: app(), name: name("cam2") }.into());
    booted.apply(&next).unwrap();
    worker.apply(&next).unwrap();
    assert_eq!(booted.access_digest(), worker.access_digest());
    assert_eq!(booted.position(), next.position);
}

#[test]
fn without_the_sealing_key_secrets_stay_sealed_and_fail_closed() {
    let w = rich();
    let (booted, _) = snapshot::decode(&snapshot::encode(&w.state), None).unwrap();
    assert_eq!(booted.access_digest(), w.state.access_digest());
    let d = decide(&booted, &requests()[3], T0);
    assert_eq!(d.reason, Reason::SecretUnavailable);
}

#[test]
fn bad_bytes_are_typed_errors() {
    let bytes = snapshot::encode(&rich().state);
    assert_eq!(snapshot::decode(b"", None).unwrap_err(), SnapshotError::Truncated(0));
    assert_eq!(snapshot::decode(&bytes[..40], None).unwrap_err(), SnapshotError::Truncated(40));
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert_eq!(snapshot::decode(&bad, None).unwrap_err(), SnapshotError::BadMagic);
    let mut future = bytes.clone();
    future[16..18].copy_from_slice(&(snapshot::SCHEMA + 1).to_le_bytes());
    assert_eq!(
        snapshot::decode(&future, None).unwrap_err(),
        SnapshotError::FutureSchema { found: snapshot::SCHEMA + 1, max: snapshot::SCHEMA }
    );
    let mut old = bytes.clone();
    old[16..18].copy_from_slice(&(snapshot::SCHEMA - 1).to_le_bytes());
    assert_eq!(
        snapshot::decode(&old, None).unwrap_err(),
        SnapshotError::OldSchema { found: snapshot::SCHEMA - 1, current: snapshot::SCHEMA }
    );
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x55;
    assert_eq!(snapshot::decode(&flipped, None).unwrap_err(), SnapshotError::Checksum);
    assert_eq!(snapshot::decode(&bytes[..bytes.len() - 1], None).unwrap_err(), SnapshotError::Checksum);
}

proptest! {
    #[test]
    fn garbage_never_panics(garbage in proptest::collection::vec(any::<u8>(), 0..400), cut in 0usize..4000) {
        let _ = snapshot::decode(&garbage, None);
        // A valid header over a mangled body.
        let mut bytes = snapshot::encode(&rich().state);
        let at = cut % bytes.len();
        bytes.truncate(at.max(106));
        bytes.extend_from_slice(&garbage);
        let _ = snapshot::decode(&bytes, None);
    }
}
