//! The daemon's trace files: NDJSON (the `trace --json` format, one recording per file),
//! rotated by size and age, the directory's total capped by deleting the oldest files.
//!
//! The correlator thread turns traces into lines and hands them to a writer thread over a
//! bounded channel; when the writer is behind (slow disk), lines are dropped and counted,
//! never waited for. Each file starts with a header line, so `packetflow report` reads
//! any one of them; the last file also gets the run's summary line.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use packetflow_common::Stage;

use crate::{correlate::Trace, json::TraceJson, names::Names, session::Sink, stats::end_to_end_ns};

/// What SIGHUP may change while the files are being written.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Only traces at least this slow (end-to-end, ns); 0: all.
    pub slow_ns: u64,
    pub rotate_bytes: u64,
    pub rotate_age: Duration,
    pub max_total_bytes: u64,
    /// First line of every new file.
    pub header: serde_json::Value,
}

#[derive(Default, Debug)]
pub struct Counters {
    pub lines_written: AtomicU64,
    /// Lines the writer had no room for (it was behind).
    pub lines_dropped: AtomicU64,
    /// Traces under the `slow_us` threshold.
    pub below_threshold: AtomicU64,
    pub files_deleted: AtomicU64,
    pub write_errors: AtomicU64,
}

enum Msg {
    Line(String),
    Finish(String),
}

pub struct TraceFiles {
    tx: SyncSender<Msg>,
    names: Names,
    available: Vec<Stage>,
    pub settings: Arc<Mutex<Settings>>,
    pub counters: Arc<Counters>,
    writer: Option<JoinHandle<()>>,
}

/// Lines queued for the writer before new ones are dropped.
const QUEUE: usize = 4096;

impl TraceFiles {
    pub fn new(dir: PathBuf, settings: Settings, names: Names, available: Vec<Stage>) -> TraceFiles {
        let (tx, rx) = sync_channel(QUEUE);
        let settings = Arc::new(Mutex::new(settings));
        let counters = Arc::new(Counters::default());
        let (s, c) = (settings.clone(), counters.clone());
        let writer = std::thread::Builder::new()
            .name("trace-files".into())
            .spawn(move || Writer { dir, settings: s, counters: c, cur: None, seq: 0, warned: false }.run(rx))
            .expect("spawning the trace writer");
        TraceFiles { tx, names, available, settings, counters, writer: Some(writer) }
    }
}

impl Sink for TraceFiles {
    fn trace(&mut self, t: &Trace) {
        let slow = self.settings.lock().expect("settings lock").slow_ns;
        if slow > 0 && end_to_end_ns(t) < slow {
            self.counters.below_threshold.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Ok(line) = serde_json::to_string(&TraceJson::new(t, &mut self.names, &self.available)) else {
            return;
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(Msg::Line(line)) {
            self.counters.lines_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn finish(&mut self, summary: &serde_json::Value) {
        let _ = self.tx.send(Msg::Finish(summary.to_string()));
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

struct Open {
    path: PathBuf,
    out: BufWriter<File>,
    bytes: u64,
    since: Instant,
}

struct Writer {
    dir: PathBuf,
    settings: Arc<Mutex<Settings>>,
    counters: Arc<Counters>,
    cur: Option<Open>,
    seq: u64,
    warned: bool,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(Msg::Line(l)) => {
                    self.write(&l);
                    self.counters.lines_written.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Msg::Finish(summary)) => {
                    self.write(&summary);
                    self.close();
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    // Keep the file readable while idle; rotate by age even without traffic.
                    if let Some(c) = self.cur.as_mut() {
                        let _ = c.out.flush();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.close();
                    return;
                }
            }
            let s = self.settings.lock().expect("settings lock").clone();
            if self.cur.as_ref().is_some_and(|c| c.bytes >= s.rotate_bytes || c.since.elapsed() >= s.rotate_age) {
                self.close();
            }
        }
    }

    fn write(&mut self, line: &str) {
        if self.cur.is_none() {
            self.open();
        }
        let Some(c) = self.cur.as_mut() else { return };
        if c.out.write_all(line.as_bytes()).and_then(|()| c.out.write_all(b"\n")).is_err() {
            self.failed("writing");
            return;
        }
        c.bytes += line.len() as u64 + 1;
    }

    fn open(&mut self) {
        let s = self.settings.lock().expect("settings lock").clone();
        // Room for one full new file within the cap.
        self.counters
            .files_deleted
            .fetch_add(enforce_cap(&self.dir, s.max_total_bytes.saturating_sub(s.rotate_bytes)), Ordering::Relaxed);
        self.seq += 1;
        let path = self.dir.join(file_name(crate::sys::realtime_ns() / 1_000_000_000, self.seq));
        match File::create(&path) {
            Ok(f) => {
                let mut out = BufWriter::new(f);
                let header = s.header.to_string();
                let ok = out.write_all(header.as_bytes()).and_then(|()| out.write_all(b"\n")).is_ok();
                self.cur = Some(Open { path, out, bytes: header.len() as u64 + 1, since: Instant::now() });
                if !ok {
                    self.failed("writing");
                }
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                if !self.warned {
                    eprintln!("packetflow: cannot create trace file {}: {e}", path.display());
                    self.warned = true;
                }
            }
        }
    }

    fn close(&mut self) {
        if let Some(mut c) = self.cur.take()
            && c.out.flush().is_err()
        {
            self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("packetflow: flushing {} failed", c.path.display());
        }
    }

    fn failed(&mut self, what: &str) {
        self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = self.cur.take()
            && !self.warned
        {
            eprintln!("packetflow: {what} {} failed: {}", c.path.display(), std::io::Error::last_os_error());
            self.warned = true;
        }
    }
}

/// `packetflow-20261124T171500Z-000001.ndjson`: names sort in the order they were made.
fn file_name(unix_secs: u64, seq: u64) -> String {
    let (days, rem) = (unix_secs / 86400, unix_secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("packetflow-{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z-{seq:06}.ndjson", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's method).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The trace files in `dir`, oldest first, with their sizes.
pub fn list(dir: &Path) -> Vec<(PathBuf, u64)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(PathBuf, u64)> = rd
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("packetflow-") && n.ends_with(".ndjson")))
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
        .collect();
    v.sort();
    v
}

/// Deletes the oldest trace files until the rest total at most `budget` bytes; returns
/// how many it deleted.
fn enforce_cap(dir: &Path, budget: u64) -> u64 {
    let files = list(dir);
    let mut total: u64 = files.iter().map(|(_, n)| n).sum();
    let mut deleted = 0;
    for (p, n) in files {
        if total <= budget {
            break;
        }
        if std::fs::remove_file(&p).is_ok() {
            total -= n;
            deleted += 1;
        }
    }
    deleted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_time() {
        assert_eq!(file_name(0, 1), "packetflow-19700101T000000Z-000001.ndjson");
        assert_eq!(file_name(1_795_539_300, 7), "packetflow-20261124T165500Z-000007.ndjson");
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn cap_deletes_oldest_first() {
        let dir = std::env::temp_dir().join(format!("pf-cap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 1..=4 {
            std::fs::write(dir.join(file_name(100, i)), vec![b'x'; 100]).unwrap();
        }
        std::fs::write(dir.join("other.txt"), vec![b'x'; 1000]).unwrap();
        assert_eq!(enforce_cap(&dir, 250), 2);
        let left: Vec<String> =
            list(&dir).iter().map(|(p, _)| p.file_name().unwrap().to_str().unwrap().to_string()).collect();
        assert_eq!(left, vec![file_name(100, 3), file_name(100, 4)]);
        assert!(dir.join("other.txt").exists(), "only trace files are deleted");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
