//! `cargo xtask`: everything beyond plain cargo.
//!
//! * `setup` — the toolchain the eBPF build needs (nightly + rust-src, bpf-linker built
//!   against the nightly's own LLVM) and the Debian packages the tests use. Idempotent and
//!   fast when everything is there; `demo` and `test` run it first.
//! * `demo [ARGS]` — build, then `packetflow demo ARGS` (the README's main job).
//! * `test [ARGS] [-- TEST-ARGS]` — build, then the whole test suite (the README's test
//!   command); without ARGS it ends with the VM suite on Debian's 6.1 kernel. ARGS go to
//!   cargo test, TEST-ARGS to the test binaries: `test -p packetflow-tests --test e2e --
//!   demo::` runs one area of the end-to-end tests.
//! * `vm-test [--kernel 6.1|6.12|all]` — the end-to-end tests on Debian kernels in QEMU
//!   (xtask/src/vm.rs).
//! * `fuzz [SECONDS]` — every cargo-fuzz target under fuzz/ (cargo-fuzz installed on demand).
//! * `dist [--out DIR]` — a static (musl) binary in a tarball and a .deb (xtask/src/dist.rs).
//! * `bench [--quick] [--only SECTION,...]` — `packetflow bench` on a release build; writes
//!   BENCHMARKS.md.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};

mod dist;
mod results;
mod setup;
mod vm;

use results::{Counts, Panics, Runs, group_reasons, parse_skips};
use setup::{install, nightly, setup};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r.to_vec()),
        None => ("help", Vec::new()),
    };
    let r = match cmd {
        "setup" => setup(),
        "demo" => demo(&rest),
        "test" => test(&rest),
        "fuzz" => fuzz(&rest),
        "bench" => bench(&rest),
        "vm-test" => vm::vm_test(&rest),
        "dist" => dist::dist(&rest),
        _ => {
            eprintln!(
                "usage: cargo xtask <setup|demo [ARGS]|test [ARGS]|fuzz [SECONDS]|bench [--quick]|vm-test [--kernel 6.1|6.12|all]|dist [--out DIR]>"
            );
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR`, else target/ in the workspace.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => root().join(d),
        None => root().join("target"),
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", show(cmd));
    let st = cmd.status().with_context(|| format!("running {}", show(cmd)))?;
    if !st.success() {
        bail!("{} failed ({st})", show(cmd));
    }
    Ok(())
}

fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {}", show(cmd)))?;
    if !out.status.success() {
        bail!("{} failed: {}", show(cmd), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")).map(|v| v.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn need_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask {what}` loads eBPF programs into the kernel: run it as root (e.g. sudo -E cargo xtask {what})"
        );
    }
    Ok(())
}

fn demo(args: &[String]) -> Result<ExitCode> {
    setup()?;
    need_root("demo")?;
    run(cargo().args(["build", "--release", "-p", "packetflow"]))?;
    let st = Command::new(target_dir().join("release/packetflow")).arg("demo").args(args).status()?;
    Ok(ExitCode::from(st.code().unwrap_or(1) as u8))
}

fn test(args: &[String]) -> Result<ExitCode> {
    setup()?;
    need_root("test")?;
    run(cargo().args(["build", "-p", "packetflow"]))?;
    let bin = target_dir().join("debug/packetflow");
    // Tests that cannot check their subject here (tests/src/lib.rs `skip`) leave a marker
    // line in this file; libtest counts them as passed, the closing line as skipped.
    let skip_file = target_dir().join("packetflow-skips.txt");
    let _ = std::fs::remove_file(&skip_file);
    // ARGS before a `--` go to cargo test, those after it to the test binaries (after
    // --test-threads=1): `cargo xtask test -p packetflow-tests --test e2e -- demo::`.
    let (cargo_args, test_args) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    // The whole suite installs the packages (tests/tests/e2e/dist.rs): build them first.
    let dist_dir = target_dir().join("dist");
    if args.is_empty() {
        dist::dist(&["--out".into(), dist_dir.display().to_string()]).context("cargo xtask dist")?;
    }
    // The end-to-end tests share the kernel's global hooks and the machine's two cores:
    // one at a time keeps their numbers honest.
    let mut child = cargo()
        .args(["test", "--no-fail-fast"])
        .args(cargo_args)
        .args(["--", "--test-threads=1"])
        .args(test_args)
        .env("PACKETFLOW_BIN", &bin)
        .env("PACKETFLOW_SKIP_FILE", &skip_file)
        .envs(args.is_empty().then_some(("PACKETFLOW_DIST_DIR", &dist_dir)))
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let out = child.stdout.take().context("cargo test stdout")?;
    let mut host = Counts::default();
    let mut runs = Runs::default();
    let mut panics = Panics::default();
    for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
        let line = line?;
        println!("{line}");
        host.add_result_line(&line);
        runs.add_line(&line);
        panics.add_line(&line);
    }
    let st = child.wait()?;
    let host_skips = parse_skips(&std::fs::read_to_string(&skip_file).unwrap_or_default());
    host.passed = host.passed.saturating_sub(host_skips.len() as u64);
    let host_ok = st.success() && host.failed == 0 && host.passed > 0;
    let crashed = runs.unfinished();
    if crashed > 0 {
        // The end-to-end tests are one binary (tests/tests/e2e): a test that kills it
        // (an abort, a signal) takes every test after it along. Counted as one failure,
        // as a guest that stops early is in the VM suite.
        eprintln!(
            "xtask: {crashed} test binary(ies) stopped before their closing `test result:` line; the last test started: {}",
            runs.last_started.as_deref().unwrap_or("(none)")
        );
    } else if !st.success() && host.failed == 0 {
        eprintln!("xtask: cargo test failed ({st}) with no failing test: a test crate did not build (see above)");
    }
    host.failed += crashed;
    let mut totals = host;
    let mut skips = host_skips;
    let mut report = vec![format!(
        "host (this kernel): {} passed, {} failed, {} skipped, {} ignored",
        host.passed,
        host.failed,
        skips.len(),
        host.ignored
    )];
    report.extend(panics.describe("  "));
    if crashed > 0 {
        report.push(format!(
            "  {crashed} test binary(ies) crashed, counted as failed; the last test started: {}",
            runs.last_started.as_deref().unwrap_or("(none)")
        ));
    }
    let whole = args.is_empty();
    // The whole suite (no arguments) also runs the end-to-end tests on another kernel:
    // Debian's 6.1, the oldest we support, under QEMU (`vm-test`; PACKETFLOW_NO_VM=1
    // skips it while iterating).
    let mut vm_ok = true;
    if whole && std::env::var_os("PACKETFLOW_NO_VM").is_none() {
        match vm::run_kernels(VM_KERNEL_IN_TEST) {
            Ok(outcomes) => {
                for o in &outcomes {
                    totals.passed += o.counts.passed;
                    totals.failed += o.counts.failed + u64::from(!o.passed && o.counts.failed == 0);
                    totals.ignored += o.counts.ignored;
                    skips.extend(o.skips.iter().cloned());
                    vm_ok &= o.passed;
                    report.extend(o.describe());
                }
            }
            Err(e) => {
                eprintln!("xtask: the VM suite could not start: {e:#}");
                totals.failed += 1;
                vm_ok = false;
                report.push(format!("kernel {VM_KERNEL_IN_TEST} in QEMU: could not start: {e:#}"));
            }
        }
    }
    // Style and lints (Cargo.toml [workspace.lints]): each check counts as one test.
    let mut lint_ok = true;
    if whole {
        let mut parts = Vec::new();
        for (check, ok) in lint()? {
            lint_ok &= ok;
            if ok {
                totals.passed += 1;
            } else {
                totals.failed += 1;
            }
            parts.push(format!("{check} {}", if ok { "ok" } else { "FAILED (see above)" }));
        }
        report.push(format!("lint: {}", parts.join(", ")));
    }
    // And every fuzz target for a short while (`cargo xtask fuzz` runs them longer); each
    // target counts as one test.
    let mut fuzz_ok = true;
    if whole && std::env::var_os("PACKETFLOW_NO_FUZZ").is_none() {
        let t0 = std::time::Instant::now();
        let results = match fuzz_all(FUZZ_SECS_IN_TEST) {
            Ok(r) => r,
            Err(e) => vec![("(fuzz build)".to_string(), Err(format!("{e:#}")))],
        };
        let mut parts = Vec::new();
        for (target, r) in &results {
            match r {
                Ok(()) => {
                    totals.passed += 1;
                    parts.push(format!("{target} ok"));
                }
                Err(e) => {
                    totals.failed += 1;
                    fuzz_ok = false;
                    parts.push(format!("{target} FAILED: {e}"));
                }
            }
        }
        report.push(format!(
            "fuzz: {} targets, {FUZZ_SECS_IN_TEST} s each, {:.0} s in all (build included): {}",
            results.len(),
            t0.elapsed().as_secs_f64(),
            parts.join(", ")
        ));
    }
    if !skips.is_empty() {
        report.push(format!("skipped: {}", group_reasons(&skips)));
        for (name, reason) in &skips {
            report.push(format!("  {name}: {reason}"));
        }
    }
    if totals.ignored > 0 {
        report.push(format!("ignored by cargo (#[ignore]): {}", totals.ignored));
    }
    // One closing block for the whole suite (cargo prints one result line per test
    // binary); the last line alone is what CI reads.
    println!();
    for l in &report {
        println!("{l}");
    }
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed,
        totals.failed,
        skips.len() as u64 + totals.ignored
    );
    Ok(if host_ok && vm_ok && lint_ok && fuzz_ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `cargo fmt --check` and `cargo clippy -D warnings` over the host crates (the eBPF crate
/// is built for bpfel by packetflow's build.rs and not linted): (check, passed).
fn lint() -> Result<Vec<(&'static str, bool)>> {
    for (tool, component) in [("clippy", "clippy"), ("fmt", "rustfmt")] {
        if !Command::new("cargo").args([tool, "--version"]).output().is_ok_and(|o| o.status.success()) {
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    let fmt = cargo().args(["fmt", "--all", "--check"]).status()?.success();
    let clippy = cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]).status()?.success();
    Ok(vec![("cargo fmt --check", fmt), ("cargo clippy --all-targets -D warnings", clippy)])
}

/// The marker tests/src/lib.rs `skip` writes.
pub const SKIP_MARKER: &str = "PACKETFLOW-SKIP: ";

/// Seconds each fuzz target runs in `cargo xtask test`.
const FUZZ_SECS_IN_TEST: u64 = 10;

/// The kernel whose VM suite `cargo xtask test` runs (`cargo xtask vm-test --kernel all`
/// runs every one).
const VM_KERNEL_IN_TEST: &str = "6.1";

/// Benchmarks (BENCHMARKS.md): release build, sockperf/iperf3/tcpdump/bpftrace from Debian.
fn bench(args: &[String]) -> Result<ExitCode> {
    setup()?;
    need_root("bench")?;
    install(&[
        ("sockperf", "sockperf"),
        ("iperf3", "iperf3"),
        ("tcpdump", "tcpdump"),
        ("bpftrace", "bpftrace"),
        ("ethtool", "ethtool"),
    ])?;
    run(cargo().args(["build", "--release", "-p", "packetflow"]))?;
    let st = Command::new(target_dir().join("release/packetflow"))
        .arg("bench")
        .arg("--out")
        .arg(root().join("BENCHMARKS.md"))
        .args(args)
        .status()?;
    Ok(ExitCode::from(st.code().unwrap_or(1) as u8))
}

/// Every cargo-fuzz target under fuzz/, each for SECONDS (default 60). Fails on a crash.
fn fuzz(args: &[String]) -> Result<ExitCode> {
    let secs: u64 = match args.first() {
        Some(s) => s.parse().ok().filter(|&n| n > 0).with_context(|| format!("'{s}' is not a number of seconds"))?,
        None => 60,
    };
    let mut ok = true;
    let results = fuzz_all(secs)?;
    for (target, r) in &results {
        match r {
            Ok(()) => println!("fuzz {target}: ok ({secs} s)"),
            Err(e) => {
                ok = false;
                println!("fuzz {target}: FAILED: {e}");
            }
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Runs each target for `secs` seconds, from its committed seeds (fuzz/seeds/<target>/)
/// and the corpus it grew before (fuzz/corpus/<target>/, not committed). Err: something
/// stopped every target (no nightly, no cargo-fuzz, a build failure); per target, Err
/// says how it failed (a crash leaves its input in fuzz/artifacts/<target>/).
fn fuzz_all(secs: u64) -> Result<Vec<(String, Result<(), String>)>> {
    nightly()?;
    if Command::new("cargo").args(["fuzz", "--version"]).output().map_or(true, |o| !o.status.success()) {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let fuzz_dir = root().join("fuzz");
    let list = output(Command::new("cargo").args(["+nightly", "fuzz", "list"]).current_dir(root()))?;
    let targets: Vec<String> = list.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
    if targets.is_empty() {
        bail!("cargo fuzz list names no target under {}", fuzz_dir.display());
    }
    // The fuzzed code never loads eBPF: skip building the programs. One build for all
    // targets, so the per-target runs below measure fuzzing, not compiling.
    run(fuzz_cmd().args(["build"]))?;
    let mut results = Vec::new();
    for target in targets {
        let corpus = fuzz_dir.join("corpus").join(&target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = fuzz_dir.join("seeds").join(&target);
        let mut cmd = fuzz_cmd();
        cmd.args(["run", &target]).arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.args(["--", &format!("-max_total_time={secs}")]);
        eprintln!("fuzzing {target} for {secs} s");
        eprintln!("+ {}", show(&cmd));
        let r = match cmd.status() {
            Ok(st) if st.success() => Ok(()),
            Ok(st) => Err(format!("{st}; the input is in fuzz/artifacts/{target}/")),
            Err(e) => Err(format!("could not run cargo fuzz: {e}")),
        };
        results.push((target, r));
    }
    Ok(results)
}

fn fuzz_cmd() -> Command {
    let mut c = Command::new("cargo");
    c.args(["+nightly", "fuzz"]).current_dir(root()).env("PACKETFLOW_SKIP_EBPF", "1");
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_markers_are_parsed_and_grouped() {
        let text = "PACKETFLOW-SKIP: a::x: kprobes unavailable\n\
                    noise\n\
                    PACKETFLOW-SKIP: y: ping missing\r\n\
                    PACKETFLOW-SKIP: z: kprobes unavailable\n";
        let s = parse_skips(text);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0], ("a::x".to_string(), "kprobes unavailable".to_string()));
        assert_eq!(s[1].1, "ping missing");
        assert_eq!(group_reasons(&s), "kprobes unavailable (2), ping missing (1)");
    }

    #[test]
    fn result_lines_are_summed() {
        let mut c = Counts::default();
        c.add_result_line("test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out");
        c.add_result_line("test result: FAILED. 2 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out");
        c.add_result_line("running 7 tests");
        assert_eq!(c, Counts { passed: 7, failed: 3, ignored: 1 });
    }

    #[test]
    fn a_binary_that_dies_mid_run_is_noticed() {
        let mut r = Runs::default();
        for l in [
            "running 2 tests",
            "test cli::a ... ok",
            "test cli::b ... ok",
            "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 63 filtered out; finished in 1.00s",
            "running 65 tests",
            "test bulk::x ... ok",
            "test capture::y ... ",
        ] {
            r.add_line(l);
        }
        assert_eq!(r.unfinished(), 1);
        assert_eq!(r.last_started.as_deref(), Some("capture::y"));
        let mut one = Runs::default();
        one.add_line("running 1 test");
        one.add_line("test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
        assert_eq!(one.unfinished(), 0);
    }
}
