//! `sluice-dataplane`: the worker binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice_data_plane::config::Config;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run => {
            let config = match Config::load(cli.config.as_deref(), std::env::vars().collect()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("sluice-dataplane: {e}");
                    return ExitCode::from(2);
                }
            };
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn")),
                )
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("sluice-dataplane: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluice-dataplane: {e}");
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

async fn run(config: Config) -> Result<(), String> {
    use sluice_data_plane::{admin, heartbeat, sync};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    let keyring = Arc::new(sluice_events::Keyring::new(config.sealing_key.clone()));
    let (state, info, source) = sync::boot(&config, keyring).await;
    let shared = sync::Shared::new(state);
    if let Some(info) = &info {
        shared.digest.seed(info.tables_position, info.digest);
        // A snapshot is a state to decide from, whatever happens to NATS next.
        shared.ready.store(true, Ordering::Release);
    }
    tracing::info!(node = %config.node_id, source, position = shared.position().0, "state booted");
    tokio::spawn(sync::follow(shared.clone(), config.nats_url.clone()));
    tokio::spawn(heartbeat::run(
        shared.clone(),
        config.node_id.clone(),
        config.nats_url.clone(),
        Duration::from_secs(config.heartbeat_secs.max(1)),
    ));
    tokio::spawn(sync::snapshot_loop(
        shared.clone(),
        config.state_dir.clone(),
        Duration::from_secs(config.snapshot_every_secs.max(1)),
    ));
    let listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| format!("cannot listen on {} (SLUICE_ADMIN_LISTEN): {e}", config.admin_listen))?;
    println!("sluice-dataplane {} admin on http://{}", config.node_id, config.admin_listen);
    axum::serve(listener, admin::router(shared)).with_graceful_shutdown(shutdown()).await.map_err(|e| e.to_string())
}

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term => {} }
}
