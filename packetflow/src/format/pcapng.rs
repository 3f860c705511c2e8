//! A small pcapng writer (https://www.ietf.org/archive/id/draft-ietf-opsawg-pcapng):
//! section header, interface descriptions, enhanced packets with direction flags and
//! comments, interface statistics. Little-endian, nanosecond timestamps.
//!
//! No maintained crate writes EPB flags, per-packet comments and ISB counters together
//! (pcap-file's pcapng writer has no ISB option support), so this is written here; it is
//! small and checked against tshark in the tests.

use std::io::{self, Write};

const SHB: u32 = 0x0A0D_0D0A;
const IDB: u32 = 0x0000_0001;
const EPB: u32 = 0x0000_0006;
const ISB: u32 = 0x0000_0005;

const OPT_END: u16 = 0;
const OPT_COMMENT: u16 = 1;

pub const LINKTYPE_ETHERNET: u16 = 1;

/// EPB direction flags (epb_flags bits 0-1).
pub const FLAG_INBOUND: u32 = 1;
pub const FLAG_OUTBOUND: u32 = 2;

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Options of one block, already encoded.
#[derive(Default)]
struct Opts(Vec<u8>);

impl Opts {
    fn add(&mut self, code: u16, value: &[u8]) -> &mut Self {
        self.0.extend(code.to_le_bytes());
        self.0.extend((value.len() as u16).to_le_bytes());
        self.0.extend(value);
        self.0.extend(std::iter::repeat_n(0u8, pad4(value.len())));
        self
    }
    fn finish(mut self) -> Vec<u8> {
        if !self.0.is_empty() {
            self.0.extend(OPT_END.to_le_bytes());
            self.0.extend(0u16.to_le_bytes());
        }
        self.0
    }
}

fn ts_words(ns: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&((ns >> 32) as u32).to_le_bytes());
    b[4..].copy_from_slice(&(ns as u32).to_le_bytes());
    b
}

pub struct Writer<W: Write> {
    w: W,
    interfaces: u32,
    /// The section header's and interface descriptions' bodies, written again at the
    /// start of each file by `rotate`.
    shb: Vec<u8>,
    idbs: Vec<Vec<u8>>,
    /// Bytes written to the current file.
    pub written: u64,
}

impl<W: Write> Writer<W> {
    /// Starts a section: application and OS go in the section header.
    pub fn new(mut w: W, app: &str, os: &str) -> io::Result<Writer<W>> {
        let mut body = Vec::new();
        body.extend(0x1A2B_3C4Du32.to_le_bytes());
        body.extend(1u16.to_le_bytes());
        body.extend(0u16.to_le_bytes());
        body.extend((-1i64).to_le_bytes());
        let mut o = Opts::default();
        o.add(3, os.as_bytes()).add(4, app.as_bytes());
        body.extend(o.finish());
        block(&mut w, SHB, &body)?;
        Ok(Writer { w, interfaces: 0, written: 12 + body.len() as u64, shb: body, idbs: Vec::new() })
    }

    /// Goes on in a new file (`capture -C/-G`): the section header and every interface
    /// description again, so each file stands alone; interface ids stay. Returns the
    /// previous output, flushed.
    pub fn rotate(&mut self, mut w: W) -> io::Result<W> {
        self.w.flush()?;
        block(&mut w, SHB, &self.shb)?;
        self.written = 12 + self.shb.len() as u64;
        for body in &self.idbs {
            block(&mut w, IDB, body)?;
            self.written += 12 + body.len() as u64;
        }
        Ok(std::mem::replace(&mut self.w, w))
    }

    /// Describes an interface; returns its id for `packet` and `stats`.
    pub fn interface(&mut self, name: &str, snaplen: u32, comment: &str) -> io::Result<u32> {
        let mut body = Vec::new();
        body.extend(LINKTYPE_ETHERNET.to_le_bytes());
        body.extend(0u16.to_le_bytes());
        body.extend(snaplen.to_le_bytes());
        let mut o = Opts::default();
        o.add(2, name.as_bytes()).add(9, &[9]).add(OPT_COMMENT, comment.as_bytes());
        body.extend(o.finish());
        block(&mut self.w, IDB, &body)?;
        self.written += 12 + body.len() as u64;
        self.idbs.push(body);
        self.interfaces += 1;
        Ok(self.interfaces - 1)
    }

    /// One packet: `ts_ns` wall clock in ns, `orig_len` its length before truncation.
    pub fn packet(
        &mut self,
        iface: u32,
        ts_ns: u64,
        data: &[u8],
        orig_len: u32,
        flags: u32,
        comment: &str,
    ) -> io::Result<()> {
        // Written straight into the (buffered) output: no buffer per packet, and the fixed
        // part of the block in one write.
        let opt = |len: usize| 4 + len + pad4(len);
        let opts = if flags != 0 { opt(4) } else { 0 } + if comment.is_empty() { 0 } else { opt(comment.len()) };
        let opts = if opts == 0 { 0 } else { opts + 4 };
        let total = (12 + 20 + data.len() + pad4(data.len()) + opts) as u32;
        self.written += u64::from(total);
        let mut head = [0u8; 28];
        head[0..4].copy_from_slice(&EPB.to_le_bytes());
        head[4..8].copy_from_slice(&total.to_le_bytes());
        head[8..12].copy_from_slice(&iface.to_le_bytes());
        head[12..20].copy_from_slice(&ts_words(ts_ns));
        head[20..24].copy_from_slice(&(data.len() as u32).to_le_bytes());
        head[24..28].copy_from_slice(&orig_len.max(data.len() as u32).to_le_bytes());
        let w = &mut self.w;
        w.write_all(&head)?;
        w.write_all(data)?;
        if opts == 0 {
            let mut tail = [0u8; 7];
            let pad = pad4(data.len());
            tail[pad..pad + 4].copy_from_slice(&total.to_le_bytes());
            return w.write_all(&tail[..pad + 4]);
        }
        w.write_all(&[0u8; 3][..pad4(data.len())])?;
        let mut option = |code: u16, value: &[u8]| -> io::Result<()> {
            w.write_all(&code.to_le_bytes())?;
            w.write_all(&(value.len() as u16).to_le_bytes())?;
            w.write_all(value)?;
            w.write_all(&[0u8; 3][..pad4(value.len())])
        };
        if flags != 0 {
            option(2, &flags.to_le_bytes())?;
        }
        if !comment.is_empty() {
            option(OPT_COMMENT, comment.as_bytes())?;
        }
        if opts != 0 {
            option(OPT_END, &[])?;
        }
        w.write_all(&total.to_le_bytes())
    }

    /// Interface statistics: packets received (captured) and dropped, over [start, end].
    pub fn stats(&mut self, iface: u32, start_ns: u64, end_ns: u64, received: u64, dropped: u64) -> io::Result<()> {
        let mut body = Vec::new();
        body.extend(iface.to_le_bytes());
        body.extend(ts_words(end_ns));
        let mut o = Opts::default();
        o.add(2, &ts_words(start_ns))
            .add(3, &ts_words(end_ns))
            .add(4, &received.to_le_bytes())
            .add(5, &dropped.to_le_bytes());
        body.extend(o.finish());
        self.written += 12 + body.len() as u64;
        block(&mut self.w, ISB, &body)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }

    /// The output, after the last block.
    pub fn into_inner(self) -> W {
        self.w
    }
}

fn block(w: &mut impl Write, ty: u32, body: &[u8]) -> io::Result<()> {
    let total = (12 + body.len()) as u32;
    w.write_all(&ty.to_le_bytes())?;
    w.write_all(&total.to_le_bytes())?;
    w.write_all(body)?;
    w.write_all(&total.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After `rotate`, the new file starts with the section header and every interface
    /// description: it reads alone, with the same interface ids.
    #[test]
    fn a_rotated_file_stands_alone() {
        let mut w = Writer::new(Vec::new(), "packetflow test", "Linux").unwrap();
        let a = w.interface("lo", 65535, "").unwrap();
        let b = w.interface("eth0", 128, "").unwrap();
        w.packet(a, 1, &[1; 10], 10, FLAG_INBOUND, "").unwrap();
        let first = w.rotate(Vec::new()).unwrap();
        // The packet block: 32 bytes of header, 12 of data (10 + padding), 12 of options.
        assert_eq!(w.written, first.len() as u64 - 56, "the new file holds its headers only");
        w.packet(b, 2, &[2; 20], 20, FLAG_OUTBOUND, "").unwrap();
        let second = w.into_inner();
        for (file, iface, len) in [(first, 0, 10), (second, 1, 20)] {
            let mut r = crate::format::pcap_read::Reader::open(&file[..]).unwrap();
            let f = r.next_frame().unwrap().expect("one packet");
            assert_eq!((f.iface, f.data.len()), (iface, len));
            assert!(r.next_frame().unwrap().is_none());
        }
    }

    #[test]
    fn blocks_are_padded_and_framed() {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out, "packetflow test", "Linux").unwrap();
        let id = w.interface("lo", 65535, "ifindex 1").unwrap();
        w.packet(id, 1_700_000_000_123_456_789, &[1, 2, 3], 3, FLAG_INBOUND, "hook=xdp").unwrap();
        w.stats(id, 1, 2, 1, 0).unwrap();
        // Walk the blocks: each total length is a multiple of 4 and repeated at the end.
        let mut off = 0;
        let mut types = Vec::new();
        while off < out.len() {
            let ty = u32::from_le_bytes(out[off..off + 4].try_into().unwrap());
            let len = u32::from_le_bytes(out[off + 4..off + 8].try_into().unwrap()) as usize;
            assert_eq!(len % 4, 0);
            assert_eq!(&out[off + len - 4..off + len], &out[off + 4..off + 8]);
            types.push(ty);
            off += len;
        }
        assert_eq!(types, vec![SHB, IDB, EPB, ISB]);
        assert_eq!(off, out.len());
    }

    #[test]
    fn packets_are_laid_out_as_the_format_says() {
        for (data, flags, comment) in
            [(&[1u8, 2, 3][..], FLAG_INBOUND, "hook=xdp"), (&[7u8; 8][..], 0, ""), (&[9u8][..], 0, "abcd")]
        {
            let mut out = Vec::new();
            Writer { w: &mut out, interfaces: 1, shb: Vec::new(), idbs: Vec::new(), written: 0 }
                .packet(0, 5 << 32 | 6, data, 100, flags, comment)
                .unwrap();
            let mut want = Vec::new();
            want.extend(0u32.to_le_bytes());
            want.extend(5u32.to_le_bytes());
            want.extend(6u32.to_le_bytes());
            want.extend((data.len() as u32).to_le_bytes());
            want.extend(100u32.to_le_bytes());
            want.extend(data);
            want.extend(std::iter::repeat_n(0u8, pad4(data.len())));
            let mut o = Opts::default();
            if flags != 0 {
                o.add(2, &flags.to_le_bytes());
            }
            if !comment.is_empty() {
                o.add(OPT_COMMENT, comment.as_bytes());
            }
            want.extend(o.finish());
            let mut framed = Vec::new();
            block(&mut framed, EPB, &want).unwrap();
            assert_eq!(out, framed, "{data:?} {flags} {comment:?}");
        }
    }
}
