//! Chrome Trace Event Format output (opens in ui.perfetto.dev and chrome://tracing).
//!
//! One process per path (loopback, nic); one thread (track) per flow, with extra lanes
//! when packets of a flow overlap in time (a track's slices must nest). Each packet is a
//! `packet` slice from its first to its last stage, holding one slice per stage: the slice
//! named after a stage spans from the stage before it to it, so its duration is that
//! stage's latency. A flow arrow joins the packet's `send_syscall` to its `recv_syscall`.
//! Connections (`trace --connections`) are a third process, one track per connection.
//! Times are kernel CLOCK_MONOTONIC, in µs with ns precision.

use std::{collections::HashMap, io::Write};

use serde_json::json;

use crate::{
    model::connection::Connection,
    model::trace::{Flow, PathKind, Trace},
    pipeline::session::Sink,
};

const MAX_LANES: usize = 8;

struct Track {
    tid: u32,
    /// Per lane: the end of its last packet (ns).
    lanes: Vec<u64>,
}

pub struct ChromeTrace {
    out: Box<dyn Write + Send>,
    first: bool,
    tracks: HashMap<(PathKind, Flow), Track>,
    /// Threads named so far: (pid, tid).
    next_tid: u32,
    processes: Vec<PathKind>,
    next_arrow: u64,
    /// The "connections" process is named.
    conn_process: bool,
    pub errors: u64,
}

/// The process that holds one track per connection.
const CONN_PID: u32 = 3;

fn pid(p: PathKind) -> u32 {
    match p {
        PathKind::Loopback => 1,
        PathKind::Nic => 2,
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

impl ChromeTrace {
    pub fn new(mut out: Box<dyn Write + Send>) -> ChromeTrace {
        let errors = u64::from(out.write_all(b"{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n").is_err());
        ChromeTrace {
            out,
            first: true,
            tracks: HashMap::new(),
            next_tid: 1,
            processes: Vec::new(),
            next_arrow: 1,
            conn_process: false,
            errors,
        }
    }

    fn event(&mut self, v: serde_json::Value) {
        let sep: &[u8] = if self.first { b"" } else { b",\n" };
        self.first = false;
        let ok = self.out.write_all(sep).is_ok() && serde_json::to_writer(&mut self.out, &v).is_ok();
        if !ok {
            self.errors += 1;
        }
    }

    /// The track (thread id, lane) for a packet of `flow` spanning [t0, t1].
    fn place(&mut self, path: PathKind, flow: &Flow, t0: u64, t1: u64) -> u32 {
        if !self.processes.contains(&path) {
            self.processes.push(path);
            self.event(json!({"ph": "M", "pid": pid(path), "name": "process_name",
                "args": {"name": format!("{} path", path.name())}}));
            self.event(
                json!({"ph": "M", "pid": pid(path), "name": "process_sort_index", "args": {"sort_index": pid(path)}}),
            );
        }
        let key = (path, *flow);
        if !self.tracks.contains_key(&key) {
            let tid = self.next_tid;
            self.next_tid += MAX_LANES as u32;
            self.tracks.insert(key, Track { tid, lanes: Vec::new() });
        }
        let track = self.tracks.get_mut(&key).expect("inserted");
        let (lane, new) = match track.lanes.iter().position(|&end| end <= t0) {
            Some(l) => (l, false),
            None if track.lanes.len() < MAX_LANES => {
                track.lanes.push(0);
                (track.lanes.len() - 1, true)
            }
            // Too many overlapping packets: reuse the lane that frees first.
            None => (track.lanes.iter().enumerate().min_by_key(|(_, e)| **e).map_or(0, |(i, _)| i), false),
        };
        track.lanes[lane] = t1;
        let tid = track.tid + lane as u32;
        if new {
            let proto = if flow.udp { "udp" } else { "tcp" };
            let mut name = format!("{}:{} → {}:{} {proto}", flow.src_ip(), flow.sport, flow.dst_ip(), flow.dport);
            if lane > 0 {
                name.push_str(&format!(" (lane {})", lane + 1));
            }
            self.event(json!({"ph": "M", "pid": pid(path), "tid": tid, "name": "thread_name", "args": {"name": name}}));
        }
        tid
    }
}

impl Sink for ChromeTrace {
    fn trace(&mut self, t: &Trace) {
        let (Some(first), Some(last)) = (t.stages.first(), t.stages.last()) else {
            return;
        };
        let tid = self.place(t.path, &t.flow, first.t_ns, last.t_ns);
        let p = pid(t.path);
        self.event(json!({
            "ph": "X", "pid": p, "tid": tid, "cat": "packet", "name": format!("packet {}", t.kind.name()),
            "ts": us(first.t_ns), "dur": us(last.t_ns.saturating_sub(first.t_ns)),
            "args": {"seq": t.seq, "len": t.len, "complete": t.complete, "first_stage": first.stage.name()},
        }));
        for w in t.stages.windows(2) {
            self.event(json!({
                "ph": "X", "pid": p, "tid": tid, "cat": "stage", "name": w[1].stage.name(),
                "ts": us(w[0].t_ns), "dur": us(w[1].t_ns.saturating_sub(w[0].t_ns)),
                "args": {"from": w[0].stage.name(), "cpu": w[1].cpu, "ns": w[1].t_ns.saturating_sub(w[0].t_ns)},
            }));
        }
        let send = t.time_of(packetflow_common::Stage::SendSyscall);
        let recv = t.time_of(packetflow_common::Stage::RecvSyscall);
        if let (Some(s), Some(r)) = (send, recv) {
            let id = self.next_arrow;
            self.next_arrow += 1;
            self.event(
                json!({"ph": "s", "pid": p, "tid": tid, "cat": "flow", "name": "send→receive", "id": id, "ts": us(s)}),
            );
            self.event(json!({"ph": "f", "bp": "e", "pid": p, "tid": tid, "cat": "flow", "name": "send→receive", "id": id, "ts": us(r)}));
        }
    }

    /// One track per connection in a "connections" process: a slice over the whole
    /// set-up, one slice per step from the step before it, an instant at each drop.
    fn connection(&mut self, c: &Connection) {
        let (Some(first), Some(last)) = (c.steps.first(), c.steps.last()) else { return };
        if !self.conn_process {
            self.conn_process = true;
            self.event(json!({"ph": "M", "pid": CONN_PID, "name": "process_name", "args": {"name": "connections"}}));
            self.event(
                json!({"ph": "M", "pid": CONN_PID, "name": "process_sort_index", "args": {"sort_index": CONN_PID}}),
            );
        }
        let tid = self.next_tid;
        self.next_tid += 1;
        self.event(json!({"ph": "M", "pid": CONN_PID, "tid": tid, "name": "thread_name",
            "args": {"name": format!("{} → {}", c.client, c.server)}}));
        self.event(json!({
            "ph": "X", "pid": CONN_PID, "tid": tid, "cat": "connection", "name": format!("connection {}", c.outcome().name()),
            "ts": us(first.ts_ns), "dur": us(last.ts_ns.saturating_sub(first.ts_ns)),
            "args": {"handshake_ns": c.handshake_ns(), "accept_wait_ns": c.accept_wait_ns()},
        }));
        for w in c.steps.windows(2) {
            self.event(json!({
                "ph": "X", "pid": CONN_PID, "tid": tid, "cat": "step", "name": w[1].stage.name(),
                "ts": us(w[0].ts_ns), "dur": us(w[1].ts_ns.saturating_sub(w[0].ts_ns)),
                "args": {"from": w[0].stage.name(), "ns": w[1].ts_ns.saturating_sub(w[0].ts_ns)},
            }));
        }
        for (s, d) in c.drops() {
            self.event(json!({"ph": "i", "s": "t", "pid": CONN_PID, "tid": tid, "cat": "drop",
                "name": d.describe(), "ts": us(s.ts_ns)}));
        }
    }

    fn finish(&mut self, _summary: &serde_json::Value) {
        if self.out.write_all(b"\n]}\n").is_err() || self.out.flush().is_err() {
            self.errors += 1;
        }
    }
}
