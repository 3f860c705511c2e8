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

/// `-e`: "02:00:00:00:00:01 > 02:00:00:00:00:02, ethertype IPv4 (0x0800), length 74: ".
pub fn link_header(d: &[u8], orig_len: u32) -> String {
    let Some(t) = frame::ethertype(d) else { return String::new() };
    let name = match t {
        ETH_IP => "IPv4",
        ETH_IP6 => "IPv6",
        ETH_ARP => "ARP",
        _ => "Unknown",
    };
    format!("{} > {}, ethertype {name} ({t:#06x}), length {orig_len}: ", mac(d.get(6..12)), mac(d.get(0..6)))
}

/// `-v`: the IP header's fields, "(tos 0x0, ttl 64, id 4660, offset 0, flags [DF], proto
/// TCP (6), length 52)" for IPv4, "(flowlabel 0x12345, hlim 64, next-header UDP (17),
/// payload length 26)" for IPv6; None for other frames.
pub fn ip_details(d: &[u8]) -> Option<String> {
    let proto_name = |p: u8| match p {
        6 => "TCP",
        17 => "UDP",
        1 => "ICMP",
        58 => "ICMPv6",
        132 => "SCTP",
        _ => "unknown",
    };
    match frame::ethertype(d)? {
        ETH_IP => {
            let h = d.get(14..34)?;
            let frag = u16::from_be_bytes([h[6], h[7]]);
            let mut flags = Vec::new();
            if frag & 0x4000 != 0 {
                flags.push("DF");
            }
            if frag & 0x2000 != 0 {
                flags.push("+");
            }
            Some(format!(
                "(tos {:#x}, ttl {}, id {}, offset {}, flags [{}], proto {} ({}), length {})",
                h[1],
                h[8],
                u16::from_be_bytes([h[4], h[5]]),
                usize::from(frag & 0x1fff) * 8,
                if flags.is_empty() { "none".to_string() } else { flags.join(",") },
                proto_name(h[9]),
                h[9],
                u16::from_be_bytes([h[2], h[3]])
            ))
        }
        ETH_IP6 => {
            let h = d.get(14..54)?;
            Some(format!(
                "(flowlabel {:#x}, hlim {}, next-header {} ({}), payload length {})",
                u32::from_be_bytes([0, h[1] & 0x0f, h[2], h[3]]),
                h[7],
                proto_name(h[6]),
                h[6],
                u16::from_be_bytes([h[4], h[5]])
            ))
        }
        _ => None,
    }
}

/// `-x`/`-X`: the bytes as tcpdump prints them, 16 a line, "\t0x0010:  4500 0034 ...",
/// with `ascii` the printable characters after them.
pub fn hex_dump(d: &[u8], ascii: bool) -> String {
    let mut out = String::new();
    for (i, line) in d.chunks(16).enumerate() {
        let _ = write!(out, "\t0x{:04x}:  ", i * 16);
        let mut hex = String::new();
        for (j, pair) in line.chunks(2).enumerate() {
            if j > 0 {
                hex.push(' ');
            }
            for b in pair {
                let _ = write!(hex, "{b:02x}");
            }
        }
        out.push_str(&hex);
        if ascii {
            let _ = write!(out, "{}  {}", " ".repeat(39 - hex.len()), printable(line, false));
        }
        out.push('\n');
    }
    out
}

/// `-A` (and `-X`'s column): printable ASCII, '.' for the rest; `newlines` keeps line
/// breaks (for -A).
pub fn printable(d: &[u8], newlines: bool) -> String {
    d.iter()
        .filter(|b| !(newlines && **b == b'\r'))
        .map(|&b| match b {
            b'\n' if newlines => '\n',
            0x20..=0x7e => b as char,
            _ => '.',
        })
        .collect()
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
    fn verbose_link_and_hex() {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 8, 0];
        f.extend([0x45, 0, 0, 33, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1]);
        f.extend([0x9c, 0x40, 0x1f, 0x90, 0, 13, 0, 0]);
        f.extend(b"hi!\r\n");
        assert_eq!(link_header(&f, 47), "02:00:00:00:00:01 > 02:00:00:00:00:02, ethertype IPv4 (0x0800), length 47: ");
        assert_eq!(
            ip_details(&f).unwrap(),
            "(tos 0x0, ttl 64, id 4660, offset 0, flags [DF], proto UDP (17), length 33)"
        );
        let x = hex_dump(&f[14..], true);
        assert!(x.starts_with("\t0x0000:  4500 0021 1234 4000 4011 0000 7f00 0001  E..!.4@.@......."), "{x}");
        assert_eq!(x.lines().count(), 3);
        assert!(x.lines().nth(1).unwrap().ends_with("  .....@......hi!."), "{x}");
        assert_eq!(x.lines().last().unwrap(), "\t0x0020:  0a                                       .");
        assert_eq!(printable(b"GET / HTTP/1.1\r\nHost: x\x01", true), "GET / HTTP/1.1\nHost: x.");
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
