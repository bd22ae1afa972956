//! A client's bytes into rml_rtmp, contained: its panics end one connection, and input that
//! completes no message is bounded. `drive_input` runs the same path synchronously for the
//! fuzz target.

use std::cell::Cell;
use std::sync::Arc;

use rml_rtmp::handshake::{Handshake, PeerType};
use rml_rtmp::sessions::{ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult};
use sluice_events::{AccessRequest, Action, Protocol, wire};

use super::chunk::{audio, is_audio_header, is_keyframe, is_video_header, video};

/// `ServerSession::handle_input`, contained: rml_rtmp 0.8.0 panics on some chunk sequences
/// (arithmetic overflow in its chunk deserializer, `chunk_io/deserializer.rs:371`, found by
/// `ops/bench/fuzz`; in a release build the same input asks for a capacity-overflowing
/// allocation). A panic there ends this one connection, never the media thread and the other
/// sessions on it.
/// Another: an AMF0 command message with fewer than three values (`amf0_command.rs:35`,
/// a slice index out of range, in release builds too).
pub(super) fn guarded_input(session: &mut ServerSession, data: &[u8]) -> Result<Vec<ServerSessionResult>, String> {
    GUARDED.with(|g| g.set(true));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session.handle_input(data)));
    GUARDED.with(|g| g.set(false));
    match outcome {
        Ok(Ok(results)) => Ok(results),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Err(_) => Err("rml_rtmp panicked on this input".to_owned()),
    }
}

thread_local! {
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Splits a client's bytes at RTMP message boundaries before the session is established, so
/// each command reaches rml_rtmp only after the previous one was answered. A client may send
/// `connect`, `createStream` and `play` in one write without waiting (the protocol allows it;
/// nginx-rtmp serves it); fed at once, rml_rtmp would refuse the `play` before the `connect`
/// is accepted ("Can't play before connecting") and the client would get nothing. Only the
/// pre-session phase goes through here (a few hundred bytes), one byte at a time into a
/// shadow chunk deserializer that follows the client's chunk size as rml_rtmp does.
pub(super) struct Splitter {
    shadow: rml_rtmp::chunk_io::ChunkDeserializer,
}

impl Default for Splitter {
    fn default() -> Self {
        Splitter { shadow: rml_rtmp::chunk_io::ChunkDeserializer::new() }
    }
}

impl Splitter {
    /// The lengths of the complete messages at the front of `data`, and what is left after
    /// them (a message not complete yet). An error: input the shadow cannot read (or that
    /// panics it, as it panics rml_rtmp's own deserializer).
    pub(super) fn split(&mut self, data: &[u8]) -> Result<Vec<usize>, String> {
        let mut cuts = Vec::new();
        let mut start = 0;
        for i in 0..data.len() {
            let shadow = &mut self.shadow;
            // The same deserializer as rml_rtmp's, so the same panics: contained the same way.
            GUARDED.with(|g| g.set(true));
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shadow.get_next_message(&data[i..=i])));
            GUARDED.with(|g| g.set(false));
            match step {
                Ok(Ok(Some(message))) => {
                    // Set Chunk Size: the shadow follows it, as the session's deserializer does.
                    if message.type_id == 1 && message.data.len() >= 4 {
                        let size =
                            u32::from_be_bytes([message.data[0], message.data[1], message.data[2], message.data[3]]);
                        self.shadow.set_max_chunk_size((size & 0x7fff_ffff) as usize).map_err(|e| format!("{e:?}"))?;
                    }
                    cuts.push(i + 1 - start);
                    start = i + 1;
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return Err(format!("{e:?}")),
                Err(_) => return Err("the chunk stream panicked the message splitter".to_owned()),
            }
        }
        if start < data.len() {
            cuts.push(data.len() - start);
        }
        Ok(cuts)
    }
}

/// Whether this thread is inside `guarded_input` (for the fuzz target's panic hook: a panic
/// there is contained by design; anywhere else it is a crash).
#[doc(hidden)]
pub fn in_guarded_input() -> bool {
    GUARDED.with(Cell::get)
}

/// What rml_rtmp buffers is bounded: input that completes no message (one oversized message,
/// or many interleaved on different chunk streams) within `max` bytes ends the connection.
/// `unfinished` counts the input since the last complete message; false means close.
pub(super) fn within_max_message(
    unfinished: &mut usize,
    results: &[ServerSessionResult],
    len: usize,
    max: usize,
) -> bool {
    let completed = results.iter().any(|r| {
        matches!(r, ServerSessionResult::RaisedEvent(_) | ServerSessionResult::UnhandleableMessageReceived(_))
    });
    if completed {
        *unfinished = 0;
        return true;
    }
    *unfinished += len;
    *unfinished <= max
}

/// Everything the worker does with a client's bytes short of I/O and the decision job, driven
/// synchronously: the server handshake over the input, then `rml_rtmp`'s session over the same
/// bytes (fed in pieces whose size the first byte picks) with the message-size bound, accept
/// and reject as a connection does, request parsing and `decide` against an empty state, and
/// the media path (classification, chunking once for all players, metadata to a player). For
/// the fuzz target in `data-plane/fuzz`, which checks that no input panics.
#[doc(hidden)]
pub fn drive_input(data: &[u8], max_message: usize) {
    let mut hs = Handshake::new(PeerType::Server);
    let _ = hs.process_bytes(data);
    let Ok((mut session, _)) = ServerSession::new(ServerSessionConfig::new()) else { return };
    let state = sluice_events::AuthState::default();
    let ip = std::net::IpAddr::from([192, 0, 2, 1]);
    let step = usize::from(data.first().copied().unwrap_or(0)).max(1) * 16;
    let mut unfinished = 0;
    for piece in data.chunks(step) {
        let Ok(results) = guarded_input(&mut session, piece) else { return };
        if !within_max_message(&mut unfinished, &results, piece.len(), max_message) {
            return;
        }
        for r in results {
            let ServerSessionResult::RaisedEvent(e) = r else { continue };
            let (request_id, app, key, action) = match e {
                ServerSessionEvent::ConnectionRequested { request_id, .. } => {
                    let _ = session.accept_request(request_id);
                    continue;
                }
                ServerSessionEvent::PublishStreamRequested { request_id, app_name, stream_key, .. } => {
                    (request_id, app_name, stream_key, Action::Publish)
                }
                ServerSessionEvent::PlayStreamRequested { request_id, app_name, stream_key, .. } => {
                    (request_id, app_name, stream_key, Action::Play)
                }
                ServerSessionEvent::StreamMetadataChanged { metadata, .. } => {
                    let _ = session.send_metadata(1, &Arc::new(metadata));
                    continue;
                }
                ServerSessionEvent::VideoDataReceived { data, timestamp, .. } => {
                    let _ = (is_keyframe(&data), is_video_header(&data), video(data, timestamp));
                    continue;
                }
                ServerSessionEvent::AudioDataReceived { data, timestamp, .. } => {
                    let _ = (is_audio_header(&data), audio(data, timestamp));
                    continue;
                }
                _ => continue,
            };
            match access_request(&app, &key, action, ip) {
                Ok(req) => {
                    let d = sluice_events::decide(&state, &req, sluice_events::Timestamp(0));
                    let _ = match d.outcome {
                        sluice_events::Outcome::Deny => {
                            session.reject_request(request_id, "NetStream.Play.Failed", "no")
                        }
                        _ => session.accept_request(request_id),
                    };
                }
                Err(e) => {
                    let _ = session.reject_request(request_id, "NetStream.Publish.BadName", &e);
                }
            }
        }
    }
}

/// An RTMP publish or play target as an `AccessRequest`.
pub(crate) fn access_request(
    app: &str,
    stream_key: &str,
    action: Action,
    client_ip: std::net::IpAddr,
) -> Result<AccessRequest, String> {
    let target = wire::parse_rtmp(app, stream_key).map_err(|e| e.to_string())?;
    Ok(AccessRequest {
        // Time-ordered: the decision's id is its event id in the log, where ordered ids keep
        // the unique index's inserts at its right edge.
        id: uuid::Uuid::now_v7(),
        app: target.app,
        stream: target.stream,
        action,
        protocol: Protocol::Rtmp,
        client_ip,
        credential: target.credential,
        client_id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    /// Inputs the fuzzer found that panic rml_rtmp 0.8.0 (`data-plane/fuzz/regressions`).
    pub(crate) const RML_PANICS: [&[u8]; 2] = [
        include_bytes!("../../fuzz/regressions/rtmp_session-deserializer-overflow"),
        include_bytes!("../../fuzz/regressions/rtmp_session-short-amf0-command"),
    ];

    #[test]
    fn input_that_panics_rml_rtmp_ends_only_its_connection() {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let mut refused = Vec::new();
        for crash in RML_PANICS {
            let (mut session, _) = ServerSession::new(ServerSessionConfig::new()).unwrap();
            let step = usize::from(crash[0]).max(1) * 16;
            refused.push(crash.chunks(step).find_map(|piece| guarded_input(&mut session, piece).err()));
            assert!(!in_guarded_input());
            // The fuzz driver goes through the same guard.
            drive_input(crash, 64 * 1024);
        }
        std::panic::set_hook(hook);
        for r in refused {
            assert_eq!(r.as_deref(), Some("rml_rtmp panicked on this input"));
        }
    }
}
