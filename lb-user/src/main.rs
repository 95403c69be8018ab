//! `lb`: an XDP load balancer for Neo4j clusters. See `lb --help`.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use lb_user::{capture, dataplane::AttachMode, run, status};

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
    /// Examples:
    ///   lb run --config lb.toml --iface eth0                (one-armed)
    ///   lb run --config lb.toml --iface eth0 --iface eth1   (clients on eth0, backends on eth1)
    ///
    /// Stopping lb leaves the data path pinned and forwarding (sets frozen); a new `lb run`
    /// adopts it, `lb detach` removes it. The configuration's keys (services, checks, maxconn,
    /// timeouts, [admin], connection_log) are described in README.md; `lb import-haproxy`
    /// writes one from a HAProxy configuration.
    #[command(verbatim_doc_comment)]
    Run {
        /// TOML configuration (services, backends, SNAT ports, timeouts).
        #[arg(
            long,
            short,
            required_unless_present = "haproxy_config",
            conflicts_with = "haproxy_config"
        )]
        config: Option<PathBuf>,
        /// Run from HAProxy configuration files instead (as `lb import-haproxy` translates them;
        /// `bind *:PORT` serves the port on the first IPv4 address of the first --iface).
        #[arg(long = "haproxy-config", num_args = 1.., value_name = "FILE")]
        haproxy_config: Vec<PathBuf>,
        /// Interface to attach to; repeat for a two-armed setup. The first one gets the VIPs.
        #[arg(long = "iface", short, required = true)]
        ifaces: Vec<String>,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
        xdp_mode: AttachMode,
        /// Instance name (pins under /sys/fs/bpf/lb/<instance>/); overrides the config's.
        #[arg(long)]
        instance: Option<String>,
        /// Load this XDP object instead of the one built into lb (a custom or test build of
        /// lb-ebpf from the same lb version: its maps must have this build's layout). A running
        /// instance is upgraded to it atomically through its pinned link.
        #[arg(long, value_name = "FILE")]
        xdp_object: Option<PathBuf>,
        /// SNAT source ports, FIRST-LAST (overrides the configuration's `snat_ports`; the way to
        /// choose them with --haproxy-config). lb reserves them (net.ipv4.ip_local_reserved_ports),
        /// so they may lie inside the host's ephemeral range; default 10000-32767.
        #[arg(long, value_name = "FIRST-LAST", value_parser = lb_user::config::parse_port_range)]
        snat_ports: Option<(u16, u16)>,
    },
    /// Translate HAProxy configuration files (the Neo4j manual's haproxy.cfg) into lb's TOML.
    ///
    /// Prints the TOML on stdout and every note, warning and error as FILE:LINE: ... on stderr;
    /// lines lb does not understand are never dropped silently. Credentials found in check
    /// lines are written to 0600 files in --password-dir and never printed.
    ///
    /// Example: lb import-haproxy /etc/haproxy/haproxy.cfg --vip 192.0.2.10 > lb.toml
    ImportHaproxy {
        /// HAProxy configuration files, read in order like `haproxy -f A -f B`.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// The VIP of every service (`bind *:PORT` otherwise gets a placeholder address).
        #[arg(long, value_name = "ADDR")]
        vip: Option<std::net::Ipv4Addr>,
        /// Keep HAProxy's round robin for role backends lb would import as exclusive (master).
        #[arg(long)]
        faithful: bool,
        /// Fail on warnings too (any line lb does not map exactly).
        #[arg(long)]
        strict: bool,
        /// Where to write credentials found in check lines (default: the current directory).
        #[arg(long, value_name = "DIR")]
        password_dir: Option<PathBuf>,
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
    /// Write sampled frames of one service to a pcap file, as they arrived and as they left
    /// (after the NAT rewrite): tcpdump does not see the frames XDP sends with TX/REDIRECT.
    ///
    /// Runs until --count frames are written, --duration passed, or Ctrl-C/SIGTERM; then
    /// turns capture off and prints "captured N frames (M lost)". A FILE ending in .pcapng also
    /// marks each frame inbound (as it arrived) or outbound (as it left).
    ///
    /// Example: lb capture --instance neo4j --service write -w write.pcap --count 100 --sample 1/10
    Capture {
        #[arg(long, default_value = "default")]
        instance: String,
        /// Service name, as in the configuration.
        #[arg(long)]
        service: String,
        /// Output file (pcap; pcapng if it ends in .pcapng).
        #[arg(short = 'w', long = "write", value_name = "FILE")]
        file: PathBuf,
        /// Stop after this many frames.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// Stop after this long (e.g. 30s, 5m).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// Capture one packet in N (1/N or N); both copies of a sampled packet are written.
        #[arg(long, default_value = "1/1", value_parser = capture::parse_sample, value_name = "1/N")]
        sample: u32,
        /// Bytes of each frame to keep.
        #[arg(long, default_value_t = lb_common::CAPTURE_MAX_SNAPLEN, value_parser = capture::parse_snaplen)]
        snaplen: u32,
        /// Which copies to write.
        #[arg(long, value_enum, default_value_t = capture::Direction::Both)]
        direction: capture::Direction,
        /// Take over from another capture of the instance (or one killed before it cleaned up).
        #[arg(long)]
        force: bool,
    },
    /// Stop an instance's data path: unpin its XDP links and maps (dropping its connections) and
    /// restore the host settings its agents changed. `lb run` leaves them in place on exit so
    /// that traffic keeps flowing while the agent restarts or upgrades.
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // Fault injection for tests (a build with the `failpoints` feature, FAILPOINTS set); a
    // no-op otherwise.
    let _faults = fail::FailScenario::setup();
    match cli.cmd {
        Cmd::Run {
            config,
            haproxy_config,
            ifaces,
            xdp_mode,
            instance,
            xdp_object,
            snat_ports,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run::run(run::RunArgs {
                config: config.unwrap_or_default(),
                haproxy: haproxy_config,
                ifaces,
                xdp_mode,
                instance,
                xdp_object,
                snat_ports,
            }))
        }
        Cmd::ImportHaproxy {
            files,
            vip,
            faithful,
            strict,
            password_dir,
        } => import_haproxy(&files, vip, faithful, strict, password_dir.as_deref()),
        Cmd::Status { instance, json } => {
            let mut s = status::snapshot(&instance)?;
            match status::census(&instance) {
                Ok(t) => s.tables = Some(t),
                Err(e) => eprintln!("lb status: connection tables unavailable: {e:#}"),
            }
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
        Cmd::Capture {
            instance,
            service,
            file,
            count,
            duration,
            sample,
            snaplen,
            direction,
            force,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let s = rt.block_on(capture::run(capture::Options {
                instance,
                service,
                file,
                count,
                duration,
                sample,
                snaplen,
                direction,
                force,
            }))?;
            eprintln!("captured {} frames ({} lost)", s.frames, s.lost);
            Ok(())
        }
        Cmd::Detach { instance } => lb_user::run::detach(&instance),
    }
}

/// `lb import-haproxy`: TOML on stdout, diagnostics on stderr, password files written only when
/// the import succeeds.
fn import_haproxy(
    files: &[PathBuf],
    vip: Option<std::net::Ipv4Addr>,
    faithful: bool,
    strict: bool,
    password_dir: Option<&std::path::Path>,
) -> Result<()> {
    use lb_user::haproxy;
    let opts = haproxy::Options {
        vip,
        wildcard_vip: None,
        faithful,
        password_dir: haproxy::default_password_dir(password_dir)?,
    };
    let imp = haproxy::import_paths(files, &opts)?;
    for d in &imp.diags {
        eprintln!("{d}");
    }
    let n = imp.failures(strict);
    if n > 0 {
        let what = if strict {
            "error(s) or warning(s) (--strict)"
        } else {
            "error(s)"
        };
        anyhow::bail!("{n} {what} in the HAProxy configuration; no lb configuration written");
    }
    for s in &imp.secrets {
        s.write()?;
    }
    print!("{}", imp.toml);
    Ok(())
}
