//! Secrets: SHA-256 digests for what only needs checking (API keys, one-time tokens),
//! sealed values for what must be recovered (TOTP, JWT, hash/HMAC, webhook secrets), and a
//! string type that never prints itself. Sealing is pure: the key and the nonce are arguments.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Constant-time equality of two byte strings (length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// A SHA-256 digest, shown and stored as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Sha256Digest(Sha256::digest(bytes).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn parse_hex(s: &str) -> Result<Self, crate::ParseError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| crate::ParseError::Invalid {
            what: "sha256 digest",
            detail: "expected 64 hex characters".into(),
        })?;
        Ok(Sha256Digest(out))
    }

    /// Constant-time comparison with another digest.
    pub fn ct_eq(&self, other: &Sha256Digest) -> bool {
        ct_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}…", &self.to_hex()[..12])
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Sha256Digest::parse_hex(&s).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Sha256Digest {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Sha256Digest".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "pattern": "^[0-9a-f]{64}$"})
    }
}

/// A secret string from the wire or an operator. `Debug` and `Display` never show it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(s: impl Into<String>) -> Self {
        SecretString(s.into())
    }
    /// The secret itself; call sites are the places to audit.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretString(<{} bytes redacted>)", self.0.len())
    }
}

/// Id of a sealing key, so keys can rotate while old ciphertexts stay readable.
pub type KeyIdText = String;

/// A 32-byte XChaCha20-Poly1305 key with its id. `Debug` never shows the key.
#[derive(Clone)]
pub struct SealingKey {
    id: KeyIdText,
    key: [u8; 32],
}

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealingKey(id={:?}, <redacted>)", self.id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("sealing key must be 32 bytes of base64 (got {0} bytes)")]
    KeyLength(usize),
    #[error("sealing key is not valid base64")]
    KeyEncoding,
    #[error("no sealing key with id {0:?} is configured")]
    UnknownKey(String),
    #[error("sealed value does not authenticate under key {0:?} (wrong key or tampered)")]
    Authentication(String),
    #[error("sealed value is malformed")]
    Malformed,
}

impl SealingKey {
    pub fn new(id: impl Into<String>, key: [u8; 32]) -> Self {
        SealingKey { id: id.into(), key }
    }

    /// Parses `base64(32 bytes)`. The id is derived from the key, so every node that holds
    /// the same key names it the same way without configuration.
    pub fn from_base64(text: &str) -> Result<Self, SealError> {
        let bytes = B64.decode(text.trim()).map_err(|_| SealError::KeyEncoding)?;
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| SealError::KeyLength(bytes.len()))?;
        let id = format!("k{}", &Sha256Digest::of(&key).to_hex()[..8]);
        Ok(SealingKey { id, key })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `plaintext`; `purpose` is bound as associated data, so a ciphertext cannot be
    /// moved from one field to another. The nonce must be unique per key (the shell draws it
    /// from a CSPRNG).
    /// A key for another purpose, derived from this one (HMAC-SHA256 of the purpose): e.g.
    /// the log anchors' signing key, which a Postgres superuser does not hold.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        use hmac::{Hmac, KeyInit, Mac};
        let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(b"sluice derive v1|");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }

    pub fn seal(&self, purpose: &str, plaintext: &[u8], nonce: [u8; 24]) -> Sealed {
        let cipher = XChaCha20Poly1305::new((&self.key).into());
        let aad = aad(&self.id, purpose);
        // Encryption with a valid 32-byte key and 24-byte nonce cannot fail.
        let ct = cipher.encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad: &aad }).unwrap_or_default();
        Sealed { kid: self.id.clone(), nonce: B64.encode(nonce), ct: B64.encode(ct) }
    }

    fn open(&self, sealed: &Sealed, purpose: &str) -> Result<Vec<u8>, SealError> {
        let nonce = B64.decode(&sealed.nonce).map_err(|_| SealError::Malformed)?;
        if nonce.len() != 24 {
            return Err(SealError::Malformed);
        }
        let ct = B64.decode(&sealed.ct).map_err(|_| SealError::Malformed)?;
        let cipher = XChaCha20Poly1305::new((&self.key).into());
        cipher
            .decrypt(XNonce::from_slice(&nonce), Payload { msg: &ct, aad: &aad(&self.id, purpose) })
            .map_err(|_| SealError::Authentication(self.id.clone()))
    }
}

fn aad(kid: &str, purpose: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(kid.len() + purpose.len() + 8);
    v.extend_from_slice(b"sluice1|");
    v.extend_from_slice(kid.as_bytes());
    v.push(b'|');
    v.extend_from_slice(purpose.as_bytes());
    v
}

/// The sealing keys a node holds: one current key for sealing, older ones for opening.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    current: Option<String>,
    keys: BTreeMap<String, SealingKey>,
}

impl Keyring {
    pub fn new(current: SealingKey) -> Self {
        let id = current.id.clone();
        Keyring { current: Some(id.clone()), keys: BTreeMap::from([(id, current)]) }
    }

    /// Adds an older key that can still open values sealed under it.
    pub fn with_previous(mut self, key: SealingKey) -> Self {
        self.keys.entry(key.id.clone()).or_insert(key);
        self
    }

    pub fn current(&self) -> Option<&SealingKey> {
        self.current.as_ref().and_then(|id| self.keys.get(id))
    }

    pub fn open(&self, sealed: &Sealed, purpose: &str) -> Result<Vec<u8>, SealError> {
        let key = self.keys.get(&sealed.kid).ok_or_else(|| SealError::UnknownKey(sealed.kid.clone()))?;
        key.open(sealed, purpose)
    }
}

/// A value sealed with XChaCha20-Poly1305: what the log stores instead of a secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub struct Sealed {
    /// Id of the sealing key.
    pub kid: String,
    /// base64 of the 24-byte nonce.
    pub nonce: String,
    /// base64 of ciphertext ‖ tag.
    pub ct: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SealingKey {
        SealingKey::from_base64(&B64.encode([b; 32])).unwrap()
    }

    #[test]
    fn seal_then_open_round_trips_and_binds_purpose() {
        let ring = Keyring::new(key(1));
        let sealed = ring.current().unwrap().seal("app.live.jwt", b"s3cret", [7; 24]);
        assert!(!sealed.ct.contains("s3cret"));
        assert_eq!(ring.open(&sealed, "app.live.jwt").unwrap(), b"s3cret");
        assert!(matches!(ring.open(&sealed, "app.other.jwt"), Err(SealError::Authentication(_))));
    }

    #[test]
    fn wrong_or_unknown_key_fails_closed() {
        let sealed = key(1).seal("p", b"x", [0; 24]);
        let other = Keyring::new(key(2));
        assert!(matches!(other.open(&sealed, "p"), Err(SealError::UnknownKey(_))));
        let rotated = Keyring::new(key(2)).with_previous(key(1));
        assert_eq!(rotated.open(&sealed, "p").unwrap(), b"x");
        let mut tampered = sealed.clone();
        tampered.ct = B64.encode(b"garbage-garbage-garbage");
        assert!(rotated.open(&tampered, "p").is_err());
    }

    #[test]
    fn key_parsing_errors_never_echo_the_key() {
        let err = SealingKey::from_base64(&B64.encode([9u8; 16])).unwrap_err();
        assert_eq!(err.to_string(), "sealing key must be 32 bytes of base64 (got 16 bytes)");
        assert_eq!(SealingKey::from_base64("!!!").unwrap_err(), SealError::KeyEncoding);
        assert!(!format!("{:?}", key(3)).contains("3, 3"));
    }

    #[test]
    fn secret_string_is_redacted() {
        let s = SecretString::new("hunter2");
        assert_eq!(format!("{s:?}"), "SecretString(<7 bytes redacted>)");
    }

    #[test]
    fn digest_hex_round_trip() {
        let d = Sha256Digest::of(b"abc");
        assert_eq!(d.to_hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(Sha256Digest::parse_hex(&d.to_hex()).unwrap(), d);
        assert!(Sha256Digest::parse_hex("zz").is_err());
    }
}
