//! The daemon's trace files: NDJSON (the `trace --json` format, one recording per file),
//! rotated by size and age, the directory's total capped by deleting the oldest files.
//!
//! The correlator thread turns traces into lines and hands them to a writer thread over a
//! bounded channel; when the writer is behind (slow disk), lines are dropped and counted,
//! never waited for. Each file starts with a header line, so `packetflow report` reads
//! any one of them; the last file also gets the run's summary line.

use std::{
    fs::File,
    io::Write,
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

use crate::{
    format::ndjson::TraceJson, model::stats::end_to_end_ns, model::trace::Trace, pipeline::names::Names,
    pipeline::session::Sink,
};

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
    /// Trace lines not written: the writer was behind (no room in its queue), or the
    /// write failed (`write_errors`; disk full) or was paused after a failure.
    pub lines_dropped: AtomicU64,
    /// Traces under the `slow_us` threshold.
    pub below_threshold: AtomicU64,
    pub files_deleted: AtomicU64,
    /// Failed creates and writes of trace files.
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
            .spawn(move || Writer::new(dir, s, c).run(rx))
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

    /// Connection set-up (`connections = true`): every one (`slow_us` is about packets).
    fn connection(&mut self, c: &crate::model::connection::Connection) {
        let Ok(line) = serde_json::to_string(&crate::format::ndjson::ConnectionJson::new(c)) else {
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
    file: File,
    /// Bytes of the file known to be written (the rest is in `Writer::buf`).
    flushed: u64,
    /// Bytes the file will have once `Writer::buf` is written.
    bytes: u64,
    since: Instant,
}

/// After a failed write, how long the writer stops writing (lines are dropped and
/// counted) before it tries a new file; doubled after each failure in a row, up to
/// [`BACKOFF_MAX`], and never longer than `rotate_secs`.
const BACKOFF_MIN: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Lines are written in chunks of about this many bytes, or at least every [`FLUSH_EVERY`].
const CHUNK: usize = 64 << 10;
const FLUSH_EVERY: Duration = Duration::from_millis(500);

struct Writer {
    dir: PathBuf,
    settings: Arc<Mutex<Settings>>,
    counters: Arc<Counters>,
    cur: Option<Open>,
    /// Lines not yet handed to the kernel, and how many trace lines they hold.
    buf: Vec<u8>,
    buf_lines: u64,
    last_flush: Instant,
    seq: u64,
    /// After a write error: nothing is written before this instant.
    paused_until: Option<Instant>,
    backoff: Duration,
}

impl Writer {
    fn new(dir: PathBuf, settings: Arc<Mutex<Settings>>, counters: Arc<Counters>) -> Writer {
        Writer {
            dir,
            settings,
            counters,
            cur: None,
            buf: Vec::with_capacity(CHUNK + 4096),
            buf_lines: 0,
            last_flush: Instant::now(),
            seq: 0,
            paused_until: None,
            backoff: BACKOFF_MIN,
        }
    }

    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            match rx.recv_timeout(FLUSH_EVERY) {
                Ok(Msg::Line(l)) => self.write(&l, true),
                Ok(Msg::Finish(summary)) => {
                    self.write(&summary, false);
                    self.close();
                    return;
                }
                // Keep the file readable while idle; rotate by age even without traffic.
                Err(RecvTimeoutError::Timeout) => self.flush(),
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

    /// Queues one line (`trace`: a trace line, counted) for the current file.
    fn write(&mut self, line: &str, trace: bool) {
        if self.paused_until.is_some_and(|t| Instant::now() < t) {
            self.counters.lines_dropped.fetch_add(u64::from(trace), Ordering::Relaxed);
            return;
        }
        if self.cur.is_none() {
            self.open();
        }
        let Some(c) = self.cur.as_mut() else {
            self.counters.lines_dropped.fetch_add(u64::from(trace), Ordering::Relaxed);
            return;
        };
        self.buf.extend_from_slice(line.as_bytes());
        self.buf.push(b'\n');
        self.buf_lines += u64::from(trace);
        c.bytes += line.len() as u64 + 1;
        if self.buf.len() >= CHUNK || self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush();
        }
    }

    /// Hands the queued lines to the kernel. Counts them written, or, when the write
    /// fails, not written (dropped): the file is cut back to its last whole line.
    fn flush(&mut self) {
        self.last_flush = Instant::now();
        let Some(c) = self.cur.as_mut() else { return };
        if self.buf.is_empty() {
            return;
        }
        let lines = std::mem::take(&mut self.buf_lines);
        match c.file.write_all(&self.buf) {
            Ok(()) => {
                c.flushed += self.buf.len() as u64;
                self.counters.lines_written.fetch_add(lines, Ordering::Relaxed);
                self.backoff = BACKOFF_MIN;
                self.buf.clear();
            }
            Err(e) => {
                self.buf.clear();
                self.counters.lines_dropped.fetch_add(lines, Ordering::Relaxed);
                self.failed("writing", e);
            }
        }
    }

    fn open(&mut self) {
        if !self.dir_ok() {
            return;
        }
        let s = self.settings.lock().expect("settings lock").clone();
        // Room for one full new file within the cap.
        self.counters
            .files_deleted
            .fetch_add(enforce_cap(&self.dir, s.max_total_bytes.saturating_sub(s.rotate_bytes)), Ordering::Relaxed);
        self.seq += 1;
        let path = self.dir.join(file_name(crate::platform::host::realtime_ns(), std::process::id(), self.seq));
        match crate::format::output::create_new(&path) {
            Ok(file) => {
                self.cur = Some(Open { path, file, flushed: 0, bytes: 0, since: Instant::now() });
                self.write(&s.header.to_string(), false);
            }
            Err(e) => {
                self.cur = None;
                self.failed_at(&path, "creating", e);
            }
        }
    }

    /// The directory is still a directory, not a symlink put in its place.
    fn dir_ok(&mut self) -> bool {
        match std::fs::symlink_metadata(&self.dir) {
            Ok(m) if m.is_dir() => true,
            _ => {
                let dir = self.dir.clone();
                self.failed_at(&dir, "using", std::io::Error::other("not a directory (a symbolic link?)"));
                false
            }
        }
    }

    fn close(&mut self) {
        self.flush();
        self.cur = None;
    }

    /// A write to the current file failed: the file is cut back to its last whole line
    /// (or removed, when nothing of it was written), and writing pauses.
    fn failed(&mut self, what: &str, e: std::io::Error) {
        let Some(c) = self.cur.take() else { return };
        if c.flushed == 0 {
            drop(c.file);
            let _ = std::fs::remove_file(&c.path);
        } else {
            let _ = c.file.set_len(c.flushed);
        }
        self.failed_at(&c.path, what, e);
    }

    fn failed_at(&mut self, path: &Path, what: &str, e: std::io::Error) {
        self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
        let age = self.settings.lock().expect("settings lock").rotate_age;
        let pause = self.backoff.min(age);
        self.paused_until = Some(Instant::now() + pause);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        eprintln!(
            "packetflow: {what} trace file {} failed: {e}; trace lines are dropped (and counted) for the next {} s",
            path.display(),
            pause.as_secs()
        );
    }
}

/// `packetflow-20261124T171500.123456789Z-4242-000001.ndjson`: names sort in the order
/// they were made (to the nanosecond), and never repeat: a daemon started again in the
/// same second, even with the same pid, has a later time, and one process counts up.
fn file_name(unix_ns: u64, pid: u32, seq: u64) -> String {
    let unix_secs = unix_ns / 1_000_000_000;
    let (days, rem) = (unix_secs / 86400, unix_secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "packetflow-{y:04}{m:02}{d:02}T{:02}{:02}{:02}.{:09}Z-{pid}-{seq:06}.ndjson",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ns % 1_000_000_000
    )
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

    fn settings() -> Settings {
        Settings {
            slow_ns: 0,
            rotate_bytes: 1 << 20,
            rotate_age: Duration::from_secs(3600),
            max_total_bytes: 4 << 20,
            header: serde_json::json!({"type": "header"}),
        }
    }

    fn tmp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn names_sort_by_time() {
        assert_eq!(file_name(0, 7, 1), "packetflow-19700101T000000.000000000Z-7-000001.ndjson");
        assert_eq!(
            file_name(1_795_539_300_000_000_042, 4242, 7),
            "packetflow-20261124T165500.000000042Z-4242-000007.ndjson"
        );
        assert!(file_name(1_000_000_001, 9, 1) < file_name(1_000_000_002, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn two_quick_starts_do_not_reuse_a_name() {
        // Two writers, as two daemons started in the same second (same pid even, and
        // each at its first file), each open their first file in the same directory.
        let dir = tmp_dir("names");
        let open = || {
            let mut w = Writer::new(dir.clone(), Arc::new(Mutex::new(settings())), Arc::default());
            w.write("{}", true);
            w.close();
            assert_eq!(w.counters.write_errors.load(Ordering::Relaxed), 0);
            assert_eq!(w.counters.lines_written.load(Ordering::Relaxed), 1);
        };
        open();
        open();
        assert_eq!(list(&dir).len(), 2, "{:?}", list(&dir));
        use std::os::unix::fs::PermissionsExt;
        for (p, _) in list(&dir) {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & !crate::format::output::MODE, 0, "{} has mode {mode:o}", p.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn after_a_write_error_lines_are_counted_and_writing_pauses() {
        let dir = tmp_dir("full");
        let mut w = Writer::new(dir.clone(), Arc::new(Mutex::new(settings())), Arc::default());
        // A file on a full disk: /dev/full fails every write with ENOSPC.
        let file = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        w.cur = Some(Open { path: dir.join("gone.ndjson"), file, flushed: 0, bytes: 0, since: Instant::now() });
        for _ in 0..10 {
            w.write("{\"type\":\"trace\"}", true);
        }
        w.flush();
        let c = w.counters.clone();
        assert_eq!(c.lines_written.load(Ordering::Relaxed), 0);
        assert_eq!(c.lines_dropped.load(Ordering::Relaxed), 10);
        assert_eq!(c.write_errors.load(Ordering::Relaxed), 1);
        // Paused: no new file per line, every line counted.
        for _ in 0..1000 {
            w.write("{}", true);
        }
        w.close();
        assert!(list(&dir).is_empty(), "no file opened while paused: {:?}", list(&dir));
        assert_eq!(c.lines_dropped.load(Ordering::Relaxed), 1010);
        assert_eq!(c.write_errors.load(Ordering::Relaxed), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_trace_dir_replaced_by_a_symlink_is_not_written() {
        let dir = tmp_dir("symdir");
        let real = dir.join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let mut w = Writer::new(link, Arc::new(Mutex::new(settings())), Arc::default());
        w.write("{}", true);
        w.close();
        assert!(list(&real).is_empty());
        assert_eq!(w.counters.write_errors.load(Ordering::Relaxed), 1);
        assert_eq!(w.counters.lines_dropped.load(Ordering::Relaxed), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cap_deletes_oldest_first() {
        let dir = tmp_dir("cap");
        for i in 1..=4 {
            std::fs::write(dir.join(file_name(100, 1, i)), vec![b'x'; 100]).unwrap();
        }
        std::fs::write(dir.join("other.txt"), vec![b'x'; 1000]).unwrap();
        assert_eq!(enforce_cap(&dir, 250), 2);
        let left: Vec<String> =
            list(&dir).iter().map(|(p, _)| p.file_name().unwrap().to_str().unwrap().to_string()).collect();
        assert_eq!(left, vec![file_name(100, 1, 3), file_name(100, 1, 4)]);
        assert!(dir.join("other.txt").exists(), "only trace files are deleted");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
