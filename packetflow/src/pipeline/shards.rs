//! Ring-buffer shards, read the same way by the tracer (`session`) and the capture: drain
//! everything waiting, then sleep until a shard is readable (the programs wake the reader
//! past a fill threshold), the poll interval passes, or a stop is asked for.

use std::time::Duration;

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::watch, time::Interval};

pub struct Shards {
    rings: Vec<AsyncFd<RingBuf<MapData>>>,
    tick: Interval,
    stop: watch::Receiver<bool>,
}

impl Shards {
    /// Must be called inside the tokio runtime.
    pub fn new(rings: Vec<RingBuf<MapData>>, poll: Duration, stop: watch::Receiver<bool>) -> Result<Shards> {
        let mut fds = Vec::with_capacity(rings.len());
        for ring in rings {
            // SAFETY: the ring owns its fd and keeps it open as long as the AsyncFd holds the ring.
            fds.push(unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)? });
        }
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Shards { rings: fds, tick, stop })
    }

    /// True once a stop was asked for: the drain after this answer is the last.
    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Hands every record waiting in every shard to `f`.
    pub fn drain(&mut self, mut f: impl FnMut(&[u8])) {
        for fd in &mut self.rings {
            let ring = fd.get_mut();
            while let Some(item) = ring.next() {
                f(&item);
            }
        }
    }

    /// Waits until a shard is readable, the poll interval passes or a stop is asked for.
    pub async fn wait(&mut self) {
        let Shards { rings, tick, stop } = self;
        let readable = std::future::poll_fn(|cx| {
            for fd in rings.iter_mut() {
                if let std::task::Poll::Ready(r) = fd.poll_read_ready_mut(cx) {
                    if let Ok(mut g) = r {
                        g.clear_ready();
                    }
                    return std::task::Poll::Ready(());
                }
            }
            std::task::Poll::Pending
        });
        tokio::select! {
            () = readable => {}
            _ = tick.tick() => {}
            _ = stop.changed() => {}
        }
    }
}

/// The `T` at the start of a ring record (rings promise no alignment); `None` when the
/// record is shorter than a `T`.
pub fn record<T: aya::Pod>(item: &[u8]) -> Option<T> {
    if item.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: `item` holds at least size_of::<T>() bytes, read_unaligned needs no
    // alignment, and `T: Pod` is valid for any bit pattern.
    Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<T>()) })
}
