//! `capture -r`'s reader (packetflow/src/format/pcap_read.rs) on arbitrary bytes: a
//! corrupt or hostile file is an error sentence, never a panic, an endless loop or a huge
//! allocation; every frame it hands out lies within what it read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use packetflow::format::pcap_read::Reader;

fuzz_target!(|data: &[u8]| {
    let Ok(mut r) = Reader::open(data) else { return };
    // Each frame consumes at least a header of the input: the count is bounded by it.
    for _ in 0..=data.len() {
        match r.next_frame() {
            Ok(Some(f)) => {
                assert!(f.data.len() <= data.len() + 20, "a frame larger than the file");
                let _ = f.iface;
            }
            Ok(None) | Err(_) => return,
        }
    }
    panic!("more frames than bytes");
});
