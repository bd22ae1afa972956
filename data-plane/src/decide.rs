//! The worker's decision shell: `sluice_events::decide` on the current state (an arc-swap
//! load: no lock, no network), then what the pure verdict asks of the world: claim a one-time
//! token or a TOTP step cluster-wide (KV `create` on `sluice-consumed`), seal the credential,
//! and write the record to the spool before anybody acts on it.
//!
//! One-time tokens while NATS is unreachable follow the app's `offline_one_time` policy:
//! `deny` (the default) refuses with `one_time_unavailable`; `allow_local` admits the token
//! once on this node and claims it in KV when NATS returns (a token also used elsewhere in
//! the meantime is logged as such). A TOTP step falls back to this node's memory (codes live
//! for one step either side; the state learns the step through the log).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use rand::RngCore as _;
use sluice_events::decision::{RecordedRequest, SlotScope};
use sluice_events::{
    AccessRequest, AuthState, Decision, DecisionRecord, Effect, Keyring, NodeId, OfflineOneTime, Outcome, Reason, dist,
};
use tokio::sync::OnceCell;
use uuid::Uuid;

use crate::spool::{Spool, SpoolError};
use crate::sync::Shared;

/// How long a claim in KV may take before the worker treats NATS as unreachable.
const CLAIM_TIMEOUT: Duration = Duration::from_millis(500);
/// Local memory of used TOTP steps (a code is valid for ±1 step; an hour is plenty).
const STEP_MEMORY: Duration = Duration::from_secs(3600);

/// What claiming a credential in the cluster found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This decision is the first use.
    Claimed,
    /// Used before (here or on another worker).
    Used,
    /// NATS did not answer in time.
    Unavailable,
}

/// The cluster-wide "used once" guard, with this node's memory in front of it.
#[derive(Debug)]
pub struct Guard {
    client: async_nats::Client,
    kv: OnceCell<kv::Store>,
    /// Keys this node used, and when.
    local: Mutex<HashMap<String, Instant>>,
    /// Tokens admitted while NATS was unreachable, to claim once it is back.
    unreconciled: Mutex<Vec<(String, Uuid)>>,
    /// This node's claims on disk (none in unit tests): they survive a restart.
    claims: Option<Arc<crate::claims::ClaimLog>>,
    /// Tokens admitted here offline that another worker had also admitted
    /// (`sluice_one_time_conflicts_total`).
    pub conflicts: std::sync::atomic::AtomicU64,
}

impl Guard {
    pub fn new(client: async_nats::Client) -> Guard {
        Guard {
            client,
            kv: OnceCell::new(),
            local: Mutex::default(),
            unreconciled: Mutex::default(),
            claims: None,
            conflicts: Default::default(),
        }
    }

    /// A guard that keeps its claims in `log`, starting from what it held.
    pub fn with_claims(
        client: async_nats::Client,
        log: crate::claims::ClaimLog,
        loaded: crate::claims::Loaded,
    ) -> Guard {
        let now = Instant::now();
        let local = loaded.claimed.into_iter().map(|k| (k, now)).collect();
        Guard {
            local: Mutex::new(local),
            unreconciled: Mutex::new(loaded.unreconciled),
            claims: Some(Arc::new(log)),
            ..Guard::new(client)
        }
    }

    /// Writes a claim to disk (write and fsync off the async threads); the answer, when
    /// awaited, says whether it is durable.
    fn persist(&self, key: &str, decision: Uuid, local: bool) -> tokio::task::JoinHandle<bool> {
        let (log, key) = (self.claims.clone(), key.to_owned());
        tokio::task::spawn_blocking(move || {
            let Some(log) = log else { return true };
            match log.claimed(&key, decision, crate::clock::now().0, local) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, path = %log.path().display(), "a claim could not be written to disk");
                    false
                }
            }
        })
    }

    fn persist_reconciled(&self, key: &str) {
        if let Some(log) = &self.claims
            && let Err(e) = log.reconciled(key)
        {
            tracing::warn!(error = %e, path = %log.path().display(), "a reconciled claim could not be noted on disk");
        }
    }

    async fn store(&self) -> Option<&kv::Store> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return None;
        }
        let js = jetstream::new(self.client.clone());
        let init = async {
            let config = kv::Config {
                bucket: dist::CONSUMED_BUCKET.to_owned(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: crate::sync::replicas(),
                ..Default::default()
            };
            let kv = match js.get_key_value(dist::CONSUMED_BUCKET).await {
                Ok(kv) => kv,
                Err(_) => js.create_key_value(config).await.map_err(|e| e.to_string())?,
            };
            crate::sync::check_replicas(&js, &dist::kv_stream(dist::CONSUMED_BUCKET)).await?;
            Ok::<_, String>(kv)
        };
        match tokio::time::timeout(CLAIM_TIMEOUT, self.kv.get_or_try_init(|| init)).await {
            Ok(Ok(kv)) => Some(kv),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, bucket = dist::CONSUMED_BUCKET, "cannot open the consumed-credentials bucket");
                None
            }
            Err(_) => None,
        }
    }

    fn used_here(&self, key: &str) -> bool {
        self.local.lock().unwrap_or_else(|p| p.into_inner()).contains_key(key)
    }

    /// Marks `key` used here; false if it already was.
    fn take(&self, key: &str) -> bool {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        if local.contains_key(key) {
            return false;
        }
        if local.len() > 100_000 {
            local.retain(|k, at| k.starts_with("t.") || at.elapsed() < STEP_MEMORY);
        }
        local.insert(key.to_owned(), Instant::now());
        true
    }

    fn forget(&self, key: &str) {
        self.local.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    fn remember(&self, key: &str) {
        self.take(key);
    }

    /// Claims `key` for `decision`: first use wins, across every worker.
    pub async fn claim(&self, key: &str, decision: Uuid) -> Claim {
        if self.used_here(key) {
            return Claim::Used;
        }
        let Some(kv) = self.store().await else { return Claim::Unavailable };
        let value = bytes::Bytes::from(decision.to_string());
        // The create runs on its own: if it is slow, this decision gives up on it (and refuses),
        // but the server may still apply it; it is then taken back, so a claim that did not
        // admit anybody burns nothing.
        let mut attempt = tokio::spawn({
            let (kv, key) = (kv.clone(), key.to_owned());
            async move { kv.create(&key, value).await }
        });
        match tokio::time::timeout(CLAIM_TIMEOUT, &mut attempt).await {
            Ok(Ok(Ok(_))) => {
                self.remember(key);
                // KV holds it: the copy on disk (for a restart while NATS is away) is written in
                // the background, off the decision's path.
                drop(self.persist(key, decision, false));
                Claim::Claimed
            }
            Ok(Ok(Err(e))) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                self.remember(key);
                Claim::Used
            }
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "claim in {} failed", dist::CONSUMED_BUCKET);
                Claim::Unavailable
            }
            Ok(Err(_)) => Claim::Unavailable,
            Err(_) => {
                let (kv, key) = (kv.clone(), key.to_owned());
                tokio::spawn(async move {
                    if let Ok(Ok(revision)) = attempt.await {
                        match kv.delete_expect_revision(&key, Some(revision)).await {
                            Ok(()) => tracing::info!("a claim that timed out landed late; taken back"),
                            Err(e) => {
                                tracing::warn!(error = %e, "a claim that timed out landed late and could not be taken back")
                            }
                        }
                    }
                });
                Claim::Unavailable
            }
        }
    }

    /// Admits `key` on this node only (NATS unreachable, the app allows it). The claim is on
    /// disk before it answers; a token claim that cannot be written is `Unavailable`.
    pub async fn claim_locally(&self, key: &str, decision: Uuid) -> Claim {
        // Taken in memory at once (check and insert under one lock), so a concurrent attempt on
        // this node is `Used` even while the disk write is under way.
        if !self.take(key) {
            return Claim::Used;
        }
        let token = key.starts_with("t.");
        let durable = self.persist(key, decision, token).await.unwrap_or(false);
        if !durable && token {
            self.forget(key);
            return Claim::Unavailable;
        }
        if token {
            self.unreconciled.lock().unwrap_or_else(|p| p.into_inner()).push((key.to_owned(), decision));
        }
        Claim::Claimed
    }

    /// Claims in KV what was admitted locally during an outage; keeps what still cannot be.
    pub async fn reconcile(&self) {
        let todo = std::mem::take(&mut *self.unreconciled.lock().unwrap_or_else(|p| p.into_inner()));
        if todo.is_empty() {
            return;
        }
        let mut left = Vec::new();
        for (key, decision) in todo {
            let Some(kv) = self.store().await else {
                left.push((key, decision));
                continue;
            };
            match tokio::time::timeout(CLAIM_TIMEOUT, kv.create(&key, bytes::Bytes::from(decision.to_string()))).await {
                Ok(Ok(_)) => {
                    self.persist_reconciled(&key);
                    tracing::info!(%decision, "one-time token used during the NATS outage is now claimed cluster-wide")
                }
                Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    // Ours if an earlier attempt landed; otherwise a double use in a partition.
                    let holder = kv.get(&key).await.ok().flatten();
                    if holder.as_deref() != Some(decision.to_string().as_bytes()) {
                        self.conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(%decision, "one-time token admitted locally during the NATS outage had also been used elsewhere (offline_one_time = allow_local): a conflict, flagged in /v1/decisions")
                    }
                    self.persist_reconciled(&key);
                }
                _ => left.push((key, decision)),
            }
        }
        self.unreconciled.lock().unwrap_or_else(|p| p.into_inner()).extend(left);
    }
}

/// Decides, claims and records.
#[derive(Debug, Clone)]
pub struct Decider {
    pub shared: Arc<Shared>,
    pub keyring: Arc<Keyring>,
    pub node: NodeId,
    pub spool: Spool,
    pub guard: Arc<Guard>,
    /// Where the media servers register what they admit (kick on change).
    pub sessions: Arc<crate::sessions::Registry>,
    pub webhooks: Arc<crate::webhook::Webhooks>,
    pub stats: Arc<crate::stats::MediaStats>,
    /// The media ports' connection limits and per-IP backoff.
    pub gate: Arc<crate::limits::Gate>,
    /// Identical refusals within a window recorded as one (`coalesce`).
    pub refusals: Arc<crate::coalesce::Coalescer>,
    /// SRT Live Server's app: where a bare SRT streamid (`publisher_id`) is (`SLUICE_SLS_APP`).
    pub sls_app: sluice_events::AppName,
}

/// What the shell concluded of a decision.
struct Verdict {
    allowed: bool,
    final_reason: Reason,
    webhook: Option<sluice_events::decision::WebhookAnswer>,
    slot: Option<SlotScope>,
}

/// Refusals the media server adds to a decision (see `Decider::decide_with`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Refuse {
    pub always: Option<Reason>,
    pub if_allowed: Option<Reason>,
}

#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// The decision could not be recorded: the worker refuses rather than act unrecorded.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("the worker has no state to decide from yet")]
    NotReady,
}

impl Decider {
    /// The verdict on `req`, durable in the spool before it is returned.
    pub async fn decide(&self, req: AccessRequest) -> Result<DecisionRecord, DecideError> {
        self.decide_refusing(req, None).await
    }

    /// As `decide`, but refused with `refuse` whatever the verdict (the media server knows a
    /// reason the state does not, such as a publisher already live). Nothing is claimed, so a
    /// refused attempt never burns a one-time token; the decision is recorded all the same.
    pub async fn decide_refusing(
        &self,
        req: AccessRequest,
        refuse: Option<Reason>,
    ) -> Result<DecisionRecord, DecideError> {
        self.decide_with(req, Refuse { always: refuse, if_allowed: None }, None).await
    }

    /// The decision with the media server's own refusals: `always` whatever the verdict (a
    /// busy stream), `if_allowed` only where the credential passed (a stream not live: a
    /// refused credential keeps its own reason). Neither claims anything. `slot`: what held an
    /// allowed publisher's slot, recorded with it.
    pub async fn decide_with(
        &self,
        req: AccessRequest,
        refuse: Refuse,
        slot: Option<SlotScope>,
    ) -> Result<DecisionRecord, DecideError> {
        if !self.shared.is_ready() {
            return Err(DecideError::NotReady);
        }
        let now = crate::clock::now();
        let state = self.shared.state.load_full();
        let decision = sluice_events::decide(&state, &req, now);
        let (allowed, final_reason, webhook) = match (&decision.outcome, refuse) {
            (_, Refuse { always: Some(reason), .. }) => (false, reason, None),
            (Outcome::Allow | Outcome::AskWebhook { .. }, Refuse { if_allowed: Some(reason), .. }) => {
                (false, reason, None)
            }
            (Outcome::Allow, _) => match self.claim_effects(&state, &req, &decision).await {
                None => (true, decision.reason, None),
                Some(refusal) => (false, refusal, None),
            },
            (Outcome::Deny, _) => (false, decision.reason, None),
            (Outcome::AskWebhook { url, timeout_ms }, _) => {
                let secret = state.apps.get(&req.app).and_then(|a| a.secret_bytes(sluice_events::SecretKind::Webhook));
                let timeout = Duration::from_millis(u64::from(*timeout_ms));
                let answer = self.webhooks.ask(url, timeout, secret, &req, &decision.stream, now.0).await;
                let reason = match answer.status {
                    Some(200) => Reason::Allowed,
                    Some(403) => Reason::WebhookDenied,
                    _ => Reason::WebhookFailed,
                };
                (answer.allowed, reason, Some(answer))
            }
        };
        let verdict = Verdict { allowed, final_reason, webhook, slot: if allowed { slot } else { None } };
        self.record(&req, decision, verdict, now).await
    }

    /// Records a request that could not be read (`Reason::Malformed`, under the app and stream
    /// `-`): a misconfigured client shows in the audit (coalesced like any refusal) and in
    /// `sluice_decisions_total{reason="malformed"}`.
    pub async fn record_malformed(
        &self,
        action: sluice_events::Action,
        protocol: sluice_events::Protocol,
        client_ip: std::net::IpAddr,
    ) -> Result<DecisionRecord, DecideError> {
        let req = AccessRequest::malformed(uuid::Uuid::now_v7(), action, protocol, client_ip);
        let decision = Decision::malformed(req.id, self.shared.position());
        let verdict = Verdict { allowed: false, final_reason: Reason::Malformed, webhook: None, slot: None };
        self.record(&req, decision, verdict, crate::clock::now()).await
    }

    /// The record of a decision, sealed, coalesced (a refusal) and spooled before it returns.
    async fn record(
        &self,
        req: &AccessRequest,
        decision: Decision,
        verdict: Verdict,
        now: sluice_events::Timestamp,
    ) -> Result<DecisionRecord, DecideError> {
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let mut record = DecisionRecord {
            request: RecordedRequest::record(req, self.keyring.current(), nonce),
            decision,
            allowed: verdict.allowed,
            final_reason: verdict.final_reason,
            decided_at: now,
            node: Some(self.node.clone()),
            webhook: verdict.webhook,
            sequence: None,
            publisher_slot: verdict.slot,
            repeats: None,
        };
        if self.refusals.offer(&mut record, std::time::Instant::now()) {
            record.sequence = Some(self.spool.append(record.clone()).await?);
        }
        self.stats.decided(record.allowed, record.final_reason.as_str());
        Ok(record)
    }

    /// Claims what an allow consumes; answers the refusal reason if a claim fails.
    async fn claim_effects(&self, state: &AuthState, req: &AccessRequest, decision: &Decision) -> Option<Reason> {
        let offline = state.apps.get(&req.app).map(|a| a.policy.offline_one_time).unwrap_or_default();
        for effect in &decision.effects {
            match effect {
                Effect::ConsumeToken { token_sha256 } => {
                    let key = dist::consumed_token_key(token_sha256);
                    match self.guard.claim(&key, req.id).await {
                        Claim::Claimed => {}
                        Claim::Used => return Some(Reason::TokenConsumed),
                        Claim::Unavailable => match offline {
                            OfflineOneTime::Deny => return Some(Reason::OneTimeUnavailable),
                            OfflineOneTime::AllowLocal => match self.guard.claim_locally(&key, req.id).await {
                                Claim::Claimed => {}
                                Claim::Used => return Some(Reason::TokenConsumed),
                                Claim::Unavailable => return Some(Reason::OneTimeUnavailable),
                            },
                        },
                    }
                }
                Effect::UseTotpStep { subscriber_id, step } => {
                    let key =
                        dist::used_step_key(req.app.as_str(), decision.stream.as_str(), subscriber_id.as_str(), *step);
                    let claim = match self.guard.claim(&key, req.id).await {
                        Claim::Unavailable => self.guard.claim_locally(&key, req.id).await,
                        c => c,
                    };
                    if claim == Claim::Used {
                        return Some(Reason::TotpReplayed);
                    }
                }
            }
        }
        None
    }
}

/// Records the held runs of identical refusals once their window has passed.
pub async fn record_held_refusals(decider: Decider) {
    let period = (decider.refusals.window() / 4).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(period).await;
        for record in decider.refusals.due(std::time::Instant::now()) {
            if let Err(e) = decider.spool.append(record).await {
                tracing::warn!(error = %e, "a coalesced refusal could not be recorded");
            }
        }
    }
}

/// Claims, every 2 s, what was admitted locally while NATS was away.
pub async fn reconcile_loop(guard: Arc<Guard>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        guard.reconcile().await;
    }
}
