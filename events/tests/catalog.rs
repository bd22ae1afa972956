//! The event catalog: a snapshot of every event type's JSON, and proof that every committed
//! snapshot still decodes (old events must deserialize forever).
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::json;
use sluice_events::decision::{RecordedRequest, WebhookAnswer};
use sluice_events::event::*;
use sluice_events::*;
use support::*;

fn sealed(n: u8) -> Sealed {
    key().seal("example", b"example-secret", [n; 24])
}

/// One example of every event type, in catalog order.
fn examples() -> Vec<Event> {
    let alice = SubscriberId::parse("alice").unwrap();
    let tok = Sha256Digest::of(b"tok-publish");
    vec![
        ApiKeyCreated {
            key_id: KeyId::parse("k1").unwrap(),
            name: "ci".into(),
            role: Role::Write,
            secret_sha256: Sha256Digest::of(b"secret"),
            cidrs: vec![Cidr::parse("10.0.0.0/8").unwrap()],
            expires_at: Some(T0),
        }
        .into(),
        ApiKeyRevoked { key_id: KeyId::parse("k1").unwrap() }.into(),
        AppCreated { app: app(), policy: Policy::sls() }.into(),
        AppPolicyChanged { app: app(), policy: policy_with(&[Method::Jwt, Method::Totp]) }.into(),
        AppSecretRotated { app: app(), kind: SecretKind::Jwt, secret: sealed(1) }.into(),
        AppSecretRemoved { app: app(), kind: SecretKind::SrtPassphrase }.into(),
        AppDeleted { app: app() }.into(),
        StreamRegistered {
            plays: None,
            app: app(),
            name: name("cam1"),
            publish_name: Some(name("cam1-key")),
            description: Some("lobby".into()),
        }
        .into(),
        StreamUpdated { app: app(), name: name("cam1"), publish_name: None, description: None }.into(),
        StreamDeleted { app: app(), name: name("cam1") }.into(),
        TokenIssued {
            token_sha256: tok,
            app: app(),
            stream: name("cam1"),
            action: Action::Publish,
            expires_at: Some(T0),
        }
        .into(),
        TokenConsumed {
            token_sha256: tok,
            decision_id: Some(uuid::Uuid::from_u128(9)),
            node: Some(NodeId::parse("edge-1").unwrap()),
        }
        .into(),
        TokenRevoked { token_sha256: tok }.into(),
        SubscriberAdded {
            app: app(),
            stream: name("cam1"),
            subscriber_id: alice.clone(),
            action: Some(Action::Play),
            secret: sealed(2),
        }
        .into(),
        SubscriberRemoved { app: app(), stream: name("cam1"), subscriber_id: alice.clone() }.into(),
        SubscriberBlocked { app: app(), stream: name("cam1"), subscriber_id: alice.clone(), until: T0, action: None }
            .into(),
        TotpStepUsed { app: app(), stream: name("cam1"), subscriber_id: alice, step: 30_000_000 }.into(),
        SessionsKicked {
            app: app(),
            stream: name("cam1"),
            action: Some(Action::Play),
            client_ip: Some("203.0.113.9".parse().unwrap()),
        }
        .into(),
        JwksRefreshed {
            app: app(),
            jwks: json!({"keys": [{"kty": "EC", "kid": "ec-1", "crv": "P-256", "x": "AA", "y": "AA"}]}),
        }
        .into(),
        NodeRegistered {
            node_id: NodeId::parse("edge-1").unwrap(),
            version: "0.1.0".into(),
            protocols: vec![Protocol::Rtmp, Protocol::Srt],
        }
        .into(),
        AccessDecided {
            decision: DecisionRecord {
                decision: Decision {
                    id: uuid::Uuid::from_u128(9),
                    outcome: Outcome::Allow,
                    reason: Reason::Allowed,
                    method: Some(Method::OneTimeToken),
                    subject: Some("token:5b1d0e5f2a6b9d8c".into()),
                    stream: name("cam1"),
                    position: Position(41),
                    effects: vec![Effect::ConsumeToken { token_sha256: tok }],
                },
                allowed: true,
                final_reason: Reason::Allowed,
                request: RecordedRequest {
                    app: app(),
                    stream: name("cam1-key"),
                    action: Action::Publish,
                    protocol: Protocol::Rtmp,
                    client_ip: "10.0.0.5".parse().unwrap(),
                    subscriber_id: None,
                    expires: None,
                    credential: Some(sealed(3)),
                    client_id: Some("7".into()),
                },
                decided_at: T0,
                node: Some(NodeId::parse("edge-1").unwrap()),
                webhook: Some(WebhookAnswer { status: Some(200), allowed: true }),
                sequence: Some(17),
                publisher_slot: None,
                repeats: None,
            },
        }
        .into(),
        ApiAccessed {
            instance: "cp-1".into(),
            entries: vec![ApiAccess {
                at: T0,
                subject: "key:k1".into(),
                method: "POST".into(),
                route: "/v1/apps".into(),
                client_ip: "127.0.0.1".parse().unwrap(),
                status: 201,
                count: 1,
                last: None,
            }],
        }
        .into(),
    ]
}

#[test]
fn every_event_type_has_an_example() {
    let types: Vec<&str> = examples().iter().map(Event::event_type).collect();
    assert_eq!(types, Event::TYPES);
}

#[test]
fn workers_receive_every_event_that_changes_their_tables_and_no_decision() {
    for e in examples() {
        let acted_on = e.changes_access_tables() || matches!(e, Event::SessionsKicked(_));
        assert_eq!(sluice_events::dist::reaches_workers(&e), acted_on, "{}", e.event_type());
    }
}

#[test]
fn the_types_that_leave_access_tables_alone_are_listed_for_sql() {
    for e in examples() {
        assert_eq!(!e.changes_access_tables(), Event::NON_TABLE_TYPES.contains(&e.event_type()), "{}", e.event_type());
    }
}

#[test]
fn event_json_snapshots() {
    for e in examples() {
        let stored = json!({
            "type": e.event_type(),
            "schema_version": e.schema_version(),
            "stream": e.log_stream(),
            "data": e.data(),
        });
        insta::assert_json_snapshot!(e.event_type(), stored);
    }
}

/// Every committed snapshot is a stored event from some version of Sluice; each must decode
/// with this build, forever.
#[test]
fn every_committed_snapshot_still_decodes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    let mut decoded = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        if !path.file_name().unwrap().to_string_lossy().starts_with("catalog__") {
            continue;
        }
        // insta files: a `---` front matter, then the JSON body.
        let body = text.splitn(3, "---").nth(2).unwrap();
        let stored: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
        let event = Event::decode(
            stored["type"].as_str().unwrap(),
            stored["schema_version"].as_u64().unwrap() as u16,
            &stored["data"],
        )
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(event.log_stream(), stored["stream"].as_str().unwrap());
        decoded += 1;
    }
    assert!(decoded >= Event::TYPES.len(), "found only {decoded} snapshots");
}

#[test]
fn round_trip_through_type_and_data() {
    for e in examples() {
        assert_eq!(Event::decode(e.event_type(), 1, &e.data()).unwrap(), e);
    }
}

/// The hash chain covers `write_data`'s bytes; they must be `write_canonical` of `data()`.
#[test]
fn every_event_writes_its_canonical_data_directly() {
    for e in examples() {
        let (mut direct, mut via) = (Vec::new(), Vec::new());
        e.write_data(&mut direct);
        write_canonical(&e.data(), &mut via);
        assert_eq!(String::from_utf8(direct).unwrap(), String::from_utf8(via).unwrap(), "{}", e.event_type());
    }
}

#[test]
fn bad_rows_are_typed_errors() {
    assert_eq!(
        Event::decode("AppRenamed", 1, &json!({})),
        Err(DecodeError::UnknownType { event_type: "AppRenamed".into() })
    );
    assert!(matches!(Event::decode("AppCreated", 2, &json!({})), Err(DecodeError::UnknownVersion { version: 2, .. })));
    let err = Event::decode("AppDeleted", 1, &json!({"app": 12})).unwrap_err();
    assert!(matches!(err, DecodeError::BadData { .. }));
    assert!(err.to_string().contains("AppDeleted"));
    let err = Event::decode("AppDeleted", 1, &json!({"app": "bad name"})).unwrap_err();
    assert!(err.to_string().contains("app name may only contain"), "{err}");
}

/// The log is read from its JSON text: the same events, and the same errors, as from a `Value`.
#[test]
fn decoding_from_text_matches_decoding_from_a_value() {
    for e in examples() {
        let text = e.data().to_string();
        assert_eq!(Event::decode_str(e.event_type(), 1, &text).unwrap(), e);
    }
    let cases = [
        ("AppRenamed", 1, r#"{}"#),
        ("AppRenamed", 2, r#"{}"#),
        ("AppCreated", 2, r#"{}"#),
        ("AppCreated", 0, r#"{}"#),
        ("AppDeleted", 1, r#"{"app": 12}"#),
        ("AppDeleted", 1, r#"{"app": "bad name"}"#),
        ("AppDeleted", 1, r#"null"#),
        ("AppDeleted", 1, r#"{"app": "live", "reason": "retired"}"#),
    ];
    for (ty, version, text) in cases {
        let value: serde_json::Value = serde_json::from_str(text).unwrap();
        match (Event::decode_str(ty, version, text), Event::decode(ty, version, &value)) {
            // Text errors also say where (line and column).
            (Err(DecodeError::BadData { detail: from_text, .. }), Err(DecodeError::BadData { detail, .. })) => {
                assert!(from_text.starts_with(&detail), "{from_text} / {detail}")
            }
            (from_text, from_value) => assert_eq!(from_text, from_value, "{ty} {text}"),
        }
    }
    // Text that is not one JSON value is bad data, never a panic or a partial event.
    for text in [r#"{"app": "live"} trailing"#, r#"{"app": "live""#, "", "\u{0}"] {
        assert!(matches!(Event::decode_str("AppDeleted", 1, text), Err(DecodeError::BadData { .. })), "{text}");
    }
}

#[test]
fn newer_optional_fields_are_tolerated() {
    // A newer writer added a field: an older reader must still fold the event.
    let e = Event::decode("AppDeleted", 1, &json!({"app": "live", "reason": "retired"})).unwrap();
    assert_eq!(e, Event::AppDeleted(AppDeleted { app: app() }));
}

#[test]
fn no_secret_in_plaintext_in_any_event() {
    for e in examples() {
        let text = e.data().to_string();
        for secret in ["example-secret", "tok-publish"] {
            assert!(!text.contains(secret), "{} leaks {secret}: {text}", e.event_type());
        }
    }
}

#[test]
fn canonical_bytes_ignore_key_order() {
    let a = json!({"b": 1, "a": {"d": [1, {"y": 2, "x": 1}], "c": null}});
    let b: serde_json::Value = serde_json::from_str(r#"{"a":{"c":null,"d":[1,{"x":1,"y":2}]},"b":1}"#).unwrap();
    let id = uuid::Uuid::from_u128(1);
    let meta = json!({"actor": "key:k1"});
    let canonical =
        |position: u64, stream: &str, version: u64, data: CanonicalJson<'_>, metadata: CanonicalJson<'_>| {
            canonical_bytes(&CanonicalRow {
                position: Position(position),
                event_id: &id,
                stream,
                version,
                event_type: "T",
                type_version: 1,
                recorded_at: T0,
                data,
                metadata,
            })
        };
    let row = |data: &serde_json::Value, version: u64| {
        canonical(1, "s", version, CanonicalJson::Value(data), CanonicalJson::Value(&meta))
    };
    assert_eq!(row(&a, 0), row(&b, 0));
    // Bytes written before give the same canonical row.
    let (mut data, mut metadata) = (Vec::new(), Vec::new());
    write_canonical(&b, &mut data);
    write_canonical(&meta, &mut metadata);
    let written = |position, stream, version| {
        canonical(position, stream, version, CanonicalJson::Written(&data), CanonicalJson::Written(&metadata))
    };
    assert_eq!(written(1, "s", 0), row(&a, 0));
    // The head is the JSON array of the row's columns, byte for byte as the chain has always
    // hashed it (a `Value` array written canonically), escapes included: logs written before
    // must still verify.
    let stream = "s\"\\\u{1}é\u{2028}";
    let mut head = Vec::new();
    write_canonical(&json!([u64::MAX, id, stream, 7, "T", 1, T0.0]), &mut head);
    head.push(b'|');
    let tricky = written(u64::MAX, stream, 7);
    assert!(tricky.starts_with(&head), "{}", String::from_utf8_lossy(&tricky));
    let h1 = chain_hash(&GENESIS, &row(&a, 0));
    let h2 = chain_hash(&GENESIS, &row(&a, 1));
    assert_ne!(h1, h2);
    // Hashing the row in pieces is hashing its canonical bytes.
    let parts = CanonicalRow {
        position: Position(u64::MAX),
        event_id: &id,
        stream,
        version: 7,
        event_type: "T",
        type_version: 1,
        recorded_at: T0,
        data: CanonicalJson::Value(&a),
        metadata: CanonicalJson::Written(&metadata),
    };
    assert_eq!(chain_hash_row(&h1, &parts), (chain_hash(&h1, &tricky), tricky.len()));
}

/// Crates the core must not reach, directly or through any dependency: I/O, runtimes, clocks
/// and randomness.
const BANNED: &[&str] = &[
    "tokio",
    "mio",
    "sqlx",
    "axum",
    "hyper",
    "monoio",
    "async-nats",
    "reqwest",
    "chrono",
    "rand",
    "getrandom",
    "socket2",
    "libc",
];

/// Banned crates that are in the graph anyway, and why that is safe.
const ALLOWED: &[(&str, &str)] = &[
    (
        "rand",
        "uuid's `fast-rng`, which the shells enable to make ids; Cargo unifies features across the \
         workspace, so the core's uuid carries it too. The core never makes an id: ids are arguments",
    ),
    (
        "getrandom",
        "under rand (above) and under jsonwebtoken's `signature`/`rand_core` (key generation, which \
         verifying a JWT never calls)",
    ),
    ("libc", "getrandom's system-call wrapper (above); nothing in the core calls it"),
];

#[test]
#[allow(clippy::disallowed_methods)] // cargo tells a test where it is
fn core_has_no_io_dependencies() {
    // The resolved graph, transitive crates included (the manifest alone would miss what a
    // dependency pulls in).
    let out = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--offline", "--filter-platform"])
        .arg(format!("{}-unknown-{}-gnu", std::env::consts::ARCH, std::env::consts::OS))
        .arg("--manifest-path")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let name_of = |id: &str| {
        meta["packages"].as_array().unwrap().iter().find(|p| p["id"] == id).unwrap()["name"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let nodes = meta["resolve"]["nodes"].as_array().unwrap();
    let root = nodes.iter().find(|n| name_of(n["id"].as_str().unwrap()) == "sluice-events").unwrap();
    // Normal (not dev, not build) dependencies, followed to the end.
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = vec![root["id"].as_str().unwrap().to_owned()];
    while let Some(id) = todo.pop() {
        let node = nodes.iter().find(|n| n["id"] == id.as_str()).unwrap();
        for dep in node["deps"].as_array().unwrap() {
            let normal = dep["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].is_null());
            let dep_id = dep["pkg"].as_str().unwrap().to_owned();
            if normal && seen.insert(dep_id.clone()) {
                todo.push(dep_id);
            }
        }
    }
    let reached: std::collections::BTreeSet<String> = seen.iter().map(|id| name_of(id)).collect();
    for banned in BANNED {
        if reached.contains(*banned) {
            assert!(
                ALLOWED.iter().any(|(name, _)| name == banned),
                "events/ must stay pure, but reaches {banned} (through its dependencies: {reached:?})"
            );
        }
    }
    assert!(reached.contains("serde"), "the graph was read: {reached:?}");
}

#[test]
#[allow(clippy::disallowed_methods)] // a test switch, not configuration of the core
fn committed_schema_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/events.schema.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = sluice_events::schema::events_schema_text();
    if committed != generated {
        if std::env::var_os("SLUICE_UPDATE_SCHEMAS").is_some() {
            std::fs::write(&path, &generated).unwrap();
            return;
        }
        panic!(
            "schemas/events.schema.json is out of date with the event types; regenerate it with\n  \
             SLUICE_UPDATE_SCHEMAS=1 cargo test -p sluice-events --test catalog committed_schema\n\
             (or `sluice-control schema`) and review the diff"
        );
    }
}
