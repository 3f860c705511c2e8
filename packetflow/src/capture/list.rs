//! `capture -D`: the interfaces of this namespace, as tcpdump lists them, with what
//! packetflow can do on each: the XDP modes its driver offers (`xdp-features`, Linux 6.3+),
//! AF_XDP zero-copy, and which program holds its XDP slot now.

use crate::{kernel::xdp_owner, platform::interfaces};

/// netdev `xdp-features` bits (include/uapi/linux/netdev.h).
const XDP_ACT_BASIC: u64 = 1 << 0;
const XDP_ACT_XSK_ZEROCOPY: u64 = 1 << 3;

pub fn run() {
    let features = super::xsk::xdp_features().ok();
    for (index, name, _) in interfaces::interfaces() {
        let flags = interfaces::ifreq(&name, libc::SIOCGIFFLAGS, |_| {})
            // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
            .map_or(0, |r| i32::from(unsafe { r.ifr_ifru.ifru_flags }));
        let mut state = Vec::new();
        for (bit, word) in [(libc::IFF_UP, "Up"), (libc::IFF_RUNNING, "Running"), (libc::IFF_LOOPBACK, "Loopback")] {
            if flags & bit != 0 {
                state.push(word);
            }
        }
        let modes = match features.as_ref().map(|f| f.iter().find(|(i, _)| *i == index).map_or(0, |(_, b)| *b)) {
            Some(b) => format!(
                "XDP generic{}; AF_XDP {}",
                if b & XDP_ACT_BASIC != 0 { ", native" } else { "" },
                if b & XDP_ACT_XSK_ZEROCOPY != 0 { "zero-copy" } else { "copy mode" }
            ),
            None => "XDP generic (native: this kernel does not say)".into(),
        };
        let slot = match xdp_owner::holder(index) {
            Ok(None) => "XDP slot free".to_string(),
            Ok(Some(h)) => format!("XDP slot: {}", h.describe()),
            Err(e) => format!("XDP slot unknown ({e:#})"),
        };
        println!("{index}.{name} [{}] {modes}; {slot}", state.join(", "));
    }
}
