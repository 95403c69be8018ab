//! The netns harness: throw-away network topologies for the privileged end-to-end tests and the demo.
//!
//! A [`Topology`] builds namespaces, veths and a bridge that mimic a small data centre: a client, the
//! balancer host (`lb`), and three Neo4j hosts (`db01`..`db03`) behind a switch. It applies every
//! setting that `shared/platform-facts.md` says native XDP on veth needs, starts processes inside the
//! namespaces, and removes everything again when dropped, also when the test panics.
//!
//! One job per file:
//! - [`topology`]: the two shapes (two-armed, one-armed), their addresses, and the lb/simulator starters;
//! - [`ns`]: one network namespace and the three ways to run something inside it;
//! - [`xdp_pass`]: attaching the `lb_pass` program to veth peers (so XDP_TX/REDIRECT frames arrive);
//! - [`process`]: child processes with captured logs, readiness lines, and kill-on-drop;
//! - [`cleanup`]: removal of namespaces and pin directories left behind by dead test processes;
//! - [`lock`]: the machine-wide lock that makes privileged tests run one at a time.
//!
//! Privileged tests are marked `#[ignore = "needs root and netns: run cargo xtask test"]`; `cargo xtask test`
//! runs them with `--include-ignored --test-threads=1`.

pub mod cleanup;
pub mod driver;
pub mod lock;
pub mod ns;
pub mod pair;
pub mod process;
pub mod topology;
pub mod xdp_pass;

pub use ns::Ns;
pub use process::{LbProcess, Process, SimProcess};
pub use topology::{slowdown, Backend, Host, LbHost, Shape, Topology, TopologyOptions};

use std::path::PathBuf;

/// The reason string of every privileged test's `#[ignore]`.
pub const PRIVILEGED: &str = "needs root and netns: run cargo xtask test";

/// The workspace root: `$LB_REPO` if set (xtask sets it), else the parent of this crate's manifest dir.
pub fn repo_root() -> PathBuf {
    match std::env::var_os("LB_REPO") {
        Some(p) => PathBuf::from(p),
        None => {
            let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            manifest.parent().map(PathBuf::from).unwrap_or(manifest)
        }
    }
}

/// Path of a binary given by env var `var`, defaulting to `<repo>/target/debug/<name>`.
pub fn bin_path(var: &str, name: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("target").join("debug").join(name),
    }
}

/// The `lb` agent binary (`$LB_BIN`).
pub fn lb_bin() -> PathBuf {
    bin_path("LB_BIN", "lb")
}

/// The Neo4j simulator binary (`$LB_SIM_BIN`).
pub fn sim_bin() -> PathBuf {
    bin_path("LB_SIM_BIN", "neo4j-sim")
}

/// The Python interpreter of the project venv (`$LB_PYTHON`, default `<repo>/.venv/bin/python`).
pub fn python() -> PathBuf {
    match std::env::var_os("LB_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join(".venv").join("bin").join("python"),
    }
}

/// Builds (incrementally) and returns the `upgrade-test` variant of the XDP object: the same
/// maps as the built-in program, different code. For the test that upgrades a running instance
/// to a genuinely different program build (`lb run --xdp-object`). Built with lb-user/build.rs's
/// recipe (`lb-user/ebpf_build.rs`), into `target/ebpf-variant`.
pub fn variant_xdp_object() -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let ws = repo_root();
    let target_dir = ws.join("target").join("ebpf-variant");
    let out = ebpf_build_command(&ws, &target_dir, &["upgrade-test"])
        .output()
        .context("run `rustup run nightly cargo build -p lb-ebpf --features upgrade-test`")?;
    anyhow::ensure!(
        out.status.success(),
        "building the upgrade-test XDP object failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(ebpf_object_path(&target_dir))
}

include!("../../../lb-user/ebpf_build.rs");
