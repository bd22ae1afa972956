//! Sluice's data-plane worker. Today: its settings. The state sync, RTMP (monoio) and SRT
//! (srt-tokio) servers land with their issues; every decision they make is `sluice_events::decide`.
#![forbid(unsafe_code)]

pub mod config;
