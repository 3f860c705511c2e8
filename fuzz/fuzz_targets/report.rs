//! Arbitrary NDJSON through the report pipeline: the recording reader, the statistics,
//! every table, the baseline comparison and the charts. Refused or reported, never a panic.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use packetflow::{
    format::{
        chrome::ChromeTrace,
        recording::{Line, Reader},
    },
    pipeline::session::Sink,
    report::{
        self,
        charts::{self, Gathered},
    },
};
use packetflow_common::Stage;

fuzz_target!(|data: &[u8]| {
    let Ok(mut r) = Reader::new(data, "fuzz") else { return };
    let mut g = Gathered::default();
    let mut lost = BTreeMap::new();
    let mut chrome = ChromeTrace::new(Box::new(std::io::sink()));
    let mut conns = packetflow::model::connection::ConnStats::default();
    let mut drops = packetflow::model::drops::DropStats::default();
    while let Ok(Some(line)) = r.next_line() {
        match line {
            Line::Trace(t) => {
                g.add(&t);
                chrome.trace(&t);
                if let Some(d) = &t.drop {
                    drops.record(d);
                }
            }
            Line::Drop(d) => drops.record(&d),
            Line::Summary(summary) => {
                for (k, n) in &summary.lost {
                    if let Some(s) = Stage::from_name(k) {
                        lost.insert(s, *n);
                    }
                }
            }
            Line::Connection(c) => {
                conns.record(&c);
                chrome.connection(&c);
            }
        }
    }
    let _ = report::tables::connection_table(&conns);
    let _ = report::tables::drop_table(&drops);
    let _ = report::compare_drops(&drops, 1, &drops, 0);
    let _ = report::compare_connections(&conns, &conns);
    chrome.finish(&serde_json::Value::Null);
    let _ = report::tables::side_by_side(&g.stats);
    let _ = report::tables::path_tables(&g.stats, &lost);
    let _ = report::compare(&g.stats, &g.stats);
    let _ = charts::all(&g);
    let _ = charts::html(&g, "fuzz", "");
});
