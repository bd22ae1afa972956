//! Given / when / then for the core: build a state from events, decide or handle a command.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine as _;
use sluice_events::decide::{stream_hash, stream_hmac, totp_code};
use sluice_events::event::*;
use sluice_events::*;

pub const T0: Timestamp = Timestamp(1_800_000_000_000);
pub const HASH_SECRET: &[u8] = b"this_is_a_hash_secret";
pub const JWT_SECRET: &[u8] = b"zautXStXM9iW3aD3FuyPH0TdK4GHPmHq-0123456789";
pub const TOTP_SECRET: &[u8] = b"12345678901234567890";

pub fn key() -> SealingKey {
    SealingKey::new("test", [42; 32])
}

pub fn app() -> AppName {
    AppName::parse("live").unwrap()
}

pub fn name(s: &str) -> StreamName {
    StreamName::parse(s).unwrap()
}

/// A log under construction: events get consecutive positions.
pub struct Given {
    pub state: AuthState,
    pub log: Vec<RecordedEvent>,
}

pub fn given(events: impl IntoIterator<Item = Event>) -> Given {
    let mut g = Given { state: AuthState::with_keyring(Arc::new(Keyring::new(key()))), log: Vec::new() };
    g.and(events);
    g
}

pub fn record(position: u64, event: Event) -> RecordedEvent {
    RecordedEvent {
        position: Position(position),
        event_id: uuid::Uuid::from_u128(position as u128),
        stream: event.log_stream(),
        version: 0,
        event,
        metadata: Metadata::default(),
        recorded_at: T0,
        hash: GENESIS,
    }
}

impl Given {
    pub fn and(&mut self, events: impl IntoIterator<Item = Event>) -> &mut Self {
        for e in events {
            let r = record(self.log.len() as u64 + 1, e);
            self.state.apply(&r).unwrap();
            self.log.push(r);
        }
        self
    }

    /// Runs a command and applies what it returns, as the control plane would.
    pub fn command(&mut self, c: Command, now: Timestamp) -> Result<Vec<Event>, Rejection> {
        let events = handle(&self.state, c, now)?;
        self.and(events.clone());
        Ok(events)
    }

    pub fn when(&self, req: &AccessRequest, now: Timestamp) -> Decision {
        decide(&self.state, req, now)
    }
}

pub fn request(action: Action, stream: &str, credential: Credential) -> AccessRequest {
    AccessRequest {
        id: uuid::Uuid::from_u128(7),
        app: app(),
        stream: name(stream),
        action,
        protocol: Protocol::Rtmp,
        client_ip: "10.0.0.5".parse::<IpAddr>().unwrap(),
        credential,
        client_id: None,
    }
}

pub fn policy_with(methods: &[Method]) -> Policy {
    let ap = ActionPolicy {
        methods: methods.iter().copied().collect(),
        cidrs: vec![Cidr::parse("10.0.0.0/8").unwrap()],
        accept_undefined_streams: false,
    };
    Policy { publish: ap.clone(), play: ap, ..Policy::default() }
}

fn nonce(n: u8) -> [u8; 24] {
    [n; 24]
}

/// An app with every secret, a JWKS, streams cam1 (with publish name `cam1-key`) and cam2,
/// a subscriber `alice` on cam1 and a one-time token `tok-publish` for publishing cam1.
pub fn world(methods: &[Method]) -> Given {
    let k = key();
    let jwks: serde_json::Value = serde_json::from_str(include_str!("../fixtures/jwks.json")).unwrap();
    given([
        AppCreated { app: app(), policy: policy_with(methods) }.into(),
        AppSecretRotated {
            app: app(),
            kind: SecretKind::Hash,
            secret: k.seal(&sluice_events::state::app_secret_purpose(&app(), SecretKind::Hash), HASH_SECRET, nonce(1)),
        }
        .into(),
        AppSecretRotated {
            app: app(),
            kind: SecretKind::Jwt,
            secret: k.seal(&sluice_events::state::app_secret_purpose(&app(), SecretKind::Jwt), JWT_SECRET, nonce(2)),
        }
        .into(),
        JwksRefreshed { app: app(), jwks }.into(),
        StreamRegistered {
            plays: None,
            app: app(),
            name: name("cam1"),
            publish_name: Some(name("cam1-key")),
            description: None,
        }
        .into(),
        StreamRegistered { plays: None, app: app(), name: name("cam2"), publish_name: None, description: None }.into(),
        SubscriberAdded {
            app: app(),
            stream: name("cam1"),
            subscriber_id: SubscriberId::parse("alice").unwrap(),
            action: Some(Action::Publish),
            secret: k.seal(
                &sluice_events::state::subscriber_secret_purpose(
                    &app(),
                    &name("cam1"),
                    &SubscriberId::parse("alice").unwrap(),
                ),
                TOTP_SECRET,
                nonce(3),
            ),
        }
        .into(),
        TokenIssued {
            token_sha256: Sha256Digest::of(b"tok-publish"),
            app: app(),
            stream: name("cam1"),
            action: Action::Publish,
            expires_at: Some(T0.plus_secs(3600)),
        }
        .into(),
    ])
}

pub fn hash_token(stream: &str, action: Action, secret: &[u8]) -> Credential {
    Credential::token(&stream_hash(stream, action, secret).to_hex())
}

pub fn hmac_token(stream: &str, action: Action, expires: i64, secret: &[u8]) -> Credential {
    let mac = stream_hmac(stream, action, expires, secret).unwrap();
    Credential { expires: Some(expires), ..Credential::token(&base64::engine::general_purpose::STANDARD.encode(mac)) }
}

pub fn jwt_hs(claims: serde_json::Value, secret: &[u8]) -> Credential {
    let t = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap();
    Credential::token(&t)
}

pub fn jwt_es(claims: serde_json::Value, kid: Option<&str>) -> Credential {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = kid.map(str::to_owned);
    let key = jsonwebtoken::EncodingKey::from_ec_der(include_bytes!("../fixtures/ec.pk8.der"));
    Credential::token(&jsonwebtoken::encode(&h, &claims, &key).unwrap())
}

pub fn jwt_rs(claims: serde_json::Value) -> Credential {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some("rsa-1".into());
    let key = jsonwebtoken::EncodingKey::from_rsa_der(include_bytes!("../fixtures/rsa.der"));
    Credential::token(&jsonwebtoken::encode(&h, &claims, &key).unwrap())
}

pub fn totp(id: &str, now: Timestamp, skew_steps: i64) -> Credential {
    let step = (now.as_secs() / 60 + skew_steps) as u64;
    Credential {
        subscriber_id: Some(SubscriberId::parse(id).unwrap()),
        subscriber_code: Some(SecretString::new(totp_code(TOTP_SECRET, 6, 60, step).unwrap())),
        ..Credential::default()
    }
}
