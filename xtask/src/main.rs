//! `cargo xtask`: everything beyond plain cargo.
//!
//! * `setup` — the toolchain the eBPF build needs (nightly + rust-src, bpf-linker built
//!   against the nightly's own LLVM) and the Debian packages the tests use. Idempotent and
//!   fast when everything is there; `demo` and `test` run it first.
//! * `demo [ARGS]` — build, then `packetflow demo ARGS` (the README's main job).
//! * `test [ARGS]` — build, then the whole test suite (the README's test command); without
//!   ARGS it ends with the VM suite on Debian's 6.1 kernel.
//! * `vm-test [--kernel 6.1|6.12|all]` — the end-to-end tests on Debian kernels in QEMU
//!   (xtask/src/vm.rs).
//! * `fuzz [SECONDS]` — every cargo-fuzz target under fuzz/ (cargo-fuzz installed on demand).
//! * `bench [--quick] [--only SECTION,...]` — `packetflow bench` on a release build; writes
//!   BENCHMARKS.md.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};

mod vm;

/// Debian packages the tests (and benchmarks) use, by the command each provides.
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("ping", "iputils-ping"),
    ("setpriv", "util-linux"),
    ("chromium", "chromium"),
    ("tcpdump", "tcpdump"),
    ("tshark", "tshark"),
    ("systemd-analyze", "systemd"),
];

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
        _ => {
            eprintln!(
                "usage: cargo xtask <setup|demo [ARGS]|test [ARGS]|fuzz [SECONDS]|bench [--quick]|vm-test [--kernel 6.1|6.12|all]>"
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

fn setup() -> Result<ExitCode> {
    nightly()?;
    bpf_linker()?;
    packages()?;
    Ok(ExitCode::SUCCESS)
}

/// The nightly toolchain with rust-src (the eBPF crate is built with -Z build-std=core).
fn nightly() -> Result<()> {
    let list = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !list.lines().any(|l| l.starts_with("nightly")) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let comps = output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

/// The nightly's LLVM: (major version, directory holding its shared library, the
/// library's link name, e.g. "LLVM-22-rust-1.97.0-nightly").
fn nightly_llvm() -> Result<(u32, PathBuf, String)> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major: u32 = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .context("`rustc +nightly -vV` names no LLVM version")?;
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let name = std::fs::read_dir(&lib)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
        .with_context(|| format!("no libLLVM-*.so in {}", lib.display()))?;
    let link = name.trim_start_matches("lib").trim_end_matches(".so").to_string();
    if !link.starts_with(&format!("LLVM-{major}")) {
        bail!("{name} in {} does not match the nightly's LLVM {major}", lib.display());
    }
    Ok((major, lib, link))
}

/// bpf-linker whose LLVM major equals the nightly's. No Debian LLVM of that version
/// exists, so it is built from crates.io against the nightly's own libLLVM.
fn bpf_linker() -> Result<()> {
    let (major, lib, link) = nightly_llvm()?;
    if let Ok(path) = output(Command::new("sh").args(["-c", "command -v bpf-linker"])) {
        let path = path.trim().to_string();
        let works = Command::new(&path).arg("--version").output().is_ok_and(|o| o.status.success());
        let ldd = output(Command::new("ldd").arg(&path)).unwrap_or_default();
        let linked: Vec<&str> = ldd.lines().filter(|l| l.contains("libLLVM")).collect();
        let same_major = linked.is_empty()
            || linked
                .iter()
                .any(|l| l.contains(&format!("libLLVM.so.{major}")) || l.contains(&format!("libLLVM-{major}")));
        if works && same_major {
            return Ok(());
        }
        eprintln!("bpf-linker at {path} does not match the nightly's LLVM {major}; rebuilding it");
    }
    eprintln!("building bpf-linker against the nightly's LLVM {major} ({link}); this takes about a minute");
    let s = lib.display().to_string();
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--locked", "--force", "--no-default-features"])
        .args(["--features", &format!("llvm-{major},no-llvm-linking")])
        .env("RUSTFLAGS", format!("-L native={s} -l dylib={link} -C link-arg=-Wl,-rpath,{s}")))
}

/// Debian packages for the tests, installed only when a command they provide is missing.
fn packages() -> Result<()> {
    install(PACKAGES)
}

/// Installs the packages of `(command, package)` pairs whose command is missing.
fn install(wanted: &[(&str, &str)]) -> Result<()> {
    let have = |c: &str| {
        Command::new("sh").args(["-c", &format!("command -v {c}")]).output().is_ok_and(|o| o.status.success())
    };
    let mut missing: Vec<&str> = wanted.iter().filter(|(c, _)| !have(c)).map(|(_, p)| *p).collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("the tests need the Debian packages {}: run as root, or install them", missing.join(" "));
    }
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
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
    let st = Command::new(root().join("target/release/packetflow")).arg("demo").args(args).status()?;
    Ok(ExitCode::from(st.code().unwrap_or(1) as u8))
}

fn test(args: &[String]) -> Result<ExitCode> {
    setup()?;
    need_root("test")?;
    run(cargo().args(["build", "-p", "packetflow"]))?;
    let bin = root().join("target/debug/packetflow");
    // The end-to-end tests share the kernel's global hooks and the machine's two cores:
    // one at a time keeps their numbers honest.
    let mut child = cargo()
        .args(["test", "--no-fail-fast"])
        .args(args)
        .args(["--", "--test-threads=1"])
        .env("PACKETFLOW_BIN", &bin)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let out = child.stdout.take().context("cargo test stdout")?;
    let mut totals = [0u64; 3];
    for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for (i, word) in ["passed", "failed", "ignored"].iter().enumerate() {
                totals[i] += count_before(rest, word);
            }
        }
    }
    let st = child.wait()?;
    let host_ok = st.success() && totals[1] == 0 && totals[0] > 0;
    if !st.success() && totals[1] == 0 {
        eprintln!("xtask: cargo test failed ({st}) with no failing test: a test crate did not build (see above)");
    }
    // The whole suite (no arguments) also runs the end-to-end tests on another kernel:
    // Debian's 6.1, the oldest we support, under QEMU (`vm-test`; PACKETFLOW_NO_VM=1
    // skips it while iterating).
    let mut vm = String::new();
    let mut vm_ok = true;
    if args.is_empty() && std::env::var_os("PACKETFLOW_NO_VM").is_none() {
        match vm::run_kernels(VM_KERNEL_IN_TEST) {
            Ok(outcomes) => {
                for o in &outcomes {
                    totals[0] += o.tests[0];
                    totals[1] += o.tests[1];
                    vm_ok &= o.passed;
                }
            }
            Err(e) => {
                eprintln!("xtask: the VM suite could not start: {e:#}");
                vm_ok = false;
            }
        }
        vm = format!("; kernel {VM_KERNEL_IN_TEST} in QEMU: {}", if vm_ok { "passed" } else { "FAILED" });
    }
    // One closing line for the whole suite (cargo prints one per test binary).
    println!("tests: {} passed, {} failed, {} skipped{vm}", totals[0], totals[1], totals[2]);
    Ok(if host_ok && vm_ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The kernel whose VM suite `cargo xtask test` runs (`cargo xtask vm-test --kernel all`
/// runs every one).
const VM_KERNEL_IN_TEST: &str = "6.1";

/// Benchmarks (BENCHMARKS.md): release build, sockperf/iperf3/tcpdump from Debian.
fn bench(args: &[String]) -> Result<ExitCode> {
    setup()?;
    need_root("bench")?;
    install(&[("sockperf", "sockperf"), ("iperf3", "iperf3"), ("tcpdump", "tcpdump")])?;
    run(cargo().args(["build", "--release", "-p", "packetflow"]))?;
    let st = Command::new(root().join("target/release/packetflow"))
        .arg("bench")
        .arg("--out")
        .arg(root().join("BENCHMARKS.md"))
        .args(args)
        .status()?;
    Ok(ExitCode::from(st.code().unwrap_or(1) as u8))
}

/// Every cargo-fuzz target under fuzz/, each for SECONDS (default 60). Fails on a crash.
fn fuzz(args: &[String]) -> Result<ExitCode> {
    nightly()?;
    let secs: u64 = match args.first() {
        Some(s) => s.parse().with_context(|| format!("'{s}' is not a number of seconds"))?,
        None => 60,
    };
    if Command::new("cargo").args(["fuzz", "--version"]).output().map_or(true, |o| !o.status.success()) {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let list = output(Command::new("cargo").args(["+nightly", "fuzz", "list"]).current_dir(root()))?;
    for target in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        eprintln!("fuzzing {target} for {secs} s");
        // The fuzzed code never loads eBPF: skip building the programs.
        run(Command::new("cargo")
            .args(["+nightly", "fuzz", "run", target, "--", &format!("-max_total_time={secs}")])
            .current_dir(root())
            .env("PACKETFLOW_SKIP_EBPF", "1"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The number in front of `word` in "ok. 5 passed; 0 failed; 1 ignored; ...".
fn count_before(s: &str, word: &str) -> u64 {
    let words: Vec<&str> =
        s.split(|c: char| c == ';' || c == '.' || c.is_whitespace()).filter(|w| !w.is_empty()).collect();
    words.windows(2).find(|w| w[1] == word).and_then(|w| w[0].parse().ok()).unwrap_or(0)
}
