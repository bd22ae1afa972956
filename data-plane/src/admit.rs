//! One admission step for every media protocol. A protocol turns its wire request into an
//! `AccessRequest`, calls `Admission::admit`, and turns the answer back into its wire form
//! (an RTMP status, an SRT reject code). Everything between is here, once:
//!
//! penalty box → publisher slot (per stream, across protocols and workers) → decide (claims,
//! webhook, spool) → per-IP backoff fed → session registered for kick on change → stream
//! counters started → `Admitted`, or a `Refusal` with its reason.
//!
//! The connection gate (`limits::Gate::admit`) is the one step left to the protocols: it bounds
//! connections at accept, before any request exists.

use std::sync::Arc;
use std::time::Instant;

use sluice_events::decide::public_stream;
use sluice_events::{AccessRequest, Action, DecisionRecord, Reason};

use crate::decide::{Decider, Refuse};
use crate::sessions::Session;
use crate::slot::{Key, Slot, Slots};
use crate::stats::{MediaStats, StreamCounters};

/// The worker's admission step, shared by every media server.
#[derive(Debug, Clone)]
pub struct Admission {
    pub decider: Decider,
    pub slots: Arc<Slots>,
}

/// An admitted publisher or player. Dropping it ends what it holds: the session's
/// registration, and for a publisher its slot and its stream's counters.
#[derive(Debug)]
pub struct Admitted {
    pub record: DecisionRecord,
    /// The stream it was admitted to (the public name, after publish-name mapping).
    pub key: Key,
    /// Fires when the session stops being allowed (kick on change).
    pub session: Session,
    /// For a publisher: the slot and the stream's counters.
    pub publishing: Option<Publishing>,
}

/// What a live publisher holds.
#[derive(Debug)]
pub struct Publishing {
    pub counters: Arc<StreamCounters>,
    stats: Arc<MediaStats>,
    slot: Slot,
}

impl Drop for Publishing {
    fn drop(&mut self) {
        let (app, stream) = self.slot.key();
        self.stats.stream_ended(app.as_str(), stream.as_str());
    }
}

/// Why a request was not admitted.
#[derive(Debug)]
pub enum Refusal {
    /// Decided and recorded as refused, with its reason.
    Refused(Box<DecisionRecord>),
    /// No decision could be made (no state yet, the spool refuses): try later.
    Unavailable(String),
}

impl Refusal {
    /// The refusal's reason, if a decision was made.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            Refusal::Refused(r) => Some(r.final_reason),
            Refusal::Unavailable(_) => None,
        }
    }
}

impl Admission {
    /// `live`: for a play, whether the stream has a publisher this protocol can relay. A play of
    /// a stream that is not live is refused `not_live` before anything is claimed (a one-time
    /// token stays unspent); a refused credential keeps its own reason.
    pub async fn admit(&self, req: AccessRequest, live: bool) -> Result<Admitted, Refusal> {
        let started = Instant::now();
        let answer = self.admit_timed(req, live).await;
        self.decider.stats.decision_latency(started.elapsed());
        answer
    }

    async fn admit_timed(&self, req: AccessRequest, live: bool) -> Result<Admitted, Refusal> {
        let d = &self.decider;
        let ip = req.client_ip;
        let target = format!("{}/{}/{}", req.app, req.stream, req.action.as_str());
        if d.gate.penalized(ip, &target, Instant::now()) {
            return match d.decide_refusing(req, Some(Reason::RateLimited)).await {
                Ok(record) => Err(Refusal::Refused(Box::new(record))),
                Err(e) => Err(Refusal::Unavailable(e.to_string())),
            };
        }
        // The publisher slot is held while the decision is made, so two publishers racing for
        // one stream cannot both be admitted; the loser is refused before any claim, so it
        // never burns a one-time token.
        let slot = match req.action {
            Action::Publish => {
                let key = (req.app.clone(), public_stream(&d.shared.state.load(), &req));
                Some(self.slots.claim(&key).await.ok_or(key))
            }
            Action::Play => None,
        };
        let busy = matches!(slot, Some(Err(_)));
        let scope = match &slot {
            Some(Ok(s)) => Some(s.scope),
            _ => None,
        };
        let admitted_by = req.clone();
        let refuse = Refuse {
            always: busy.then_some(Reason::StreamBusy),
            if_allowed: (req.action == Action::Play && !live).then_some(Reason::NotLive),
        };
        let record = match d.decide_with(req, refuse, scope).await {
            Ok(r) => r,
            Err(e) => return Err(Refusal::Unavailable(e.to_string())),
        };
        if record.allowed {
            d.gate.succeeded(ip, &target);
        } else if !matches!(record.final_reason, Reason::StreamBusy | Reason::RateLimited | Reason::NotLive) {
            d.gate.failed(ip, &target, Instant::now());
        }
        if !record.allowed {
            return Err(Refusal::Refused(Box::new(record)));
        }
        let session = d.sessions.admit(admitted_by, record.decision.method, record.decision.position);
        let (key, publishing) = match slot {
            Some(Ok(slot)) => {
                let key = slot.key().clone();
                let protocol = record.request.protocol.as_str();
                let publisher = Some(record.request.client_ip);
                let counters = d.stats.stream_started(key.0.as_str(), key.1.as_str(), protocol, publisher);
                (key, Some(Publishing { counters, stats: d.stats.clone(), slot }))
            }
            _ => ((record.request.app.clone(), record.decision.stream.clone()), None),
        };
        Ok(Admitted { record, key, session, publishing })
    }
}
