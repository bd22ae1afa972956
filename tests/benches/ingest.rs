//! `cargo bench -p sluice-tests --bench ingest`
//!
//! The audit loop against a real Postgres 15 (fsync and synchronous_commit on) and a real
//! NATS JetStream:
//! - **ingestion**: 100,000 decisions of one node are put in `SLUICE_DECISIONS` first (as a
//!   worker's spool would after an outage), then the control plane's ingester is started and
//!   timed until every one is appended to the log (decode, append in batches, ack, mark);
//! - **explain**: with the decisions read model caught up and access-table checkpoints every
//!   10,000 events, `explain` of 300 decisions spread over the log (so each rebuild decodes
//!   a checkpoint and replays up to 10,000 events), p50/p99.
//!
//! The state holds one app with 1,000 registered streams. Results are printed.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use sluice_control_plane::projection::Projection;
use sluice_control_plane::store::{self, ExpectedVersion};
use sluice_control_plane::{EventStore, connect, decisions, ingest};
use sluice_events::decision::RecordedRequest;
use sluice_events::event::{AppCreated, StreamRegistered};
use sluice_events::{
    AccessRequest, Action, AppName, Credential, Decision, DecisionRecord, Event, Keyring, Metadata, Method, NewEvent,
    NodeId, Outcome, Policy, Position, Protocol, Reason, SealingKey, StreamName, Timestamp, dist,
};
use sluice_tests::{Durability, Nats, Postgres};
use uuid::Uuid;

const DECISIONS: u64 = 100_000;
const STREAMS: usize = 1000;
const CHECKPOINT_EVERY: u64 = 10_000;
const EXPLAINS: usize = 300;

fn record(i: u64, node: &NodeId) -> DecisionRecord {
    let stream = StreamName::parse(&format!("cam{}", i as usize % STREAMS)).unwrap();
    let req = AccessRequest {
        id: Uuid::new_v4(),
        app: AppName::parse("live").unwrap(),
        stream: stream.clone(),
        action: Action::Play,
        protocol: Protocol::Rtmp,
        client_ip: "198.51.100.7".parse().unwrap(),
        credential: Credential::default(),
        client_id: None,
    };
    DecisionRecord {
        decision: Decision {
            id: req.id,
            outcome: Outcome::Allow,
            reason: Reason::Allowed,
            method: Some(Method::Open),
            subject: None,
            stream,
            // Decided on the state as it stood near where the decision lands in the log.
            position: Position(STREAMS as u64 + 1 + i),
            effects: vec![],
        },
        allowed: true,
        final_reason: Reason::Allowed,
        request: RecordedRequest::record(&req, None, [0; 24]),
        decided_at: Timestamp(1_900_000_000_000),
        node: Some(node.clone()),
        webhook: None,
        sequence: Some(i + 1),
        publisher_slot: None,
        repeats: None,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run());
}

async fn run() {
    let pg = Postgres::start_with(Durability::Durable).unwrap();
    let nats = Nats::start().unwrap();
    let pool = connect(&pg.url()).await.unwrap();
    store::migrate(&pool).await.unwrap();
    let store = EventStore::start(pool);
    let live = AppName::parse("live").unwrap();
    let created: Event = AppCreated { app: live.clone(), policy: Policy::default() }.into();
    store
        .append(
            &created.log_stream(),
            ExpectedVersion::NoStream,
            vec![NewEvent { event_id: Uuid::new_v4(), event: created }],
            Metadata::default(),
        )
        .await
        .unwrap();
    for i in 0..STREAMS {
        let e: Event = StreamRegistered {
            plays: None,
            app: live.clone(),
            name: StreamName::parse(&format!("cam{i}")).unwrap(),
            publish_name: None,
            description: None,
        }
        .into();
        store
            .append(
                &e.log_stream(),
                ExpectedVersion::NoStream,
                vec![NewEvent { event_id: Uuid::new_v4(), event: e }],
                Metadata::default(),
            )
            .await
            .unwrap();
    }
    let key = SealingKey::from_base64("c2x1aWNlLXRlc3Qtc2VhbGluZy1rZXktMzItYnl0ZXM=").unwrap();
    let keyring = Arc::new(Keyring::new(key));
    let projection = Projection::start(&store, Some(keyring.clone())).await.unwrap();

    // The backlog, as a worker's uplink publishes it.
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    ingest::ensure_decisions_stream(&js).await.unwrap();
    let node = NodeId::parse("bench-1").unwrap();
    let spool = Uuid::new_v4().to_string();
    let subject = dist::decision_subject(&node);
    let mut ids = Vec::with_capacity(DECISIONS as usize);
    let started = Instant::now();
    let mut acks = Vec::new();
    for i in 0..DECISIONS {
        let r = record(i, &node);
        ids.push(r.decision.id);
        let mut headers = HeaderMap::new();
        headers.insert(dist::HEADER_SPOOL, spool.as_str());
        headers.insert(dist::HEADER_SEQUENCE, (i + 1).to_string().as_str());
        let msg = PublishMessage::build()
            .payload(serde_json::to_vec(&r).unwrap().into())
            .headers(headers)
            .message_id(r.decision.id.to_string());
        acks.push(js.send_publish(subject.clone(), msg).await.unwrap());
        if acks.len() == 512 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap();
    }
    let publish_secs = started.elapsed().as_secs_f64();
    println!("publish {DECISIONS} decisions to SLUICE_DECISIONS: {:.0}/s", DECISIONS as f64 / publish_secs);

    let head_before = store.head().await.unwrap().0;
    let started = Instant::now();
    let tasks = sluice_control_plane::task::Tasks::new();
    let status = ingest::spawn(&tasks, store.clone(), projection.clone(), nats.url());
    let mut status = status;
    status.wait_for(|s| s.appended >= DECISIONS).await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(store.head().await.unwrap().0, head_before + DECISIONS, "every decision appended once");
    println!(
        "ingest {DECISIONS} decisions into the log (durable): {:.2} s, {:.0} decisions/s",
        secs,
        DECISIONS as f64 / secs
    );

    decisions::spawn(&tasks, store.clone(), keyring.clone(), CHECKPOINT_EVERY);
    let head = store.head().await.unwrap();
    let started = Instant::now();
    while decisions::checkpoint(store.pool()).await.unwrap() < head {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("decisions read model: {DECISIONS} rows projected in {:.2} s", started.elapsed().as_secs_f64());
    // The projector took a state checkpoint at every 10,000th position on its way.

    let mut times = Vec::with_capacity(EXPLAINS);
    let mut replayed = Vec::with_capacity(EXPLAINS);
    for k in 0..EXPLAINS {
        let id = ids[(k * 7919) % ids.len()];
        let t = Instant::now();
        let e = decisions::explain(&store, &keyring, id).await.unwrap();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(e.matches, "{e:?}");
        replayed.push(e.events_replayed);
    }
    times.sort_by(f64::total_cmp);
    replayed.sort_unstable();
    println!(
        "explain ({EXPLAINS} decisions, checkpoint every {CHECKPOINT_EVERY} events, {STREAMS} streams): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; events replayed p50 {} max {}",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times[times.len() - 1],
        replayed[replayed.len() / 2],
        replayed[replayed.len() - 1]
    );

    // The worst case the target names: 9,999 events that do change the tables after the
    // newest checkpoint (a burst of stream registrations), then the state at the head.
    let base = store.head().await.unwrap().0;
    let writes: Vec<_> = (0..9_999)
        .map(|i| {
            let store = store.clone();
            let live = live.clone();
            async move {
                let e: Event = StreamRegistered {
                    plays: None,
                    app: live,
                    name: StreamName::parse(&format!("burst{i}")).unwrap(),
                    publish_name: None,
                    description: None,
                }
                .into();
                let new = vec![NewEvent { event_id: Uuid::new_v4(), event: e.clone() }];
                store.append(&e.log_stream(), ExpectedVersion::NoStream, new, Metadata::default()).await.unwrap();
            }
        })
        .collect();
    futures::future::join_all(writes).await;
    let head = store.head().await.unwrap();
    // Let the live projections catch up first: the measurement is of a rebuild on a quiet
    // machine, not of one sharing the two cores with their catching up.
    assert!(projection.wait_for(head, Duration::from_secs(60)).await);
    while decisions::checkpoint(store.pool()).await.unwrap() < head {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The live projector may have taken a checkpoint inside the burst; the measurement is of
    // the case without one.
    sqlx::query("DELETE FROM state_checkpoints WHERE position > $1")
        .bind(base as i64)
        .execute(store.pool())
        .await
        .unwrap();
    let mut worst = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (state, from, replayed) = decisions::state_at(&store, &keyring, head).await.unwrap();
        worst.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(from <= base && replayed >= 9_999 && state.position() == head);
    }
    worst.sort_by(f64::total_cmp);
    println!(
        "rebuild over 9,999 table-changing events after the newest checkpoint ({} streams): median {:.1} ms",
        STREAMS + 9_999,
        worst[2]
    );
}
