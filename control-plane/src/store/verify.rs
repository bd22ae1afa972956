//! `verify-log`: the whole chain walked, positions contiguous from 1, every hash recomputed
//! from the stored text.

use sluice_events::event::GENESIS;
use sluice_events::{Position, Sha256Digest};

use super::{EventStore, PAGE, StoreError};

impl EventStore {
    /// Walks the whole chain: positions contiguous from 1, every hash recomputed.
    pub async fn verify(&self) -> Result<VerifyReport, VerifyError> {
        self.verify_from(Position::ZERO, GENESIS, |_| {}).await
    }

    /// Walks the chain after `start`, whose hash is `prev` (an anchor's, to resume from it),
    /// calling `progress` with the last position checked after each page.
    pub async fn verify_from(
        &self,
        start: Position,
        mut prev: Sha256Digest,
        mut progress: impl FnMut(Position),
    ) -> Result<VerifyReport, VerifyError> {
        let mut last = start;
        loop {
            // Archived ranges are read from their segments: one chain from genesis to the head.
            let rows = self.rows_after(last, PAGE).await.map_err(VerifyError::Store)?;
            if rows.is_empty() {
                return Ok(VerifyReport { events: last.0 - start.0, head: last, head_hash: prev });
            }
            for raw in rows {
                if raw.position != last.next() {
                    return Err(VerifyError::Gap { expected: last.next(), found: raw.position });
                }
                let expected = raw.chain_hash(&prev);
                if expected.0.as_slice() != raw.hash.as_slice() {
                    return Err(VerifyError::HashMismatch { position: raw.position });
                }
                prev = expected;
                last = raw.position;
            }
            progress(last);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub events: u64,
    pub head: Position,
    pub head_hash: Sha256Digest,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "hash chain broken at position {position}: the stored hash does not match the event (tampered or corrupted)"
    )]
    HashMismatch { position: Position },
    #[error("position gap: expected {expected}, found {found}")]
    Gap { expected: Position, found: Position },
    #[error(transparent)]
    Store(StoreError),
}

impl VerifyError {
    /// The first bad position, if the chain itself is broken.
    pub fn position(&self) -> Option<Position> {
        match self {
            VerifyError::HashMismatch { position } => Some(*position),
            VerifyError::Gap { expected, .. } => Some(*expected),
            VerifyError::Store(_) => None,
        }
    }
}
