// The one recipe for building the XDP object (lb-ebpf): used by lb-user's build.rs for the
// object lb embeds, by the test harness for the `upgrade-test` variant and by xtask for the
// BPF-target clippy run (`include!`d by all three, so they cannot drift apart). Plain std only.

/// `rustup run nightly cargo build -p lb-ebpf --release` for the BPF target with `features`,
/// into `target_dir`, with bpf-linker from `<ws>/.tools/bin` and none of the calling cargo's
/// settings. The object is at [`ebpf_object_path`].
#[allow(dead_code)] // not every includer builds
fn ebpf_build_command(
    ws: &std::path::Path,
    target_dir: &std::path::Path,
    features: &[&str],
) -> std::process::Command {
    ebpf_cargo_command("build", ws, target_dir, features)
}

/// `rustup run nightly cargo <subcommand> -p lb-ebpf --release` for the BPF target, set up as
/// [`ebpf_build_command`] describes (`build`, or `clippy` to lint the program as it is built).
fn ebpf_cargo_command(
    subcommand: &str,
    ws: &std::path::Path,
    target_dir: &std::path::Path,
    features: &[&str],
) -> std::process::Command {
    let path = format!(
        "{}:{}",
        ws.join(".tools").join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = std::process::Command::new("rustup");
    cmd.current_dir(ws)
        .args(["run", "nightly", "cargo", subcommand, "-p", "lb-ebpf", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir)
        .env("PATH", path);
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    // The outer cargo's settings are for the host build; none of them may leak into the BPF one.
    for (k, _) in std::env::vars() {
        if (k.starts_with("CARGO_") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
            || k == "RUSTUP_TOOLCHAIN"
        {
            cmd.env_remove(k);
        }
    }
    // BTF is required by the map-of-maps definitions; debuginfo feeds it. v3: the fetch form
    // of the atomic add (`maxconn`), and 32-bit sub-registers.
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        ["-Cdebuginfo=2", "-Clink-arg=--btf", "-Ctarget-cpu=v3"].join("\u{1f}"),
    );
    cmd
}

/// Where [`ebpf_build_command`] leaves the object.
#[allow(dead_code)] // not every includer builds
fn ebpf_object_path(target_dir: &std::path::Path) -> std::path::PathBuf {
    target_dir.join("bpfel-unknown-none/release/lb-ebpf")
}
