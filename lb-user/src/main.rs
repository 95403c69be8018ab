//! `lb`: an XDP load balancer for Neo4j clusters. See `lb --help`.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
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
    ///   lb run --config /etc/lb/neo4j.toml                  (interfaces from its ifaces = [...])
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
        /// Without --iface, the configuration's `ifaces = ["eth0", ...]` (same order).
        #[arg(long = "iface", short, required_unless_present = "config")]
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
        /// With --haproxy-config: keep HAProxy's behaviour for role backends lb would import as
        /// an exclusive role (round robin, drain), as `lb import-haproxy --faithful` does.
        /// Without it, the old master's connections are reset when the role moves.
        #[arg(long, requires = "haproxy_config")]
        faithful: bool,
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
    /// Whether this balancer can serve, as the exit code: 0 when the agent runs, the XDP
    /// program is attached to every interface, the data path is configured and every service
    /// has a backend in its set; 1 otherwise, with what failed.
    ///
    /// For keepalived (`track_script { chk_lb }` with `script "lb health --instance NAME
    /// --quiet"`) and for monitoring. Reads only; changes nothing.
    Health {
        #[arg(long, default_value = "default")]
        instance: String,
        /// Print nothing; the exit code says it.
        #[arg(long)]
        quiet: bool,
    },
    /// A pair of lb hosts for the same VIPs (keepalived moves the addresses; the agents sync
    /// their flows, see README "A pair with keepalived").
    Pair {
        #[command(subcommand)]
        cmd: PairCmd,
    },
}

#[derive(Subcommand)]
enum PairCmd {
    /// keepalived's notify hook (the configuration keepalived-config prints calls it): records
    /// the VRRP state keepalived gives this host, which lb status and the dashboard show.
    /// keepalived appends TYPE NAME STATE [PRIORITY].
    Notify {
        #[arg(long, default_value = "default")]
        instance: String,
        /// What keepalived appends: TYPE NAME STATE [PRIORITY].
        #[arg(num_args = 0.., trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Print the keepalived.conf this host needs: one VRRP instance holding every VIP and the
    /// floating snat_address, its priority lowered by `lb health` while this host cannot serve
    /// or lacks its peer's flows.
    ///
    /// Example: lb pair keepalived-config --config /etc/lb/neo4j.toml --iface eth0 --priority 100
    /// (two-armed: --iface eth0 --iface eth1, the VIPs on eth0, snat_address on eth1)
    ///          (the other host: --priority 90) > /etc/keepalived/keepalived.conf
    #[command(verbatim_doc_comment)]
    KeepalivedConfig {
        #[arg(long)]
        config: PathBuf,
        /// lb run's interfaces, in its order (repeat the flag): VRRP runs on the first and the
        /// VIPs go there; the snat_address goes on the last (the backends' side when there
        /// are two).
        #[arg(long, required = true)]
        iface: Vec<String>,
        /// This host's priority; give the other host one less than 20 below or above.
        #[arg(long, default_value_t = 100)]
        priority: u8,
        #[arg(long, default_value_t = 51)]
        router_id: u8,
        /// Seconds between VRRP adverts (0.2 for a sub-second takeover).
        #[arg(long, default_value_t = 1.0)]
        advert_int: f64,
    },
}

fn main() -> std::process::ExitCode {
    let style = init_logging();
    match cli_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if style == LogStyle::Journald {
                // One entry at error priority, causes included: `journalctl -p err -u lb@NAME`
                // shows why the agent stopped.
                eprintln!("<3>Error: {e:#}");
            } else {
                // As `fn main() -> Result` prints it.
                eprintln!("Error: {e:?}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn cli_main() -> Result<()> {
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
            faithful,
        } => {
            let ifaces = run_ifaces(ifaces, config.as_deref())?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run::run(run::RunArgs {
                config: config.unwrap_or_default(),
                haproxy: haproxy_config,
                faithful,
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
        Cmd::Pair {
            cmd: PairCmd::Notify { instance, args },
        } => {
            let state = args
                .get(2)
                .context("expected what keepalived's notify passes: TYPE NAME STATE [PRIORITY]")?;
            lb_user::pair::record_vrrp_state(&instance, state)
        }
        Cmd::Pair {
            cmd:
                PairCmd::KeepalivedConfig {
                    config,
                    iface,
                    priority,
                    router_id,
                    advert_int,
                },
        } => {
            let cfg = lb_user::config::Config::load(&config)?;
            let lb = std::env::current_exe().context("the path of this lb binary")?;
            print!(
                "{}",
                lb_user::pair::keepalived::config(
                    &cfg,
                    &lb_user::pair::keepalived::Options {
                        ifaces: &iface,
                        priority,
                        router_id,
                        advert_int,
                        lb: &lb,
                    },
                )?
            );
            Ok(())
        }
        Cmd::Health { instance, quiet } => {
            let findings = lb_user::readiness::assess(&instance);
            if !quiet {
                for f in &findings {
                    println!("{} {}", if f.ok { "ok  " } else { "FAIL" }, f.what);
                }
            }
            if findings.iter().all(|f| f.ok) {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
    }
}

/// The interfaces `lb run` attaches to: `--iface` when given (it overrides the file, like
/// `--instance`), else the configuration's top-level `ifaces = [...]`, so that one file under
/// /etc/lb/ describes a whole instance (what the packaged `lb@.service` runs).
fn run_ifaces(cli: Vec<String>, config: Option<&Path>) -> Result<Vec<String>> {
    if !cli.is_empty() {
        return Ok(cli);
    }
    let Some(path) = config else {
        bail!("no --iface given: name the interface(s) clients and backends are reached on, e.g. --iface eth0");
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the configuration {}", path.display()))?;
    config_ifaces(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// The `ifaces` key of a configuration's text (the rest is `Config::load`'s to read).
fn config_ifaces(text: &str) -> std::result::Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct IfacesKey {
        #[serde(default)]
        ifaces: Vec<String>,
    }
    let key: IfacesKey = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
    if key.ifaces.is_empty() {
        return Err(
            "no interfaces to attach to: add `ifaces = [\"eth0\"]` (clients first, \
                    backends second for a two-armed setup) or pass --iface"
                .into(),
        );
    }
    if let Some(bad) = key.ifaces.iter().find(|i| i.trim().is_empty()) {
        return Err(format!("ifaces: {bad:?} is not an interface name"));
    }
    Ok(key.ifaces)
}

/// How the log lines look on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogStyle {
    /// A terminal or a file: our own timestamp; colours only on a terminal.
    Plain { ansi: bool },
    /// stderr is journald's stream (systemd): no colours, no timestamp of ours (the journal
    /// stamps each line), and a `<N>` syslog priority prefix, which journald turns into the
    /// entry's priority (`journalctl -p warning`); the level and target stay in the text.
    Journald,
}

/// systemd sets `JOURNAL_STREAM=DEV:INODE` for a service whose stderr goes to the journal; it
/// is inherited by children whose stderr goes elsewhere, so it counts only when it names our
/// stderr (`stderr_id`, from fstat). A plain "stderr is no TTY" would also strip the timestamps
/// of `lb run 2>lb.log`.
fn log_style(journal_stream: Option<&str>, stderr_id: Option<(u64, u64)>, tty: bool) -> LogStyle {
    let journal = journal_stream.and_then(|v| {
        let (dev, ino) = v.trim().split_once(':')?;
        Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?))
    });
    match (journal, stderr_id) {
        (Some(j), Some(e)) if j == e => LogStyle::Journald,
        _ => LogStyle::Plain { ansi: tty },
    }
}

/// Prefixes each line with its syslog priority (`<3>` error ... `<7>` debug) for journald.
struct SyslogPriority<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for SyslogPriority<F>
where
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            tracing::Level::DEBUG | tracing::Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// The `tracing` output on stderr, `RUST_LOG` filtered (default info), styled by [`log_style`]
/// (returned).
fn init_logging() -> LogStyle {
    use std::io::IsTerminal;
    use std::os::fd::AsRawFd;
    let stderr_id = nix::sys::stat::fstat(std::io::stderr().as_raw_fd())
        .ok()
        .map(|st| (st.st_dev, st.st_ino));
    let journal_stream = std::env::var("JOURNAL_STREAM").ok();
    let style = log_style(
        journal_stream.as_deref(),
        stderr_id,
        std::io::stderr().is_terminal(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match style {
        LogStyle::Plain { ansi } => builder.with_ansi(ansi).init(),
        LogStyle::Journald => builder
            .with_ansi(false)
            .event_format(journald_format())
            .init(),
    }
    style
}

/// The line format under journald: `<4> WARN lb::health: message key=value`.
fn journald_format() -> SyslogPriority<
    tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Full, ()>,
> {
    SyslogPriority(
        tracing_subscriber::fmt::format()
            .without_time()
            .with_ansi(false),
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn journald_style_only_when_journal_stream_names_our_stderr() {
        let journal = Some("8:12345");
        assert_eq!(
            log_style(journal, Some((8, 12345)), false),
            LogStyle::Journald
        );
        // Inherited by a child whose stderr is a file or a terminal: not the journal's.
        assert_eq!(
            log_style(journal, Some((8, 999)), false),
            LogStyle::Plain { ansi: false }
        );
        assert_eq!(
            log_style(journal, Some((8, 999)), true),
            LogStyle::Plain { ansi: true }
        );
        assert_eq!(
            log_style(None, Some((8, 12345)), false),
            LogStyle::Plain { ansi: false }
        );
        assert_eq!(
            log_style(Some("garbage"), Some((8, 12345)), true),
            LogStyle::Plain { ansi: true }
        );
        assert_eq!(
            log_style(journal, None, false),
            LogStyle::Plain { ansi: false }
        );
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn journald_lines_carry_priority_level_and_target_but_no_time_or_colour() {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .event_format(journald_format())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "lb::run", "attach failed");
            tracing::warn!(target: "lb::health", backend = "db01", "down");
            tracing::info!(target: "lb::conn", "closed");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "<3>ERROR lb::run: attach failed\n\
             <4> WARN lb::health: down backend=\"db01\"\n\
             <6> INFO lb::conn: closed\n"
        );
    }

    #[test]
    fn interfaces_come_from_iface_first_then_the_configuration() {
        let dir = std::env::temp_dir().join(format!("lb-ifaces-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("neo4j.toml");
        std::fs::write(
            &path,
            "instance = \"neo4j\"\nifaces = [\"eth0\", \"eth1\"]\n",
        )
        .unwrap();
        let from_file = run_ifaces(vec![], Some(&path));
        let overridden = run_ifaces(vec!["eth2".into()], Some(&path));
        let missing = run_ifaces(vec![], Some(&dir.join("absent.toml")));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(from_file.unwrap(), ["eth0", "eth1"]);
        assert_eq!(overridden.unwrap(), ["eth2"]);
        assert!(format!("{:#}", missing.unwrap_err()).contains("absent.toml"));
        assert!(run_ifaces(vec![], None)
            .unwrap_err()
            .to_string()
            .contains("no --iface given"));
    }

    #[test]
    fn a_configuration_without_interfaces_says_how_to_name_them() {
        let e = config_ifaces("instance = \"neo4j\"\n").unwrap_err();
        assert!(
            e.starts_with("no interfaces to attach to: add `ifaces = [\"eth0\"]`"),
            "{e}"
        );
        let e = config_ifaces("ifaces = \"eth0\"\n").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        let e = config_ifaces("ifaces = [\"\"]\n").unwrap_err();
        assert_eq!(e, "ifaces: \"\" is not an interface name");
    }
}
