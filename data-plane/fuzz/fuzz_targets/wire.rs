//! Credential parsing from the wire: an RTMP app and stream key, an SRT streamid.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sluice_events::wire::parse_srt_streamid(data);
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (app, key) = text.split_once('/').unwrap_or((text, ""));
    let _ = sluice_events::wire::parse_rtmp(app, key);
});
