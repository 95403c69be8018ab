//! Builds the XDP object (`lb-ebpf`) with the nightly toolchain and bpf-linker, so that the
//! agent can embed it. `cargo xtask setup` installs both; this script only says what is missing.
use std::{env, path::PathBuf};

include!("ebpf_build.rs");

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ws = manifest.parent().expect("workspace root").to_path_buf();
    for p in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-common/src",
        "lb-common/Cargo.toml",
        "lb-user/ebpf_build.rs",
    ] {
        println!("cargo:rerun-if-changed={}", ws.join(p).display());
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let target_dir = ws.join("target").join("ebpf");
    let mut cmd = ebpf_build_command(&ws, &target_dir, &[]);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run `rustup run nightly cargo` ({e}); run `cargo xtask setup` first")
    });
    if !status.success() {
        panic!(
            "building the XDP program (lb-ebpf) failed; if bpf-linker or rust-src is missing, \
             run `cargo xtask setup` (it installs both into .tools/ and the nightly toolchain)"
        );
    }
    let obj = ebpf_object_path(&target_dir);
    std::fs::copy(&obj, out.join("lb-ebpf.o"))
        .unwrap_or_else(|e| panic!("copy {}: {e}", obj.display()));
}
