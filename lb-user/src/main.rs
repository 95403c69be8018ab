//! `lb`: an XDP load balancer for Neo4j clusters. See `lb --help`.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use lb_user::{dataplane::AttachMode, run, status};

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "XDP load balancer for Neo4j clusters (writes to the master, reads to the slaves)",
    long_about = "lb rewrites Bolt and HTTP connections to a virtual IP in the kernel's XDP hook \
                  (full NAT: DNAT + SNAT), sending them to the backends its configuration names. \
                  Drivers must connect with bolt:// through lb: neo4j:// fetches a routing table \
                  and connects to the members directly, bypassing any balancer."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the XDP program onto the interfaces and balance until SIGINT/SIGTERM.
    ///
    /// Example: lb run --config lb.toml --iface eth0            (one-armed)
    ///          lb run --config lb.toml --iface eth0 --iface eth1 (clients on eth0, backends on eth1)
    Run {
        /// TOML configuration (services, backends, SNAT ports, timeouts).
        #[arg(long, short)]
        config: PathBuf,
        /// Interface to attach to; repeat for a two-armed setup. The first one gets the VIPs.
        #[arg(long = "iface", short, required = true)]
        ifaces: Vec<String>,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
        xdp_mode: AttachMode,
        /// Instance name (pins under /sys/fs/bpf/lb/<instance>/); overrides the config's.
        #[arg(long)]
        instance: Option<String>,
    },
    /// Print an instance's counters from its pinned maps.
    Status {
        #[arg(long, default_value = "default")]
        instance: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Take a backend out of (or back into) every set, like HAProxy's runtime API.
    ///
    /// drain: no new connections, established ones continue (rolling upgrades);
    /// disable: out of every set and its connections are reset (maintenance);
    /// enable: follows its health checks again.
    Server {
        /// Backend name, as in the configuration.
        name: String,
        #[arg(value_parser = ["drain", "disable", "enable"])]
        action: String,
        #[arg(long, default_value = "default")]
        instance: String,
    },
    /// Remove an instance's pinned maps (after a crash; a running agent removes them itself).
    Detach {
        #[arg(long, default_value = "default")]
        instance: String,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            config,
            ifaces,
            xdp_mode,
            instance,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run::run(run::RunArgs {
                config,
                ifaces,
                xdp_mode,
                instance,
            }))
        }
        Cmd::Status { instance, json } => {
            let s = status::snapshot(&instance)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                status::print(&s);
            }
            Ok(())
        }
        Cmd::Server {
            name,
            action,
            instance,
        } => {
            println!("{}", lb_user::ops::request(&instance, &name, &action)?);
            Ok(())
        }
        Cmd::Detach { instance } => {
            lb_user::dataplane::unpin(&lb_user::dataplane::pin_dir(&instance))
        }
    }
}
