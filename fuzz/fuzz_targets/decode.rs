//! Arbitrary frames into the one-line summaries of `capture`'s text output: one line,
//! never a panic, whatever the bytes and the claimed original length.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (len, frame) = match data.split_first_chunk::<4>() {
        Some((l, f)) => (u32::from_le_bytes(*l), f),
        None => (data.len() as u32, data),
    };
    let line = packetflow::capture::decode::summary(frame, len);
    assert!(!line.is_empty() && !line.contains('\n'), "{line:?}");
});
