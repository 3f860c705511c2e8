//! Arbitrary text as a daemon config file: a settings value or one sentence, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use packetflow::daemon::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = Config::parse(text, "fuzz.toml") {
        let _ = c.filter();
        let _ = c.mode();
        assert!(c.restart_keys(&c).is_empty(), "a config differs from itself: {text:?}");
    }
});
