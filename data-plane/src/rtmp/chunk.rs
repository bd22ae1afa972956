//! RTMP media messages as the hub hands them on, chunked once for every player of stream id 1
//! (type-0 header, then type-3 continuations), and what a payload's first bytes say of it.

use std::sync::Arc;

use bytes::Bytes;
use rml_rtmp::sessions::StreamMetadata;
use rml_rtmp::time::RtmpTimestamp;

/// thread is relayed to the others where it has players.
#[derive(Clone)]
pub(super) enum Media {
    Metadata(Arc<StreamMetadata>),
    /// The payload, its timestamp, and the message already chunked for stream id 1 (what
    /// nearly every player uses), shared by every player: prepared once per message.
    Video(Bytes, RtmpTimestamp, Bytes),
    Audio(Bytes, RtmpTimestamp, Bytes),
    /// The publisher left.
    End,
}

/// The outgoing chunk size every session announces (rml_rtmp's default).
pub(super) const CHUNK_SIZE: usize = 4096;
/// Chunk streams of the pre-chunked media (rml_rtmp's own choice for these types, which it
/// no longer uses for them since media bypasses its serializer).
pub(super) const VIDEO_CSID: u8 = 4;
pub(super) const AUDIO_CSID: u8 = 5;

/// The chunk stream of refusal statuses: one rml_rtmp never uses, so a type-0 header there
/// cannot upset the compressed headers of its own chunk streams.
pub(super) const STATUS_CSID: u8 = 8;

/// An `onStatus` with level `error` (AMF0 command, type 20) on message stream `stream_id`:
/// what nginx-rtmp and SRS send when they refuse, and what every RTMP client shows.
pub(super) fn status_error(stream_id: u32, code: &str, description: &str) -> Option<Bytes> {
    use rml_rtmp::rml_amf0::{Amf0Value, serialize};
    let status = std::collections::HashMap::from([
        ("level".to_owned(), Amf0Value::Utf8String("error".to_owned())),
        ("code".to_owned(), Amf0Value::Utf8String(code.to_owned())),
        ("description".to_owned(), Amf0Value::Utf8String(description.to_owned())),
    ]);
    let values = vec![
        Amf0Value::Utf8String("onStatus".to_owned()),
        Amf0Value::Number(0.0),
        Amf0Value::Null,
        Amf0Value::Object(status),
    ];
    let payload = serialize(&values).ok()?;
    Some(chunk_message(STATUS_CSID, 20, stream_id, 0, &payload, CHUNK_SIZE))
}

/// One RTMP message as chunks: a type-0 header (absolute timestamp), then type-3 headers
/// between chunks, so the bytes depend only on the message and the stream id.
pub fn chunk_message(
    csid: u8,
    type_id: u8,
    stream_id: u32,
    timestamp: u32,
    payload: &[u8],
    chunk_size: usize,
) -> Bytes {
    let extended = timestamp >= 0x00ff_ffff;
    let chunks = payload.len().div_ceil(chunk_size).max(1);
    let mut out = Vec::with_capacity(payload.len() + 16 + chunks * 5);
    out.push(csid & 0x3f);
    let ts = timestamp.min(0x00ff_ffff);
    out.extend_from_slice(&ts.to_be_bytes()[1..]);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(type_id);
    out.extend_from_slice(&stream_id.to_le_bytes());
    if extended {
        out.extend_from_slice(&timestamp.to_be_bytes());
    }
    for (i, chunk) in payload.chunks(chunk_size).enumerate() {
        if i > 0 {
            out.push(0xc0 | (csid & 0x3f));
            if extended {
                out.extend_from_slice(&timestamp.to_be_bytes());
            }
        }
        out.extend_from_slice(chunk);
    }
    Bytes::from(out)
}

pub(super) fn video(data: Bytes, ts: RtmpTimestamp) -> Media {
    let chunked = chunk_message(VIDEO_CSID, 9, 1, ts.value, &data, CHUNK_SIZE);
    Media::Video(data, ts, chunked)
}

pub(super) fn audio(data: Bytes, ts: RtmpTimestamp) -> Media {
    let chunked = chunk_message(AUDIO_CSID, 8, 1, ts.value, &data, CHUNK_SIZE);
    Media::Audio(data, ts, chunked)
}

pub(super) fn is_keyframe(data: &[u8]) -> bool {
    data.first().is_some_and(|b| b >> 4 == 1)
}

pub(super) fn is_video_header(data: &[u8]) -> bool {
    data.len() >= 2 && data[0] & 0x0f == 7 && data[1] == 0
}

pub(super) fn is_audio_header(data: &[u8]) -> bool {
    data.len() >= 2 && data[0] >> 4 == 10 && data[1] == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rml_rtmp::chunk_io::ChunkDeserializer;
    #[test]
    fn pre_chunked_messages_read_back_as_the_same_messages() {
        let mut de = ChunkDeserializer::new();
        de.set_max_chunk_size(CHUNK_SIZE).unwrap();
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        for (ts, len) in [(0u32, 1usize), (40, 4096), (80, 4097), (0x00ff_fffe, 10_000), (0x0100_0000, 9000)] {
            let bytes = chunk_message(VIDEO_CSID, 9, 1, ts, &payload[..len], CHUNK_SIZE);
            let m = de.get_next_message(&bytes).unwrap().expect("one whole message");
            assert_eq!((m.timestamp.value, m.type_id, m.message_stream_id), (ts, 9, 1));
            assert_eq!(&m.data[..], &payload[..len]);
            assert!(de.get_next_message(&[]).unwrap().is_none());
        }
    }
}
