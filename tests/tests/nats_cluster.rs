//! A JetStream cluster (issue #19): three `nats-server` processes on loopback, every stream and
//! bucket with three replicas (`SLUICE_NATS_REPLICAS=3`), a control plane and two workers given
//! the list of servers. Under load (API writes, RTMP and SRT media playing, one-time tokens
//! racing on both workers) the JetStream meta leader is SIGKILLed, then the leader of
//! `SLUICE_EVENTS`, then the one of `SLUICE_DECISIONS`, one at a time, each restarted after
//! 20 s. No media session drops, every acknowledged write reaches both workers, every decision
//! reaches the log exactly once, and no one-time token is admitted twice.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::NatsCluster;

mod cluster;
use cluster::*;

const KILLED_FOR: Duration = Duration::from_secs(20);

/// Each raced token: how many workers admitted it, and the two answers' reasons.
type Races = HashMap<String, (usize, Vec<String>)>;

/// Waits (up to 30 s) until the worker with admin `port` has applied `position`.
async fn applied(http: &reqwest::Client, port: u16, position: u64) -> bool {
    let url = format!("http://127.0.0.1:{port}/wait?position={position}&timeout_ms=30000");
    matches!(http.get(url).bearer_auth(NODE_SECRET).send().await, Ok(r) if r.status() == 200)
}

/// The server that leads `stream` (a stream's Raft group), as JetStream reports it.
async fn stream_leader(js: &async_nats::jetstream::Context, stream: &str) -> Option<String> {
    let mut s = js.get_stream(stream).await.ok()?;
    s.info().await.ok()?.cluster.as_ref()?.leader.clone()
}

async fn spool(http: &reqwest::Client, admin: u16) -> Value {
    http.get(format!("http://127.0.0.1:{admin}/spool"))
        .bearer_auth(NODE_SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_die_one_at_a_time_and_no_promise_breaks() {
    let mut nats = NatsCluster::start(3).unwrap();
    let pg = sluice_tests::Postgres::start().unwrap();
    let url = pg.create_database("natscluster").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = sluice_control_plane::EventStore::start(sluice_control_plane::connect(&url).await.unwrap());
    let http = reqwest::Client::new();
    let cp = sluice_tests::free_port();
    let replicas = [("SLUICE_NATS_REPLICAS", "3")];
    let _control = control_with(&url, &nats.url(), cp, "cp-1", &dir.path().join("cp.log"), &replicas);
    let open = json!({"publish": {"methods": ["open"]}, "play": {"methods": ["open"]}});
    post(&http, cp, "/v1/apps", json!({"name": "c", "policy": open})).await;
    let one_time =
        json!({"publish": {"methods": ["one_time_token"]}, "play": {"methods": ["open"]}, "offline_one_time": "deny"});
    post(&http, cp, "/v1/apps", json!({"name": "ot", "policy": one_time})).await;
    // An admitted publish holds the stream for its lease (10 s): the race moves over 40 streams.
    for n in 0..40 {
        post(&http, cp, "/v1/apps/ot/streams", json!({"name": format!("cam{n}")})).await;
    }
    let workers: Vec<(u16, u16, u16, std::path::PathBuf, sluice_tests::Running)> = ["w1", "w2"]
        .iter()
        .map(|node| {
            let (admin, rtmp, srt) = (sluice_tests::free_port(), sluice_tests::free_port(), sluice_tests::free_port());
            let (rtmp_listen, srt_listen) = (format!("127.0.0.1:{rtmp}"), format!("127.0.0.1:{srt}"));
            let log = dir.path().join(format!("{node}.log"));
            let settings = [
                ("SLUICE_NATS_REPLICAS", "3"),
                ("SLUICE_RTMP_LISTEN", rtmp_listen.as_str()),
                ("SLUICE_SRT_LISTEN", srt_listen.as_str()),
            ];
            let running = worker_with(&nats.url(), admin, &dir.path().join(node), node, &log, &settings);
            (admin, rtmp, srt, log, running)
        })
        .collect();
    let (w1, w2) = (&workers[0], &workers[1]);
    ready_at_head(&http, &store, w1.0).await;
    ready_at_head(&http, &store, w2.0).await;
    // Every stream and bucket has three replicas.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url_of(0)).await.unwrap());
    until("SLUICE_EVENTS and SLUICE_DECISIONS have leaders", || async {
        stream_leader(&js, sluice_events::dist::EVENTS_STREAM).await.is_some()
            && stream_leader(&js, sluice_events::dist::DECISIONS_STREAM).await.is_some()
    })
    .await;
    for stream in [sluice_events::dist::EVENTS_STREAM, sluice_events::dist::DECISIONS_STREAM] {
        let mut s = js.get_stream(stream).await.unwrap();
        assert_eq!(s.info().await.unwrap().config.num_replicas, 3, "{stream}");
    }

    // Media on both workers, for longer than the whole test: RTMP on w1, SRT on w2.
    let rtmp = format!("rtmp://127.0.0.1:{}/c/cam", w1.1);
    let srt_publish = srt_url(w2.2, "#!::r=c/scam,m=publish");
    let srt_play = srt_url(w2.2, "#!::r=c/scam,m=request");
    let mut media = vec![
        ffmpeg_testsrc("flv", &rtmp, 240).spawn().unwrap(),
        ffmpeg_testsrc("mpegts", &srt_publish, 240).spawn().unwrap(),
    ];
    until_live(&http, cp, "c", "cam").await;
    until_live(&http, cp, "c", "scam").await;
    for source in [rtmp.as_str(), srt_play.as_str()] {
        let player = Command::new("ffmpeg")
            .args(["-hide_banner", "-nostdin", "-rw_timeout", "30000000", "-i", source, "-t", "240", "-f", "null", "-"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        media.push(player);
    }

    // Load for the whole test: registrations through the API (the acknowledged ones noted),
    // and one-time tokens raced on both workers at once.
    let acknowledged: Arc<Mutex<Vec<u64>>> = Arc::default();
    let admitted: Arc<Mutex<Races>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (http, acknowledged, stop) = (http.clone(), acknowledged.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let r = http
                    .post(format!("http://127.0.0.1:{cp}/v1/apps/c/streams"))
                    .bearer_auth(ADMIN)
                    .json(&json!({"name": format!("s{n}")}))
                    .send()
                    .await;
                if let Ok(r) = r
                    && r.status() == 201
                    && let Some(p) = r.headers().get("sluice-position").and_then(|v| v.to_str().ok()?.parse().ok())
                {
                    acknowledged.lock().unwrap().push(p);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let racer = {
        let (http, admitted, stop) = (http.clone(), admitted.clone(), stop.clone());
        let (a1, a2) = (w1.0, w2.0);
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let stream = format!("cam{}", n % 40);
                let r = http
                    .post(format!("http://127.0.0.1:{cp}/v1/apps/ot/streams/{stream}/tokens"))
                    .bearer_auth(ADMIN)
                    .json(&json!({"action": "publish"}))
                    .send()
                    .await;
                let Ok(r) = r else { continue };
                let position: Option<u64> =
                    r.headers().get("sluice-position").and_then(|v| v.to_str().ok()?.parse().ok());
                let Ok(t) = r.json::<Value>().await else { continue };
                // A token reaches the workers through the log: race it once both have it.
                let Some(position) = position else { continue };
                let (seen1, seen2) = tokio::join!(applied(&http, a1, position), applied(&http, a2, position));
                if !(seen1 && seen2) {
                    continue;
                }
                let Some(token) = t["token"].as_str().map(str::to_owned) else { continue };
                let body = json!({"app": "ot", "stream": format!("{stream}?token={token}"), "action": "publish", "client_ip": "203.0.113.5"});
                let (a, b) = tokio::join!(decide(&http, a1, body.clone()), decide(&http, a2, body));
                let allowed = [a.0, b.0].iter().filter(|c| **c == 200).count();
                let reasons = [a, b].iter().map(|(_, d)| d["reason"].as_str().unwrap_or("none").to_owned()).collect();
                admitted.lock().unwrap().insert(token, (allowed, reasons));
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };

    // One leader at a time: killed, 20 s, restarted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut killed = Vec::new();
    for what in ["meta", sluice_events::dist::EVENTS_STREAM, sluice_events::dist::DECISIONS_STREAM] {
        let leader = if what == "meta" {
            nats.meta_leader()
        } else {
            let mut found = None;
            for i in 0..3 {
                let Ok(client) = async_nats::connect(nats.url_of(i)).await else { continue };
                found = stream_leader(&async_nats::jetstream::new(client), what).await;
                if found.is_some() {
                    break;
                }
            }
            found
        };
        let leader = leader.unwrap_or_else(|| panic!("no leader for {what}"));
        let i = nats.index_of(&leader).unwrap();
        nats.kill(i);
        killed.push(format!("{what}: {leader}"));
        tokio::time::sleep(KILLED_FOR).await;
        nats.restart(i).unwrap();
        assert!(
            sluice_tests::eventually(Duration::from_secs(30), || nats.meta_leader().is_some()),
            "the cluster has a meta leader again after {leader} came back"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    racer.await.unwrap();

    // No media session dropped.
    for (n, m) in media.iter_mut().enumerate() {
        assert!(m.try_wait().unwrap().is_none(), "media process {n} ended during the kills ({killed:?})");
    }
    // Every acknowledged write reached both workers, and their tables are the control plane's.
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() > 100, "{} writes acknowledged", acknowledged.len());
    let last = *acknowledged.iter().max().unwrap();
    for (admin, ..) in &workers {
        ready_at(&http, *admin, last).await;
    }
    until("both workers' tables match the control plane's", || async {
        let (_, nodes) = get(&http, format!("http://127.0.0.1:{cp}/v1/nodes")).await;
        let nodes = nodes["nodes"].as_array().cloned().unwrap_or_default();
        nodes.len() == 2 && nodes.iter().all(|n| n["digest_match"] == true && n["stale"] == false)
    })
    .await;
    // No one-time token admitted twice; most were admitted once.
    let admitted = admitted.lock().unwrap().clone();
    assert!(admitted.values().all(|(n, _)| *n <= 1), "a token admitted twice: {admitted:?}");
    // Refused only where the policy says so: the loser of a race, or no quorum (`deny`).
    let explained = ["allowed", "token_consumed", "one_time_unavailable"];
    let odd: Vec<_> = admitted.values().filter(|(_, r)| r.iter().any(|r| !explained.contains(&r.as_str()))).collect();
    assert!(odd.is_empty(), "refusals the policy does not explain: {odd:?}");
    let once = admitted.values().filter(|(n, _)| *n == 1).count();
    assert!(once * 2 > admitted.len(), "{once} of {} tokens admitted: {admitted:?}", admitted.len());
    // Every decision reached the log exactly once: each worker's spool drains, and the log
    // holds one record per spooled decision, no id twice.
    for (admin, _, _, _, _) in &workers {
        until("the spool is confirmed", || async { spool(&http, *admin).await["backlog"] == 0 }).await;
    }
    for (node, (admin, ..)) in ["w1", "w2"].iter().zip(&workers) {
        let records = decision_records(&store, node).await;
        let ids: std::collections::HashSet<_> = records.iter().map(|r| r.decision.id).collect();
        assert_eq!(ids.len(), records.len(), "{node}: a decision recorded twice");
        let durable = spool(&http, *admin).await["durable"].as_u64().unwrap();
        assert_eq!(records.len() as u64, durable, "{node}: {durable} decisions spooled");
    }
    // The workers received the events that change their tables, never a decision or the API
    // audit: their consumers filter on `WORKER_SUBJECTS`, and skipped part of the stream.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url_of(0)).await.unwrap());
    let stream = js.get_stream(sluice_events::dist::EVENTS_STREAM).await.unwrap();
    let mut consumers = stream.consumers();
    let mut seen = 0;
    while let Some(info) = futures::StreamExt::next(&mut consumers).await {
        let info = info.unwrap();
        let mut filters = info.config.filter_subjects.clone();
        filters.sort();
        let mut wanted: Vec<String> = sluice_events::dist::WORKER_SUBJECTS.iter().map(|s| (*s).to_owned()).collect();
        wanted.sort();
        assert_eq!(filters, wanted, "{info:?}");
        // A consumer a worker gave up on while a server was down (its delete failed) lingers,
        // undelivered, until its inactive threshold: it has the filter, and delivered nothing.
        if info.delivered.consumer_sequence > 0 {
            assert!(info.delivered.consumer_sequence < info.delivered.stream_sequence, "{info:?}");
            seen += 1;
        }
    }
    assert!(seen >= 2, "one consumer per worker");
    for mut m in media {
        let _ = m.kill();
        let _ = m.wait();
    }
    drop(workers);
}

/// A stream made with other replicas than `SLUICE_NATS_REPLICAS` asks for is refused with what
/// to do, not used as it is (a bucket with one replica on a cluster loses its data with one
/// server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_other_replicas_is_refused_naming_the_fix() {
    let plane = Plane::start("replicas").await;
    let js = async_nats::jetstream::new(async_nats::connect(plane.nats.url()).await.unwrap());
    until("the relay made SLUICE_EVENTS", || async { js.get_stream(sluice_events::dist::EVENTS_STREAM).await.is_ok() })
        .await;
    drop(plane.control);
    let log = plane.dir.path().join("cp3.log");
    let port = sluice_tests::free_port();
    let _cp = control_with(&plane.url, &plane.nats.url(), port, "cp-3", &log, &[("SLUICE_NATS_REPLICAS", "3")]);
    until("the relay refuses the stream", || async {
        read(&log).contains("SLUICE_EVENTS has 1 replica(s) but SLUICE_NATS_REPLICAS is 3")
    })
    .await;
    assert!(read(&log).contains("nats stream edit SLUICE_EVENTS --replicas 3"), "{}", read(&log));
}
