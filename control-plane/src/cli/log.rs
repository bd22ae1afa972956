//! The log's maintenance commands: `archive` (old ranges to segment files) and `verify-log`
//! (the chain from genesis, the archives' anchors, the reachable anchors).

use std::process::ExitCode;

use sluice_control_plane::config::Config;
use sluice_control_plane::{EventStore, anchor, store};
use sluice_events::Position;

use super::progress;

type Failure = Box<dyn std::error::Error>;

/// `sluice-control archive --keep N`.
pub async fn archive(pool: sqlx::PgPool, config: &Config, keep: u64) -> Result<ExitCode, Failure> {
    let Some(dir) = config.archive_dir.clone() else {
        eprintln!("sluice-control: archive needs SLUICE_ARCHIVE_DIR (where the segment files go)");
        return Ok(ExitCode::from(2));
    };
    std::fs::create_dir_all(&dir)?;
    store::migrate(&pool).await?;
    let store = EventStore::start(pool);
    store.set_archive_dir(Some(dir.clone()));
    let signer = anchor::Signer::new(config.require_sealing_key()?);
    let instance = config.instance_id.clone();
    let started = std::time::Instant::now();
    let archived = store
        .archive(&dir, keep, |position, hash| {
            let a = signer.sign(position, hash, sluice_control_plane::clock::now().0, &instance);
            serde_json::to_string(&a).unwrap_or_default()
        })
        .await?;
    for a in &archived {
        println!(
            "archived {}..{} ({} events, {} bytes) to {}, last hash {}",
            a.first,
            a.last,
            a.events,
            a.bytes,
            dir.join(&a.segment).display(),
            a.last_hash.to_hex()
        );
    }
    match archived.last() {
        Some(a) => println!(
            "{} partition(s) archived and detached in {:.1} s; the live log starts at {}",
            archived.len(),
            started.elapsed().as_secs_f64(),
            a.last.next()
        ),
        None => println!("nothing to archive: no whole partition ends {keep} events before the head"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `sluice-control verify-log [--from P]`.
pub async fn verify(pool: sqlx::PgPool, config: &Config, from: Option<u64>) -> Result<ExitCode, Failure> {
    let store = EventStore::start(pool);
    store.set_archive_dir(config.archive_dir.clone());
    let (start, prev) = match from {
        None => (Position::ZERO, sluice_events::event::GENESIS),
        Some(p) => {
            let anchors = reachable_anchors(config).await?;
            let Some(a) = anchors.iter().find(|a| a.position == p) else {
                let known: Vec<u64> = anchors.iter().map(|a| a.position).collect();
                eprintln!("sluice-control: no anchor at position {p} to resume from (anchors reachable: {known:?})");
                return Ok(ExitCode::from(2));
            };
            (Position(p), a.hash)
        }
    };
    let head = store.head().await?.0;
    let mut meter = progress::Meter::new("verified", start.0, head);
    let mut reached = start.0;
    let verified = store
        .verify_from(start, prev, |p| {
            reached = p.0;
            meter.at(p.0)
        })
        .await;
    meter.done(reached);
    match verified {
        Ok(r) => {
            println!("ok: {} events, head {}, head hash {}", r.events, r.head, r.head_hash.to_hex());
            // The archived ranges were walked with the rest; their own anchors too.
            let signer = anchor::Signer::new(config.require_sealing_key()?);
            match anchor::check_archives(&store, &signer).await {
                Ok(0) => {}
                Ok(n) => println!("archived: {n} segment(s), each as signed when it was archived"),
                Err(e) => {
                    println!("BROKEN archive: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            }
            // The chain holds; now against the anchors it can reach.
            let anchors = reachable_anchors(config).await?;
            match anchor::check(&store, &anchors).await {
                Ok(Some(a)) => {
                    println!("anchored: agrees with {} anchor(s), newest at position {}", anchors.len(), a.position)
                }
                Ok(None) => {
                    println!("not anchored: no anchor reachable (SLUICE_ANCHOR_FILE, NATS KV sluice-anchors)")
                }
                Err(e) => {
                    match e.position() {
                        Some(p) => println!("BROKEN at anchored position {p}: {e}"),
                        None => println!("could not check the anchors: {e}"),
                    }
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Err(e) => {
            match e.position() {
                Some(p) => println!("BROKEN at position {p}: {e}"),
                None => println!("could not verify: {e}"),
            }
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The genuine anchors in `SLUICE_ANCHOR_FILE` and the newest in NATS KV (when NATS answers).
pub async fn reachable_anchors(config: &Config) -> Result<Vec<anchor::Anchor>, Failure> {
    let signer = anchor::Signer::new(config.require_sealing_key()?);
    let mut anchors = config.anchor_file.as_deref().map(|p| anchor::read_file(p, &signer)).unwrap_or_default();
    if let Some(a) = anchor::read_kv(&config.nats_url, &signer).await {
        anchors.push(a);
    }
    Ok(anchors)
}
