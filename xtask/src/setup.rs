//! `cargo xtask setup`: the toolchain the eBPF build needs (nightly + rust-src, bpf-linker
//! built against the nightly's own LLVM) and the Debian packages the tests use.

use super::{Command, Context, ExitCode, PathBuf, Result, bail, is_root, output, run};

/// Debian packages the tests (and benchmarks) use, by the command each provides.
pub(crate) const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("ping", "iputils-ping"),
    ("setpriv", "util-linux"),
    ("chromium", "chromium"),
    ("tcpdump", "tcpdump"),
    ("ethtool", "ethtool"),
    ("tshark", "tshark"),
    ("nft", "nftables"),
    ("systemd-analyze", "systemd"),
    ("prometheus", "prometheus"),
    ("dpkg-deb", "dpkg"),
];

pub(crate) fn setup() -> Result<ExitCode> {
    nightly()?;
    bpf_linker()?;
    packages()?;
    Ok(ExitCode::SUCCESS)
}

/// The nightly toolchain with rust-src (the eBPF crate is built with -Z build-std=core).
pub(crate) fn nightly() -> Result<()> {
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
pub(crate) fn nightly_llvm() -> Result<(u32, PathBuf, String)> {
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
pub(crate) fn bpf_linker() -> Result<()> {
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
pub(crate) fn packages() -> Result<()> {
    install(PACKAGES)
}

/// Installs the packages of `(command, package)` pairs whose command is missing.
pub(crate) fn install(wanted: &[(&str, &str)]) -> Result<()> {
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
