//! `cargo xtask dist [--out DIR]`: packetflow for machines without a Rust toolchain.
//!
//! * a static binary (x86_64-unknown-linux-musl; the eBPF object is embedded) in
//!   `packetflow-VERSION-x86_64-linux-musl.tar.gz`, with man pages, completions and the
//!   service files beside it;
//! * `packetflow_VERSION_amd64.deb`: /usr/bin/packetflow, the systemd unit, the sysusers
//!   file, /etc/packetflow/packetflow.toml (a conffile), man pages and bash/zsh/fish
//!   completions. Its scripts create the `packetflow` account on install and remove it
//!   and /var/lib/packetflow on purge; the service is not started by installing
//!   (attaching XDP to a machine's interfaces is the admin's decision).
//!
//! Man pages and completions come from the binary just built (`packetflow man`,
//! `packetflow completions`), so they match its flags. Default output: target/dist.

use std::path::Path;

use super::{Command, Context, ExitCode, PathBuf, Result, bail, cargo, output, root, run, setup, target_dir};

const TARGET: &str = "x86_64-unknown-linux-musl";

pub(crate) fn dist(args: &[String]) -> Result<ExitCode> {
    let out = match args {
        [] => target_dir().join("dist"),
        [flag, dir] if flag == "--out" => PathBuf::from(dir),
        _ => bail!("usage: cargo xtask dist [--out DIR]"),
    };
    setup::nightly()?;
    setup::bpf_linker()?;
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == TARGET) {
        run(Command::new("rustup").args(["target", "add", TARGET]))?;
    }
    run(cargo().args(["build", "--release", "--locked", "-p", "packetflow", "--target", TARGET]))?;
    let bin = target_dir().join(TARGET).join("release/packetflow");
    if has_interpreter(&bin)? {
        bail!("{} asks for a dynamic loader: not a static binary", bin.display());
    }
    let version = env!("CARGO_PKG_VERSION");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;
    let work = out.join("work");
    let _ = std::fs::remove_dir_all(&work);

    // The .deb's tree.
    let deb = work.join("deb");
    let put = |rel: &str, from: &Path, mode: u32| -> Result<()> {
        let to = deb.join(rel);
        std::fs::create_dir_all(to.parent().expect("a file in a folder"))?;
        std::fs::copy(from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        set_mode(&to, mode)
    };
    let dist_dir = root().join("dist");
    // Symbols off (11 MB → about 8); the embedded eBPF object is data and stays whole.
    let stripped = work.join("packetflow");
    std::fs::create_dir_all(&work)?;
    std::fs::copy(&bin, &stripped)?;
    run(Command::new("strip").arg(&stripped))?;
    let bin = stripped;
    put("usr/bin/packetflow", &bin, 0o755)?;
    put("etc/packetflow/packetflow.toml", &dist_dir.join("packetflow.toml"), 0o644)?;
    put("usr/lib/sysusers.d/packetflow.conf", &dist_dir.join("packetflow.sysusers"), 0o644)?;
    // The unit in dist/ names /usr/local/bin (README's install by hand); the package's
    // binary is in /usr/bin.
    let unit = std::fs::read_to_string(dist_dir.join("packetflow.service"))?.replace("/usr/local/bin/", "/usr/bin/");
    write(&deb.join("usr/lib/systemd/system/packetflow.service"), &unit, 0o644)?;
    put("usr/share/doc/packetflow/README.md", &root().join("README.md"), 0o644)?;
    put("usr/share/doc/packetflow/grafana-dashboard.json", &dist_dir.join("grafana-dashboard.json"), 0o644)?;
    let man = work.join("man");
    run(Command::new(&bin).arg("man").arg(&man))?;
    for page in std::fs::read_dir(&man)? {
        let page = page?.path();
        let name = page.file_name().and_then(|n| n.to_str()).context("a man page's name")?.to_string();
        put(&format!("usr/share/man/man1/{name}"), &page, 0o644)?;
        run(Command::new("gzip").args(["-9n"]).arg(deb.join(format!("usr/share/man/man1/{name}"))))?;
    }
    for (shell, rel) in [
        ("bash", "usr/share/bash-completion/completions/packetflow"),
        ("zsh", "usr/share/zsh/vendor-completions/_packetflow"),
        ("fish", "usr/share/fish/vendor_completions.d/packetflow.fish"),
    ] {
        write(&deb.join(rel), &output(Command::new(&bin).args(["completions", shell]))?, 0o644)?;
    }
    let size_kib = dir_size(&deb)? / 1024;
    write(&deb.join("DEBIAN/control"), &control(version, size_kib), 0o644)?;
    write(&deb.join("DEBIAN/conffiles"), "/etc/packetflow/packetflow.toml\n", 0o644)?;
    write(&deb.join("DEBIAN/postinst"), POSTINST, 0o755)?;
    write(&deb.join("DEBIAN/prerm"), PRERM, 0o755)?;
    write(&deb.join("DEBIAN/postrm"), POSTRM, 0o755)?;
    let deb_file = out.join(format!("packetflow_{version}_amd64.deb"));
    run(Command::new("dpkg-deb").args(["--root-owner-group", "-Zgzip", "--build"]).arg(&deb).arg(&deb_file))?;

    // The tarball: the same files, flat.
    let name = format!("packetflow-{version}-x86_64-linux-musl");
    let tree = work.join(&name);
    std::fs::create_dir_all(tree.join("completions"))?;
    std::fs::copy(&bin, tree.join("packetflow"))?;
    set_mode(&tree.join("packetflow"), 0o755)?;
    run(Command::new("cp").arg("-r").arg(&man).arg(tree.join("man")))?;
    for f in ["packetflow.toml", "packetflow.service", "packetflow.sysusers", "grafana-dashboard.json"] {
        std::fs::copy(dist_dir.join(f), tree.join(f))?;
    }
    std::fs::copy(root().join("README.md"), tree.join("README.md"))?;
    for (shell, file) in [("bash", "packetflow.bash"), ("zsh", "_packetflow"), ("fish", "packetflow.fish")] {
        write(&tree.join("completions").join(file), &output(Command::new(&bin).args(["completions", shell]))?, 0o644)?;
    }
    let tar = out.join(format!("{name}.tar.gz"));
    run(Command::new("tar").arg("-C").arg(&work).args(["--owner=0", "--group=0", "-czf"]).arg(&tar).arg(&name))?;
    std::fs::remove_dir_all(&work)?;
    println!("{}\n{}", deb_file.display(), tar.display());
    Ok(ExitCode::SUCCESS)
}

fn control(version: &str, size_kib: u64) -> String {
    format!(
        "Package: packetflow
Version: {version}
Architecture: amd64
Maintainer: packetflow developers <packetflow@localhost>
Installed-Size: {size_kib}
Section: net
Priority: optional
Homepage: https://github.com/packetflow/packetflow
Description: where a packet's time goes inside Linux (eBPF)
 Per-stage latency of every packet from the send syscall to the receive
 syscall (socket, TCP/UDP, device queue, TC, driver, XDP, socket queue),
 drops with the kernel's reason, pcapng and AF_XDP capture, and an
 always-on daemon serving Prometheus metrics. One static binary: the eBPF
 programs are embedded. Needs a kernel with BTF; run `packetflow doctor`.
"
    )
}

/// Creates the daemon's account (systemd-sysusers where it exists, else useradd).
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers packetflow.conf
    elif ! getent passwd packetflow >/dev/null; then
        useradd --system --home-dir /var/lib/packetflow --no-create-home \
            --shell /usr/sbin/nologin --comment "packetflow daemon" packetflow
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
    echo "packetflow: installed; check this kernel with 'packetflow doctor'; start the daemon with 'systemctl enable --now packetflow'"
fi
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl disable --now packetflow.service >/dev/null 2>&1 || true
fi
"#;

/// Purge leaves nothing: the account and its state directory go with the package.
const POSTRM: &str = r#"#!/bin/sh
set -e
if [ "$1" = purge ]; then
    rm -rf /var/lib/packetflow /run/packetflow
    if getent passwd packetflow >/dev/null; then
        userdel packetflow >/dev/null 2>&1 || true
    fi
    if getent group packetflow >/dev/null; then
        groupdel packetflow >/dev/null 2>&1 || true
    fi
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
"#;

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    std::fs::create_dir_all(path.parent().expect("a file in a folder"))?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        n += if m.is_dir() { dir_size(&e.path())? } else { m.len() };
    }
    Ok(n)
}

/// Does this ELF file name a program interpreter (PT_INTERP: a dynamically linked
/// program)? A static (or static-pie) binary has none.
fn has_interpreter(path: &Path) -> Result<bool> {
    let f = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if f.len() < 64 || &f[..4] != b"\x7fELF" || f[4] != 2 {
        bail!("{} is not a 64-bit ELF file", path.display());
    }
    let u16_at = |o: usize| u16::from_le_bytes([f[o], f[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(f[0x20..0x28].try_into()?) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    for i in 0..count {
        let o = phoff + i * size;
        let p_type = u32::from_le_bytes(f.get(o..o + 4).context("truncated program headers")?.try_into()?);
        if p_type == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}
