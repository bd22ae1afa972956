//! Seeing it run, and changing it live (issue #18): both planes' `/metrics` (OpenMetrics text
//! from `prometheus-client`) behind a bearer token, on the API/admin port and on a listener of
//! their own, with the histograms filled by real work (API calls, a real ffmpeg publisher, a
//! revocation); every metric the Grafana dashboard (`ops/grafana/sluice.json`) uses is
//! exported. A SIGHUP reloads what can change live on both planes and names what cannot.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

mod cluster;
use cluster::*;
use sluice_tests::Running;

const TOKEN: &str = "metrics-token-0123456789";

/// A scrape of `url` with `token`: its status, content type and text.
async fn scrape(http: &reqwest::Client, url: &str, token: Option<&str>) -> (u16, String, String) {
    let mut req = http.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let ctype = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (status, ctype, r.text().await.unwrap())
}

/// The series names an exposition offers: every sample's name, and for each declared family
/// the names its type implies (a family with no sample yet still counts as exported).
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// The value of the sample `series` (name with labels, as printed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Every metric name a PromQL expression of the dashboard reads.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = sluice_tests::workspace_root().join("ops/grafana/sluice.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find(|c: char| c.is_ascii_lowercase()) {
                rest = &rest[at..];
                let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
                let word = &rest[..end];
                // A name inside a label matcher or legend is not a metric: those follow `{`, `=` or `"`.
                if word.starts_with("sluice_") || word.starts_with("process_") {
                    names.insert(word.to_owned());
                }
                rest = &rest[end..];
            }
        }
    }
    assert!(names.len() > 30, "the dashboard reads {} metrics: {names:?}", names.len());
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_planes_export_what_the_dashboard_reads_behind_a_token() {
    let pg = sluice_tests::Postgres::start().unwrap();
    let url = pg.create_database("observed").await.unwrap();
    let nats = sluice_tests::Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = sluice_control_plane::EventStore::start(sluice_control_plane::connect(&url).await.unwrap());
    let (cp, cp_metrics) = (sluice_tests::free_port(), sluice_tests::free_port());
    let cp_metrics_listen = format!("127.0.0.1:{cp_metrics}");
    let control = control_with(
        &url,
        &nats.url(),
        cp,
        "cp-1",
        &dir.path().join("cp.log"),
        &[("SLUICE_METRICS_TOKEN", TOKEN), ("SLUICE_METRICS_LISTEN", &cp_metrics_listen)],
    );
    let plane = Plane { pg, url, nats, dir, http: reqwest::Client::new(), store, cp, control };
    let http = plane.http.clone();
    let w_metrics = sluice_tests::free_port();
    let w_metrics_listen = format!("127.0.0.1:{w_metrics}");
    let w =
        media_worker(&plane, "w1", &[("SLUICE_METRICS_TOKEN", TOKEN), ("SLUICE_METRICS_LISTEN", &w_metrics_listen)]);

    // Without the token (or with a wrong one): 401 on every listener.
    for url in [
        format!("http://127.0.0.1:{cp}/metrics"),
        format!("http://127.0.0.1:{cp_metrics}/metrics"),
        format!("http://127.0.0.1:{}/metrics", w.admin),
        format!("http://127.0.0.1:{w_metrics}/metrics"),
    ] {
        assert_eq!(scrape(&http, &url, None).await.0, 401, "{url}");
        assert_eq!(scrape(&http, &url, Some("metrics-token-wrong-0000")).await.0, 401, "{url}");
    }
    // The metrics listeners serve nothing else.
    assert_eq!(scrape(&http, &format!("http://127.0.0.1:{cp_metrics}/v1/apps"), Some(TOKEN)).await.0, 404);
    assert_eq!(scrape(&http, &format!("http://127.0.0.1:{w_metrics}/ready"), Some(TOKEN)).await.0, 404);

    // Real work: API calls (one malformed, one without a key), a publisher, a player, and a
    // policy change that ends the publisher's session.
    let open = json!({"publish": {"methods": ["open"]}, "play": {"methods": ["open"]}});
    post(&http, cp, "/v1/apps", json!({"name": "obs", "policy": open})).await;
    let bad = http
        .post(format!("http://127.0.0.1:{cp}/v1/apps"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(http.get(format!("http://127.0.0.1:{cp}/v1/apps")).send().await.unwrap().status(), 401);
    ready_at_head(&http, &plane.store, w.admin).await;
    let rtmp = format!("rtmp://127.0.0.1:{}/obs/cam", w.rtmp);
    let publisher = ffmpeg_testsrc("flv", &rtmp, 60).spawn().unwrap();
    until_live(&http, cp, "obs", "cam").await;
    let played = tokio::task::spawn_blocking({
        let rtmp = rtmp.clone();
        move || ffmpeg_play(&rtmp)
    })
    .await
    .unwrap();
    assert!(stderr(&played).contains("frame="), "{}", stderr(&played));
    let closed = json!({"publish": {"methods": ["one_time_token"]}, "play": {"methods": ["open"]}});
    put_policy(&http, cp, "obs", &closed).await;
    let ended =
        tokio::task::spawn_blocking(move || wait_bounded(publisher, Duration::from_secs(30))).await.unwrap().is_some();
    assert!(ended, "the policy change ended the publisher");

    // The worker: decisions, their latency and the revocation, timed.
    let worker_url = format!("http://127.0.0.1:{w_metrics}/metrics");
    let (status, ctype, wtext) = scrape(&http, &worker_url, Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(wtext.ends_with("# EOF\n"));
    assert!(sample(&wtext, "sluice_decisions_total{outcome=\"allow\",reason=\"allowed\"}") >= Some(2.0), "{wtext}");
    assert!(sample(&wtext, "sluice_media_decision_seconds_count") >= Some(2.0), "{wtext}");
    assert_eq!(sample(&wtext, "sluice_revocation_seconds_count"), Some(1.0), "{wtext}");
    assert!(sample(&wtext, "sluice_media_bytes_total{direction=\"in\"}") > Some(10_000.0), "{wtext}");
    assert!(wtext.contains("sluice_build_info{service=\"sluice-dataplane\",version=\""), "{wtext}");
    assert!(sample(&wtext, "process_resident_memory_bytes") > Some(1_000_000.0), "{wtext}");
    assert!(sample(&wtext, "process_open_fds") > Some(3.0), "{wtext}");
    // The admin port serves the same families.
    let (_, _, admin_text) = scrape(&http, &format!("http://127.0.0.1:{}/metrics", w.admin), Some(TOKEN)).await;
    assert_eq!(exported(&admin_text), exported(&wtext));

    // The control plane: API latency by route pattern, the refusals, append, relay, ingest, nodes.
    let cp_url = format!("http://127.0.0.1:{cp_metrics}/metrics");
    until("the ingest brought the worker's decisions in and the node is seen", || {
        let (http, cp_url) = (http.clone(), cp_url.clone());
        async move {
            let text = scrape(&http, &cp_url, Some(TOKEN)).await.2;
            sample(&text, "sluice_ingested_decisions_total{outcome=\"allow\",reason=\"allowed\"}") >= Some(2.0)
                && sample(&text, "sluice_nodes{state=\"live\"}") == Some(1.0)
        }
    })
    .await;
    let ctext = scrape(&http, &cp_url, Some(TOKEN)).await.2;
    let route = "sluice_api_request_duration_seconds_count{route=\"/v1/apps\",method=\"POST\",status=\"201\"}";
    assert!(sample(&ctext, route) >= Some(1.0), "{ctext}");
    assert!(sample(&ctext, "sluice_api_malformed_requests_total") >= Some(1.0), "{ctext}");
    assert!(sample(&ctext, "sluice_api_denied_requests_total") >= Some(1.0), "{ctext}");
    assert!(sample(&ctext, "sluice_log_append_seconds_count") >= Some(2.0), "{ctext}");
    assert!(sample(&ctext, "sluice_relay_lag_seconds_count") >= Some(2.0), "{ctext}");
    assert!(sample(&ctext, "sluice_relay_position") >= Some(2.0), "{ctext}");
    assert!(sample(&ctext, "sluice_node_lag_events{node=\"w1\"}").is_some(), "{ctext}");
    assert!(ctext.contains("sluice_build_info{service=\"sluice-control\",version=\""), "{ctext}");
    // An unknown path is one label value, whatever a scanner tries.
    for path in ["/nope/1", "/nope/2"] {
        let _ = http.get(format!("http://127.0.0.1:{cp}{path}")).bearer_auth(ADMIN).send().await.unwrap();
    }
    let ctext = scrape(&http, &format!("http://127.0.0.1:{cp}/metrics"), Some(TOKEN)).await.2;
    assert!(!ctext.contains("/nope/"), "{ctext}");
    assert!(ctext.contains("route=\"unmatched\""), "{ctext}");

    // Every metric the dashboard reads is exported by one plane or the other.
    let offered: BTreeSet<String> = exported(&ctext).union(&exported(&wtext)).cloned().collect();
    let missing: Vec<String> = dashboard_metrics().difference(&offered).cloned().collect();
    assert!(missing.is_empty(), "the dashboard reads metrics no plane exports: {missing:?}");
}

/// A config file for the worker with `lines` (TOML).
fn write(path: &std::path::Path, lines: &str) {
    std::fs::write(path, lines).unwrap();
}

fn sighup(pid: u32) {
    assert!(Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_limits_log_filter_and_allow_lists_and_names_the_rest() {
    let plane = Plane::start("reload").await;
    let http = plane.http.clone();

    // The worker, from a config file (the environment would win over it).
    let (admin, rtmp, srt) = (sluice_tests::free_port(), sluice_tests::free_port(), sluice_tests::free_port());
    let config = plane.dir.path().join("dataplane.toml");
    let base = format!(
        "nats_url = \"{}\"\nnode_id = \"w1\"\nadmin_listen = \"127.0.0.1:{admin}\"\nrtmp_listen = \"127.0.0.1:{rtmp}\"\n\
         srt_listen = \"127.0.0.1:{srt}\"\nstate_dir = \"{}\"\nheartbeat_secs = 1\n",
        plane.nats.url(),
        plane.dir.path().join("w1").display()
    );
    write(&config, &format!("{base}max_connections_per_ip = 100\nlog = \"info,async_nats=warn\"\nrtmp_threads = 1\n"));
    let log = plane.dir.path().join("w1.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(sluice_tests::binary("sluice-dataplane"))
        .args(["--config", config.to_str().unwrap(), "run"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLUICE_SEALING_KEY", SEALING_KEY)
        .env("SLUICE_NODE_SECRET", NODE_SECRET)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut worker = Running(child);
    assert!(sluice_tests::wait_for_port(admin, WAIT), "{}", read(&log));
    ready_at_head(&http, &plane.store, admin).await;
    let connect = || std::net::TcpStream::connect(("127.0.0.1", rtmp)).unwrap();
    let (a, b) = (connect(), connect());
    until("two connections from one address are open", || async {
        worker_metric(&http, admin, "sluice_connections").await == Some(2.0)
    })
    .await;
    assert!(!read(&log).contains("DEBUG"), "no debug line before the reload");
    // Two connections from one address per IP now, a debug filter, and a setting that needs a restart.
    write(
        &config,
        &format!("{base}max_connections_per_ip = 2\nlog = \"info,sluice_data_plane=debug\"\nrtmp_threads = 2\n"),
    );
    sighup(worker.0.id());
    until("the reload is logged", || async { read(&log).contains("SIGHUP: settings reloaded") }).await;
    let text = read(&log);
    let reloaded = text.lines().find(|l| l.contains("SIGHUP: settings reloaded")).unwrap();
    assert!(reloaded.contains("log, max_connections_per_ip"), "{reloaded}");
    let restart = text.lines().find(|l| l.contains("need a restart")).unwrap();
    assert!(restart.contains("rtmp_threads") && !restart.contains("max_connections"), "{restart}");
    // A third connection from the address is closed at accept and counted.
    let mut third = connect();
    third.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut third, &mut buf).unwrap_or(0), 0, "the third connection is closed");
    until("the refusal is counted", || async {
        worker_metric(&http, admin, "sluice_limit_refusals_total{limit=\"per_ip\"}").await == Some(1.0)
    })
    .await;
    // The debug filter is live: a garbage handshake is logged at debug now.
    drop((a, b, third));
    until("the connections are gone", || async {
        worker_metric(&http, admin, "sluice_connections").await == Some(0.0)
    })
    .await;
    let mut garbage = connect();
    std::io::Write::write_all(&mut garbage, &[0x42; 1600]).unwrap();
    until("a debug line shows", || async { read(&log).contains("DEBUG") }).await;
    // Settings that no longer read change nothing and say so; the worker keeps serving.
    write(&config, "max_connections_per_ip = \"many\"\n");
    sighup(worker.0.id());
    until("the unreadable settings are logged", || async { read(&log).contains("the settings do not read") }).await;
    assert!(worker.0.try_wait().unwrap().is_none(), "a SIGHUP stopped the worker");
    assert_eq!(get(&http, format!("http://127.0.0.1:{admin}/ready")).await.0, 200);
    drop(worker);

    // The control plane, from a config file: its rate limit, live.
    let cp_port = sluice_tests::free_port();
    let cp_config = plane.dir.path().join("control.toml");
    let cp_base = format!(
        "database_url = \"{}\"\nnats_url = \"{}\"\napi_listen = \"127.0.0.1:{cp_port}\"\ninstance_id = \"cp-2\"\n",
        plane.url,
        plane.nats.url()
    );
    write(&cp_config, &format!("{cp_base}rate_limit_api = 100000\nrelay = true\n"));
    let cp_log = plane.dir.path().join("cp2.log");
    let out = std::fs::File::create(&cp_log).unwrap();
    let cp = Command::new(sluice_tests::binary("sluice-control"))
        .args(["--config", cp_config.to_str().unwrap(), "serve"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLUICE_SEALING_KEY", SEALING_KEY)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let mut cp = Running(cp);
    assert!(sluice_tests::wait_for_port(cp_port, WAIT), "{}", read(&cp_log));
    let streams = format!("http://127.0.0.1:{cp_port}/v1/apps");
    for _ in 0..3 {
        assert_eq!(http.get(&streams).bearer_auth(ADMIN).send().await.unwrap().status(), 200);
    }
    write(&cp_config, &format!("{cp_base}rate_limit_api = 1\nrelay = false\n"));
    sighup(cp.0.id());
    until("the control plane's reload is logged", || async { read(&cp_log).contains("SIGHUP: settings reloaded") })
        .await;
    let text = read(&cp_log);
    assert!(text.lines().any(|l| l.contains("need a restart") && l.contains("relay")), "{text}");
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(http.get(&streams).bearer_auth(ADMIN).send().await.unwrap().status().as_u16());
        }
        v
    };
    assert!(statuses.contains(&429), "one request a minute now: {statuses:?}");
    assert!(cp.0.try_wait().unwrap().is_none());
}
