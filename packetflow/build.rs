//! Builds `packetflow-ebpf` for the BPF target and leaves the object in OUT_DIR, where
//! `kernel/loader.rs` embeds it, so `cargo build -p packetflow` yields one self-contained binary.
//!
//! This does what `aya_build::build_ebpf` does (a nested `cargo +nightly build -Z
//! build-std=core --target bpfel-unknown-none`, linked by bpf-linker), but stays quiet
//! unless the nested build fails, and then says what to do. Toolchain: `cargo xtask setup`.
//! `PACKETFLOW_SKIP_EBPF=1` embeds an empty object (for docs/clippy without nightly).

use std::{env, path::PathBuf, process::Command};

fn main() {
    println!("cargo:rerun-if-env-changed=PACKETFLOW_SKIP_EBPF");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let dst = out.join("packetflow");
    if env::var("PACKETFLOW_SKIP_EBPF").as_deref() == Ok("1") {
        println!("cargo:warning=PACKETFLOW_SKIP_EBPF=1: the binary embeds no eBPF programs");
        std::fs::write(&dst, b"").expect("writing empty object");
        return;
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("manifest dir")).join("..");
    for dir in ["packetflow-ebpf", "packetflow-common"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("target arch");
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb-unknown-none",
        _ => "bpfel-unknown-none",
    };
    let target_dir = out.join("ebpf-target");
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        "-Clink-arg=--disable-expand-memcpy-in-order".into(),
    ]
    .join("\x1f");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--package", "packetflow-ebpf", "--bins", "--release"])
        .args(["--target", target, "-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&root)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS");
    let fail = |why: String| -> ! {
        for line in why.lines() {
            println!("cargo:warning={line}");
        }
        panic!(
            "building the eBPF programs failed (see the warnings above); run `cargo xtask setup` to install the nightly toolchain and bpf-linker"
        );
    };
    let output = match cmd.output() {
        Ok(o) => o,
        Err(e) => fail(format!("cannot run `rustup run nightly cargo`: {e}")),
    };
    if !output.status.success() {
        fail(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let built = target_dir.join(target).join("release").join("packetflow");
    if let Err(e) = std::fs::copy(&built, &dst) {
        fail(format!("copying {}: {e}", built.display()));
    }
}
