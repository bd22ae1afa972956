//! Connecting to Postgres, including a primary with standbys: a libpq multi-host URL
//! (`postgres://u@h1:5432,h2:5432/db?target_session_attrs=read-write`) names every server
//! that may be the primary. The control plane connects to the first one that accepts writes
//! and, while it runs, follows a promotion: when the server it writes to stops answering or
//! turns read-only, it looks through the list again and points the pool at the new primary.
//!
//! sqlx connects to one host; the list, the choice and the watch are here. Parsing is pure and
//! unit-tested; the watch is tested end to end in `tests/tests/standby.rs`.

use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};

use crate::StoreError;

/// How long one probe of one server may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the pool's server is checked when there is more than one to choose from.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Which server of the list the control plane may use (libpq's `target_session_attrs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// The first server that answers (`any`, libpq's default; single-host URLs).
    Any,
    /// The first server that accepts writes (`read-write` or `primary`; the default when the
    /// URL names several servers, since the control plane always writes).
    ReadWrite,
}

/// The servers a URL names, in order, with the rest of the URL applied to each.
#[derive(Clone, Debug)]
pub struct Servers {
    pub hosts: Vec<PgConnectOptions>,
    pub wanted: Wanted,
}

impl Servers {
    /// Parses a `postgres://` URL with one host or a comma-separated list (`h1:p1,h2:p2`, a
    /// missing port is 5432, IPv6 in brackets). `target_session_attrs` takes `any`,
    /// `read-write` or `primary`; anything else is refused by name.
    pub fn parse(url: &str) -> Result<Servers, String> {
        let (scheme, rest) =
            url.split_once("://").ok_or_else(|| "the database URL is not a postgres:// URL".to_owned())?;
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, host_list) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (path, query) = tail.split_once('?').map_or((tail, ""), |(p, q)| (p, q));
        let mut wanted = None;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("target_session_attrs", v)) => {
                    wanted = Some(match v {
                        "any" => Wanted::Any,
                        "read-write" | "primary" => Wanted::ReadWrite,
                        other => {
                            return Err(format!(
                                "target_session_attrs={other} is not supported (the control plane writes: \
                                 read-write, primary or any)"
                            ));
                        }
                    });
                }
                _ => kept.push(pair),
            }
        }
        let hosts: Vec<&str> = if host_list.is_empty() { vec![""] } else { host_list.split(',').collect() };
        if hosts.iter().any(|h| h.is_empty()) && hosts.len() > 1 {
            return Err("the database URL's host list has an empty entry".to_owned());
        }
        let wanted = wanted.unwrap_or(if hosts.len() > 1 { Wanted::ReadWrite } else { Wanted::Any });
        let query = if kept.is_empty() { String::new() } else { format!("?{}", kept.join("&")) };
        let user = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        let hosts = hosts
            .into_iter()
            .map(|host| {
                let one = format!("{scheme}://{user}{host}{path}{query}");
                PgConnectOptions::from_str(&one).map_err(|e| format!("database URL host {host:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Servers { hosts, wanted })
    }

    /// `host:port` of server `i`, for messages (never the password).
    pub fn name(&self, i: usize) -> String {
        let o = &self.hosts[i];
        format!("{}:{}", o.get_host(), o.get_port())
    }

    /// The first server that fits `wanted`, probed in order: its index. The error names every
    /// server and why it did not fit.
    pub async fn choose(&self) -> Result<usize, String> {
        let mut why = Vec::new();
        for i in 0..self.hosts.len() {
            match probe(&self.hosts[i]).await {
                Ok(read_only) if self.wanted == Wanted::ReadWrite && read_only => {
                    why.push(format!("{}: read-only (a standby)", self.name(i)))
                }
                Ok(_) => return Ok(i),
                Err(e) => why.push(format!("{}: {e}", self.name(i))),
            }
        }
        Err(format!("no Postgres server to write to: {}", why.join("; ")))
    }
}

/// Whether the server at `options` is read-only (in recovery, or `default_transaction_read_only`),
/// on a connection of its own.
async fn probe(options: &PgConnectOptions) -> Result<bool, String> {
    let check = async {
        let mut conn = options.connect().await.map_err(|e| e.to_string())?;
        let read_only = read_only(&mut conn).await.map_err(|e| e.to_string())?;
        let _ = conn.close().await;
        Ok(read_only)
    };
    tokio::time::timeout(PROBE_TIMEOUT, check).await.unwrap_or_else(|_| Err("no answer within 2 s".to_owned()))
}

/// What this process has served from the log: the position and chain hash of the last event
/// its projection applied, set once the projection runs. A new primary must hold that very row
/// before the pool moves to it: an asynchronous standby that missed acknowledged writes is
/// refused instead of written to (its positions would collide with what was served).
#[derive(Clone, Default)]
pub struct Served(Arc<OnceLock<Box<HeadFn>>>);

/// Position and chain hash of the last event served (position 0: nothing yet).
type HeadFn = dyn Fn() -> (u64, [u8; 32]) + Send + Sync;

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Served").field(&self.head().map(|(p, _)| p)).finish()
    }
}

impl Served {
    pub fn set(&self, head: impl Fn() -> (u64, [u8; 32]) + Send + Sync + 'static) {
        let _ = self.0.set(Box::new(head));
    }

    fn head(&self) -> Option<(u64, [u8; 32])> {
        self.0.get().map(|f| f()).filter(|(p, _)| *p > 0)
    }
}

/// Connects a pool (short acquire timeout, so an unreachable Postgres is a clear error fast).
/// With several servers in the URL the pool starts on the first writable one and a task follows
/// the primary for as long as the pool is open.
pub async fn connect(database_url: &str) -> Result<PgPool, StoreError> {
    connect_serving(database_url, Served::default()).await
}

/// [`connect`], with what the process serves checked against a new primary before a move.
pub async fn connect_serving(database_url: &str, served: Served) -> Result<PgPool, StoreError> {
    let servers = Servers::parse(database_url).map_err(StoreError::Database)?;
    let options = PgPoolOptions::new().max_connections(16).acquire_timeout(Duration::from_secs(5));
    if servers.hosts.len() == 1 && servers.wanted == Wanted::Any {
        return options.connect_with(servers.hosts[0].clone()).await.map_err(StoreError::from);
    }
    let current = servers.choose().await.map_err(StoreError::Database)?;
    let pool = options.connect_with(servers.hosts[current].clone()).await.map_err(StoreError::from)?;
    tokio::spawn(follow_primary(servers, current, pool.clone(), served));
    Ok(pool)
}

/// Checks the pool's server every second (on a connection of its own, kept while it works);
/// when the server is gone or read-only, chooses again and points the pool's new connections
/// at the choice, once it holds what this process served. Connections to the old server die
/// with it (a promoted standby's old primary is down or fenced), and the pool replaces them.
async fn follow_primary(servers: Servers, mut current: usize, pool: PgPool, served: Served) {
    let mut interval = tokio::time::interval(WATCH_EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch: Option<PgConnection> = None;
    let mut refused: Option<usize> = None;
    loop {
        interval.tick().await;
        if pool.is_closed() {
            return;
        }
        if watch.is_none() {
            watch =
                tokio::time::timeout(PROBE_TIMEOUT, servers.hosts[current].connect()).await.ok().and_then(Result::ok);
        }
        let fits = match watch.as_mut() {
            Some(conn) => match tokio::time::timeout(PROBE_TIMEOUT, read_only(conn)).await {
                Ok(Ok(read_only)) => !(servers.wanted == Wanted::ReadWrite && read_only),
                _ => false,
            },
            None => false,
        };
        if fits {
            continue;
        }
        watch = None;
        let next = match servers.choose().await {
            Ok(next) if next != current => next,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!("{e}");
                continue;
            }
        };
        if let Some((position, hash)) = served.head() {
            let holds = tokio::time::timeout(PROBE_TIMEOUT, holds_row(&servers.hosts[next], position, hash)).await;
            if !matches!(holds, Ok(Ok(true))) {
                if refused != Some(next) {
                    tracing::error!(
                        server = %servers.name(next),
                        position,
                        "the new Postgres primary lacks what this control plane served (an asynchronous standby \
                         that missed acknowledged writes?): not writing to it; see docs/operations.md, \
                         \"Postgres with a standby\""
                    );
                    refused = Some(next);
                }
                continue;
            }
        }
        tracing::warn!(
            from = %servers.name(current),
            to = %servers.name(next),
            "the Postgres primary moved; new connections go to the new one"
        );
        pool.set_connect_options(servers.hosts[next].clone());
        (current, refused) = (next, None);
    }
}

async fn read_only(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'")
        .fetch_one(conn)
        .await
}

/// Whether the server's log has the row at `position` with this chain hash.
async fn holds_row(options: &PgConnectOptions, position: u64, hash: [u8; 32]) -> Result<bool, sqlx::Error> {
    let mut conn = options.connect().await?;
    let stored: Option<Vec<u8>> = sqlx::query_scalar("SELECT hash FROM events WHERE position = $1")
        .bind(position as i64)
        .fetch_optional(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(stored.as_deref() == Some(hash.as_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_host_is_any_and_keeps_its_parameters() {
        let s = Servers::parse("postgres://u:pw@db.example:6543/sluice?sslmode=disable").unwrap();
        assert_eq!(s.wanted, Wanted::Any);
        assert_eq!(s.name(0), "db.example:6543");
        assert_eq!(s.hosts[0].get_database(), Some("sluice"));
        assert_eq!(s.hosts[0].get_username(), "u");
    }

    #[test]
    fn a_host_list_wants_the_primary_and_fills_in_ports() {
        let s =
            Servers::parse("postgresql://u@a:5433,b,[::1]:5434/db?target_session_attrs=read-write&application_name=x")
                .unwrap();
        assert_eq!(s.wanted, Wanted::ReadWrite);
        let names: Vec<String> = (0..s.hosts.len()).map(|i| s.name(i)).collect();
        assert_eq!(names, ["a:5433", "b:5432", "[::1]:5434"]);
        assert!(s.hosts.iter().all(|h| h.get_database() == Some("db")));
        assert_eq!(Servers::parse("postgres://a,b/db").unwrap().wanted, Wanted::ReadWrite);
        assert_eq!(Servers::parse("postgres://a,b/db?target_session_attrs=any").unwrap().wanted, Wanted::Any);
        assert_eq!(Servers::parse("postgres://a/db?target_session_attrs=primary").unwrap().wanted, Wanted::ReadWrite);
    }

    #[test]
    fn unsupported_attributes_and_empty_hosts_are_refused_by_name() {
        let e = Servers::parse("postgres://a,b/db?target_session_attrs=standby").unwrap_err();
        assert!(e.contains("target_session_attrs=standby"), "{e}");
        let e = Servers::parse("postgres://a,,b/db").unwrap_err();
        assert!(e.contains("empty entry"), "{e}");
        assert!(Servers::parse("a,b/db").is_err());
    }
}
