//! The RTMP session input path: any bytes a client sends, through the handshake, rml_rtmp's
//! session, the message-size bound, request parsing, `decide` and the media path.
//!
//! rml_rtmp 0.8.0 panics on some inputs; the worker contains those per connection
//! (`guarded_input`, with regression tests), so panics raised inside that guard are left to
//! it here. Any other panic is a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        let crash = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if sluice_data_plane::rtmp::in_guarded_input() {
                return;
            }
            crash(info);
        }));
    },
    |data: &[u8]| {
        // A small bound so the fuzzer also explores the oversized-message path.
        sluice_data_plane::rtmp::drive_input(data, 64 * 1024);
    }
);
