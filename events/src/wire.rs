//! Credentials and names as they arrive on the wire: the RTMP stream key (`cam1?token=…`)
//! and the SRT streamid (`#!::r=app/cam1,m=publish,t=…` also percent-encoded, Ant Media's
//! `app/cam1,token=…`, SLS's plain names). Anything malformed is a typed error, never a panic.

use percent_encoding::percent_decode_str;

use crate::decision::Credential;
use crate::ids::{Action, AppName, ParseError, StreamName, SubscriberId};
use crate::secret::SecretString;

/// Longest stream key or streamid accepted (SRT itself caps streamid at 512 bytes).
pub const MAX_WIRE_LEN: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("empty")]
    Empty,
    #[error("too long: {0} bytes, at most 512")]
    TooLong(usize),
    #[error("not valid UTF-8")]
    NotUtf8,
    #[error("key {0:?} appears more than once")]
    DuplicateKey(String),
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: &'static str },
    #[error("unknown mode {0:?} (expected publish or request)")]
    UnknownMode(String),
    #[error("{0}")]
    Name(#[from] ParseError),
}

/// A parsed RTMP or SRT request target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireTarget {
    pub app: AppName,
    pub stream: StreamName,
    pub credential: Credential,
}

fn check_len(s: &str) -> Result<(), WireError> {
    if s.is_empty() {
        return Err(WireError::Empty);
    }
    if s.len() > MAX_WIRE_LEN {
        return Err(WireError::TooLong(s.len()));
    }
    Ok(())
}

fn decode(value: &str) -> Result<String, WireError> {
    percent_decode_str(value).decode_utf8().map(|v| v.into_owned()).map_err(|_| WireError::NotUtf8)
}

/// Collects credential keys, refusing duplicates (a second `token=` could smuggle a
/// different credential past a proxy that reads the first).
#[derive(Default)]
struct CredentialBuilder {
    cred: Credential,
    expires_raw: Option<String>,
}

impl CredentialBuilder {
    fn set<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<(), WireError> {
        if slot.is_some() {
            return Err(WireError::DuplicateKey(key.to_owned()));
        }
        *slot = Some(value);
        Ok(())
    }

    fn token(&mut self, key: &str, v: String) -> Result<(), WireError> {
        Self::set(&mut self.cred.token, key, SecretString::new(v))
    }
    fn expires(&mut self, key: &str, v: String) -> Result<(), WireError> {
        Self::set(&mut self.expires_raw, key, v)
    }
    fn subscriber(&mut self, key: &str, v: &str) -> Result<(), WireError> {
        Self::set(&mut self.cred.subscriber_id, key, SubscriberId::parse(v)?)
    }
    fn code(&mut self, key: &str, v: String) -> Result<(), WireError> {
        Self::set(&mut self.cred.subscriber_code, key, SecretString::new(v))
    }

    fn finish(mut self) -> Result<Credential, WireError> {
        if let Some(raw) = self.expires_raw {
            let secs = raw
                .parse::<i64>()
                .map_err(|_| WireError::Malformed { what: "expires", detail: "expected Unix seconds" })?;
            self.cred.expires = Some(secs);
        }
        Ok(self.cred)
    }
}

/// Parses an RTMP stream key as rml_rtmp hands it over (`cam1?token=abc&expires=…`).
/// Recognised query keys: `token`, `expires`, `subscriberId`, `subscriberCode`; others are
/// ignored (players add their own).
///
/// The credential may also come on the connect URL (`rtmp://host/app?token=T`, nginx-rtmp's
/// convention and where OBS puts it when it is in the Server field): the app name then carries
/// the query. The stream key's query is read first; the app's only when the key carries no
/// credential.
pub fn parse_rtmp(app: &str, stream_key: &str) -> Result<WireTarget, WireError> {
    check_len(stream_key)?;
    if app.len() > MAX_WIRE_LEN {
        return Err(WireError::TooLong(app.len()));
    }
    let (app, app_query) = match app.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (app, None),
    };
    let app = AppName::parse(app)?;
    let (name, query) = match stream_key.split_once('?') {
        Some((n, q)) => (n, Some(q)),
        None => (stream_key, None),
    };
    let stream = StreamName::parse(name)?;
    let mut credential = rtmp_query(query.unwrap_or(""))?;
    if credential.is_empty()
        && let Some(q) = app_query
    {
        credential = rtmp_query(q)?;
    }
    Ok(WireTarget { app, stream, credential })
}

/// The credential keys of an RTMP query string (`token`, `expires`, `subscriberId`,
/// `subscriberCode`); other keys are ignored, a repeated key is refused.
fn rtmp_query(query: &str) -> Result<Credential, WireError> {
    let mut b = CredentialBuilder::default();
    let mut seen: Vec<String> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(k)?;
        if seen.contains(&key) {
            return Err(WireError::DuplicateKey(key));
        }
        seen.push(key.clone());
        match key.as_str() {
            "token" => b.token(&key, decode(v)?)?,
            "expires" => b.expires(&key, decode(v)?)?,
            "subscriberId" => b.subscriber(&key, &decode(v)?)?,
            "subscriberCode" => b.code(&key, decode(v)?)?,
            _ => {}
        }
    }
    b.finish()
}

/// A parsed SRT streamid: the target and the mode the caller asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrtStreamId {
    pub target: WireTarget,
    pub action: Action,
    /// The streamid carried no mode at all (SRT Live Server's plain names): the mode is the
    /// name's, as SLS decides it. A stream's secret publish name publishes, any other name
    /// plays (`action` is `Play` until the caller applies that rule with its state).
    pub by_name: bool,
}

/// `app/stream`; SLS's `domain/app/stream` (the domain dropped); or SLS's bare `stream` in
/// `default_app` (SLS's one app), when there is one.
fn split_resource(r: &str, default_app: Option<&AppName>) -> Result<(AppName, StreamName), WireError> {
    const SHAPE: WireError = WireError::Malformed { what: "resource", detail: "expected app/stream" };
    let segments: Vec<&str> = r.split('/').collect();
    match segments.as_slice() {
        [stream] => match default_app {
            Some(app) if !stream.is_empty() => Ok((app.clone(), StreamName::parse(stream)?)),
            _ => Err(SHAPE),
        },
        [app, stream] => Ok((AppName::parse(app)?, StreamName::parse(stream)?)),
        [_domain, app, stream] if default_app.is_some() => Ok((AppName::parse(app)?, StreamName::parse(stream)?)),
        _ => Err(SHAPE),
    }
}

/// Parses an SRT streamid in any of the three accepted forms (see `parse_srt_streamid_in`),
/// with no default app.
pub fn parse_srt_streamid(raw: &[u8]) -> Result<SrtStreamId, WireError> {
    parse_srt_streamid_in(raw, None)
}

/// Parses an SRT streamid as real clients send it. The streamid travels in the handshake as
/// raw bytes; callers pass them here before accepting the connection.
/// - SRT's access-control form `#!::r=app/stream,m=publish,t=…` (no `m`: `request`, as the
///   spec says), also percent-encoded (`%23!%3A%3A…`, which VLC users must write because VLC
///   cuts a URL at `#`);
/// - Ant Media's `app/stream,token=…`: its ingest form, so it publishes; `,play` plays;
/// - SRT Live Server's plain `stream`, `app/stream` or `domain/app/stream`: no mode, decided
///   by name (`by_name`); a bare `stream` is in `default_app` (SLS's app).
pub fn parse_srt_streamid_in(raw: &[u8], default_app: Option<&AppName>) -> Result<SrtStreamId, WireError> {
    if raw.len() > MAX_WIRE_LEN {
        return Err(WireError::TooLong(raw.len()));
    }
    let s = std::str::from_utf8(raw).map_err(|_| WireError::NotUtf8)?;
    check_len(s)?;
    let decoded;
    let s = if s.starts_with("%23") {
        decoded = decode(s)?;
        decoded.as_str()
    } else {
        s
    };
    if let Some(body) = s.strip_prefix("#!::") {
        return parse_access_control(body);
    }
    let mut parts = s.split(',');
    let (app, stream) = split_resource(parts.next().unwrap_or(""), default_app)?;
    let mut b = CredentialBuilder::default();
    let mut mode: Option<Action> = None;
    let mut keyed = false;
    let mut seen: Vec<&str> = Vec::new();
    for part in parts {
        let (k, v) = match part.split_once('=') {
            Some(kv) => kv,
            // Ant Media's bare flag.
            None if part == "play" || part == "publish" => (part, ""),
            None => {
                return Err(WireError::Malformed { what: "streamid", detail: "expected key=value after the resource" });
            }
        };
        if seen.contains(&k) {
            return Err(WireError::DuplicateKey(k.to_owned()));
        }
        seen.push(k);
        keyed = true;
        match k {
            "token" => b.token(k, v.to_owned())?,
            "expires" => b.expires(k, v.to_owned())?,
            "subscriberId" => b.subscriber(k, v)?,
            "subscriberCode" => b.code(k, v.to_owned())?,
            "m" | "mode" => mode = Some(parse_mode(v)?),
            "play" => mode = Some(Action::Play),
            "publish" => mode = Some(Action::Publish),
            _ => {}
        }
    }
    let (action, by_name) = match mode {
        Some(a) => (a, false),
        // Ant Media's ingest form: a credential and no mode is a publisher.
        None if keyed => (Action::Publish, false),
        None => (Action::Play, true),
    };
    Ok(SrtStreamId { target: WireTarget { app, stream, credential: b.finish()? }, action, by_name })
}

fn parse_mode(v: &str) -> Result<Action, WireError> {
    match v {
        "publish" => Ok(Action::Publish),
        "request" | "play" => Ok(Action::Play),
        other => Err(WireError::UnknownMode(other.chars().take(32).collect())),
    }
}

/// SRT's access-control syntax: comma-separated `key=value`; `r` resource, `m` mode,
/// `t` token, `u` user (subscriber), `s` session (subscriber code), `e` expires.
fn parse_access_control(body: &str) -> Result<SrtStreamId, WireError> {
    let mut resource: Option<&str> = None;
    let mut mode: Option<&str> = None;
    let mut b = CredentialBuilder::default();
    let mut seen: Vec<&str> = Vec::new();
    for part in body.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or(WireError::Malformed { what: "streamid", detail: "expected key=value pairs after #!::" })?;
        if seen.contains(&k) {
            return Err(WireError::DuplicateKey(k.to_owned()));
        }
        seen.push(k);
        match k {
            "r" => resource = Some(v),
            "m" => mode = Some(v),
            "t" => b.token(k, v.to_owned())?,
            "e" => b.expires(k, v.to_owned())?,
            "u" => b.subscriber(k, v)?,
            "s" => b.code(k, v.to_owned())?,
            _ => {}
        }
    }
    let resource = resource.ok_or(WireError::Malformed { what: "streamid", detail: "missing r=app/stream" })?;
    let (app, stream) = split_resource(resource, None)?;
    let action = match mode {
        None => Action::Play,
        Some(m) => parse_mode(m)?,
    };
    Ok(SrtStreamId { target: WireTarget { app, stream, credential: b.finish()? }, action, by_name: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(c: &Credential) -> Option<&str> {
        c.token.as_ref().map(SecretString::expose)
    }

    #[test]
    fn rtmp_plain_key() {
        let t = parse_rtmp("live", "cam1").unwrap();
        assert_eq!((t.app.as_str(), t.stream.as_str()), ("live", "cam1"));
        assert!(t.credential.is_empty());
    }

    #[test]
    fn rtmp_token_expires_and_subscriber() {
        let t = parse_rtmp("live", "cam1?token=a%2Bb%3D&expires=1700000000&foo=bar").unwrap();
        assert_eq!(tok(&t.credential), Some("a+b="));
        assert_eq!(t.credential.expires, Some(1_700_000_000));
        let t = parse_rtmp("live", "cam1?subscriberId=alice&subscriberCode=123456").unwrap();
        assert_eq!(t.credential.subscriber_id.unwrap().as_str(), "alice");
        assert_eq!(t.credential.subscriber_code.unwrap().expose(), "123456");
    }

    #[test]
    fn rtmp_credential_on_the_connect_url() {
        // nginx-rtmp's convention, and OBS with the token in its Server field.
        let t = parse_rtmp("live?token=abc", "cam1").unwrap();
        assert_eq!((t.app.as_str(), t.stream.as_str(), tok(&t.credential)), ("live", "cam1", Some("abc")));
        // The stream key's credential comes first.
        let t = parse_rtmp("live?token=abc", "cam1?token=def").unwrap();
        assert_eq!(tok(&t.credential), Some("def"));
        let t = parse_rtmp("live?foo=1", "cam1").unwrap();
        assert!(t.credential.is_empty());
        assert_eq!(parse_rtmp("live?token=a&token=b", "cam1").unwrap_err(), WireError::DuplicateKey("token".into()));
    }

    #[test]
    fn rtmp_bad_input_is_a_typed_error() {
        assert_eq!(parse_rtmp("live", ""), Err(WireError::Empty));
        assert_eq!(parse_rtmp("live", &"a".repeat(513)), Err(WireError::TooLong(513)));
        assert_eq!(parse_rtmp("live", "cam1?token=a&token=b"), Err(WireError::DuplicateKey("token".into())));
        assert!(matches!(parse_rtmp("live", "ca m?token=a"), Err(WireError::Name(_))));
        assert!(matches!(parse_rtmp("live", "cam1?expires=soon"), Err(WireError::Malformed { .. })));
        assert_eq!(parse_rtmp("live", "cam1?token=%FF"), Err(WireError::NotUtf8));
        assert!(matches!(parse_rtmp("li/ve", "cam1"), Err(WireError::Name(_))));
    }

    #[test]
    fn srt_access_control_form() {
        let s = parse_srt_streamid(b"#!::r=live/cam1,m=publish,t=abc,x=ignored").unwrap();
        assert_eq!(s.action, Action::Publish);
        assert_eq!(s.target.stream.as_str(), "cam1");
        assert_eq!(tok(&s.target.credential), Some("abc"));
        let s = parse_srt_streamid(b"#!::r=live/cam1,u=bob,s=654321").unwrap();
        assert_eq!(s.action, Action::Play, "missing m means request");
        assert_eq!(s.target.credential.subscriber_id.unwrap().as_str(), "bob");
        assert_eq!(parse_srt_streamid(b"#!::m=request,r=live/c").unwrap().action, Action::Play);
    }

    #[test]
    fn srt_ant_media_and_plain_forms() {
        // Ant Media's ingest form publishes; its `,play` flag plays.
        let s = parse_srt_streamid(b"LiveApp/stream1,token=tok").unwrap();
        assert_eq!(s.target.app.as_str(), "LiveApp");
        assert_eq!(tok(&s.target.credential), Some("tok"));
        assert_eq!((s.action, s.by_name), (Action::Publish, false));
        let s = parse_srt_streamid(b"LiveApp/stream1,play,token=tok").unwrap();
        assert_eq!((s.action, s.by_name), (Action::Play, false));
        assert_eq!(tok(&s.target.credential), Some("tok"));
        // SLS's plain names: no mode, decided by name.
        let s = parse_srt_streamid(b"live/pub-key").unwrap();
        assert_eq!(s.target.stream.as_str(), "pub-key");
        assert!(s.target.credential.is_empty());
        assert_eq!((s.action, s.by_name), (Action::Play, true));
        let live = AppName::parse("live").unwrap();
        let s = parse_srt_streamid_in(b"pub-key", Some(&live)).unwrap();
        assert_eq!((s.target.app.as_str(), s.target.stream.as_str(), s.by_name), ("live", "pub-key", true));
        let s = parse_srt_streamid_in(b"uplive.sls.com/live/pub-key", Some(&live)).unwrap();
        assert_eq!((s.target.app.as_str(), s.target.stream.as_str()), ("live", "pub-key"));
        assert!(matches!(parse_srt_streamid(b"pub-key"), Err(WireError::Malformed { .. })), "no default app");
    }

    #[test]
    fn srt_percent_encoded_access_control() {
        let s = parse_srt_streamid(b"%23!%3A%3Ar%3Dlive%2Fcam1%2Cm%3Dpublish%2Ct%3Dabc").unwrap();
        assert_eq!((s.target.app.as_str(), s.target.stream.as_str(), s.action), ("live", "cam1", Action::Publish));
        assert_eq!(tok(&s.target.credential), Some("abc"));
        let s = parse_srt_streamid(b"%23!%3A%3Ar=live/cam1").unwrap();
        assert_eq!((s.action, s.by_name), (Action::Play, false), "no m: request");
        assert_eq!(parse_srt_streamid(b"%23!%3A%3Ar=live/%FF"), Err(WireError::NotUtf8));
    }

    #[test]
    fn srt_bad_input_is_a_typed_error() {
        assert_eq!(parse_srt_streamid(b""), Err(WireError::Empty));
        assert_eq!(parse_srt_streamid(&[b'a'; 513]), Err(WireError::TooLong(513)));
        assert_eq!(parse_srt_streamid(&[0xff, 0xfe]), Err(WireError::NotUtf8));
        assert!(matches!(parse_srt_streamid(b"#!::m=publish"), Err(WireError::Malformed { .. })));
        assert_eq!(parse_srt_streamid(b"#!::r=live/a,r=live/b"), Err(WireError::DuplicateKey("r".into())));
        assert_eq!(
            parse_srt_streamid(b"#!::r=live/a,m=bidirectional"),
            Err(WireError::UnknownMode("bidirectional".into()))
        );
        assert!(matches!(parse_srt_streamid(b"#!::garbage"), Err(WireError::Malformed { .. })));
        assert!(matches!(parse_srt_streamid(b"nostream"), Err(WireError::Malformed { .. })));
        assert!(matches!(parse_srt_streamid(b"live/a,token"), Err(WireError::Malformed { .. })));
        assert!(matches!(parse_srt_streamid(b"a/b/c/d"), Err(WireError::Malformed { .. })));
        assert!(matches!(parse_srt_streamid(b"a/b/c"), Err(WireError::Malformed { .. })), "no default app");
    }
}
