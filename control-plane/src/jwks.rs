//! Stream JWTs from a JWKS (issue #17): an app whose policy names `jwt.jwks_url` has its key
//! set fetched here, at start, when the URL changes, and every `SLUICE_JWKS_REFRESH_SECS`; a
//! set that changed is recorded as `JwksRefreshed` (public members only: `check_jwks` refuses
//! private or symmetric material), so every worker verifies RS256/ES256 stream JWTs offline
//! from its own state. A failed fetch keeps the last keys and says so: the app's view in
//! `/v1/apps/{app}` (`jwks`), a warning, and `sluice_jwks_refresh_failures_total`.
//!
//! The URL is an admin's choice the control plane fetches, so it passes the same allow-list as
//! a webhook (`SLUICE_WEBHOOK_ALLOWED`): an internal address is refused unless listed, and the
//! fetch connects only to the address checked.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::Serialize;
use sluice_events::webhook::{WebhookAllowList, url_host_port};
use sluice_events::{AppName, Command};

use crate::commands::{Origin, Writer};

/// What the last fetch of an app's JWKS found.
#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct JwksView {
    pub url: String,
    /// Usable keys in the set the workers hold (0 until a fetch succeeded).
    pub keys: usize,
    /// When the set was last fetched successfully (ms since the epoch).
    pub fetched_at: Option<i64>,
    /// Why the last fetch failed, if it did (the previous keys are kept).
    pub last_error: Option<String>,
}

/// Every app's JWKS fetch state, and the failures counted.
#[derive(Debug, Default)]
pub struct JwksStatus {
    apps: Mutex<HashMap<AppName, (JwksView, Option<Instant>)>>,
    pub failures_total: AtomicU64,
}

impl JwksStatus {
    pub fn view(&self, app: &AppName) -> Option<JwksView> {
        self.apps.lock().unwrap_or_else(|p| p.into_inner()).get(app).map(|(v, _)| v.clone())
    }
}

/// Fetches `url`, checking every address it resolves to against `allow` and connecting only
/// to the one checked.
async fn fetch(url: &str, allow: &WebhookAllowList) -> Result<serde_json::Value, String> {
    let (host, port) = url_host_port(url).ok_or("expected http(s)://host[:port]/…")?;
    let addresses = crate::outbound::resolve_allowed(&host, port, allow).await.map_err(|e| format!("{host} {e}"))?;
    let first = addresses[0];
    let client = reqwest::Client::builder()
        .resolve(&host, first)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let response = client.get(url).send().await.map_err(|e| format!("cannot fetch: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("answered {}", response.status()));
    }
    let bytes = response.bytes().await.map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() > 256 * 1024 {
        return Err("larger than 256 KiB".into());
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("not a JWK set: {e}"))
}

/// Only the public members of each key (a JWKS endpoint that also serves private members
/// must not put them in the log).
fn public_only(set: &serde_json::Value) -> serde_json::Value {
    const PUBLIC: [&str; 10] = ["kty", "kid", "alg", "use", "key_ops", "n", "e", "crv", "x", "y"];
    let keys: Vec<serde_json::Value> = set
        .get("keys")
        .and_then(|k| k.as_array())
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k.as_object())
                .filter(|k| k.get("kty").and_then(|t| t.as_str()) != Some("oct"))
                .map(|k| {
                    serde_json::Value::Object(
                        k.iter()
                            .filter(|(m, _)| PUBLIC.contains(&m.as_str()))
                            .map(|(m, v)| (m.clone(), v.clone()))
                            .collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    serde_json::json!({ "keys": keys })
}

/// Apps whose workers met a JWT with a `kid` their key set lacks since `after` (decisions
/// refused `jwt_key_unknown`, from the decisions read model), and the last position seen.
async fn unknown_kids(pool: &sqlx::PgPool, after: i64) -> Result<(Vec<String>, i64), sqlx::Error> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT position, app FROM decisions WHERE reason = 'jwt_key_unknown' AND position > $1 ORDER BY position LIMIT 1000",
    )
    .bind(after)
    .fetch_all(pool)
    .await?;
    let last = rows.last().map_or(after, |(p, _)| *p);
    Ok((rows.into_iter().map(|(_, app)| app).collect(), last))
}

/// Keeps every app's JWKS fresh until the process ends: at start, when the URL changes, every
/// `every`, and early (at most once a minute) when a worker refused a JWT for an unknown `kid`
/// (a key rotated in before the next period).
/// `kid_refetch`: the shortest time between two fetches an unknown `kid` may cause.
pub async fn run(
    writer: Writer,
    status: std::sync::Arc<JwksStatus>,
    every: Duration,
    kid_refetch: Duration,
    allow: std::sync::Arc<arc_swap::ArcSwap<WebhookAllowList>>,
) {
    let pool = writer.store().pool().clone();
    let mut seen: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM decisions").fetch_one(&pool).await.unwrap_or(0);
    loop {
        let mut early: Vec<String> = Vec::new();
        match unknown_kids(&pool, seen).await {
            Ok((apps, last)) => (early, seen) = (apps, last),
            Err(e) => tracing::debug!(error = %e, "JWKS: cannot read the decisions read model"),
        }
        let state = writer.projection().current();
        let wanted: Vec<(AppName, String)> = state
            .apps
            .iter()
            .filter_map(|(name, app)| app.policy.jwt.jwks_url.clone().map(|u| (name.clone(), u)))
            .collect();
        for (app, url) in wanted {
            let due = {
                let apps = status.apps.lock().unwrap_or_else(|p| p.into_inner());
                let unknown_kid = early.iter().any(|a| a == app.as_str());
                match apps.get(&app) {
                    Some((view, Some(at))) => {
                        view.url != url || at.elapsed() >= every || (unknown_kid && at.elapsed() >= kid_refetch)
                    }
                    _ => true,
                }
            };
            if !due {
                continue;
            }
            let result = fetch(&url, &allow.load_full()).await;
            let mut view = status
                .view(&app)
                .filter(|v| v.url == url)
                .unwrap_or_else(|| JwksView { url: url.clone(), ..JwksView::default() });
            match result {
                Ok(set) => {
                    let jwks = public_only(&set);
                    let origin = Origin { actor: "jwks-refresh".into(), ..Origin::default() };
                    let command = |_: &sluice_events::AuthState| {
                        Ok(Command::RefreshJwks { app: app.clone(), jwks: jwks.clone() })
                    };
                    match writer.run(&origin, crate::clock::now(), command).await {
                        Ok(_) => {
                            view.keys = writer
                                .projection()
                                .current()
                                .apps
                                .get(&app)
                                .and_then(|a| a.jwks.as_ref())
                                .map_or(0, sluice_events::state::Jwks::usable);
                            view.fetched_at = Some(crate::clock::now().0);
                            view.last_error = None;
                        }
                        Err(e) => view.last_error = Some(format!("not recorded: {e}")),
                    }
                }
                Err(e) => {
                    status.failures_total.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%app, error = %e, "the app's JWKS could not be fetched; keeping its previous keys");
                    view.last_error = Some(e);
                }
            }
            status.apps.lock().unwrap_or_else(|p| p.into_inner()).insert(app, (view, Some(Instant::now())));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_members_reach_the_log() {
        let set = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "a", "n": "x", "e": "AQAB", "d": "secret", "p": "q"},
            {"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "b", "crv": "P-256", "x": "1", "y": "2", "d": "secret"}
        ]});
        let public = public_only(&set);
        assert_eq!(
            public,
            serde_json::json!({"keys": [
                {"kty": "RSA", "kid": "a", "n": "x", "e": "AQAB"},
                {"kty": "EC", "kid": "b", "crv": "P-256", "x": "1", "y": "2"}
            ]})
        );
    }
}
