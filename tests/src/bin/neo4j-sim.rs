//! `neo4j-sim`: one simulated Neo4j 3.x HA cluster member (HTTP role checks + Bolt + control socket).
//!
//! Prints `neo4j-sim <name> ready http=<addr> bolt=<addr>` on stdout once listening; logs go to stderr
//! (`RUST_LOG` filters them); exits cleanly on SIGTERM or SIGINT.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use lb_tests::sim::{run_server, Auth, Role, SimConfig};

/// Simulated Neo4j cluster member for lb's tests, demo and benchmarks.
#[derive(Debug, Parser)]
#[command(name = "neo4j-sim", version)]
struct Args {
    /// Server name, reported in every Bolt record.
    #[arg(long)]
    name: String,
    /// HTTP listen address (port 0: ephemeral, see the ready line).
    #[arg(long, default_value = "0.0.0.0:7474")]
    http: SocketAddr,
    /// Bolt listen address.
    #[arg(long, default_value = "0.0.0.0:7687")]
    bolt: SocketAddr,
    /// Initial role: master, slave or unknown.
    #[arg(long, default_value = "unknown")]
    role: Role,
    /// Require these credentials (user:password) on HTTP and Bolt.
    #[arg(long)]
    auth: Option<Auth>,
    /// Control Unix socket path.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Address (host:port) to put in Bolt ROUTE answers; default: the address the client connected to.
    #[arg(long)]
    advertised: Option<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    run_server(SimConfig {
        name: args.name,
        http: args.http,
        bolt: args.bolt,
        role: args.role,
        auth: args.auth,
        control: args.control,
        advertised: args.advertised,
    })
    .await
}
