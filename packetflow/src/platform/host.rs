//! Facts about this machine: kernel release, host name, clocks, possible CPUs.

pub fn kernel_release() -> String {
    // SAFETY: a plain C struct of integers and arrays: all-zero bytes are a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname(2) writes into `u`, a utsname we own.
    unsafe { libc::uname(&raw mut u) };
    // SAFETY: uname(2) NUL-terminates each field within the struct, which lives on.
    let r = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    r.to_string_lossy().into_owned()
}

pub fn hostname() -> String {
    // SAFETY: a plain C struct of integers and arrays: all-zero bytes are a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname(2) writes into `u`, a utsname we own.
    unsafe { libc::uname(&raw mut u) };
    // SAFETY: uname(2) NUL-terminates each field within the struct, which lives on.
    let r = unsafe { std::ffi::CStr::from_ptr(u.nodename.as_ptr()) };
    r.to_string_lossy().into_owned()
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    // SAFETY: a plain C struct of integers and arrays: all-zero bytes are a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime(2) writes into `ts`, a timespec we own.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Wall clock minus monotonic clock, in ns: add to a kernel timestamp for wall time.
pub fn mono_to_wall_offset() -> i64 {
    // Bracket the realtime read to cancel most of the call cost.
    let a = monotonic_ns();
    let w = realtime_ns();
    let b = monotonic_ns();
    w as i64 - u64::midpoint(a, b) as i64
}

/// CPUs the kernel may ever bring online (/sys/devices/system/cpu/possible).
pub fn possible_cpus() -> Vec<u32> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_else(|_| "0".into());
    let mut cpus = Vec::new();
    for part in s.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    cpus.extend(a..=b);
                }
            }
            None => cpus.extend(part.parse::<u32>().ok()),
        }
    }
    if cpus.is_empty() {
        cpus.push(0);
    }
    cpus
}
