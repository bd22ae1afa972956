//! Datagrams from four peers into the worker's batched SRT driver itself (issue #21): its
//! listener, the admission side's answers (refused, publisher or player, with or without a
//! passphrase, kicked), connections, streams and players, timers; the clock moved by the input.
//! The driver's `fuzz` entry (data-plane/src/srt/driver.rs) replays the datagrams through a
//! transport of its own in place of the UDP socket.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice_data_plane::srt::fuzz_driver(data));
