//! Decisions back into the log, end to end with the real binaries, Postgres and NATS: every
//! decision a worker answers is in the log exactly once, through a stopped control plane, a
//! NATS outage of 30 s and a worker killed mid-outage; one-time tokens are used once across
//! workers, and while NATS is away the app's `offline_one_time` policy decides.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_control_plane::EventStore;
use sluice_events::{DecisionRecord, Event, Sha256Digest};
use sluice_tests::{Nats, Postgres, free_port};

mod cluster;
use cluster::*;

async fn raw_decide(http: &reqwest::Client, port: u16, body: Vec<u8>) -> (u16, Value) {
    let r = http
        .post(format!("http://127.0.0.1:{port}/v1/decide"))
        .bearer_auth(NODE_SECRET)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn play(app: &str, stream: &str) -> Value {
    json!({"app": app, "stream": stream, "action": "play", "client_ip": "198.51.100.7"})
}

/// Every decision of `node` in the log, in log order.
async fn logged(store: &EventStore, node: &str) -> Vec<DecisionRecord> {
    store
        .read_stream(&format!("decisions-{node}"))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.event {
            Event::AccessDecided(d) => Some(d.decision),
            _ => None,
        })
        .collect()
}

/// Waits until the log holds exactly `ids` for `node` (each once) and the worker's spool is
/// confirmed up to its last decision.
async fn all_logged_once(store: &EventStore, http: &reqwest::Client, node: &str, port: u16, ids: &[String]) {
    let want: HashSet<&str> = ids.iter().map(String::as_str).collect();
    until(&format!("{} decisions of {node} in the log", ids.len()), || async {
        logged(store, node).await.len() >= ids.len()
    })
    .await;
    let records = logged(store, node).await;
    let got: Vec<String> = records.iter().map(|r| r.decision.id.to_string()).collect();
    let unique: HashSet<&str> = got.iter().map(String::as_str).collect();
    assert_eq!(unique.len(), got.len(), "a decision is in the log twice");
    assert_eq!(unique, want, "the log holds exactly the decisions answered");
    // Spool sequences arrive in order and without holes.
    let seqs: Vec<u64> = records.iter().map(|r| r.sequence.unwrap()).collect();
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=seqs.len() as u64).collect::<Vec<_>>());
    until("the spool is confirmed and trimmed", || async {
        let (_, s) = get(http, format!("http://127.0.0.1:{port}/spool")).await;
        s["backlog"] == 0 && s["confirmed"] == s["durable"] && s["durable"] == ids.len() as u64
    })
    .await;
}

fn start_worker(nats: &Nats, port: u16, dir: &Path, node: &str) -> sluice_tests::Running {
    worker(&nats.url(), port, &dir.join(node), node, &dir.join(format!("{node}.log")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_reaches_the_log_exactly_once_through_outages() {
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("decisions").await.unwrap();
    let mut nats = Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let store = EventStore::start(sluice_control_plane::connect(&url).await.unwrap());
    let cp_port = free_port();
    let cp_log = dir.path().join("cp.log");
    let mut cp = Some(control(&url, &nats.url(), cp_port, "cp-1", &cp_log));
    post(&http, cp_port, "/v1/apps", json!({"name": "tv"})).await;
    let w_port = free_port();
    let mut w = Some(start_worker(&nats, w_port, dir.path(), "w1"));
    ready_at_head(&http, &store, w_port).await;

    // One allowed, one denied; both are decisions and both are recorded.
    let mut ids = Vec::new();
    let (code, allow) = decide(&http, w_port, play("tv", "cam1")).await;
    assert_eq!((code, allow["reason"].as_str()), (200, Some("allowed")), "{allow}");
    ids.push(allow["decision_id"].as_str().unwrap().to_owned());
    let (code, deny) = decide(&http, w_port, play("nope", "cam1")).await;
    assert_eq!((code, deny["reason"].as_str()), (403, Some("app_not_found")), "{deny}");
    ids.push(deny["decision_id"].as_str().unwrap().to_owned());

    // Bad input is a clear 400 (or 413) and records nothing.
    for (body, what) in [
        (b"{not json".to_vec(), "malformed JSON"),
        (br#"{"app":"tv","stream":"cam1","action":"play","client_ip":"1.2.3.4","extra":1}"#.to_vec(), "unknown field"),
        (br#"{"app":"tv","stream":"cam1","action":"play","client_ip":12}"#.to_vec(), "wrong type"),
        (br#"{"app":"tv","stream":"cam1","action":"watch","client_ip":"1.2.3.4"}"#.to_vec(), "bad action"),
        (
            br#"{"app":"tv","stream":"cam1?token=a&token=b","action":"play","client_ip":"1.2.3.4"}"#.to_vec(),
            "duplicate key",
        ),
        (br##"{"streamid":"#!::r=tv,m=publish","client_ip":"1.2.3.4"}"##.to_vec(), "bad streamid"),
    ] {
        let (code, body) = raw_decide(&http, w_port, body).await;
        assert_eq!(code, 400, "{what}: {body}");
        assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{what}: {body}");
    }
    let big = format!(r#"{{"app":"tv","stream":"{}","action":"play","client_ip":"1.2.3.4"}}"#, "a".repeat(9000));
    assert_eq!(raw_decide(&http, w_port, big.into_bytes()).await.0, 413);
    // An SRT streamid decides too.
    let (code, srt) = decide(&http, w_port, json!({"streamid": "#!::r=tv/cam2,m=request", "client_ip": "::1"})).await;
    assert_eq!(code, 200, "{srt}");
    ids.push(srt["decision_id"].as_str().unwrap().to_owned());
    all_logged_once(&store, &http, "w1", w_port, &ids).await;

    // Control plane stopped: the worker keeps deciding; the decisions wait in JetStream.
    drop(cp.take());
    for i in 0..20 {
        let (code, d) = decide(&http, w_port, play("tv", &format!("cp-down-{i}"))).await;
        assert_eq!(code, 200, "{d}");
        ids.push(d["decision_id"].as_str().unwrap().to_owned());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(logged(&store, "w1").await.len(), 3, "nothing is ingested without a control plane");
    cp = Some(control(&url, &nats.url(), cp_port, "cp-1", &cp_log));
    all_logged_once(&store, &http, "w1", w_port, &ids).await;
    until("/v1/nodes shows the worker's spool drained", || async {
        let (_, nodes) = get(&http, format!("http://127.0.0.1:{cp_port}/v1/nodes")).await;
        nodes["nodes"].as_array().is_some_and(|n| n.iter().any(|n| n["node_id"] == "w1" && n["decisions_pending"] == 0))
    })
    .await;

    // NATS stopped for 30 s: the worker keeps deciding into its spool, is killed and restarted
    // in the middle of it (booting from its local snapshot), and drains when NATS returns.
    nats.stop();
    let outage = Instant::now();
    let mut restarted = false;
    while outage.elapsed() < Duration::from_secs(30) {
        let (code, d) = decide(&http, w_port, play("tv", &format!("nats-down-{}", ids.len()))).await;
        assert_eq!(code, 200, "{d}");
        ids.push(d["decision_id"].as_str().unwrap().to_owned());
        if !restarted && outage.elapsed() > Duration::from_secs(10) {
            drop(w.take());
            w = Some(start_worker(&nats, w_port, dir.path(), "w1"));
            until("the restarted worker is ready offline", || async {
                get(&http, format!("http://127.0.0.1:{w_port}/ready")).await.0 == 200
            })
            .await;
            restarted = true;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let (_, spool) = get(&http, format!("http://127.0.0.1:{w_port}/spool")).await;
    assert!(spool["backlog"].as_u64().unwrap() > 20, "the outage's decisions wait in the spool: {spool}");
    nats.restart().unwrap();
    all_logged_once(&store, &http, "w1", w_port, &ids).await;
    assert!(store.verify().await.is_ok());
    drop(w);
    drop(cp);
}

async fn kv_has(nats_url: &str, key: &str) -> bool {
    let Ok(client) = async_nats::connect(nats_url).await else { return false };
    let js = async_nats::jetstream::new(client);
    let Ok(kv) = js.get_key_value("sluice-consumed").await else { return false };
    kv.get(key).await.ok().flatten().is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_time_token_is_used_once_across_workers_and_offline_follows_the_policy() {
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("tokens").await.unwrap();
    let mut nats = Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let store = EventStore::start(sluice_control_plane::connect(&url).await.unwrap());
    let cp_port = free_port();
    let _cp = control(&url, &nats.url(), cp_port, "cp-1", &dir.path().join("cp.log"));
    let one_time = |offline: &str| json!({"publish": {"methods": ["one_time_token"]}, "play": {"methods": ["open"]}, "offline_one_time": offline});
    let mut tokens = HashMap::new();
    for (app, offline) in [("strict", "deny"), ("relaxed", "allow_local")] {
        post(&http, cp_port, "/v1/apps", json!({"name": app, "policy": one_time(offline)})).await;
        post(&http, cp_port, &format!("/v1/apps/{app}/streams"), json!({"name": "cam1"})).await;
        for n in 0..2 {
            let t = post(&http, cp_port, &format!("/v1/apps/{app}/streams/cam1/tokens"), json!({"action": "publish"}))
                .await;
            tokens.insert((app, n), t["token"].as_str().unwrap().to_owned());
        }
    }
    let publish = |app: &str, token: &str| json!({"app": app, "stream": format!("cam1?token={token}"), "action": "publish", "client_ip": "203.0.113.5"});
    let (p1, p2) = (free_port(), free_port());
    let mut w1 = start_worker(&nats, p1, dir.path(), "w1");
    let _w2 = start_worker(&nats, p2, dir.path(), "w2");
    ready_at_head(&http, &store, p1).await;
    ready_at_head(&http, &store, p2).await;

    // The same token on two workers at once: exactly one is admitted.
    let t = &tokens[&("strict", 0)];
    let (a, b) = tokio::join!(decide(&http, p1, publish("strict", t)), decide(&http, p2, publish("strict", t)));
    let mut codes = [a.0, b.0];
    codes.sort_unstable();
    assert_eq!(codes, [200, 403], "{a:?} {b:?}");
    let loser = if a.0 == 403 { &a.1 } else { &b.1 };
    assert_eq!(loser["reason"], "token_consumed");
    assert_eq!(decide(&http, p1, publish("strict", t)).await.1["reason"], "token_consumed");
    // The consumption reaches the log once, through the decision path, and every worker's
    // state learns it.
    let digest = Sha256Digest::of(t.as_bytes());
    let token_stream = sluice_events::event::token_log(&digest);
    until("the token's consumption is in the log", || async {
        store.read_stream(&token_stream).await.unwrap().iter().any(|e| matches!(e.event, Event::TokenConsumed(_)))
    })
    .await;
    let consumed = store
        .read_stream(&token_stream)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| matches!(e.event, Event::TokenConsumed(_)))
        .count();
    assert_eq!(consumed, 1);

    // NATS away: `deny` refuses a fresh token without burning it; `allow_local` admits one
    // once on this worker and claims it cluster-wide when NATS is back. (w1 restarts in the
    // outage below: it boots from its local snapshot, so that must be written first.)
    let local_snapshot = dir.path().join("w1").join("snapshot.bin");
    until("w1 has a local snapshot", || async { local_snapshot.exists() }).await;
    nats.stop();
    let strict = &tokens[&("strict", 1)];
    let relaxed = &tokens[&("relaxed", 0)];
    let (code, d) = decide(&http, p1, publish("strict", strict)).await;
    assert_eq!((code, d["reason"].as_str()), (403, Some("one_time_unavailable")), "{d}");
    let (code, d) = decide(&http, p1, publish("relaxed", relaxed)).await;
    assert_eq!((code, d["reason"].as_str()), (200, Some("allowed")), "{d}");
    let (code, d) = decide(&http, p1, publish("relaxed", relaxed)).await;
    assert_eq!((code, d["reason"].as_str()), (403, Some("token_consumed")), "{d}");
    // Killed and restarted while NATS is still away, the worker remembers what it admitted
    // (issue #16 item 5: it admitted the token again before).
    drop(w1);
    w1 = start_worker(&nats, p1, dir.path(), "w1");
    until("the restarted worker is ready offline", || async {
        get(&http, format!("http://127.0.0.1:{p1}/ready")).await.0 == 200
    })
    .await;
    let (code, d) = decide(&http, p1, publish("relaxed", relaxed)).await;
    assert_eq!((code, d["reason"].as_str()), (403, Some("token_consumed")), "after a restart: {d}");
    // Two workers cut off from NATS both admit another token (allow_local's price): the
    // double use is flagged once NATS is back.
    let twice = &tokens[&("relaxed", 1)];
    let (c1, d1) = decide(&http, p1, publish("relaxed", twice)).await;
    let (c2, d2) = decide(&http, p2, publish("relaxed", twice)).await;
    assert_eq!((c1, c2), (200, 200), "{d1} {d2}");
    nats.restart().unwrap();
    let key = sluice_events::dist::consumed_token_key(&Sha256Digest::of(relaxed.as_bytes()));
    let nats_url = nats.url();
    until("the token admitted offline is claimed in KV", || kv_has(&nats_url, &key)).await;
    until("another worker refuses it", || async {
        decide(&http, p2, publish("relaxed", relaxed)).await.1["reason"] == "token_consumed"
    })
    .await;
    // The token refused during the outage was not burnt.
    until("the strict token works once NATS is back", || async {
        decide(&http, p2, publish("strict", strict)).await.0 == 200
    })
    .await;
    // The double use: counted by the worker that found the token claimed, and flagged on the
    // later allow in /v1/decisions and in its explanation.
    let conflicts = |port: u16| {
        let http = http.clone();
        async move { worker_metric(&http, port, "sluice_one_time_conflicts_total").await.unwrap_or(0.0) }
    };
    until("a worker counts the conflict", || async { conflicts(p1).await + conflicts(p2).await == 1.0 }).await;
    let ids = [d1["decision_id"].as_str().unwrap(), d2["decision_id"].as_str().unwrap()];
    let flagged_row = || async {
        let (_, body) = get(&http, format!("http://127.0.0.1:{cp_port}/v1/decisions?app=relaxed&outcome=allow")).await;
        let rows = body["decisions"].as_array().cloned().unwrap_or_default();
        rows.into_iter().find(|r| ids.contains(&r["id"].as_str().unwrap_or("")) && !r["conflict_with"].is_null())
    };
    until("the double use is flagged in /v1/decisions", || async { flagged_row().await.is_some() }).await;
    let flagged = flagged_row().await.unwrap();
    let other = ids.iter().find(|i| **i != flagged["id"].as_str().unwrap()).unwrap();
    assert_eq!(flagged["conflict_with"].as_str(), Some(*other), "{flagged}");
    let (_, explained) =
        get(&http, format!("http://127.0.0.1:{cp_port}/v1/decisions/{}/explain", flagged["id"].as_str().unwrap()))
            .await;
    assert_eq!(explained["conflict_with"].as_str(), Some(*other), "{explained}");
    drop(w1);
}

fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{:?}: {}", cmd, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `position P ... access_digest D` → (P, D).
fn position_and_digest(line: &str) -> (u64, String) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = |k: &str| words.iter().position(|w| *w == k).map(|i| words[i + 1].to_owned()).unwrap();
    (at("position").parse().unwrap(), at("access_digest"))
}

async fn api(http: &reqwest::Client, port: u16, path: &str) -> (u16, String) {
    let r = http.get(format!("http://127.0.0.1:{port}{path}")).bearer_auth(ADMIN).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_are_queryable_explainable_and_the_state_rebuilds_to_the_same_digest() {
    let Plane { pg: _pg, url, nats, dir, http, store, cp, control: _cp } = Plane::start("audit").await;
    let policy = json!({
        "publish": {"methods": ["one_time_token"]},
        "play": {"methods": ["open"], "cidrs": ["198.51.100.0/24"]},
    });
    post(&http, cp, "/v1/apps", json!({"name": "studio", "policy": policy})).await;
    post(&http, cp, "/v1/apps/studio/streams", json!({"name": "cam1"})).await;
    let token = post(&http, cp, "/v1/apps/studio/streams/cam1/tokens", json!({"action": "publish"})).await;
    let token = token["token"].as_str().unwrap().to_owned();
    let w = free_port();
    let _w = start_worker(&nats, w, dir.path(), "w1");
    ready_at_head(&http, &store, w).await;

    // Garbage on the decisions stream is logged and dropped; ingestion goes on.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    until("the decisions stream exists", || async { js.get_stream("SLUICE_DECISIONS").await.is_ok() }).await;
    js.publish("sluice.dec.w1", "not a decision".into()).await.unwrap().await.unwrap();
    js.publish("sluice.dec.w1", r#"{"decision":{}}"#.into()).await.unwrap().await.unwrap();

    let publish = json!({"app": "studio", "stream": format!("cam1?token={token}"), "action": "publish", "client_ip": "198.51.100.9"});
    let mut ids = Vec::new();
    for (body, code) in [
        (publish.clone(), 200),
        (publish.clone(), 403),
        (play("studio", "cam1"), 200),
        (json!({"app": "studio", "stream": "cam1", "action": "play", "client_ip": "203.0.113.9"}), 403),
    ] {
        let (got, d) = decide(&http, w, body).await;
        assert_eq!(got, code, "{d}");
        ids.push(d["decision_id"].as_str().unwrap().to_owned());
    }
    // The state moves on after the decisions (more events than a checkpoint interval, and a
    // policy that would now refuse every player): explain still answers for the past state.
    for i in 0..8 {
        post(&http, cp, "/v1/apps/studio/streams", json!({"name": format!("later{i}")})).await;
    }
    let closed =
        json!({"publish": {"methods": ["one_time_token"]}, "play": {"methods": ["open"], "cidrs": ["10.0.0.0/8"]}});
    put_policy(&http, cp, "studio", &closed).await;
    until("four decisions in the read model", || async {
        let (_, body) = api(&http, cp, "/v1/decisions?app=studio").await;
        serde_json::from_str::<Value>(&body).is_ok_and(|v| v["decisions"].as_array().is_some_and(|a| a.len() == 4))
    })
    .await;

    let cp_log = read(&dir.path().join("cp.log"));
    assert_eq!(cp_log.matches("not a decision this build can read; dropped").count(), 2, "{cp_log}");

    // Filters, newest first.
    let page = |q: &'static str| {
        let http = http.clone();
        async move {
            let (code, body) = api(&http, cp, &format!("/v1/decisions?{q}")).await;
            assert_eq!(code, 200, "{q}: {body}");
            serde_json::from_str::<Value>(&body).unwrap()
        }
    };
    let all = page("node=w1").await;
    let got: Vec<&str> = all["decisions"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(got, ids.iter().rev().map(String::as_str).collect::<Vec<_>>(), "newest first");
    assert_eq!(page("outcome=deny").await["decisions"].as_array().unwrap().len(), 2);
    let cidr = page("reason=cidr_denied").await;
    assert_eq!(cidr["decisions"][0]["client_ip"], "203.0.113.9");
    assert_eq!(cidr["decisions"][0]["id"], ids[3].as_str());
    let subnet = page("ip=198.51.100.0/24").await;
    assert_eq!(subnet["decisions"].as_array().unwrap().len(), 3);
    assert_eq!(page("ip=203.0.113.9").await["decisions"].as_array().unwrap().len(), 1);
    assert_eq!(page("app=studio&stream=cam1&outcome=allow").await["decisions"].as_array().unwrap().len(), 2);
    assert_eq!(page("since=2000-01-01T00:00:00Z&until=4102444800").await["decisions"].as_array().unwrap().len(), 4);
    assert_eq!(page("until=2000-01-01T00:00:00Z").await["decisions"].as_array().unwrap().len(), 0);
    let subject = page("reason=allowed&stream=cam1").await;
    let token_subject =
        subject["decisions"].as_array().unwrap().iter().find_map(|d| d["subject"].as_str()).unwrap().to_owned();
    assert!(token_subject.starts_with("token:"), "{token_subject}");
    // Cursor paging walks every row once.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let (_, body) = api(&http, cp, &format!("/v1/decisions?limit=3{cursor}")).await;
        let p: Value = serde_json::from_str(&body).unwrap();
        seen.extend(p["decisions"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_owned()));
        match p["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, ids.iter().rev().cloned().collect::<Vec<_>>());
    // Exports.
    let (code, csv) = api(&http, cp, "/v1/decisions?format=csv").await;
    assert_eq!(code, 200);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 5, "{csv}");
    assert!(lines[0].starts_with("id,position,state_position,node,app,stream"));
    assert!(lines[1].starts_with(&ids[3]) && lines[1].contains(",false,cidr_denied,"), "{}", lines[1]);
    let (_, nd) = api(&http, cp, "/v1/decisions?format=ndjson&outcome=allow").await;
    let rows: Vec<Value> = nd.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    // Bad queries are clear 400s.
    for q in [
        "limit=0",
        "limit=1001",
        "outcome=maybe",
        "ip=nonsense",
        "since=yesterday",
        "cursor=abc",
        "format=xml",
        "colour=red",
    ] {
        let (code, body) = api(&http, cp, &format!("/v1/decisions?{q}")).await;
        assert_eq!(code, 400, "{q}: {body}");
    }
    assert_eq!(api(&http, cp, "/v1/decisions/not-a-uuid/explain").await.0, 400);
    assert_eq!(api(&http, cp, &format!("/v1/decisions/{}/explain", uuid::Uuid::nil())).await.0, 404);
    let (code, one) = api(&http, cp, &format!("/v1/decisions/{}", ids[0])).await;
    assert_eq!(code, 200);
    assert!(!one.contains(&token), "a recorded decision never shows the credential");

    // Explain re-runs every one of them and agrees with the worker.
    let expected = [
        ("allow", "allowed", true),
        ("allow", "allowed", false),
        ("allow", "allowed", true),
        ("deny", "cidr_denied", false),
    ];
    for (id, (outcome, reason, allowed)) in ids.iter().zip(expected) {
        let (code, body) = api(&http, cp, &format!("/v1/decisions/{id}/explain")).await;
        assert_eq!(code, 200, "{body}");
        let e: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(e["matches"], true, "{e}");
        assert_eq!(
            (e["replayed"]["outcome"].as_str(), e["replayed"]["reason"].as_str()),
            (Some(outcome), Some(reason)),
            "{e}"
        );
        assert_eq!(e["allowed"], allowed, "{e}");
        assert!(!e["rule"].as_str().unwrap().is_empty());
    }
    // The second use of the token: `decide` allowed on the worker's state, the cluster-wide
    // claim refused it, and explain says so.
    let (_, body) = api(&http, cp, &format!("/v1/decisions/{}/explain", ids[1])).await;
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["final_reason"], "token_consumed");
    assert!(e["rule"].as_str().unwrap().contains("then the worker refused: token_consumed"), "{e}");
    // Rebuilt from a checkpoint, not from the start of the log.
    let (_, body) = api(&http, cp, &format!("/v1/decisions/{}/explain", ids[3])).await;
    let e: Value = serde_json::from_str(&body).unwrap();
    // Checkpoints fall on exact multiples of SLUICE_CHECKPOINT_EVERY_EVENTS (5 here), however
    // the log arrived.
    let at = e["state_position"].as_u64().unwrap();
    assert!(at >= 5, "{e}");
    assert_eq!(e["rebuilt_from"].as_u64().unwrap(), at - at % 5, "{e}");
    // And through the CLI.
    let out = run(std::process::Command::new(sluice_tests::binary("sluice-control"))
        .args(["explain", &ids[3], "--api", &format!("http://127.0.0.1:{cp}"), "--key", ADMIN])
        .env_clear());
    let e: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((e["matches"].as_bool(), e["replayed"]["reason"].as_str()), (Some(true), Some("cidr_denied")));

    // Replay on the control plane and rebuild on the worker agree, from the log and from a
    // snapshot.
    let head = store.head().await.unwrap().0;
    until("the relay has published the head", || async {
        js.get_stream("SLUICE_EVENTS").await.unwrap().get_info().await.unwrap().state.last_sequence == head
    })
    .await;
    let replay = |to: u64| {
        run(std::process::Command::new(sluice_tests::binary("sluice-control"))
            .args(["replay", "--to", &to.to_string()])
            .env_clear()
            .env("SLUICE_DATABASE_URL", &url)
            .env("SLUICE_SEALING_KEY", SEALING_KEY))
    };
    let dataplane = |args: &[&str]| {
        run(std::process::Command::new(sluice_tests::binary("sluice-dataplane"))
            .arg("rebuild")
            .args(args)
            .env_clear()
            .env("SLUICE_NATS_URL", nats.url())
            .env("SLUICE_SEALING_KEY", SEALING_KEY)
            .env("SLUICE_STATE_DIR", dir.path().join("w1")))
    };
    let (p, control_digest) = position_and_digest(&replay(head));
    assert_eq!(p, head);
    let (p, worker_digest) = position_and_digest(&dataplane(&["--from-log"]));
    assert_eq!((p, &worker_digest), (head, &control_digest));
    let (p, worker_digest) = position_and_digest(&dataplane(&["--from-log", "--to", "4"]));
    assert_eq!((p, worker_digest), (4, position_and_digest(&replay(4)).1));
    // The read models rebuild from the log to the same answers.
    let out = run(std::process::Command::new(sluice_tests::binary("sluice-control"))
        .args(["replay", "--read-models"])
        .env_clear()
        .env("SLUICE_DATABASE_URL", &url)
        .env("SLUICE_SEALING_KEY", SEALING_KEY)
        .env("SLUICE_CHECKPOINT_EVERY_EVENTS", "5"));
    assert!(out.contains("read models rebuilt: 4 decisions"), "{out}");
    let again = page("node=w1").await;
    assert_eq!(again["decisions"], all["decisions"]);
    let (_, body) = api(&http, cp, &format!("/v1/decisions/{}/explain", ids[3])).await;
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["matches"], true);
    until("the worker wrote its local snapshot", || async { dir.path().join("w1/snapshot.bin").exists() }).await;
    let (p, snapshot_digest) = position_and_digest(&dataplane(&["--from-snapshot"]));
    assert_eq!(snapshot_digest, position_and_digest(&replay(p)).1, "snapshot at {p}");
}

/// A webhook receiver: 200 for `token=good`, 403 for `token=bad`, a 500 for `token=boom`, a
/// stall for `token=slow`; it counts calls and checks every signature.
async fn webhook_receiver(secret: String) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<(String, bool)>>>) {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    let seen: std::sync::Arc<std::sync::Mutex<Vec<(String, bool)>>> = Default::default();
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let log = log.clone();
            let secret = secret.clone();
            async move {
                let signed = headers.get("x-sluice-signature").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let valid = signed == sluice_data_plane::webhook::signature(secret.as_bytes(), &body);
                let v: Value = serde_json::from_slice(&body).unwrap();
                let query = v["query"].as_str().unwrap_or("").to_owned();
                log.lock().unwrap().push((query.clone(), valid));
                if query.contains("token=slow") {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                if query.contains("token=good") {
                    StatusCode::OK
                } else if query.contains("token=boom") {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::FORBIDDEN
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_decides_when_the_app_asks_it_signed_cached_and_failing_closed() {
    let Plane { pg: _pg, url: _, nats, dir, http, store, cp, control: _cp } = Plane::start("hooks").await;
    post(&http, cp, "/v1/apps", json!({"name": "hooked"})).await;
    let secret = post(&http, cp, "/v1/apps/hooked/secrets/webhook", json!({})).await;
    let secret = secret["secret"].as_str().unwrap().to_owned();
    let (hook, seen) = webhook_receiver(secret).await;
    let policy = json!({
        "publish": {"methods": ["webhook"]},
        "play": {"methods": ["open"]},
        "webhook": {"url": format!("http://127.0.0.1:{hook}/hook"), "timeout_ms": 500},
    });
    put_policy(&http, cp, "hooked", &policy).await;
    let w = free_port();
    let _w = start_worker(&nats, w, dir.path(), "w1");
    ready_at_head(&http, &store, w).await;
    let publish = |token: &str| json!({"app": "hooked", "stream": format!("cam1?token={token}"), "action": "publish", "client_ip": "192.0.2.4"});
    let (code, good) = decide(&http, w, publish("good")).await;
    assert_eq!((code, good["reason"].as_str()), (200, Some("allowed")), "{good}");
    assert_eq!(good["method"], "webhook");
    // The same request again: answered from the cache, the receiver is not asked twice.
    assert_eq!(decide(&http, w, publish("good")).await.0, 200);
    for (token, reason) in [("bad", "webhook_denied"), ("boom", "webhook_failed"), ("slow", "webhook_failed")] {
        let (code, d) = decide(&http, w, publish(token)).await;
        assert_eq!((code, d["reason"].as_str()), (403, Some(reason)), "{token}: {d}");
    }
    let calls = seen.lock().unwrap().clone();
    assert_eq!(calls.iter().filter(|(q, _)| q == "token=good").count(), 1, "{calls:?}");
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert!(calls.iter().all(|(_, valid)| *valid), "every call is signed with the app's webhook secret: {calls:?}");
    // Recorded with the answer; explain shows it as recorded.
    let id = good["decision_id"].as_str().unwrap().to_owned();
    until("the webhook decision is in the read model", || async {
        api(&http, cp, &format!("/v1/decisions/{id}")).await.0 == 200
    })
    .await;
    let (_, body) = api(&http, cp, &format!("/v1/decisions/{id}/explain")).await;
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["matches"], true, "{e}");
    assert_eq!(e["replayed"]["outcome"], "ask_webhook");
    assert_eq!(e["webhook"], json!({"status": 200, "allowed": true}), "{e}");

    // A worker whose SLUICE_WEBHOOK_ALLOWED does not list loopback checks the host again before
    // calling: the receiver is never asked, the decision fails closed (issue #16, item 1).
    let w2 = free_port();
    let _w2 = worker_with(
        &nats.url(),
        w2,
        &dir.path().join("w2"),
        "w2",
        &dir.path().join("w2.log"),
        &[("SLUICE_WEBHOOK_ALLOWED", "")],
    );
    ready_at_head(&http, &store, w2).await;
    let (code, d) = decide(&http, w2, publish("good")).await;
    assert_eq!((code, d["reason"].as_str()), (403, Some("webhook_failed")), "{d}");
    assert_eq!(seen.lock().unwrap().len(), 4, "the receiver was not called");
    assert!(read(&dir.path().join("w2.log")).contains("SLUICE_WEBHOOK_ALLOWED"));
}
