//! Arbitrary bytes into the recording reader: it may refuse or skip, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use packetflow::format::recording::Reader;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut r) = Reader::new(data, "fuzz") {
        while let Ok(Some(_)) = r.next_line() {}
    }
});
