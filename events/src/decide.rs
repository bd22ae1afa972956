//! `decide`: the pure verdict on one publish/play request. No I/O, no clock, no randomness.
//!
//! Order: app → stream resolution (publish-name mapping, registered-only) → CIDR gate →
//! any-of the enabled methods. When no method accepts, the denial names the most specific
//! failure (an expired token says `token_expired`, not `token_not_found`); when the app also
//! asks a webhook, the verdict is `AskWebhook` and the shell makes the call.

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::decision::{AccessRequest, Decision, Effect, Outcome, Reason};
use crate::event::token_id;
use crate::ids::{Action, AppName, StreamName, Timestamp, cidrs_allow};
use crate::policy::Method;
use crate::secret::Sha256Digest;
use crate::state::{App, AuthState, TokenStatus};

/// What one method says about a request.
enum Check {
    Allow {
        subject: Option<Cow<'static, str>>,
        effects: Vec<Effect>,
    },
    /// The request carries no credential of this method's shape.
    Absent,
    /// Refused; `specificity` ranks how surely the credential was meant for this method
    /// (0: could be anything, 3: recognised and specifically wrong).
    Deny(Reason, u8),
}

/// The inputs every method check shares.
struct Ctx<'a> {
    app_name: &'a AppName,
    app: &'a App,
    req: &'a AccessRequest,
    /// The public name, after publish-name mapping.
    stream: &'a StreamName,
    now: Timestamp,
}

pub fn decide(state: &AuthState, req: &AccessRequest, now: Timestamp) -> Decision {
    let deny = |reason: Reason, stream: &StreamName| Decision {
        id: req.id,
        outcome: Outcome::Deny,
        reason,
        method: None,
        subject: None,
        stream: stream.clone(),
        position: state.position(),
        effects: Vec::new(),
    };

    let Some((app_name, app)) = state.apps.get_key_value(&req.app) else {
        return deny(Reason::AppNotFound, &req.stream);
    };
    let policy = app.policy.for_action(req.action);

    let (stream, registered) = match resolve_stream(app, req) {
        Ok(found) => found,
        Err(reason) => return deny(reason, &req.stream),
    };
    if !registered && !policy.accept_undefined_streams {
        return deny(Reason::StreamNotRegistered, stream);
    }
    if !cidrs_allow(&policy.cidrs, req.client_ip) {
        return deny(Reason::CidrDenied, stream);
    }
    if policy.methods.is_empty() {
        return deny(Reason::NoMethodEnabled, stream);
    }

    let ctx = Ctx { app_name, app, req, stream, now };
    let mut best: Option<(Reason, u8, Method)> = None;
    // Cheapest and effect-free first; methods that consume something last.
    for method in [Method::Open, Method::Hash, Method::Hmac, Method::Jwt, Method::OneTimeToken, Method::Totp] {
        if !policy.methods.contains(&method) {
            continue;
        }
        let check = match method {
            Method::Open => Check::Allow { subject: None, effects: Vec::new() },
            Method::Hash => check_hash(&ctx),
            Method::Hmac => check_hmac(&ctx),
            Method::Jwt => check_jwt(&ctx),
            Method::OneTimeToken => check_one_time(state, &ctx),
            Method::Totp => check_totp(&ctx),
            Method::Webhook => Check::Absent,
        };
        match check {
            Check::Allow { subject, effects } => {
                return Decision {
                    id: req.id,
                    outcome: Outcome::Allow,
                    reason: Reason::Allowed,
                    method: Some(method),
                    subject,
                    stream: stream.clone(),
                    position: state.position(),
                    effects,
                };
            }
            Check::Absent => {}
            Check::Deny(reason, spec) => {
                if best.is_none_or(|(_, s, _)| spec > s) {
                    best = Some((reason, spec, method));
                }
            }
        }
    }

    if policy.methods.contains(&Method::Webhook)
        && let Some(hook) = &app.policy.webhook
    {
        return Decision {
            id: req.id,
            outcome: Outcome::AskWebhook { url: hook.url.clone(), timeout_ms: hook.timeout_ms },
            reason: Reason::WebhookRequired,
            method: Some(Method::Webhook),
            subject: None,
            stream: stream.clone(),
            position: state.position(),
            effects: Vec::new(),
        };
    }

    let (reason, method) = match best {
        Some((reason, _, method)) => (reason, Some(method)),
        None => (Reason::CredentialMissing, None),
    };
    Decision { method, ..deny(reason, stream) }
}

/// Maps the name the client sent to the stream's public name. Returns whether it is
/// registered. A publisher must use the publish name when one is set; a player can never
/// use a publish name (it is a secret, and naming it must not reveal that it exists).
/// The public name a request is for (publish-name mapping applied), without deciding:
/// what a media server keys its streams by. The name as sent when the app or stream is unknown.
pub fn public_stream(state: &AuthState, req: &AccessRequest) -> StreamName {
    state
        .apps
        .get(&req.app)
        .and_then(|app| resolve_stream(app, req).ok().map(|(s, _)| s.clone()))
        .unwrap_or_else(|| req.stream.clone())
}

fn resolve_stream<'a>(app: &'a App, req: &'a AccessRequest) -> Result<(&'a StreamName, bool), Reason> {
    match req.action {
        Action::Publish => {
            if let Some(public) = app.publish_names.get(&req.stream) {
                return Ok((public, true));
            }
            match app.streams.get(&req.stream) {
                Some(s) if s.publish_name.is_some() => Err(Reason::PublishNameRequired),
                Some(s) if s.plays.is_some() => Err(Reason::PublishNameRequired),
                Some(_) => Ok((&req.stream, true)),
                None => Ok((&req.stream, false)),
            }
        }
        Action::Play => {
            if let Some(s) = app.streams.get(&req.stream) {
                // An extra player name plays the stream published under `plays`.
                match &s.plays {
                    None => Ok((&req.stream, true)),
                    Some(p) => app
                        .publish_names
                        .get(p)
                        .or_else(|| app.streams.get_key_value(p).map(|(k, _)| k))
                        .map(|public| (public, true))
                        .ok_or(Reason::StreamNotRegistered),
                }
            } else if app.publish_names.contains_key(&req.stream) {
                Err(Reason::StreamNotRegistered)
            } else {
                Ok((&req.stream, false))
            }
        }
    }
}

fn app_secret(app: &App, kind: crate::policy::SecretKind) -> Option<&Arc<[u8]>> {
    app.secrets.get(&kind)?.plain.as_ref().map(|o| &o.0)
}

/// The HMAC-SHA256 state keyed with an app secret, prepared when the secret was applied.
fn app_mac(app: &App, kind: crate::policy::SecretKind) -> Option<&Hmac<Sha256>> {
    app.secrets.get(&kind)?.mac.as_ref().map(|o| &o.0)
}

/// Decimal digits of `v` in a stack buffer (the HMAC input), without allocating.
fn decimal(v: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut n = v.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

/// Is a live session, admitted by `method`, still allowed on `state` at `now`? (DESIGN.md §6:
/// revocation ends live sessions.) The request is decided again; what the admission itself
/// used up does not count against it: the session's own one-time token is consumed, and its
/// TOTP code has aged or been marked used. Everything else does: the app or stream gone, the
/// CIDR tightened, the method dropped from the policy, the token revoked or expired, the
/// subscriber removed or blocked, a secret rotated, a JWT or HMAC expiry reached. A session a
/// webhook admitted stays unless something before the webhook now refuses it.
pub fn recheck(
    state: &AuthState,
    req: &AccessRequest,
    admitted_by: Option<Method>,
    now: Timestamp,
) -> Result<(), Reason> {
    let d = decide(state, req, now);
    match d.outcome {
        Outcome::Allow | Outcome::AskWebhook { .. } => Ok(()),
        Outcome::Deny => match (admitted_by, d.reason) {
            (Some(Method::OneTimeToken), Reason::TokenConsumed) => Ok(()),
            (Some(Method::Totp), Reason::TotpReplayed | Reason::TotpInvalid) => Ok(()),
            (_, reason) => Err(reason),
        },
    }
}

/// Ant Media's hash: `hex(sha256(stream + role + secret))`.
pub fn stream_hash(stream: &str, action: Action, secret: &[u8]) -> Sha256Digest {
    let mut h = Sha256::new();
    h.update(stream.as_bytes());
    h.update(action.as_str().as_bytes());
    h.update(secret);
    Sha256Digest(h.finalize().into())
}

fn check_hash(ctx: &Ctx<'_>) -> Check {
    let Some(token) = &ctx.req.credential.token else {
        return Check::Absent;
    };
    let Some(secret) = app_secret(ctx.app, crate::policy::SecretKind::Hash) else {
        return Check::Deny(Reason::SecretUnavailable, 2);
    };
    let Ok(presented) = Sha256Digest::parse_hex(token.expose()) else {
        return Check::Deny(Reason::HashMismatch, 0);
    };
    if stream_hash(ctx.stream.as_str(), ctx.req.action, secret).ct_eq(&presented) {
        Check::Allow { subject: Some(Cow::Borrowed("hash")), effects: Vec::new() }
    } else {
        Check::Deny(Reason::HashMismatch, 2)
    }
}

/// `hmac_sha256(stream + role + expires, secret)`, the MAC the `hmac` method expects
/// (base64 on the wire).
pub fn stream_hmac(stream: &str, action: Action, expires: i64, secret: &[u8]) -> Option<[u8; 32]> {
    // HMAC accepts keys of any length, so this only fails for a broken hmac crate.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).ok()?;
    mac.update(stream.as_bytes());
    mac.update(action.as_str().as_bytes());
    mac.update(decimal(expires, &mut [0u8; 20]));
    Some(mac.finalize().into_bytes().into())
}

fn decode_base64_any<'a>(s: &str, out: &'a mut [u8; 64]) -> Option<&'a [u8]> {
    for engine in [&STANDARD, &URL_SAFE, &STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        if let Ok(n) = engine.decode_slice(s, out) {
            return Some(&out[..n]);
        }
    }
    None
}

fn check_hmac(ctx: &Ctx<'_>) -> Check {
    let (Some(token), Some(expires)) = (&ctx.req.credential.token, ctx.req.credential.expires) else {
        return Check::Absent;
    };
    let Some(keyed) = app_mac(ctx.app, crate::policy::SecretKind::Hash) else {
        return Check::Deny(Reason::SecretUnavailable, 2);
    };
    let mut raw = [0u8; 64];
    let Some(presented) = decode_base64_any(token.expose(), &mut raw) else {
        return Check::Deny(Reason::HmacMalformed, 1);
    };
    let mut mac = keyed.clone();
    mac.update(ctx.stream.as_str().as_bytes());
    mac.update(ctx.req.action.as_str().as_bytes());
    mac.update(decimal(expires, &mut [0u8; 20]));
    // verify_slice compares in constant time.
    if mac.verify_slice(presented).is_err() {
        return Check::Deny(Reason::HmacMismatch, 2);
    }
    if expires <= ctx.now.as_secs() {
        return Check::Deny(Reason::HmacExpired, 3);
    }
    Check::Allow { subject: Some(Cow::Borrowed("hmac")), effects: Vec::new() }
}

/// A claim that names one value, several, or `*`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn admits(&self, value: &str) -> bool {
        match self {
            OneOrMany::One(v) => v == "*" || v == value,
            OneOrMany::Many(vs) => vs.iter().any(|v| v == "*" || v == value),
        }
    }
}

/// Stream-JWT claims. `streamId` and `type` are accepted as Ant Media's names for
/// `stream` and `action`.
#[derive(Deserialize)]
struct StreamClaims {
    exp: Option<f64>,
    nbf: Option<f64>,
    sub: Option<String>,
    app: Option<String>,
    #[serde(alias = "streamId")]
    stream: Option<OneOrMany>,
    #[serde(alias = "type")]
    action: Option<OneOrMany>,
}

#[derive(Deserialize)]
struct JwtHeader {
    alg: String,
    kid: Option<String>,
}

fn check_jwt(ctx: &Ctx<'_>) -> Check {
    let Some(token) = &ctx.req.credential.token else {
        return Check::Absent;
    };
    let token = token.expose();
    let mut parts = token.split('.');
    let (Some(head), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Check::Deny(Reason::JwtMalformed, 0);
    };
    // Read the header ourselves so that `alg: none` and unknown algorithms are named as such.
    let Some(header) = URL_SAFE_NO_PAD.decode(head).ok().and_then(|h| serde_json::from_slice::<JwtHeader>(&h).ok())
    else {
        return Check::Deny(Reason::JwtMalformed, 1);
    };
    let claims: StreamClaims = match header.alg.as_str() {
        "HS256" => {
            let Some(keyed) = app_mac(ctx.app, crate::policy::SecretKind::Jwt) else {
                if ctx.app.secrets.contains_key(&crate::policy::SecretKind::Jwt) {
                    return Check::Deny(Reason::SecretUnavailable, 2);
                }
                // No HS256 secret configured: an HS256 token may be an attempt to sign with
                // a public key (algorithm confusion). Refuse by name.
                return Check::Deny(Reason::JwtAlgorithmRefused, 3);
            };
            // JWS (RFC 7515): HMAC-SHA256 over `header.payload`, base64url without padding.
            let mut sig = [0u8; 64];
            let Ok(n) = URL_SAFE_NO_PAD.decode_slice(signature, &mut sig) else {
                return Check::Deny(Reason::JwtMalformed, 2);
            };
            let mut mac = keyed.clone();
            mac.update(&token.as_bytes()[..head.len() + 1 + payload.len()]);
            if mac.verify_slice(&sig[..n]).is_err() {
                return Check::Deny(Reason::JwtBadSignature, 3);
            }
            match URL_SAFE_NO_PAD.decode(payload).ok().and_then(|p| serde_json::from_slice(&p).ok()) {
                Some(c) => c,
                None => return Check::Deny(Reason::JwtMalformed, 2),
            }
        }
        "RS256" | "ES256" => {
            let alg = if header.alg == "RS256" { Algorithm::RS256 } else { Algorithm::ES256 };
            let keys = ctx.app.jwks.as_ref().map(|j| j.keys.as_slice()).unwrap_or(&[]);
            let found = keys
                .iter()
                .find(|k| k.alg == alg && (header.kid.is_none() || k.kid.as_deref() == header.kid.as_deref()));
            let Some(key) = found else {
                return Check::Deny(Reason::JwtKeyUnknown, 3);
            };
            match verify_asymmetric(token, &key.key, alg) {
                Ok(c) => c,
                Err(check) => return check,
            }
        }
        _ => return Check::Deny(Reason::JwtAlgorithmRefused, 3),
    };
    check_claims(ctx, claims)
}

/// RS256/ES256 through jsonwebtoken. Time claims are checked by `check_claims` against
/// `now`: the library must not read the clock.
fn verify_asymmetric(token: &str, key: &DecodingKey, alg: Algorithm) -> Result<StreamClaims, Check> {
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    jsonwebtoken::decode::<StreamClaims>(token, key, &validation).map(|data| data.claims).map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::InvalidSignature => Check::Deny(Reason::JwtBadSignature, 3),
        jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => Check::Deny(Reason::JwtAlgorithmRefused, 3),
        _ => Check::Deny(Reason::JwtMalformed, 2),
    })
}

fn check_claims(ctx: &Ctx<'_>, claims: StreamClaims) -> Check {
    let now = ctx.now.0 as f64 / 1000.0;
    match claims.exp {
        None => return Check::Deny(Reason::JwtMalformed, 3),
        Some(exp) if exp <= now => return Check::Deny(Reason::JwtExpired, 3),
        Some(_) => {}
    }
    if claims.nbf.is_some_and(|nbf| nbf > now) {
        return Check::Deny(Reason::JwtNotYetValid, 3);
    }
    if claims.app.as_deref().is_some_and(|a| a != "*" && a != ctx.app_name.as_str()) {
        return Check::Deny(Reason::JwtWrongApp, 3);
    }
    if !claims.stream.as_ref().is_some_and(|s| s.admits(ctx.stream.as_str())) {
        return Check::Deny(Reason::JwtWrongStream, 3);
    }
    let action_ok = claims.action.as_ref().is_some_and(|a| {
        a.admits(ctx.req.action.as_str())
            // SRT's word for play.
            || (ctx.req.action == Action::Play && a.admits("request"))
    });
    if !action_ok {
        return Check::Deny(Reason::JwtWrongAction, 3);
    }
    let subject = Some(match claims.sub {
        Some(sub) => Cow::Owned(format!("jwt:{sub}")),
        None => Cow::Borrowed("jwt"),
    });
    Check::Allow { subject, effects: Vec::new() }
}

fn check_one_time(state: &AuthState, ctx: &Ctx<'_>) -> Check {
    let Some(token) = &ctx.req.credential.token else {
        return Check::Absent;
    };
    let digest = Sha256Digest::of(token.expose().as_bytes());
    let Some(t) = state.tokens.get(&digest) else {
        return Check::Deny(Reason::TokenNotFound, 1);
    };
    let reason = if t.app != *ctx.app_name || t.stream != *ctx.stream {
        Reason::TokenWrongStream
    } else if t.action != ctx.req.action {
        Reason::TokenWrongAction
    } else if t.status == TokenStatus::Revoked {
        Reason::TokenRevoked
    } else if t.status == TokenStatus::Consumed {
        Reason::TokenConsumed
    } else if t.expires_at.is_some_and(|e| e <= ctx.now) {
        Reason::TokenExpired
    } else {
        return Check::Allow {
            subject: Some(["token:", &token_id(&digest)].concat().into()),
            effects: vec![Effect::ConsumeToken { token_sha256: digest }],
        };
    };
    Check::Deny(reason, 3)
}

/// The TOTP code for `secret` at `step` (RFC 6238, HMAC-SHA1).
pub fn totp_code(secret: &[u8], digits: u8, period_secs: u32, step: u64) -> Option<String> {
    let totp = totp_rs::Builder::new()
        .with_algorithm(totp_rs::Algorithm::SHA1)
        .with_digits(digits)
        .with_step_duration(u64::from(period_secs))
        .with_secret(secret.to_vec())
        .build()
        .ok()?;
    Some(totp.generate(step.checked_mul(u64::from(period_secs))?).to_string())
}

fn check_totp(ctx: &Ctx<'_>) -> Check {
    let cred = &ctx.req.credential;
    let (Some(id), Some(code)) = (&cred.subscriber_id, &cred.subscriber_code) else {
        return match (&cred.subscriber_id, &cred.subscriber_code) {
            (None, None) => Check::Absent,
            _ => Check::Deny(Reason::TotpInvalid, 2),
        };
    };
    let Some(sub) = ctx.app.subscribers.get(&(ctx.stream.clone(), id.clone())) else {
        return Check::Deny(Reason::SubscriberNotFound, 3);
    };
    if sub.action.is_some_and(|a| a != ctx.req.action) {
        return Check::Deny(Reason::SubscriberWrongAction, 3);
    }
    if sub.blocked_until.is_some_and(|until| until > ctx.now) && sub.blocked_action.is_none_or(|a| a == ctx.req.action)
    {
        return Check::Deny(Reason::SubscriberBlocked, 3);
    }
    let Some(totp) = &sub.totp else {
        return Check::Deny(Reason::SecretUnavailable, 3);
    };
    let Ok(now_secs) = u64::try_from(ctx.now.as_secs()) else {
        return Check::Deny(Reason::TotpInvalid, 3);
    };
    // The current step is tried first (the common case costs one HMAC), then one step either
    // side for clock skew. `check` wants exactly the configured digits and compares in
    // constant time.
    let current = now_secs / u64::from(ctx.app.policy.totp.period_secs.max(1));
    let window = [Some(current), current.checked_sub(1), current.checked_add(1)];
    let Some(step) = window.into_iter().flatten().find(|&step| totp.0.check(code.expose(), step)) else {
        return Check::Deny(Reason::TotpInvalid, 3);
    };
    if sub.last_step.is_some_and(|last| step <= last) {
        return Check::Deny(Reason::TotpReplayed, 3);
    }
    let mut subject = String::with_capacity(11 + id.as_str().len());
    subject.push_str("subscriber:");
    subject.push_str(id.as_str());
    Check::Allow {
        subject: Some(subject.into()),
        effects: vec![Effect::UseTotpStep { subscriber_id: id.clone(), step }],
    }
}
