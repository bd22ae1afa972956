//! The control plane's settings (DESIGN.md §10): a TOML file (`--config`) overlaid by
//! `SLUICE_*` variables. A bad or missing setting stops the program with one line naming it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use sluice_events::settings::{SettingsError, Sources};
use sluice_events::{AppName, SealingKey};

const KNOWN: &[&str] = &[
    "database_url",
    "nats_url",
    "api_listen",
    "bootstrap_admin_key",
    "sealing_key",
    "sealing_key_file",
    "sls_app",
    "instance_id",
];

#[derive(Clone)]
pub struct Config {
    pub database_url: String,
    pub nats_url: String,
    pub api_listen: SocketAddr,
    pub bootstrap_admin_key: Option<String>,
    pub sealing_key: Option<SealingKey>,
    pub sls_app: AppName,
    pub instance_id: String,
}

impl std::fmt::Debug for Config {
    // Never print the database URL (it may carry a password) or any secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("nats_url", &self.nats_url)
            .field("api_listen", &self.api_listen)
            .field("bootstrap_admin_key", &self.bootstrap_admin_key.as_ref().map(|_| "<set>"))
            .field("sealing_key", &self.sealing_key.as_ref().map(SealingKey::id))
            .field("sls_app", &self.sls_app)
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Reads the file (if any) and the given environment.
    pub fn load(file: Option<&Path>, env: BTreeMap<String, String>) -> Result<Config, SettingsError> {
        let s = Sources::from_path(file, |p| std::fs::read_to_string(p), env, KNOWN)?;
        let database_url = match s.optional::<String>("database_url", "a postgres:// URL")? {
            Some(url) => url,
            None => s
                .env_var("DATABASE_URL")
                .map(str::to_owned)
                .ok_or_else(|| s.missing("database_url", "a postgres:// URL"))?,
        };
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(s.invalid("database_url", "a postgres:// URL"));
        }
        let sealing_key = s.sealing_key(|path| std::fs::read_to_string(path).ok())?;
        let bootstrap_admin_key: Option<String> = s.optional("bootstrap_admin_key", "an API key secret")?;
        if bootstrap_admin_key
            .as_ref()
            .is_some_and(|k| k.len() < 24 || k.len() > 256 || k.chars().any(char::is_whitespace))
        {
            return Err(s.invalid("bootstrap_admin_key", "24 to 256 characters without spaces"));
        }
        Ok(Config {
            database_url,
            nats_url: s.or("nats_url", "nats://127.0.0.1:4222".to_owned(), "a nats:// URL")?,
            api_listen: s.or(
                "api_listen",
                "127.0.0.1:8080".parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
                "host:port like 127.0.0.1:8080",
            )?,
            bootstrap_admin_key,
            sealing_key,
            sls_app: s.or(
                "sls_app",
                AppName::parse("live").map_err(|_| s.invalid("sls_app", "an app name"))?,
                "an app name (letters, digits, '_', '-')",
            )?,
            instance_id: s.or("instance_id", default_instance_id(), "an instance name")?,
        })
    }

    /// The sealing key, required by commands that open or seal secrets.
    pub fn require_sealing_key(&self) -> Result<&SealingKey, SettingsError> {
        self.sealing_key.as_ref().ok_or(SettingsError::Missing {
            env: "SLUICE_SEALING_KEY".into(),
            key: "sealing_key".into(),
            expected: "base64 of 32 random bytes (or SLUICE_SEALING_KEY_FILE)",
        })
    }
}

fn default_instance_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "control".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn database_url_falls_back_to_database_url() {
        let c = Config::load(None, env(&[("DATABASE_URL", "postgres://x@h/db")])).unwrap();
        assert_eq!(c.database_url, "postgres://x@h/db");
        assert_eq!(c.api_listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.sls_app.as_str(), "live");
        let err = Config::load(None, env(&[])).unwrap_err().to_string();
        assert!(err.starts_with("missing setting SLUICE_DATABASE_URL"), "{err}");
    }

    #[test]
    fn bad_values_stop_with_one_clear_line_and_no_secret() {
        let base = [("SLUICE_DATABASE_URL", "postgres://u:pw@h/db")];
        let mut e = env(&base);
        e.insert("SLUICE_SEALING_KEY".into(), "not-base64-secret!".into());
        let err = Config::load(None, e).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid setting SLUICE_SEALING_KEY (from the environment): expected base64 of 32 random bytes"
        );
        let mut e = env(&base);
        e.insert("SLUICE_API_LISTEN".into(), "localhost".into());
        assert!(Config::load(None, e).unwrap_err().to_string().contains("SLUICE_API_LISTEN"));
        let err = Config::load(None, env(&[("SLUICE_DATABASE_URL", "mysql://u:pw@h")])).unwrap_err().to_string();
        assert!(!err.contains("pw"), "{err}");
        assert!(!format!("{:?}", Config::load(None, env(&base)).unwrap()).contains("pw"));
    }
}
