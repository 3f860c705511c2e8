//! Arbitrary strings into the capture filter compiler: a sentence or a config, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = packetflow::capture::expr::compile(s, 65535);
    }
});
