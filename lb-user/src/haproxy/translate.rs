//! From the parsed HAProxy model to lb's TOML. Each decision that differs from what HAProxy
//! does is a diagnostic, repeated as a comment next to the TOML it concerns.
use std::{collections::HashMap, fmt::Write as _, net::Ipv4Addr, time::Duration};

use base64::Engine;

use super::{
    parse::{At, Kind, Loc, Parsed, Proxy, ServerOpts},
    Diagnostic, Options, Secret, Severity,
};
use crate::health::spec::{preset, Method, PRESET_NAMES};

/// The VIP written for `bind *:PORT` when lb's interfaces are not known (TEST-NET-1).
pub const PLACEHOLDER_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// The lb defaults the output relies on when HAProxy says nothing.
const LB_CONNECT: Duration = crate::config::DEFAULT_CONNECT_TIMEOUT;
const LB_IDLE: Duration = crate::config::DEFAULT_IDLE_TIMEOUT;

/// Collects diagnostics and the comments of the TOML table being written.
struct Out<'a> {
    diags: &'a mut Vec<Diagnostic>,
}

impl Out<'_> {
    fn say(&mut self, comments: &mut Vec<String>, sev: Severity, loc: &Loc, msg: String) {
        comments.push(format!("{loc}: {}: {msg}", sev.as_str()));
        self.diags.push(Diagnostic::new(sev, loc.clone(), msg));
    }
    fn error(&mut self, loc: &Loc, msg: String) {
        self.diags
            .push(Diagnostic::new(Severity::Error, loc.clone(), msg));
    }
}

/// A TOML basic string.
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A duration in the largest unit that writes it exactly (humantime syntax).
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return format!("{}us", d.as_micros());
    }
    for (unit, n) in [("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms > 0 && ms.is_multiple_of(n) {
            return format!("{}{unit}", ms / n);
        }
    }
    format!("{ms}ms")
}

struct LbBackend {
    name: String,
    addr: Ipv4Addr,
    check_port: Option<u16>,
}

/// One `[[service]]`: a bind of a frontend and the backend it sends to.
struct Svc {
    name: String,
    fe: usize,
    be: usize,
    vip: Ipv4Addr,
    port: u16,
    comments: Vec<String>,
}

/// lb's check for one HAProxy backend.
#[derive(Default)]
struct CheckOut {
    /// `check = "..."` of the service, if checked.
    reference: Option<String>,
    /// A `[[check]]` table, if one is needed.
    table: Option<String>,
    /// `# check = "..."`: the fix offered when HAProxy never checks the servers.
    offered: Option<String>,
    exclusive: bool,
    on_down: Option<&'static str>,
    balance: Option<String>,
    /// `backend_maxconn` of the services using this backend.
    maxconn: Option<u32>,
    comments: Vec<String>,
    secret: Option<Secret>,
}

/// The lb configuration for HAProxy's `p` (read from `files`), as TOML text with a comment at
/// every decision that differs from HAProxy, and the secrets it refers to. Findings go to
/// `diags`. One phase per function: the proxies indexed, the services and the admin server
/// found, the servers merged into lb backends, a check per HAProxy backend, the timeouts
/// folded, then the text written.
pub fn translate(
    p: &Parsed,
    files: &[&str],
    opts: &Options,
    diags: &mut Vec<Diagnostic>,
) -> (String, Vec<Secret>) {
    let mut out = Out { diags };
    let proxies = &p.proxies;
    let backends = index_proxies(proxies, &mut out);
    let (svcs, admin) = services_of(proxies, &backends, opts, &mut out);
    let servers = lb_backends(proxies, &svcs, &mut out);
    let mut checks = checks_of(proxies, &svcs, &servers, opts, &mut out);
    let timeouts = timeouts_of(proxies, &svcs, &mut out);

    let mut t = String::new();
    write_head(&mut t, p, files, admin.is_some(), &timeouts, &mut out);
    write_body(&mut t, proxies, &svcs, &servers, &checks, &timeouts);
    let mut secrets: Vec<Secret> = checks.drain().filter_map(|(_, c)| c.secret).collect();
    if let Some(admin) = admin {
        secrets.extend(write_admin(&mut t, admin));
    }
    secrets.sort_by(|a, b| a.path.cmp(&b.path));
    (t, secrets)
}

/// The HAProxy backends (and listens) by name; a name defined twice is an error, for
/// frontends too (HAProxy refuses both).
fn index_proxies<'p>(proxies: &'p [Proxy], out: &mut Out<'_>) -> HashMap<&'p str, usize> {
    // Backends by name; duplicates are errors (HAProxy refuses them too).
    let mut backends: HashMap<&str, usize> = HashMap::new();
    let mut frontends: HashMap<&str, usize> = HashMap::new();
    for (i, px) in proxies.iter().enumerate() {
        if matches!(px.kind, Kind::Backend | Kind::Listen) {
            if let Some(&j) = backends.get(px.name.as_str()) {
                out.error(
                    &px.loc,
                    format!(
                        "backend {} is defined twice (first at {})",
                        px.name, proxies[j].loc
                    ),
                );
            } else {
                backends.insert(&px.name, i);
            }
        }
        if matches!(px.kind, Kind::Frontend | Kind::Listen) {
            if let Some(&j) = frontends.get(px.name.as_str()) {
                out.error(
                    &px.loc,
                    format!(
                        "frontend {} is defined twice (first at {})",
                        px.name, proxies[j].loc
                    ),
                );
            } else {
                frontends.insert(&px.name, i);
            }
        }
    }

    backends
}

/// lb's services (one per bind line of a frontend or listen, with the backend it sends to) and
/// the admin server (a `listen` with `stats enable` and no servers); a backend no frontend
/// uses is reported.
fn services_of(
    proxies: &[Proxy],
    backends: &HashMap<&str, usize>,
    opts: &Options,
    out: &mut Out<'_>,
) -> (Vec<Svc>, Option<Admin>) {
    // Services, the admin server, and which backends they use.
    let mut svcs: Vec<Svc> = Vec::new();
    let mut admin: Option<Admin> = None;
    let mut used = vec![false; proxies.len()];
    for (fi, fe) in proxies.iter().enumerate() {
        if fe.kind == Kind::Backend {
            continue;
        }
        let is_admin =
            fe.stats_enable.is_some() && fe.servers.is_empty() && fe.default_backend.is_none();
        if is_admin {
            if admin.is_some() {
                out.error(
                    &fe.loc,
                    format!(
                        "listen {}: a second stats section; lb has one admin server",
                        fe.name
                    ),
                );
                continue;
            }
            admin = Some(admin_table(fe, opts, out));
            continue;
        }
        if fe.stats_enable.is_some() {
            out.diags.push(Diagnostic::new(Severity::Warning, fe.loc.clone(), format!("{} {}: `stats enable` on a balanced proxy is not supported: use a separate `listen admin` (lb's [admin])", fe.kind.as_str(), fe.name)));
        }
        let be = match &fe.default_backend {
            Some(At { v, loc }) => match backends.get(v.as_str()) {
                Some(&b) => b,
                None => {
                    out.error(
                        loc,
                        format!("default_backend {v}: no backend of that name is defined"),
                    );
                    continue;
                }
            },
            None if fe.kind == Kind::Listen && !fe.servers.is_empty() => fi,
            None => {
                out.error(&fe.loc, format!("{} {} has no default_backend: lb would have nothing to send its connections to", fe.kind.as_str(), fe.name));
                continue;
            }
        };
        used[be] = true;
        if fe.binds.is_empty() {
            out.error(
                &fe.loc,
                format!(
                    "{} {} has no bind line: on which address and port should lb listen?",
                    fe.kind.as_str(),
                    fe.name
                ),
            );
            continue;
        }
        let mut comments = Vec::new();
        if fe.settings.mode.as_ref().is_some_and(|m| m.v == "http") {
            let loc = fe
                .settings
                .mode
                .as_ref()
                .map(|m| m.loc.clone())
                .unwrap_or_else(|| fe.loc.clone());
            out.say(&mut comments, Severity::Warning, &loc, format!("{} {} is `mode http`: lb balances it at L4 (TCP); L7 features (header rewriting, HTTP logs, per-request balancing) are not applied", fe.kind.as_str(), fe.name));
        }
        for (k, b) in fe.binds.iter().enumerate() {
            let mut c = comments.clone();
            let vip = match (opts.vip, b.addr, opts.wildcard_vip) {
                (Some(v), Some(a), _) if v != a => {
                    out.say(
                        &mut c,
                        Severity::Note,
                        &b.loc,
                        format!(
                            "bind {}:{}: --vip {v} overrides the address",
                            b.text, b.port
                        ),
                    );
                    v
                }
                (Some(v), _, _) => v,
                (None, Some(a), _) => a,
                (None, None, Some(w)) => {
                    out.say(&mut c, Severity::Note, &b.loc, format!("bind {}:{}: HAProxy listens on every local address; lb serves the port on {w}, the address of its first interface", b.text, b.port));
                    w
                }
                (None, None, None) => {
                    out.say(&mut c, Severity::Warning, &b.loc, format!("bind {}:{}: HAProxy listens on every local address; lb needs the VIP's address: {PLACEHOLDER_VIP} is a PLACEHOLDER, set it to the address of the interface lb attaches to (or import with --vip ADDR; `lb run --haproxy-config` uses the first --iface's address)", b.text, b.port));
                    PLACEHOLDER_VIP
                }
            };
            if let Some(other) = svcs.iter().find(|s| s.vip == vip && s.port == b.port) {
                out.error(&b.loc, format!("{vip}:{} is also the address of service {} (bind lines of two frontends on one address and port)", b.port, other.name));
                continue;
            }
            let name = if k == 0 {
                fe.name.clone()
            } else {
                format!("{}-{}", fe.name, k + 1)
            };
            svcs.push(Svc {
                name,
                fe: fi,
                be,
                vip,
                port: b.port,
                comments: c,
            });
        }
    }
    for (i, px) in proxies.iter().enumerate() {
        if px.kind == Kind::Backend && !used[i] {
            out.diags.push(Diagnostic::new(
                Severity::Warning,
                px.loc.clone(),
                format!(
                    "backend {} is not used by any frontend: not imported",
                    px.name
                ),
            ));
        }
    }

    (svcs, admin)
}

/// The servers of the services' backends as lb backends, one per address.
struct Servers {
    lbb: Vec<LbBackend>,
    /// (HAProxy backend, server index) -> index in `lbb`.
    member: HashMap<(usize, usize), usize>,
    /// Comments of each lb backend.
    backend_comments: Vec<Vec<String>>,
}

/// lb backends: one per server address, named after the first server seen there.
fn lb_backends(proxies: &[Proxy], svcs: &[Svc], out: &mut Out<'_>) -> Servers {
    // lb backends: one per server address, named after the first server seen there.
    let mut lbb: Vec<LbBackend> = Vec::new();
    let mut member: HashMap<(usize, usize), usize> = HashMap::new();
    let mut backend_comments: Vec<Vec<String>> = Vec::new();
    for s in svcs {
        let px = &proxies[s.be];
        for (si, srv) in px.servers.iter().enumerate() {
            if member.contains_key(&(s.be, si)) {
                continue;
            }
            let idx = match lbb.iter().position(|b| b.addr == srv.addr) {
                Some(i) => {
                    if lbb[i].name != srv.name {
                        let n = lbb[i].name.clone();
                        out.say(
                            &mut backend_comments[i],
                            Severity::Note,
                            &srv.loc,
                            format!(
                                "server {} of backend {} is lb backend {n} (same address {})",
                                srv.name, px.name, srv.addr
                            ),
                        );
                    }
                    i
                }
                None => {
                    let mut name = srv.name.clone();
                    let mut n = 2;
                    while lbb.iter().any(|b| b.name == name) {
                        name = format!("{}-{n}", srv.name);
                        n += 1;
                    }
                    lbb.push(LbBackend {
                        name,
                        addr: srv.addr,
                        check_port: None,
                    });
                    backend_comments.push(Vec::new());
                    lbb.len() - 1
                }
            };
            if srv.opts.check.as_ref().is_some_and(|c| c.v) && lbb[idx].check_port.is_none() {
                lbb[idx].check_port = Some(
                    srv.opts
                        .port
                        .as_ref()
                        .map(|p| p.v)
                        .or(srv.port)
                        .unwrap_or(s.port),
                );
            }
            member.insert((s.be, si), idx);
        }
    }

    Servers {
        lbb,
        member,
        backend_comments,
    }
}

/// lb's check for each HAProxy backend the services use (shared by those services).
fn checks_of(
    proxies: &[Proxy],
    svcs: &[Svc],
    servers: &Servers,
    opts: &Options,
    out: &mut Out<'_>,
) -> HashMap<usize, CheckOut> {
    // Checks, one per HAProxy backend (shared by the services that use it).
    let mut checks: HashMap<usize, CheckOut> = HashMap::new();
    let mut check_names: Vec<String> = Vec::new();
    for s in svcs {
        if checks.contains_key(&s.be) {
            continue;
        }
        let c = check_for(&proxies[s.be], s, servers, opts, &mut check_names, out);
        checks.insert(s.be, c);
    }

    checks
}

/// lb's timeouts, folded from the services' HAProxy timeouts.
struct Timeouts {
    comments: Vec<String>,
    /// The longest `timeout connect`.
    connect: Option<At<Duration>>,
    /// The longest idle timeout (max of client and server) and where it comes from.
    idle: Option<(Duration, String)>,
    /// Each service's own idle timeout and where it comes from.
    svc_idle: Vec<Option<(Duration, String)>>,
}

/// Timeouts: lb has one connect (embryonic) and one idle timeout, and a service may keep a
/// shorter idle timeout of its own.
fn timeouts_of(proxies: &[Proxy], svcs: &[Svc], out: &mut Out<'_>) -> Timeouts {
    let mut t_comments = Vec::new();
    let mut connect: Option<At<Duration>> = None;
    let mut idle: Option<(Duration, String)> = None;
    let mut connect_seen: Vec<Duration> = Vec::new();
    let mut idle_seen: Vec<Duration> = Vec::new();
    // Each service's own idle timeout and where it comes from.
    let mut svc_idle: Vec<Option<(Duration, String)>> = Vec::new();
    for s in svcs {
        let (fe, be) = (&proxies[s.fe].settings, &proxies[s.be].settings);
        if let Some(c) = &be.timeout_connect {
            connect_seen.push(c.v);
            if connect.as_ref().is_none_or(|x| c.v > x.v) {
                connect = Some(c.clone());
            }
        }
        let parts: Vec<&At<Duration>> = [&fe.timeout_client, &be.timeout_server]
            .into_iter()
            .flatten()
            .collect();
        if parts.is_empty() {
            out.say(&mut t_comments, Severity::Warning, &proxies[s.fe].loc, format!("{}: no timeout client or server: HAProxy never expires its idle connections; lb uses its idle timeout, {}", s.name, human(LB_IDLE)));
            svc_idle.push(None);
            continue;
        }
        let m = parts.iter().map(|a| a.v).max().unwrap_or_default();
        idle_seen.push(m);
        let what = [
            ("client", &fe.timeout_client),
            ("server", &be.timeout_server),
        ]
        .into_iter()
        .filter_map(|(n, a)| {
            a.as_ref()
                .map(|a| format!("timeout {n} {} at {}", human(a.v), a.loc))
        })
        .collect::<Vec<_>>()
        .join(", ");
        svc_idle.push(Some((m, what.clone())));
        if idle.as_ref().is_none_or(|x| m > x.0) {
            idle = Some((m, what));
        }
    }
    connect_seen.dedup();
    idle_seen.sort();
    idle_seen.dedup();
    if let (Some(c), true) = (
        &connect,
        connect_seen
            .iter()
            .any(|d| Some(*d) != connect.as_ref().map(|c| c.v)),
    ) {
        out.say(
            &mut t_comments,
            Severity::Warning,
            &c.loc,
            format!(
                "the backends have different connect timeouts; lb has one: the longest, {}",
                human(c.v)
            ),
        );
    }
    let _ = idle_seen;

    Timeouts {
        comments: t_comments,
        connect,
        idle,
        svc_idle,
    }
}

/// The text's head: where it comes from, the global `maxconn`, and `[timeouts]`.
fn write_head(
    t: &mut String,
    p: &Parsed,
    files: &[&str],
    has_admin: bool,
    timeouts: &Timeouts,
    out: &mut Out<'_>,
) {
    let Timeouts {
        comments: t_comments,
        connect,
        idle,
        ..
    } = timeouts;
    let _ = writeln!(
        t,
        "# lb configuration imported from HAProxy by `lb import-haproxy` ({}).",
        files.join(", ")
    );
    let _ = writeln!(t, "# Every decision that differs from HAProxy is a note or warning comment next to what it concerns.");
    if let Some(m) = p.global_maxconn.as_ref().filter(|m| m.v != 0) {
        let mut c = Vec::new();
        out.say(
            &mut c,
            Severity::Note,
            &m.loc,
            format!(
                "global maxconn {}: lb counts the connections of every service together against it; over it a SYN is dropped (HAProxy stops accepting; the client's SYN retransmit waits in both)",
                m.v
            ),
        );
        for l in c {
            let _ = writeln!(t, "# {l}");
        }
        let _ = writeln!(t, "maxconn = {}", m.v);
    }
    if !has_admin {
        let _ = writeln!(t, "# No `listen ... stats enable` in the HAProxy config: lb's admin server keeps its default, 127.0.0.1:8080 ([admin] listen = \"off\" disables it).");
    }
    let _ = writeln!(t);
    let _ = writeln!(t, "[timeouts]");
    for l in t_comments {
        let _ = writeln!(t, "# {l}");
    }
    match &connect {
        Some(c) => {
            let _ = writeln!(
                t,
                "connect = {} # timeout connect at {}: the embryonic-flow (handshake) timeout",
                q(&human(c.v)),
                c.loc
            );
        }
        None => {
            let _ = writeln!(
                t,
                "connect = {} # no timeout connect: lb's default",
                q(&human(LB_CONNECT))
            );
        }
    }
    match &idle {
        Some((d, what)) => {
            let _ = writeln!(t, "idle = {} # max({what})", q(&human(*d)));
        }
        None => {
            let _ = writeln!(
                t,
                "idle = {} # no timeout client/server: lb's default",
                q(&human(LB_IDLE))
            );
        }
    }
}

/// The `[[check]]` tables, the `[[backend]]`s and the `[[service]]`s.
fn write_body(
    t: &mut String,
    proxies: &[Proxy],
    svcs: &[Svc],
    servers: &Servers,
    checks: &HashMap<usize, CheckOut>,
    timeouts: &Timeouts,
) {
    let Servers {
        lbb,
        member,
        backend_comments,
    } = servers;
    let Timeouts { idle, svc_idle, .. } = timeouts;
    let mut order: Vec<usize> = Vec::new();
    for s in svcs {
        if !order.contains(&s.be) {
            order.push(s.be);
        }
    }
    for be in &order {
        if let Some(table) = checks.get(be).and_then(|c| c.table.as_ref()) {
            let _ = writeln!(t);
            t.push_str(table);
        }
    }
    for (i, b) in lbb.iter().enumerate() {
        let _ = writeln!(t);
        let _ = writeln!(t, "[[backend]]");
        for l in &backend_comments[i] {
            let _ = writeln!(t, "# {l}");
        }
        let _ = writeln!(t, "name = {}", q(&b.name));
        let _ = writeln!(t, "address = {}", q(&b.addr.to_string()));
        if let Some(p) = b.check_port {
            let _ = writeln!(t, "check_port = {p}");
        }
    }
    for (si, s) in svcs.iter().enumerate() {
        let fe = &proxies[s.fe];
        let be = &proxies[s.be];
        let _ = writeln!(t);
        let _ = writeln!(t, "[[service]]");
        let _ = writeln!(
            t,
            "# {} {} ({}) -> backend {} ({})",
            fe.kind.as_str(),
            fe.name,
            fe.loc,
            be.name,
            be.loc
        );
        for l in &s.comments {
            let _ = writeln!(t, "# {l}");
        }
        let c = checks.get(&s.be);
        if let Some(c) = c {
            for l in &c.comments {
                let _ = writeln!(t, "# {l}");
            }
        }
        let _ = writeln!(t, "name = {}", q(&s.name));
        let _ = writeln!(t, "vip = {}", q(&format!("{}:{}", s.vip, s.port)));
        let ports: Vec<u16> = be
            .servers
            .iter()
            .map(|x| x.port.unwrap_or(s.port))
            .collect();
        let bport = ports.first().copied().unwrap_or(s.port);
        let _ = writeln!(t, "backend_port = {bport}");
        let names: Vec<String> = (0..be.servers.len())
            .filter_map(|si| member.get(&(s.be, si)).map(|&i| q(&lbb[i].name)))
            .collect();
        let _ = writeln!(t, "backends = [{}]", names.join(", "));
        if let Some(c) = c {
            if let Some(r) = &c.reference {
                let _ = writeln!(t, "check = {}", q(r));
            }
            if let Some(o) = &c.offered {
                let _ = writeln!(t, "# check = {} # the fix: HAProxy checks nothing here (no `check` on the servers)", q(o));
            }
            if let Some(b) = &c.balance {
                let _ = writeln!(t, "balance = {}", q(b));
            }
            if let Some(d) = c.on_down {
                let _ = writeln!(t, "on_down = {}", q(d));
            }
            if let Some(m) = c.maxconn {
                let _ = writeln!(t, "backend_maxconn = {m} # server ... maxconn {m}");
            }
            let _ = c.exclusive;
        }
        // The global idle timeout is the longest; a service with a shorter one keeps its own.
        if let (Some(Some((d, what))), Some((global, _))) = (svc_idle.get(si), &idle) {
            if d < global {
                let _ = writeln!(t, "idle_timeout = {} # max({what})", q(&human(*d)));
            }
        }
    }
}

/// `[admin]`; the password file's secret, if one is written.
fn write_admin(t: &mut String, admin: Admin) -> Option<Secret> {
    let (listen, comments, secret, auth, operations) = admin;
    let _ = writeln!(t);
    let _ = writeln!(t, "[admin]");
    for l in &comments {
        let _ = writeln!(t, "# {l}");
    }
    let _ = writeln!(t, "listen = {}", q(&listen));
    if operations {
        let _ = writeln!(t, "operations = true");
    }
    if let Some((user, file)) = auth {
        let _ = writeln!(t, "user = {}", q(&user));
        let _ = writeln!(t, "password_file = {}", q(&file));
    }
    secret
}

/// `[admin]`: listen, comments, the password to write, (user, password_file), operations.
type Admin = (
    String,
    Vec<String>,
    Option<Secret>,
    Option<(String, String)>,
    bool,
);

/// `[admin]` from a `listen` section with `stats enable`: (listen, comments, secret, (user, file)).
fn admin_table(px: &Proxy, opts: &Options, out: &mut Out<'_>) -> Admin {
    let mut c = Vec::new();
    let loc = px.stats_enable.clone().unwrap_or_else(|| px.loc.clone());
    let listen = match px.binds.first() {
        Some(b) => {
            if px.binds.len() > 1 {
                out.say(&mut c, Severity::Warning, &px.binds[1].loc, format!("listen {}: lb's admin server listens on one address: only the first bind is kept", px.name));
            }
            let addr = b.addr.unwrap_or(Ipv4Addr::UNSPECIFIED);
            format!("{addr}:{}", b.port)
        }
        None => {
            out.say(
                &mut c,
                Severity::Warning,
                &px.loc,
                format!(
                    "listen {} has no bind: lb's admin server keeps its default address",
                    px.name
                ),
            );
            "127.0.0.1:8080".to_string() // lb's default [admin] listen
        }
    };
    let mut auth = None;
    let mut secret = None;
    match &px.stats_auth {
        Some(a) => {
            let path = opts.password_dir.join(format!("{}.password", px.name));
            out.say(
                &mut c,
                Severity::Note,
                &a.loc,
                format!(
                    "stats auth: the password is in {} (0600), not in this file",
                    path.display()
                ),
            );
            auth = Some((a.v.0.clone(), path.display().to_string()));
            secret = Some(Secret::new(path, a.v.1.clone()));
        }
        None => {
            let everywhere = px.binds.first().is_some_and(|b| b.addr.is_none());
            let msg = if everywhere {
                format!("listen {}: the admin server (dashboard, stats, /metrics, like HAProxy's stats page) is unauthenticated on all addresses, as in HAProxy; restrict it with listen = \"127.0.0.1:PORT\" or add user + password_file", px.name)
            } else {
                format!("listen {}: the admin server is unauthenticated, as in HAProxy; add user + password_file to protect it", px.name)
            };
            out.say(&mut c, Severity::Warning, &loc, msg);
        }
    }
    if let Some(r) = &px.stats_refresh {
        out.say(
            &mut c,
            Severity::Warning,
            &r.loc,
            "stats refresh: the dashboard's refresh is lb's [admin] refresh; not imported".into(),
        );
    }
    // HAProxy's page is read-only without `stats admin`; so is lb's without `operations`.
    let operations = px.stats_admin.is_some();
    if let Some(loc) = &px.stats_admin {
        let loopback = px
            .binds
            .first()
            .and_then(|b| b.addr)
            .is_some_and(|a| a.is_loopback());
        if auth.is_none() && !loopback {
            out.say(&mut c, Severity::Error, loc, format!("listen {}: stats admin without stats auth on {listen}: lb's operator API (drain, disable, enable) needs authentication unless it listens on 127.0.0.1; add `stats auth USER:PASSWORD` or bind 127.0.0.1", px.name));
        } else {
            out.say(&mut c, Severity::Note, loc, "stats admin: lb's operator API (POST /api/server/NAME/drain|disable|enable) is on: operations = true".into());
        }
    }
    (listen, c, secret, auth, operations)
}

/// The one value of an option over the checked servers (warning when they differ).
fn uniform<T: Clone + PartialEq + std::fmt::Debug>(
    servers: &[&ServerOpts],
    get: impl Fn(&ServerOpts) -> Option<&At<T>>,
    what: &str,
    be: &str,
    comments: &mut Vec<String>,
    out: &mut Out<'_>,
) -> Option<At<T>> {
    let vals: Vec<&At<T>> = servers.iter().filter_map(|s| get(s)).collect();
    let first = vals.first().map(|a| (*a).clone())?;
    if vals.iter().any(|v| v.v != first.v) || vals.len() != servers.len() {
        out.say(comments, Severity::Warning, &first.loc, format!("backend {be}: the servers differ in `{what}`; lb has one value per service: {:?} (the first server's)", first.v));
    }
    Some(first)
}

/// lb's check for the HAProxy backend `px` of service `s` (shared by the services that use
/// it): the service's limits, then, if HAProxy checks the servers, the request, the timing, the
/// port and the `[[check]]` table (or a preset by name), the balance and what happens to the
/// connections of a server that goes down.
fn check_for(
    px: &Proxy,
    s: &Svc,
    servers: &Servers,
    opts: &Options,
    names: &mut Vec<String>,
    out: &mut Out<'_>,
) -> CheckOut {
    let mut c = CheckOut::default();
    let mut cm = Vec::new();
    if px.servers.is_empty() {
        out.error(&px.loc, format!("backend {} has no server", px.name));
        return c;
    }
    backend_port(px, s, &mut cm, out);
    c.maxconn = server_maxconn(px, &mut cm, out);

    let checked: Vec<&super::parse::Server> = px
        .servers
        .iter()
        .filter(|x| x.opts.check.as_ref().is_some_and(|c| c.v))
        .collect();
    if checked.is_empty() {
        c.offered = unchecked(px, &mut cm, out);
        c.balance = Some(balance_of(px, &mut cm, out));
        c.comments = cm;
        return c;
    }
    if checked.len() != px.servers.len() {
        let un: Vec<&str> = px
            .servers
            .iter()
            .filter(|x| !x.opts.check.as_ref().is_some_and(|c| c.v))
            .map(|x| x.name.as_str())
            .collect();
        out.say(&mut cm, Severity::Warning, &px.loc, format!("backend {}: {} have no `check` but others do; lb checks every server of a service: they are checked too", px.name, un.join(", ")));
    }
    let Some(req) = http_request(px, &checked, &mut cm, out) else {
        return c;
    };
    let timing = timing(px, &checked, &mut cm, out);
    let Ok(port_override) = check_port(px, s, servers, out) else {
        return c;
    };
    let hloc = req.loc.clone();
    let preset_name = preset_for_uri(&req.uri);
    let pexcl = preset_name.and_then(preset).is_some_and(|b| b.exclusive);
    let exclusive = pexcl && !opts.faithful;
    let Table {
        name: cname,
        lines: table,
        secret,
    } = check_table(
        px,
        &req,
        &timing,
        port_override,
        pexcl && opts.faithful,
        opts,
        names,
        &mut cm,
        out,
    );
    if table.is_empty() {
        c.reference = preset_name.map(str::to_string);
    } else {
        names.push(cname.clone());
        let mut tt = String::from("[[check]]\n");
        let _ = writeln!(tt, "# the check of backend {} ({})", px.name, hloc);
        let _ = writeln!(tt, "name = {}", q(&cname));
        if let Some(p) = preset_name {
            let _ = writeln!(tt, "preset = {}", q(p));
        }
        for l in table {
            let _ = writeln!(tt, "{l}");
        }
        c.table = Some(tt);
        c.reference = Some(cname);
    }
    c.secret = secret;
    c.exclusive = exclusive;
    c.balance = role_balance(px, preset_name.filter(|_| pexcl), &hloc, opts, &mut cm, out);
    c.on_down = Some(on_down(px, &checked, exclusive, &mut cm, out));
    c.comments = cm;
    c
}

/// `backend_port`: one per service; the servers' ports must agree.
fn backend_port(px: &Proxy, s: &Svc, cm: &mut Vec<String>, out: &mut Out<'_>) {
    let ports: Vec<u16> = px
        .servers
        .iter()
        .map(|x| x.port.unwrap_or(s.port))
        .collect();
    if ports.iter().any(|p| *p != ports[0]) {
        out.error(&px.loc, format!("backend {}: the servers listen on different ports ({}); lb sends a service to one backend_port", px.name, ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")));
    }
    if let Some(srv) = px.servers.iter().find(|x| x.port.is_none()) {
        out.say(
            cm,
            Severity::Note,
            &srv.loc,
            format!(
                "server {} has no port: HAProxy connects to the port the client connected to, {}",
                srv.name, s.port
            ),
        );
    }
}

/// `backend_maxconn`: the servers' smallest `maxconn`, if any.
fn server_maxconn(px: &Proxy, cm: &mut Vec<String>, out: &mut Out<'_>) -> Option<u32> {
    if let Some(m) = px.servers.iter().find_map(|x| x.opts.maxconn.as_ref()) {
        let limits: Vec<Option<u32>> = px
            .servers
            .iter()
            .map(|x| x.opts.maxconn.as_ref().map(|m| m.v).filter(|&v| v != 0))
            .collect();
        let smallest = limits.iter().flatten().min().copied();
        if limits.iter().any(|l| *l != limits[0]) {
            let all: Vec<String> = px
                .servers
                .iter()
                .zip(&limits)
                .map(|(x, l)| match l {
                    Some(v) => format!("{} {v}", x.name),
                    None => format!("{} none", x.name),
                })
                .collect();
            out.say(
                cm,
                Severity::Warning,
                &m.loc,
                format!(
                    "backend {}: the servers' maxconn differ ({}); lb has one limit per service for each of its backends: the smallest",
                    px.name,
                    all.join(", ")
                ),
            );
        }
        if let Some(v) = smallest {
            out.say(
                cm,
                Severity::Note,
                &m.loc,
                format!(
                    "server maxconn {v}: HAProxy queues connections over the limit; lb drops their SYN and the client's SYN retransmit (1 s, 3 s, ...) waits for a free slot (on_maxconn = \"reset\" refuses at once instead)"
                ),
            );
            return Some(v);
        }
    }
    None
}

/// lb's balance for HAProxy's `balance` line.
fn balance_of(px: &Proxy, cm: &mut Vec<String>, out: &mut Out<'_>) -> String {
    match &px.settings.balance {
        None => "roundrobin".into(),
        Some(At { v, loc }) => match v.as_str() {
            "roundrobin" | "static-rr" => "roundrobin".into(),
            "first" => "first".into(),
            "source" => {
                out.say(cm, Severity::Warning, loc, "balance source: lb's nearest is maglev, consistent hashing of each connection (not of the client address alone)".into());
                "maglev".into()
            }
            other => {
                out.say(
                    cm,
                    Severity::Warning,
                    loc,
                    format!("balance {other} is not supported by lb: round robin instead"),
                );
                "roundrobin".into()
            }
        },
    }
}

/// A backend whose servers HAProxy never checks: warned about; the preset lb offers in a
/// comment, if the `option httpchk` URI is one's.
fn unchecked(px: &Proxy, cm: &mut Vec<String>, out: &mut Out<'_>) -> Option<String> {
    let hc = px.settings.httpchk.as_ref();
    let offered = hc.and_then(|h| h.uri.as_deref()).and_then(preset_for_uri);
    let loc = hc
        .and_then(|h| h.loc.clone())
        .unwrap_or_else(|| px.servers[0].loc.clone());
    let fix = match &offered {
        Some(p) => format!("add `check` to the server lines (or set check = \"{p}\" in lb's service, left commented out below)"),
        None => "add `check` to the server lines and an `option httpchk METHOD URI`".to_string(),
    };
    let what = if hc.is_some() {
        "option httpchk is configured but no server has `check`"
    } else {
        "no server has `check`"
    };
    out.say(cm, Severity::Warning, &loc, format!("backend {}: {what}: HAProxy never checks these servers, and neither does lb: every server always receives connections, also when it is down. To check them, {fix}", px.name));
    offered.map(str::to_string)
}

/// The check's request, from `option httpchk` (and its headers).
struct Request {
    /// The `option httpchk` line (or the backend's).
    loc: Loc,
    uri: String,
    method: Method,
    version: &'static str,
    headers: Vec<(String, String)>,
    /// Basic auth from an `Authorization` header: (user, password).
    auth: Option<(String, String)>,
    expect_status: Option<u16>,
    expect_string: Option<String>,
}

/// The check's request; `None` (an error reported) when lb cannot send it.
fn http_request(
    px: &Proxy,
    checked: &[&super::parse::Server],
    cm: &mut Vec<String>,
    out: &mut Out<'_>,
) -> Option<Request> {
    let hc = px.settings.httpchk.as_ref();
    let Some(hc) = hc else {
        out.error(&checked[0].loc, format!("backend {}: `check` without `option httpchk` is a TCP connect check, which lb does not do (its checks are HTTP role checks): add option httpchk METHOD URI", px.name));
        return None;
    };
    let hloc = hc.loc.clone().unwrap_or_else(|| px.loc.clone());
    let Some(uri) = hc.uri.clone() else {
        out.error(&hloc, format!("backend {}: option httpchk without a URI (HAProxy would send OPTIONS /, which tells nothing about a role): write e.g. option httpchk HEAD /db/manage/server/ha/master HTTP/1.0", px.name));
        return None;
    };
    let method = match hc.method.as_deref().map(str::to_ascii_uppercase).as_deref() {
        Some("HEAD") => Method::Head,
        Some("GET") => Method::Get,
        None | Some("OPTIONS") => {
            out.say(cm, Severity::Warning, &hloc, "option httpchk uses OPTIONS (HAProxy's default method); lb's checks send HEAD or GET: GET instead".into());
            Method::Get
        }
        Some(m) => {
            out.error(
                &hloc,
                format!("option httpchk: method {m} is not supported by lb (HEAD or GET)"),
            );
            return None;
        }
    };
    let version = match hc.version.as_deref() {
        None | Some("HTTP/1.0") => "HTTP/1.0",
        Some("HTTP/1.1") => "HTTP/1.1",
        Some(v) => {
            out.error(
                &hloc,
                format!("option httpchk: version {v:?} is not supported (HTTP/1.0 or HTTP/1.1)"),
            );
            return None;
        }
    };
    let mut headers = Vec::new();
    let mut auth: Option<(String, String)> = None;
    for (k, v) in &hc.headers {
        if k.eq_ignore_ascii_case("authorization") {
            match decode_basic(v) {
                Some(ua) => auth = Some(ua),
                None => {
                    out.error(&hloc, format!("backend {}: the check's Authorization header is not `Basic base64(user:password)`: lb's checks support Basic auth only", px.name));
                    return None;
                }
            }
        } else if ["connection", "content-length", "transfer-encoding"]
            .contains(&k.to_ascii_lowercase().as_str())
        {
            out.say(
                cm,
                Severity::Warning,
                &hloc,
                format!("check header {k} is managed by lb's checker: not imported"),
            );
        } else {
            headers.push((k.clone(), v.clone()));
        }
    }
    Some(Request {
        loc: hloc,
        uri,
        method,
        version,
        headers,
        auth,
        expect_status: hc.expect_status,
        expect_string: hc.expect_string.clone(),
    })
}

/// The check's timing: one value per service for each setting (the first server's).
struct Timing {
    inter: Option<At<Duration>>,
    fastinter: Option<At<Duration>>,
    downinter: Option<At<Duration>>,
    rise: Option<At<u32>>,
    fall: Option<At<u32>>,
}

fn timing(
    px: &Proxy,
    checked: &[&super::parse::Server],
    cm: &mut Vec<String>,
    out: &mut Out<'_>,
) -> Timing {
    let sopts: Vec<&ServerOpts> = checked.iter().map(|x| &x.opts).collect();
    let inter = uniform(&sopts, |o| o.inter.as_ref(), "inter", &px.name, cm, out);
    let fastinter = uniform(
        &sopts,
        |o| o.fastinter.as_ref(),
        "fastinter",
        &px.name,
        cm,
        out,
    );
    let downinter = uniform(
        &sopts,
        |o| o.downinter.as_ref(),
        "downinter",
        &px.name,
        cm,
        out,
    );
    let rise = uniform(&sopts, |o| o.rise.as_ref(), "rise", &px.name, cm, out);
    let fall = uniform(&sopts, |o| o.fall.as_ref(), "fall", &px.name, cm, out);

    Timing {
        inter,
        fastinter,
        downinter,
        rise,
        fall,
    }
}

/// The check port: lb's backends carry one; a different one for this service goes in the
/// check (`Ok(Some(port))`). `Err` (reported) when the servers disagree and share addresses.
fn check_port(
    px: &Proxy,
    s: &Svc,
    servers: &Servers,
    out: &mut Out<'_>,
) -> Result<Option<u16>, ()> {
    let Servers { lbb, member, .. } = servers;
    let eff = |si: usize| {
        let x = &px.servers[si];
        x.opts
            .port
            .as_ref()
            .map(|p| p.v)
            .or(x.port)
            .unwrap_or(s.port)
    };
    let mut port_override = None;
    let mismatch = (0..px.servers.len())
        .any(|si| member.get(&(s.be, si)).map(|&i| lbb[i].check_port) != Some(Some(eff(si))));
    if mismatch {
        let p0 = eff(0);
        if (0..px.servers.len()).all(|si| eff(si) == p0) {
            port_override = Some(p0);
        } else {
            out.error(&px.loc, format!("backend {}: its servers are checked on different ports and share addresses with other backends; lb cannot express that", px.name));
            return Err(());
        }
    }

    Ok(port_override)
}

/// A `[[check]]` table: its name, its lines (none: the preset serves as is), and the password
/// taken out of the check line.
struct Table {
    name: String,
    lines: Vec<String>,
    secret: Option<Secret>,
}

#[allow(clippy::too_many_arguments)]
fn check_table(
    px: &Proxy,
    req: &Request,
    timing: &Timing,
    port_override: Option<u16>,
    not_exclusive: bool,
    opts: &Options,
    names: &[String],
    cm: &mut Vec<String>,
    out: &mut Out<'_>,
) -> Table {
    let Request {
        loc: hloc,
        uri,
        method,
        version,
        headers,
        auth,
        expect_status,
        expect_string,
    } = req;
    let (method, version) = (*method, *version);
    let Timing {
        inter,
        fastinter,
        downinter,
        rise,
        fall,
    } = timing;
    let preset_name = preset_for_uri(uri);
    let base = preset_name.and_then(preset);
    let mut table = Vec::<String>::new();
    let mut add = |k: &str, v: String| table.push(format!("{k} = {v}"));
    match &base {
        Some(b) => {
            if b.method != method {
                add("method", q(method.as_str()));
            }
            if b.version.as_str() != version {
                add("version", q(version));
            }
        }
        None => {
            add("uri", q(uri));
            add("method", q(method.as_str()));
            add("version", q(version));
            out.say(cm, Severity::Note, hloc, format!("backend {}: the check URI {uri} matches no role preset ({}): a plain health check (no \"not in this role\" answers, not exclusive)", px.name, PRESET_NAMES.join(", ")));
        }
    }
    if let Some(st) = *expect_status {
        if base.as_ref().is_none_or(|b| b.expect_status != st) {
            add("expect_status", st.to_string());
        }
    }
    if let Some(sv) = expect_string {
        if base
            .as_ref()
            .is_none_or(|b| b.expect_body.as_deref() != Some(sv.as_str()))
        {
            add("expect_body", q(sv));
        }
        if method == Method::Head {
            out.say(cm, Severity::Warning, hloc, "http-check expect string with a HEAD check: HEAD answers carry no body; lb judges the status only".into());
        }
    } else if expect_status.is_none() && base.is_none() {
        out.say(
            cm,
            Severity::Note,
            hloc,
            "no http-check expect: HAProxy accepts any 2xx or 3xx; lb expects 200".into(),
        );
    }
    if !headers.is_empty() {
        let h: Vec<String> = headers
            .iter()
            .map(|(k, v)| format!("{} = {}", q(k), q(v)))
            .collect();
        add("headers", format!("{{ {} }}", h.join(", ")));
    }
    if let Some(p) = port_override {
        add("port", p.to_string());
    }
    for (k, v) in [
        ("inter", &inter),
        ("fastinter", &fastinter),
        ("downinter", &downinter),
    ] {
        if let Some(v) = v {
            add(k, q(&human(v.v)));
        }
    }
    if let Some(t) = &px.settings.timeout_check {
        add("timeout", q(&human(t.v)));
    }
    if let Some(r) = &rise {
        add("rise", r.v.to_string());
    }
    if let Some(f) = &fall {
        add("fall", f.v.to_string());
    }
    if not_exclusive {
        add("exclusive", "false".into());
    }
    // The check's name: the backend's, unless a preset or another check has it.
    let mut cname = px.name.clone();
    if PRESET_NAMES.contains(&cname.as_str()) || names.contains(&cname) {
        cname = format!("{}-check", px.name);
    }
    let mut n = 2;
    while names.contains(&cname) {
        cname = format!("{}-check{n}", px.name);
        n += 1;
    }
    let mut secret = None;
    if let Some((user, password)) = auth {
        let path = opts.password_dir.join(format!("{cname}.password"));
        out.say(cm, Severity::Note, hloc, format!("the check's credentials (user {user:?}) were in the check line: the password is now in {} (0600), never printed", path.display()));
        add("user", q(user));
        add("password_file", q(&path.display().to_string()));
        secret = Some(Secret::new(path, password.clone()));
    }
    Table {
        name: cname,
        lines: table,
        secret,
    }
}

/// The balance of a service: for an exclusive role (`role`: its preset) none (one member),
/// unless `--faithful` keeps HAProxy's; else lb's for HAProxy's `balance` line.
fn role_balance(
    px: &Proxy,
    role: Option<&str>,
    hloc: &Loc,
    opts: &Options,
    cm: &mut Vec<String>,
    out: &mut Out<'_>,
) -> Option<String> {
    if let Some(p) = role {
        let bloc = px
            .settings
            .balance
            .as_ref()
            .map(|b| b.loc.clone())
            .unwrap_or_else(|| hloc.clone());
        let how = match &px.settings.balance {
            None => "has no balance line, so HAProxy round-robins it over every server whose check passes".to_string(),
            Some(b) => format!("says balance {}, so HAProxy spreads it over every server whose check passes", b.v),
        };
        if opts.faithful {
            out.say(cm, Severity::Note, &bloc, format!("backend {} {how}; --faithful keeps that: {p} with exclusive = false and round robin, so two servers claiming the role during a failover both receive writes", px.name));
            Some(balance_of(px, cm, out))
        } else {
            out.say(cm, Severity::Note, &bloc, format!("backend {} {how}; lb imports it as {p}'s exclusive role: at most one server receives writes, never two during a failover (import with --faithful to keep round robin)", px.name));
            if let Some(b) = &px.settings.balance {
                out.say(
                    cm,
                    Severity::Note,
                    &b.loc,
                    format!(
                        "balance {} does not apply to an exclusive role (one member)",
                        b.v
                    ),
                );
            }
            None
        }
    } else {
        Some(balance_of(px, cm, out))
    }
}

/// `on_down`: reset with `on-marked-down shutdown-sessions` on every server, or for an
/// exclusive role; else drain, as HAProxy does.
fn on_down(
    px: &Proxy,
    checked: &[&super::parse::Server],
    exclusive: bool,
    cm: &mut Vec<String>,
    out: &mut Out<'_>,
) -> &'static str {
    let sd: Vec<bool> = checked
        .iter()
        .map(|x| x.opts.shutdown_sessions.as_ref().is_some_and(|b| b.v))
        .collect();
    if sd.iter().all(|b| *b) {
        if let Some(l) = checked[0]
            .opts
            .shutdown_sessions
            .as_ref()
            .map(|a| a.loc.clone())
        {
            out.say(cm, Severity::Note, &l, "on-marked-down shutdown-sessions: on_down = \"reset\" (a server taken out gets its connections reset)".into());
        }
        "reset"
    } else if exclusive {
        // The role moved: the old holder's connections (a driver's pool) would keep writing to
        // a server that is no longer the master, as they do with HAProxy.
        out.say(cm, Severity::Note, &checked[0].loc, format!("backend {}: on_down = \"reset\", unlike HAProxy without on-marked-down shutdown-sessions: when the role moves, the old master's pooled connections are reset so that drivers reconnect to the new one instead of writing to a demoted master (--faithful keeps HAProxy's drain)", px.name));
        "reset"
    } else {
        let partial = if sd.iter().any(|b| *b) {
            "only some servers say on-marked-down shutdown-sessions: "
        } else {
            ""
        };
        out.say(cm, Severity::Warning, &checked[0].loc, format!("backend {}: {partial}no on-marked-down shutdown-sessions, so a server marked down keeps its connections, as in HAProxy: on_down = \"drain\"; add the option to the server lines (or set on_down = \"reset\") to reset them", px.name));
        "drain"
    }
}

/// The role preset whose URI is `uri`.
fn preset_for_uri(uri: &str) -> Option<&'static str> {
    PRESET_NAMES
        .iter()
        .copied()
        .find(|n| preset(n).is_some_and(|p| p.uri == uri))
}

/// `Basic base64(user:password)` as (user, password).
fn decode_basic(v: &str) -> Option<(String, String)> {
    let (scheme, token) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    (!u.is_empty() && !p.is_empty()).then(|| (u.to_string(), p.to_string()))
}
