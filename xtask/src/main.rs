//! Project tasks: `cargo xtask setup|build|run|test|demo|bench|package`.
//!
//! Every command that needs tools calls `setup` first, so a fresh Debian machine (as root) needs only
//! `cargo xtask demo` or `cargo xtask test`.

mod cmd;
mod package;
mod setup;
mod testrun;
mod vm;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use cmd::{cargo, exit_code, repo, run};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "lb project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: Debian packages, rust-src, bpf-linker, cargo-deb, Python venv,
    /// bpffs.
    Setup,
    /// Setup, then build the agent (with its XDP object) and the test binaries.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Setup, release build, then run `target/release/lb ARGS...` in the foreground.
    Run {
        /// Arguments for `lb`, e.g. `run --config lb.toml --iface eth0`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, lint, build, then run all tests including the privileged ones (needs root).
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy -D warnings`.
        #[arg(long)]
        no_lint: bool,
        /// `all`: the host's kernel, then the VM subset on Debian 12's 6.1 in qemu (default);
        /// `host`: the host's kernel only; `debian-6.1`: the VM subset only.
        #[arg(long, env = "LB_TEST_KERNEL", default_value = "all")]
        kernel: String,
        /// With `--kernel <vm>`: only the VM tests a default run (CI) takes, not the suites whole.
        #[arg(long)]
        ci_subset: bool,
        /// Passed to every test binary (a name filter, `--exact`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        filter: Vec<String>,
    },
    /// Setup, build, then show lb balancing a simulated 3-server Neo4j cluster in namespaces.
    Demo,
    /// Setup, release build, then run benchmarks: `cargo xtask bench [SUITE] [-- --quick ...]`;
    /// without a suite, `all`, `churn` and `failover`; `synflood`, `idle` and `pair` by name (each
    /// writes its section of BENCHMARKS.md).
    Bench {
        /// all, throughput, connrate, latency, cost, memory, churn, synflood, idle, pair or failover.
        suite: Option<String>,
        /// Passed to `lb-bench <suite>`, e.g. `--quick` or `--runs 3`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, release build, then the Debian package (lb, lb@.service, an example config) in
    /// target/debian/; prints its path.
    Package,
}

/// `cargo build` of the agent and the test binaries (simulator, demo driver).
pub fn build(release: bool) -> Result<()> {
    let mut c = cargo();
    c.args(["build", "-p", "lb-user", "-p", "lb-tests", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<u8> {
    let cli = Cli::parse();
    match cli.command {
        Task::Setup => setup::setup()?,
        Task::Build { release } => {
            setup::setup()?;
            build(release)?;
        }
        Task::Run { args } => {
            setup::setup()?;
            run(cargo().args(["build", "--release", "-p", "lb-user"]))?;
            let lb = repo().join("target/release/lb");
            let status = cmd::status(std::process::Command::new(&lb).args(&args))
                .with_context(|| format!("running {}", lb.display()))?;
            return Ok(u8::try_from(exit_code(status)).unwrap_or(1));
        }
        Task::Test {
            no_lint,
            kernel,
            ci_subset,
            filter,
        } => {
            let kernels = testrun::Kernels::parse(&kernel)?;
            setup::setup()?;
            let subset = ci_subset || kernels == testrun::Kernels::All;
            if !testrun::test(&filter, !no_lint, &kernels, subset)? {
                return Ok(1);
            }
        }
        Task::Demo => {
            setup::setup()?;
            build(false)?;
            let repo = repo();
            let status = cmd::status(
                std::process::Command::new(repo.join("target/debug/lb-demo"))
                    .env("LB_BIN", repo.join("target/debug/lb"))
                    .env("LB_SIM_BIN", repo.join("target/debug/neo4j-sim"))
                    .env("LB_PYTHON", repo.join(".venv/bin/python"))
                    .env("LB_REPO", &repo),
            )?;
            return Ok(u8::try_from(exit_code(status)).unwrap_or(1));
        }
        Task::Bench { suite, args } => {
            setup::setup()?;
            build(true)?;
            let release = repo().join("target/release");
            let suites = match suite {
                Some(s) => vec![s],
                None => vec![
                    "all".to_string(),
                    "churn".to_string(),
                    "failover".to_string(),
                ],
            };
            let mut worst = 0;
            for suite in suites {
                let status = cmd::status(
                    std::process::Command::new(release.join("lb-bench"))
                        .arg(&suite)
                        .args(&args)
                        .env("LB_BIN", release.join("lb"))
                        .env("LB_SIM_BIN", release.join("neo4j-sim"))
                        .env("LB_REPO", repo()),
                )?;
                worst = worst.max(u8::try_from(exit_code(status)).unwrap_or(1));
            }
            return Ok(worst);
        }
        Task::Package => {
            setup::setup()?;
            let deb = package::package()?;
            println!("{}", deb.display());
        }
    }
    Ok(0)
}
