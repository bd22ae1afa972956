//! The RTMP server: `Settings::threads` media threads, each a monoio runtime (io_uring, epoll
//! where io_uring is refused) with its own `SO_REUSEPORT` listener; `rml_rtmp` for the
//! handshake, chunking and commands.
//!
//! Every publish and play is decided through the worker's `Decider` (on the tokio thread, over
//! a channel: claims and the spool live there) and recorded, allow or deny. A second publisher
//! on a live stream, on any thread, is refused with `stream_busy` *before* any claim, so it
//! never burns a one-time token. Admitted sessions are registered for kick on change.
//!
//! Fan-out: one publisher per stream, any number of players. Metadata, the AVC/AAC sequence
//! headers and the current GOP are replayed to late joiners so playback starts on a keyframe.
//! Each media message is chunked once, into the stream's `Window`: up to `merge_write` of media
//! (a keyframe always opens a new one), flushed to every player as one shared `Bytes`, so a
//! player's write costs no copy, and there is one merge timer per media thread, not one per
//! player. Each player has a bounded queue; a player that falls behind skips to the next
//! window that opens on a keyframe. A stream is relayed to another media thread once, when
//! that thread has a player for it (`Ctx::mirror`).
//!
//! Bounded per connection: connections (per address and in total, `limits::Gate`), handshake
//! time, silence, and input that completes no message (`Settings::max_message`).
//!
//! RTMPS (`tls.rs`): the same connections inside TLS, on a second listener per media thread.

mod chunk;
mod conn;
mod ctx;
mod hub;
mod input;
mod proxy;
mod server;
pub mod tls;
mod writer;

pub use chunk::chunk_message;
pub use ctx::{AdmitJob, serve_admissions};
pub(crate) use input::access_request;
pub use input::{drive_input, in_guarded_input};
pub use server::{Settings, spawn};
