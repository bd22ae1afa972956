//! The imperative shell around `sluice_events::handle`: read the projection, run the pure
//! command handler, append with the expected version, retry a bounded number of times on a
//! conflict, and answer once the projection has applied the new events (read-your-writes).

use std::net::IpAddr;
use std::time::Duration;

use sluice_events::{AuthState, Command, Metadata, NewEvent, Position, Rejection, Timestamp, handle};
use uuid::Uuid;

use crate::projection::Projection;
use crate::store::{EventStore, ExpectedVersion, StoreError};

/// Attempts before a write gives up with a conflict.
const MAX_ATTEMPTS: usize = 5;
/// How long an answer waits for the projection to show the write.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// Namespace of idempotent event ids: v5(namespace, scope | key | index).
const IDEMPOTENCY_NS: Uuid = Uuid::from_u128(0x5c1c_e000_0000_4000_8000_0000_0000_0002);

/// Who asked, from where, and under which idempotency key.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub actor: String,
    pub client_ip: Option<IpAddr>,
    pub request_id: Option<String>,
    /// `(scope, key)`: the same key in the same scope maps to the same event ids.
    pub idempotency: Option<(String, String)>,
    /// The digest of the request made under that key (method, path, body).
    pub request_digest: Option<sluice_events::Sha256Digest>,
}

/// A write that is in the log (and in the projection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The position of the last event written (or, when nothing had to be written, the
    /// state's position).
    pub position: Position,
    /// True when an earlier request with the same idempotency key already wrote it.
    pub replayed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("the write kept conflicting with concurrent writes to {stream}; try again")]
    Conflict { stream: String },
    #[error("the Idempotency-Key was already used for a different request (method, path or body)")]
    IdempotencyMismatch,
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for CommandError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::IdempotencyMismatch { .. } => CommandError::IdempotencyMismatch,
            other => CommandError::Store(other),
        }
    }
}

/// Runs commands against the log. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Writer {
    store: EventStore,
    projection: Projection,
}

impl Writer {
    pub fn new(store: EventStore, projection: Projection) -> Writer {
        Writer { store, projection }
    }

    pub fn projection(&self) -> &Projection {
        &self.projection
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// Builds a command from the current state with `make`, handles and appends it.
    /// `make` runs again on each retry, against the newer state.
    pub async fn run<F>(&self, origin: &Origin, now: Timestamp, mut make: F) -> Result<Committed, CommandError>
    where
        F: FnMut(&AuthState) -> Result<Command, Rejection>,
    {
        if let Some(first) = self.event_id(origin, 0)
            && let Some((position, written)) = self.store.written_with(first).await?
        {
            // The same key with another request (the IETF idempotency-key draft's 422); a
            // write from before digests were kept is taken for the same request.
            if written.request_digest.is_some() && written.request_digest != origin.request_digest {
                return Err(CommandError::IdempotencyMismatch);
            }
            self.projection.wait_for(position, APPLY_WAIT).await;
            return Ok(Committed { position, replayed: true });
        }
        let metadata = Metadata {
            actor: Some(origin.actor.clone()),
            request_id: origin.request_id.clone(),
            client_ip: origin.client_ip,
            request_digest: origin.idempotency.as_ref().and(origin.request_digest),
        };
        let mut last_stream = String::new();
        for _ in 0..MAX_ATTEMPTS {
            let (version, stream, events) = loop {
                let state = self.projection.current();
                let events = handle(&state, make(&state)?, now)?;
                let Some(stream) = events.first().map(|e| e.log_stream()) else {
                    return Ok(Committed { position: state.position(), replayed: false });
                };
                // The version must describe events the state already holds; if the side map is
                // ahead of this snapshot, take a newer snapshot.
                match self.projection.stream_version(&stream) {
                    Some((_, at)) if at > state.position() => {
                        self.projection.changed(Duration::from_millis(50)).await;
                        continue;
                    }
                    version => break (version.map(|v| v.0), stream, events),
                }
            };
            let expected = version.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
            let new: Vec<NewEvent> = events
                .into_iter()
                .enumerate()
                .map(|(i, event)| NewEvent { event_id: self.event_id(origin, i).unwrap_or_else(Uuid::now_v7), event })
                .collect();
            match self.store.append(&stream, expected, new, metadata.clone()).await {
                Ok(appended) => {
                    let position = appended.positions.last().copied().unwrap_or(self.projection.position());
                    self.projection.wait_for(position, APPLY_WAIT).await;
                    return Ok(Committed { position, replayed: appended.duplicate });
                }
                Err(StoreError::Conflict { .. }) => {
                    last_stream = stream;
                    self.projection.changed(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(CommandError::Conflict { stream: last_stream })
    }

    fn event_id(&self, origin: &Origin, index: usize) -> Option<Uuid> {
        let (scope, key) = origin.idempotency.as_ref()?;
        Some(Uuid::new_v5(&IDEMPOTENCY_NS, format!("{}|{scope}|{key}|{index}", origin.actor).as_bytes()))
    }
}
