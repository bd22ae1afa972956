//! `sluice-dataplane`: the worker binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice_data_plane::config::Config;
use sluice_events::secret::SecretString;

#[derive(Parser, Debug)]
#[command(name = "sluice-dataplane", version, about = "Sluice data-plane worker")]
struct Cli {
    /// TOML config file; every setting can also come from SLUICE_<NAME>.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Validate the settings and print them (secrets shown by key id only).
    CheckConfig,
    /// Run the worker: boot from a snapshot, follow the log over NATS, serve the admin port.
    Run,
    /// Rebuild the worker's state and print its position and access digest (equal to what
    /// `sluice-control replay --to POSITION` prints at the same position).
    Rebuild {
        /// Fold `SLUICE_EVENTS` from position 1.
        #[arg(long, conflicts_with = "from_snapshot")]
        from_log: bool,
        /// Decode a snapshot: `--file`, else the local one, else the one in NATS.
        #[arg(long)]
        from_snapshot: bool,
        /// Stop at this position (with --from-log).
        #[arg(long, requires = "from_log")]
        to: Option<u64>,
        /// The snapshot file (with --from-snapshot).
        #[arg(long, requires = "from_snapshot")]
        file: Option<PathBuf>,
    },
}

/// systemd's notify protocol (`Type=notify` units): `READY=1` once the listeners are up,
/// `STOPPING=1` when the drain starts, `WATCHDOG=1` every half `WatchdogSec` from the
/// runtime. Without `NOTIFY_SOCKET`, nothing.
mod systemd {
    use sd_notify::NotifyState;

    pub fn ready(tasks: &sluice_data_plane::task::Tasks) {
        let _ = sd_notify::notify(false, &[NotifyState::Ready]);
        if let Some(usec) = watchdog_usec() {
            let every = std::time::Duration::from_micros(usec / 2);
            tasks.spawn("systemd watchdog", async move {
                loop {
                    let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
                    tokio::time::sleep(every).await;
                }
            });
        }
    }

    /// `WATCHDOG_USEC`, when the watchdog is this process's (`WATCHDOG_PID` unset, as
    /// libsystemd reads it, or ours).
    fn watchdog_usec() -> Option<u64> {
        let usec = std::env::var("WATCHDOG_USEC").ok()?.parse::<u64>().ok().filter(|u| *u > 0)?;
        match std::env::var("WATCHDOG_PID") {
            Ok(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
            _ => Some(usec),
        }
    }

    pub fn stopping() {
        let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    }
}

#[derive(Debug, Clone, Copy)]
enum LogFormat {
    Text,
    Json,
}

/// `SLUICE_LOG_FORMAT`: `text` (default) or `json` (one JSON object a line on stderr).
fn log_format() -> Result<LogFormat, String> {
    match std::env::var("SLUICE_LOG_FORMAT").as_deref() {
        Err(_) | Ok("text") => Ok(LogFormat::Text),
        Ok("json") => Ok(LogFormat::Json),
        Ok(other) => Err(format!("SLUICE_LOG_FORMAT={other:?}: expected text or json")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run => {
            let config = match Config::load(cli.config.as_deref(), std::env::vars().collect()) {
                Ok(c) => {
                    sluice_data_plane::sync::set_nats_auth(c.nats_auth.clone());
                    c
                }
                Err(e) => {
                    eprintln!("sluice-dataplane: {e}");
                    return ExitCode::from(2);
                }
            };
            use tracing_subscriber::layer::SubscriberExt as _;
            use tracing_subscriber::util::SubscriberInitExt as _;
            // The filter sits behind a reload handle: a SIGHUP sets a changed `log` setting live.
            let (filter, log_filter) =
                tracing_subscriber::reload::Layer::new(tracing_subscriber::EnvFilter::new(&config.log));
            let layered = tracing_subscriber::registry().with(filter);
            let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
            match log_format() {
                Ok(LogFormat::Json) => layered.with(fmt.json().flatten_event(true).with_current_span(false)).init(),
                Ok(LogFormat::Text) => {
                    layered.with(fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))).init()
                }
                Err(e) => {
                    eprintln!("sluice-dataplane: {e}");
                    return ExitCode::from(2);
                }
            }
            // A panic inside rml_rtmp on a client's bytes is contained and ends that one
            // connection (`rtmp::guarded_input`); it is logged as one line, not as a backtrace
            // on stderr that any client could make the worker print at will.
            let default_hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if sluice_data_plane::rtmp::in_guarded_input() {
                    tracing::debug!(panic = %info, "rml_rtmp panicked on a client's input; closing that connection");
                } else {
                    default_hook(info);
                }
            }));
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("sluice-dataplane: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let reload = Reload { file: cli.config.clone(), log_filter };
            match rt.block_on(run(config, reload)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluice-dataplane: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Rebuild { from_log, from_snapshot, to, file } => {
            if from_log == from_snapshot {
                eprintln!("sluice-dataplane: rebuild needs --from-log or --from-snapshot");
                return ExitCode::from(2);
            }
            let config = match Config::load(cli.config.as_deref(), std::env::vars().collect()) {
                Ok(c) => {
                    sluice_data_plane::sync::set_nats_auth(c.nats_auth.clone());
                    c
                }
                Err(e) => {
                    eprintln!("sluice-dataplane: {e}");
                    return ExitCode::from(2);
                }
            };
            let keyring = std::sync::Arc::new(sluice_events::Keyring::new(config.sealing_key.clone()));
            // Progress on stderr when it is a terminal (events/s, time left); quiet in scripts.
            let (tty, epoch) = (std::io::IsTerminal::is_terminal(&std::io::stderr()), std::time::Instant::now());
            let mut meter: Option<sluice_events::progress::Meter> = None;
            let mut progress = |position: u64, target: u64| {
                let m = meter.get_or_insert_with(|| sluice_events::progress::Meter::new("rebuild", 0, target, 0.0));
                if let Some(line) = m.at(position, epoch.elapsed().as_secs_f64()).filter(|_| tty) {
                    eprint!("\r{line}   ");
                }
            };
            let rebuilt = tokio::runtime::Runtime::new().map_err(|e| e.to_string()).and_then(|rt| {
                rt.block_on(async {
                    if from_log {
                        sluice_data_plane::sync::rebuild_from_log(&config.nats_url, keyring, to, &mut progress).await
                    } else {
                        sluice_data_plane::sync::rebuild_from_snapshot(&config, keyring, file.as_deref()).await
                    }
                })
            });
            if let (true, Some(m), Ok(state)) = (tty, meter.as_mut(), &rebuilt)
                && let Some(line) = m.last(state.position().0, epoch.elapsed().as_secs_f64())
            {
                eprintln!("\r{line}   ");
            }
            match rebuilt {
                Ok(state) => {
                    println!("position {} access_digest {}", state.position(), state.access_digest().to_hex());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sluice-dataplane: rebuild: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::CheckConfig => match Config::load(cli.config.as_deref(), std::env::vars().collect()) {
            Ok(c) => {
                println!("{c:#?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sluice-dataplane: {e}");
                ExitCode::from(2)
            }
        },
    }
}

/// What a SIGHUP needs: the config file to read again, the log filter's handle.
struct Reload {
    file: Option<PathBuf>,
    log_filter: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
}

impl Reload {
    /// Reads the settings again and applies what can change live (`config::RELOADABLE`): the
    /// log filter, the connection limits and penalty threshold, the webhook allow-list. Names
    /// in one line the changed settings that need a restart. A file that no longer reads
    /// changes nothing.
    fn apply(
        &self,
        running: &mut Config,
        decider: &sluice_data_plane::decide::Decider,
        rtmps: Option<&sluice_data_plane::rtmp::tls::Certificates>,
    ) {
        use sluice_data_plane::config::RELOADABLE;
        let new = match Config::load(self.file.as_deref(), std::env::vars().collect()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: the settings do not read; nothing changed");
                return;
            }
        };
        let changed = sluice_events::settings::Sources::changed(&running.effective, &new.effective);
        let (live, restart): (Vec<String>, Vec<String>) =
            changed.into_iter().partition(|k| RELOADABLE.contains(&k.as_str()));
        if let Err(e) = self.log_filter.reload(tracing_subscriber::EnvFilter::new(&new.log)) {
            tracing::error!(error = %e, "SIGHUP: cannot set the new log filter");
        }
        decider.gate.set_limits(
            new.max_connections.max(1),
            new.max_connections_per_ip.max(1),
            new.failure_backoff_after,
        );
        decider.webhooks.set_allow_list(new.webhook_allowed.clone());
        // RTMPS: the files are read again (a renewed certificate keeps its path). Turning RTMPS
        // on or off needs a restart (the listeners are bound at start).
        match (rtmps, &new.rtmps) {
            (Some(certs), Some((cert, key))) => match sluice_data_plane::rtmp::tls::load(cert, key) {
                Ok(config) => {
                    certs.store(config);
                    tracing::info!(cert = %cert.display(), "SIGHUP: the RTMPS certificate reloaded");
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "SIGHUP: the RTMPS certificate could not be reloaded; the previous one stays"
                ),
            },
            (None, None) => {}
            _ => tracing::warn!("SIGHUP: turning RTMPS on or off needs a restart"),
        }
        if !restart.is_empty() {
            tracing::warn!(settings = %restart.join(", "), "SIGHUP: these changed settings need a restart (drain first); kept as they were");
        }
        tracing::info!(reloaded = %live.join(", "), "SIGHUP: settings reloaded");
        // What was applied is now the running value; what needs a restart is still the old.
        for key in &live {
            match new.effective.get(key) {
                Some(v) => running.effective.insert(key.clone(), v.clone()),
                None => running.effective.remove(key),
            };
        }
        running.log = new.log;
        running.max_connections = new.max_connections;
        running.max_connections_per_ip = new.max_connections_per_ip;
        running.failure_backoff_after = new.failure_backoff_after;
        running.webhook_allowed = new.webhook_allowed;
    }
}

async fn run(config: Config, reload: Reload) -> Result<(), String> {
    use sluice_data_plane::{
        admin, admit, claims, clock, coalesce, decide, heartbeat, limits, rtmp, sessions, slot, spool, srt, stats,
        sync, task, uplink, webhook,
    };
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    let keyring = Arc::new(sluice_events::Keyring::new(config.sealing_key.clone()));
    let (state, info, source) = sync::boot(&config, keyring.clone()).await;
    let shared = sync::Shared::new(state);
    if let Some(info) = &info {
        shared.digest.seed(info.tables_position, info.digest);
        // A snapshot is a state to decide from, whatever happens to NATS next.
        shared.ready.store(true, Ordering::Release);
    }
    tracing::info!(node = %config.node_id, source, position = shared.position().0, "state booted");
    let tasks = task::Tasks::new();
    sync::follow(&tasks, shared.clone(), config.nats_url.clone(), keyring.clone());
    tasks.spawn(
        "local snapshot",
        sync::snapshot_loop(
            shared.clone(),
            config.state_dir.clone(),
            Duration::from_secs(config.snapshot_every_secs.max(1)),
        ),
    );
    let spool = spool::Spool::open(&config.state_dir.join("spool")).map_err(|e| e.to_string())?;
    let media_stats = stats::MediaStats::new();
    tasks.spawn("stats sampling", stats::sample_loop(media_stats.clone()));
    tasks.spawn(
        "heartbeat",
        heartbeat::run(
            shared.clone(),
            Some(spool.clone()),
            Some(media_stats.clone()),
            config.node_id.clone(),
            config.nats_url.clone(),
            Duration::from_secs(config.heartbeat_secs.max(1)),
        ),
    );
    tracing::info!(spool = %spool.id(), backlog = spool.backlog(), "decision spool open");
    let nats = sync::connect_with(
        async_nats::ConnectOptions::new().retry_on_initial_connect().connection_timeout(Duration::from_secs(2)),
        &config.nats_url,
    )
    .await
    .map_err(|e| format!("NATS client: {e}"))?;
    tasks.spawn("uplink", uplink::publish_loop(spool.clone(), nats.clone(), config.node_id.clone()));
    tasks.spawn("decision marks", uplink::mark_loop(spool.clone(), nats.clone(), config.node_id.clone()));
    let slots = slot::Slots::with_cluster(
        &tasks,
        nats.clone(),
        config.node_id.clone(),
        Duration::from_secs(config.publish_lease_secs.max(1)),
    );
    let claims_path = config.state_dir.join("claims.jsonl");
    let (claims, loaded) = claims::ClaimLog::open(&claims_path, clock::now().0)
        .map_err(|e| format!("cannot open {} (the node's one-time claims): {e}", claims_path.display()))?;
    if !loaded.unreconciled.is_empty() {
        tracing::info!(
            count = loaded.unreconciled.len(),
            "one-time tokens admitted offline before a restart, to claim in KV"
        );
    }
    let guard = Arc::new(decide::Guard::with_claims(nats, claims, loaded));
    tasks.spawn("one-time reconcile", decide::reconcile_loop(guard.clone()));
    let sessions = sessions::Registry::new();
    tasks.spawn("session recheck", sessions::recheck_loop(sessions.clone(), shared.clone(), media_stats.clone()));
    let decider = decide::Decider {
        shared: shared.clone(),
        keyring: keyring.clone(),
        node: config.node_id.clone(),
        spool,
        guard,
        sessions,
        webhooks: Arc::new(webhook::Webhooks::new(
            Duration::from_secs(config.webhook_cache_secs),
            config.webhook_allowed.clone(),
        )),
        stats: media_stats,
        refusals: Arc::new(coalesce::Coalescer::new(Duration::from_millis(config.refusal_window_ms))),
        sls_app: config.sls_app.clone(),
        gate: limits::Gate::new(
            config.max_connections.max(1),
            config.max_connections_per_ip.max(1),
            config.failure_backoff_after,
        ),
    };
    tasks.spawn("held refusals", decide::record_held_refusals(decider.clone()));
    let admission = admit::Admission { decider: decider.clone(), slots };
    let (jobs, job_rx) = tokio::sync::mpsc::channel(4096);
    tasks.spawn("RTMP admissions", rtmp::serve_admissions(admission.clone(), job_rx));
    let rtmps_certificates = match &config.rtmps {
        Some((cert, key)) => Some(Arc::new(arc_swap::ArcSwap::new(
            rtmp::tls::load(cert, key).map_err(|e| format!("RTMPS (SLUICE_RTMPS_CERT, SLUICE_RTMPS_KEY): {e}"))?,
        ))),
        None => None,
    };
    let settings = rtmp::Settings {
        listen: config.rtmp_listen,
        threads: config.rtmp_threads,
        max_message: config.rtmp_max_message_bytes,
        idle_timeout: std::time::Duration::from_secs(config.rtmp_idle_timeout_secs.max(1)),
        merge_write: std::time::Duration::from_millis(config.rtmp_merge_write_ms.min(1000)),
        player_queue: config.rtmp_player_queue,
        player_behind: std::time::Duration::from_secs(config.rtmp_player_behind_secs),
        drain: shared.draining.subscribe(),
        proxy_protocol_from: config.proxy_protocol_from.clone(),
        rtmps: rtmps_certificates.clone().map(|certs| (config.rtmps_listen, certs)),
    };
    rtmp::spawn(settings, jobs, decider.gate.clone()).map_err(|e| {
        format!("cannot serve RTMP on {} (SLUICE_RTMP_LISTEN, SLUICE_RTMPS_LISTEN): {e}", config.rtmp_listen)
    })?;
    if config.rtmps.is_some() {
        tracing::info!(listen = %config.rtmps_listen, "RTMPS serving");
    }
    let srt_settings = srt::Settings {
        listen: config.srt_listen,
        latency: std::time::Duration::from_millis(config.srt_latency_ms),
        engine: config.srt_engine,
        tick: std::time::Duration::from_millis(config.srt_tick_ms),
    };
    srt::spawn(&tasks, srt_settings, admission.clone())
        .await
        .map_err(|e| format!("cannot serve SRT on {} (SLUICE_SRT_LISTEN): {e}", config.srt_listen))?;
    if let Some(secret) = config.hooks_secret.clone() {
        let apis = sluice_data_plane::hooks::Apis {
            srs: config.hooks_srs_api.clone(),
            mediamtx: config.hooks_mediamtx_api.clone(),
        };
        let hooks = sluice_data_plane::hooks::Hooks::new(admission, secret, config.hooks_allowed.clone(), apis);
        sluice_data_plane::hooks::serve(&tasks, config.hooks_listen, hooks)
            .await
            .map_err(|e| format!("cannot serve the hooks on {} (SLUICE_HOOKS_LISTEN): {e}", config.hooks_listen))?;
    }
    let node_secret = Arc::new(node_secret(&config)?);
    let decider = Arc::new(decider);
    let metrics_token = config.metrics_token.clone().map(Arc::new);
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} (SLUICE_METRICS_LISTEN): {e}"))?;
        let app = admin::metrics_only(decider.clone(), metrics_token.clone());
        tasks.spawn("metrics listener", async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the metrics listener stopped");
            }
        });
    }
    if let Some(probe) = config.probe_listen {
        let listener = tokio::net::TcpListener::bind(probe)
            .await
            .map_err(|e| format!("cannot listen on {probe} (SLUICE_PROBE_LISTEN): {e}"))?;
        let app = admin::probes(shared.clone(), decider.clone(), metrics_token.clone());
        tasks.spawn("probe listener", async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the probe listener stopped");
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| format!("cannot listen on {} (SLUICE_ADMIN_LISTEN): {e}", config.admin_listen))?;
    tracing::info!(node = %config.node_id, admin = %config.admin_listen, "sluice-dataplane serving");
    // A SIGHUP (`systemctl reload`) reloads what can change live; it never stops a worker
    // with live sessions, which its default action would.
    let mut running = config.clone();
    let reloaded = decider.clone();
    tasks.spawn("SIGHUP", async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
        while hup.recv().await.is_some() {
            reload.apply(&mut running, &reloaded, rtmps_certificates.as_ref());
        }
    });
    systemd::ready(&tasks);
    let drained = drain_on_signal(shared.clone(), decider.clone(), Duration::from_secs(config.drain_secs));
    axum::serve(listener, admin::router(shared, decider, node_secret, metrics_token))
        .with_graceful_shutdown(drained)
        .await
        .map_err(|e| e.to_string())?;
    if !tasks.shutdown(Duration::from_secs(5)).await {
        tracing::warn!("background tasks still running after 5 s; stopping anyway");
    }
    Ok(())
}

/// The node API's credential: the configured one, or the one kept in the state directory
/// (created at first start, mode 0600), so a media server beside the worker can read it.
fn node_secret(config: &Config) -> Result<SecretString, String> {
    if let Some(s) = &config.node_secret {
        return Ok(s.clone());
    }
    let path = config.state_dir.join("node-secret");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let text = text.trim();
        if text.len() >= 16 {
            return Ok(SecretString::new(text));
        }
        return Err(format!("{} holds fewer than 16 characters; remove it to have a new one made", path.display()));
    }
    use base64::Engine;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    std::fs::create_dir_all(&config.state_dir).map_err(|e| format!("{}: {e}", config.state_dir.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    f.write_all(secret.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    tracing::info!(path = %path.display(), "node API credential created (SLUICE_NODE_SECRET unset)");
    Ok(SecretString::new(secret))
}

/// SIGTERM (or Ctrl-C) drains the worker: `/ready` turns 503 at once, the listeners take no
/// one new (RTMP stops accepting, SRT answers 1503), live sessions go on until they end or
/// `drain` is up, then the decisions still spooled go to NATS (for at most 5 s) and the worker
/// stops. A second signal stops it at once.
async fn drain_on_signal(
    shared: std::sync::Arc<sluice_data_plane::sync::Shared>,
    decider: std::sync::Arc<sluice_data_plane::decide::Decider>,
    drain: std::time::Duration,
) {
    use std::time::Duration;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut signalled = async || match term.as_mut() {
        Some(t) => {
            tokio::select! { _ = t.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        }
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    };
    signalled().await;
    shared.draining.send_replace(true);
    systemd::stopping();
    let live = decider.gate.connections();
    tracing::info!(
        live,
        drain_secs = drain.as_secs(),
        "draining: /ready is 503, no new connections, live sessions go on"
    );
    let deadline = tokio::time::Instant::now() + drain;
    loop {
        let live = decider.gate.connections();
        if live == 0 {
            tracing::info!("drained: no live sessions left");
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::info!(live, "drain time is up; closing the sessions still live");
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = signalled() => {
                tracing::info!(live, "second signal: stopping now");
                return;
            }
        }
    }
    let flush = tokio::time::Instant::now() + Duration::from_secs(5);
    while decider.spool.backlog() > 0 && tokio::time::Instant::now() < flush {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if decider.spool.backlog() > 0 {
        tracing::warn!(
            backlog = decider.spool.backlog(),
            "decisions not yet in NATS stay in the spool for the next start"
        );
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// Every subcommand and every argument says what it is for.
    #[test]
    fn every_subcommand_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} --{}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let here = format!("{path} {}", sub.get_name());
                if sub.get_name() != "help" && sub.get_about().is_none() {
                    missing.push(here.clone());
                }
                walk(sub, &here, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "sluice-dataplane", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:?}");
    }
}
