//! Live sessions and "kick on change" (DESIGN.md §6): every admitted publisher and player is
//! registered with the request that admitted it; whenever the access tables change (and once
//! a second, for expiries) each session is checked again with `sluice_events::decide::recheck`,
//! and a session that no longer passes is told to end, with the reason. The media code (RTMP,
//! SRT) holds the `Session` and drops the connection when `ended()` fires. An operator's kick
//! (`SessionsKicked` in the log) ends the matching sessions admitted before it (by log
//! position, so no clock is compared), with `Reason::Kicked`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_events::decide::recheck;
use sluice_events::event::SessionsKicked;
use sluice_events::{AccessRequest, AuthState, Method, Position, Reason, Timestamp};
use tokio::sync::oneshot;

use crate::sync::Shared;

struct Live {
    request: AccessRequest,
    admitted_by: Option<Method>,
    /// The state position the admitting decision was made at.
    admitted_at: Position,
    end: oneshot::Sender<Reason>,
}

/// The registry of live sessions on this worker.
#[derive(Default)]
pub struct Registry {
    live: Mutex<HashMap<u64, Live>>,
    next: AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("live", &self.len()).finish()
    }
}

/// One admitted session; dropping it unregisters it.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    registry: Arc<Registry>,
    ended: Option<oneshot::Receiver<Reason>>,
}

impl Session {
    /// Resolves when the session must end, with the reason (never, if it stays allowed).
    pub async fn ended(&mut self) -> Reason {
        match self.ended.as_mut() {
            Some(rx) => match rx.await {
                Ok(reason) => reason,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.registry.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// Registers a session admitted by `method` for `request` (the credential is kept, in
    /// memory only, to check it again).
    pub fn admit(
        self: &Arc<Self>,
        request: AccessRequest,
        admitted_by: Option<Method>,
        admitted_at: Position,
    ) -> Session {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (end, ended) = oneshot::channel();
        let live = Live { request, admitted_by, admitted_at, end };
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, live);
        Session { id, registry: self.clone(), ended: Some(ended) }
    }

    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends the sessions `kick` names that were admitted before its position `at`.
    pub fn kick(&self, kick: &SessionsKicked, at: Position) -> usize {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let kicked: Vec<u64> = live
            .iter()
            .filter(|(_, s)| {
                let r = &s.request;
                s.admitted_at < at
                    && r.app == kick.app
                    && r.stream == kick.stream
                    && kick.action.is_none_or(|a| a == r.action)
                    && kick.client_ip.is_none_or(|ip| ip == r.client_ip)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &kicked {
            if let Some(s) = live.remove(id) {
                tracing::info!(
                    session = id,
                    app = %s.request.app,
                    stream = %s.request.stream,
                    action = s.request.action.as_str(),
                    client = %s.request.client_ip,
                    "session kicked by an operator; ending it"
                );
                let _ = s.end.send(Reason::Kicked);
            }
        }
        kicked.len()
    }

    /// Checks every live session against `state` at `now`; ends (and unregisters) those that
    /// no longer pass. Answers them with their reasons.
    pub fn recheck(&self, state: &AuthState, now: Timestamp) -> Vec<(u64, Reason)> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let refused: Vec<(u64, Reason)> = live
            .iter()
            .filter_map(|(id, s)| recheck(state, &s.request, s.admitted_by, now).err().map(|r| (*id, r)))
            .collect();
        for (id, reason) in &refused {
            if let Some(s) = live.remove(id) {
                tracing::info!(
                    session = id,
                    app = %s.request.app,
                    stream = %s.request.stream,
                    action = s.request.action.as_str(),
                    client = %s.request.client_ip,
                    reason = reason.as_str(),
                    "session no longer allowed; ending it"
                );
                let _ = s.end.send(*reason);
            }
        }
        refused
    }
}

/// Re-checks the registry whenever the access tables change, and every second (expiries).
/// Sessions a change ended are timed from the change's record in the log
/// (`sluice_revocation_seconds`).
pub async fn recheck_loop(registry: Arc<Registry>, shared: Arc<Shared>, stats: Arc<crate::stats::MediaStats>) {
    let mut applied = shared.applied.subscribe();
    let mut checked = Position(0);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        // Decisions move the position too; only a change of the tables can end a session
        // between ticks.
        let on_tick = tokio::select! {
            _ = applied.changed() => false,
            _ = tick.tick() => true,
        };
        let kicks = std::mem::take(&mut *shared.kicks.lock().unwrap_or_else(|p| p.into_inner()));
        for (kick, at) in &kicks {
            registry.kick(kick, *at);
        }
        let state = shared.state.load_full();
        if !registry.is_empty() && (on_tick || state.tables_position() != checked) {
            let changed = state.tables_position() != checked;
            checked = state.tables_position();
            let now = crate::clock::now();
            let ended = registry.recheck(&state, now);
            let recorded = shared.tables_changed_at.load(Ordering::Relaxed);
            if changed && recorded > 0 {
                let after = Duration::from_millis(now.0.saturating_sub(recorded).max(0) as u64);
                for _ in &ended {
                    stats.revoked(after);
                }
            }
        }
        shared.live_sessions.store(registry.len() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_events::event::{AppCreated, StreamDeleted, StreamRegistered};
    use sluice_events::{
        Action, AppName, Credential, Event, Metadata, Policy, Protocol, RecordedEvent, Sha256Digest, StreamName,
    };

    fn apply(state: &mut AuthState, event: Event) {
        let position = Position(state.position().0 + 1);
        let stream = event.log_stream();
        state
            .apply(&RecordedEvent {
                position,
                event_id: uuid::Uuid::from_u128(position.0 as u128),
                stream,
                version: 0,
                event,
                metadata: Metadata::default(),
                recorded_at: Timestamp(0),
                hash: Sha256Digest([0; 32]),
            })
            .unwrap();
    }

    #[tokio::test]
    async fn a_kick_ends_matching_sessions_admitted_before_it_only() {
        let registry = Registry::new();
        let mut early = registry.admit(player("cam1"), Some(Method::Open), Position(4));
        let mut late = registry.admit(player("cam1"), Some(Method::Open), Position(9));
        let mut other = registry.admit(player("cam2"), Some(Method::Open), Position(4));
        let app = AppName::parse("live").unwrap();
        let kick = |action, ip: Option<&str>| SessionsKicked {
            app: app.clone(),
            stream: StreamName::parse("cam1").unwrap(),
            action,
            client_ip: ip.map(|i| i.parse().unwrap()),
        };
        assert_eq!(registry.kick(&kick(Some(Action::Publish), None), Position(7)), 0, "no publisher");
        assert_eq!(registry.kick(&kick(None, Some("198.51.100.1")), Position(7)), 0, "another address");
        assert_eq!(registry.kick(&kick(Some(Action::Play), None), Position(7)), 1);
        assert_eq!(early.ended().await, Reason::Kicked);
        assert_eq!(registry.len(), 2, "admitted after the kick, or another stream: still live");
        let pending = |s: &mut Session| {
            let f = s.ended();
            futures::FutureExt::now_or_never(f).is_none()
        };
        assert!(pending(&mut late) && pending(&mut other));
    }

    fn player(stream: &str) -> AccessRequest {
        AccessRequest {
            id: uuid::Uuid::new_v4(),
            app: AppName::parse("live").unwrap(),
            stream: StreamName::parse(stream).unwrap(),
            action: Action::Play,
            protocol: Protocol::Rtmp,
            client_ip: "192.0.2.1".parse().unwrap(),
            credential: Credential::default(),
            client_id: None,
        }
    }

    #[tokio::test]
    async fn a_deleted_stream_ends_its_sessions_and_only_those() {
        let mut state = AuthState::for_data_plane(None);
        let live = AppName::parse("live").unwrap();
        let registered_only =
            Policy { play: sluice_events::ActionPolicy::open().registered_only(), ..Policy::default() };
        apply(&mut state, AppCreated { app: live.clone(), policy: registered_only }.into());
        for name in ["cam1", "cam2"] {
            let name = StreamName::parse(name).unwrap();
            apply(
                &mut state,
                StreamRegistered { plays: None, app: live.clone(), name, publish_name: None, description: None }.into(),
            );
        }
        let registry = Registry::new();
        let mut on_cam1 = registry.admit(player("cam1"), Some(Method::Open), Position(1));
        let mut also_cam1 = registry.admit(player("cam1"), Some(Method::Open), Position(1));
        let on_cam2 = registry.admit(player("cam2"), Some(Method::Open), Position(1));
        assert_eq!(registry.len(), 3);
        assert!(registry.recheck(&state, Timestamp(0)).is_empty(), "nothing changed, nobody ends");

        apply(&mut state, StreamDeleted { app: live, name: StreamName::parse("cam1").unwrap() }.into());
        let mut ended = registry.recheck(&state, Timestamp(0));
        ended.sort_unstable();
        assert_eq!(ended, vec![(on_cam1.id, Reason::StreamNotRegistered), (also_cam1.id, Reason::StreamNotRegistered)]);
        assert_eq!(on_cam1.ended().await, Reason::StreamNotRegistered);
        assert_eq!(also_cam1.ended().await, Reason::StreamNotRegistered);
        assert_eq!(registry.len(), 1, "ended sessions leave the registry");
        drop(on_cam2);
        assert!(registry.is_empty(), "a dropped session unregisters itself");
    }

    #[tokio::test]
    async fn the_loop_ends_a_session_when_the_swapped_in_state_refuses_it() {
        let mut state = AuthState::for_data_plane(None);
        let live = AppName::parse("live").unwrap();
        apply(&mut state, AppCreated { app: live.clone(), policy: Policy::default() }.into());
        let shared = Shared::new(state.clone());
        let registry = Registry::new();
        tokio::spawn(recheck_loop(registry.clone(), shared.clone(), crate::stats::MediaStats::new()));
        let mut session = registry.admit(player("anything"), Some(Method::Open), Position(1));
        apply(&mut state, sluice_events::event::AppDeleted { app: live }.into());
        let position = state.position().0;
        shared.state.store(Arc::new(state));
        shared.applied.send_replace(position);
        let reason = tokio::time::timeout(Duration::from_secs(5), session.ended()).await.unwrap();
        assert_eq!(reason, Reason::AppNotFound);
    }
}
