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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
