//! Sluice's functional core: the event catalog, the `AuthState` fold, `decide`, credential
//! checks, wire parsing and command handling. It does no I/O, reads no clock, draws no random
//! numbers and reads no environment: time, ids, nonces and keys are arguments. Both planes
//! are shells around it.
#![forbid(unsafe_code)]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod canonical;
pub mod command;
pub mod decide;
pub mod decision;
pub mod dist;
pub mod event;
pub mod ids;
pub mod metrics;
pub mod policy;
pub mod progress;
pub mod schema;
pub mod secret;
pub mod settings;
pub mod state;
pub mod webhook;
pub mod wire;

pub use command::{Command, NewSecret, Rejection, handle};
pub use decide::decide;
pub use decision::{AccessRequest, Credential, Decision, DecisionRecord, Effect, Outcome, Reason, Repeats};
pub use event::{DecodeError, Event, Metadata, NewEvent, RecordedEvent};
pub use ids::{
    Action, AppName, Cidr, KeyId, NodeId, ParseError, Position, Protocol, Role, StreamName, SubscriberId, Timestamp,
};
pub use policy::{ActionPolicy, Method, OfflineOneTime, Policy, SecretKind};
pub use secret::{Keyring, Sealed, SealingKey, SecretString, Sha256Digest};
pub use state::{ApplyError, AuthState};
