//! The event store against a real Postgres 15: every log invariant of DESIGN.md §4 and every
//! bad-input case of the foundation issue.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sluice_control_plane::store::{self, ExpectedVersion};
use sluice_control_plane::{EventStore, StoreError, VerifyError, connect};
use sluice_events::event::{AppCreated, AppDeleted, AppPolicyChanged, write_canonical};
use sluice_events::{AppName, DecodeError, Event, Metadata, NewEvent, Policy, Position};
use sluice_tests::Postgres;
use uuid::Uuid;

async fn given_a_store() -> (Postgres, EventStore) {
    let pg = Postgres::start().unwrap();
    let pool = connect(&pg.url()).await.unwrap();
    store::migrate(&pool).await.unwrap();
    (pg, EventStore::start(pool))
}

fn app(n: &str) -> AppName {
    AppName::parse(n).unwrap()
}

fn created(n: &str) -> NewEvent {
    NewEvent { event_id: Uuid::new_v4(), event: AppCreated { app: app(n), policy: Policy::default() }.into() }
}

fn changed(n: &str) -> NewEvent {
    NewEvent { event_id: Uuid::new_v4(), event: AppPolicyChanged { app: app(n), policy: Policy::sls() }.into() }
}

fn meta() -> Metadata {
    Metadata { actor: Some("test".into()), ..Metadata::default() }
}

#[tokio::test]
async fn append_then_read_in_order_with_versions() {
    let (_pg, store) = given_a_store().await;
    let a = store.append("app-a", ExpectedVersion::NoStream, vec![created("a"), changed("a")], meta()).await.unwrap();
    assert_eq!(a.positions, vec![Position(1), Position(2)]);
    assert_eq!(a.stream_version, Some(1));
    let b = store.append("app-b", ExpectedVersion::NoStream, vec![created("b")], meta()).await.unwrap();
    assert_eq!(b.positions, vec![Position(3)]);
    let all = store.read_all(Position::ZERO, 100).await.unwrap();
    assert_eq!(all.iter().map(|e| e.position.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(all[0].metadata.actor.as_deref(), Some("test"));
    let stream = store.read_stream("app-a").await.unwrap();
    assert_eq!(stream.iter().map(|e| e.version).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(store.read_all(Position(2), 100).await.unwrap().len(), 1);
    assert_eq!(store.head().await.unwrap(), Position(3));
    assert_eq!(store.stream_version("app-a").await.unwrap(), Some(1));
    assert_eq!(store.stream_version("app-zz").await.unwrap(), None);
}

#[tokio::test]
async fn version_mismatch_is_a_conflict_never_an_overwrite() {
    let (_pg, store) = given_a_store().await;
    store.append("app-a", ExpectedVersion::NoStream, vec![created("a")], meta()).await.unwrap();
    let err = store.append("app-a", ExpectedVersion::NoStream, vec![created("a")], meta()).await.unwrap_err();
    assert_eq!(
        err,
        StoreError::Conflict { stream: "app-a".into(), expected: ExpectedVersion::NoStream, actual: Some(0) }
    );
    assert!(err.to_string().contains("expected no stream, found version 0"));
    let err = store.append("app-a", ExpectedVersion::Exact(5), vec![changed("a")], meta()).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { actual: Some(0), .. }));
    store.append("app-a", ExpectedVersion::Exact(0), vec![changed("a")], meta()).await.unwrap();
    assert_eq!(store.read_stream("app-a").await.unwrap().len(), 2);
}

#[tokio::test]
async fn concurrent_writers_on_one_stream_exactly_one_wins_each_version() {
    let (_pg, store) = given_a_store().await;
    store.append("app-a", ExpectedVersion::NoStream, vec![created("a")], meta()).await.unwrap();
    // 16 writers all expect version 0: group commit puts them in one batch, the first wins,
    // the rest fail alone with a conflict.
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.append("app-a", ExpectedVersion::Exact(0), vec![changed("a")], meta()).await })
        })
        .collect();
    let mut ok = 0;
    let mut conflicts = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StoreError::Conflict { .. }) => conflicts += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((ok, conflicts), (1, 15));
}

#[tokio::test]
async fn concurrent_appends_are_gap_free_and_chain_verifies() {
    let (_pg, store) = given_a_store().await;
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let s = store.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                for i in 0..40 {
                    let name = format!("w{w}-{i}");
                    let a = s
                        .append(&format!("app-{name}"), ExpectedVersion::NoStream, vec![created(&name)], meta())
                        .await
                        .unwrap();
                    mine.extend(a.positions);
                }
                mine
            })
        })
        .collect();
    let mut positions: Vec<u64> = Vec::new();
    for t in tasks {
        positions.extend(t.await.unwrap().iter().map(|p| p.0));
    }
    positions.sort_unstable();
    assert_eq!(positions, (1..=320).collect::<Vec<_>>(), "every position once, no gap");
    let report = store.verify().await.unwrap();
    assert_eq!((report.events, report.head), (320, Position(320)));
}

#[tokio::test]
async fn reappending_an_event_id_returns_the_original_positions() {
    let (_pg, store) = given_a_store().await;
    let batch = vec![created("a"), changed("a")];
    let first = store.append("app-a", ExpectedVersion::NoStream, batch.clone(), meta()).await.unwrap();
    // A client retry after a lost answer: same ids, same (now stale) expectation.
    let again = store.append("app-a", ExpectedVersion::NoStream, batch.clone(), meta()).await.unwrap();
    assert_eq!(again.positions, first.positions);
    assert!(again.duplicate && !first.duplicate);
    assert_eq!(store.head().await.unwrap(), Position(2), "nothing written twice");
    // Retries racing in one batch are deduplicated too.
    let racing = vec![created("b")];
    let (x, y) = tokio::join!(
        store.append("app-b", ExpectedVersion::NoStream, racing.clone(), meta()),
        store.append("app-b", ExpectedVersion::NoStream, racing.clone(), meta()),
    );
    assert_eq!(x.unwrap().positions, y.unwrap().positions);
    // Mixing an old id with a new one is refused, not half-applied.
    let mixed = vec![batch[0].clone(), changed("a")];
    let err = store.append("app-a", ExpectedVersion::Any, mixed.clone(), meta()).await.unwrap_err();
    assert_eq!(err, StoreError::IdempotencyMismatch { event_id: mixed[1].event_id });
    assert_eq!(store.head().await.unwrap(), Position(3));
}

#[tokio::test]
async fn facts_redelivered_in_any_grouping_are_appended_once_each() {
    let (_pg, store) = given_a_store().await;
    let facts: Vec<NewEvent> = (0..6).map(|_| changed("f")).collect();
    let first = store.append_facts("app-f", facts[..3].to_vec(), meta()).await.unwrap();
    assert_eq!(first.positions, vec![Position(1), Position(2), Position(3)]);
    // A re-delivery overlapping the first batch, with the same id twice in it: only the new
    // ones are written, in order.
    let mut overlap = facts[1..].to_vec();
    overlap.push(facts[4].clone());
    let second = store.append_facts("app-f", overlap, meta()).await.unwrap();
    assert_eq!(second.positions, vec![Position(4), Position(5), Position(6)]);
    assert!(!second.duplicate);
    let again = store.append_facts("app-f", facts.clone(), meta()).await.unwrap();
    assert!(again.duplicate && again.positions.is_empty());
    // Racing re-deliveries in one group commit still write each fact once.
    let more: Vec<NewEvent> = (0..4).map(|_| changed("f")).collect();
    let (x, y) = tokio::join!(
        store.append_facts("app-f", more.clone(), meta()),
        store.append_facts("app-f", more[1..].to_vec(), meta()),
    );
    assert_eq!(x.unwrap().positions.len() + y.unwrap().positions.len(), 4);
    let ids: Vec<Uuid> = store.read_stream("app-f").await.unwrap().iter().map(|e| e.event_id).collect();
    let expected: Vec<Uuid> = facts.iter().chain(&more).map(|e| e.event_id).collect();
    assert_eq!(ids.len(), 10);
    assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>(), expected.iter().collect());
    assert_eq!(store.verify().await.unwrap().head, Position(10));
    let wrong = store.append_facts("app-g", vec![changed("f")], meta()).await.unwrap_err();
    assert!(matches!(wrong, StoreError::InvalidAppend(_)));
}

#[tokio::test]
async fn events_must_belong_to_the_stream_they_are_appended_to() {
    let (_pg, store) = given_a_store().await;
    let err = store.append("app-b", ExpectedVersion::Any, vec![created("a")], meta()).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidAppend(_)), "{err}");
}

#[tokio::test]
async fn update_delete_and_truncate_are_refused() {
    let (_pg, store) = given_a_store().await;
    store.append("app-a", ExpectedVersion::NoStream, vec![created("a")], meta()).await.unwrap();
    for sql in ["UPDATE events SET stream = 'x'", "DELETE FROM events", "TRUNCATE events"] {
        let err = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(store.pool()).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(store.read_all(Position::ZERO, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn verify_log_names_the_first_tampered_position() {
    let (_pg, store) = given_a_store().await;
    for n in ["a", "b", "c", "d"] {
        store.append(&format!("app-{n}"), ExpectedVersion::NoStream, vec![created(n)], meta()).await.unwrap();
    }
    assert_eq!(store.verify().await.unwrap().head, Position(4));
    // Someone with the owner's rights switches the guard off and edits history.
    sqlx::query("ALTER TABLE events DISABLE TRIGGER events_no_update_delete").execute(store.pool()).await.unwrap();
    sqlx::query("UPDATE events SET data = jsonb_set(data::jsonb, '{app}', '\"evil\"') WHERE position = 3")
        .execute(store.pool())
        .await
        .unwrap();
    let err = store.verify().await.unwrap_err();
    assert_eq!(err, VerifyError::HashMismatch { position: Position(3) });
    // Editing the metadata (who did it) is caught too.
    sqlx::query("UPDATE events SET metadata = '{\"actor\":\"someone-else\"}' WHERE position = 2")
        .execute(store.pool())
        .await
        .unwrap();
    assert_eq!(store.verify().await.unwrap_err().position(), Some(Position(2)));
    // And so is a deleted row.
    sqlx::query("DELETE FROM events WHERE position = 1").execute(store.pool()).await.unwrap();
    assert_eq!(store.verify().await.unwrap_err(), VerifyError::Gap { expected: Position(1), found: Position(2) });
}

#[tokio::test]
async fn the_log_keeps_the_canonical_text_its_hash_covers_and_rows_from_before_still_verify() {
    let (_pg, store) = given_a_store().await;
    for n in ["a", "b"] {
        store.append(&format!("app-{n}"), ExpectedVersion::NoStream, vec![created(n)], meta()).await.unwrap();
    }
    let stored = || async {
        sqlx::query_as::<_, (String, String)>("SELECT data::text, metadata::text FROM events ORDER BY position")
            .fetch_all(store.pool())
            .await
            .unwrap()
    };
    let rows = stored().await;
    let events = store.read_all(Position::ZERO, 10).await.unwrap();
    assert_eq!(rows.len(), 2);
    for ((data, metadata), e) in rows.iter().zip(&events) {
        let (mut want_data, mut want_metadata) = (Vec::new(), Vec::new());
        write_canonical(&e.event.data(), &mut want_data);
        write_canonical(&serde_json::to_value(&e.metadata).unwrap(), &mut want_metadata);
        assert_eq!(data.as_bytes(), want_data, "stored byte for byte as hashed");
        assert_eq!(metadata.as_bytes(), want_metadata);
    }
    // Rows appended while the log was jsonb hold jsonb's rendering (keys by length, spaces):
    // that is what the migration to json left of them. They still verify and decode.
    sqlx::query("ALTER TABLE events DISABLE TRIGGER events_no_update_delete").execute(store.pool()).await.unwrap();
    sqlx::query("UPDATE events SET data = data::jsonb::json, metadata = metadata::jsonb::json WHERE position = 1")
        .execute(store.pool())
        .await
        .unwrap();
    let rendered = stored().await;
    assert_ne!(rendered[0], rows[0], "the row now holds other text for the same JSON");
    assert_eq!(rendered[1], rows[1]);
    assert_eq!(store.verify().await.unwrap().head, Position(2));
    assert_eq!(store.read_all(Position::ZERO, 10).await.unwrap(), events);
}

/// Inserts a row behind the writer's back (as a newer or broken writer might have).
async fn insert_raw(store: &EventStore, position: i64, ty: &str, data: &str) {
    sqlx::query(
        "INSERT INTO events (position, event_id, stream, version, type, data, recorded_at, hash) \
         VALUES ($1, $2, 'raw', $1, $3, $4::jsonb, now(), decode(repeat('00', 32), 'hex'))",
    )
    .bind(position)
    .bind(Uuid::new_v4())
    .bind(ty)
    .bind(data)
    .execute(store.pool())
    .await
    .unwrap();
}

#[tokio::test]
async fn unknown_types_and_corrupt_data_are_typed_errors_and_lose_nothing() {
    let (_pg, store) = given_a_store().await;
    store.append("app-a", ExpectedVersion::NoStream, vec![created("a")], meta()).await.unwrap();
    insert_raw(&store, 2, "AppTeleported", "{}").await;
    // The good event before it is delivered; the read that reaches the bad row fails.
    assert_eq!(store.read_all(Position::ZERO, 10).await.unwrap().len(), 1);
    let err = store.read_all(Position(1), 10).await.unwrap_err();
    assert_eq!(
        err,
        StoreError::Decode {
            position: Position(2),
            source: DecodeError::UnknownType { event_type: "AppTeleported".into() }
        }
    );
    assert!(err.to_string().contains("position 2") && err.to_string().contains("AppTeleported"));
    insert_raw(&store, 3, "AppDeleted", r#"{"app": 42}"#).await;
    let err = store.read_all(Position(2), 10).await.unwrap_err();
    assert!(matches!(err, StoreError::Decode { position: Position(3), source: DecodeError::BadData { .. } }), "{err}");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(store.pool()).await.unwrap();
    assert_eq!(rows, 3);
}

#[tokio::test]
async fn a_subscription_stops_at_an_unreadable_event_instead_of_skipping_it() {
    let (_pg, store) = given_a_store().await;
    store.append("app-a", ExpectedVersion::NoStream, vec![created("a")], meta()).await.unwrap();
    insert_raw(&store, 2, "AppTeleported", "{}").await;
    let mut sub = store.subscribe(Position::ZERO).await.unwrap();
    assert_eq!(sub.recv().await.unwrap().unwrap().position, Position(1));
    assert!(matches!(sub.recv().await.unwrap(), Err(StoreError::Decode { position: Position(2), .. })));
    assert!(sub.recv().await.is_none());
}

#[tokio::test]
async fn subscribe_catches_up_then_follows_live_without_loss() {
    let (_pg, store) = given_a_store().await;
    for i in 0..50 {
        store
            .append(&format!("app-c{i}"), ExpectedVersion::NoStream, vec![created(&format!("c{i}"))], meta())
            .await
            .unwrap();
    }
    let mut sub = store.subscribe(Position(10)).await.unwrap();
    let writer = {
        let s = store.clone();
        tokio::spawn(async move {
            for i in 0..100 {
                s.append(&format!("app-l{i}"), ExpectedVersion::NoStream, vec![created(&format!("l{i}"))], meta())
                    .await
                    .unwrap();
            }
        })
    };
    let mut seen = Vec::new();
    while seen.len() < 140 {
        let e = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("live event within 10 s")
            .unwrap()
            .unwrap();
        seen.push(e.position.0);
    }
    writer.await.unwrap();
    assert_eq!(seen, (11..=150).collect::<Vec<_>>(), "in order, exactly once, from 11");
}

#[tokio::test]
async fn two_instances_on_one_database_interleave_and_see_each_other() {
    let (pg, one) = given_a_store().await;
    let two = EventStore::start(connect(&pg.url()).await.unwrap());
    let mut sub_on_two = two.subscribe(Position::ZERO).await.unwrap();
    let (a, b) = tokio::join!(
        async {
            for i in 0..30 {
                one.append(&format!("app-x{i}"), ExpectedVersion::NoStream, vec![created(&format!("x{i}"))], meta())
                    .await
                    .unwrap();
            }
        },
        async {
            for i in 0..30 {
                two.append(&format!("app-y{i}"), ExpectedVersion::NoStream, vec![created(&format!("y{i}"))], meta())
                    .await
                    .unwrap();
            }
        }
    );
    let ((), ()) = (a, b);
    let mut n = 0;
    while n < 60 {
        let e = tokio::time::timeout(Duration::from_secs(5), sub_on_two.recv()).await.unwrap().unwrap().unwrap();
        n += 1;
        assert_eq!(e.position, Position(n));
    }
    assert_eq!(one.verify().await.unwrap().events, 60);
}

#[tokio::test]
async fn postgres_unreachable_is_a_clear_typed_error() {
    let mut pg = Postgres::start().unwrap();
    let url = pg.url();
    let pool = connect(&url).await.unwrap();
    store::migrate(&pool).await.unwrap();
    let store = EventStore::start(pool);
    store.append("app-a", ExpectedVersion::NoStream, vec![created("a")], meta()).await.unwrap();
    pg.stop();
    let err = store.append("app-b", ExpectedVersion::NoStream, vec![created("b")], meta()).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.to_string().starts_with("Postgres is unreachable"), "{err}");
    let err = connect(&url).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(!err.to_string().contains("postgres://"), "no URL in errors: {err}");
}

#[tokio::test]
async fn a_postgres_restart_between_appends_costs_a_retry_not_an_error() {
    let mut pg = Postgres::start().unwrap();
    let pool = connect(&pg.url()).await.unwrap();
    store::migrate(&pool).await.unwrap();
    let store = EventStore::start(pool);
    store.append("app-a", ExpectedVersion::NoStream, vec![created("a")], meta()).await.unwrap();
    store.append("app-b", ExpectedVersion::NoStream, vec![created("b")], meta()).await.unwrap();
    // The writer's connection dies with the server; the next round finds out, takes a fresh
    // one and goes through.
    pg.restart().unwrap();
    let c = store.append("app-c", ExpectedVersion::NoStream, vec![created("c")], meta()).await.unwrap();
    assert_eq!(c.positions, vec![Position(3)]);
    store.append("app-a", ExpectedVersion::Exact(0), vec![changed("a")], meta()).await.unwrap();
    let report = store.verify().await.unwrap();
    assert_eq!((report.events, report.head), (4, Position(4)));
    // The pool's connections were idle across the restart: each is checked before it is
    // lent, so readers see no error either.
    pg.restart().unwrap();
    for _ in 0..20 {
        assert_eq!(store.read_all(Position::ZERO, 10).await.unwrap().len(), 4);
    }
}

#[tokio::test]
async fn recorded_events_fold_into_the_state() {
    let (_pg, store) = given_a_store().await;
    store.append("app-a", ExpectedVersion::NoStream, vec![created("a")], meta()).await.unwrap();
    let del = NewEvent { event_id: Uuid::new_v4(), event: Event::AppDeleted(AppDeleted { app: app("a") }) };
    store.append("app-a", ExpectedVersion::Exact(0), vec![del], meta()).await.unwrap();
    let mut state = sluice_events::AuthState::new();
    for e in store.read_all(Position::ZERO, 10).await.unwrap() {
        state.apply(&e).unwrap();
    }
    assert_eq!(state.position(), Position(2));
    assert!(state.apps.is_empty());
}

#[tokio::test]
async fn a_large_append_spans_several_statements_in_one_transaction() {
    let (_pg, store) = given_a_store().await;
    store.append("app-a", ExpectedVersion::NoStream, vec![created("a")], meta()).await.unwrap();
    // ~5,000 events of ~1 KB each: several INSERT statements, one commit, one chain.
    let big: Vec<NewEvent> = (0..5000)
        .map(|_| NewEvent {
            event_id: Uuid::new_v4(),
            event: sluice_events::event::StreamUpdated {
                app: app("a"),
                name: sluice_events::StreamName::parse("cam1").unwrap(),
                publish_name: None,
                description: Some("x".repeat(1000)),
            }
            .into(),
        })
        .collect();
    let a = store.append("stream-a.cam1", ExpectedVersion::NoStream, big, meta()).await.unwrap();
    assert_eq!(a.positions.first(), Some(&Position(2)));
    assert_eq!(a.positions.last(), Some(&Position(5001)));
    assert_eq!(a.stream_version, Some(4999));
    assert_eq!(store.verify().await.unwrap().events, 5001);
}

#[tokio::test]
async fn a_new_first_event_followed_by_a_logged_one_is_refused_alone() {
    let (_pg, store) = given_a_store().await;
    let old = created("a");
    store.append("app-a", ExpectedVersion::NoStream, vec![old.clone()], meta()).await.unwrap();
    // The first id is new, the second is already in the log: only the insert can notice,
    // and the batch is decided again with every id probed. Concurrent good appends commit.
    let mixed = vec![changed("a"), old];
    let (bad, good) = tokio::join!(
        store.append("app-a", ExpectedVersion::Any, mixed.clone(), meta()),
        store.append("app-b", ExpectedVersion::NoStream, vec![created("b")], meta()),
    );
    assert_eq!(bad.unwrap_err(), StoreError::IdempotencyMismatch { event_id: mixed[0].event_id });
    assert_eq!(good.unwrap().positions, vec![Position(2)]);
    assert_eq!(store.verify().await.unwrap().events, 2);
}

#[tokio::test]
async fn after_the_first_append_the_writer_appends_in_one_statement_with_the_same_checks() {
    let (_pg, store) = given_a_store().await;
    let paths = |s: &EventStore| s.append_paths();
    store.append("app-a", ExpectedVersion::NoStream, vec![created("a")], meta()).await.unwrap();
    assert_eq!((paths(&store).general, paths(&store).one_statement), (1, 0), "the head is read first");
    // From now on the writer knows the head and app-a's version.
    let b = store.append("app-b", ExpectedVersion::NoStream, vec![created("b")], meta()).await.unwrap();
    let a = store.append("app-a", ExpectedVersion::Exact(0), vec![changed("a")], meta()).await.unwrap();
    let any = store.append("app-a", ExpectedVersion::Any, vec![changed("a")], meta()).await.unwrap();
    assert_eq!((b.positions, a.positions, any.positions), (vec![Position(2)], vec![Position(3)], vec![Position(4)]));
    assert_eq!(any.stream_version, Some(2));
    assert_eq!((paths(&store).general, paths(&store).one_statement), (1, 3), "one statement each");
    // A conflict may be a retry, which only the general path's id probe can tell.
    let err = store.append("app-a", ExpectedVersion::Exact(0), vec![changed("a")], meta()).await.unwrap_err();
    assert_eq!(
        err,
        StoreError::Conflict { stream: "app-a".into(), expected: ExpectedVersion::Exact(0), actual: Some(2) }
    );
    let err = store.append("app-b", ExpectedVersion::NoStream, vec![created("b")], meta()).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { actual: Some(0), .. }), "{err:?}");
    assert_eq!(paths(&store).general, 3);
    // A retried id whose expectation still holds: the unique index catches it in the one
    // statement, and the general path answers with the original positions.
    let first = changed("a");
    let a3 = store.append("app-a", ExpectedVersion::Any, vec![first.clone()], meta()).await.unwrap();
    assert_eq!(paths(&store).one_statement, 4);
    let again = store.append("app-a", ExpectedVersion::Any, vec![first], meta()).await.unwrap();
    assert_eq!((again.positions, again.duplicate), (a3.positions, true));
    assert_eq!(paths(&store).general, 4);
    // Any on a stream the writer has not seen needs its version read: the general path.
    store.append("app-new", ExpectedVersion::Any, vec![created("new")], meta()).await.unwrap();
    assert_eq!(paths(&store).general, 5);
    let report = store.verify().await.unwrap();
    assert_eq!((report.events, report.head), (6, Position(6)));
    assert_eq!(
        store.read_stream("app-a").await.unwrap().iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
}

#[tokio::test]
async fn another_writer_appending_makes_the_belief_stale_and_the_checks_still_hold() {
    let (pg, one) = given_a_store().await;
    let two = EventStore::start(connect(&pg.url()).await.unwrap());
    one.append("app-a", ExpectedVersion::NoStream, vec![created("a")], meta()).await.unwrap();
    one.append("app-b", ExpectedVersion::NoStream, vec![created("b")], meta()).await.unwrap();
    assert_eq!(one.append_paths().one_statement, 1);
    // The other instance moves app-a on; `one` still believes app-a is at version 0.
    two.append("app-a", ExpectedVersion::Exact(0), vec![changed("a")], meta()).await.unwrap();
    let err = one.append("app-a", ExpectedVersion::Exact(0), vec![changed("a")], meta()).await.unwrap_err();
    assert_eq!(
        err,
        StoreError::Conflict { stream: "app-a".into(), expected: ExpectedVersion::Exact(0), actual: Some(1) }
    );
    assert_eq!(one.append_paths().general, 2, "the stale head sent it to the general path, which read the truth");
    let next = one.append("app-a", ExpectedVersion::Exact(1), vec![changed("a")], meta()).await.unwrap();
    assert_eq!((next.positions, next.stream_version), (vec![Position(4)], Some(2)));
    assert_eq!(one.append_paths().one_statement, 2, "and the belief holds again");
    let report = one.verify().await.unwrap();
    assert_eq!((report.events, report.head), (4, Position(4)));
}

#[tokio::test]
async fn streams_the_writer_has_not_seen_are_caught_by_the_index_or_checked() {
    let (pg, before) = given_a_store().await;
    before.append("app-a", ExpectedVersion::NoStream, vec![created("a")], meta()).await.unwrap();
    before.append("app-b", ExpectedVersion::NoStream, vec![created("b")], meta()).await.unwrap();
    // A restarted control plane: it learns the head on its first append, nothing of app-a/b.
    let store = EventStore::start(connect(&pg.url()).await.unwrap());
    store.append("app-c", ExpectedVersion::NoStream, vec![created("c")], meta()).await.unwrap();
    assert_eq!((store.append_paths().general, store.append_paths().one_statement), (1, 0));
    // Believed absent: version 0 collides with app-a's on the (stream, version) index, nothing
    // is written, and the general path answers with the conflict.
    let err = store.append("app-a", ExpectedVersion::NoStream, vec![created("a")], meta()).await.unwrap_err();
    assert_eq!(
        err,
        StoreError::Conflict { stream: "app-a".into(), expected: ExpectedVersion::NoStream, actual: Some(0) }
    );
    assert_eq!((store.append_paths().general, store.append_paths().one_statement), (2, 0));
    // Only an `Exact` expectation vouches for app-b's version: the statement checks it (5 is
    // above app-b's 0, and writing version 6 would leave a gap in the stream).
    let err = store.append("app-b", ExpectedVersion::Exact(5), vec![changed("b")], meta()).await.unwrap_err();
    assert_eq!(
        err,
        StoreError::Conflict { stream: "app-b".into(), expected: ExpectedVersion::Exact(5), actual: Some(0) }
    );
    assert_eq!((store.append_paths().general, store.append_paths().one_statement), (3, 0));
    // A true belief goes through in one statement.
    store.append("app-b", ExpectedVersion::Exact(0), vec![changed("b")], meta()).await.unwrap();
    assert_eq!(store.append_paths().one_statement, 1);
    assert_eq!(store.read_stream("app-b").await.unwrap().iter().map(|e| e.version).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(store.verify().await.unwrap().events, 4);
}

#[tokio::test]
async fn the_one_statement_append_refuses_a_stale_head_or_stream_version() {
    let (_pg, store) = given_a_store().await;
    let a = store.append("app-a", ExpectedVersion::NoStream, vec![created("a")], meta()).await.unwrap();
    let head = store.read_all(Position::ZERO, 1).await.unwrap().remove(0);
    assert_eq!(head.position, a.positions[0]);
    let call = |head: Option<i64>, hash: Option<Vec<u8>>, version: Option<i64>| {
        sqlx::query_scalar::<_, bool>(
            "SELECT sluice_append_at(1, $1, $2, ARRAY['app-a'], ARRAY[$3::bigint], '{}', '{}', '{}', '{}', '{}', \
             '{}', '{}', '{}', '{}', '{}', '{}')",
        )
        .bind(head)
        .bind(hash)
        .bind(version)
        .fetch_one(store.pool())
    };
    let hash = head.hash.0.to_vec();
    assert!(call(Some(1), Some(hash.clone()), Some(0)).await.unwrap(), "all beliefs true");
    assert!(!call(None, None, Some(0)).await.unwrap(), "the log is not empty");
    assert!(!call(Some(1), Some(vec![0; 32]), Some(0)).await.unwrap(), "another hash at the head");
    assert!(!call(Some(1), Some(hash.clone()), Some(1)).await.unwrap(), "app-a is at version 0, not 1");
    assert!(!call(Some(1), Some(hash), None).await.unwrap(), "app-a exists");
    assert_eq!(store.verify().await.unwrap().events, 1);
}

/// A row of `events` as the releases before partitioning stored it.
type OldRow = (i64, Uuid, String, i64, String, i16, String, String, chrono::DateTime<chrono::Utc>, Vec<u8>);

#[tokio::test]
async fn a_log_written_before_partitioning_becomes_its_first_partition() {
    // A log written by the current store, copied row for row into a database migrated only
    // as far as the release before partitioning: what an upgrade finds.
    let pg = Postgres::start().unwrap();
    let new_url = pg.create_database("current").await.unwrap();
    let old_url = pg.create_database("upgraded").await.unwrap();
    let current = connect(&new_url).await.unwrap();
    store::migrate(&current).await.unwrap();
    let writer = EventStore::start(current.clone());
    for i in 0..30 {
        writer
            .append(&format!("app-a{i}"), ExpectedVersion::NoStream, vec![created(&format!("a{i}"))], meta())
            .await
            .unwrap();
    }
    writer.append("app-a0", ExpectedVersion::Exact(0), vec![changed("a0")], meta()).await.unwrap();
    let old = connect(&old_url).await.unwrap();
    let mut before = sqlx::migrate!("../migrations");
    let releases = before.migrations.len();
    before.migrations = std::borrow::Cow::Owned(before.migrations[..releases - 1].to_vec());
    before.run(&old).await.unwrap();
    let rows: Vec<OldRow> = sqlx::query_as(
        "SELECT position, event_id, stream, version, type, type_version, data::text, metadata::text, recorded_at, \
             hash FROM events ORDER BY position",
    )
    .fetch_all(&current)
    .await
    .unwrap();
    for r in &rows {
        sqlx::query(
            "INSERT INTO events (position, event_id, stream, version, type, type_version, data, metadata, recorded_at, \
             hash) VALUES ($1, $2, $3, $4, $5, $6, $7::json, $8::json, $9, $10)",
        )
        .bind(r.0)
        .bind(r.1)
        .bind(&r.2)
        .bind(r.3)
        .bind(&r.4)
        .bind(r.5)
        .bind(&r.6)
        .bind(&r.7)
        .bind(r.8)
        .bind(&r.9)
        .execute(&old)
        .await
        .unwrap();
    }
    // The upgrade: the old table becomes the first partition, nothing copied.
    store::migrate(&old).await.unwrap();
    let parts: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT name, from_position, to_position FROM log_partitions").fetch_all(&old).await.unwrap();
    assert_eq!(parts, vec![("events_legacy".to_owned(), 1, 1_000_001)]);
    let upgraded = EventStore::start(old.clone());
    let report = upgraded.verify().await.unwrap();
    assert_eq!(report.head, Position(rows.len() as u64));
    // It appends on, with the versions and ids the old rows hold.
    let err = upgraded.append("app-a1", ExpectedVersion::NoStream, vec![created("a1")], meta()).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    let next = upgraded.append("app-a0", ExpectedVersion::Exact(1), vec![changed("a0")], meta()).await.unwrap();
    assert_eq!(next.stream_version, Some(2));
    // Still append-only through the parent.
    assert!(sqlx::query("DELETE FROM events WHERE position = 1").execute(&old).await.is_err());
    assert!(sqlx::query("TRUNCATE events_legacy").execute(&old).await.is_err());
    assert_eq!(upgraded.verify().await.unwrap().head, Position(rows.len() as u64 + 1));
}

#[tokio::test]
async fn ids_and_versions_stay_unique_across_partitions() {
    let (pg, _) = given_a_store().await;
    let pool = connect(&pg.url()).await.unwrap();
    // Three positions a partition: every append below crosses into older partitions.
    sqlx::query("UPDATE log_settings SET partition_size = 3").execute(&pool).await.unwrap();
    let store = EventStore::start(pool.clone());
    let first = created("a");
    let retry = NewEvent { event_id: first.event_id, event: first.event.clone() };
    store.append("app-a", ExpectedVersion::NoStream, vec![first], meta()).await.unwrap();
    for i in 0..8 {
        store
            .append(&format!("app-b{i}"), ExpectedVersion::NoStream, vec![created(&format!("b{i}"))], meta())
            .await
            .unwrap();
    }
    let parts: i64 = sqlx::query_scalar("SELECT count(*) FROM log_partitions").fetch_one(&pool).await.unwrap();
    assert_eq!(parts, 3);
    // A fresh writer (no belief) and the one that wrote: a retry of the first event is the
    // same event, not a second one; a second "first" version of app-a is a conflict.
    for (round, s) in [EventStore::start(connect(&pg.url()).await.unwrap()), store.clone()].into_iter().enumerate() {
        // One unrelated append first: the writer learns the head, so what follows takes the
        // one-statement path with app-a believed absent, and only the check can tell.
        s.append(&format!("app-c{round}"), ExpectedVersion::NoStream, vec![created(&format!("c{round}"))], meta())
            .await
            .unwrap();
        let again = NewEvent { event_id: retry.event_id, event: retry.event.clone() };
        let r = s.append("app-a", ExpectedVersion::NoStream, vec![again], meta()).await.unwrap();
        assert!(r.duplicate && r.positions == vec![Position(1)], "{r:?}");
        let err = s.append("app-a", ExpectedVersion::NoStream, vec![created("a")], meta()).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
        let next = s.append("app-b0", ExpectedVersion::Any, vec![created("b0")], meta()).await.unwrap();
        assert_eq!(next.stream_version, Some(round as u64 + 1), "Any continues the stream");
    }
    assert_eq!(store.verify().await.unwrap().head, Position(13));
}
