//! pcapng write → read: what the writer (packetflow/src/pcapng.rs) is given, an
//! independent reader here (written from the pcapng draft, sharing no code with the
//! writer) reads back: every block's length fields agree, and each interface, packet
//! (time, bytes, original length, flags, comment) and statistics block comes back as given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use packetflow::format::pcapng::Writer;

struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let t = self.take(4);
        b[..t.len()].copy_from_slice(t);
        u32::from_le_bytes(b)
    }
    fn u64(&mut self) -> u64 {
        (self.u32() as u64) << 32 | self.u32() as u64
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn text(&mut self) -> String {
        let n = self.u8() as usize;
        String::from_utf8_lossy(self.take(n)).into_owned()
    }
}

#[derive(Debug, PartialEq)]
enum Block {
    Section { os: String, app: String },
    Interface { name: String, snaplen: u32, comment: String },
    Packet { iface: u32, ts: u64, data: Vec<u8>, orig: u32, flags: u32, comment: String },
    Stats { iface: u32, start: u64, end: u64, received: u64, dropped: u64 },
}

fn le32(d: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(d[i..i + 4].try_into().unwrap())
}

fn le64(d: &[u8]) -> u64 {
    u64::from_le_bytes(d[..8].try_into().unwrap())
}

/// pcapng timestamps: high word, then low word.
fn ts(d: &[u8]) -> u64 {
    (le32(d, 0) as u64) << 32 | le32(d, 4) as u64
}

/// Options from `d` to the end of a block body: (code, value); checks the padding and the
/// end-of-options marker.
fn options(mut d: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut v = Vec::new();
    while !d.is_empty() {
        assert!(d.len() >= 4, "option header cut: {d:?}");
        let code = u16::from_le_bytes([d[0], d[1]]);
        let len = u16::from_le_bytes([d[2], d[3]]) as usize;
        if code == 0 {
            assert_eq!(len, 0);
            assert_eq!(d.len(), 4, "bytes after opt_endofopt");
            break;
        }
        let padded = (len + 3) / 4 * 4;
        assert!(d.len() >= 4 + padded, "option {code} overruns its block");
        assert!(d[4 + len..4 + padded].iter().all(|&b| b == 0), "option padding not zero");
        v.push((code, d[4..4 + len].to_vec()));
        d = &d[4 + padded..];
    }
    v
}

fn opt(o: &[(u16, Vec<u8>)], code: u16) -> Option<&[u8]> {
    o.iter().find(|(c, _)| *c == code).map(|(_, v)| v.as_slice())
}

fn read(mut d: &[u8]) -> Vec<Block> {
    let mut out = Vec::new();
    let mut first = true;
    while !d.is_empty() {
        assert!(d.len() >= 12, "trailing bytes: {d:?}");
        let ty = le32(d, 0);
        let total = le32(d, 4) as usize;
        assert!(total % 4 == 0 && total >= 12 && total <= d.len(), "block length {total} of {}", d.len());
        assert_eq!(le32(d, total - 4) as usize, total, "trailing block length");
        let body = &d[8..total - 4];
        match ty {
            0x0A0D_0D0A => {
                assert!(first);
                assert_eq!(le32(body, 0), 0x1A2B_3C4D, "byte-order magic");
                let o = options(&body[16..]);
                let text = |c| String::from_utf8(opt(&o, c).unwrap_or_default().to_vec()).unwrap();
                out.push(Block::Section { os: text(3), app: text(4) });
            }
            1 => {
                assert_eq!(u16::from_le_bytes([body[0], body[1]]), 1, "link type");
                let o = options(&body[8..]);
                assert_eq!(opt(&o, 9), Some(&[9u8][..]), "if_tsresol: nanoseconds");
                out.push(Block::Interface {
                    name: String::from_utf8(opt(&o, 2).unwrap_or_default().to_vec()).unwrap(),
                    snaplen: le32(body, 4),
                    comment: String::from_utf8(opt(&o, 1).unwrap_or_default().to_vec()).unwrap(),
                });
            }
            6 => {
                let cap = le32(body, 12) as usize;
                let padded = (cap + 3) / 4 * 4;
                assert!(20 + padded <= body.len(), "captured length {cap} overruns the block");
                let o = options(&body[20 + padded..]);
                out.push(Block::Packet {
                    iface: le32(body, 0),
                    ts: ts(&body[4..]),
                    data: body[20..20 + cap].to_vec(),
                    orig: le32(body, 16),
                    flags: opt(&o, 2).map_or(0, |f| le32(f, 0)),
                    comment: String::from_utf8(opt(&o, 1).unwrap_or_default().to_vec()).unwrap(),
                });
            }
            5 => {
                let o = options(&body[12..]);
                let get = |c| opt(&o, c).map(le64).expect("statistics option");
                // isb_starttime and isb_endtime are timestamps (high word first).
                assert_eq!(opt(&o, 3).map(ts), Some(ts(&body[4..])), "isb_endtime is the block's time");
                out.push(Block::Stats {
                    iface: le32(body, 0),
                    start: ts(opt(&o, 2).unwrap()),
                    end: ts(&body[4..]),
                    received: get(4),
                    dropped: get(5),
                });
            }
            other => panic!("unexpected block type {other:#x}"),
        }
        assert!(!first || ty == 0x0A0D_0D0A, "the file starts with a section header");
        first = false;
        d = &d[total..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let mut file = Vec::new();
    let app = b.text();
    let os = b.text();
    let mut want = vec![Block::Section { os: os.clone(), app: app.clone() }];
    let mut w = Writer::new(&mut file, &app, &os).unwrap();
    let mut ifaces = 0u32;
    while !b.0.is_empty() {
        match b.u8() % 3 {
            0 => {
                let (name, snaplen, comment) = (b.text(), b.u32(), b.text());
                assert_eq!(w.interface(&name, snaplen, &comment).unwrap(), ifaces);
                ifaces += 1;
                want.push(Block::Interface { name, snaplen, comment });
            }
            1 => {
                let (iface, ts, flags) = (b.u32(), b.u64(), b.u32());
                let n = b.u8() as usize * 2;
                let data = b.take(n).to_vec();
                let orig = b.u32();
                let comment = b.text();
                w.packet(iface, ts, &data, orig, flags, &comment).unwrap();
                // The original length is never less than what was captured.
                let orig = orig.max(data.len() as u32);
                want.push(Block::Packet { iface, ts, data, orig, flags, comment });
            }
            _ => {
                let (iface, start, end, received, dropped) = (b.u32(), b.u64(), b.u64(), b.u64(), b.u64());
                w.stats(iface, start, end, received, dropped).unwrap();
                want.push(Block::Stats { iface, start, end, received, dropped });
            }
        }
    }
    w.flush().unwrap();
    drop(w);
    assert_eq!(read(&file), want);
});
