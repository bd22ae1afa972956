//! Sluice's control plane: the Postgres event store, the projection, the HTTP API and the
//! bootstrap of a fresh log. The decisions themselves live in `sluice-events`.
#![forbid(unsafe_code)]

pub mod anchor;
pub mod api;
pub mod bootstrap;
pub mod client;
pub mod clock;
pub mod commands;
pub mod config;
pub mod decisions;
pub mod ingest;
pub mod jwks;
pub mod metrics;
pub mod nodes;
pub mod outbound;
pub mod pg;
pub mod projection;
pub mod relay;
pub mod store;
pub mod task;

pub use store::{Appended, EventStore, ExpectedVersion, StoreError, VerifyError, VerifyReport};

pub use pg::connect;
