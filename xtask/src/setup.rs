//! `cargo xtask setup`: installs what this project needs and is missing, nothing else.
//!
//! Steps, each a quick check first: Debian packages, `rust-src` for the installed nightly, bpf-linker
//! 0.13.0 built against that nightly's own libLLVM into `<repo>/.tools`, cargo-deb into cargo's
//! own bin directory (`cargo deb`), the Python venv with the pinned Neo4j driver, bpffs at
//! /sys/fs/bpf, and Debian 12's 6.1 kernel for the VM test runs (`.tools/kernels/debian-6.1`).
//! A run with nothing to do prints "setup: up to date".

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::cmd::{cargo, cmd, probe, probe_stdout, repo, run};

/// Debian packages the tools, tests and demo use.
pub const PACKAGES: &[&str] = &[
    "iproute2",     // ip netns, veth, bridge
    "ethtool",      // offload settings on veths; the agent's NIC XDP counters (ethtool -S)
    "bpftool",      // inspecting maps and programs
    "tcpdump",      // packet captures when debugging
    "iperf3",       // throughput runs
    "haproxy",      // the setup lb replaces, for comparison
    "nftables",     // NAT baselines
    "iputils-ping", // harness smoke tests
    "procps",       // sysctl in namespaces
    "python3-venv", // the Neo4j driver venv
    "python3-pip",
    "chromium",        // renders the admin dashboard in the admin end-to-end test
    "systemd", // systemd-analyze verify of the packaged lb@.service (no running systemd needed)
    "qemu-system-x86", // the VM that runs suites on Debian 12's own kernel (src/vm.rs)
    "busybox-static", // PID 1 and tools of that VM's initramfs
    "kmod",    // depmod for the extracted kernel, modprobe in the VM
    "keepalived", // VRRP for the pair tests (tests/tests/pair.rs)
];

/// The nightly the eBPF build and bpf-linker are tied to (platform-facts).
pub const NIGHTLY: &str = "1.97.0-nightly (2026-05-19)";
/// The bpf-linker release that works with that nightly's LLVM 22.
pub const BPF_LINKER: &str = "0.13.0";
/// The cargo-deb release `cargo xtask package` uses (3.8.0 needs Rust 1.85; installed `--locked`).
pub const CARGO_DEB: &str = "3.8.0";
/// Written when `tests/py/requirements.txt` does not exist yet.
pub const DEFAULT_NEO4J_PIN: &str = "neo4j==6.0.2";

/// Runs every step; prints "setup: up to date" when none had anything to do.
pub fn setup() -> Result<()> {
    let repo = repo();
    let mut done: Vec<String> = Vec::new();
    debian_packages(&mut done)?;
    rust_src(&mut done)?;
    bpf_linker(&repo, &mut done)?;
    cargo_deb(&mut done)?;
    python_venv(&repo, &mut done)?;
    bpffs(&mut done)?;
    crate::vm::ensure_kernel(crate::vm::DEBIAN_6_1, &mut done)?;
    if done.is_empty() {
        println!("setup: up to date");
    } else {
        println!("setup: done ({})", done.join("; "));
    }
    Ok(())
}

pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root: run `cargo xtask setup` as root (sudo -E cargo xtask setup)");
    }
    Ok(())
}

fn debian_packages(done: &mut Vec<String>) -> Result<()> {
    let out = probe(cmd("dpkg-query", &["-W", "-f=${Package} ${Status}\\n"]).args(PACKAGES))
        .context("dpkg-query is missing: setup supports Debian/Ubuntu machines")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !text
                .lines()
                .any(|l| l.starts_with(&format!("{p} ")) && l.ends_with("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_root("installing Debian packages")?;
    run(&mut cmd("apt-get", &["update"]))?;
    run(
        cmd("apt-get", &["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    done.push(format!("installed {}", missing.join(" ")));
    Ok(())
}

fn rust_src(done: &mut Vec<String>) -> Result<()> {
    let Some(version) = probe_stdout(&mut cmd(
        "rustup",
        &["run", "nightly", "rustc", "--version"],
    )) else {
        bail!(
            "the nightly toolchain is missing: this project expects rustc {NIGHTLY} as `nightly` \
             (install it with `rustup toolchain install nightly-2026-05-19` and name it nightly, e.g. \
             `rustup toolchain link`); setup never updates or replaces a nightly"
        );
    };
    if !version.contains("1.97.0-nightly") {
        eprintln!(
            "setup: warning: `nightly` is {}, expected {NIGHTLY}; bpf-linker {BPF_LINKER} may not match its LLVM",
            version.trim()
        );
    }
    let installed = probe_stdout(&mut cmd(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "nightly"],
    ))
    .unwrap_or_default();
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        return Ok(());
    }
    run(&mut cmd(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
    ))?;
    done.push("added rust-src to nightly".into());
    Ok(())
}

/// The nightly's libLLVM as a `-l dylib=` name and its major version, from the files in
/// `<sysroot>/lib` (e.g. `libLLVM-22-rust-1.97.0-nightly.so` -> `LLVM-22-rust-1.97.0-nightly`, 22).
pub fn llvm_lib_name(files: &[String]) -> Option<(String, u32)> {
    files.iter().find_map(|f| {
        let name = f.strip_prefix("lib")?.strip_suffix(".so")?;
        let rest = name.strip_prefix("LLVM-")?;
        let major = rest.split('-').next()?.parse().ok()?;
        Some((name.to_string(), major))
    })
}

fn bpf_linker(repo: &Path, done: &mut Vec<String>) -> Result<()> {
    let tools = repo.join(".tools");
    let linker = tools.join("bin").join("bpf-linker");
    let current = probe_stdout(&mut cmd(&linker.to_string_lossy(), &["--version"]));
    if current.as_deref().map(str::trim) == Some(&format!("bpf-linker {BPF_LINKER}")) {
        return Ok(());
    }
    let sysroot = probe_stdout(&mut cmd("rustc", &["+nightly", "--print", "sysroot"]))
        .context("`rustc +nightly --print sysroot` failed")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let files: Vec<String> = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    let (llvm, major) = llvm_lib_name(&files).with_context(|| {
        format!(
            "no libLLVM-<major>-*.so in {}: is the nightly complete?",
            lib.display()
        )
    })?;
    let rustflags = format!(
        "-L native={lib} -l dylib={llvm} -C link-arg=-Wl,-rpath,{lib}",
        lib = lib.display()
    );
    let mut install = cargo();
    install
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER}"),
            "--locked",
            "--force",
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major},no-llvm-linking"))
        .args(["--target", "x86_64-unknown-linux-gnu", "--root"])
        .arg(&tools);
    clean_install_env(&mut install);
    install.env("RUSTFLAGS", rustflags);
    run(&mut install)?;
    done.push(format!("built bpf-linker {BPF_LINKER} against {llvm}"));
    Ok(())
}

/// Settings of the cargo that runs xtask must not reach the build of an unrelated tool.
fn clean_install_env(install: &mut std::process::Command) {
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTFLAGS",
    ] {
        install.env_remove(var);
    }
}

/// Whether `cargo deb --version` printed the pinned release (`cargo-deb 3.8.0`).
pub fn is_cargo_deb(version_output: &str, want: &str) -> bool {
    version_output
        .split_whitespace()
        .any(|w| w.trim_start_matches('v') == want)
}

/// cargo-deb, pinned, into cargo's bin directory (`$CARGO_HOME/bin`, where `cargo deb` finds
/// it): not `.tools`, which a worktree may share with another checkout.
fn cargo_deb(done: &mut Vec<String>) -> Result<()> {
    let current = probe_stdout(cargo().args(["deb", "--version"]));
    if current
        .as_deref()
        .is_some_and(|v| is_cargo_deb(v, CARGO_DEB))
    {
        return Ok(());
    }
    let mut install = cargo();
    install.args([
        "install",
        &format!("cargo-deb@{CARGO_DEB}"),
        "--locked",
        "--force",
    ]);
    clean_install_env(&mut install);
    run(&mut install)?;
    done.push(format!("installed cargo-deb {CARGO_DEB}"));
    Ok(())
}

/// The exact `neo4j==X.Y.Z` pin in the requirements file.
pub fn neo4j_pin(requirements: &str) -> Option<String> {
    requirements.lines().find_map(|l| {
        let l = l.split('#').next()?.trim();
        l.strip_prefix("neo4j==").map(|v| v.trim().to_string())
    })
}

fn python_venv(repo: &Path, done: &mut Vec<String>) -> Result<()> {
    let req = repo.join("tests").join("py").join("requirements.txt");
    if !req.exists() {
        fs::create_dir_all(req.parent().unwrap_or(repo))?;
        fs::write(&req, format!("{DEFAULT_NEO4J_PIN}\n"))
            .with_context(|| format!("writing {}", req.display()))?;
        done.push(format!("wrote {}", req.display()));
    }
    let text = fs::read_to_string(&req).with_context(|| format!("reading {}", req.display()))?;
    let pin = neo4j_pin(&text)
        .with_context(|| format!("{} has no exact neo4j==X.Y.Z pin", req.display()))?;
    let venv = repo.join(".venv");
    let python = venv.join("bin").join("python");
    let have = probe_stdout(&mut cmd(
        &python.to_string_lossy(),
        &["-c", "import neo4j; print(neo4j.__version__)"],
    ));
    if have.as_deref().map(str::trim) == Some(pin.as_str()) {
        return Ok(());
    }
    if !python.exists() {
        run(cmd("python3", &["-m", "venv"]).arg(&venv))?;
    }
    run(cmd(&python.to_string_lossy(), &["-m", "pip", "install"])
        .args(["--disable-pip-version-check", "-q", "-r"])
        .arg(&req))?;
    done.push(format!("venv .venv with neo4j {pin}"));
    Ok(())
}

fn bpffs(done: &mut Vec<String>) -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    require_root("mounting bpffs")?;
    run(&mut cmd("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    done.push("mounted bpffs at /sys/fs/bpf".into());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_library_name_and_major_come_from_the_linker_script_file() {
        let files = vec![
            "libLLVM.so.22.1-rust-1.97.0-nightly".to_string(),
            "librustc_driver-b5a965480ee51f9a.so".to_string(),
            "libLLVM-22-rust-1.97.0-nightly.so".to_string(),
        ];
        assert_eq!(
            llvm_lib_name(&files),
            Some(("LLVM-22-rust-1.97.0-nightly".to_string(), 22))
        );
        assert_eq!(llvm_lib_name(&["librustc_driver.so".to_string()]), None);
    }

    #[test]
    fn cargo_deb_counts_as_installed_only_at_the_pinned_release() {
        assert!(is_cargo_deb("cargo-deb 3.8.0\n", "3.8.0"));
        assert!(!is_cargo_deb("cargo-deb 3.8.1\n", "3.8.0"));
        assert!(!is_cargo_deb("cargo-deb 13.8.0\n", "3.8.0"));
    }

    #[test]
    fn the_neo4j_pin_is_read_past_comments() {
        let req = "# the official driver\nneo4j==6.4.1  # verified\n";
        assert_eq!(neo4j_pin(req), Some("6.4.1".to_string()));
        assert_eq!(neo4j_pin("neo4j>=6\n"), None);
    }
}
