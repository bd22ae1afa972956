//! `decide` table: every method × valid / expired / wrong stream / wrong action / wrong
//! secret / malformed / CIDR outside, plus stream resolution and any-of semantics.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::json;
use sluice_events::*;
use support::*;

const PUB: Action = Action::Publish;
const PLAY: Action = Action::Play;

fn exp_ok() -> i64 {
    T0.as_secs() + 600
}
fn exp_past() -> i64 {
    T0.as_secs() - 1
}

fn claims(stream: &str, action: &str, exp: i64) -> serde_json::Value {
    json!({"sub": "enc-1", "app": "live", "stream": stream, "action": action, "exp": exp})
}

struct Row {
    method: Method,
    case: &'static str,
    action: Action,
    stream: &'static str,
    cred: Credential,
    ip: &'static str,
    want: Reason,
}

fn row(
    method: Method,
    case: &'static str,
    action: Action,
    stream: &'static str,
    cred: Credential,
    want: Reason,
) -> Row {
    Row { method, case, action, stream, cred, ip: "10.0.0.5", want }
}

fn table() -> Vec<Row> {
    use Method::*;
    use Reason::*;
    let outside = |mut r: Row| {
        r.ip = "192.0.2.1";
        r.case = "cidr outside";
        r.want = CidrDenied;
        r
    };
    vec![
        // open
        row(Open, "valid", PUB, "cam1-key", Credential::default(), Allowed),
        row(Open, "valid play", PLAY, "cam1", Credential::default(), Allowed),
        row(Open, "wrong stream (unregistered)", PUB, "nope", Credential::default(), StreamNotRegistered),
        row(Open, "public name used to publish", PUB, "cam1", Credential::default(), PublishNameRequired),
        row(Open, "publish name used to play", PLAY, "cam1-key", Credential::default(), StreamNotRegistered),
        outside(row(Open, "", PUB, "cam1-key", Credential::default(), Allowed)),
        // one-time token (issued for publish on cam1)
        row(OneTimeToken, "valid", PUB, "cam1-key", Credential::token("tok-publish"), Allowed),
        row(OneTimeToken, "wrong stream", PUB, "cam2", Credential::token("tok-publish"), TokenWrongStream),
        row(OneTimeToken, "wrong action", PLAY, "cam1", Credential::token("tok-publish"), TokenWrongAction),
        row(OneTimeToken, "wrong secret", PUB, "cam1-key", Credential::token("tok-other"), TokenNotFound),
        row(OneTimeToken, "malformed (missing)", PUB, "cam1-key", Credential::default(), CredentialMissing),
        outside(row(OneTimeToken, "", PUB, "cam1-key", Credential::token("tok-publish"), Allowed)),
        // hash
        row(Hash, "valid", PUB, "cam1-key", hash_token("cam1", PUB, HASH_SECRET), Allowed),
        row(Hash, "valid play", PLAY, "cam2", hash_token("cam2", PLAY, HASH_SECRET), Allowed),
        row(Hash, "wrong stream", PUB, "cam2", hash_token("cam1", PUB, HASH_SECRET), HashMismatch),
        row(Hash, "wrong action", PLAY, "cam1", hash_token("cam1", PUB, HASH_SECRET), HashMismatch),
        row(Hash, "wrong secret", PUB, "cam1-key", hash_token("cam1", PUB, b"not-the-secret"), HashMismatch),
        row(Hash, "malformed", PUB, "cam1-key", Credential::token("zz-not-hex"), HashMismatch),
        outside(row(Hash, "", PUB, "cam1-key", hash_token("cam1", PUB, HASH_SECRET), Allowed)),
        // hmac with expiry
        row(Hmac, "valid", PUB, "cam1-key", hmac_token("cam1", PUB, exp_ok(), HASH_SECRET), Allowed),
        row(Hmac, "expired", PUB, "cam1-key", hmac_token("cam1", PUB, exp_past(), HASH_SECRET), HmacExpired),
        row(Hmac, "wrong stream", PUB, "cam2", hmac_token("cam1", PUB, exp_ok(), HASH_SECRET), HmacMismatch),
        row(Hmac, "wrong action", PLAY, "cam1", hmac_token("cam1", PUB, exp_ok(), HASH_SECRET), HmacMismatch),
        row(Hmac, "wrong secret", PUB, "cam1-key", hmac_token("cam1", PUB, exp_ok(), b"other-secret"), HmacMismatch),
        row(
            Hmac,
            "malformed",
            PUB,
            "cam1-key",
            Credential { expires: Some(exp_ok()), ..Credential::token("%%%not base64%%%") },
            HmacMalformed,
        ),
        row(
            Hmac,
            "expires tampered",
            PUB,
            "cam1-key",
            Credential { expires: Some(exp_ok() + 86_400), ..hmac_token("cam1", PUB, exp_ok(), HASH_SECRET) },
            HmacMismatch,
        ),
        outside(row(Hmac, "", PUB, "cam1-key", hmac_token("cam1", PUB, exp_ok(), HASH_SECRET), Allowed)),
        // JWT HS256
        row(Jwt, "valid HS256", PUB, "cam1-key", jwt_hs(claims("cam1", "publish", exp_ok()), JWT_SECRET), Allowed),
        row(
            Jwt,
            "valid list of streams",
            PLAY,
            "cam2",
            jwt_hs(json!({"stream": ["cam1", "cam2"], "action": ["play"], "exp": exp_ok()}), JWT_SECRET),
            Allowed,
        ),
        row(
            Jwt,
            "valid wildcard, SRT request, Ant names",
            PLAY,
            "cam2",
            jwt_hs(json!({"streamId": "*", "type": "request", "exp": exp_ok()}), JWT_SECRET),
            Allowed,
        ),
        row(Jwt, "expired", PUB, "cam1-key", jwt_hs(claims("cam1", "publish", exp_past()), JWT_SECRET), JwtExpired),
        row(
            Jwt,
            "not yet valid",
            PUB,
            "cam1-key",
            jwt_hs(json!({"stream": "cam1", "action": "publish", "exp": exp_ok(), "nbf": exp_ok() - 10}), JWT_SECRET),
            JwtNotYetValid,
        ),
        row(
            Jwt,
            "no exp",
            PUB,
            "cam1-key",
            jwt_hs(json!({"stream": "cam1", "action": "publish"}), JWT_SECRET),
            JwtMalformed,
        ),
        row(
            Jwt,
            "wrong app",
            PUB,
            "cam1-key",
            jwt_hs(json!({"app": "other", "stream": "cam1", "action": "publish", "exp": exp_ok()}), JWT_SECRET),
            JwtWrongApp,
        ),
        row(
            Jwt,
            "wrong stream",
            PUB,
            "cam1-key",
            jwt_hs(claims("cam2", "publish", exp_ok()), JWT_SECRET),
            JwtWrongStream,
        ),
        row(Jwt, "wrong action", PLAY, "cam1", jwt_hs(claims("cam1", "publish", exp_ok()), JWT_SECRET), JwtWrongAction),
        row(
            Jwt,
            "wrong secret",
            PUB,
            "cam1-key",
            jwt_hs(claims("cam1", "publish", exp_ok()), b"another-secret-of-at-least-32-bytes!!"),
            JwtBadSignature,
        ),
        row(Jwt, "malformed", PUB, "cam1-key", Credential::token("not-a-jwt"), JwtMalformed),
        row(Jwt, "malformed header", PUB, "cam1-key", Credential::token("e30x.e30.sig"), JwtMalformed),
        // {"alg":"none","typ":"JWT"} . {"stream":"cam1","action":"publish","exp":9999999999} .
        row(
            Jwt,
            "alg none",
            PUB,
            "cam1-key",
            Credential::token(
                "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdHJlYW0iOiJjYW0xIiwiYWN0aW9uIjoicHVibGlzaCIsImV4cCI6OTk5OTk5OTk5OX0.",
            ),
            JwtAlgorithmRefused,
        ),
        // {"alg":"HS512"}
        row(Jwt, "alg HS512", PUB, "cam1-key", Credential::token("eyJhbGciOiJIUzUxMiJ9.e30.c2ln"), JwtAlgorithmRefused),
        outside(row(Jwt, "", PUB, "cam1-key", jwt_hs(claims("cam1", "publish", exp_ok()), JWT_SECRET), Allowed)),
        // JWT from the JWKS (ES256 and RS256)
        row(
            Jwt,
            "valid ES256 with kid",
            PUB,
            "cam1-key",
            jwt_es(claims("cam1", "publish", exp_ok()), Some("ec-1")),
            Allowed,
        ),
        row(
            Jwt,
            "valid ES256 without kid",
            PUB,
            "cam1-key",
            jwt_es(claims("cam1", "publish", exp_ok()), None),
            Allowed,
        ),
        row(Jwt, "valid RS256", PLAY, "cam2", jwt_rs(claims("cam2", "play", exp_ok())), Allowed),
        row(
            Jwt,
            "ES256 unknown kid",
            PUB,
            "cam1-key",
            jwt_es(claims("cam1", "publish", exp_ok()), Some("rotated-away")),
            JwtKeyUnknown,
        ),
        row(Jwt, "RS256 expired", PLAY, "cam2", jwt_rs(claims("cam2", "play", exp_past())), JwtExpired),
        // TOTP (alice may publish cam1)
        row(Totp, "valid", PUB, "cam1-key", totp("alice", T0, 0), Allowed),
        row(Totp, "valid previous step (skew)", PUB, "cam1-key", totp("alice", T0, -1), Allowed),
        row(Totp, "expired (two steps old)", PUB, "cam1-key", totp("alice", T0, -2), TotpInvalid),
        row(Totp, "wrong stream", PUB, "cam2", totp("alice", T0, 0), SubscriberNotFound),
        row(Totp, "wrong action", PLAY, "cam1", totp("alice", T0, 0), SubscriberWrongAction),
        row(Totp, "wrong secret (unknown subscriber)", PUB, "cam1-key", totp("bob", T0, 0), SubscriberNotFound),
        row(
            Totp,
            "malformed code",
            PUB,
            "cam1-key",
            Credential { subscriber_code: Some(SecretString::new("12ab56")), ..totp("alice", T0, 0) },
            TotpInvalid,
        ),
        row(
            Totp,
            "code without id",
            PUB,
            "cam1-key",
            Credential { subscriber_id: None, ..totp("alice", T0, 0) },
            TotpInvalid,
        ),
        outside(row(Totp, "", PUB, "cam1-key", totp("alice", T0, 0), Allowed)),
    ]
}

#[test]
fn every_method_against_every_case() {
    let mut failures = Vec::new();
    for r in table() {
        let w = world(&[r.method]);
        let mut req = request(r.action, r.stream, r.cred.clone());
        req.client_ip = r.ip.parse().unwrap();
        let d = w.when(&req, T0);
        let want_allow = r.want == Reason::Allowed;
        if d.reason != r.want || d.is_allow() != want_allow {
            failures
                .push(format!("{:?} / {}: got {:?} ({:?}), want {:?}", r.method, r.case, d.reason, d.outcome, r.want));
        }
        assert_eq!(d.position, w.state.position());
        assert_eq!(d.id, req.id);
    }
    assert!(failures.is_empty(), "decide table failures:\n{}", failures.join("\n"));
}

#[test]
fn one_time_token_allow_carries_the_consume_effect_and_maps_the_name() {
    let w = world(&[Method::OneTimeToken]);
    let d = w.when(&request(PUB, "cam1-key", Credential::token("tok-publish")), T0);
    assert_eq!(d.stream.as_str(), "cam1", "publish name maps to the public name");
    assert_eq!(d.method, Some(Method::OneTimeToken));
    assert_eq!(d.effects, vec![Effect::ConsumeToken { token_sha256: Sha256Digest::of(b"tok-publish") }]);
    assert!(d.subject.unwrap().starts_with("token:"));
}

#[test]
fn one_time_token_expired_consumed_revoked() {
    let mut w = world(&[Method::OneTimeToken]);
    let req = request(PUB, "cam1-key", Credential::token("tok-publish"));
    assert_eq!(w.when(&req, T0.plus_secs(3600)).reason, Reason::TokenExpired);
    w.command(
        Command::ConsumeToken { token_sha256: Sha256Digest::of(b"tok-publish"), decision_id: None, node: None },
        T0,
    )
    .unwrap();
    assert_eq!(w.when(&req, T0).reason, Reason::TokenConsumed);
    w.command(Command::RevokeToken { token_sha256: Sha256Digest::of(b"tok-publish") }, T0).unwrap();
    assert_eq!(w.when(&req, T0).reason, Reason::TokenRevoked);
}

#[test]
fn totp_code_is_not_accepted_twice() {
    let mut w = world(&[Method::Totp]);
    let req = request(PUB, "cam1-key", totp("alice", T0, 0));
    let d = w.when(&req, T0);
    let Some(Effect::UseTotpStep { step, .. }) = d.effects.first().cloned() else {
        panic!("allow must carry the step to mark used: {d:?}");
    };
    w.command(
        Command::UseTotpStep {
            app: app(),
            stream: name("cam1"),
            subscriber_id: SubscriberId::parse("alice").unwrap(),
            step,
        },
        T0,
    )
    .unwrap();
    assert_eq!(w.when(&req, T0).reason, Reason::TotpReplayed);
    // An older step is a replay too, even inside the skew window.
    assert_eq!(w.when(&request(PUB, "cam1-key", totp("alice", T0, -1)), T0).reason, Reason::TotpReplayed);
    // The next step's code is fresh.
    assert!(w.when(&request(PUB, "cam1-key", totp("alice", T0.plus_secs(60), 0)), T0.plus_secs(60)).is_allow());
}

#[test]
fn blocked_subscriber_is_refused_until_the_block_ends() {
    let mut w = world(&[Method::Totp]);
    let alice = SubscriberId::parse("alice").unwrap();
    w.command(
        Command::BlockSubscriber {
            app: app(),
            stream: name("cam1"),
            subscriber_id: alice,
            until: T0.plus_secs(120),
            action: None,
        },
        T0,
    )
    .unwrap();
    assert_eq!(w.when(&request(PUB, "cam1-key", totp("alice", T0, 0)), T0).reason, Reason::SubscriberBlocked);
    let later = T0.plus_secs(180);
    assert!(w.when(&request(PUB, "cam1-key", totp("alice", later, 0)), later).is_allow());
}

#[test]
fn a_block_of_one_action_leaves_the_other() {
    // Ant Media's block types: `play` leaves a publisher publishing, `publish` stops it.
    let mut w = world(&[Method::Totp]);
    let alice = SubscriberId::parse("alice").unwrap();
    let block = |action| Command::BlockSubscriber {
        app: app(),
        stream: name("cam1"),
        subscriber_id: alice.clone(),
        until: T0.plus_secs(120),
        action: Some(action),
    };
    w.command(block(PLAY), T0).unwrap();
    assert!(w.when(&request(PUB, "cam1-key", totp("alice", T0, 0)), T0).is_allow());
    w.command(block(PUB), T0).unwrap();
    assert_eq!(w.when(&request(PUB, "cam1-key", totp("alice", T0, 0)), T0).reason, Reason::SubscriberBlocked);
}

#[test]
fn any_of_methods_and_the_most_specific_denial() {
    let w = world(&[Method::OneTimeToken, Method::Hash, Method::Jwt]);
    // A valid hash passes even though it is no one-time token and no JWT.
    assert!(w.when(&request(PUB, "cam1-key", hash_token("cam1", PUB, HASH_SECRET)), T0).is_allow());
    // An expired JWT is named as such, not as "hash mismatch" or "token not found".
    let d = w.when(&request(PUB, "cam1-key", jwt_hs(claims("cam1", "publish", exp_past()), JWT_SECRET)), T0);
    assert_eq!((d.reason, d.method), (Reason::JwtExpired, Some(Method::Jwt)));
    assert_eq!(w.when(&request(PUB, "cam1-key", Credential::default()), T0).reason, Reason::CredentialMissing);
}

#[test]
fn webhook_is_asked_only_when_no_local_method_accepts() {
    let mut p = policy_with(&[Method::Hash, Method::Webhook]);
    p.webhook = Some(sluice_events::policy::WebhookSettings { url: "http://127.0.0.1:9/auth".into(), timeout_ms: 500 });
    let mut w = world(&[]);
    w.command(Command::SetPolicy { app: app(), policy: p }, T0).unwrap();
    let d = w.when(&request(PUB, "cam1-key", Credential::default()), T0);
    assert_eq!(d.outcome, Outcome::AskWebhook { url: "http://127.0.0.1:9/auth".into(), timeout_ms: 500 });
    assert!(w.when(&request(PUB, "cam1-key", hash_token("cam1", PUB, HASH_SECRET)), T0).is_allow());
}

#[test]
fn cidr_gate_is_per_action_and_applies_before_methods() {
    let mut p = policy_with(&[Method::Open]);
    p.play.cidrs = vec![];
    let mut w = world(&[]);
    w.command(Command::SetPolicy { app: app(), policy: p }, T0).unwrap();
    let mut req = request(PLAY, "cam2", Credential::default());
    req.client_ip = "203.0.113.9".parse().unwrap();
    assert!(w.when(&req, T0).is_allow(), "play has no gate");
    req.action = PUB;
    assert_eq!(w.when(&req, T0).reason, Reason::CidrDenied);
}

#[test]
fn unknown_app_no_methods_and_sealed_secrets_without_a_key() {
    let w = world(&[]);
    let mut req = request(PUB, "cam1-key", Credential::default());
    assert_eq!(w.when(&req, T0).reason, Reason::NoMethodEnabled);
    req.app = AppName::parse("other").unwrap();
    assert_eq!(w.when(&req, T0).reason, Reason::AppNotFound);

    // A node without the sealing key fails closed on every method that needs a secret.
    let mut keyless = AuthState::new();
    for r in &world(&[Method::Hash, Method::Totp, Method::Jwt]).log {
        keyless.apply(r).unwrap();
    }
    let d = decide(&keyless, &request(PUB, "cam1-key", hash_token("cam1", PUB, HASH_SECRET)), T0);
    assert_eq!(d.reason, Reason::SecretUnavailable);
    let d = decide(&keyless, &request(PUB, "cam1-key", totp("alice", T0, 0)), T0);
    assert_eq!(d.reason, Reason::SecretUnavailable);
}

#[test]
fn hs256_token_signed_with_a_public_key_is_refused_without_an_hs_secret() {
    // Algorithm confusion: an attacker signs HS256 with the (public) RSA key as the secret.
    let mut w = given([
        event::AppCreated { app: app(), policy: policy_with(&[Method::Jwt]) }.into(),
        event::JwksRefreshed { app: app(), jwks: serde_json::from_str(include_str!("fixtures/jwks.json")).unwrap() }
            .into(),
    ]);
    w.and([]);
    let cred = jwt_hs(claims("cam2", "play", exp_ok()), include_bytes!("fixtures/rsa.pub.pem"));
    let mut req = request(PLAY, "cam2", cred);
    req.stream = name("cam2");
    let mut p = policy_with(&[Method::Jwt]);
    p.play.accept_undefined_streams = true;
    w.command(Command::SetPolicy { app: app(), policy: p }, T0).unwrap();
    assert_eq!(w.when(&req, T0).reason, Reason::JwtAlgorithmRefused);
}

mod recheck {
    use super::*;
    use sluice_events::decide::recheck;

    #[test]
    fn what_a_session_used_up_to_get_in_does_not_end_it() {
        let mut w = world(&[Method::OneTimeToken, Method::Totp]);
        let token = request(PUB, "cam1-key", Credential::token("tok-publish"));
        w.command(
            Command::ConsumeToken { token_sha256: Sha256Digest::of(b"tok-publish"), decision_id: None, node: None },
            T0,
        )
        .unwrap();
        assert_eq!(recheck(&w.state, &token, Some(Method::OneTimeToken), T0), Ok(()));
        // The same state refuses a newcomer with that token.
        assert_eq!(w.when(&token, T0).reason, Reason::TokenConsumed);
        let code = request(PUB, "cam1-key", totp("alice", T0, 0));
        let later = T0.plus_secs(600);
        assert_eq!(recheck(&w.state, &code, Some(Method::Totp), later), Ok(()), "an aged code is not a reason");
    }

    #[test]
    fn revocations_end_sessions_with_their_reason() {
        let token = request(PUB, "cam1-key", Credential::token("tok-publish"));
        let mut w = world(&[Method::OneTimeToken]);
        w.command(Command::RevokeToken { token_sha256: Sha256Digest::of(b"tok-publish") }, T0).unwrap();
        assert_eq!(recheck(&w.state, &token, Some(Method::OneTimeToken), T0), Err(Reason::TokenRevoked));
        let w = world(&[Method::OneTimeToken]);
        assert_eq!(
            recheck(&w.state, &token, Some(Method::OneTimeToken), T0.plus_secs(3600)),
            Err(Reason::TokenExpired),
            "the token's expiry reached"
        );

        let mut w = world(&[Method::Totp]);
        let code = request(PUB, "cam1-key", totp("alice", T0, 0));
        let alice = SubscriberId::parse("alice").unwrap();
        w.command(
            Command::BlockSubscriber {
                app: app(),
                stream: name("cam1"),
                subscriber_id: alice.clone(),
                until: T0.plus_secs(60),
                action: None,
            },
            T0,
        )
        .unwrap();
        assert_eq!(recheck(&w.state, &code, Some(Method::Totp), T0), Err(Reason::SubscriberBlocked));
        w.command(Command::RemoveSubscriber { app: app(), stream: name("cam1"), subscriber_id: alice }, T0).unwrap();
        assert_eq!(recheck(&w.state, &code, Some(Method::Totp), T0.plus_secs(120)), Err(Reason::SubscriberNotFound));

        let mut w = world(&[Method::Open]);
        let player = request(PLAY, "cam2", Credential::default());
        assert_eq!(recheck(&w.state, &player, Some(Method::Open), T0), Ok(()));
        w.command(Command::DeleteStream { app: app(), name: name("cam2") }, T0).unwrap();
        assert_eq!(recheck(&w.state, &player, Some(Method::Open), T0), Err(Reason::StreamNotRegistered));

        let mut w = world(&[Method::Open]);
        let mut tight = policy_with(&[Method::Open]);
        tight.play.cidrs = vec![Cidr::parse("192.0.2.0/24").unwrap()];
        w.command(Command::SetPolicy { app: app(), policy: tight }, T0).unwrap();
        assert_eq!(recheck(&w.state, &player, Some(Method::Open), T0), Err(Reason::CidrDenied));
    }

    #[test]
    fn stateless_credentials_are_checked_again_in_full() {
        let exp = T0.as_secs() + 60;
        let w = world(&[Method::Jwt, Method::Hmac]);
        let jwt = request(PUB, "cam1-key", jwt_hs(claims("cam1", "publish", exp), JWT_SECRET));
        assert_eq!(recheck(&w.state, &jwt, Some(Method::Jwt), T0), Ok(()));
        assert_eq!(recheck(&w.state, &jwt, Some(Method::Jwt), T0.plus_secs(120)), Err(Reason::JwtExpired));
        let hmac = request(PUB, "cam1-key", hmac_token("cam1", PUB, exp, HASH_SECRET));
        assert_eq!(recheck(&w.state, &hmac, Some(Method::Hmac), T0), Ok(()));
        assert_eq!(recheck(&w.state, &hmac, Some(Method::Hmac), T0.plus_secs(120)), Err(Reason::HmacExpired));
        // The hash secret rotated: a session on the old one ends.
        let mut w = world(&[Method::Hash]);
        let hash = request(PUB, "cam1-key", hash_token("cam1", PUB, HASH_SECRET));
        assert_eq!(recheck(&w.state, &hash, Some(Method::Hash), T0), Ok(()));
        w.and([sluice_events::event::AppSecretRotated {
            app: app(),
            kind: SecretKind::Hash,
            secret: key().seal(
                &sluice_events::state::app_secret_purpose(&app(), SecretKind::Hash),
                b"a-brand-new-hash-secret",
                [9; 24],
            ),
        }
        .into()]);
        assert_eq!(recheck(&w.state, &hash, Some(Method::Hash), T0), Err(Reason::HashMismatch));
    }
}

#[test]
fn the_public_stream_maps_publish_names_without_deciding() {
    let w = world(&[Method::OneTimeToken]);
    let by_key = request(PUB, "cam1-key", Credential::default());
    assert_eq!(sluice_events::decide::public_stream(&w.state, &by_key).as_str(), "cam1");
    assert_eq!(
        sluice_events::decide::public_stream(&w.state, &request(PLAY, "cam2", Credential::default())).as_str(),
        "cam2"
    );
    // Unknown app or a refused mapping: the name as sent.
    let mut other = request(PUB, "cam1", Credential::default());
    assert_eq!(sluice_events::decide::public_stream(&w.state, &other).as_str(), "cam1");
    other.app = AppName::parse("elsewhere").unwrap();
    assert_eq!(sluice_events::decide::public_stream(&w.state, &other).as_str(), "cam1");
}

#[test]
fn extra_player_names_play_the_publisher_and_outlive_the_first() {
    // SRT Live Server's many player ids per publisher.
    let mut w = world(&[Method::Open]);
    let public = |w: &Given, action, name: &str| {
        sluice_events::decide::public_stream(&w.state, &request(action, name, Credential::default())).to_string()
    };
    let player = |name: &str, plays: &str| Command::RegisterPlayer {
        app: app(),
        name: name.parse().unwrap(),
        plays: plays.parse().unwrap(),
        description: None,
    };
    w.command(player("cam1-b", "cam1-key"), T0).unwrap();
    w.command(player("cam1-c", "cam1-key"), T0).unwrap();
    // Another player of a stream without a publish name plays under that stream's name.
    w.command(player("cam2-b", "cam2"), T0).unwrap();
    assert!(w.command(player("x", "nothing"), T0).is_err(), "no such publisher");
    assert!(w.command(player("x", "cam1-b"), T0).is_err(), "an extra player publishes nothing");
    assert!(w.command(player("cam1", "cam2"), T0).is_err(), "taken");
    assert!(w.when(&request(PLAY, "cam1-b", Credential::default()), T0).is_allow());
    assert_eq!(public(&w, PLAY, "cam1-b"), "cam1");
    assert_eq!(public(&w, PLAY, "cam2-b"), "cam2");
    assert_eq!(
        w.when(&request(PUB, "cam1-b", Credential::default()), T0).reason,
        Reason::PublishNameRequired,
        "an extra player name does not publish"
    );
    // The first player goes: the next one by name takes the publish name over, the others
    // follow, and the publisher still publishes.
    w.command(Command::DeleteStream { app: app(), name: name("cam1") }, T0).unwrap();
    assert_eq!(public(&w, PUB, "cam1-key"), "cam1-b");
    assert_eq!(public(&w, PLAY, "cam1-c"), "cam1-b");
    assert!(w.when(&request(PUB, "cam1-key", Credential::default()), T0).is_allow());
    // A new publish name carries its players along.
    w.command(
        Command::UpdateStream {
            app: app(),
            name: name("cam1-b"),
            publish_name: Some(name("cam1-new")),
            description: None,
        },
        T0,
    )
    .unwrap();
    assert_eq!(public(&w, PLAY, "cam1-c"), "cam1-b");
    assert_eq!(public(&w, PUB, "cam1-new"), "cam1-b");
    let update_player =
        Command::UpdateStream { app: app(), name: name("cam1-c"), publish_name: Some(name("k")), description: None };
    assert!(w.command(update_player, T0).is_err(), "an extra player takes no publish name");
}
