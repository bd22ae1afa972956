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
    "admin_username",
    "admin_password",
    "api_jwt_secret",
    "api_jwt_jwks_url",
    "api_jwt_role_claim",
    "api_jwt_leeway_secs",
    "webhook_allowed",
    "api_jwt_jwks_refresh_secs",
    "rate_limit_api",
    "rate_limit_stats",
    "rate_limit_config",
    "remote_allowed_cidrs",
    "trusted_proxies",
    "max_body_bytes",
    "request_timeout_ms",
    "cors_allowed_origins",
    "sls_cors_origin",
    "content_security_policy",
    "public_rtmp_url",
    "public_srt_url",
    "relay",
    "snapshot_every_events",
    "checkpoint_every_events",
    "snapshot_every_secs",
    "events_max_age_secs",
    "events_audit_ttl_secs",
    "node_stale_secs",
    "ready_max_lag_ms",
    "anchor_file",
    "archive_dir",
    "anchor_every_secs",
    "jwks_refresh_secs",
    "jwks_kid_refetch_secs",
    "api_tls_cert",
    "api_tls_key",
    "nats_ca_file",
    "nats_nkey_seed_file",
    "nats_creds_file",
    "nats_replicas",
    "log",
    "metrics_listen",
    "metrics_token",
];

/// What a SIGHUP changes live (with the API's TLS certificate, read again from its files);
/// any other setting changed in the file needs a restart.
pub const RELOADABLE: &[&str] = &[
    "log",
    "rate_limit_api",
    "rate_limit_stats",
    "rate_limit_config",
    "webhook_allowed",
    "api_tls_cert",
    "api_tls_key",
];

/// A comma-separated list (a TOML array works too), e.g. `127.0.0.1/32,::1/128`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct List(pub Vec<String>);

impl std::str::FromStr for List {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let inner = s.trim().trim_start_matches('[').trim_end_matches(']');
        Ok(List(
            inner
                .split(',')
                .map(|p| p.trim().trim_matches('"').trim_matches('\'').to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
        ))
    }
}

/// How the API is protected and limited (DESIGN.md §8).
#[derive(Clone)]
pub struct ApiSettings {
    /// SRS-style static admin (`Authorization: Basic base64(user:password)`).
    pub admin_user: Option<(String, sluice_events::SecretString)>,
    /// HS256 secret (at least 32 bytes) for API JWTs.
    pub jwt_secret: Option<sluice_events::SecretString>,
    pub jwt_jwks_url: Option<String>,
    pub jwt_role_claim: String,
    pub jwt_jwks_refresh_secs: u64,
    /// Clock skew allowed for an API JWT's `exp`, `nbf` and `iat`.
    pub jwt_leeway_secs: u64,
    /// Where a policy's webhook may point beyond public addresses (`SLUICE_WEBHOOK_ALLOWED`).
    pub webhook_allowed: sluice_events::webhook::WebhookAllowList,
    /// Requests per minute per client IP: SRT Live Server's classes and defaults.
    pub rate_api: u32,
    pub rate_stats: u32,
    pub rate_config: u32,
    pub remote_allowed_cidrs: Vec<sluice_events::Cidr>,
    /// Peers whose `Forwarded` / `X-Forwarded-For` name the client (reverse proxies, load
    /// balancers); from anyone else those headers are ignored.
    pub trusted_proxies: Vec<sluice_events::Cidr>,
    pub max_body_bytes: usize,
    pub request_timeout_ms: u64,
    /// `*` or a list of origins; empty disables CORS.
    pub cors_allowed_origins: Vec<String>,
    /// `Access-Control-Allow-Origin` on SRT Live Server's routes (OpenIRL sends `*`).
    pub sls_cors_origin: String,
    pub content_security_policy: Option<String>,
    pub public_rtmp_url: String,
    pub public_srt_url: String,
    /// A worker without a heartbeat for this long is shown as stale.
    pub node_stale_secs: u64,
    /// `/ready` stays 200 while the projection trails the log's head for less than this
    /// (a write in flight); longer, it is 503.
    pub ready_max_lag_ms: u64,
    /// The bearer token a scrape of `/metrics` must present (`SLUICE_METRICS_TOKEN`), if set.
    pub metrics_token: Option<sluice_events::SecretString>,
}

impl std::fmt::Debug for ApiSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiSettings")
            .field("admin_user", &self.admin_user.as_ref().map(|(u, _)| u))
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "<set>"))
            .field("jwt_jwks_url", &self.jwt_jwks_url)
            .field("jwt_role_claim", &self.jwt_role_claim)
            .field("jwt_jwks_refresh_secs", &self.jwt_jwks_refresh_secs)
            .field("jwt_leeway_secs", &self.jwt_leeway_secs)
            .field("webhook_allowed", &self.webhook_allowed)
            .field("rate_api", &self.rate_api)
            .field("rate_stats", &self.rate_stats)
            .field("rate_config", &self.rate_config)
            .field("remote_allowed_cidrs", &self.remote_allowed_cidrs)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("cors_allowed_origins", &self.cors_allowed_origins)
            .field("sls_cors_origin", &self.sls_cors_origin)
            .field("content_security_policy", &self.content_security_policy)
            .field("public_rtmp_url", &self.public_rtmp_url)
            .field("public_srt_url", &self.public_srt_url)
            .field("node_stale_secs", &self.node_stale_secs)
            .field("ready_max_lag_ms", &self.ready_max_lag_ms)
            .field("metrics_token", &self.metrics_token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl ApiSettings {
    fn load(s: &Sources) -> Result<ApiSettings, SettingsError> {
        let user: Option<String> = s.optional("admin_username", "a user name")?;
        let password: Option<String> = s.optional("admin_password", "a password of at least 12 characters")?;
        let admin_user = match (user, password) {
            (Some(u), Some(p)) if p.len() >= 12 && !u.contains(':') && !u.is_empty() => {
                Some((u, sluice_events::SecretString::new(p)))
            }
            (Some(_), Some(_)) => {
                return Err(
                    s.invalid("admin_password", "a password of at least 12 characters (and a user without ':')")
                );
            }
            (Some(_), None) => return Err(s.missing("admin_password", "a password of at least 12 characters")),
            (None, Some(_)) => return Err(s.missing("admin_username", "a user name")),
            (None, None) => None,
        };
        let jwt_secret: Option<String> = s.optional("api_jwt_secret", "an HS256 secret of at least 32 bytes")?;
        if jwt_secret.as_ref().is_some_and(|k| k.len() < 32) {
            return Err(s.invalid("api_jwt_secret", "an HS256 secret of at least 32 bytes"));
        }
        let jwt_jwks_url: Option<String> = s.optional("api_jwt_jwks_url", "an http(s):// URL")?;
        if jwt_jwks_url.as_ref().is_some_and(|u| !(u.starts_with("http://") || u.starts_with("https://"))) {
            return Err(s.invalid("api_jwt_jwks_url", "an http(s):// URL"));
        }
        let cidrs: List =
            s.or("remote_allowed_cidrs", List(vec!["127.0.0.1/32".into(), "::1/128".into()]), "comma-separated CIDRs")?;
        let remote_allowed_cidrs = cidrs
            .0
            .iter()
            .map(|c| sluice_events::Cidr::parse(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| s.invalid("remote_allowed_cidrs", "comma-separated CIDRs like 10.0.0.0/8,::1/128"))?;
        let proxies: List = s.or("trusted_proxies", List(vec![]), "comma-separated CIDRs")?;
        let trusted_proxies = proxies
            .0
            .iter()
            .map(|c| sluice_events::Cidr::parse(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| s.invalid("trusted_proxies", "comma-separated CIDRs like 10.0.0.0/8,::1/128"))?;
        let webhook: List = s.or("webhook_allowed", List(vec![]), "comma-separated host names or CIDRs")?;
        let webhook_allowed = sluice_events::webhook::WebhookAllowList::parse(&webhook.0)
            .map_err(|_| s.invalid("webhook_allowed", "comma-separated host names or CIDRs"))?;
        let positive = |key: &str, default: u32| -> Result<u32, SettingsError> {
            let v: u32 = s.or(key, default, "a positive number of requests per minute")?;
            if v == 0 { Err(s.invalid(key, "a positive number of requests per minute")) } else { Ok(v) }
        };
        let sls_cors_origin: String = s.or("sls_cors_origin", "*".to_owned(), "an origin or *")?;
        let sls_cors_origin = sls_cors_origin.trim().to_owned();
        if sls_cors_origin.is_empty() || !sls_cors_origin.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(s.invalid("sls_cors_origin", "an origin or *"));
        }
        Ok(ApiSettings {
            admin_user,
            jwt_secret: jwt_secret.map(sluice_events::SecretString::new),
            jwt_jwks_url,
            jwt_role_claim: s.or("api_jwt_role_claim", "role".to_owned(), "a claim name")?,
            jwt_leeway_secs: s.or("api_jwt_leeway_secs", 5, "seconds")?,
            webhook_allowed,
            jwt_jwks_refresh_secs: s.or("api_jwt_jwks_refresh_secs", 300, "seconds")?,
            rate_api: positive("rate_limit_api", 30)?,
            rate_stats: positive("rate_limit_stats", 300)?,
            rate_config: positive("rate_limit_config", 20)?,
            remote_allowed_cidrs,
            trusted_proxies,
            max_body_bytes: s.or("max_body_bytes", 64 * 1024, "a size in bytes")?,
            request_timeout_ms: s.or("request_timeout_ms", 10_000, "milliseconds")?,
            cors_allowed_origins: s.or("cors_allowed_origins", List(vec![]), "comma-separated origins or *")?.0,
            sls_cors_origin,
            content_security_policy: s.optional("content_security_policy", "a Content-Security-Policy value")?,
            public_rtmp_url: s.or("public_rtmp_url", "rtmp://127.0.0.1:1935".to_owned(), "an rtmp:// URL")?,
            public_srt_url: s.or("public_srt_url", "srt://127.0.0.1:4200".to_owned(), "an srt:// URL")?,
            node_stale_secs: s.or("node_stale_secs", 15, "seconds")?,
            ready_max_lag_ms: s.or("ready_max_lag_ms", 5_000, "milliseconds")?,
            metrics_token: match s.raw("metrics_token") {
                None => None,
                Some((v, _)) if v.trim().len() >= 16 => Some(sluice_events::SecretString::new(v.trim().to_owned())),
                Some(_) => return Err(s.invalid("metrics_token", "at least 16 characters")),
            },
        })
    }
}

const MAX_AGE: &str = "seconds, 0 (for ever) or at least three snapshot intervals (snapshot_every_secs)";

#[derive(Clone)]
pub struct Config {
    pub database_url: String,
    pub nats_url: String,
    pub api_listen: SocketAddr,
    pub bootstrap_admin_key: Option<String>,
    pub sealing_key: Option<SealingKey>,
    pub sls_app: AppName,
    pub instance_id: String,
    pub api: ApiSettings,
    /// Whether this instance takes part in relaying the log to NATS (one relays at a time).
    pub relay: bool,
    pub snapshot_every_events: u64,
    /// The decisions read model stores an access-table checkpoint every this many events
    /// (explain rebuilds from the nearest one).
    pub checkpoint_every_events: u64,
    pub snapshot_every_secs: u64,
    /// `SLUICE_EVENTS` keeps a message this long (0: for ever). Workers that fall behind the
    /// retained range catch up from the newest snapshot, so it is at least three snapshot
    /// intervals.
    pub events_max_age_secs: u64,
    /// The messages no worker receives (decisions, the API audit, API keys) expire from
    /// `SLUICE_EVENTS` after this long (0: kept as long as the rest). The log keeps them.
    pub events_audit_ttl_secs: u64,
    /// Where signed anchors of the log's head are appended (besides NATS KV `sluice-anchors`).
    pub anchor_file: Option<std::path::PathBuf>,
    /// Where `archive` writes the log's segment files, and every reader of archived positions
    /// reads them (the fold at start, `verify-log`, `replay`, explain).
    pub archive_dir: Option<std::path::PathBuf>,
    /// How often the head is anchored (when it moved).
    pub anchor_every_secs: u64,
    /// How often an app's stream-JWT JWKS (`policy.jwt.jwks_url`) is fetched again.
    pub jwks_refresh_secs: u64,
    /// The shortest time between two early fetches caused by a JWT with an unknown `kid`.
    pub jwks_kid_refetch_secs: u64,
    /// The API over HTTPS: a PEM certificate chain and its PEM private key (reloaded on
    /// SIGHUP). Unset: plain HTTP (for loopback-only setups).
    pub api_tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// How to reach NATS beyond its URL (TLS trust, credentials).
    pub nats_auth: sluice_events::settings::NatsAuth,
    /// The log filter (tracing's syntax); reloaded on SIGHUP.
    pub log: String,
    /// A listener serving `/metrics` alone (with the metrics token when one is set).
    pub metrics_listen: Option<SocketAddr>,
    /// Every setting's raw value, to tell what a reload changed (never printed).
    pub effective: BTreeMap<String, String>,
}

impl std::fmt::Debug for Config {
    // Never print the database URL (it may carry a password) or any secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("nats_url", &redact_url(&self.nats_url))
            .field("api_listen", &self.api_listen)
            .field("bootstrap_admin_key", &self.bootstrap_admin_key.as_ref().map(|_| "<set>"))
            .field("sealing_key", &self.sealing_key.as_ref().map(SealingKey::id))
            .field("sls_app", &self.sls_app)
            .field("instance_id", &self.instance_id)
            .field("api", &self.api)
            .field("relay", &self.relay)
            .field("snapshot_every_events", &self.snapshot_every_events)
            .field("checkpoint_every_events", &self.checkpoint_every_events)
            .field("snapshot_every_secs", &self.snapshot_every_secs)
            .field("events_max_age_secs", &self.events_max_age_secs)
            .field("events_audit_ttl_secs", &self.events_audit_ttl_secs)
            .field("anchor_file", &self.anchor_file)
            .field("archive_dir", &self.archive_dir)
            .field("anchor_every_secs", &self.anchor_every_secs)
            .field("jwks_refresh_secs", &self.jwks_refresh_secs)
            .field("jwks_kid_refetch_secs", &self.jwks_kid_refetch_secs)
            .field("api_tls", &self.api_tls)
            .field("nats_auth", &self.nats_auth)
            .field("log", &self.log)
            .field("metrics_listen", &self.metrics_listen)
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
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://"))
            || crate::pg::Servers::parse(&database_url).is_err()
        {
            return Err(s.invalid(
                "database_url",
                "a postgres:// URL (hosts as h1:port,h2:port; target_session_attrs read-write, primary or any)",
            ));
        }
        let snapshot_every_secs: u64 = s.or("snapshot_every_secs", 60, "seconds")?;
        let events_max_age_secs: u64 = s.or("events_max_age_secs", 30 * 86_400, MAX_AGE)?;
        if events_max_age_secs != 0 && events_max_age_secs < 3 * snapshot_every_secs.max(1) {
            return Err(s.invalid("events_max_age_secs", MAX_AGE));
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
            api: ApiSettings::load(&s)?,
            relay: s.or("relay", true, "true or false")?,
            snapshot_every_events: s.or("snapshot_every_events", 10_000, "a number of events")?,
            checkpoint_every_events: s.or("checkpoint_every_events", 10_000, "a number of events")?,
            snapshot_every_secs,
            events_max_age_secs,
            events_audit_ttl_secs: s.or("events_audit_ttl_secs", 86_400, "seconds (0: no expiry)")?,
            anchor_file: s.optional("anchor_file", "a file path")?,
            archive_dir: s.optional("archive_dir", "a directory")?,
            anchor_every_secs: s.or("anchor_every_secs", 10, "seconds")?.max(1),
            jwks_refresh_secs: s.or("jwks_refresh_secs", 300, "seconds")?.max(1),
            jwks_kid_refetch_secs: s.or("jwks_kid_refetch_secs", 60, "seconds")?.max(1),
            api_tls: match (
                s.optional::<std::path::PathBuf>("api_tls_cert", "a PEM certificate chain file")?,
                s.optional::<std::path::PathBuf>("api_tls_key", "a PEM private key file")?,
            ) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                (Some(_), None) => return Err(s.missing("api_tls_key", "a PEM private key file (with api_tls_cert)")),
                (None, Some(_)) => return Err(s.missing("api_tls_cert", "a PEM certificate chain (with api_tls_key)")),
            },
            nats_auth: sluice_events::settings::NatsAuth::load(&s)?,
            log: {
                let filter: String =
                    s.or("log", "info,sqlx=warn,async_nats=warn".to_owned(), "a log filter like info,sqlx=warn")?;
                tracing_subscriber::EnvFilter::try_new(&filter)
                    .map_err(|_| s.invalid("log", "a log filter like info,sqlx=warn"))?;
                filter
            },
            metrics_listen: s.optional("metrics_listen", "host:port like 0.0.0.0:9090")?,
            effective: s.effective(KNOWN),
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

pub use sluice_events::settings::redact_url;

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

    /// `ops/deb/control.toml` (installed as /etc/sluice/control.toml) names every setting and
    /// loads as it is, with its defaults.
    #[test]
    fn the_packaged_example_holds_every_setting_and_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/deb/control.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let missing = sluice_events::settings::keys_missing_from(&text, KNOWN);
        assert!(missing.is_empty(), "{missing:?} missing from {}", path.display());
        // The sealing key file does not exist here; the environment's key wins.
        let key = "SLUICE_SEALING_KEY";
        let c = Config::load(Some(&path), env(&[(key, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")])).unwrap();
        let defaults =
            Config::load(None, env(&[("SLUICE_DATABASE_URL", "postgres://sluice@127.0.0.1:5432/sluice")])).unwrap();
        assert_eq!(format!("{:?}", c.api), format!("{:?}", defaults.api), "the example's values are the defaults");
        assert_eq!(
            (c.relay, c.anchor_every_secs, c.sls_app.as_str()),
            (defaults.relay, defaults.anchor_every_secs, "live")
        );
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn printed_config_redacts_every_secret() {
        let c = Config::load(
            None,
            env(&[
                ("SLUICE_DATABASE_URL", "postgres://sluice:pg-password-1@db.internal:5432/sluice?sslmode=require"),
                ("SLUICE_NATS_URL", "nats://worker:nats-password-2@nats.internal:4222"),
                ("SLUICE_BOOTSTRAP_ADMIN_KEY", "an-admin-key-of-at-least-24-chars"),
                ("SLUICE_API_JWT_SECRET", "an-api-jwt-secret-of-32-bytes-or-more!!"),
                ("SLUICE_ADMIN_USERNAME", "ops"),
                ("SLUICE_ADMIN_PASSWORD", "a-static-admin-password"),
            ]),
        )
        .unwrap();
        let printed = format!("{c:#?}");
        for secret in ["pg-password-1", "nats-password-2", "an-admin-key", "an-api-jwt-secret", "a-static-admin"] {
            assert!(!printed.contains(secret), "{secret} printed: {printed}");
        }
        assert!(printed.contains("postgres://sluice:***@db.internal:5432/sluice?sslmode=require"), "{printed}");
        assert!(printed.contains("nats://worker:***@nats.internal:4222"), "{printed}");
        assert!(printed.contains("ready_max_lag_ms"), "every setting is printed: {printed}");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
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
    fn database_url_takes_a_host_list_and_refuses_what_it_cannot_follow() {
        let list = "postgres://x:pw@a:5432,b:5433/db?target_session_attrs=read-write";
        assert_eq!(Config::load(None, env(&[("SLUICE_DATABASE_URL", list)])).unwrap().database_url, list);
        let bad = "postgres://x:pw@a,b/db?target_session_attrs=standby";
        let err = Config::load(None, env(&[("SLUICE_DATABASE_URL", bad)])).unwrap_err().to_string();
        assert!(err.contains("SLUICE_DATABASE_URL") && err.contains("target_session_attrs"), "{err}");
        assert!(!err.contains("pw"), "{err}");
    }

    #[test]
    fn events_retention_keeps_at_least_three_snapshots() {
        let base = [("SLUICE_DATABASE_URL", "postgres://x@h/db")];
        let c = Config::load(None, env(&base)).unwrap();
        assert_eq!((c.events_max_age_secs, c.events_audit_ttl_secs), (30 * 86_400, 86_400));
        let mut e = env(&base);
        e.insert("SLUICE_SNAPSHOT_EVERY_SECS".into(), "10".into());
        e.insert("SLUICE_EVENTS_MAX_AGE_SECS".into(), "29".into());
        let err = Config::load(None, e.clone()).unwrap_err().to_string();
        assert!(err.contains("SLUICE_EVENTS_MAX_AGE_SECS") && err.contains("three snapshot"), "{err}");
        e.insert("SLUICE_EVENTS_MAX_AGE_SECS".into(), "30".into());
        assert_eq!(Config::load(None, e.clone()).unwrap().events_max_age_secs, 30);
        e.insert("SLUICE_EVENTS_MAX_AGE_SECS".into(), "0".into());
        assert_eq!(Config::load(None, e).unwrap().events_max_age_secs, 0);
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

    #[test]
    fn webhook_allow_list_and_jwt_leeway_are_checked() {
        let base = |extra: (&str, &str)| Config::load(None, env(&[("DATABASE_URL", "postgres://x@h/db"), extra]));
        let err = base(("SLUICE_WEBHOOK_ALLOWED", "10.0.0.0/8,not a host!")).unwrap_err().to_string();
        assert!(err.starts_with("invalid setting SLUICE_WEBHOOK_ALLOWED") && !err.contains("not a host"), "{err}");
        let err = base(("SLUICE_API_JWT_LEEWAY_SECS", "-1")).unwrap_err().to_string();
        assert!(err.starts_with("invalid setting SLUICE_API_JWT_LEEWAY_SECS"), "{err}");
        for (var, bad) in [
            ("SLUICE_SLS_CORS_ORIGIN", "two words"),
            ("SLUICE_ANCHOR_EVERY_SECS", "often"),
            ("SLUICE_JWKS_REFRESH_SECS", "-5"),
            ("SLUICE_JWKS_KID_REFETCH_SECS", "x"),
        ] {
            let err = base((var, bad)).unwrap_err().to_string();
            assert!(err.starts_with(&format!("invalid setting {var}")), "{err}");
        }
        assert_eq!(
            base(("SLUICE_SLS_CORS_ORIGIN", "https://ui.example")).unwrap().api.sls_cors_origin,
            "https://ui.example"
        );
        let c = base(("SLUICE_WEBHOOK_ALLOWED", "127.0.0.1")).unwrap();
        assert_eq!((c.api.sls_cors_origin.as_str(), c.anchor_every_secs, c.jwks_kid_refetch_secs), ("*", 10, 60));
        assert!(c.api.webhook_allowed.allows("x", "127.0.0.1".parse().unwrap()));
        assert_eq!(c.api.jwt_leeway_secs, 5);
    }
}
