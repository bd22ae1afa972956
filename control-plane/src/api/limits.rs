//! Per client IP, per endpoint class rate limits (SRT Live Server's classes: `api`, `stats`,
//! `config`, in requests per minute) with `governor`, and the API's IP allow-list
//! (Ant Media's `remoteAllowedCIDR`, loopback only by default).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::error::ApiError;
use super::{ApiState, ClientIp};

/// SRT Live Server's endpoint classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Streams, tokens, subscribers, reads.
    Api,
    /// Live statistics.
    Stats,
    /// Keys, policies, secrets: configuration.
    Config,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Api, Class::Stats, Class::Config];

    /// Its name in the document and in settings (`SLUICE_RATE_LIMIT_<NAME>`).
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Api => "api",
            Class::Stats => "stats",
            Class::Config => "config",
        }
    }
}

/// The three classes' limiters, replaced whole when a reload (SIGHUP) changes the rates (the
/// clients' counts start over).
#[derive(Debug)]
pub struct Limiters {
    classes: arc_swap::ArcSwap<Classes>,
    clock: DefaultClock,
}

#[derive(Debug)]
struct Classes {
    api: DefaultKeyedRateLimiter<IpAddr>,
    stats: DefaultKeyedRateLimiter<IpAddr>,
    config: DefaultKeyedRateLimiter<IpAddr>,
}

impl Classes {
    fn new(api: u32, stats: u32, config: u32) -> Classes {
        Classes {
            api: RateLimiter::keyed(per_minute(api)),
            stats: RateLimiter::keyed(per_minute(stats)),
            config: RateLimiter::keyed(per_minute(config)),
        }
    }
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN))
}

impl Limiters {
    pub fn new(api: u32, stats: u32, config: u32) -> Arc<Limiters> {
        Arc::new(Limiters {
            classes: arc_swap::ArcSwap::from_pointee(Classes::new(api, stats, config)),
            clock: DefaultClock::default(),
        })
    }

    /// New rates (requests per minute per client address), from now on.
    pub fn set_rates(&self, api: u32, stats: u32, config: u32) {
        self.classes.store(Arc::new(Classes::new(api, stats, config)));
    }

    /// `Ok` when the request may go on; otherwise the seconds to wait.
    pub fn check(&self, class: Class, ip: IpAddr) -> Result<(), u64> {
        let classes = self.classes.load();
        let limiter = match class {
            Class::Api => &classes.api,
            Class::Stats => &classes.stats,
            Class::Config => &classes.config,
        };
        limiter.check_key(&ip).map_err(|not_until| not_until.wait_time_from(self.clock.now()).as_secs() + 1)
    }

    /// Forgets idle clients now and then so the tables stay small.
    pub fn spawn_housekeeping(self: &Arc<Self>, tasks: &crate::task::Tasks) {
        let me = Arc::downgrade(self);
        tasks.spawn("rate-limit housekeeping", async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                let Some(l) = me.upgrade() else { return };
                let c = l.classes.load();
                c.api.retain_recent();
                c.stats.retain_recent();
                c.config.retain_recent();
            }
        });
    }
}

/// Middleware: the API's IP allow-list.
pub async fn allow_list(State(api): State<ApiState>, req: Request, next: Next) -> Response {
    let ip = ClientIp::of_request(&req);
    if sluice_events::ids::cidrs_allow(&api.settings.remote_allowed_cidrs, ip) {
        next.run(req).await
    } else {
        ApiError::Forbidden("this address may not use the API (remote_allowed_cidrs)").into_response()
    }
}
