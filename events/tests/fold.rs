//! Commands (given / when / then) and properties of the fold and of `decide`.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use proptest::prelude::*;
use sluice_events::event::*;
use sluice_events::*;
use support::*;

fn register(stream: &str, publish: Option<&str>) -> Command {
    Command::RegisterStream { app: app(), name: name(stream), publish_name: publish.map(name), description: None }
}

#[test]
fn create_app_twice_is_already_exists() {
    let mut w = given([]);
    w.command(Command::CreateApp { app: app(), policy: Policy::sls() }, T0).unwrap();
    let then = w.command(Command::CreateApp { app: app(), policy: Policy::sls() }, T0);
    assert_eq!(then, Err(Rejection::AlreadyExists { what: "app", id: "live".into() }));
}

#[test]
fn streams_need_an_app_and_unique_names() {
    let mut w = given([]);
    assert_eq!(w.command(register("cam1", None), T0), Err(Rejection::NotFound { what: "app", id: "live".into() }));
    w.command(Command::CreateApp { app: app(), policy: Policy::sls() }, T0).unwrap();
    w.command(register("cam1", Some("cam1-key")), T0).unwrap();
    assert!(matches!(w.command(register("cam1", None), T0), Err(Rejection::AlreadyExists { .. })));
    // A publish name collides with names and publish names alike.
    assert!(matches!(w.command(register("cam1-key", None), T0), Err(Rejection::AlreadyExists { .. })));
    assert!(matches!(w.command(register("cam2", Some("cam1")), T0), Err(Rejection::AlreadyExists { .. })));
    assert!(matches!(
        w.command(register("cam3", Some("cam3")), T0),
        Err(Rejection::Invalid { field: "publish_name", .. })
    ));
    // Updating the publish name moves the mapping.
    w.command(
        Command::UpdateStream {
            app: app(),
            name: name("cam1"),
            publish_name: Some(name("new-key")),
            description: None,
        },
        T0,
    )
    .unwrap();
    let a = &w.state.apps[&app()];
    assert_eq!(a.publish_names.get(&name("new-key")), Some(&name("cam1")));
    assert!(!a.publish_names.contains_key(&name("cam1-key")));
    w.command(Command::DeleteStream { app: app(), name: name("cam1") }, T0).unwrap();
    assert!(w.state.apps[&app()].publish_names.is_empty());
    assert!(matches!(
        w.command(Command::DeleteStream { app: app(), name: name("cam1") }, T0),
        Err(Rejection::NotFound { .. })
    ));
}

#[test]
fn tokens_respect_registered_only_and_expiry() {
    let mut w = given([]);
    w.command(Command::CreateApp { app: app(), policy: Policy::sls() }, T0).unwrap();
    let issue = |stream: &str, expires: Option<Timestamp>| Command::IssueToken {
        app: app(),
        stream: name(stream),
        action: Action::Play,
        token_sha256: Sha256Digest::of(stream.as_bytes()),
        expires_at: expires,
    };
    assert!(matches!(w.command(issue("cam9", None), T0), Err(Rejection::NotFound { what: "stream", .. })));
    w.command(register("cam9", None), T0).unwrap();
    assert!(matches!(w.command(issue("cam9", Some(T0)), T0), Err(Rejection::Invalid { field: "expires_at", .. })));
    w.command(issue("cam9", None), T0).unwrap();
    assert!(matches!(w.command(issue("cam9", None), T0), Err(Rejection::AlreadyExists { .. })));
    // Consuming twice records once.
    let consume = Command::ConsumeToken { token_sha256: Sha256Digest::of(b"cam9"), decision_id: None, node: None };
    assert_eq!(w.command(consume.clone(), T0).unwrap().len(), 1);
    assert_eq!(w.command(consume, T0).unwrap(), vec![]);
}

#[test]
fn secrets_are_checked_for_length_and_binding() {
    let mut w = given([]);
    w.command(Command::CreateApp { app: app(), policy: Policy::default() }, T0).unwrap();
    let short = NewSecret::for_app(&key(), &app(), SecretKind::Jwt, b"too-short", [1; 24]);
    assert!(matches!(
        w.command(Command::RotateAppSecret { app: app(), kind: SecretKind::Jwt, secret: short }, T0),
        Err(Rejection::Invalid { field: "secret", .. })
    ));
    // Sealed for the hash slot, offered for the jwt slot: refused.
    let moved = NewSecret::for_app(&key(), &app(), SecretKind::Hash, JWT_SECRET, [1; 24]);
    assert!(w.command(Command::RotateAppSecret { app: app(), kind: SecretKind::Jwt, secret: moved }, T0).is_err());
    let ok = NewSecret::for_app(&key(), &app(), SecretKind::Jwt, JWT_SECRET, [1; 24]);
    w.command(Command::RotateAppSecret { app: app(), kind: SecretKind::Jwt, secret: ok }, T0).unwrap();
    // An SRT passphrase is 10 to 79 bytes.
    let long = NewSecret::for_app(&key(), &app(), SecretKind::SrtPassphrase, &[b'p'; 80], [1; 24]);
    assert!(matches!(
        w.command(Command::RotateAppSecret { app: app(), kind: SecretKind::SrtPassphrase, secret: long }, T0),
        Err(Rejection::Invalid { field: "secret", .. })
    ));
    // Removed: gone from the state; removing what is not there is a NotFound.
    w.command(Command::RemoveAppSecret { app: app(), kind: SecretKind::Jwt }, T0).unwrap();
    assert!(
        w.command(Command::RemoveAppSecret { app: app(), kind: SecretKind::Jwt }, T0)
            .is_err_and(|r| matches!(r, Rejection::NotFound { what: "secret", .. }))
    );
}

#[test]
fn jwks_with_private_material_is_refused() {
    let mut w = given([]);
    w.command(Command::CreateApp { app: app(), policy: Policy::default() }, T0).unwrap();
    let private = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "x": "A", "y": "B", "d": "SECRET"}]});
    let r = w.command(Command::RefreshJwks { app: app(), jwks: private }, T0);
    assert!(matches!(r, Err(Rejection::Invalid { field: "jwks", .. })));
    let r = w.command(Command::RefreshJwks { app: app(), jwks: serde_json::json!({"no": "keys"}) }, T0);
    assert!(matches!(r, Err(Rejection::Invalid { field: "jwks", .. })));
}

#[test]
fn api_keys_create_and_revoke() {
    let mut w = given([]);
    let create = Command::CreateApiKey {
        key_id: KeyId::parse("k1").unwrap(),
        name: "ci".into(),
        role: Role::Read,
        secret_sha256: Sha256Digest::of(b"s"),
        cidrs: vec![],
        expires_at: None,
    };
    w.command(create.clone(), T0).unwrap();
    assert!(matches!(w.command(create, T0), Err(Rejection::AlreadyExists { .. })));
    w.command(Command::RevokeApiKey { key_id: KeyId::parse("k1").unwrap() }, T0).unwrap();
    assert!(w.state.api_keys[&KeyId::parse("k1").unwrap()].revoked);
    assert!(matches!(
        w.command(Command::RevokeApiKey { key_id: KeyId::parse("k1").unwrap() }, T0),
        Err(Rejection::NotFound { .. })
    ));
}

#[test]
fn deleting_an_app_kills_its_tokens_and_a_recreated_app_starts_empty() {
    let mut w = world(&[Method::OneTimeToken]);
    w.command(Command::DeleteApp { app: app() }, T0).unwrap();
    assert!(w.state.tokens.is_empty());
    w.command(Command::CreateApp { app: app(), policy: policy_with(&[Method::OneTimeToken]) }, T0).unwrap();
    let d = w.when(&request(Action::Publish, "cam1-key", Credential::token("tok-publish")), T0);
    assert!(!d.is_allow());
}

#[test]
fn apply_skips_redelivery_and_reports_gaps() {
    let w = world(&[Method::Open]);
    let mut s = AuthState::new();
    for r in &w.log {
        s.apply(r).unwrap();
    }
    let before = s.digest();
    s.apply(&w.log[2]).unwrap();
    assert_eq!(s.digest(), before, "re-delivery is a no-op");
    let far = record(w.log.len() as u64 + 5, AppDeleted { app: app() }.into());
    assert_eq!(s.apply(&far), Err(ApplyError::Gap { at: s.position(), got: Position(w.log.len() as u64 + 5) }));
}

#[test]
fn digest_ignores_the_keyring_and_sees_every_change() {
    let w = world(&[Method::Open]);
    let mut keyless = AuthState::new();
    for r in &w.log {
        keyless.apply(r).unwrap();
    }
    assert_eq!(keyless.digest(), w.state.digest());
    let mut changed = keyless.clone();
    changed
        .apply(&record(w.log.len() as u64 + 1, TokenRevoked { token_sha256: Sha256Digest::of(b"tok-publish") }.into()))
        .unwrap();
    assert_ne!(changed.digest(), keyless.digest());
}

fn arb_name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["cam1", "cam2", "cam1-key", "x", "y.z"]).prop_map(str::to_owned)
}

fn arb_stream() -> impl Strategy<Value = StreamName> {
    arb_name().prop_map(|s| name(&s))
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        Just(AppCreated { app: app(), policy: Policy::default() }.into()),
        Just(AppDeleted { app: app() }.into()),
        (arb_stream(), prop::option::of(arb_name())).prop_map(|(n, p)| StreamRegistered {
            plays: None,
            app: app(),
            name: n,
            publish_name: p.map(|p: String| name(p.as_str())),
            description: None
        }
        .into()),
        (arb_stream(), prop::option::of(arb_name())).prop_map(|(n, p)| StreamUpdated {
            app: app(),
            name: n,
            publish_name: p.map(|p: String| name(p.as_str())),
            description: None
        }
        .into()),
        arb_stream().prop_map(|n| StreamDeleted { app: app(), name: n }.into()),
        (arb_stream(), any::<u8>()).prop_map(|(n, t)| TokenIssued {
            token_sha256: Sha256Digest::of(&[t]),
            app: app(),
            stream: n,
            action: Action::Play,
            expires_at: None
        }
        .into()),
        any::<u8>()
            .prop_map(|t| TokenConsumed { token_sha256: Sha256Digest::of(&[t]), decision_id: None, node: None }.into()),
        any::<u8>().prop_map(|t| TokenRevoked { token_sha256: Sha256Digest::of(&[t]) }.into()),
        (arb_stream(), any::<u64>()).prop_map(|(n, step)| TotpStepUsed {
            app: app(),
            stream: n,
            subscriber_id: SubscriberId::parse("alice").unwrap(),
            step
        }
        .into()),
        (arb_stream(), any::<bool>()).prop_map(|(n, play)| SessionsKicked {
            app: app(),
            stream: n,
            action: play.then_some(Action::Play),
            client_ip: None
        }
        .into()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Two nodes that apply the same events in order end in the same state, whether they
    /// hold the sealing key or not and whatever their hash-map seeds.
    #[test]
    fn same_events_same_digest(events in prop::collection::vec(arb_event(), 0..40)) {
        let mut a = AuthState::with_keyring(Arc::new(Keyring::new(key())));
        let mut b = AuthState::new();
        for (i, e) in events.into_iter().enumerate() {
            let r = record(i as u64 + 1, e);
            a.apply(&r).unwrap();
            b.apply(&r).unwrap();
        }
        prop_assert_eq!(a.digest(), b.digest());
        prop_assert_eq!(a.position(), b.position());
    }

    /// `decide` is total: no request, however odd, panics it.
    #[test]
    fn decide_never_panics(
        stream in "[a-z0-9._~-]{1,20}",
        token in proptest::option::of(".{0,200}"),
        expires in proptest::option::of(any::<i64>()),
        sub in proptest::option::of("[a-z]{1,8}"),
        code in proptest::option::of(".{0,12}"),
        publish in any::<bool>(),
        ip in any::<[u8; 4]>(),
        now in any::<i64>(),
    ) {
        let w = world(&[Method::Open, Method::OneTimeToken, Method::Hash, Method::Hmac, Method::Jwt, Method::Totp]);
        let req = AccessRequest {
            id: uuid::Uuid::nil(),
            app: app(),
            stream: name(&stream),
            action: if publish { Action::Publish } else { Action::Play },
            protocol: Protocol::Srt,
            client_ip: std::net::IpAddr::from(ip),
            credential: Credential {
                token: token.map(SecretString::new),
                expires,
                subscriber_id: sub.map(|s| SubscriberId::parse(&s).unwrap()),
                subscriber_code: code.map(SecretString::new),
            },
            client_id: None,
        };
        let d = decide(&w.state, &req, Timestamp(now));
        prop_assert_eq!(d.id, req.id);
    }

    /// The wire parsers are total too.
    #[test]
    fn wire_parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), key in ".{0,600}") {
        let _ = sluice_events::wire::parse_srt_streamid(&bytes);
        let _ = sluice_events::wire::parse_rtmp("live", &key);
    }
}

#[test]
fn printing_a_state_never_shows_an_opened_secret() {
    let w = world(&[Method::Hash, Method::Totp, Method::Jwt]);
    let text = format!("{:?}", w.state);
    for secret in [HASH_SECRET, JWT_SECRET, TOTP_SECRET] {
        assert!(!text.contains(std::str::from_utf8(secret).unwrap()), "Debug leaks a secret");
        assert!(!text.contains(&format!("{:?}", secret)), "Debug leaks secret bytes");
    }
    assert!(text.contains("<opened secret>"));
}

#[test]
fn changing_the_totp_settings_rebuilds_the_subscribers_generators() {
    let mut w = world(&[Method::Totp]);
    let mut p = policy_with(&[Method::Totp]);
    p.totp = sluice_events::policy::TotpSettings { period_secs: 30, digits: 8 };
    w.command(Command::SetPolicy { app: app(), policy: p }, T0).unwrap();
    let step = (T0.as_secs() / 30) as u64;
    let code = sluice_events::decide::totp_code(TOTP_SECRET, 8, 30, step).unwrap();
    let cred = Credential {
        subscriber_id: Some(SubscriberId::parse("alice").unwrap()),
        subscriber_code: Some(SecretString::new(code)),
        ..Credential::default()
    };
    let d = w.when(&request(Action::Publish, "cam1-key", cred), T0);
    assert!(d.is_allow(), "{d:?}");
    // The old 6-digit, 60-second code no longer works.
    assert_eq!(w.when(&request(Action::Publish, "cam1-key", totp("alice", T0, 0)), T0).reason, Reason::TotpInvalid);
}

/// A holder publishing one `Arc<AuthState>` per burst gets, from `Spare`, a state equal to the
/// published one: the previous state caught up when no reader holds it, a copy while one does.
#[test]
fn each_burst_starts_from_the_spare_caught_up_or_from_a_copy_while_a_reader_holds_it() {
    let events: Vec<RecordedEvent> = (1..=15u64)
        .map(|p| {
            let event: Event = if p == 1 {
                AppCreated { app: app(), policy: Policy::default() }.into()
            } else {
                StreamRegistered {
                    plays: None,
                    app: app(),
                    name: name(&format!("s{p}")),
                    publish_name: None,
                    description: None,
                }
                .into()
            };
            record(p, event)
        })
        .collect();
    let mut published = Arc::new(AuthState::new());
    let mut spare = state::Spare::default();
    let mut reader = None;
    for (i, burst) in events.chunks(3).enumerate() {
        let mut next = spare.take(&published);
        for e in burst {
            next.apply(e).unwrap();
        }
        let previous = std::mem::replace(&mut published, Arc::new(next));
        if i == 1 {
            // A request keeps this snapshot across the next burst: that burst must copy.
            reader = Some(previous.clone());
        }
        spare.keep(previous, burst.to_vec());
        let mut fresh = AuthState::new();
        for e in &events[..(i + 1) * 3] {
            fresh.apply(e).unwrap();
        }
        assert_eq!(published.digest(), fresh.digest(), "after burst {i}");
    }
    // The reader's snapshot never moved under it.
    assert_eq!(reader.unwrap().position(), Position(3));
}
