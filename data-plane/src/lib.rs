//! Sluice's data-plane worker: it holds the access tables (`sync`), serves its admin port
//! (`admin`) and says how it is doing (`heartbeat`). Its media servers, RTMP (`rtmp`, monoio)
//! and SRT (`srt`, srt-tokio), translate their wire requests into `admit::Admission::admit`,
//! the one admission step (penalty box, publisher slot, `sluice_events::decide` against
//! `Shared::state`, claims, spool, kick-on-change registration, stats).
#![forbid(unsafe_code)]

pub mod admin;
pub mod admit;
pub mod claims;
pub mod clock;
pub mod coalesce;
pub mod config;
pub mod decide;
pub mod heartbeat;
pub mod hooks;
pub mod limits;
pub mod local;
pub mod rtmp;
pub mod sessions;
pub mod slot;
pub mod spool;
pub mod srt;
pub mod stats;
pub mod sync;
/// The control plane's module (`control-plane/src/task.rs`), compiled into this crate too: the
/// planes share no crate but the pure core, which has no runtime, and one source keeps the two
/// shells' task handling the same.
#[path = "../../control-plane/src/task.rs"]
pub mod task;
pub mod uplink;
pub mod webhook;
