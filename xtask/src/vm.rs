//! `cargo xtask vm-test [--kernel 6.1|6.12|all]`: the end-to-end tests on other kernels.
//!
//! For each kernel series: the newest Debian `linux-image-<series>*-cloud-amd64-unsigned`
//! package in the apt index (downloaded once into target/vm/), an initramfs holding
//! busybox, `ip`, the packetflow binary, the end-to-end test binary (`e2e`), the shared
//! libraries they link and the kernel modules they need (veth), and an `/init` that
//! mounts proc, sys, devtmpfs, tracefs, bpffs and cgroup2, runs `packetflow doctor`, then
//! the test binary once per chosen area (module: `e2e --test-threads=1 demo::`), and
//! powers off. QEMU boots it (TCG; `PACKETFLOW_VM_ACCEL=kvm` to try KVM) and the serial
//! console says how each step went: `PF-VM-RESULT <name> <exit code>`.
//!
//! One file (~570 lines of code, then its tests): the image, the guest's `/init` and the
//! reading of its console are one protocol, and each half changes with the other.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{Counts, cargo, install, need_root, output, run, target_dir};

/// The areas (modules of the `e2e` test binary, tests/tests/e2e/) that run inside each
/// VM: the demo over loopback and veth, the filter test, the no-alteration (sha256) test,
/// summary mode against full traces (the in-kernel histograms walk the stages in
/// kernel order, IP-layer ones included), connection set-up, and drops (kfree_skb's
/// reason, tcp_retransmit_skb) and the receive wait split (the scheduler tracepoints).
const VM_TESTS: &[&str] = &["demo", "filter", "bulk", "summary", "stages", "connections", "drops", "wait"];

/// The end-to-end test binary (tests/tests/e2e/main.rs).
const E2E: &str = "e2e";

/// The kernel series we test: name, package name pattern (apt-cache regex), and what the
/// tests may expect of it (`PACKETFLOW_KERNEL_HAS`, see tests/src/lib.rs): tcx came in
/// 6.6; Debian's kernels have kprobes.
const SERIES: &[(&str, &str, &str)] = &[
    ("6.1", r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$", "kprobes"),
    ("6.12", r"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-cloud-amd64-unsigned$", "tcx,kprobes"),
];

/// Modules the tests need that Debian builds as modules (loaded in this order).
const MODULES: &[&str] = &[
    "drivers/net/veth.ko",
    "net/sched/sch_tbf.ko",
    // nftables for the drop tests (tests/tests/e2e/drops.rs), in dependency order.
    "lib/libcrc32c.ko",
    "net/netfilter/nfnetlink.ko",
    "net/netfilter/nf_tables.ko",
    "net/netfilter/nft_limit.ko",
];

/// How long one kernel's run may take under TCG before it counts as hung.
const VM_TIMEOUT: Duration = Duration::from_secs(20 * 60);

pub fn vm_test(args: &[String]) -> Result<ExitCode> {
    let mut which = "all".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--kernel" => which = it.next().context("--kernel needs 6.1, 6.12 or all")?.clone(),
            s if s.starts_with("--kernel=") => which = s["--kernel=".len()..].to_string(),
            other => bail!("unknown argument '{other}' (usage: cargo xtask vm-test [--kernel 6.1|6.12|all])"),
        }
    }
    crate::setup()?;
    need_root("vm-test")?;
    let outcomes = run_kernels(&which)?;
    Ok(if outcomes.iter().all(|o| o.passed) { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// One step the guest ran (doctor, or one area of the test binary): its exit code, its
/// tests.
#[derive(Clone, Debug, Default)]
pub struct Step {
    pub name: String,
    pub rc: i32,
    pub counts: Counts,
    /// Each test the step ran: (name, "ok" | "FAILED" | "ignored").
    pub tests: Vec<(String, String)>,
}

/// How one kernel's run went.
pub struct Outcome {
    pub kernel: String,
    pub passed: bool,
    /// Tests inside the guest, from its `test result:` lines; passed excludes `skips`.
    pub counts: Counts,
    /// (test name, reason) of the tests that skipped themselves in the guest.
    pub skips: Vec<(String, String)>,
    pub steps: Vec<Step>,
    /// (test name, first panic line) of each failing test in the guest.
    pub panics: Vec<(String, String)>,
    /// Why the run did not finish, when it did not.
    pub error: Option<String>,
    pub secs: f64,
}

impl Outcome {
    /// The lines for the suite's closing block: the verdict, then each area the guest
    /// ran with its tests.
    pub fn describe(&self) -> Vec<String> {
        let areas: Vec<&Step> = self.steps.iter().filter(|s| s.name != "doctor").collect();
        let names: Vec<&str> = areas.iter().map(|s| s.name.as_str()).collect();
        let mut v = vec![format!(
            "kernel {} in QEMU: {} in {:.0} s: {} areas of {E2E} ({}): {} passed, {} failed, {} skipped, {} ignored",
            self.kernel,
            if self.passed { "passed" } else { "FAILED" },
            self.secs,
            areas.len(),
            names.join(", "),
            self.counts.passed,
            self.counts.failed,
            self.skips.len(),
            self.counts.ignored
        )];
        if let Some(e) = &self.error {
            v.push(format!("  could not finish: {e}"));
        }
        for s in &self.steps {
            let rc = if s.rc == 0 { "ok".to_string() } else { format!("FAILED (exit {})", s.rc) };
            if s.name == "doctor" {
                v.push(format!("  doctor: {rc}"));
                continue;
            }
            // "demo::tcp_ipv4" in the demo line: "tcp_ipv4".
            let prefix = format!("{}::", s.name);
            let tests: Vec<String> = s
                .tests
                .iter()
                .map(|(n, r)| {
                    let n = n.strip_prefix(&prefix).unwrap_or(n);
                    if r == "ok" { n.to_string() } else { format!("{n} {r}") }
                })
                .collect();
            v.push(format!("  {}: {rc}, {} tests: {}", s.name, s.tests.len(), tests.join(", ")));
        }
        v.extend(self.panics.iter().map(|(n, m)| format!("  FAILED {n}: {m}")));
        v
    }
}

/// Boots each chosen kernel ("6.1", "6.12" or "all") with the suite and prints one
/// verdict line per kernel. An error is something that stopped the suite from starting
/// (unknown kernel, no QEMU); a kernel that fails to boot or run is a failed outcome.
pub fn run_kernels(which: &str) -> Result<Vec<Outcome>> {
    let series: Vec<&(&str, &str, &str)> = SERIES.iter().filter(|(s, _, _)| which == "all" || which == *s).collect();
    if series.is_empty() {
        bail!("unknown kernel '{which}': choose 6.1, 6.12 or all");
    }
    // Flake hunting: PACKETFLOW_VM_ONLY=demo,bulk keeps only those areas, and
    // PACKETFLOW_VM_REPEAT=N runs the list N times in one boot.
    let only = match std::env::var("PACKETFLOW_VM_ONLY") {
        Ok(v) => Some(vm_only(&v)?),
        Err(_) => None,
    };
    let repeat: usize = match std::env::var("PACKETFLOW_VM_REPEAT") {
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("PACKETFLOW_VM_REPEAT='{v}' is not a positive number of times"))?,
        Err(_) => 1,
    };
    install(&[("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static"), ("ip", "iproute2")])?;
    run(cargo().args(["build", "-p", "packetflow"]))?;
    let e2e = e2e_binary()?;
    let mut areas: Vec<&str> = VM_TESTS.to_vec();
    if let Some(only) = only {
        areas.retain(|a| only.contains(a));
    }
    // Each area runs as the libtest filter `area::`, which selects every test whose name
    // contains it: the binary's own list says that is exactly the area's tests.
    check_area_filters(&areas, &list_tests(&e2e)?)?;
    let dir = target_dir().join("vm");
    std::fs::create_dir_all(&dir)?;
    let mut outcomes = Vec::new();
    for (name, pattern, has) in series {
        let t0 = Instant::now();
        let mut o = match one_kernel(&dir, name, pattern, has, &e2e, &areas, repeat) {
            Ok(o) => o,
            Err(e) => Outcome {
                kernel: String::new(),
                passed: false,
                counts: Counts::default(),
                skips: Vec::new(),
                steps: Vec::new(),
                panics: Vec::new(),
                error: Some(format!("{e:#}")),
                secs: 0.0,
            },
        };
        o.kernel = name.to_string();
        o.secs = t0.elapsed().as_secs_f64();
        o.passed = o.error.is_none()
            && o.steps.iter().all(|s| s.rc == 0)
            && o.steps.len() == areas.len() * repeat + 1
            && o.counts.failed == 0;
        outcomes.push(o);
    }
    for o in &outcomes {
        for l in o.describe() {
            println!("vm-test: {l}");
        }
    }
    Ok(outcomes)
}

/// The VM areas `PACKETFLOW_VM_ONLY` names (comma-separated), each one checked.
fn vm_only(v: &str) -> Result<Vec<&'static str>> {
    let mut out = Vec::new();
    for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match VM_TESTS.iter().find(|t| **t == name) {
            Some(t) => out.push(*t),
            None => bail!(
                "PACKETFLOW_VM_ONLY names '{name}', which is not an area the VM suite runs: choose from {}",
                VM_TESTS.join(", ")
            ),
        }
    }
    if out.is_empty() {
        bail!("PACKETFLOW_VM_ONLY is empty: name areas from {}", VM_TESTS.join(", "));
    }
    Ok(out)
}

/// The test executable cargo built for `E2E`.
fn e2e_binary() -> Result<PathBuf> {
    let json = output(
        cargo().args(["test", "-p", "packetflow-tests", "--no-run", "--message-format=json"]).args(["--test", E2E]),
    )?;
    for line in json.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        if let (Some(E2E), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str()) {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("cargo built no {E2E} test binary")
}

/// The names of the tests in test binary `exe` (`--list`, run on the host; it runs no
/// test).
fn list_tests(exe: &Path) -> Result<Vec<String>> {
    let list = output(Command::new(exe).args(["--list", "--format=terse"]))?;
    Ok(list.lines().filter_map(|l| l.strip_suffix(": test")).map(str::to_string).collect())
}

/// Checks that the libtest filter `area::` (a substring match) selects exactly the tests
/// of `area`, and at least one, for each area.
fn check_area_filters(areas: &[&str], tests: &[String]) -> Result<()> {
    for area in areas {
        let filter = format!("{area}::");
        if !tests.iter().any(|t| t.starts_with(&filter)) {
            bail!("the {E2E} test binary has no tests in an area '{area}' (no module tests/tests/{E2E}/{area}.rs?)");
        }
        if let Some(t) = tests.iter().find(|t| t.contains(&filter) && !t.starts_with(&filter)) {
            bail!("the filter '{filter}' would also select {t}, outside the {area} area");
        }
    }
    Ok(())
}

/// The newest package matching `pattern` in the apt index.
fn newest_package(pattern: &str) -> Result<String> {
    let search = || output(Command::new("apt-cache").args(["search", "--names-only", pattern]));
    let mut list = search()?;
    if list.trim().is_empty() {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        list = search()?;
    }
    let mut names: Vec<String> = list.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect();
    names.sort_by_key(|n| version_key(n));
    names.pop().with_context(|| format!("no Debian package matches {pattern}"))
}

/// Numbers in a package name, for ordering "6.1.0-9" before "6.1.0-10".
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect()
}

/// Downloads (once) and unpacks (once) the kernel package; returns its unpacked root.
fn kernel_package(dir: &Path, pattern: &str) -> Result<(String, PathBuf)> {
    let pkg = newest_package(pattern)?;
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs)?;
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(&debs).ok()?.flatten().map(|e| e.path()).find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
        })
    };
    let deb = if let Some(d) = find() {
        d
    } else {
        run(Command::new("apt-get").args(["download", "-q", &pkg]).current_dir(&debs))?;
        find().with_context(|| format!("apt-get download {pkg} left no .deb in {}", debs.display()))?
    };
    let unpacked = dir.join(&pkg);
    if !unpacked.join("boot").exists() {
        let tmp = dir.join(format!("{pkg}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        std::fs::rename(&tmp, &unpacked)?;
    }
    Ok((pkg, unpacked))
}

/// Boots one kernel with the test initramfs; returns each step's exit code and the
/// guest's test counts (passed, failed).
fn one_kernel(
    dir: &Path,
    name: &str,
    pattern: &str,
    has: &str,
    e2e: &Path,
    areas: &[&str],
    repeat: usize,
) -> Result<Outcome> {
    let (pkg, kroot) = kernel_package(dir, pattern)?;
    eprintln!("vm-test: kernel {name}: {pkg}");
    let vmlinuz = std::fs::read_dir(kroot.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .context("no vmlinuz in the kernel package")?;
    let initrd = dir.join(format!("{pkg}.initrd"));
    build_initramfs(&kroot, e2e, areas, repeat, has, &initrd)?;

    let log_path = dir.join(format!("{pkg}.console.log"));
    let mut log = std::fs::File::create(&log_path)?;
    // One host thread for both vCPUs (thread=single): with a thread per vCPU (MTTCG) the
    // 6.1 guest now and then hung for good while the kernel patched its own code (a
    // tracepoint's static branch being armed as the tests attached programs: one vCPU
    // looping on the int3 of the patch site, the RCU grace period starved). A single
    // thread runs the vCPUs in turn, so each sees the other's code writes at once.
    let accel = std::env::var("PACKETFLOW_VM_ACCEL").unwrap_or_else(|_| "tcg,thread=single".into());
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", &accel, "-cpu", "max", "-m", "3072", "-smp", "2"])
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        // A guest stuck in the kernel (a soft lockup, a stalled RCU grace period) panics,
        // and so ends the run with its stack on the console, instead of hanging until the
        // timeout.
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=5 softlockup_panic=1 watchdog_thresh=30 sysctl.kernel.panic_on_rcu_stall=1",
        ])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("+ {}", crate::show(&qemu));
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let out = child.stdout.take().context("qemu stdout")?;
    let pid = child.id();
    // A watchdog: a hung guest must not hang the command.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if done_rx.recv_timeout(VM_TIMEOUT).is_err() {
            eprintln!("vm-test: kernel run exceeded {} min; stopping qemu", VM_TIMEOUT.as_secs() / 60);
            kill9(pid);
        }
    });
    let mut steps: Vec<Step> = Vec::new();
    // The step now running: its counts and tests, until its PF-VM-RESULT line.
    let mut cur = Step::default();
    let mut skips = Vec::new();
    let mut panics = crate::Panics::default();
    let mut done = false;
    for line in BufReader::new(out).lines() {
        let line = line.unwrap_or_default();
        let line = line.trim_end_matches('\r');
        writeln!(log, "{line}")?;
        println!("[{name}] {line}");
        cur.counts.add_result_line(line);
        panics.add_line(line);
        if let Some(t) = test_line(line) {
            cur.tests.push(t);
        }
        if let Some(rest) = line.strip_prefix("PF-VM-SKIP ") {
            skips.extend(crate::parse_skips(rest));
        }
        if let Some(rest) = line.strip_prefix("PF-VM-RESULT ") {
            let mut w = rest.split_whitespace();
            if let (Some(n), Some(rc)) = (w.next(), w.next().and_then(|r| r.parse().ok())) {
                let mut step = std::mem::take(&mut cur);
                step.name = n.to_string();
                step.rc = rc;
                steps.push(step);
            }
        }
        if line.starts_with("PF-VM-DONE") {
            done = true;
        }
    }
    let _ = done_tx.send(());
    let _ = child.wait();
    let mut counts = Counts::default();
    for s in &steps {
        counts.passed += s.counts.passed;
        counts.failed += s.counts.failed;
        counts.ignored += s.counts.ignored;
    }
    counts.passed = counts.passed.saturating_sub(skips.len() as u64);
    let error = (!done).then(|| format!("the guest stopped before finishing (console log: {})", log_path.display()));
    Ok(Outcome {
        kernel: name.to_string(),
        passed: false,
        counts,
        skips,
        steps,
        panics: panics.found,
        error,
        secs: 0.0,
    })
}

/// libtest's "test NAME ... ok" line (with --test-threads=1 and captured output, one
/// line per test): (name, "ok" | "FAILED" | "ignored").
fn test_line(line: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix("test ")?;
    let (name, result) = rest.split_once(" ... ")?;
    let result = result.split_whitespace().next()?;
    matches!(result, "ok" | "FAILED" | "ignored").then(|| (name.to_string(), result.to_string()))
}

fn kill9(pid: u32) {
    let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
}

/// Writes the initramfs (a "newc" cpio archive, uncompressed) to `out`.
fn build_initramfs(kroot: &Path, e2e: &Path, areas: &[&str], repeat: usize, has: &str, out: &Path) -> Result<()> {
    let mut files: Vec<(String, Vec<u8>, u32)> = Vec::new();
    let mut dirs: Vec<String> =
        ["bin", "sbin", "lib", "lib64", "usr", "tests", "modules", "proc", "sys", "dev", "tmp", "run", "var", "etc"]
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
    let add_file =
        |files: &mut Vec<(String, Vec<u8>, u32)>, dirs: &mut Vec<String>, dest: &str, data: Vec<u8>, mode: u32| {
            let mut p = PathBuf::new();
            for c in Path::new(dest).parent().into_iter().flat_map(|p| p.components()) {
                p.push(c);
                let s = p.to_string_lossy().into_owned();
                if !dirs.contains(&s) {
                    dirs.push(s);
                }
            }
            files.push((dest.to_string(), data, mode));
        };
    let binaries: Vec<(String, PathBuf)> = vec![
        ("bin/busybox".into(), which("busybox")?),
        // In /bin before busybox links itself there: busybox's own `ip` is too small.
        ("bin/ip".into(), which("ip")?),
        // The connection tests shape a veth with tbf.
        ("bin/tc".into(), which("tc")?),
        // The drop tests add nftables rules.
        ("bin/nft".into(), which("nft")?),
        ("bin/packetflow".into(), target_dir().join("debug/packetflow")),
        (format!("tests/{E2E}"), e2e.to_path_buf()),
    ];
    let mut libs: Vec<PathBuf> = Vec::new();
    for (dest, src) in &binaries {
        add_file(&mut files, &mut dirs, dest, stripped(src)?, 0o755);
        let ldd = output(Command::new("ldd").arg(src)).unwrap_or_default();
        for l in ldd.lines() {
            let path = l.split("=>").last().and_then(|r| r.split_whitespace().next()).unwrap_or("");
            if path.starts_with('/') && !libs.iter().any(|x| x == Path::new(path)) {
                libs.push(PathBuf::from(path));
            }
        }
    }
    for lib in &libs {
        let real = std::fs::canonicalize(lib)?;
        add_file(&mut files, &mut dirs, lib.to_string_lossy().trim_start_matches('/'), std::fs::read(&real)?, 0o755);
    }
    let moddir = std::fs::read_dir(kroot.join("lib/modules"))?
        .flatten()
        .next()
        .context("no lib/modules in the kernel package")?
        .path();
    let mut order = Vec::new();
    for m in MODULES {
        let base = moddir.join("kernel").join(m);
        let data = if base.exists() {
            std::fs::read(&base)?
        } else if base.with_extension("ko.xz").exists() {
            let xz = base.with_extension("ko.xz");
            let o = Command::new("xz").arg("-dc").arg(&xz).output().context("xz (to unpack kernel modules)")?;
            if !o.status.success() {
                bail!("xz -dc {} failed", xz.display());
            }
            o.stdout
        } else {
            continue; // built in, or absent: the tests report what is missing
        };
        let name = Path::new(m).file_name().unwrap().to_string_lossy().into_owned();
        order.push(name.clone());
        add_file(&mut files, &mut dirs, &format!("modules/{name}"), data, 0o644);
    }
    let steps: Vec<&str> = (0..repeat).flat_map(|_| areas.iter().copied()).collect();
    add_file(&mut files, &mut dirs, "init", init_script(&order, &steps, has).into_bytes(), 0o755);

    let mut w = std::io::BufWriter::new(std::fs::File::create(out)?);
    let mut ino = 1u32;
    for d in &dirs {
        cpio_entry(&mut w, &mut ino, d, 0o040755, &[])?;
    }
    cpio_entry(&mut w, &mut ino, "var/run", 0o120777, b"/run")?;
    for (name, data, mode) in &files {
        cpio_entry(&mut w, &mut ino, name, 0o100000 | mode, data)?;
    }
    cpio_entry(&mut w, &mut ino, "TRAILER!!!", 0, &[])?;
    w.flush()?;
    Ok(())
}

/// A binary without its debug sections (smaller initramfs); the original when strip fails.
fn stripped(src: &Path) -> Result<Vec<u8>> {
    let tmp = std::env::temp_dir().join(format!("pf-vm-strip-{}", std::process::id()));
    let ok = Command::new("objcopy").arg("--strip-debug").arg(src).arg(&tmp).status().is_ok_and(|s| s.success());
    let data = std::fs::read(if ok { &tmp } else { src })?;
    let _ = std::fs::remove_file(&tmp);
    Ok(data)
}

fn which(cmd: &str) -> Result<PathBuf> {
    let p = output(Command::new("sh").args(["-c", &format!("command -v {cmd}")]))?;
    Ok(std::fs::canonicalize(p.trim())?)
}

/// One "newc" cpio header and body.
fn cpio_entry(w: &mut impl Write, ino: &mut u32, name: &str, mode: u32, data: &[u8]) -> Result<()> {
    let namesize = name.len() + 1;
    let header = format!(
        "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        *ino,
        mode,
        0,
        0,
        1,
        0,
        data.len(),
        0,
        0,
        0,
        0,
        namesize,
        0
    );
    *ino += 1;
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    let pad = |n: usize| (4 - n % 4) % 4;
    w.write_all(&vec![0; pad(110 + namesize)])?;
    w.write_all(data)?;
    w.write_all(&vec![0; pad(data.len())])?;
    Ok(())
}

/// The guest's /init: mounts, modules, then doctor and the test binary once per area
/// (each run its own process, as each area was its own binary before they were one).
fn init_script(modules: &[String], areas: &[&str], has: &str) -> String {
    let mut s = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin:/sbin HOME=/tmp PACKETFLOW_BIN=/bin/packetflow RUST_BACKTRACE=0 PACKETFLOW_KERNEL_HAS={has} PACKETFLOW_SKIP_FILE=/run/pf-skips\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\n\
         mount -t tmpfs run /run\n\
         mount -t tracefs tracefs /sys/kernel/tracing\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         ip link set lo up\n",
    );
    for m in modules {
        s.push_str(&format!("insmod /modules/{m} || echo \"PF-VM could not load {m}\"\n"));
    }
    s.push_str("echo \"PF-VM-BEGIN $(uname -r)\"\n");
    s.push_str("/bin/packetflow doctor\necho \"PF-VM-RESULT doctor $?\"\n");
    for a in areas {
        // Each skip marker the run wrote, on the console for the host to count.
        s.push_str(&format!(
            "cd /tmp && /tests/{E2E} --test-threads=1 {a}::\nrc=$?\n\
             [ -f /run/pf-skips ] && sed 's/^/PF-VM-SKIP /' /run/pf-skips && rm -f /run/pf-skips\n\
             echo \"PF-VM-RESULT {a} $rc\"\n"
        ));
    }
    s.push_str("echo PF-VM-DONE\npoweroff -f\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_numerically() {
        let mut v = ["linux-image-6.1.0-9-cloud", "linux-image-6.1.0-56-cloud", "linux-image-6.1.0-10-cloud"];
        v.sort_by_key(|n| version_key(n));
        assert_eq!(v.last(), Some(&"linux-image-6.1.0-56-cloud"));
    }

    #[test]
    fn a_mistyped_vm_only_is_an_error_naming_the_choices() {
        assert_eq!(vm_only("demo, bulk").unwrap(), vec!["demo", "bulk"]);
        let e = vm_only("demo,bluk").unwrap_err().to_string();
        assert!(e.contains("'bluk'") && e.contains("demo, filter, bulk, summary"), "{e}");
        assert!(vm_only(" , ").is_err());
    }

    #[test]
    fn test_lines_name_each_test() {
        assert_eq!(test_line("test a::b ... ok"), Some(("a::b".into(), "ok".into())));
        assert_eq!(test_line("test x ... FAILED"), Some(("x".into(), "FAILED".into())));
        assert_eq!(test_line("test result: ok. 1 passed"), None);
    }

    #[test]
    fn the_guest_reports_skips() {
        let s = init_script(&[], &["demo"], "kprobes");
        assert!(s.contains("PACKETFLOW_SKIP_FILE=/run/pf-skips") && s.contains("PF-VM-SKIP "), "{s}");
    }

    #[test]
    fn the_guest_runs_each_area_as_a_filter() {
        let s = init_script(&[], &["demo", "bulk"], "kprobes");
        assert!(s.contains("/tests/e2e --test-threads=1 demo::\n"), "{s}");
        assert!(s.contains("PF-VM-RESULT bulk $rc"), "{s}");
    }

    #[test]
    fn area_filters_must_select_exactly_their_area() {
        let tests: Vec<String> = ["demo::tcp", "demo::udp", "bulk::fifty", "recording::demo::x"]
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
        assert!(check_area_filters(&["bulk"], &tests).is_ok());
        let e = check_area_filters(&["demo"], &tests).unwrap_err().to_string();
        assert!(e.contains("recording::demo::x"), "{e}");
        let e = check_area_filters(&["filter"], &tests).unwrap_err().to_string();
        assert!(e.contains("'filter'"), "{e}");
    }

    #[test]
    fn the_areas_line_names_tests_without_their_area() {
        let o = Outcome {
            kernel: "6.1".into(),
            passed: true,
            counts: Counts { passed: 2, failed: 0, ignored: 0 },
            skips: Vec::new(),
            steps: vec![
                Step { name: "doctor".into(), ..Step::default() },
                Step {
                    name: "demo".into(),
                    rc: 0,
                    counts: Counts::default(),
                    tests: vec![("demo::tcp".into(), "ok".into()), ("demo::udp".into(), "FAILED".into())],
                },
            ],
            panics: Vec::new(),
            error: None,
            secs: 1.0,
        };
        let d = o.describe();
        assert!(d[0].contains("1 areas of e2e (demo)"), "{d:?}");
        assert_eq!(d[2], "  demo: ok, 2 tests: tcp, udp FAILED");
    }

    #[test]
    fn cpio_entries_are_aligned() {
        let mut buf = Vec::new();
        let mut ino = 1;
        cpio_entry(&mut buf, &mut ino, "init", 0o100755, b"#!/bin/sh\n").unwrap();
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.starts_with(b"070701"));
    }
}
