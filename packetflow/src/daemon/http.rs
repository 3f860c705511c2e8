//! The minimal HTTP/1.1 responder behind the daemon's `GET /metrics`.
//!
//! It holds at most `MAX_CONNECTIONS` connections. A client has `READ_TIMEOUT` to send its
//! request head and the reply `WRITE_TIMEOUT` to be written. When every slot is taken, a
//! new connection takes the slot of the oldest one still waiting for its request (idle
//! clients cannot lock scrapers out); when none is waiting, the new one is closed at once.
//! A failed accept (EMFILE and the like) pauses the loop for `ACCEPT_BACKOFF` instead of
//! retrying at once. Each is counted (`DROPPED_*`, `ACCEPT_ERRORS`), and `metrics.rs`
//! exports the counts as `packetflow_metrics_connections_dropped_total` and
//! `packetflow_metrics_accept_errors_total`.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time the reply has to be written (a client that does not read it loses it).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept: the connection stays queued, so retrying at once would spin.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub(super) static DROPPED_OVER_LIMIT: AtomicU64 = AtomicU64::new(0);
pub(super) static DROPPED_IDLE: AtomicU64 = AtomicU64::new(0);
pub(super) static DROPPED_TIMEOUT: AtomicU64 = AtomicU64::new(0);
pub(super) static ACCEPT_ERRORS: AtomicU64 = AtomicU64::new(0);

/// The open connections by age (id), each with what closes it while it waits for its
/// request (`None` once the request is in).
#[derive(Default)]
struct Slots {
    next: u64,
    open: BTreeMap<u64, Option<oneshot::Sender<()>>>,
}

type SharedSlots = Arc<Mutex<Slots>>;

impl Slots {
    /// A slot for a new connection, making room by closing the oldest idle one; `None`
    /// when every slot serves a request.
    fn take(&mut self) -> Option<(u64, oneshot::Receiver<()>)> {
        if self.open.len() >= MAX_CONNECTIONS {
            let idle = self.open.iter_mut().find_map(|(id, kick)| Some((*id, kick.take()?)));
            let (id, kick) = idle?;
            self.open.remove(&id);
            let _ = kick.send(());
            DROPPED_IDLE.fetch_add(1, Relaxed);
        }
        let id = self.next;
        self.next += 1;
        let (tx, rx) = oneshot::channel();
        self.open.insert(id, Some(tx));
        Some((id, rx))
    }
}

/// Frees a connection's slot when its task ends.
struct Slot(SharedSlots, u64);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.lock().expect("slots lock").open.remove(&self.1);
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    let slots = SharedSlots::default();
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            ACCEPT_ERRORS.fetch_add(1, Relaxed);
            tokio::time::sleep(ACCEPT_BACKOFF).await;
            continue;
        };
        let Some((id, kick)) = slots.lock().expect("slots lock").take() else {
            DROPPED_OVER_LIMIT.fetch_add(1, Relaxed);
            continue; // `conn` closes here
        };
        let slot = Slot(slots.clone(), id);
        tokio::spawn(respond(conn, registry.clone(), slot, kick));
    }
}

/// Reads the request head (within 8 KiB); its length, or `None` if the client closed or
/// sent too much.
async fn read_head(conn: &mut TcpStream, buf: &mut [u8]) -> Option<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = conn.read(&mut buf[n..]).await.ok()?;
        if k == 0 {
            return None;
        }
        n += k;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            return Some(n);
        }
    }
    None
}

async fn respond(mut conn: TcpStream, registry: Arc<Registry>, slot: Slot, kick: oneshot::Receiver<()>) {
    let mut buf = vec![0u8; 8192];
    let n = tokio::select! {
        r = tokio::time::timeout(READ_TIMEOUT, read_head(&mut conn, &mut buf)) => match r {
            Ok(Some(n)) => n,
            Ok(None) => return,
            Err(_) => {
                DROPPED_TIMEOUT.fetch_add(1, Relaxed);
                return;
            }
        },
        // Evicted to make room (counted there).
        _ = kick => return,
    };
    // The request is in: no longer evictable (unless it was evicted just now).
    match slot.0.lock().expect("slots lock").open.get_mut(&slot.1) {
        Some(kick) => *kick = None,
        None => return,
    }
    let req = String::from_utf8_lossy(&buf[..n]);
    let mut parts = req.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let mut body = String::new();
            match prometheus_client::encoding::prometheus_text::encode(&mut body, &registry) {
                Ok(()) => ("200 OK", prometheus_client::encoding::prometheus_text::CONTENT_TYPE, body),
                Err(_) => ("500 Internal Server Error", "text/plain", "encoding failed\n".into()),
            }
        }
        ("GET" | "HEAD", "/") => (
            "200 OK",
            "text/html; charset=utf-8",
            "<html><body><h1>packetflow</h1><p><a href=\"/metrics\">/metrics</a></p></body></html>\n".into(),
        ),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found: try /metrics\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    };
    let body = if method == "HEAD" { String::new() } else { body };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        conn.write_all(resp.as_bytes()).await?;
        conn.shutdown().await
    };
    if tokio::time::timeout(WRITE_TIMEOUT, write).await.is_err() {
        DROPPED_TIMEOUT.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::daemon::metrics::registry;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_clients_are_capped_and_cannot_lock_out_a_scrape() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(serve(l, Arc::new(registry(Arc::new(Mutex::new(None))))));
        let mut idle = Vec::new();
        for _ in 0..300 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let t0 = Instant::now();
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(2), c.read_to_string(&mut out)).await.unwrap().unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("packetflow_metrics_connections_dropped_total{reason=\"idle_evicted\"}"), "{out}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        // The server keeps at most MAX_CONNECTIONS: the others were closed (EOF) at once.
        let mut closed = 0;
        for c in &mut idle {
            let mut b = [0u8; 1];
            if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(20), c.read(&mut b)).await {
                closed += 1;
            }
        }
        assert!(closed > 300 - MAX_CONNECTIONS, "{closed} of 300 idle clients closed");
        assert!(DROPPED_IDLE.load(Relaxed) >= closed as u64);
        server.abort();
    }
}
