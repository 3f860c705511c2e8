//! The packages `cargo xtask dist` builds: the .deb installs with dpkg, its binary runs
//! `doctor` and a demo from /usr/bin, completions load in bash, and a purge leaves nothing
//! (files, /etc/packetflow, the account, /var/lib/packetflow); the tarball's static binary
//! runs from wherever it is unpacked.
//!
//! `cargo xtask test` (the whole suite) builds the packages first and names their folder
//! in `PACKETFLOW_DIST_DIR`; without it the test says it skipped.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use packetflow_tests::*;

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").args(["-c", cmd]).output().expect("sh")
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn artifact(dir: &Path, suffix: &str) -> PathBuf {
    std::fs::read_dir(dir)
        .expect("PACKETFLOW_DIST_DIR")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(suffix))
        .unwrap_or_else(|| panic!("no *{suffix} in {}", dir.display()))
}

/// The packages' folder, or None after saying the test skipped.
fn dist_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("PACKETFLOW_DIST_DIR").map(PathBuf::from);
    if dir.is_none() {
        skip("no packages built: PACKETFLOW_DIST_DIR unset (cargo xtask test builds them; or run cargo xtask dist)");
    }
    dir
}

/// Purges the package however the test ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = sh("dpkg --purge packetflow >/dev/null 2>&1");
    }
}

#[test]
fn the_deb_installs_runs_and_purges_leaving_nothing() {
    require_root();
    let Some(dir) = dist_dir() else { return };
    let deb = artifact(&dir, "_amd64.deb");
    assert!(!sh("dpkg -s packetflow >/dev/null 2>&1").status.success(), "packetflow is already installed here");
    assert!(!Path::new("/usr/bin/packetflow").exists(), "/usr/bin/packetflow exists outside the package");
    let listed = text(&Command::new("dpkg-deb").arg("-c").arg(&deb).output().unwrap());
    let files: Vec<String> = listed
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    for want in [
        "/usr/bin/packetflow",
        "/usr/lib/systemd/system/packetflow.service",
        "/usr/lib/sysusers.d/packetflow.conf",
        "/etc/packetflow/packetflow.toml",
        "/usr/share/man/man1/packetflow-trace.1.gz",
        "/usr/share/bash-completion/completions/packetflow",
        "/usr/share/zsh/vendor-completions/_packetflow",
        "/usr/share/fish/vendor_completions.d/packetflow.fish",
    ] {
        assert!(files.iter().any(|f| f == want), "{want} not in the package: {listed}");
    }

    let _guard = Installed;
    let o = Command::new("dpkg").arg("-i").arg(&deb).output().unwrap();
    assert!(o.status.success(), "dpkg -i: {}", text(&o));
    assert!(sh("getent passwd packetflow").status.success(), "the daemon's account was created");
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/packetflow.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/packetflow daemon"), "{unit}");

    let o = Command::new("/usr/bin/packetflow").arg("doctor").output().unwrap();
    assert_eq!(o.status.code(), Some(0), "doctor from /usr/bin: {}", text(&o));
    assert!(text(&o).contains("tracing can work on this machine."), "{}", text(&o));
    let o = Command::new("/usr/bin/packetflow")
        .args(["demo", "--path", "loopback", "--count", "50", "--port", &unique_port().to_string()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "demo from /usr/bin: {}", text(&o));
    assert!(text(&o).contains("send_syscall"), "a stage table: {}", text(&o));
    let o = sh("bash --norc -c '. /usr/share/bash-completion/completions/packetflow && complete -p packetflow'");
    assert!(o.status.success() && text(&o).contains("_packetflow"), "bash completion: {}", text(&o));
    let o = sh("zcat /usr/share/man/man1/packetflow-capture.1.gz");
    assert!(text(&o).contains(".TH packetflow-capture"), "man page: {}", text(&o));

    let o = sh("dpkg --purge packetflow");
    assert!(o.status.success(), "dpkg --purge: {}", text(&o));
    let left: Vec<&String> = files.iter().filter(|f| Path::new(f).exists()).collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    for gone in ["/etc/packetflow", "/var/lib/packetflow", "/usr/share/doc/packetflow"] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
    assert!(!sh("getent passwd packetflow").status.success(), "the account left after purge");
    assert!(!sh("getent group packetflow").status.success(), "the group left after purge");
}

#[test]
fn the_tarball_binary_is_static_and_runs_anywhere() {
    require_root();
    let Some(dir) = dist_dir() else { return };
    let tar = artifact(&dir, "-x86_64-linux-musl.tar.gz");
    let to = std::env::temp_dir().join(format!("pf-tar-{}", std::process::id()));
    std::fs::create_dir_all(&to).unwrap();
    let o = Command::new("tar").arg("-xzf").arg(&tar).arg("-C").arg(&to).output().unwrap();
    assert!(o.status.success(), "tar: {}", text(&o));
    let top = std::fs::read_dir(&to).unwrap().flatten().next().expect("one folder").path();
    let bin = top.join("packetflow");
    // No program interpreter: the kernel runs it without a libc on the machine.
    let ldd = Command::new("ldd").arg(&bin).output().unwrap();
    assert!(!text(&ldd).contains("libc.so"), "ldd: {}", text(&ldd));
    let o = Command::new(&bin).args(["doctor", "--json"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["tracing_works"], true);
    for f in ["man/packetflow.1", "completions/packetflow.bash", "packetflow.service", "grafana-dashboard.json"] {
        assert!(top.join(f).exists(), "{f} in the tarball");
    }
    let _ = std::fs::remove_dir_all(&to);
}
