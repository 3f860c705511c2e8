//! One-line summaries of Ethernet frames, in tcpdump's manner, for `capture`'s text output.

use std::{fmt::Write as _, net::IpAddr};

use super::frame::{self, ETH_ARP, ETH_IP, ETH_IP6, be16, be32};

fn tcp_flags(f: u8) -> String {
    let mut s = String::new();
    for (bit, c) in [(0x02, 'S'), (0x01, 'F'), (0x04, 'R'), (0x08, 'P'), (0x20, 'U'), (0x40, 'E'), (0x80, 'W')] {
        if f & bit != 0 {
            s.push(c);
        }
    }
    if f & 0x10 != 0 {
        s.push('.');
    }
    if s.is_empty() { "none".into() } else { s }
}

/// "IP 198.18.0.1.40000 > 198.18.0.2.8080: Flags [P.], seq 1:19, ack 7, length 18".
pub fn summary(d: &[u8], orig_len: u32) -> String {
    let Some(ethertype) = frame::ethertype(d) else {
        return format!("truncated frame, length {orig_len}");
    };
    let (name, src, dst, proto, l4, end) = match ethertype {
        ETH_IP | ETH_IP6 => {
            let name = if ethertype == ETH_IP { "IP" } else { "IP6" };
            let Some(ip) = frame::ip(d) else {
                return format!("{name} truncated, length {orig_len}");
            };
            if ip.frag != 0 {
                return format!(
                    "IP {} > {}: fragment (offset {}), length {orig_len}",
                    ip.src,
                    ip.dst,
                    usize::from(ip.frag) * 8
                );
            }
            (name, ip.src, ip.dst, ip.proto, ip.l4, ip.end)
        }
        ETH_ARP => {
            let op = be16(d, 20).unwrap_or(0);
            let spa = d.get(28..32).map(|a| IpAddr::from(<[u8; 4]>::try_from(a).expect("4")));
            let tpa = d.get(38..42).map(|a| IpAddr::from(<[u8; 4]>::try_from(a).expect("4")));
            return match (op, spa, tpa) {
                (1, Some(s), Some(t)) => {
                    format!("ARP, Request who-has {t} tell {s}, length {}", orig_len.saturating_sub(14))
                }
                (2, Some(s), _) => {
                    format!("ARP, Reply {s} is-at {}, length {}", mac(d.get(22..28)), orig_len.saturating_sub(14))
                }
                _ => format!("ARP, length {}", orig_len.saturating_sub(14)),
            };
        }
        t => return format!("ethertype {t:#06x}, length {orig_len}"),
    };
    let mut out = String::new();
    let ports = be16(d, l4).zip(be16(d, l4 + 2));
    let payload_end = end.min(orig_len as usize);
    match (proto, ports) {
        (6, Some((sp, dp))) => {
            let seq = be32(d, l4 + 4).unwrap_or(0);
            let ack = be32(d, l4 + 8).unwrap_or(0);
            let doff = d.get(l4 + 12).map_or(20, |b| ((b >> 4) as usize) * 4);
            let flags = d.get(l4 + 13).copied().unwrap_or(0);
            let len = payload_end.saturating_sub(l4 + doff);
            let _ = write!(out, "{name} {src}.{sp} > {dst}.{dp}: Flags [{}], ", tcp_flags(flags));
            if len > 0 {
                let _ = write!(out, "seq {seq}:{}, ", seq.wrapping_add(len as u32));
            } else {
                let _ = write!(out, "seq {seq}, ");
            }
            if flags & 0x10 != 0 {
                let _ = write!(out, "ack {ack}, ");
            }
            let _ = write!(out, "length {len}");
        }
        (17, Some((sp, dp))) => {
            let len = be16(d, l4 + 4).map_or(0, |l| (l as usize).saturating_sub(8));
            let _ = write!(out, "{name} {src}.{sp} > {dst}.{dp}: UDP, length {len}");
        }
        (1 | 58, _) => {
            let ty = d.get(l4).copied().unwrap_or(0);
            let what = match (proto, ty) {
                (1, 8) | (58, 128) => "echo request",
                (1, 0) | (58, 129) => "echo reply",
                (58, 135) => "neighbor solicitation",
                (58, 136) => "neighbor advertisement",
                (58, 133) => "router solicitation",
                (58, 143) => "multicast listener report v2",
                _ => "type",
            };
            let icmp = if proto == 1 { "ICMP" } else { "ICMP6" };
            let _ = write!(out, "{name} {src} > {dst}: {icmp} {what}");
            if what == "type" {
                let _ = write!(out, " {ty}");
            }
            let _ = write!(out, ", length {}", payload_end.saturating_sub(l4));
        }
        (p, _) => {
            let _ = write!(out, "{name} {src} > {dst}: ip-proto-{p}, length {}", payload_end.saturating_sub(l4));
        }
    }
    out
}

fn mac(b: Option<&[u8]>) -> String {
    b.map(|b| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_line() {
        let mut f = vec![0u8; 14];
        f[12] = 8;
        f.extend([0x45, 0, 0, 58, 0, 0, 0x40, 0, 64, 6, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1]);
        f.extend([0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 1, 0, 0, 0, 7, 0x50, 0x18, 0, 0, 0, 0, 0, 0]);
        f.extend(b"Hello from client!");
        let s = summary(&f, f.len() as u32);
        assert_eq!(s, "IP 127.0.0.1.40000 > 127.0.0.1.8080: Flags [P.], seq 1:19, ack 7, length 18");
    }

    #[test]
    fn garbage_does_not_panic() {
        for n in 0..80 {
            let f: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let _ = summary(&f, n);
            let mut g = f.clone();
            if g.len() > 13 {
                g[12] = 0x08;
                g[13] = 0;
            }
            let _ = summary(&g, n);
            if g.len() > 13 {
                g[12] = 0x86;
                g[13] = 0xdd;
            }
            let _ = summary(&g, n);
        }
    }
}
