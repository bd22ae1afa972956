//! Planning a batch: numbering, expected-version checks, idempotent retries and the hash
//! chain, decided against a head and stream versions before anything is written. Pure: both
//! append paths plan with it, and its tests need no database.

use std::collections::HashMap;

use sluice_events::event::GENESIS;
use sluice_events::{Position, Sha256Digest, Timestamp};
use uuid::Uuid;

use super::sql::{Columns, push_row};
use super::{AppendRequest, Appended, ExpectedVersion, StoreError};

/// The last event of the log: where the next append chains from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Head {
    pub(super) position: Position,
    pub(super) hash: Sha256Digest,
}

impl Head {
    pub(super) const EMPTY: Head = Head { position: Position::ZERO, hash: GENESIS };
}

/// A batch numbered, checked and hash-chained against a head and stream versions, before
/// anything is written.
pub(super) struct Plan<'a> {
    /// The rows to insert.
    pub(super) cols: Columns<'a>,
    /// One answer per request, true once the rows are committed.
    pub(super) results: Vec<Result<Appended, StoreError>>,
    /// The head the rows chain from, and the head after them.
    pub(super) start: Head,
    pub(super) head: Head,
    /// Every stream of the batch: its version before the batch, and after it.
    pub(super) before: HashMap<String, Option<u64>>,
    pub(super) after: HashMap<String, Option<u64>>,
}

/// Plans `batch` on top of `start`, given the event ids known to be in the log and each of
/// the batch's streams' version (`before`, every stream present). Pure: no I/O.
pub(super) fn plan<'a>(
    batch: &'a [AppendRequest],
    start: Head,
    known: &mut HashMap<Uuid, Position>,
    before: HashMap<String, Option<u64>>,
    recorded_at: Timestamp,
) -> Plan<'a> {
    let mut after = before.clone();
    let (mut position, mut prev) = (start.position, start.hash);
    let mut cols = Columns::default();
    let mut results = Vec::with_capacity(batch.len());
    for req in batch {
        let current = after.get(&req.stream).copied().flatten();
        if req.events.is_empty() {
            results.push(Ok(Appended { positions: vec![], stream_version: current, duplicate: false }));
            continue;
        }
        // A retry of an append that already happened (here or earlier in this batch). Facts
        // skip what is known one by one and append the rest.
        let seen: Vec<Option<Position>> = req.events.iter().map(|e| known.get(&e.event_id).copied()).collect();
        if !req.skip_known && seen.iter().any(Option::is_some) {
            results.push(match seen.iter().position(Option::is_none) {
                Some(i) => Err(StoreError::IdempotencyMismatch { event_id: req.events[i].event_id }),
                None => Ok(Appended {
                    positions: seen.into_iter().flatten().collect(),
                    stream_version: current,
                    duplicate: true,
                }),
            });
            continue;
        }
        let ok = match req.expected {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current.is_none(),
            ExpectedVersion::Exact(v) => current == Some(v),
        };
        if !ok {
            results.push(Err(StoreError::Conflict {
                stream: req.stream.clone(),
                expected: req.expected,
                actual: current,
            }));
            continue;
        }
        cols.metadata.push(&req.metadata);
        let mut version = current;
        let mut positions = Vec::with_capacity(req.events.len());
        for (e, data) in req.events.iter().zip(&req.data) {
            if req.skip_known && known.contains_key(&e.event_id) {
                continue;
            }
            position = position.next();
            let v = version.map_or(0, |v| v + 1);
            version = Some(v);
            prev = push_row(&mut cols, &prev, position, (e, data), &req.stream, v, recorded_at);
            known.insert(e.event_id, position);
            positions.push(position);
        }
        after.insert(req.stream.clone(), version);
        let duplicate = req.skip_known && positions.is_empty();
        results.push(Ok(Appended { positions, stream_version: version, duplicate }));
    }
    Plan { cols, results, start, head: Head { position, hash: prev }, before, after }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_events::event::AppDeleted;
    use sluice_events::{AppName, Event, NewEvent};
    use tokio::sync::oneshot;

    const AT: Timestamp = Timestamp(1_700_000_000_000);

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// A request on `stream` of events with ids `ids`.
    fn req(stream: &str, expected: ExpectedVersion, ids: &[u128]) -> AppendRequest {
        let events: Vec<NewEvent> = ids
            .iter()
            .map(|n| NewEvent {
                event_id: id(*n),
                event: Event::AppDeleted(AppDeleted { app: AppName::parse("tv").unwrap() }),
            })
            .collect();
        let data = events.iter().map(|_| r#"{"app":"tv"}"#.to_owned()).collect();
        let (reply, _) = oneshot::channel();
        AppendRequest { stream: stream.into(), expected, events, data, metadata: "{}".into(), skip_known: false, reply }
    }

    fn fact(stream: &str, ids: &[u128]) -> AppendRequest {
        AppendRequest { skip_known: true, ..req(stream, ExpectedVersion::Any, ids) }
    }

    /// An answer as (positions, stream version, duplicate), or the error.
    type Answer = Result<(Vec<u64>, Option<u64>, bool), StoreError>;

    /// What each request was answered.
    fn answers(p: &Plan<'_>) -> Vec<Answer> {
        p.results
            .iter()
            .map(|r| match r {
                Ok(a) => Ok((a.positions.iter().map(|p| p.0).collect(), a.stream_version, a.duplicate)),
                Err(e) => Err(e.clone()),
            })
            .collect()
    }

    fn versions(pairs: &[(&str, Option<u64>)]) -> HashMap<String, Option<u64>> {
        pairs.iter().map(|(s, v)| ((*s).to_owned(), *v)).collect()
    }

    fn head_at(position: u64) -> Head {
        Head { position: Position(position), hash: Sha256Digest([7; 32]) }
    }

    #[test]
    fn requests_are_numbered_from_the_head_with_versions_per_stream() {
        // Given a log at position 10 where `a` has version 3 and `b` does not exist.
        let batch = [
            req("a", ExpectedVersion::Exact(3), &[1, 2]),
            req("b", ExpectedVersion::NoStream, &[3]),
            req("a", ExpectedVersion::Exact(5), &[4]),
            req("b", ExpectedVersion::Any, &[]),
        ];
        let mut known = HashMap::new();
        // When the batch is planned.
        let p = plan(&batch, head_at(10), &mut known, versions(&[("a", Some(3)), ("b", None)]), AT);
        // Then positions continue the log, versions continue each stream (the second request
        // on `a` sees the first's events), and an empty request changes nothing.
        assert_eq!(
            answers(&p),
            vec![
                Ok((vec![11, 12], Some(5), false)),
                Ok((vec![13], Some(0), false)),
                Ok((vec![14], Some(6), false)),
                Ok((vec![], Some(0), false)),
            ]
        );
        assert_eq!(p.cols.version, vec![4, 5, 0, 6]);
        assert_eq!(p.after, versions(&[("a", Some(6)), ("b", Some(0))]));
        assert_eq!((p.start, p.head.position), (head_at(10), Position(14)));
        assert_eq!(p.head.hash.0.to_vec(), *p.cols.hash.last().unwrap());
        assert_eq!(known.len(), 4, "the planned ids are known to the rest of the batch");
    }

    #[test]
    fn a_conflict_fails_alone_and_leaves_no_gap() {
        let batch = [
            req("a", ExpectedVersion::Exact(1), &[1]),
            req("b", ExpectedVersion::NoStream, &[2]),
            req("c", ExpectedVersion::Exact(0), &[3]),
        ];
        let p = plan(
            &batch,
            Head::EMPTY,
            &mut HashMap::new(),
            versions(&[("a", Some(2)), ("b", Some(0)), ("c", Some(0))]),
            AT,
        );
        let got = answers(&p);
        assert_eq!(
            got[0],
            Err(StoreError::Conflict { stream: "a".into(), expected: ExpectedVersion::Exact(1), actual: Some(2) })
        );
        assert_eq!(
            got[1],
            Err(StoreError::Conflict { stream: "b".into(), expected: ExpectedVersion::NoStream, actual: Some(0) })
        );
        assert_eq!(got[2], Ok((vec![1], Some(1), false)), "the next request takes position 1");
        assert_eq!(p.cols.position, vec![1]);
    }

    #[test]
    fn a_retry_is_answered_with_the_original_positions_and_a_mixed_one_is_refused() {
        // Given ids 1 and 2 in the log at positions 5 and 6.
        let mut known = HashMap::from([(id(1), Position(5)), (id(2), Position(6))]);
        let batch = [
            req("a", ExpectedVersion::NoStream, &[1, 2]),
            req("a", ExpectedVersion::Any, &[2, 9]),
            req("a", ExpectedVersion::Any, &[9, 2]),
        ];
        let p = plan(&batch, head_at(6), &mut known, versions(&[("a", Some(1))]), AT);
        let got = answers(&p);
        // An exact retry: duplicate, nothing written, even though its expectation no longer holds.
        assert_eq!(got[0], Ok((vec![5, 6], Some(1), true)));
        // First id known, a later one new: a mismatch, named by the new id.
        assert_eq!(got[1], Err(StoreError::IdempotencyMismatch { event_id: id(9) }));
        // Any mix the plan can see is refused. (The general path probes only first ids, so a
        // mix whose first id is new reaches the insert; the unique index then sends the batch
        // back to be planned again with every id probed, and it ends here.)
        assert_eq!(got[2], Err(StoreError::IdempotencyMismatch { event_id: id(9) }));
        assert!(p.cols.position.is_empty());
    }

    #[test]
    fn the_same_request_twice_in_one_batch_is_a_retry_of_the_first() {
        let batch = [req("a", ExpectedVersion::NoStream, &[1]), req("a", ExpectedVersion::NoStream, &[1])];
        let p = plan(&batch, Head::EMPTY, &mut HashMap::new(), versions(&[("a", None)]), AT);
        assert_eq!(answers(&p), vec![Ok((vec![1], Some(0), false)), Ok((vec![1], Some(0), true))]);
        assert_eq!(p.cols.position.len(), 1);
    }

    #[test]
    fn facts_skip_known_ids_one_by_one() {
        let mut known = HashMap::from([(id(2), Position(3))]);
        let batch = [fact("decisions-w1", &[1, 2, 3]), fact("decisions-w1", &[2])];
        let p = plan(&batch, head_at(3), &mut known, versions(&[("decisions-w1", Some(0))]), AT);
        assert_eq!(answers(&p), vec![Ok((vec![4, 5], Some(2), false)), Ok((vec![], Some(2), true))]);
    }

    #[test]
    fn planning_a_batch_chains_like_planning_its_requests_one_by_one() {
        let one = [req("a", ExpectedVersion::Any, &[1, 2])];
        let two = [req("b", ExpectedVersion::Any, &[3])];
        let both = [req("a", ExpectedVersion::Any, &[1, 2]), req("b", ExpectedVersion::Any, &[3])];
        let v = versions(&[("a", None), ("b", None)]);
        let first = plan(&one, Head::EMPTY, &mut HashMap::new(), v.clone(), AT);
        let second = plan(&two, first.head, &mut HashMap::new(), v.clone(), AT);
        let whole = plan(&both, Head::EMPTY, &mut HashMap::new(), v, AT);
        assert_eq!(whole.head, second.head);
        assert_eq!(whole.cols.hash, [first.cols.hash.clone(), second.cols.hash.clone()].concat());
        // Another start chains differently: the hash commits to everything before.
        let elsewhere = plan(&one, head_at(0), &mut HashMap::new(), versions(&[("a", None)]), AT);
        assert_ne!(elsewhere.head.hash, first.head.hash);
    }
}
