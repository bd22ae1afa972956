//! Domain newtypes: every name, id and enum that crosses a boundary is built by `parse`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a name or id was refused. The text is safe to show to a client: it never echoes
/// more than the offending value's length.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} characters long; at most {max} are allowed")]
    TooLong { what: &'static str, len: usize, max: usize },
    #[error("{what} may only contain {allowed}")]
    BadCharacter { what: &'static str, allowed: &'static str },
    #[error("{what} must be one of: {expected}")]
    UnknownVariant { what: &'static str, expected: &'static str },
    #[error("{what} is not valid: {detail}")]
    Invalid { what: &'static str, detail: String },
}

/// Checks a name against a character class and a length. Names are ASCII so that every
/// protocol (RTMP URL, SRT streamid, REST path) carries them unchanged.
fn check_name(
    what: &'static str,
    s: &str,
    max: usize,
    allowed: &'static str,
    ok: impl Fn(u8) -> bool,
) -> Result<(), ParseError> {
    if s.is_empty() {
        return Err(ParseError::Empty { what });
    }
    if s.len() > max {
        return Err(ParseError::TooLong { what, len: s.len(), max });
    }
    if !s.bytes().all(ok) {
        return Err(ParseError::BadCharacter { what, allowed });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr, $allowed:literal, $ok:expr) => {
        $(#[$doc])*
        #[derive(Clone, Eq, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl std::hash::Hash for $name {
            /// By content, consistent with `eq`.
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                (*self.0).hash(state)
            }
        }

        impl PartialEq for $name {
            /// Interned names (the fold shares one allocation per name) compare by pointer first.
            fn eq(&self, other: &Self) -> bool {
                Arc::ptr_eq(&self.0, &other.0) || *self.0 == *other.0
            }
        }

        impl $name {
            pub const MAX_LEN: usize = $max;

            pub fn parse(s: &str) -> Result<Self, ParseError> {
                check_name($what, s, $max, $allowed, $ok)?;
                Ok(Self(Arc::from(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl FromStr for $name {
            type Err = ParseError;
            fn from_str(s: &str) -> Result<Self, ParseError> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "minLength": 1,
                    "maxLength": $max,
                    "description": concat!($what, ": ", $allowed),
                })
            }
        }
    };
}

fn name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')
}

fn stream_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'~')
}

name_type!(
    /// An app: the first path segment of `rtmp://host/<app>/<stream>`.
    AppName, "app name", 64, "ASCII letters, digits, '_' and '-'", name_char
);
name_type!(
    /// A stream's public name, or its secret publish name.
    StreamName, "stream name", 128, "ASCII letters, digits, '_', '-', '.' and '~'", stream_char
);
name_type!(
    /// A TOTP subscriber's id, unique within (app, stream).
    SubscriberId, "subscriber id", 128, "ASCII letters, digits, '_', '-', '.' and '~'", stream_char
);
name_type!(
    /// The public id of an API key (the secret is separate and never stored).
    KeyId, "key id", 64, "ASCII letters, digits, '_' and '-'", name_char
);
name_type!(
    /// A data-plane worker's id (host name by default).
    NodeId, "node id", 128, "ASCII letters, digits, '_', '-', '.' and '~'", stream_char
);

/// A position in the global log: 1 is the first event; 0 means "nothing applied yet".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Position(pub u64);

impl Position {
    pub const ZERO: Position = Position(0);

    pub fn parse(s: &str) -> Result<Self, ParseError> {
        s.parse::<u64>().map(Position).map_err(|e| ParseError::Invalid { what: "position", detail: e.to_string() })
    }

    pub fn next(self) -> Position {
        Position(self.0 + 1)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Milliseconds since the Unix epoch. The core never reads a clock: every `now` is an argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn from_secs(secs: i64) -> Self {
        Timestamp(secs.saturating_mul(1000))
    }
    pub fn as_secs(self) -> i64 {
        self.0.div_euclid(1000)
    }
    pub fn plus_secs(self, secs: i64) -> Self {
        Timestamp(self.0.saturating_add(secs.saturating_mul(1000)))
    }
}

/// An IP network (`10.0.0.0/8`, `2001:db8::/32`); a bare address means a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr(ipnet::IpNet);

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ParseError::Empty { what: "CIDR" });
        }
        if let Ok(net) = s.parse::<ipnet::IpNet>() {
            return Ok(Cidr(net.trunc()));
        }
        s.parse::<IpAddr>().map(|ip| Cidr(ipnet::IpNet::from(ip))).map_err(|_| ParseError::Invalid {
            what: "CIDR",
            detail: "expected an address or a network like 10.0.0.0/8".into(),
        })
    }

    /// Whether `ip` is inside; an IPv4-mapped IPv6 address counts as its IPv4 form.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.contains(&ip)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Cidr::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Cidr {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Cidr".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "an IPv4/IPv6 network in CIDR notation, or a single address",
            "examples": ["10.0.0.0/8", "127.0.0.1/32", "::1"],
        })
    }
}

/// True when `cidrs` is empty (anywhere) or one of them contains `ip`.
pub fn cidrs_allow(cidrs: &[Cidr], ip: IpAddr) -> bool {
    cidrs.is_empty() || cidrs.iter().any(|c| c.contains(ip))
}

macro_rules! word_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(s: &str) -> Result<Self, ParseError> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(ParseError::UnknownVariant {
                        what: $what,
                        expected: concat!($($text, " "),+),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseError;
            fn from_str(s: &str) -> Result<Self, ParseError> {
                Self::parse(s)
            }
        }
    };
}

word_enum!(
    /// What a media client wants to do. SRT's `m=request` is `Play`.
    Action, "action" { Publish => "publish", Play => "play" }
);
word_enum!(
    /// An API key's role (SRT Live Server semantics): admin everything, write streams and
    /// tokens, read read-only.
    Role, "role" { Admin => "admin", Write => "write", Read => "read" }
);
word_enum!(
    /// The protocol a request came in on: the worker's own (RTMP, SRT), the API's, or what a
    /// media server reported through its hook (RTSP, HLS, WebRTC, HTTP-FLV and other HTTP
    /// delivery, MoQ). The list only grows.
    Protocol, "protocol" {
        Rtmp => "rtmp", Srt => "srt", Api => "api", Rtsp => "rtsp", Hls => "hls", Webrtc => "webrtc",
        Http => "http", Moq => "moq"
    }
);

impl Role {
    /// Whether a key with this role may do what `needed` requires.
    pub fn allows(self, needed: Role) -> bool {
        match self {
            Role::Admin => true,
            Role::Write => needed != Role::Admin,
            Role::Read => needed == Role::Read,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_refuse_with_clear_errors() {
        assert_eq!(AppName::parse("live").unwrap().as_str(), "live");
        assert_eq!(AppName::parse("").unwrap_err().to_string(), "app name must not be empty");
        assert!(matches!(AppName::parse("a/b"), Err(ParseError::BadCharacter { .. })));
        assert!(matches!(StreamName::parse(&"x".repeat(129)), Err(ParseError::TooLong { len: 129, max: 128, .. })));
        assert!(StreamName::parse("cam-1.hd~x_y").is_ok());
        assert!(StreamName::parse("cam 1").is_err());
        assert!(StreamName::parse("caméra").is_err());
    }

    #[test]
    fn names_refuse_bad_values_when_deserialized() {
        let err = serde_json::from_str::<AppName>("\"has space\"").unwrap_err();
        assert!(err.to_string().contains("app name may only contain"));
    }

    #[test]
    fn cidr_contains_v4_and_mapped_v6() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert_eq!(Cidr::parse("127.0.0.1").unwrap().to_string(), "127.0.0.1/32");
        assert_eq!(Cidr::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(cidrs_allow(&[], "1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn enums_parse_their_words_only() {
        assert_eq!(Action::parse("publish"), Ok(Action::Publish));
        assert_eq!(Role::parse("read"), Ok(Role::Read));
        assert_eq!(Protocol::parse("srt"), Ok(Protocol::Srt));
        assert_eq!(Action::parse("PLAY").unwrap_err().to_string(), "action must be one of: publish play ");
    }

    #[test]
    fn roles_nest() {
        assert!(Role::Admin.allows(Role::Write));
        assert!(Role::Write.allows(Role::Read));
        assert!(!Role::Write.allows(Role::Admin));
        assert!(!Role::Read.allows(Role::Write));
    }
}
