//! Sluice's data-plane worker: it holds the access tables (`sync`), serves its admin port
//! (`admin`) and says how it is doing (`heartbeat`). The RTMP (monoio) and SRT (srt-tokio)
//! servers land with their issues; every decision they make is `sluice_events::decide`
//! against `Shared::state`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod decide;
pub mod heartbeat;
pub mod limits;
pub mod local;
pub mod rtmp;
pub mod sessions;
pub mod spool;
pub mod srt;
pub mod stats;
pub mod sync;
pub mod uplink;
pub mod webhook;
