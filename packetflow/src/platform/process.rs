//! Child processes that cannot outlive their owner: killed and reaped on drop. The demo's
//! seed server, the bench's load generators and the end-to-end tests' tracers are these.

use std::{
    process::{Child, ExitStatus},
    time::{Duration, Instant},
};

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Sends SIGINT: a tracer's clean stop, as Ctrl-C.
    pub fn sigint(&self) {
        // SAFETY: kill(2) has no memory preconditions; the pid is our child, not yet reaped
        // (the Child is reaped only by a wait or on drop).
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
    }

    /// Sends SIGINT and waits at most `max` for the exit status.
    pub fn interrupt(&mut self, max: Duration) -> Option<ExitStatus> {
        self.sigint();
        self.wait(max)
    }

    /// The exit status, waiting at most `max` for it.
    pub fn wait(&mut self, max: Duration) -> Option<ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = self.0.try_wait() {
                return Some(st);
            }
            if t0.elapsed() >= max {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
