//! The TOML configuration: model, defaults and validation. Every error names the file, the
//! line and what is wrong.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::health::spec::{preset, BasicAuth, CheckSpec, RawCheck, PRESET_NAMES};
use serde::Deserialize;
use toml::Spanned;

/// Default SNAT port range: below Linux's default ephemeral range (32768-60999).
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (10000, 32767);
/// `[timeouts] connect`: how long a handshake may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// `[timeouts] idle`: how long an established flow may be quiet.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(2 * 3600);
/// `[timeouts] close`: how long a closed flow stays after its last segment.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// `rst_per_sec`: RSTs the data path may generate per second and CPU.
pub const DEFAULT_RST_PER_SEC: u32 = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    instance: Option<Spanned<String>>,
    snat_ports: Option<Spanned<String>>,
    snat_address: Option<Spanned<String>>,
    vip_mode: Option<Spanned<String>>,
    #[serde(default)]
    debug: bool,
    rst_per_sec: Option<u32>,
    maxconn: Option<Spanned<u32>>,
    connection_log: Option<Spanned<PathBuf>>,
    /// Interfaces for `lb run` when no --iface is given; main.rs reads them (`run_ifaces`).
    #[serde(default)]
    #[allow(dead_code)]
    ifaces: Vec<String>,
    #[serde(default, rename = "check")]
    checks: Vec<Spanned<RawCheck>>,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    tables: RawTables,
    #[serde(default, rename = "backend")]
    backends: Vec<RawBackend>,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
    admin: Option<Spanned<RawAdmin>>,
    pair: Option<Spanned<RawPair>>,
}

/// `[pair]`: this node is one of two lb nodes for the same VIPs (keepalived moves the
/// addresses); its established flows are streamed to the other.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPair {
    peer: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
    secret_file: Option<Spanned<PathBuf>>,
}

/// `[admin]`: the admin HTTP server (dashboard, /stats.json, ;csv, /metrics), like HAProxy's
/// `listen admin` with `stats enable`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
    operations: Option<Spanned<bool>>,
    user: Option<Spanned<String>>,
    password_file: Option<Spanned<PathBuf>>,
    password_env: Option<Spanned<String>>,
    refresh: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect: Option<Spanned<String>>,
    idle: Option<Spanned<String>>,
    close: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTables {
    embryonic: Option<u32>,
    established: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Spanned<String>,
    address: Spanned<String>,
    check_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    vip: Spanned<String>,
    backend_port: Spanned<u16>,
    backends: Spanned<Vec<String>>,
    check: Option<Spanned<String>>,
    balance: Option<Spanned<String>>,
    on_down: Option<Spanned<String>>,
    syn_hold: Option<Spanned<String>>,
    fallback: Option<Spanned<String>>,
    backend_maxconn: Option<Spanned<u32>>,
    on_maxconn: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
}

/// How a VIP reaches this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VipMode {
    /// The VIP is an address of an attached interface; lb adds it if missing.
    Local,
    /// Traffic for the VIP is routed to this host; lb adds no address.
    Routed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The backend's id in the data path (counters, reset epochs, slots, flows): its position
    /// in the file for a new instance, the one its name had for an adopted one (`ids`).
    pub id: u32,
    pub name: String,
    pub address: Ipv4Addr,
    /// Port of the HTTP role endpoints (Neo4j: 7474).
    pub check_port: u16,
}

/// How a service spreads new connections over its set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    First,
    RoundRobin,
    Maglev,
}

impl Balance {
    pub fn flags(self) -> u32 {
        match self {
            Balance::First => lb_common::BALANCE_FIRST,
            Balance::RoundRobin => lb_common::BALANCE_ROUNDROBIN,
            Balance::Maglev => lb_common::BALANCE_MAGLEV,
        }
    }
}

/// The default `syn_hold` of an exclusive role: as long as a candidate needs to rise
/// (`rise` answers at `fastinter`, the last one within `timeout`), at least 1 s (the client's
/// first SYN retransmit).
pub fn default_syn_hold(c: &CheckSpec) -> Duration {
    (c.fastinter * c.rise + c.timeout).max(Duration::from_secs(1))
}

/// What happens to a backend's flows when it leaves a service's set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDown {
    /// Reset them (on their next segment) after a definitive negative answer or a replacement.
    Reset,
    /// Let them finish.
    Drain,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// The service's id in the data path (`SERVICES`, its backend-set slot, counters, flows):
    /// its position in the file for a new instance, the one its name had for an adopted one
    /// (`ids`). Everything else in the agent indexes services by position.
    pub id: u32,
    pub name: String,
    pub vip: SocketAddrV4,
    pub backend_port: u16,
    /// Indexes into [`Config::backends`].
    pub backends: Vec<usize>,
    /// The role check; `None`: every configured backend is always in the set.
    pub check: Option<Arc<CheckSpec>>,
    pub balance: Balance,
    pub on_down: OnDown,
    /// At most one member (the role holder), from the check.
    pub exclusive: bool,
    /// How long, at most, new SYNs are held (dropped, for the client's retransmit) while an
    /// exclusive role has no member and its candidates are checked at `fastinter`; zero for
    /// other services and with `syn_hold = "0s"` (refused at once, as before).
    pub syn_hold: Duration,
    /// Index of the service whose set to use when none of ours is healthy.
    pub fallback: Option<usize>,
    /// Most connections this service holds to each of its backends (HAProxy's
    /// `server ... maxconn`); 0: no limit.
    pub backend_maxconn: u32,
    /// Answer a SYN over a limit with a RST instead of dropping it.
    pub maxconn_reset: bool,
    /// This service's idle timeout (HAProxy's `timeout client/server`); `None`: the global one.
    pub idle_timeout: Option<Duration>,
}

/// Default address of the admin server (HAProxy's `listen admin` in the manual uses 8080).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8080";

/// The admin HTTP server's settings (`[admin]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where to listen; `None`: `listen = "off"`, no admin server.
    pub listen: Option<SocketAddr>,
    /// Basic auth on every route, if set. `Debug` never shows the password.
    pub auth: Option<BasicAuth>,
    /// How often the dashboard refreshes itself.
    pub refresh: Duration,
    /// The operator API (`POST /api/server/NAME/drain|disable|enable`) is on (`operations =
    /// true`, HAProxy's `stats admin`); off, the server is read-only.
    pub operations: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_ADMIN_LISTEN.parse().ok(),
            auth: None,
            refresh: Duration::from_secs(2),
            operations: false,
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub instance: String,
    pub snat_ports: (u16, u16),
    /// `snat_address`: the source address of every new flow towards its backend, instead of
    /// the route's source. A pair's floating address (keepalived moves it with the VIPs), so
    /// that the backends' replies to the active's flows reach whichever node is active.
    pub snat_address: Option<Ipv4Addr>,
    pub vip_mode: VipMode,
    pub debug: bool,
    pub rst_per_sec: u32,
    /// Most connections all services hold together (HAProxy's global `maxconn`); 0: no limit.
    pub maxconn: u32,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a closed flow (FIN both ways, or a RST) stays in the table after its last
    /// segment (`[timeouts] close`, default 10 s).
    pub close_timeout: Duration,
    pub embryonic_entries: u32,
    pub established_entries: u32,
    /// `[tables] established` was given (else it follows the SNAT range and the backends).
    pub established_configured: bool,
    /// An XDP object to load instead of the built-in one (`lb run --xdp-object`).
    pub xdp_object: Option<PathBuf>,
    /// Append the connection log to this file instead of the agent's log.
    pub connection_log: Option<PathBuf>,
    pub backends: Vec<Backend>,
    pub services: Vec<Service>,
    pub admin: AdminConfig,
    /// `[pair]`, when this node is one of a pair.
    pub pair: Option<PairConfig>,
}

/// `[pair]`: where the other node's agent listens for this one's flows, and where this one
/// listens for the other's.
#[derive(Debug, Clone)]
pub struct PairConfig {
    pub peer: SocketAddrV4,
    pub listen: SocketAddrV4,
    /// The shared secret both streams prove at connect (`secret_file`, read at load); none:
    /// the streams are not authenticated.
    pub secret: Option<crate::pair::stream::Secret>,
}

/// Parses an SNAT port range `"FIRST-LAST"` (config key `snat_ports`, `lb run --snat-ports`).
pub fn parse_port_range(s: &str) -> std::result::Result<(u16, u16), String> {
    let bad = || {
        "expected \"FIRST-LAST\", e.g. \"10000-32767\", with 1024 <= FIRST <= LAST <= 65535"
            .to_string()
    };
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a < 1024 || a > b {
        return Err(bad());
    }
    Ok((a, b))
}

/// The established table's default size: room for every flow the SNAT ports allow (two
/// entries a flow, one port per backend), at least 1024 entries.
fn default_established(snat_ports: (u16, u16), backends: usize) -> u32 {
    let flows = (snat_ports.1 - snat_ports.0) as u64 + 1;
    let flows = flows * backends.max(1) as u64;
    (2 * flows).clamp(1024, 1 << 24) as u32
}

impl Config {
    /// Uses `ports` as the SNAT range (`lb run --snat-ports`); the established table's default
    /// size follows it unless `[tables] established` was given.
    pub fn set_snat_ports(&mut self, ports: (u16, u16)) {
        self.snat_ports = ports;
        if !self.established_configured {
            self.established_entries = default_established(ports, self.backends.len());
        }
    }
}

/// An error at a place in the file.
fn at(path: &Path, text: &str, span: Range<usize>, msg: impl std::fmt::Display) -> anyhow::Error {
    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
    anyhow::anyhow!("{}:{line}: {msg}", path.display())
}

fn parse_duration(path: &Path, text: &str, v: &Spanned<String>, what: &str) -> Result<Duration> {
    humantime::parse_duration(v.get_ref()).map_err(|e| {
        at(
            path,
            text,
            v.span(),
            format!("{what}: {e} (examples: \"30s\", \"2h\", \"500ms\")"),
        )
    })
}

/// The file being parsed: every error names it and the line (`err`).
#[derive(Clone, Copy)]
struct Src<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Src<'_> {
    /// An error at `span` of the file.
    fn err(self, span: Range<usize>, msg: impl std::fmt::Display) -> anyhow::Error {
        at(self.path, self.text, span, msg)
    }

    fn duration(self, v: &Spanned<String>, what: &str) -> Result<Duration> {
        parse_duration(self.path, self.text, v, what)
    }

    /// The TOML document, or the line of its first syntax error or unknown key.
    fn document(self) -> Result<RawConfig> {
        toml::from_str(self.text).map_err(|e| {
            let line = e.span().map(|s| {
                self.text[..s.start.min(self.text.len())]
                    .matches('\n')
                    .count()
                    + 1
            });
            match line {
                Some(l) => anyhow::anyhow!("{}:{l}: {}", self.path.display(), e.message()),
                None => anyhow::anyhow!("{}: {}", self.path.display(), e.message()),
            }
        })
    }
}

/// `instance`: names the pins, the admin socket and the logs of this balancer.
fn parse_instance(src: Src, v: Option<&Spanned<String>>) -> Result<String> {
    let Some(i) = v else {
        return Ok("default".to_string());
    };
    let s = i.get_ref();
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        return Err(src.err(i.span(), "instance: use 1-64 letters, digits, '-' or '_'"));
    }
    Ok(s.clone())
}

fn parse_snat_address(src: Src, v: &Spanned<String>) -> Result<Ipv4Addr> {
    match v.get_ref().parse::<Ipv4Addr>() {
        Ok(a) if !a.is_unspecified() && !a.is_broadcast() && !a.is_multicast() => Ok(a),
        _ => Err(src.err(
            v.span(),
            format!(
                "snat_address = {:?}: expected a unicast IPv4 address, e.g. \"10.0.1.100\"",
                v.get_ref()
            ),
        )),
    }
}

fn parse_snat_ports(src: Src, v: Option<&Spanned<String>>) -> Result<(u16, u16)> {
    match v {
        None => Ok(DEFAULT_SNAT_PORTS),
        Some(s) => parse_port_range(s.get_ref())
            .map_err(|e| src.err(s.span(), format!("snat_ports = {:?}: {e}", s.get_ref()))),
    }
}

fn parse_vip_mode(src: Src, v: Option<&Spanned<String>>) -> Result<VipMode> {
    match v.map(|v| (v.get_ref().as_str(), v.span())) {
        None | Some(("local", _)) => Ok(VipMode::Local),
        Some(("routed", _)) => Ok(VipMode::Routed),
        Some((other, span)) => Err(src.err(
            span,
            format!("vip_mode = {other:?}: expected \"local\" or \"routed\""),
        )),
    }
}

/// `[timeouts]`: connect, idle and close, each with its default.
fn parse_timeouts(src: Src, t: &RawTimeouts) -> Result<(Duration, Duration, Duration)> {
    let or = |v: &Option<Spanned<String>>, what: &str, default: Duration| match v {
        Some(v) => src.duration(v, what),
        None => Ok(default),
    };
    Ok((
        or(&t.connect, "timeouts.connect", DEFAULT_CONNECT_TIMEOUT)?,
        or(&t.idle, "timeouts.idle", DEFAULT_IDLE_TIMEOUT)?,
        or(&t.close, "timeouts.close", DEFAULT_CLOSE_TIMEOUT)?,
    ))
}

/// A limit that 0 would turn into a refusal of every connection (`maxconn`,
/// `backend_maxconn`); absent: 0, no limit.
fn parse_limit(src: Src, v: Option<&Spanned<u32>>, what: &str) -> Result<u32> {
    match v {
        Some(m) if *m.get_ref() == 0 => Err(src.err(
            m.span(),
            format!("{what} = 0 would refuse every connection; leave it out for no limit"),
        )),
        Some(m) => Ok(*m.get_ref()),
        None => Ok(0),
    }
}

/// `[[backend]]`s: unique names, IPv4 addresses; ids are positions (the agent maps them to
/// the ids an adopted instance already gave their names, `ids`).
fn parse_backends(src: Src, raw: &[RawBackend]) -> Result<Vec<Backend>> {
    let mut backends: Vec<Backend> = Vec::new();
    for b in raw {
        let name = b.name.get_ref().clone();
        if backends.iter().any(|k| k.name == name) {
            return Err(src.err(b.name.span(), format!("backend {name:?} is defined twice")));
        }
        let address: Ipv4Addr = b.address.get_ref().parse().map_err(|_| {
            src.err(
                b.address.span(),
                format!(
                    "backend {name:?}: address {:?} is not an IPv4 address",
                    b.address.get_ref()
                ),
            )
        })?;
        backends.push(Backend {
            id: backends.len() as u32,
            name,
            address,
            check_port: b.check_port.unwrap_or(7474),
        });
    }
    if backends.len() > lb_common::MAX_BACKENDS as usize {
        bail!(
            "{}: {} backends; at most {} are supported",
            src.path.display(),
            backends.len(),
            lb_common::MAX_BACKENDS
        );
    }
    Ok(backends)
}

/// `[[check]]`s: each resolved, none named twice or like a preset.
fn parse_checks(src: Src, raw: &[Spanned<RawCheck>]) -> Result<Vec<Arc<CheckSpec>>> {
    let mut checks: Vec<Arc<CheckSpec>> = Vec::new();
    for c in raw {
        let spec = c
            .get_ref()
            .resolve()
            .map_err(|e| src.err(c.span(), format!("[[check]]: {e}")))?;
        if checks.iter().any(|k| k.name == spec.name) || preset(&spec.name).is_some() {
            return Err(src.err(
                c.span(),
                format!(
                    "check {:?} is defined twice (or shadows a preset)",
                    spec.name
                ),
            ));
        }
        checks.push(Arc::new(spec));
    }
    Ok(checks)
}

/// `[[service]]`s: unique names and VIPs, each parsed by [`parse_service`], then their
/// fallbacks resolved by name.
fn parse_services(
    src: Src,
    raw: &RawConfig,
    backends: &[Backend],
    checks: &[Arc<CheckSpec>],
) -> Result<Vec<Service>> {
    let mut services: Vec<Service> = Vec::new();
    for s in &raw.services {
        let name = s.name.get_ref();
        if services.iter().any(|k| &k.name == name) {
            return Err(src.err(s.name.span(), format!("service {name:?} is defined twice")));
        }
        let vip = service_vip(src, name, &s.vip)?;
        if services.iter().any(|k| k.vip == vip) {
            return Err(src.err(
                s.vip.span(),
                format!("service {name:?}: vip {vip} is used by another service"),
            ));
        }
        let service = parse_service(src, s, services.len() as u32, vip, backends, checks, raw)?;
        services.push(service);
    }
    for (i, s) in raw.services.iter().enumerate() {
        if let Some(f) = &s.fallback {
            let j = services.iter().position(|x| &x.name == f.get_ref()).ok_or_else(|| {
                src.err(f.span(), format!("service {:?}: fallback {:?} is not a service name (e.g. fallback = \"write\" sends reads to the master when no slave is healthy)", s.name.get_ref(), f.get_ref()))
            })?;
            if j == i {
                return Err(src.err(f.span(), "a service cannot fall back to itself"));
            }
            services[i].fallback = Some(j);
        }
    }
    if services.is_empty() {
        bail!(
            "{}: no [[service]] defined; lb has nothing to balance",
            src.path.display()
        );
    }
    if services.len() > lb_common::MAX_SERVICES as usize {
        bail!(
            "{}: {} services; at most {} are supported",
            src.path.display(),
            services.len(),
            lb_common::MAX_SERVICES
        );
    }
    Ok(services)
}

/// A service's `vip`, IPV4:PORT.
fn service_vip(src: Src, name: &str, v: &Spanned<String>) -> Result<SocketAddrV4> {
    v.get_ref().parse().map_err(|_| {
        src.err(
            v.span(),
            format!(
                "service {name:?}: vip {:?} is not IPV4:PORT, e.g. \"192.0.2.10:7680\"",
                v.get_ref()
            ),
        )
    })
}

/// One `[[service]]` at `vip` (its fallback is resolved by [`parse_services`]). Its keys are
/// checked in the order of the first error a user meets: the backend port, the members, the
/// check, then the settings that depend on the check's role.
fn parse_service(
    src: Src,
    s: &RawService,
    id: u32,
    vip: SocketAddrV4,
    backends: &[Backend],
    checks: &[Arc<CheckSpec>],
    raw: &RawConfig,
) -> Result<Service> {
    let name = s.name.get_ref().clone();
    if *s.backend_port.get_ref() == 0 {
        return Err(src.err(
            s.backend_port.span(),
            format!("service {name:?}: backend_port must be 1-65535"),
        ));
    }
    let members = service_members(src, &name, &s.backends, backends)?;
    let check = service_check(src, &name, s.check.as_ref(), checks)?;
    let exclusive = check.as_ref().is_some_and(|c| c.exclusive);
    let balance = service_balance(src, &name, s.balance.as_ref(), exclusive)?;
    let on_down = service_on_down(src, &name, s.on_down.as_ref(), exclusive)?;
    let syn_hold = service_syn_hold(src, &name, s.syn_hold.as_ref(), check.as_deref())?;
    let maxconn_reset = service_on_maxconn(src, &name, s.on_maxconn.as_ref())?;
    let backend_maxconn = parse_limit(
        src,
        s.backend_maxconn.as_ref(),
        &format!("service {name:?}: backend_maxconn"),
    )?;
    if let (Some(o), None, None) = (&s.on_maxconn, &s.backend_maxconn, &raw.maxconn) {
        return Err(src.err(o.span(), format!("service {name:?}: on_maxconn has no effect without backend_maxconn here or a global maxconn")));
    }
    let idle_timeout = service_idle_timeout(src, &name, s.idle_timeout.as_ref())?;
    Ok(Service {
        id,
        name,
        vip,
        backend_port: *s.backend_port.get_ref(),
        backends: members,
        check,
        balance,
        on_down,
        exclusive,
        syn_hold,
        fallback: None,
        backend_maxconn,
        maxconn_reset,
        idle_timeout,
    })
}

/// A service's `backends`: positions in `backends`, each once, at most `MAX_SET_SIZE`.
fn service_members(
    src: Src,
    name: &str,
    v: &Spanned<Vec<String>>,
    backends: &[Backend],
) -> Result<Vec<usize>> {
    let mut idx = Vec::new();
    for bn in v.get_ref() {
        let i = backends.iter().position(|b| &b.name == bn).ok_or_else(|| {
            let known: Vec<_> = backends.iter().map(|b| b.name.as_str()).collect();
            src.err(
                v.span(),
                format!(
                    "service {name:?}: unknown backend {bn:?} (defined: {})",
                    known.join(", ")
                ),
            )
        })?;
        if !idx.contains(&i) {
            idx.push(i);
        }
    }
    if idx.len() > lb_common::MAX_SET_SIZE {
        return Err(src.err(
            v.span(),
            format!(
                "service {name:?}: at most {} backends per service",
                lb_common::MAX_SET_SIZE
            ),
        ));
    }
    Ok(idx)
}

/// A service's `check`: a `[[check]]` by name, else a preset.
fn service_check(
    src: Src,
    name: &str,
    v: Option<&Spanned<String>>,
    checks: &[Arc<CheckSpec>],
) -> Result<Option<Arc<CheckSpec>>> {
    let Some(c) = v else {
        return Ok(None);
    };
    if let Some(k) = checks.iter().find(|k| &k.name == c.get_ref()) {
        return Ok(Some(k.clone()));
    }
    let spec = preset(c.get_ref()).ok_or_else(|| {
        let mut known: Vec<&str> = PRESET_NAMES.to_vec();
        known.extend(checks.iter().map(|k| k.name.as_str()));
        src.err(
            c.span(),
            format!(
                "service {name:?}: unknown check {:?} (presets and [[check]] names: {})",
                c.get_ref(),
                known.join(", ")
            ),
        )
    })?;
    Ok(Some(Arc::new(spec)))
}

/// `balance`; default `first` for an exclusive role (the master), else `roundrobin`.
fn service_balance(
    src: Src,
    name: &str,
    v: Option<&Spanned<String>>,
    exclusive: bool,
) -> Result<Balance> {
    match v.map(|b| (b.get_ref().as_str(), b.span())) {
        None if exclusive => Ok(Balance::First),
        None => Ok(Balance::RoundRobin),
        Some(("first", _)) => Ok(Balance::First),
        Some(("roundrobin", _)) => Ok(Balance::RoundRobin),
        Some(("maglev", _)) => Ok(Balance::Maglev),
        Some((other, span)) => Err(src.err(
            span,
            format!("service {name:?}: balance = {other:?}: expected \"first\", \"roundrobin\" or \"maglev\""),
        )),
    }
}

/// `on_down`; default `reset` for an exclusive role (a demoted master's writes must end),
/// else `drain`.
fn service_on_down(
    src: Src,
    name: &str,
    v: Option<&Spanned<String>>,
    exclusive: bool,
) -> Result<OnDown> {
    match v.map(|b| (b.get_ref().as_str(), b.span())) {
        None if exclusive => Ok(OnDown::Reset),
        None => Ok(OnDown::Drain),
        Some(("reset", _)) => Ok(OnDown::Reset),
        Some(("drain", _)) => Ok(OnDown::Drain),
        Some((other, span)) => Err(src.err(
            span,
            format!("service {name:?}: on_down = {other:?}: expected \"reset\" or \"drain\""),
        )),
    }
}

/// `syn_hold`: only for an exclusive role check, where it defaults to a candidate's rise.
fn service_syn_hold(
    src: Src,
    name: &str,
    v: Option<&Spanned<String>>,
    check: Option<&CheckSpec>,
) -> Result<Duration> {
    match (v, check) {
        (Some(v), Some(c)) if c.exclusive => src.duration(v, &format!("service {name:?}: syn_hold")),
        (Some(v), _) => Err(src.err(v.span(), format!("service {name:?}: syn_hold applies only to a service with an exclusive role check (e.g. check = \"master\"): other services keep their set while a member changes"))),
        (None, Some(c)) if c.exclusive => Ok(default_syn_hold(c)),
        (None, _) => Ok(Duration::ZERO),
    }
}

/// `on_maxconn`: whether a SYN over a limit gets a RST (`reset`) instead of being dropped.
fn service_on_maxconn(src: Src, name: &str, v: Option<&Spanned<String>>) -> Result<bool> {
    match v.map(|b| (b.get_ref().as_str(), b.span())) {
        None | Some(("drop", _)) => Ok(false),
        Some(("reset", _)) => Ok(true),
        Some((other, span)) => Err(src.err(span, format!("service {name:?}: on_maxconn = {other:?}: expected \"drop\" (default: the client's SYN retransmit waits for a free slot) or \"reset\""))),
    }
}

/// A service's own `idle_timeout` (positive), or `None` for the global one.
fn service_idle_timeout(
    src: Src,
    name: &str,
    v: Option<&Spanned<String>>,
) -> Result<Option<Duration>> {
    let Some(v) = v else {
        return Ok(None);
    };
    let d = src.duration(v, &format!("service {name:?}: idle_timeout"))?;
    if d.is_zero() {
        return Err(src.err(
            v.span(),
            format!("service {name:?}: idle_timeout must be positive"),
        ));
    }
    Ok(Some(d))
}

/// `connection_log`: a file in an existing directory.
fn parse_connection_log(src: Src, v: Option<&Spanned<PathBuf>>) -> Result<Option<PathBuf>> {
    let Some(p) = v else {
        return Ok(None);
    };
    let file = p.get_ref();
    if file.as_os_str().is_empty() || file.is_dir() {
        return Err(src.err(
            p.span(),
            format!(
                "connection_log = {:?}: name a file, e.g. \"/var/log/lb/connections.log\"",
                file.display().to_string()
            ),
        ));
    }
    if let Some(d) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !d.is_dir() {
            return Err(src.err(
                p.span(),
                format!("connection_log: directory {} does not exist", d.display()),
            ));
        }
    }
    Ok(Some(file.clone()))
}

/// Validates `[pair]`: `peer` is required; `listen` defaults to every address on the peer's
/// port; `secret_file` (optional) is read now.
fn parse_pair(src: Src, p: &Spanned<RawPair>) -> Result<PairConfig> {
    let addr = |v: &Spanned<String>, key: &str| {
        v.get_ref().parse::<SocketAddrV4>().map_err(|_| {
            src.err(
                v.span(),
                format!(
                    "{key} = {:?}: expected an IPv4 ADDRESS:PORT, e.g. \"10.0.2.2:7690\"",
                    v.get_ref()
                ),
            )
        })
    };
    let Some(peer) = &p.get_ref().peer else {
        return Err(src.err(
            p.span(),
            "[pair] needs peer = \"ADDRESS:PORT\": where the other node's agent listens",
        ));
    };
    let peer = addr(peer, "peer")?;
    let listen = match &p.get_ref().listen {
        Some(l) => addr(l, "listen")?,
        None => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, peer.port()),
    };
    let secret = match &p.get_ref().secret_file {
        None => None,
        Some(f) => {
            // The secret itself never appears in an error.
            let bytes = std::fs::read(f.get_ref()).map_err(|e| {
                src.err(
                    f.span(),
                    format!("secret_file {}: {e}", f.get_ref().display()),
                )
            })?;
            let trimmed = bytes.trim_ascii();
            if trimmed.is_empty() {
                return Err(src.err(
                    f.span(),
                    format!("secret_file {} is empty", f.get_ref().display()),
                ));
            }
            Some(crate::pair::stream::Secret::new(trimmed.to_vec()))
        }
    };
    Ok(PairConfig {
        peer,
        listen,
        secret,
    })
}

/// Validates `[admin]` and reads its password (the password never appears in an error). The
/// operator API needs authentication unless the server listens on loopback only.
fn parse_admin(path: &Path, text: &str, a: &Spanned<RawAdmin>) -> Result<AdminConfig> {
    let mut out = parse_admin_access(path, text, a)?;
    if let Some(ops) = &a.get_ref().operations {
        out.operations = *ops.get_ref();
        let exposed = out.listen.is_some_and(|l| !l.ip().is_loopback());
        if out.operations && exposed && out.auth.is_none() {
            return Err(at(
                path,
                text,
                ops.span(),
                format!(
                    "[admin] operations = true on {} without authentication: anyone who reaches that \
                     address could disable backends. Add user + password_file, or listen on 127.0.0.1",
                    out.listen.map(|l| l.to_string()).unwrap_or_default()
                ),
            ));
        }
    }
    Ok(out)
}

/// `[admin]`'s address, refresh and credentials.
fn parse_admin_access(path: &Path, text: &str, a: &Spanned<RawAdmin>) -> Result<AdminConfig> {
    let raw = a.get_ref();
    let mut out = AdminConfig::default();
    if let Some(l) = &raw.listen {
        out.listen = match l.get_ref().trim() {
            "off" => None,
            s => Some(s.parse().map_err(|_| {
                at(
                    path,
                    text,
                    l.span(),
                    format!(
                        "[admin] listen = {s:?}: expected ADDRESS:PORT, e.g. \"{DEFAULT_ADMIN_LISTEN}\", or \"off\""
                    ),
                )
            })?),
        };
    }
    if let Some(r) = &raw.refresh {
        out.refresh = parse_duration(path, text, r, "[admin] refresh")?;
        if out.refresh < Duration::from_millis(100) {
            return Err(at(path, text, r.span(), "[admin] refresh: at least 100ms"));
        }
    }
    let err = |span: Range<usize>, msg: String| at(path, text, span, format!("[admin] {msg}"));
    let Some(user) = &raw.user else {
        if let Some(p) = &raw.password_file {
            return Err(err(p.span(), "password_file needs `user`".into()));
        }
        if let Some(p) = &raw.password_env {
            return Err(err(p.span(), "password_env needs `user`".into()));
        }
        return Ok(out);
    };
    let name = user.get_ref();
    if name.is_empty() || name.contains(':') || name.bytes().any(|c| c < b' ' || c == 0x7f) {
        return Err(err(
            user.span(),
            format!(
                "user {name:?} must be non-empty, without ':' or control characters (Basic auth)"
            ),
        ));
    }
    let password = match (&raw.password_file, &raw.password_env) {
        (Some(f), Some(_)) => {
            return Err(err(
                f.span(),
                "set only one of password_file and password_env".into(),
            ))
        }
        (None, None) => return Err(err(
            user.span(),
            "`user` needs password_file or password_env (passwords are never put in the config)"
                .into(),
        )),
        (Some(f), None) => {
            let file = f.get_ref();
            let mut p = std::fs::read_to_string(file).map_err(|e| {
                let reason = match e.kind() {
                    std::io::ErrorKind::NotFound => "no such file".to_string(),
                    std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
                    std::io::ErrorKind::InvalidData => "not valid UTF-8".to_string(),
                    _ => e.to_string(),
                };
                err(
                    f.span(),
                    format!("cannot read password_file {}: {reason}", file.display()),
                )
            })?;
            if p.ends_with('\n') {
                p.pop();
                if p.ends_with('\r') {
                    p.pop();
                }
            }
            if p.is_empty() {
                return Err(err(
                    f.span(),
                    format!("password_file {} is empty", file.display()),
                ));
            }
            p
        }
        (None, Some(v)) => {
            let var = v.get_ref();
            match std::env::var(var) {
                Ok(p) if !p.is_empty() => p,
                Ok(_) => {
                    return Err(err(
                        v.span(),
                        format!("environment variable {var} (password_env) is empty"),
                    ))
                }
                Err(std::env::VarError::NotPresent) => {
                    return Err(err(
                        v.span(),
                        format!("environment variable {var} (password_env) is not set"),
                    ))
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(err(
                        v.span(),
                        format!("environment variable {var} (password_env) is not valid UTF-8"),
                    ))
                }
            }
        }
    };
    out.auth = Some(BasicAuth {
        user: name.clone(),
        password,
    });
    Ok(out)
}

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(path, &text)
    }

    /// Parses and validates `text`, the contents of `path`: one phase per part of the file
    /// (each a function below), every error with the file, the line and what is expected.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let src = Src { path, text };
        let raw: RawConfig = src.document()?;
        let instance = parse_instance(src, raw.instance.as_ref())?;
        let snat_ports = parse_snat_ports(src, raw.snat_ports.as_ref())?;
        let snat_address = raw
            .snat_address
            .as_ref()
            .map(|a| parse_snat_address(src, a))
            .transpose()?;
        let vip_mode = parse_vip_mode(src, raw.vip_mode.as_ref())?;
        let (connect_timeout, idle_timeout, close_timeout) = parse_timeouts(src, &raw.timeouts)?;
        let backends = parse_backends(src, &raw.backends)?;
        let checks = parse_checks(src, &raw.checks)?;
        let services = parse_services(src, &raw, &backends, &checks)?;
        Ok(Self {
            path: path.to_path_buf(),
            instance,
            snat_ports,
            snat_address,
            vip_mode,
            debug: raw.debug,
            rst_per_sec: raw.rst_per_sec.unwrap_or(DEFAULT_RST_PER_SEC),
            maxconn: parse_limit(src, raw.maxconn.as_ref(), "maxconn")?,
            connect_timeout,
            idle_timeout,
            close_timeout,
            embryonic_entries: raw
                .tables
                .embryonic
                .unwrap_or(lb_common::DEFAULT_EMBRYONIC_ENTRIES),
            // Default: room for every flow the SNAT ports allow.
            established_entries: raw
                .tables
                .established
                .unwrap_or_else(|| default_established(snat_ports, backends.len())),
            established_configured: raw.tables.established.is_some(),
            xdp_object: None,
            connection_log: parse_connection_log(src, raw.connection_log.as_ref())?,
            backends,
            services,
            admin: match &raw.admin {
                None => AdminConfig::default(),
                Some(a) => parse_admin(path, text, a)?,
            },
            pair: raw.pair.as_ref().map(|p| parse_pair(src, p)).transpose()?,
        })
    }

    /// Distinct VIP addresses.
    pub fn vip_addrs(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = self.services.iter().map(|s| *s.vip.ip()).collect();
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
instance = "t1"
snat_ports = "20000-29999"
[timeouts]
connect = "5s"
[[backend]]
name = "db01"
address = "10.0.1.10"
[[backend]]
name = "db02"
address = "10.0.1.11"
[[service]]
name = "write"
vip = "198.18.0.10:7680"
backend_port = 7687
backends = ["db01"]
[[service]]
name = "read"
vip = "198.18.0.10:7681"
backend_port = 7687
backends = ["db02", "db01"]
"#;

    fn err(text: &str) -> String {
        format!(
            "{:#}",
            Config::parse(Path::new("lb.toml"), text).unwrap_err()
        )
    }

    #[test]
    fn a_valid_config_parses_with_defaults_filled_in() {
        let c = Config::parse(Path::new("lb.toml"), GOOD).unwrap();
        assert_eq!(c.instance, "t1");
        assert_eq!(c.snat_ports, (20000, 29999));
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.idle_timeout, Duration::from_secs(7200));
        assert_eq!(c.close_timeout, Duration::from_secs(10));
        assert_eq!(c.services[1].backends, vec![1, 0]);
        assert_eq!(c.vip_addrs(), vec![Ipv4Addr::new(198, 18, 0, 10)]);
        assert_eq!(c.vip_mode, VipMode::Local);
    }

    #[test]
    fn a_pair_names_its_peer_and_listens_on_the_peers_port_unless_told() {
        let c = Config::parse(
            Path::new("lb.toml"),
            &format!("{GOOD}[pair]\npeer = \"10.0.2.2:7690\"\n"),
        )
        .unwrap();
        let p = c.pair.unwrap();
        assert_eq!(p.peer, "10.0.2.2:7690".parse().unwrap());
        assert_eq!(p.listen, "0.0.0.0:7690".parse().unwrap());
        assert!(Config::parse(Path::new("lb.toml"), GOOD)
            .unwrap()
            .pair
            .is_none());
        let lines = GOOD.lines().count();
        let e = err(&format!("{GOOD}[pair]\nlisten = \"10.0.2.1:7690\"\n"));
        assert!(
            e.contains(&format!("lb.toml:{}", lines + 1)) && e.contains("needs peer"),
            "{e}"
        );
        let e = err(&format!("{GOOD}[pair]\npeer = \"lb2:7690\"\n"));
        assert!(
            e.contains(&format!("lb.toml:{}", lines + 2)) && e.contains("ADDRESS:PORT"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("lb-pair-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (full, empty) = (dir.join("secret"), dir.join("empty"));
        std::fs::write(&full, "hunter2-hunter2\n").unwrap();
        std::fs::write(&empty, "\n").unwrap();
        let with = |f: &std::path::Path| {
            format!(
                "{GOOD}[pair]\npeer = \"10.0.2.2:7690\"\nsecret_file = \"{}\"\n",
                f.display()
            )
        };
        let c = Config::parse(Path::new("lb.toml"), &with(&full)).unwrap();
        let secret = c.pair.unwrap().secret.unwrap();
        assert_eq!(
            format!("{secret:?}"),
            "Secret(15 bytes)",
            "trimmed, never printed"
        );
        let e = err(&with(&empty));
        assert!(e.contains("is empty") && !e.contains("hunter2"), "{e}");
        let e = err(&with(&dir.join("missing")));
        assert!(e.contains(&format!("lb.toml:{}", lines + 3)), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn maxconn_on_maxconn_and_idle_timeout_per_service() {
        let text = GOOD.replace(
            "instance = \"t1\"\n",
            "instance = \"t1\"\nmaxconn = 256\n",
        )
        .replace(
            "backends = [\"db01\"]\n",
            "backends = [\"db01\"]\nbackend_maxconn = 32\non_maxconn = \"reset\"\nidle_timeout = \"50s\"\n",
        );
        let c = Config::parse(Path::new("lb.toml"), &text).unwrap();
        assert_eq!(c.maxconn, 256);
        let (w, r) = (&c.services[0], &c.services[1]);
        assert_eq!((w.backend_maxconn, w.maxconn_reset), (32, true));
        assert_eq!(w.idle_timeout, Some(Duration::from_secs(50)));
        assert_eq!(
            (r.backend_maxconn, r.maxconn_reset, r.idle_timeout),
            (0, false, None)
        );

        let with_write = |extra: &str| {
            GOOD.replace(
                "backends = [\"db01\"]\n",
                &format!("backends = [\"db01\"]\n{extra}\n"),
            )
        };
        let e = err(&with_write("backend_maxconn = 0"));
        assert!(
            e.starts_with("lb.toml:17: service \"write\": backend_maxconn = 0"),
            "{e}"
        );
        let e = err(&with_write("on_maxconn = \"reset\""));
        assert!(
            e.contains("on_maxconn has no effect without backend_maxconn"),
            "{e}"
        );
        let e = err(&with_write("backend_maxconn = 4\non_maxconn = \"queue\""));
        assert!(
            e.starts_with("lb.toml:18:") && e.contains("expected \"drop\""),
            "{e}"
        );
        let e = err(&with_write("idle_timeout = \"soon\""));
        assert!(
            e.starts_with("lb.toml:17: service \"write\": idle_timeout"),
            "{e}"
        );
        let e = err(&GOOD.replace("instance = \"t1\"\n", "instance = \"t1\"\nmaxconn = 0\n"));
        assert!(e.starts_with("lb.toml:3: maxconn = 0"), "{e}");
    }

    #[test]
    fn syn_hold_defaults_to_a_candidates_rise_on_exclusive_roles_only() {
        let with_check = |write: &str, read: &str| {
            GOOD.replacen(
                "backends = [\"db01\"]\n",
                &format!("backends = [\"db01\"]\n{write}\n"),
                1,
            )
            .replace(
                "backends = [\"db02\", \"db01\"]\n",
                &format!("backends = [\"db02\", \"db01\"]\n{read}\n"),
            )
        };
        // The preset's timings (fastinter 250 ms x rise 2 + timeout 1 s): 1.5 s.
        let c = Config::parse(
            Path::new("lb.toml"),
            &with_check("check = \"neo4j-ha-master\"", "check = \"neo4j-ha-slave\""),
        )
        .unwrap();
        let master = preset("neo4j-ha-master").unwrap();
        assert_eq!(c.services[0].syn_hold, default_syn_hold(&master));
        assert_eq!(
            c.services[0].syn_hold,
            (master.fastinter * master.rise + master.timeout).max(Duration::from_secs(1))
        );
        assert_eq!(c.services[1].syn_hold, Duration::ZERO, "not exclusive");
        let c = Config::parse(
            Path::new("lb.toml"),
            &with_check("check = \"neo4j-ha-master\"\nsyn_hold = \"0s\"", ""),
        )
        .unwrap();
        assert_eq!(c.services[0].syn_hold, Duration::ZERO, "turned off");
        let e = err(&with_check(
            "",
            "check = \"neo4j-ha-slave\"\nsyn_hold = \"2s\"",
        ));
        assert!(
            e.starts_with("lb.toml:24: service \"read\": syn_hold applies only"),
            "{e}"
        );
        let e = err(&with_check(
            "check = \"neo4j-ha-master\"\nsyn_hold = \"soon\"",
            "",
        ));
        assert!(
            e.starts_with("lb.toml:18: service \"write\": syn_hold"),
            "{e}"
        );
    }

    #[test]
    fn connection_log_must_be_a_file_in_an_existing_directory() {
        let with = |v: &str| {
            GOOD.replace(
                "instance = \"t1\"\n",
                &format!("instance = \"t1\"\nconnection_log = \"{v}\"\n"),
            )
        };
        let c = Config::parse(Path::new("lb.toml"), &with("/tmp/lb-conn.log")).unwrap();
        assert_eq!(c.connection_log, Some(PathBuf::from("/tmp/lb-conn.log")));
        let e = err(&with("/nonexistent-lb-dir/conn.log"));
        assert!(
            e.starts_with(
                "lb.toml:3: connection_log: directory /nonexistent-lb-dir does not exist"
            ),
            "{e}"
        );
        let e = err(&with("/tmp"));
        assert!(
            e.starts_with("lb.toml:3: connection_log = \"/tmp\": name a file"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_backend_is_reported_with_its_line() {
        let bad = GOOD.replace(r#"backends = ["db02", "db01"]"#, r#"backends = ["db09"]"#);
        let e = err(&bad);
        assert!(
            e.starts_with("lb.toml:21: service \"read\": unknown backend \"db09\""),
            "{e}"
        );
    }

    #[test]
    fn syntax_errors_and_unknown_keys_name_the_line() {
        assert!(
            err("instance = \n").starts_with("lb.toml:1:"),
            "{}",
            err("instance = \n")
        );
        let e = err(&GOOD.replace("snat_ports", "snat_portz"));
        assert!(
            e.starts_with("lb.toml:3:") && e.contains("snat_portz"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_say_what_is_expected() {
        assert!(err(&GOOD.replace("20000-29999", "300-200")).contains("expected \"FIRST-LAST\""));
        assert!(err(&GOOD.replace("198.18.0.10:7680", "nowhere")).contains("is not IPV4:PORT"));
        assert!(err(&GOOD.replace("\"5s\"", "\"soon\"")).contains("timeouts.connect"));
        assert!(err(&GOOD.replace("10.0.1.11", "10.0.1.300")).contains("not an IPv4 address"));
        assert!(err(&GOOD.replace(":7681", ":7680")).contains("used by another service"));
    }

    fn admin(extra: &str) -> Result<AdminConfig> {
        Config::parse(Path::new("lb.toml"), &format!("{GOOD}[admin]\n{extra}")).map(|c| c.admin)
    }

    #[test]
    fn admin_defaults_to_loopback_8080_without_auth() {
        let c = Config::parse(Path::new("lb.toml"), GOOD).unwrap();
        assert_eq!(c.admin.listen, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(c.admin.auth, None);
        assert_eq!(c.admin.refresh, Duration::from_secs(2));
        let a = admin("listen = \"0.0.0.0:9000\"\nrefresh = \"500ms\"\n").unwrap();
        assert_eq!(a.listen, Some("0.0.0.0:9000".parse().unwrap()));
        assert_eq!(a.refresh, Duration::from_millis(500));
        assert_eq!(admin("listen = \"off\"\n").unwrap().listen, None);
    }

    #[test]
    fn the_operator_api_is_off_by_default_and_needs_auth_unless_on_loopback() {
        assert!(!admin("listen = \"0.0.0.0:8080\"\n").unwrap().operations);
        let c = admin("listen = \"127.0.0.1:8080\"\noperations = true\n").unwrap();
        assert!(c.operations && c.auth.is_none());
        let e = format!(
            "{:#}",
            admin("listen = \"0.0.0.0:8080\"\noperations = true\n").unwrap_err()
        );
        assert!(
            e.contains("[admin] operations = true on 0.0.0.0:8080 without authentication")
                && e.contains("user + password_file"),
            "{e}"
        );
        let c = admin("listen = \"0.0.0.0:8080\"\noperations = true\nuser = \"ops\"\npassword_env = \"LB_TEST_ADMIN_PW\"\n");
        // With credentials it is accepted (here the variable is unset: that error, not the
        // operations one).
        if let Err(e) = c {
            assert!(!format!("{e:#}").contains("operations"), "{e:#}");
        }
    }

    #[test]
    fn admin_errors_name_the_line_and_what_is_expected() {
        let line = GOOD.lines().count() + 2;
        let e = format!("{:#}", admin("listen = \"localhost\"\n").unwrap_err());
        assert!(
            e.starts_with(&format!(
                "lb.toml:{line}: [admin] listen = \"localhost\": expected ADDRESS:PORT"
            )),
            "{e}"
        );
        let e = format!("{:#}", admin("refresh = \"often\"\n").unwrap_err());
        assert!(e.contains("[admin] refresh"), "{e}");
        let e = format!("{:#}", admin("refresh = \"10ms\"\n").unwrap_err());
        assert!(e.contains("at least 100ms"), "{e}");
        let e = format!("{:#}", admin("port = 8080\n").unwrap_err());
        assert!(e.contains("port"), "{e}");
        let e = format!("{:#}", admin("password_env = \"X\"\n").unwrap_err());
        assert!(e.contains("password_env needs `user`"), "{e}");
        let e = format!("{:#}", admin("user = \"admin\"\n").unwrap_err());
        assert!(e.contains("needs password_file or password_env"), "{e}");
        let e = format!(
            "{:#}",
            admin("user = \"a:b\"\npassword_env = \"X\"\n").unwrap_err()
        );
        assert!(e.contains("without ':'"), "{e}");
        let e = format!(
            "{:#}",
            admin("user = \"admin\"\npassword_file = \"/nonexistent/pw\"\n").unwrap_err()
        );
        assert!(
            e.contains("cannot read password_file /nonexistent/pw: no such file"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            admin("user = \"admin\"\npassword_env = \"LB_TEST_ADMIN_PW_UNSET\"\n").unwrap_err()
        );
        assert!(
            e.contains("LB_TEST_ADMIN_PW_UNSET (password_env) is not set"),
            "{e}"
        );
    }

    #[test]
    fn admin_password_is_read_and_never_printed() {
        let dir = std::env::temp_dir().join(format!("lb-admin-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pw");
        std::fs::write(&f, "adm1n-s3cret\n").unwrap();
        let a = admin(&format!("user = \"ops\"\npassword_file = {:?}\n", f)).unwrap();
        let auth = a.auth.clone().unwrap();
        assert_eq!(
            (auth.user.as_str(), auth.password.as_str()),
            ("ops", "adm1n-s3cret")
        );
        assert!(!format!("{a:?}").contains("adm1n-s3cret"));
        std::fs::write(&f, "").unwrap();
        let e = format!(
            "{:#}",
            admin(&format!("user = \"ops\"\npassword_file = {:?}\n", f)).unwrap_err()
        );
        assert!(e.contains("is empty"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
