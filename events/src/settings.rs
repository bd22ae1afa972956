//! Reading settings: a TOML file overlaid by `SLUICE_<NAME>` environment variables (SRS
//! style: anything in the file can come from the environment instead). Pure: the shell passes
//! the file's text and the environment in. Errors name the setting and what was expected,
//! and never echo a value (it may be a secret).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Environment,
    File,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("missing setting {env}: expected {expected} (set {env} or `{key}` in the config file)")]
    Missing { env: String, key: String, expected: &'static str },
    #[error("invalid setting {env} ({origin}): expected {expected}")]
    Invalid { env: String, origin: OriginText, expected: &'static str },
    #[error("config file is not valid TOML: {0}")]
    File(String),
    #[error("unknown setting `{0}` in the config file")]
    UnknownKey(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginText(pub Origin);

impl fmt::Display for OriginText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Origin::Environment => "from the environment",
            Origin::File => "from the config file",
        })
    }
}

/// A file and an environment to read settings from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    file: BTreeMap<String, String>,
    env: BTreeMap<String, String>,
}

impl Sources {
    /// `file` is the config file's text, if one was given; `env` the process environment.
    /// `known` lists the keys this program reads, so a typo in the file is an error.
    pub fn new(file: Option<&str>, env: BTreeMap<String, String>, known: &[&str]) -> Result<Self, SettingsError> {
        let mut flat = BTreeMap::new();
        if let Some(text) = file {
            let table: toml::Table =
                text.parse().map_err(|e: toml::de::Error| SettingsError::File(e.message().to_owned()))?;
            for (k, v) in table {
                if !known.contains(&k.as_str()) {
                    return Err(SettingsError::UnknownKey(k));
                }
                let text = match v {
                    toml::Value::String(s) => s,
                    other => other.to_string(),
                };
                flat.insert(k, text);
            }
        }
        Ok(Sources { file: flat, env })
    }

    /// Like `new`, for a config file given by path; `read` is the shell's file reader.
    pub fn from_path(
        file: Option<&std::path::Path>,
        read: impl FnOnce(&std::path::Path) -> std::io::Result<String>,
        env: BTreeMap<String, String>,
        known: &[&str],
    ) -> Result<Self, SettingsError> {
        let text = match file {
            Some(path) => Some(read(path).map_err(|e| SettingsError::File(format!("{}: {e}", path.display())))?),
            None => None,
        };
        Sources::new(text.as_deref(), env, known)
    }

    fn env_name(key: &str) -> String {
        format!("SLUICE_{}", key.to_ascii_uppercase())
    }

    /// The raw value: environment first, then file. Empty environment values count as unset.
    pub fn raw(&self, key: &str) -> Option<(&str, Origin)> {
        if let Some(v) = self.env.get(&Self::env_name(key)).filter(|v| !v.is_empty()) {
            return Some((v, Origin::Environment));
        }
        self.file.get(key).map(|v| (v.as_str(), Origin::File))
    }

    /// Each of `keys` that is set, with its raw value: what a reload compares to tell which
    /// settings changed (never printed: values may be secrets).
    pub fn effective(&self, keys: &[&str]) -> BTreeMap<String, String> {
        keys.iter().filter_map(|k| Some(((*k).to_owned(), self.raw(k)?.0.to_owned()))).collect()
    }

    /// The keys whose effective value differs between `before` and `after`.
    pub fn changed(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
        let mut keys: Vec<String> = before.keys().chain(after.keys()).cloned().collect();
        keys.sort();
        keys.dedup();
        keys.retain(|k| before.get(k) != after.get(k));
        keys
    }

    /// A raw environment variable outside the `SLUICE_` namespace (e.g. `DATABASE_URL`).
    pub fn env_var(&self, name: &str) -> Option<&str> {
        self.env.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    pub fn optional<T: FromStr>(&self, key: &str, expected: &'static str) -> Result<Option<T>, SettingsError> {
        match self.raw(key) {
            None => Ok(None),
            Some((v, origin)) => v.trim().parse().map(Some).map_err(|_| SettingsError::Invalid {
                env: Self::env_name(key),
                origin: OriginText(origin),
                expected,
            }),
        }
    }

    pub fn or<T: FromStr>(&self, key: &str, default: T, expected: &'static str) -> Result<T, SettingsError> {
        Ok(self.optional(key, expected)?.unwrap_or(default))
    }

    pub fn required<T: FromStr>(&self, key: &str, expected: &'static str) -> Result<T, SettingsError> {
        self.optional(key, expected)?.ok_or_else(|| self.missing(key, expected))
    }

    pub fn missing(&self, key: &str, expected: &'static str) -> SettingsError {
        SettingsError::Missing { env: Self::env_name(key), key: key.to_owned(), expected }
    }

    /// The cluster sealing key from `sealing_key` (base64) or, failing that, from the file
    /// named by `sealing_key_file`. `read_file` is the shell's file reader, so this stays pure.
    pub fn sealing_key(
        &self,
        read_file: impl FnOnce(&str) -> Option<String>,
    ) -> Result<Option<crate::SealingKey>, SettingsError> {
        const EXPECTED: &str = "base64 of 32 random bytes";
        if let Some((text, _)) = self.raw("sealing_key") {
            return crate::SealingKey::from_base64(text).map(Some).map_err(|_| self.invalid("sealing_key", EXPECTED));
        }
        let Some((path, _)) = self.raw("sealing_key_file") else { return Ok(None) };
        read_file(path.trim())
            .and_then(|text| crate::SealingKey::from_base64(&text).ok())
            .map(Some)
            .ok_or_else(|| self.invalid("sealing_key_file", "a readable file holding base64 of 32 random bytes"))
    }

    /// Checks a value already read with a custom parser, producing the same error shape.
    pub fn invalid(&self, key: &str, expected: &'static str) -> SettingsError {
        let origin = self.raw(key).map(|(_, o)| o).unwrap_or(Origin::Environment);
        SettingsError::Invalid { env: Self::env_name(key), origin: OriginText(origin), expected }
    }
}

/// The keys of `known` an example configuration does not name (as `key = …`, commented out
/// or not): what keeps a packaged example complete.
pub fn keys_missing_from(example: &str, known: &[&str]) -> Vec<String> {
    known
        .iter()
        .filter(|key| {
            !example.lines().any(|l| {
                let l = l.trim_start_matches('#').trim_start();
                l.strip_prefix(**key).is_some_and(|rest| rest.trim_start().starts_with('='))
            })
        })
        .map(|k| (*k).to_owned())
        .collect()
}

/// How a plane reaches NATS beyond its URL (which may carry `user:password@` and the
/// `tls://` scheme): a CA to trust for its TLS certificate, and an NKey seed or a `.creds`
/// file (JWT + NKey) to authenticate with. Files are named here and read when connecting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsAuth {
    pub ca_file: Option<std::path::PathBuf>,
    pub nkey_seed_file: Option<std::path::PathBuf>,
    pub creds_file: Option<std::path::PathBuf>,
    /// `nats_replicas`: the replicas of every stream, KV bucket and object store a plane
    /// creates (1, or 3 or 5 on a JetStream cluster); an existing one that differs is refused.
    pub replicas: usize,
}

impl NatsAuth {
    pub fn load(s: &Sources) -> Result<NatsAuth, SettingsError> {
        let auth = NatsAuth {
            ca_file: s.optional("nats_ca_file", "a PEM CA certificate file")?,
            nkey_seed_file: s.optional("nats_nkey_seed_file", "a file holding an NKey seed (SU…)")?,
            creds_file: s.optional("nats_creds_file", "a NATS .creds file")?,
            replicas: s.or("nats_replicas", 1, "1, 3 or 5 (a JetStream cluster's replicas)")?,
        };
        if !matches!(auth.replicas, 1 | 3 | 5) {
            return Err(s.invalid("nats_replicas", "1, 3 or 5 (a JetStream cluster's replicas)"));
        }
        if auth.nkey_seed_file.is_some() && auth.creds_file.is_some() {
            return Err(s.invalid("nats_creds_file", "either nats_nkey_seed_file or nats_creds_file, not both"));
        }
        Ok(auth)
    }
}

/// The servers of a `nats_url`: one URL, or several of one cluster separated by commas
/// (`nats://n1:4222,nats://n2:4222,nats://n3:4222`); the client picks one and moves to
/// another when it goes.
pub fn nats_servers(url: &str) -> Vec<&str> {
    url.split(',').map(str::trim).filter(|s| !s.is_empty()).collect()
}

/// The credentials written in a URL (`nats://user:password@host`, or `nats://token@host`): a
/// user and its password, or a token alone; of a list, the first server's (a cluster's servers
/// share them). The NATS client does not read them from the URL.
pub fn url_credentials(url: &str) -> Option<(String, Option<String>)> {
    let url = nats_servers(url).into_iter().next()?;
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let (userinfo, _) = authority.rsplit_once('@')?;
    Some(match userinfo.split_once(':') {
        Some((user, password)) => (user.to_owned(), Some(password.to_owned())),
        None => (userinfo.to_owned(), None),
    })
}

/// A URL with its password (if any) replaced by `***`, for printing; a list of NATS servers
/// each.
pub fn redact_url(url: &str) -> String {
    let servers: Vec<&str> = url.split(',').collect();
    if servers.len() > 1 && servers.iter().all(|s| s.contains("://")) {
        return servers.iter().map(|s| redact_one(s.trim())).collect::<Vec<_>>().join(",");
    }
    redact_one(url)
}

fn redact_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (authority, tail) = rest.split_once('/').map_or((rest, None), |(a, t)| (a, Some(t)));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    match tail {
        Some(t) => format!("{scheme}://{authority}/{t}"),
        None => format!("{scheme}://{authority}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn environment_overrides_file() {
        let s = Sources::new(
            Some("api_listen = \"0.0.0.0:1\"\nport = 5"),
            env(&[("SLUICE_API_LISTEN", "127.0.0.1:2")]),
            &["api_listen", "port"],
        )
        .unwrap();
        let v: std::net::SocketAddr = s.required("api_listen", "host:port").unwrap();
        assert_eq!(v.port(), 2);
        assert_eq!(s.or::<u16>("port", 0, "a port").unwrap(), 5);
    }

    #[test]
    fn errors_name_the_setting_and_hide_the_value() {
        let s = Sources::new(None, env(&[("SLUICE_API_LISTEN", "secret-looking-value")]), &[]).unwrap();
        let err = s.required::<std::net::SocketAddr>("api_listen", "host:port like 127.0.0.1:8080").unwrap_err();
        let line = err.to_string();
        assert_eq!(
            line,
            "invalid setting SLUICE_API_LISTEN (from the environment): expected host:port like 127.0.0.1:8080"
        );
        assert!(!line.contains("secret-looking-value"));
        let err = s.required::<String>("database_url", "a postgres:// URL").unwrap_err();
        assert!(err.to_string().starts_with("missing setting SLUICE_DATABASE_URL"));
    }

    #[test]
    fn sealing_key_inline_wins_then_file_then_none() {
        const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let read = |p: &str| (p == "/k").then(|| format!("{KEY}\n"));
        let s = Sources::new(None, env(&[("SLUICE_SEALING_KEY_FILE", "/k")]), &[]).unwrap();
        assert!(s.sealing_key(read).unwrap().is_some());
        let s = Sources::new(None, env(&[("SLUICE_SEALING_KEY_FILE", "/missing")]), &[]).unwrap();
        assert!(s.sealing_key(read).unwrap_err().to_string().contains("SLUICE_SEALING_KEY_FILE"));
        let s =
            Sources::new(None, env(&[("SLUICE_SEALING_KEY", "bad"), ("SLUICE_SEALING_KEY_FILE", "/k")]), &[]).unwrap();
        assert!(s.sealing_key(read).unwrap_err().to_string().contains("SLUICE_SEALING_KEY "));
        assert_eq!(Sources::new(None, env(&[]), &[]).unwrap().sealing_key(read).unwrap().map(|k| k.id().len()), None);
    }

    #[test]
    fn an_example_missing_a_key_is_caught() {
        let example = "# a_key = 1\nother = 2\nlonger_key_x = 3\n";
        assert_eq!(keys_missing_from(example, &["a_key", "other", "longer_key"]), vec!["longer_key".to_owned()]);
    }

    #[test]
    fn a_list_of_nats_servers_is_read_redacted_and_checked() {
        let list = "nats://u:secret@n1:4222, nats://u:secret@n2:4222,nats://u:secret@n3:4222";
        assert_eq!(
            nats_servers(list),
            ["nats://u:secret@n1:4222", "nats://u:secret@n2:4222", "nats://u:secret@n3:4222"]
        );
        assert_eq!(url_credentials(list), Some(("u".into(), Some("secret".into()))));
        assert_eq!(redact_url(list), "nats://u:***@n1:4222,nats://u:***@n2:4222,nats://u:***@n3:4222");
        assert_eq!(redact_url("postgres://u:p@h1:5432,h2:5432/db"), "postgres://u:***@h1:5432,h2:5432/db");
        let s = |v: &str| Sources::new(None, env(&[("SLUICE_NATS_REPLICAS", v)]), &[]).unwrap();
        assert_eq!(NatsAuth::load(&s("3")).unwrap().replicas, 3);
        assert!(NatsAuth::load(&s("2")).unwrap_err().to_string().contains("SLUICE_NATS_REPLICAS"));
    }

    #[test]
    fn bad_file_and_unknown_keys_are_refused() {
        assert!(matches!(Sources::new(Some("= nope"), BTreeMap::new(), &[]), Err(SettingsError::File(_))));
        assert_eq!(
            Sources::new(Some("api_lisen = \"x\""), BTreeMap::new(), &["api_listen"]).unwrap_err(),
            SettingsError::UnknownKey("api_lisen".into())
        );
    }
}
