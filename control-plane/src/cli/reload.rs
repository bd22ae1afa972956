//! SIGHUP: the settings read again; what can change live does (`config::RELOADABLE`: the log
//! filter, the API's rate limits, the webhook allow-list, the API's TLS certificate from its
//! files); changed settings that need a restart are named in one line. A SIGHUP never stops
//! the control plane (its default action would), and settings that do not read change nothing.

use axum_server::tls_rustls::RustlsConfig;
use sluice_control_plane::api::ApiState;
use sluice_control_plane::config::{Config, RELOADABLE};
use std::path::PathBuf;

pub struct Reload {
    pub file: Option<PathBuf>,
    pub running: Config,
    pub api: ApiState,
    pub tls: Option<RustlsConfig>,
}

pub fn sighup(tasks: &sluice_control_plane::task::Tasks, mut reload: Reload) {
    tasks.spawn("SIGHUP", async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
        while hup.recv().await.is_some() {
            reload.apply().await;
        }
    });
}

impl Reload {
    async fn apply(&mut self) {
        let new = match Config::load(self.file.as_deref(), std::env::vars().collect()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: the settings do not read; nothing changed");
                return;
            }
        };
        let changed = sluice_events::settings::Sources::changed(&self.running.effective, &new.effective);
        let (live, restart): (Vec<String>, Vec<String>) =
            changed.into_iter().partition(|k| RELOADABLE.contains(&k.as_str()));
        super::set_log_filter(&new.log);
        self.api.limiters.set_rates(new.api.rate_api, new.api.rate_stats, new.api.rate_config);
        self.api.webhook_allowed.store(std::sync::Arc::new(new.api.webhook_allowed.clone()));
        if let (Some(tls), Some((cert, key))) = (&self.tls, &new.api_tls) {
            match tls.reload_from_pem_file(cert, key).await {
                Ok(()) => tracing::info!(cert = %cert.display(), "SIGHUP: the API's TLS certificate reloaded"),
                Err(e) => tracing::error!(
                    cert = %cert.display(), error = %e,
                    "SIGHUP: the API's TLS certificate could not be reloaded; the previous one stays"
                ),
            }
        }
        if !restart.is_empty() {
            tracing::warn!(settings = %restart.join(", "), "SIGHUP: these changed settings need a restart; kept as they were");
        }
        tracing::info!(reloaded = %live.join(", "), "SIGHUP: settings reloaded");
        // What was applied is now the running value; what needs a restart is still the old.
        for key in &live {
            match new.effective.get(key) {
                Some(v) => self.running.effective.insert(key.clone(), v.clone()),
                None => self.running.effective.remove(key),
            };
        }
    }
}
