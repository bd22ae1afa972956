//! The worker's settings (DESIGN.md §10): a TOML file overlaid by `SLUICE_*` variables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use sluice_events::secret::SecretString;
use sluice_events::settings::{SettingsError, Sources};
use sluice_events::{NodeId, SealingKey};

const KNOWN: &[&str] = &[
    "nats_url",
    "sealing_key",
    "sealing_key_file",
    "node_id",
    "rtmp_listen",
    "srt_listen",
    "admin_listen",
    "state_dir",
    "heartbeat_secs",
    "snapshot_every_secs",
    "webhook_cache_secs",
    "max_connections",
    "max_connections_per_ip",
    "failure_backoff_after",
    "rtmp_max_message_bytes",
    "rtmp_idle_timeout_secs",
    "rtmp_threads",
    "rtmp_merge_write_ms",
    "rtmp_player_queue",
    "rtmp_player_behind_secs",
    "srt_latency_ms",
    "srt_engine",
    "srt_tick_ms",
    "publish_lease_secs",
    "webhook_allowed",
    "node_secret",
    "node_secret_file",
    "probe_listen",
    "hooks_listen",
    "hooks_secret",
    "hooks_secret_file",
    "hooks_allowed",
    "hooks_srs_api",
    "hooks_mediamtx_api",
    "refusal_window_ms",
    "drain_secs",
    "proxy_protocol_from",
    "nats_ca_file",
    "nats_nkey_seed_file",
    "nats_creds_file",
    "nats_replicas",
    "sls_app",
    "log",
    "metrics_listen",
    "metrics_token",
    "rtmps_listen",
    "rtmps_cert",
    "rtmps_key",
];

/// What a SIGHUP changes live; any other setting changed in the file needs a restart.
/// (The RTMPS certificate and key files are read again on every SIGHUP, changed or not.)
pub const RELOADABLE: &[&str] = &[
    "log",
    "max_connections",
    "max_connections_per_ip",
    "failure_backoff_after",
    "webhook_allowed",
    "rtmps_cert",
    "rtmps_key",
];

#[derive(Clone)]
pub struct Config {
    pub nats_url: String,
    pub sealing_key: SealingKey,
    pub node_id: NodeId,
    pub rtmp_listen: SocketAddr,
    pub srt_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub state_dir: PathBuf,
    /// How often the worker publishes its heartbeat.
    pub heartbeat_secs: u64,
    /// How often it writes its local snapshot (when its state moved).
    pub snapshot_every_secs: u64,
    /// How long a webhook's allow is reused for the same request (0: ask every time).
    pub webhook_cache_secs: u64,
    /// Open media connections at most, in total and from one address.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Denials from one address within 10 s that put it in the penalty box (0: never).
    pub failure_backoff_after: usize,
    /// Input an RTMP connection may send without completing a message (nginx-rtmp's
    /// `max_message`): beyond it the connection is closed.
    pub rtmp_max_message_bytes: usize,
    /// A publisher (or a connection not yet playing) silent this long is closed.
    pub rtmp_idle_timeout_secs: u64,
    /// RTMP media threads (monoio runtimes, one `SO_REUSEPORT` listener each); default: the
    /// cores this process may run on.
    pub rtmp_threads: usize,
    /// How long media may wait for more media to share a player's write (SRS's
    /// `mw_latency`); 0 writes each message at once.
    pub rtmp_merge_write_ms: u64,
    pub rtmp_player_queue: usize,
    pub rtmp_player_behind_secs: u64,
    /// The SRT latency offered to callers (libsrt's default is 120 ms).
    pub srt_latency_ms: u64,
    /// What drives SRT connections: `batched` (one loop, batched system calls) or `tokio`
    /// (srt-tokio, a task per connection).
    pub srt_engine: crate::srt::Engine,
    /// The batched driver's shortest time between two rounds: what a round gathers per
    /// player, and the most a datagram waits for its round.
    pub srt_tick_ms: u64,
    /// How long a publisher's cluster-wide lease lives unrenewed (NATS KV
    /// `sluice-publishers`): the time a killed worker's streams stay taken. Renewed every
    /// third of it; the bucket's age limit is set by the first worker that creates it.
    pub publish_lease_secs: u64,
    /// Where a webhook may go beyond public addresses: host names or CIDRs
    /// (`SLUICE_WEBHOOK_ALLOWED`, comma-separated).
    pub webhook_allowed: sluice_events::webhook::WebhookAllowList,
    /// The node API's bearer credential (`SLUICE_NODE_SECRET` or `SLUICE_NODE_SECRET_FILE`,
    /// at least 16 characters). Unset: the worker keeps a random one in
    /// `<state_dir>/node-secret` (mode 0600) for a media server beside it to read.
    pub node_secret: Option<SecretString>,
    /// A second listener with the probes and metrics alone (`/health`, `/ready`, `/metrics`).
    pub probe_listen: Option<SocketAddr>,
    /// The media servers' hooks (`/hooks/nginx-rtmp/{secret}`), served when `hooks_secret`
    /// is set (`SLUICE_HOOKS_LISTEN`, default 127.0.0.1:9936).
    pub hooks_listen: SocketAddr,
    /// The secret in the hooks' path (`SLUICE_HOOKS_SECRET` or `SLUICE_HOOKS_SECRET_FILE`, at
    /// least 16 characters); unset, no hook is served.
    pub hooks_secret: Option<SecretString>,
    /// Addresses a media server may call the hooks from (`SLUICE_HOOKS_ALLOWED`, CIDRs;
    /// default loopback).
    pub hooks_allowed: Vec<sluice_events::Cidr>,
    /// SRS's HTTP API (`SLUICE_HOOKS_SRS_API`, e.g. `http://127.0.0.1:1985`): a revoked session
    /// admitted through SRS's hooks is kicked there.
    pub hooks_srs_api: Option<String>,
    /// MediaMTX's control API (`SLUICE_HOOKS_MEDIAMTX_API`, e.g. `http://127.0.0.1:9997`):
    /// revoked sessions are kicked there, ended ones noticed.
    pub hooks_mediamtx_api: Option<String>,
    /// Identical refusals (address, app, stream, action, reason) within this window of the
    /// last recorded one are recorded as one, with a count (0: each is recorded).
    pub refusal_window_ms: u64,
    /// SRT Live Server's one app: a bare SRT streamid (`publisher_id`) is a stream of it.
    pub sls_app: sluice_events::AppName,
    /// On SIGTERM, how long live sessions may go on before the worker exits (a second
    /// SIGTERM: at once).
    pub drain_secs: u64,
    /// How to reach NATS beyond its URL (TLS trust, credentials).
    pub nats_auth: sluice_events::settings::NatsAuth,
    /// Peers (a load balancer such as HAProxy) whose RTMP connections open with a PROXY
    /// protocol v1 or v2 header naming the client.
    pub proxy_protocol_from: Vec<sluice_events::Cidr>,
    /// The log filter (`RUST_LOG` syntax, like `info,sluice_data_plane=debug`); reloaded on
    /// SIGHUP.
    pub log: String,
    /// A listener serving `/metrics` alone.
    pub metrics_listen: Option<SocketAddr>,
    /// The bearer token a scrape must present (`/metrics` on every listener), if set.
    pub metrics_token: Option<SecretString>,
    /// RTMPS: where it listens, and its PEM certificate chain and private key (both, or
    /// neither: no RTMPS).
    pub rtmps_listen: SocketAddr,
    pub rtmps: Option<(PathBuf, PathBuf)>,
    /// Every setting's raw value, to tell what a reload changed (never printed).
    pub effective: BTreeMap<String, String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("nats_url", &sluice_events::settings::redact_url(&self.nats_url))
            .field("sealing_key", &self.sealing_key.id())
            .field("node_id", &self.node_id)
            .field("rtmp_listen", &self.rtmp_listen)
            .field("srt_listen", &self.srt_listen)
            .field("admin_listen", &self.admin_listen)
            .field("state_dir", &self.state_dir)
            .field("heartbeat_secs", &self.heartbeat_secs)
            .field("snapshot_every_secs", &self.snapshot_every_secs)
            .field("webhook_cache_secs", &self.webhook_cache_secs)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_ip", &self.max_connections_per_ip)
            .field("failure_backoff_after", &self.failure_backoff_after)
            .field("rtmp_max_message_bytes", &self.rtmp_max_message_bytes)
            .field("rtmp_idle_timeout_secs", &self.rtmp_idle_timeout_secs)
            .field("rtmp_threads", &self.rtmp_threads)
            .field("rtmp_merge_write_ms", &self.rtmp_merge_write_ms)
            .field("rtmp_player_queue", &self.rtmp_player_queue)
            .field("rtmp_player_behind_secs", &self.rtmp_player_behind_secs)
            .field("srt_latency_ms", &self.srt_latency_ms)
            .field("srt_engine", &self.srt_engine)
            .field("srt_tick_ms", &self.srt_tick_ms)
            .field("publish_lease_secs", &self.publish_lease_secs)
            .field("webhook_allowed", &self.webhook_allowed)
            .field("node_secret", &self.node_secret)
            .field("probe_listen", &self.probe_listen)
            .field("hooks_listen", &self.hooks_listen)
            .field("hooks_secret", &self.hooks_secret)
            .field("hooks_allowed", &self.hooks_allowed)
            .field("hooks_srs_api", &self.hooks_srs_api)
            .field("hooks_mediamtx_api", &self.hooks_mediamtx_api)
            .field("refusal_window_ms", &self.refusal_window_ms)
            .field("drain_secs", &self.drain_secs)
            .field("nats_auth", &self.nats_auth)
            .field("proxy_protocol_from", &self.proxy_protocol_from)
            .field("sls_app", &self.sls_app)
            .field("log", &self.log)
            .field("metrics_listen", &self.metrics_listen)
            .field("metrics_token", &self.metrics_token)
            .field("rtmps_listen", &self.rtmps_listen)
            .field("rtmps", &self.rtmps)
            .finish()
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
}

impl Config {
    pub fn load(file: Option<&Path>, env: BTreeMap<String, String>) -> Result<Config, SettingsError> {
        let s = Sources::from_path(file, |p| std::fs::read_to_string(p), env, KNOWN)?;
        let sealing_key = s
            .sealing_key(|path| std::fs::read_to_string(path).ok())?
            .ok_or_else(|| s.missing("sealing_key", "base64 of 32 random bytes (or SLUICE_SEALING_KEY_FILE)"))?;
        let node_id = match s.raw("node_id") {
            Some((v, _)) => NodeId::parse(v.trim())
                .map_err(|_| s.invalid("node_id", "a node id (letters, digits, '_', '-', '.', '~')"))?,
            None => NodeId::parse(&host_name())
                .or_else(|_| NodeId::parse("worker"))
                .map_err(|_| s.invalid("node_id", "a node id"))?,
        };
        let webhook: String = s.or("webhook_allowed", String::new(), "comma-separated host names or CIDRs")?;
        let entries: Vec<String> = webhook.split(',').map(str::to_owned).collect();
        let webhook_allowed = sluice_events::webhook::WebhookAllowList::parse(&entries)
            .map_err(|_| s.invalid("webhook_allowed", "comma-separated host names or CIDRs"))?;
        let node_secret = secret(&s, "node_secret")?;
        let hooks_secret = secret(&s, "hooks_secret")?;
        Ok(Config {
            nats_url: s.or("nats_url", "nats://127.0.0.1:4222".to_owned(), "a nats:// URL")?,
            sealing_key,
            node_id,
            rtmp_listen: s.or("rtmp_listen", addr("0.0.0.0:1935"), "host:port like 0.0.0.0:1935")?,
            srt_listen: s.or("srt_listen", addr("0.0.0.0:4200"), "host:port like 0.0.0.0:4200")?,
            admin_listen: s.or("admin_listen", addr("127.0.0.1:9935"), "host:port like 127.0.0.1:9935")?,
            state_dir: s.or("state_dir", PathBuf::from("./.sluice/dataplane"), "a directory path")?,
            heartbeat_secs: s.or("heartbeat_secs", 2, "seconds")?,
            snapshot_every_secs: s.or("snapshot_every_secs", 30, "seconds")?,
            webhook_cache_secs: s.or("webhook_cache_secs", 30, "seconds")?,
            max_connections: s.or("max_connections", 10_000, "a number of connections")?,
            max_connections_per_ip: s.or("max_connections_per_ip", 100, "a number of connections")?,
            failure_backoff_after: s.or("failure_backoff_after", 5, "a number of denials (0: no backoff)")?,
            rtmp_max_message_bytes: s.or("rtmp_max_message_bytes", 4 << 20, "a number of bytes")?,
            rtmp_idle_timeout_secs: s.or("rtmp_idle_timeout_secs", 30, "seconds")?,
            rtmp_threads: s.or("rtmp_threads", cores(), "a number of threads (at least 1)")?.max(1),
            rtmp_merge_write_ms: s.or("rtmp_merge_write_ms", 100, "milliseconds (0: no merging)")?,
            rtmp_player_queue: s.or("rtmp_player_queue", 1024, "a number of media messages")?.max(1),
            rtmp_player_behind_secs: s.or("rtmp_player_behind_secs", 10, "seconds")?.max(1),
            srt_latency_ms: s.or("srt_latency_ms", 120, "milliseconds")?,
            srt_engine: s.or("srt_engine", crate::srt::Engine::Batched, "batched or tokio")?,
            srt_tick_ms: s.or("srt_tick_ms", 10, "milliseconds (1 to 50)")?.clamp(1, 50),
            publish_lease_secs: s.or("publish_lease_secs", 10, "seconds")?.max(1),
            webhook_allowed,
            node_secret,
            probe_listen: s.optional("probe_listen", "host:port like 0.0.0.0:9936")?,
            hooks_listen: s.or("hooks_listen", addr("127.0.0.1:9936"), "host:port like 127.0.0.1:9936")?,
            hooks_secret,
            hooks_allowed: cidrs(&s, "hooks_allowed", "127.0.0.0/8,::1/128")?,
            hooks_srs_api: api_url(&s, "hooks_srs_api")?,
            hooks_mediamtx_api: api_url(&s, "hooks_mediamtx_api")?,
            refusal_window_ms: s.or("refusal_window_ms", 1000, "milliseconds (0: record each refusal)")?.min(60_000),
            sls_app: sls_app(&s)?,
            drain_secs: s.or("drain_secs", 30, "seconds")?,
            nats_auth: sluice_events::settings::NatsAuth::load(&s)?,
            proxy_protocol_from: cidrs(&s, "proxy_protocol_from", "")?,
            log: log_filter(&s)?,
            metrics_listen: s.optional("metrics_listen", "host:port like 0.0.0.0:9937")?,
            metrics_token: metrics_token(&s)?,
            rtmps_listen: s.or("rtmps_listen", addr("0.0.0.0:1936"), "host:port like 0.0.0.0:1936")?,
            rtmps: match (
                s.optional::<PathBuf>("rtmps_cert", "a PEM certificate chain file")?,
                s.optional::<PathBuf>("rtmps_key", "a PEM private key file")?,
            ) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                (Some(_), None) => return Err(s.missing("rtmps_key", "a PEM private key file (with rtmps_cert)")),
                (None, Some(_)) => return Err(s.missing("rtmps_cert", "a PEM certificate chain file (with rtmps_key)")),
            },
            effective: s.effective(KNOWN),
        })
    }
}

/// `log`: a tracing filter (default `info,async_nats=warn`), checked here so a bad one is a
/// settings error rather than a silently ignored filter.
pub fn log_filter(s: &Sources) -> Result<String, SettingsError> {
    let filter: String =
        s.or("log", "info,async_nats=warn".to_owned(), "a log filter like info,sluice_data_plane=debug")?;
    tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|_| s.invalid("log", "a log filter like info,sluice_data_plane=debug"))?;
    Ok(filter)
}

fn metrics_token(s: &Sources) -> Result<Option<SecretString>, SettingsError> {
    match s.raw("metrics_token") {
        None => Ok(None),
        Some((v, _)) if v.trim().len() >= 16 => Ok(Some(SecretString::new(v.trim().to_owned()))),
        Some(_) => Err(s.invalid("metrics_token", "at least 16 characters")),
    }
}

/// A secret of at least 16 characters, from `name` or the file `name_file`.
fn secret(s: &Sources, name: &str) -> Result<Option<SecretString>, SettingsError> {
    let file = format!("{name}_file");
    match (s.raw(name), s.raw(&file)) {
        (Some((v, _)), _) => Some(v.trim().to_owned())
            .filter(|v| v.len() >= 16)
            .map(SecretString::new)
            .map(Some)
            .ok_or_else(|| s.invalid(name, "at least 16 characters (or a file of them in the _FILE setting)")),
        (None, Some((path, _))) => std::fs::read_to_string(path.trim())
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| v.len() >= 16)
            .map(SecretString::new)
            .map(Some)
            .ok_or_else(|| s.invalid(&file, "a readable file holding at least 16 characters")),
        (None, None) => Ok(None),
    }
}

/// An `http://` or `https://` base URL, without its trailing `/`.
fn api_url(s: &Sources, name: &str) -> Result<Option<String>, SettingsError> {
    let Some(url) = s.optional::<String>(name, "an http:// or https:// URL")? else { return Ok(None) };
    let url = url.trim().trim_end_matches('/').to_owned();
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
        return Err(s.invalid(name, "an http:// or https:// URL like http://127.0.0.1:1985"));
    }
    Ok(Some(url))
}

/// Comma-separated CIDRs (`default` when unset).
fn cidrs(s: &Sources, name: &str, default: &str) -> Result<Vec<sluice_events::Cidr>, SettingsError> {
    let text: String = s.or(name, default.to_owned(), "comma-separated CIDRs")?;
    text.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(sluice_events::Cidr::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| s.invalid(name, "comma-separated CIDRs like 10.0.0.0/8"))
}

fn sls_app(s: &Sources) -> Result<sluice_events::AppName, SettingsError> {
    let name: String = s.or("sls_app", "live".to_owned(), "an app name")?;
    sluice_events::AppName::parse(name.trim()).map_err(|_| s.invalid("sls_app", "an app name"))
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ops/deb/dataplane.toml` (installed as /etc/sluice/dataplane.toml) names every setting
    /// and loads as it is.
    #[test]
    fn the_packaged_example_holds_every_setting_and_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/deb/dataplane.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let missing = sluice_events::settings::keys_missing_from(&text, KNOWN);
        assert!(missing.is_empty(), "{missing:?} missing from {}", path.display());
        let env: BTreeMap<String, String> =
            [("SLUICE_SEALING_KEY".to_owned(), "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_owned())].into();
        let c = Config::load(Some(&path), env).unwrap();
        assert_eq!((c.drain_secs, c.max_connections, c.rtmp_player_queue), (30, 10_000, 1024));
        assert_eq!(c.state_dir, std::path::PathBuf::from("/var/lib/sluice/dataplane"));
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    #[test]
    fn defaults_follow_the_design() {
        let c = Config::load(None, env(&[("SLUICE_SEALING_KEY", KEY), ("SLUICE_NODE_ID", "edge-1")])).unwrap();
        assert_eq!(c.rtmp_listen.to_string(), "0.0.0.0:1935");
        assert_eq!(c.srt_listen.to_string(), "0.0.0.0:4200");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9935");
        assert_eq!(c.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(c.state_dir, PathBuf::from("./.sluice/dataplane"));
        assert_eq!(c.node_id.as_str(), "edge-1");
        // The media servers' hooks are off until a secret is set.
        assert_eq!((c.hooks_secret.is_none(), c.hooks_listen.to_string()), (true, "127.0.0.1:9936".to_owned()));
        assert!(c.hooks_allowed.iter().any(|n| n.contains("127.0.0.1".parse().unwrap())));
        assert!(!c.hooks_allowed.iter().any(|n| n.contains("10.0.0.1".parse().unwrap())));
        let apis = [("SLUICE_SEALING_KEY", KEY), ("SLUICE_HOOKS_SRS_API", "http://127.0.0.1:1985/")];
        assert_eq!(Config::load(None, env(&apis)).unwrap().hooks_srs_api.as_deref(), Some("http://127.0.0.1:1985"));
    }

    #[test]
    fn missing_key_and_bad_values_are_one_clear_line() {
        let err = Config::load(None, env(&[])).unwrap_err().to_string();
        assert!(err.starts_with("missing setting SLUICE_SEALING_KEY"), "{err}");
        let err = Config::load(None, env(&[("SLUICE_SEALING_KEY", KEY), ("SLUICE_RTMP_LISTEN", "1935")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting SLUICE_RTMP_LISTEN (from the environment): expected host:port like 0.0.0.0:1935"
        );
        let err = Config::load(None, env(&[("SLUICE_SEALING_KEY", KEY), ("SLUICE_NODE_ID", "bad id")])).unwrap_err();
        assert!(err.to_string().contains("SLUICE_NODE_ID"));
        for (var, bad) in [
            ("SLUICE_WEBHOOK_ALLOWED", "10.0.0.0/8,not a host!"),
            ("SLUICE_PUBLISH_LEASE_SECS", "soon"),
            ("SLUICE_NODE_SECRET", "short"),
            ("SLUICE_NODE_SECRET_FILE", "/nonexistent/secret"),
            ("SLUICE_PROBE_LISTEN", "probes"),
            ("SLUICE_REFUSAL_WINDOW_MS", "a second"),
            ("SLUICE_SLS_APP", "no/slash"),
            ("SLUICE_HOOKS_SECRET", "short"),
            ("SLUICE_HOOKS_SECRET_FILE", "/nonexistent/hooks"),
            ("SLUICE_HOOKS_LISTEN", "hooks"),
            ("SLUICE_HOOKS_ALLOWED", "loopback"),
            ("SLUICE_HOOKS_SRS_API", "ftp://srs.internal:1985"),
            ("SLUICE_HOOKS_MEDIAMTX_API", "mediamtx:9997"),
        ] {
            let err = Config::load(None, env(&[("SLUICE_SEALING_KEY", KEY), (var, bad)])).unwrap_err().to_string();
            assert!(err.starts_with(&format!("invalid setting {var}")) && !err.contains(bad), "{err}");
        }
        let ok = Config::load(
            None,
            env(&[("SLUICE_SEALING_KEY", KEY), ("SLUICE_WEBHOOK_ALLOWED", "hooks.internal, 10.0.0.0/8")]),
        );
        assert!(ok.unwrap().webhook_allowed.allows("hooks.internal", "192.168.1.1".parse().unwrap()));
    }
}
