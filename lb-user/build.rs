//! Builds the XDP object (`lb-ebpf`) with the nightly toolchain and bpf-linker, so that the
//! agent can embed it. `cargo xtask setup` installs both; this script only says what is missing.
use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ws = manifest.parent().expect("workspace root").to_path_buf();
    for p in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-common/src",
        "lb-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", ws.join(p).display());
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let target_dir = ws.join("target").join("ebpf");
    let tools_bin = ws.join(".tools").join("bin");
    let path = format!(
        "{}:{}",
        tools_bin.display(),
        env::var("PATH").unwrap_or_default()
    );

    let mut cmd = Command::new("rustup");
    cmd.current_dir(&ws)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "-p",
            "lb-ebpf",
            "--release",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("PATH", path);
    // The outer cargo's settings are for the host build; none of them may leak into the BPF one.
    for (k, _) in env::vars() {
        if (k.starts_with("CARGO_") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
            || k == "RUSTUP_TOOLCHAIN"
        {
            cmd.env_remove(k);
        }
    }
    // BTF is required by the map-of-maps definitions; debuginfo feeds it.
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        // v3: the fetch form of the atomic add (`maxconn`), and 32-bit sub-registers.
        ["-Cdebuginfo=2", "-Clink-arg=--btf", "-Ctarget-cpu=v3"].join("\u{1f}"),
    );
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run `rustup run nightly cargo` ({e}); run `cargo xtask setup` first")
    });
    if !status.success() {
        panic!(
            "building the XDP program (lb-ebpf) failed; if bpf-linker or rust-src is missing, \
             run `cargo xtask setup` (it installs both into .tools/ and the nightly toolchain)"
        );
    }
    let obj = target_dir.join("bpfel-unknown-none/release/lb-ebpf");
    std::fs::copy(&obj, out.join("lb-ebpf.o"))
        .unwrap_or_else(|e| panic!("copy {}: {e}", obj.display()));
}
