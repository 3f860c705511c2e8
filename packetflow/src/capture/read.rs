//! `capture -r FILE`: packets from a pcap or pcapng file (`-` for stdin) through the very
//! filter the kernel programs run (packetflow-common's `summarize` and `matches`, with the
//! truth table `expr::compile` builds), to the same lines as a live capture, or with `-w`
//! to pcapng again (interfaces, directions and comments kept). Needs no privileges.

use std::{
    collections::HashMap,
    io::{BufReader, BufWriter, Read, Write},
};

use anyhow::Result;
use packetflow_common::capture::{DIR_IN, DIR_OUT, matches, summarize};

use super::{
    expr,
    writer::{Line, text_line},
};
use crate::{cmd::capture::Args, error::user, format::pcap_read::Reader, format::pcapng};

pub fn run(file: &str, a: &Args) -> Result<()> {
    let expression = a.expression.join(" ");
    let compiled = expr::compile(&expression, u32::MAX).map_err(|e| user(e.to_string()))?;
    let prims = &compiled.config.prims[..compiled.config.nprims as usize];
    let input: Box<dyn Read> = if file == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(file).map_err(|e| user(format!("cannot open {file}: {e}")))?)
    };
    let name = if file == "-" { "stdin" } else { file };
    let mut reader =
        Reader::open(BufReader::with_capacity(1 << 20, input)).map_err(|e| user(format!("{name}: {e}")))?;
    let mut pcap = match &a.write {
        Some(path) => Some(pcapng::Writer::new(
            crate::format::output::writer(path)?,
            concat!("packetflow ", env!("CARGO_PKG_VERSION")),
            &format!("Linux {}", crate::platform::host::kernel_release()),
        )?),
        None => None,
    };
    let mut text = BufWriter::new(std::io::stdout().lock());
    let style = a.style();
    let dirs = a.direction.mask();
    let snaplen = a.snaplen.unwrap_or(u32::MAX) as usize;
    // The file's interfaces, as described in the output (by their index in the file).
    let mut out_ifaces: HashMap<usize, u32> = HashMap::new();
    let (mut read, mut kept) = (0u64, 0u64);
    let result = loop {
        if a.count.is_some_and(|c| kept >= c) {
            break Ok(());
        }
        let f = match reader.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        read += 1;
        let k = summarize(|off, buf| match f.data.get(off as usize..off as usize + buf.len()) {
            Some(b) => {
                buf.copy_from_slice(b);
                true
            }
            None => false,
        });
        let mask = prims.iter().enumerate().filter(|(_, p)| matches(p, &k)).fold(0usize, |m, (i, _)| m | 1 << i);
        let dir = match f.dir {
            1 => DIR_IN,
            2 => DIR_OUT,
            _ => 0,
        };
        if compiled.table[mask] == 0 || (dir != 0 && dir & dirs == 0) {
            continue;
        }
        kept += 1;
        let data = &f.data[..f.data.len().min(snaplen)];
        // A pcap file names no interface.
        let ifname = if f.ifname.is_empty() { "-" } else { f.ifname };
        if let Some(w) = &mut pcap {
            // Described on their first packet. (Interface numbers restart in each pcapng
            // section: a second section's interface 0 is written as the first's.)
            let id = if let Some(id) = out_ifaces.get(&f.iface) {
                *id
            } else {
                let id = w.interface(ifname, f.snaplen.min(snaplen as u32), "")?;
                out_ifaces.insert(f.iface, id);
                id
            };
            w.packet(id, f.ts_ns, data, f.orig_len, f.dir, f.comment.as_deref().unwrap_or_default())?;
        } else {
            let dir = match dir {
                DIR_IN => "In ",
                DIR_OUT => "Out",
                _ => "-  ",
            };
            // The file's comment: with -v, or in the JSON object.
            let comment = f.comment.as_deref().filter(|_| style.verbose > 0 || style.json).unwrap_or_default();
            let line = Line { wall_ns: f.ts_ns, ifname, dir, data, len: f.orig_len, notes: &[comment] };
            text_line(&mut text, &line, &style)?;
        }
    };
    text.flush()?;
    if let Some(w) = &mut pcap {
        w.flush()?;
    }
    eprintln!("{read} packets read from {name}, {kept} kept by the filter");
    result.map_err(|e| user(format!("{name}: {e}")))
}
