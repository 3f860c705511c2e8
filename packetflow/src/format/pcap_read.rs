//! Reads pcap (microsecond or nanosecond, either byte order) and pcapng (every section,
//! interface descriptions with `if_name`, `if_tsresol` and `if_tsoffset`, enhanced, simple
//! and obsolete packet blocks with their direction flags and comments), for `capture -r`.
//!
//! Frames come out as Ethernet whatever the file's link type: raw IP (101, 228, 229) and
//! Linux cooked captures (113, tcpdump -i any; 276, SLL2) get an Ethernet header built
//! from what they carry, so the one decoder and the one filter serve every file.

use std::io::{self, Read};

/// A file that cannot be read: one sentence (the caller names the file).
#[derive(Debug)]
pub struct ReadError(pub String);

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An interface of the file (pcap: one, named after nothing).
#[derive(Clone, Debug)]
pub struct Iface {
    pub name: String,
    pub linktype: u32,
    pub snaplen: u32,
    /// Timestamp units: (numerator, denominator) of nanoseconds per unit.
    units: (u128, u128),
    offset_s: i64,
}

/// One packet as Ethernet: `data` is valid until the next call to `next`.
pub struct Frame<'a> {
    pub iface: usize,
    /// The interface's name (`if_name`; empty in pcap files) and snaplen.
    pub ifname: &'a str,
    pub snaplen: u32,
    pub ts_ns: u64,
    pub data: &'a [u8],
    pub orig_len: u32,
    /// pcapng `epb_flags` direction: 1 in, 2 out, 0 unknown.
    pub dir: u32,
    pub comment: Option<String>,
}

const LINKTYPE_ETHERNET: u32 = 1;
const LINKTYPE_RAW: u32 = 101;
const LINKTYPE_LINUX_SLL: u32 = 113;
const LINKTYPE_IPV4: u32 = 228;
const LINKTYPE_IPV6: u32 = 229;
const LINKTYPE_LINUX_SLL2: u32 = 276;

/// No block or packet in a file we read is larger (pcapng's recommended maximum block).
const MAX_BLOCK: usize = 16 << 20;

enum Format {
    Pcap { swap: bool },
    Pcapng { swap: bool },
}

pub struct Reader<R: Read> {
    r: R,
    format: Format,
    ifaces: Vec<Iface>,
    /// Bytes read so far (for "corrupt at byte N").
    pos: u64,
    block: Vec<u8>,
    frame: Vec<u8>,
}

fn unsupported(linktype: u32) -> ReadError {
    ReadError(format!(
        "link type {linktype} is not one packetflow reads (Ethernet 1, raw IP 101/228/229, Linux cooked 113/276)"
    ))
}

fn check_linktype(linktype: u32) -> Result<(), ReadError> {
    match linktype {
        LINKTYPE_ETHERNET | LINKTYPE_RAW | LINKTYPE_IPV4 | LINKTYPE_IPV6 | LINKTYPE_LINUX_SLL | LINKTYPE_LINUX_SLL2 => {
            Ok(())
        }
        t => Err(unsupported(t)),
    }
}

impl<R: Read> Reader<R> {
    /// Reads the file header (pcap) or the first section header (pcapng).
    pub fn open(mut r: R) -> Result<Reader<R>, ReadError> {
        let mut magic = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match r.read(&mut magic[got..]) {
                Ok(0) => return Err(ReadError(format!("not a pcap or pcapng file (it is {got} bytes long)"))),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError(format!("cannot read: {e}"))),
            }
        }
        let mut me = Reader {
            r,
            format: Format::Pcap { swap: false },
            ifaces: Vec::new(),
            pos: 4,
            block: Vec::new(),
            frame: Vec::new(),
        };
        match u32::from_le_bytes(magic) {
            0x0A0D_0D0A => {
                let mut len = [0u8; 4];
                me.read(&mut len, "a section header")?;
                me.section(len)?;
            }
            m @ (0xA1B2_C3D4 | 0xA1B2_3C4D | 0xD4C3_B2A1 | 0x4D3C_B2A1) => {
                let swap = matches!(m, 0xD4C3_B2A1 | 0x4D3C_B2A1);
                let nanos = matches!(m, 0xA1B2_3C4D | 0x4D3C_B2A1);
                let mut h = [0u8; 20];
                me.read(&mut h, "the pcap file header")?;
                let snaplen = le_or_be(&h[12..16], swap);
                let linktype = le_or_be(&h[16..20], swap) & 0xffff;
                check_linktype(linktype)?;
                me.format = Format::Pcap { swap };
                let units = if nanos { (1, 1) } else { (1000, 1) };
                me.ifaces.push(Iface { name: String::new(), linktype, snaplen, units, offset_s: 0 });
            }
            m => {
                return Err(ReadError(format!(
                    "not a pcap or pcapng file (it starts with {m:#010x}; pcap starts with 0xa1b2c3d4, pcapng with 0x0a0d0d0a)"
                )));
            }
        }
        Ok(me)
    }

    pub fn ifaces(&self) -> &[Iface] {
        &self.ifaces
    }

    fn read(&mut self, buf: &mut [u8], what: &str) -> Result<(), ReadError> {
        read_exact(&mut self.r, buf, self.pos, what)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// The rest of a pcapng section header block, after its type and (still undecoded)
    /// length: its byte order comes from the magic that follows. Interfaces restart.
    fn section(&mut self, len: [u8; 4]) -> Result<(), ReadError> {
        let mut magic = [0u8; 4];
        self.read(&mut magic, "a section header")?;
        let swap = match u32::from_le_bytes(magic) {
            0x1A2B_3C4D => false,
            0x4D3C_2B1A => true,
            m => return Err(self.corrupt(&format!("a section header with byte-order magic {m:#010x}"))),
        };
        let len = le_or_be(&len, swap) as usize;
        if !(28..=MAX_BLOCK).contains(&len) || !len.is_multiple_of(4) {
            return Err(self.corrupt(&format!("a section header {len} bytes long")));
        }
        let mut rest = vec![0u8; len - 12];
        self.read(&mut rest, "a section header")?;
        self.format = Format::Pcapng { swap };
        self.ifaces.clear();
        Ok(())
    }

    fn corrupt(&self, what: &str) -> ReadError {
        ReadError(format!("corrupt at byte {}: {what}", self.pos))
    }

    /// The next packet, or None at the end of the file.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, ReadError> {
        match self.format {
            Format::Pcap { swap } => self.next_pcap(swap),
            Format::Pcapng { .. } => self.next_pcapng(),
        }
    }

    fn next_pcap(&mut self, swap: bool) -> Result<Option<Frame<'_>>, ReadError> {
        let mut h = [0u8; 16];
        if !self.fill_or_end(&mut h)? {
            return Ok(None);
        }
        let (secs, frac) = (le_or_be(&h[..4], swap), le_or_be(&h[4..8], swap));
        let (caplen, orig) = (le_or_be(&h[8..12], swap) as usize, le_or_be(&h[12..16], swap));
        if caplen > MAX_BLOCK {
            return Err(self.corrupt(&format!("a packet record of {caplen} bytes")));
        }
        let mut data = std::mem::take(&mut self.block);
        data.resize(caplen, 0);
        self.read(&mut data, "a packet")?;
        self.block = data;
        let iface = &self.ifaces[0];
        let ts = u64::from(secs) * 1_000_000_000 + (u128::from(frac) * iface.units.0 / iface.units.1) as u64;
        self.frame(0, ts, orig, 0, None)
    }

    /// Reads `buf` whole, or returns false at a clean end of file before its first byte.
    fn fill_or_end(&mut self, buf: &mut [u8]) -> Result<bool, ReadError> {
        let mut got = 0;
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(self.corrupt("the file ends inside a record")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError(format!("cannot read: {e}"))),
            }
        }
        self.pos += buf.len() as u64;
        Ok(true)
    }

    fn next_pcapng(&mut self) -> Result<Option<Frame<'_>>, ReadError> {
        loop {
            let Format::Pcapng { swap } = self.format else { unreachable!("pcapng") };
            let mut head = [0u8; 8];
            if !self.fill_or_end(&mut head)? {
                return Ok(None);
            }
            if head[..4] == [0x0A, 0x0D, 0x0D, 0x0A] {
                // A new section: its own byte order and interfaces.
                self.section(head[4..8].try_into().expect("4 bytes"))?;
                continue;
            }
            let ty = le_or_be(&head[..4], swap);
            let len = le_or_be(&head[4..8], swap) as usize;
            if !(12..=MAX_BLOCK).contains(&len) || !len.is_multiple_of(4) {
                return Err(self.corrupt(&format!("a block (type {ty}) {len} bytes long")));
            }
            let mut body = std::mem::take(&mut self.block);
            body.resize(len - 8, 0);
            self.read(&mut body, "a block")?;
            self.block = body;
            let body = &self.block[..len - 12];
            let u32_at = |i: usize| body.get(i..i + 4).map(|b| le_or_be(b, swap));
            match ty {
                1 => {
                    let (Some(lt), Some(snaplen)) = (body.get(..2), u32_at(4)) else {
                        return Err(self.corrupt("a short interface description"));
                    };
                    let linktype = u32::from(if swap {
                        u16::from_be_bytes([lt[0], lt[1]])
                    } else {
                        u16::from_le_bytes([lt[0], lt[1]])
                    });
                    check_linktype(linktype)?;
                    let mut iface = Iface { name: String::new(), linktype, snaplen, units: (1000, 1), offset_s: 0 };
                    for (code, v) in options(body.get(8..).unwrap_or_default(), swap) {
                        match (code, v.len()) {
                            (2, _) => iface.name = String::from_utf8_lossy(v).trim_end_matches('\0').to_string(),
                            (9, 1) => {
                                iface.units = units(v[0]).ok_or_else(|| self.corrupt("an if_tsresol out of range"))?;
                            }
                            (14, 8) => iface.offset_s = le_or_be64(v, swap) as i64,
                            _ => {}
                        }
                    }
                    self.ifaces.push(iface);
                }
                6 | 2 => {
                    // Enhanced packet (6), or the obsolete packet block (2, a 16-bit
                    // interface id and a drop count where EPB has the 32-bit id).
                    let id = if ty == 6 {
                        u32_at(0)
                    } else {
                        body.get(..2).map(|b| {
                            u32::from(if swap {
                                u16::from_be_bytes([b[0], b[1]])
                            } else {
                                u16::from_le_bytes([b[0], b[1]])
                            })
                        })
                    };
                    let (Some(id), Some(hi), Some(lo), Some(caplen), Some(orig)) =
                        (id, u32_at(4), u32_at(8), u32_at(12), u32_at(16))
                    else {
                        return Err(self.corrupt("a short packet block"));
                    };
                    let caplen = caplen as usize;
                    let Some(iface) = self.ifaces.get(id as usize) else {
                        return Err(self.corrupt(&format!("a packet of interface {id}, which was never described")));
                    };
                    if 20 + caplen > body.len() {
                        return Err(self.corrupt(&format!("a packet of {caplen} bytes in a block of {len}")));
                    }
                    let raw = (u64::from(hi) << 32) | u64::from(lo);
                    let ts = (i128::from(iface.offset_s) * 1_000_000_000
                        + (u128::from(raw) * iface.units.0 / iface.units.1) as i128)
                        .max(0) as u64;
                    let (mut dir, mut comment) = (0, None);
                    for (code, v) in options(body.get(20 + caplen + pad4(caplen)..).unwrap_or_default(), swap) {
                        match (code, v.len()) {
                            (1, _) => comment = Some(String::from_utf8_lossy(v).into_owned()),
                            (2, 4) if ty == 6 => dir = le_or_be(v, swap) & 3,
                            _ => {}
                        }
                    }
                    // The packet's bytes are moved to the block's start for `frame`.
                    self.block.copy_within(20..20 + caplen, 0);
                    self.block.truncate(caplen);
                    return self.frame(id as usize, ts, orig, dir, comment);
                }
                3 => {
                    // Simple packet: interface 0, no time; its length before truncation.
                    let Some(orig) = u32_at(0) else { return Err(self.corrupt("a short simple packet block")) };
                    let Some(iface) = self.ifaces.first() else {
                        return Err(self.corrupt("a simple packet before any interface description"));
                    };
                    let snap = if iface.snaplen == 0 { u32::MAX } else { iface.snaplen };
                    let caplen = (orig.min(snap) as usize).min(body.len() - 4);
                    self.block.copy_within(4..4 + caplen, 0);
                    self.block.truncate(caplen);
                    return self.frame(0, 0, orig, 0, None);
                }
                _ => {}
            }
        }
    }

    /// `self.block` (the packet's captured bytes) as an Ethernet frame.
    fn frame(
        &mut self,
        iface: usize,
        ts_ns: u64,
        orig: u32,
        dir: u32,
        comment: Option<String>,
    ) -> Result<Option<Frame<'_>>, ReadError> {
        let linktype = self.ifaces[iface].linktype;
        let d = &self.block;
        // (Built in `self.frame` where the file's link type is not Ethernet.)
        let (data, orig_len, dir): (&[u8], u32, u32) = match linktype {
            LINKTYPE_ETHERNET => (d, orig, dir),
            LINKTYPE_RAW | LINKTYPE_IPV4 | LINKTYPE_IPV6 => {
                let ethertype: u16 = match d.first().map(|b| b >> 4) {
                    Some(6) => 0x86dd,
                    _ => 0x0800,
                };
                self.frame.clear();
                self.frame.extend([0u8; 12]);
                self.frame.extend(ethertype.to_be_bytes());
                self.frame.extend_from_slice(d);
                (&self.frame, orig.saturating_add(14), dir)
            }
            _ => {
                // Linux cooked: SLL (16 bytes: packet type, hardware type, address length,
                // 8 address bytes, protocol) or SLL2 (20: protocol, reserved, ifindex,
                // hardware type, packet type, address length, 8 address bytes).
                let (head, pkttype, addr, proto) = if linktype == LINKTYPE_LINUX_SLL {
                    (16, d.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])), d.get(6..12), d.get(14..16))
                } else {
                    (20, d.get(10).map(|b| u16::from(*b)), d.get(12..18), d.get(..2))
                };
                let (Some(pkttype), Some(addr), Some(proto)) = (pkttype, addr, proto) else {
                    return Err(self.corrupt("a Linux cooked packet shorter than its header"));
                };
                self.frame.clear();
                self.frame.extend([0u8; 6]);
                self.frame.extend_from_slice(addr);
                self.frame.extend_from_slice(proto);
                self.frame.extend_from_slice(d.get(head..).unwrap_or_default());
                // Packet type 4: sent by this host; the others were received.
                let dir = if dir != 0 {
                    dir
                } else if pkttype == 4 {
                    2
                } else {
                    1
                };
                (&self.frame, orig.saturating_add(14).saturating_sub(head as u32), dir)
            }
        };
        let Iface { name, snaplen, .. } = &self.ifaces[iface];
        Ok(Some(Frame { iface, ifname: name, snaplen: *snaplen, ts_ns, data, orig_len, dir, comment }))
    }
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], pos: u64, what: &str) -> Result<(), ReadError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ReadError(format!("corrupt at byte {pos}: the file ends inside {what}")),
        _ => ReadError(format!("cannot read: {e}")),
    })
}

fn le_or_be(b: &[u8], swap: bool) -> u32 {
    let a: [u8; 4] = b[..4].try_into().expect("4 bytes");
    if swap { u32::from_be_bytes(a) } else { u32::from_le_bytes(a) }
}

fn le_or_be64(b: &[u8], swap: bool) -> u64 {
    let a: [u8; 8] = b[..8].try_into().expect("8 bytes");
    if swap { u64::from_be_bytes(a) } else { u64::from_le_bytes(a) }
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// `if_tsresol`: 10^-n or (top bit set) 2^-n seconds per unit, as ns = units × num / den.
fn units(r: u8) -> Option<(u128, u128)> {
    let n = u32::from(r & 0x7f);
    if r & 0x80 != 0 {
        return (n <= 64).then(|| (1_000_000_000, 1u128 << n));
    }
    match n {
        0..=9 => Some((10u128.pow(9 - n), 1)),
        10..=38 => Some((1, 10u128.pow(n - 9))),
        _ => None,
    }
}

/// A block's options: (code, value) until opt_endofopt or the end.
fn options(mut d: &[u8], swap: bool) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while d.len() >= 4 {
        let code = if swap { u16::from_be_bytes([d[0], d[1]]) } else { u16::from_le_bytes([d[0], d[1]]) };
        let len = usize::from(if swap { u16::from_be_bytes([d[2], d[3]]) } else { u16::from_le_bytes([d[2], d[3]]) });
        if code == 0 || 4 + len > d.len() {
            break;
        }
        out.push((code, &d[4..4 + len]));
        d = d.get(4 + len + pad4(len)..).unwrap_or_default();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pcapng;

    /// (interface, time, bytes, length, direction, comment) of each frame.
    type Got = (usize, u64, Vec<u8>, u32, u32, Option<String>);

    fn frames(bytes: &[u8]) -> Result<Vec<Got>, ReadError> {
        let mut r = Reader::open(bytes)?;
        let mut out = Vec::new();
        while let Some(f) = r.next_frame()? {
            out.push((f.iface, f.ts_ns, f.data.to_vec(), f.orig_len, f.dir, f.comment));
        }
        Ok(out)
    }

    #[test]
    fn reads_back_what_the_pcapng_writer_wrote() {
        let mut w = pcapng::Writer::new(Vec::new(), "test", "linux").unwrap();
        let a = w.interface("lo", 65535, "").unwrap();
        let b = w.interface("veth0", 128, "").unwrap();
        w.packet(a, 1_700_000_000_123_456_789, &[1, 2, 3], 60, pcapng::FLAG_INBOUND, "hello").unwrap();
        w.packet(b, 1_700_000_001_000_000_001, &[9; 14], 14, pcapng::FLAG_OUTBOUND, "").unwrap();
        w.stats(a, 0, 1, 1, 0).unwrap();
        w.packet(a, 5, &[], 0, 0, "").unwrap();
        let f = frames(&w.into_inner()).unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!(f[0], (0, 1_700_000_000_123_456_789, vec![1, 2, 3], 60, 1, Some("hello".into())));
        assert_eq!(f[1], (1, 1_700_000_001_000_000_001, vec![9; 14], 14, 2, None));
        assert_eq!(f[2].1, 5);
    }

    #[test]
    fn reads_pcap_in_both_byte_orders_and_resolutions() {
        for (magic, swap, nanos) in [(0xA1B2_C3D4u32, false, false), (0xA1B2_3C4D, true, true)] {
            let put = |v: u32| if swap { v.to_be_bytes() } else { v.to_le_bytes() };
            let mut f = Vec::new();
            f.extend(put(magic));
            f.extend(if swap { [0, 2, 0, 4] } else { [2, 0, 4, 0] });
            f.extend([0u8; 8]);
            f.extend(put(65535));
            f.extend(put(101)); // raw IP
            f.extend(put(10));
            f.extend(put(500));
            f.extend(put(20));
            f.extend(put(40));
            let mut ip = vec![0x45u8; 1];
            ip.extend([0u8; 19]);
            f.extend(&ip);
            let got = frames(&f).unwrap();
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].1, 10_000_000_000 + if nanos { 500 } else { 500_000 });
            assert_eq!(&got[0].2[12..14], &[8, 0], "an Ethernet header for raw IPv4");
            assert_eq!((got[0].2.len(), got[0].3), (34, 54));
        }
    }

    #[test]
    fn bad_files_are_one_sentence() {
        let e = frames(b"hello world, not a capture").err().unwrap();
        assert!(e.0.starts_with("not a pcap or pcapng file"), "{e}");
        let e = frames(b"").err().unwrap();
        assert_eq!(e.0, "not a pcap or pcapng file (it is 0 bytes long)");
        let mut w = pcapng::Writer::new(Vec::new(), "test", "linux").unwrap();
        let a = w.interface("lo", 65535, "").unwrap();
        w.packet(a, 1, &[1; 40], 40, 0, "").unwrap();
        let whole = w.into_inner();
        let e = frames(&whole[..whole.len() - 10]).err().unwrap();
        assert!(e.0.starts_with("corrupt at byte"), "{e}");
        let mut bad = whole.clone();
        let n = bad.len();
        // The packet block (28 + 40 + 4 bytes) claims a length of 7.
        bad[n - 68..n - 64].copy_from_slice(&7u32.to_le_bytes());
        let e = frames(&bad).err().unwrap();
        assert!(e.0.contains("corrupt"), "{e}");
    }

    #[test]
    fn cooked_captures_become_ethernet_with_their_direction() {
        let mut f = Vec::new();
        f.extend(0xA1B2_C3D4u32.to_le_bytes());
        f.extend([2, 0, 4, 0]);
        f.extend([0u8; 8]);
        f.extend(65535u32.to_le_bytes());
        f.extend(113u32.to_le_bytes());
        let mut sll = vec![0, 4, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0, 0x08, 0x00];
        sll.extend([0x45; 20]);
        f.extend(0u32.to_le_bytes());
        f.extend(0u32.to_le_bytes());
        f.extend((sll.len() as u32).to_le_bytes());
        f.extend((sll.len() as u32).to_le_bytes());
        f.extend(&sll);
        let got = frames(&f).unwrap();
        assert_eq!(&got[0].2[6..14], &[1, 2, 3, 4, 5, 6, 8, 0]);
        assert_eq!((got[0].2.len(), got[0].4), (34, 2), "outgoing (packet type 4)");
    }
}
