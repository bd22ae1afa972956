//! `sluice-control`: serve the API, migrate, verify the log's hash chain, replay the log.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice_control_plane::bootstrap::{self, Bootstrap};
use sluice_control_plane::client;
use sluice_control_plane::config::Config;
use sluice_control_plane::{EventStore, anchor, store};
use sluice_events::{AuthState, Position};

#[derive(Parser, Debug)]
#[command(name = "sluice-control", version, about = "Sluice control plane")]
struct Cli {
    /// TOML config file; every setting can also come from SLUICE_<NAME>.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Migrate, bootstrap an empty log, fold it and serve HTTP until SIGTERM/Ctrl-C.
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// Move old ranges of the log out of Postgres: every whole partition that ends at least
    /// `--keep` events before the head is written to a segment file in SLUICE_ARCHIVE_DIR
    /// (checked, with a signed anchor of its last hash), then detached and dropped.
    Archive {
        /// Events to keep in Postgres behind the head, at least.
        #[arg(long, default_value_t = 10_000_000)]
        keep: u64,
    },
    /// Walk the hash chain and check it against the reachable anchors; exit 1 and name the
    /// first bad position if either disagrees. On a terminal it shows its progress.
    VerifyLog {
        /// Resume from the anchor at this position (its signed hash is the starting point):
        /// only the rows after it are walked.
        #[arg(long)]
        from: Option<u64>,
    },
    /// The way out when the relay reports that SLUICE_EVENTS and the log disagree: delete the
    /// stream and the data-plane snapshot from NATS, so the relay publishes the log again from
    /// position 1 (restart workers with an empty state directory afterwards).
    ReseedNats {
        /// Postgres was restored from a backup on purpose: also retire the anchors past the
        /// restored log (NATS KV `sluice-anchors`; SLUICE_ANCHOR_FILE is moved aside), which
        /// would otherwise make `serve` refuse the shorter log as truncated.
        #[arg(long)]
        after_restore: bool,
    },
    /// Rebuild the state from the log and print its position and digest.
    Replay {
        /// Stop after this position.
        #[arg(long, conflicts_with = "read_models")]
        to: Option<u64>,
        /// Also rebuild the read models (the decisions table and explain's checkpoints) from
        /// the whole log.
        #[arg(long)]
        read_models: bool,
    },
    /// Load the settings (file and environment), print the effective configuration with
    /// secrets redacted, and exit (2 when a setting is wrong).
    CheckConfig,
    /// Print a shell completion script: `sluice-control completions bash >
    /// /etc/bash_completion.d/sluice-control` (zsh, fish, elvish and powershell too).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the JSON Schema of every event (the content of schemas/events.schema.json).
    Schema,
    /// Print the OpenAPI document (the content of schemas/openapi.json).
    Openapi,
    /// API keys, through the REST API.
    Keys {
        #[command(flatten)]
        remote: client::Remote,
        #[command(subcommand)]
        cmd: client::Keys,
    },
    /// Apps and their policies, through the REST API.
    Apps {
        #[command(flatten)]
        remote: client::Remote,
        #[command(subcommand)]
        cmd: client::Apps,
    },
    /// Re-run a recorded decision on the state it was made on, through the REST API: the
    /// verdict, the rule that matched, and whether it equals what the worker decided.
    Explain {
        #[command(flatten)]
        remote: client::Remote,
        /// The decision id.
        id: String,
    },
    /// The audit of decisions, through the REST API.
    Decisions {
        #[command(flatten)]
        remote: client::Remote,
        #[command(subcommand)]
        cmd: client::Decisions,
    },
    /// The workers: applied position, lag, digest match, last heartbeat (through the REST API).
    Nodes {
        #[command(flatten)]
        remote: client::Remote,
    },
    /// A page of the log (admin), through the REST API.
    Events {
        #[command(flatten)]
        remote: client::Remote,
        /// Events after this position.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Keep following the log: every new event as one JSON line, until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// Streams and their one-time tokens, through the REST API.
    Streams {
        #[command(flatten)]
        remote: client::Remote,
        #[command(subcommand)]
        cmd: client::Streams,
    },
}

/// Runs an operator command against the REST API (no database settings needed).
fn remote(remote: client::Remote, call: Result<client::Call, String>) -> ExitCode {
    let result = call.and_then(|call| {
        tokio::runtime::Runtime::new()
            .map_err(|e| format!("cannot start the runtime: {e}"))?
            .block_on(client::send(&remote, call))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-control: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `events --follow`, `decisions tail`: the log as it grows.
fn follow(remote: client::Remote, after: Option<u64>, only: Option<&str>) -> ExitCode {
    let result = tokio::runtime::Runtime::new()
        .map_err(|e| format!("cannot start the runtime: {e}"))
        .and_then(|rt| rt.block_on(client::tail(&remote, after, only)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-control: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A line for the person at the terminal, on stdout; with `SLUICE_LOG_FORMAT=json` (a log
/// collector reads the output) the log line alone says it.
fn say(line: &str) {
    if std::env::var("SLUICE_LOG_FORMAT").as_deref() != Ok("json") {
        println!("{line}");
    }
}

/// The log filter's handle: `serve` sets the `log` setting through it, and a SIGHUP a changed one.
static LOG_FILTER: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

fn set_log_filter(filter: &str) {
    if let Some(handle) = LOG_FILTER.get()
        && let Err(e) = handle.reload(tracing_subscriber::EnvFilter::new(filter))
    {
        tracing::error!(error = %e, "cannot set the log filter");
    }
}

fn main() -> ExitCode {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let cli = Cli::parse();
    // Until the settings are read (and for commands other than `serve`): SLUICE_LOG.
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| "info,sqlx=warn,async_nats=warn".into());
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let _ = LOG_FILTER.set(handle);
    let layered = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // `SLUICE_LOG_FORMAT`: `text` (default) or `json` (one JSON object a line on stderr).
    match std::env::var("SLUICE_LOG_FORMAT").as_deref() {
        Err(_) | Ok("text") => layered.with(fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))).init(),
        Ok("json") => layered.with(fmt.json().flatten_event(true).with_current_span(false)).init(),
        Ok(other) => {
            eprintln!("sluice-control: SLUICE_LOG_FORMAT={other:?}: expected text or json");
            return ExitCode::from(2);
        }
    }
    match cli.command {
        Cmd::Schema => {
            print!("{}", sluice_events::schema::events_schema_text());
            return ExitCode::SUCCESS;
        }
        Cmd::Openapi => {
            print!("{}", sluice_control_plane::api::openapi::document_text());
            return ExitCode::SUCCESS;
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "sluice-control", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Cmd::Keys { remote: r, cmd } => return remote(r, client::keys(cmd)),
        Cmd::Apps { remote: r, cmd } => return remote(r, client::apps(cmd)),
        Cmd::Streams { remote: r, cmd } => return remote(r, client::streams(cmd)),
        Cmd::Decisions { remote: r, cmd: client::Decisions::Tail { after } } => {
            return follow(r, after, Some("AccessDecided"));
        }
        Cmd::Decisions { remote: r, cmd } => return remote(r, client::decisions(cmd)),
        Cmd::Events { remote: r, after, follow: true, .. } => return follow(r, Some(after), None),
        Cmd::Nodes { remote: r } => return remote(r, Ok((reqwest::Method::GET, "/v1/nodes".into(), None))),
        Cmd::Events { remote: r, after, limit, follow: false } => {
            return remote(r, Ok((reqwest::Method::GET, format!("/v1/events?after={after}&limit={limit}"), None)));
        }
        Cmd::Explain { remote: r, id } => {
            return remote(r, Ok((reqwest::Method::GET, format!("/v1/decisions/{id}/explain"), None)));
        }
        _ => {}
    }
    let config = match Config::load(cli.config.as_deref(), std::env::vars().collect()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice-control: {e}");
            return ExitCode::from(2);
        }
    };
    if let Cmd::CheckConfig = cli.command {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice-control: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config, cli.config)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice-control: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    command: Cmd,
    config: Config,
    config_file: Option<PathBuf>,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    sluice_control_plane::relay::set_nats_auth(config.nats_auth.clone());
    let served = sluice_control_plane::pg::Served::default();
    let pool = sluice_control_plane::pg::connect_serving(&config.database_url, served.clone()).await?;
    match command {
        Cmd::ReseedNats { after_restore } => {
            let client = sluice_control_plane::relay::connect(&config.nats_url).await?;
            let js = async_nats::jetstream::new(client);
            for (what, result) in [
                (
                    "stream",
                    js.delete_stream(sluice_events::dist::EVENTS_STREAM).await.map(|_| ()).map_err(|e| e.to_string()),
                ),
                (
                    "snapshot manifest bucket",
                    js.delete_key_value(sluice_events::dist::SNAPSHOTS_BUCKET)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                ),
                (
                    "snapshot object store",
                    js.delete_object_store(sluice_events::dist::SNAPSHOT_OBJECTS)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                ),
            ] {
                match result {
                    Ok(()) => println!("deleted the {what}"),
                    Err(e) => println!("the {what}: {e} (nothing to delete?)"),
                }
            }
            if after_restore {
                match js.delete_key_value(sluice_events::dist::ANCHORS_BUCKET).await {
                    Ok(_) => println!("deleted the anchors in NATS KV (the restored log is the one to anchor now)"),
                    Err(e) => println!("the anchors in NATS KV: {e} (nothing to delete?)"),
                }
                if let Some(file) = config.anchor_file.as_deref().filter(|f| f.exists()) {
                    let aside = file.with_extension(format!("before-restore-{}", sluice_control_plane::clock::now().0));
                    std::fs::rename(file, &aside)?;
                    println!("moved {} aside to {}", file.display(), aside.display());
                }
            }
            println!("the relay (a running `serve`) now publishes the log again from position 1");
        }
        Cmd::Archive { keep } => return log::archive(pool, &config, keep).await,
        Cmd::Migrate => {
            store::migrate(&pool).await?;
            println!("migrations applied");
        }
        Cmd::VerifyLog { from } => return log::verify(pool, &config, from).await,
        Cmd::Replay { to, read_models } => {
            let store = EventStore::start(pool);
            store.set_archive_dir(config.archive_dir.clone());
            let limit = to.map(Position).unwrap_or(Position(u64::MAX));
            let mut state = AuthState::new();
            let mut meter = progress::Meter::new("replay", 0, store.head().await?.0.min(limit.0));
            'pages: loop {
                let page = store.read_all(state.position(), 5000).await?;
                if page.is_empty() {
                    break;
                }
                for e in &page {
                    if e.position > limit {
                        break 'pages;
                    }
                    state.apply(e)?;
                }
                meter.at(state.position().0);
            }
            meter.done(state.position().0);
            // `access_digest` covers what a worker holds: `sluice-dataplane rebuild` prints the
            // same one at the same position.
            println!(
                "position {} digest {} access_digest {}",
                state.position(),
                state.digest().to_hex(),
                state.access_digest().to_hex()
            );
            if read_models {
                let key = config.require_sealing_key()?.clone();
                let keyring = std::sync::Arc::new(sluice_events::Keyring::new(key));
                let rows =
                    sluice_control_plane::decisions::rebuild(&store, keyring, config.checkpoint_every_events).await?;
                println!("read models rebuilt: {rows} decisions");
            }
        }
        Cmd::Serve => serve(pool, served, config, config_file).await?,
        Cmd::CheckConfig
        | Cmd::Completions { .. }
        | Cmd::Schema
        | Cmd::Openapi
        | Cmd::Keys { .. }
        | Cmd::Apps { .. }
        | Cmd::Streams { .. }
        | Cmd::Decisions { .. }
        | Cmd::Nodes { .. }
        | Cmd::Events { .. }
        | Cmd::Explain { .. } => {}
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(
    pool: sqlx::PgPool,
    served: sluice_control_plane::pg::Served,
    config: Config,
    config_file: Option<PathBuf>,
) -> Result<(), Box<dyn std::error::Error>> {
    config.require_sealing_key()?;
    set_log_filter(&config.log);
    store::migrate(&pool).await?;
    let store = EventStore::start(pool);
    store.set_archive_dir(config.archive_dir.clone());
    match bootstrap::run(
        &store,
        config.bootstrap_admin_key.as_deref(),
        &config.sls_app,
        sluice_control_plane::clock::now(),
    )
    .await?
    {
        Bootstrap::Created { key_id, generated: Some(secret) } => {
            // Printed once, to stdout only: the log keeps just its SHA-256.
            println!("==> First start: created admin API key {key_id}. Save it now; it is not shown again:");
            println!("    SLUICE_ADMIN_KEY={secret}");
            println!("    (use it as: Authorization: Bearer $SLUICE_ADMIN_KEY)");
            // SRT Live Server's own line, which its deployment scripts read.
            println!("Generated default admin API key: {secret}");
        }
        Bootstrap::Created { key_id, generated: None } => {
            tracing::info!(%key_id, "first start: admin API key created from SLUICE_BOOTSTRAP_ADMIN_KEY");
            say(&format!("==> First start: admin API key {key_id} created from SLUICE_BOOTSTRAP_ADMIN_KEY"));
        }
        Bootstrap::NotNeeded => {}
    }
    let (app, api) = sluice_control_plane::api::build(&config, store).await?;
    tracing::info!(position = %api.writer.projection().position(), "projection caught up (hash chain checked)");
    let projection = api.writer.projection().clone();
    served.set(move || projection.head().map_or((0, [0; 32]), |(position, hash)| (position.0, hash.0)));
    // The chain holds from genesis (the projection checked it); it must also agree with the
    // newest anchors reachable, or a rewritten or truncated log would be served.
    let anchors = log::reachable_anchors(&config).await?;
    match anchor::check(api.writer.store(), &anchors).await {
        Ok(Some(a)) => {
            tracing::info!(position = a.position, "the log agrees with its anchors");
            *api.anchor.lock().unwrap_or_else(|p| p.into_inner()) = Some(a);
        }
        Ok(None) => tracing::info!("no anchor reachable yet (SLUICE_ANCHOR_FILE, NATS KV sluice-anchors)"),
        Err(e) => return Err(format!("refusing to serve this log: {e}").into()),
    }
    match anchor::check_archives(api.writer.store(), &anchor::Signer::new(config.require_sealing_key()?)).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(segments = n, "the archived ranges are as signed"),
        Err(e) => return Err(format!("refusing to serve this log: {e}").into()),
    }
    api.tasks.spawn(
        "log anchors",
        anchor::run(
            api.writer.store().clone(),
            anchor::Settings {
                signer: anchor::Signer::new(config.require_sealing_key()?),
                instance: config.instance_id.clone(),
                nats_url: config.nats_url.clone(),
                file: config.anchor_file.clone(),
                every: std::time::Duration::from_secs(config.anchor_every_secs),
                latest: api.anchor.clone(),
            },
            api.writer.projection().position(),
        ),
    );
    let tasks = api.tasks.clone();
    api.nodes.spawn_listener(&tasks, config.nats_url.clone());
    sluice_control_plane::decisions::spawn(
        &tasks,
        api.writer.store().clone(),
        std::sync::Arc::new(sluice_events::Keyring::new(config.require_sealing_key()?.clone())),
        config.checkpoint_every_events,
    );
    let relay_status = if config.relay {
        let status = sluice_control_plane::relay::spawn(
            &tasks,
            api.writer.store().clone(),
            api.writer.projection().clone(),
            sluice_control_plane::relay::RelaySettings {
                nats_url: config.nats_url.clone(),
                snapshot_every_events: config.snapshot_every_events.max(1),
                snapshot_every: std::time::Duration::from_secs(config.snapshot_every_secs.max(1)),
                retention: sluice_control_plane::relay::Retention {
                    max_age: std::time::Duration::from_secs(config.events_max_age_secs),
                    audit_ttl: (config.events_audit_ttl_secs > 0)
                        .then(|| std::time::Duration::from_secs(config.events_audit_ttl_secs)),
                },
            },
            api.relay_health.clone(),
        );
        sluice_control_plane::ingest::spawn(
            &tasks,
            api.writer.store().clone(),
            api.writer.projection().clone(),
            config.nats_url.clone(),
        );
        Some(status)
    } else {
        None
    };
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} (SLUICE_METRICS_LISTEN): {e}"))?;
        let app = sluice_control_plane::api::metrics_router(api.clone());
        tasks.spawn("metrics listener", async move {
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown()).await {
                tracing::error!(error = %e, "the metrics listener stopped");
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .map_err(|e| format!("cannot listen on {} (SLUICE_API_LISTEN): {e}", config.api_listen))?;
    let scheme = if config.api_tls.is_some() { "https" } else { "http" };
    tracing::info!(listen = %config.api_listen, instance = %config.instance_id, scheme, "sluice-control serving the API");
    let service = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    match &config.api_tls {
        None => {
            reload::sighup(
                &tasks,
                reload::Reload { file: config_file, running: config.clone(), api: api.clone(), tls: None },
            );
            systemd::ready(&tasks);
            say(&format!("sluice-control listening on http://{}", config.api_listen));
            axum::serve(listener, service).with_graceful_shutdown(shutdown()).await?;
        }
        Some((cert, key)) => {
            let tls = tls::load(cert, key).await?;
            reload::sighup(
                &tasks,
                reload::Reload { file: config_file, running: config.clone(), api: api.clone(), tls: Some(tls.clone()) },
            );
            let handle = axum_server::Handle::new();
            let stopper = handle.clone();
            tasks.spawn("API shutdown", async move {
                shutdown().await;
                stopper.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
            });
            let listener = listener.into_std()?;
            systemd::ready(&tasks);
            say(&format!("sluice-control listening on https://{}", config.api_listen));
            axum_server::from_tcp_rustls(listener, tls).handle(handle).serve(service).await?;
        }
    }
    // What the log holds reaches the workers before the relay stops: when this instance
    // relays, it goes on until SLUICE_EVENTS has the log's head (at most RELAY_FLUSH).
    if let Some(mut status) = relay_status {
        flush_relay(api.writer.store(), &mut status).await;
    }
    // The API's last audit records go out as its handles are dropped.
    drop(api);
    if !tasks.shutdown(std::time::Duration::from_secs(5)).await {
        tracing::warn!("background tasks still running after 5 s; stopping anyway");
    }
    tracing::info!("sluice-control stopped");
    Ok(())
}

/// How long a stopping control plane waits for its relay to publish the log's head.
const RELAY_FLUSH: std::time::Duration = std::time::Duration::from_secs(10);

async fn flush_relay(
    store: &EventStore,
    status: &mut tokio::sync::watch::Receiver<sluice_control_plane::relay::RelayStatus>,
) {
    if !status.borrow().leader {
        return;
    }
    let Ok(head) = store.head().await else { return };
    let flushed = tokio::time::timeout(RELAY_FLUSH, status.wait_for(|s| s.relayed >= head || !s.leader)).await;
    match flushed {
        Ok(Ok(s)) if s.relayed >= head => {
            tracing::info!(position = head.0, "relay: the log's head is in SLUICE_EVENTS")
        }
        _ => tracing::warn!(
            position = head.0,
            "relay: stopping before SLUICE_EVENTS has the log's head; the next relay publishes the rest"
        ),
    }
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    systemd::stopping();
}

#[path = "cli/log.rs"]
mod log;

#[path = "cli/tls.rs"]
mod tls;

#[path = "cli/reload.rs"]
mod reload;

#[path = "cli/systemd.rs"]
mod systemd;

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// Every subcommand and every argument says what it is for (`--help`, completions).
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
        walk(&super::Cli::command(), "sluice-control", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:?}");
    }
}

#[path = "cli/progress.rs"]
mod progress;
