//! The harness itself: NATS starts with JetStream on a free port and is gone after drop.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::Duration;

use sluice_tests::{Nats, Postgres, eventually};

#[test]
fn nats_runs_with_jetstream_and_stops_on_drop() {
    let nats = Nats::start().unwrap();
    let stream = TcpStream::connect(("127.0.0.1", nats.port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut info = String::new();
    BufReader::new(stream).read_line(&mut info).unwrap();
    assert!(info.starts_with("INFO "), "{info}");
    let info: serde_json::Value = serde_json::from_str(info.trim_start_matches("INFO ").trim()).unwrap();
    assert_eq!(info["jetstream"], true, "JetStream enabled");
    let version = info["version"].as_str().unwrap();
    let minor: u32 = version.split('.').nth(1).unwrap().parse().unwrap();
    assert!(version.starts_with("2.") && minor >= 10, "NATS {version} is too old for async-nats KV");
    let (port, pid) = (nats.port, nats.pid());
    drop(nats);
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "port closed after drop");
    let gone = || !std::path::Path::new(&format!("/proc/{pid}")).exists();
    assert!(eventually(Duration::from_secs(2), gone), "nats-server {pid} still running after drop");
}

#[test]
fn two_postgres_clusters_in_parallel_do_not_clash() {
    let (a, b) = (Postgres::start().unwrap(), Postgres::start().unwrap());
    assert_ne!(a.port, b.port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = a.create_database("fresh").await.unwrap();
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await.unwrap();
        assert_eq!(one, 1);
    });
    let port = a.port;
    drop(a);
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "stopped on drop");
}
