//! The HAProxy subset lb imports, parsed into a model (no lb semantics here). Every line that
//! is not understood becomes a diagnostic with its file and line; nothing is dropped silently.
use std::{fmt, net::Ipv4Addr, sync::Arc, time::Duration};

use super::{tokenize::words, Diagnostic, Severity};

/// Where a line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub file: Arc<str>,
    pub line: usize,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A value and the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At<T> {
    pub v: T,
    pub loc: Loc,
}

/// Options of `server` and `default-server` lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerOpts {
    pub check: Option<At<bool>>,
    pub port: Option<At<u16>>,
    pub inter: Option<At<Duration>>,
    pub fastinter: Option<At<Duration>>,
    pub downinter: Option<At<Duration>>,
    pub rise: Option<At<u32>>,
    pub fall: Option<At<u32>>,
    pub maxconn: Option<At<u32>>,
    /// `on-marked-down shutdown-sessions`.
    pub shutdown_sessions: Option<At<bool>>,
}

impl ServerOpts {
    /// `self` with the unset options taken from `base` (a `default-server` line).
    fn over(mut self, base: &ServerOpts) -> ServerOpts {
        macro_rules! inherit {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = base.$f.clone(); } )* };
        }
        inherit!(
            check,
            port,
            inter,
            fastinter,
            downinter,
            rise,
            fall,
            maxconn,
            shutdown_sessions
        );
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub name: String,
    pub addr: Ipv4Addr,
    /// `None`: HAProxy connects to the port the client connected to.
    pub port: Option<u16>,
    pub opts: ServerOpts,
    pub loc: Loc,
}

/// The check request and expectation (`option httpchk` and `http-check`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpChk {
    pub method: Option<String>,
    pub uri: Option<String>,
    pub version: Option<String>,
    /// Extra headers, in order, including any `Authorization` (the translator takes it out).
    pub headers: Vec<(String, String)>,
    pub expect_status: Option<u16>,
    pub expect_string: Option<String>,
    /// The `option httpchk` line.
    pub loc: Option<Loc>,
}

/// What `defaults` passes on to the proxies after it, and what a proxy may override.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub mode: Option<At<String>>,
    pub timeout_connect: Option<At<Duration>>,
    pub timeout_client: Option<At<Duration>>,
    pub timeout_server: Option<At<Duration>>,
    pub timeout_check: Option<At<Duration>>,
    pub balance: Option<At<String>>,
    pub httpchk: Option<HttpChk>,
    pub default_server: ServerOpts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Frontend,
    Backend,
    Listen,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Frontend => "frontend",
            Kind::Backend => "backend",
            Kind::Listen => "listen",
        }
    }
}

/// `bind ADDR:PORT`; `addr` is `None` for `*`, `0.0.0.0` or an empty address (all addresses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub addr: Option<Ipv4Addr>,
    pub port: u16,
    /// The address as written (`*`, `0.0.0.0`, ...).
    pub text: String,
    pub loc: Loc,
}

#[derive(Debug, Clone)]
pub struct Proxy {
    pub kind: Kind,
    pub name: String,
    pub loc: Loc,
    pub settings: Settings,
    pub binds: Vec<Bind>,
    pub default_backend: Option<At<String>>,
    pub servers: Vec<Server>,
    pub stats_enable: Option<Loc>,
    /// `stats auth USER:PASSWORD`.
    pub stats_auth: Option<At<(String, String)>>,
    pub stats_refresh: Option<At<Duration>>,
    /// `stats admin if COND`: the stats page's operator actions are on.
    pub stats_admin: Option<Loc>,
}

/// Everything parsed from the files, in order.
#[derive(Debug, Default)]
pub struct Parsed {
    pub global_maxconn: Option<At<u32>>,
    pub proxies: Vec<Proxy>,
    /// Secrets seen on any line (to redact them from every message).
    pub secrets: Vec<String>,
}

enum Section {
    None,
    Global,
    Defaults,
    Proxy,
    /// A section kind lb does not import (its lines are reported once, with the header).
    Ignored,
}

/// Parses `text` (from `file`) into `out`, carrying `defaults` across files like HAProxy
/// does with several `-f`.
pub struct Parser {
    pub out: Parsed,
    pub diags: Vec<Diagnostic>,
    defaults: Settings,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

fn ctx_err(loc: &Loc, msg: impl Into<String>) -> Diagnostic {
    Diagnostic::new(Severity::Error, loc.clone(), msg)
}

fn ctx_warn(loc: &Loc, msg: impl Into<String>) -> Diagnostic {
    Diagnostic::new(Severity::Warning, loc.clone(), msg)
}

fn ctx_note(loc: &Loc, msg: impl Into<String>) -> Diagnostic {
    Diagnostic::new(Severity::Note, loc.clone(), msg)
}

/// HAProxy's time format: a number and an optional unit (`us`, `ms`, `s`, `m`, `h`, `d`);
/// without a unit, milliseconds.
pub fn parse_time(s: &str) -> Result<Duration, String> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (n, unit) = s.split_at(digits);
    let n: u64 = n.parse().map_err(|_| {
        format!("{s:?} is not a time: a number with an optional unit us, ms, s, m, h, d (default ms), e.g. 30s")
    })?;
    let d = match unit {
        "" | "ms" => Duration::from_millis(n),
        "us" => Duration::from_micros(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        _ => {
            return Err(format!(
                "{s:?} is not a time: unknown unit {unit:?} (us, ms, s, m, h, d)"
            ))
        }
    };
    Ok(d)
}

fn parse_num<T: std::str::FromStr>(what: &str, s: Option<&String>) -> Result<T, String> {
    let s = s.ok_or_else(|| format!("{what} needs a value"))?;
    s.parse()
        .map_err(|_| format!("{what} {s:?} is not a valid number"))
}

fn parse_port(what: &str, s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{what}: port {s:?} is not a port number (1-65535)")),
    }
}

/// `ADDR:PORT` of a `server` line: an IPv4 address, optionally a port.
fn parse_server_addr(s: &str) -> Result<(Ipv4Addr, Option<u16>), String> {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let addr: Ipv4Addr = host.parse().map_err(|_| {
        if host.contains(':') || host.starts_with('[') || host.starts_with("ipv6@") {
            format!("address {s:?}: lb balances IPv4 only")
        } else {
            format!("address {s:?}: {host:?} is not an IPv4 address (lb does not resolve host names; write the address)")
        }
    })?;
    let port = match port {
        None => None,
        Some(p) if p.contains('-') || p.starts_with('+') => {
            return Err(format!(
                "address {s:?}: port ranges and offsets are not supported; write one port"
            ))
        }
        Some(p) => Some(parse_port(&format!("address {s:?}"), p)?),
    };
    Ok((addr, port))
}

/// One `bind` address: `*:PORT`, `:PORT`, `0.0.0.0:PORT` or `ADDR:PORT`.
fn parse_bind(s: &str, loc: &Loc) -> Result<Bind, String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!(
            "bind {s:?} has no port: write ADDR:PORT or *:PORT (e.g. *:7680)"
        ));
    };
    if host.contains(':') || host.starts_with('[') {
        return Err(format!("bind {s:?}: lb balances IPv4 only"));
    }
    if port.contains('-') {
        return Err(format!(
            "bind {s:?}: port ranges are not supported; write one port"
        ));
    }
    let port = parse_port(&format!("bind {s:?}"), port)?;
    let addr = match host {
        "" | "*" | "0.0.0.0" => None,
        h => Some(h.parse::<Ipv4Addr>().map_err(|_| {
            format!("bind {s:?}: {h:?} is not an IPv4 address (lb does not resolve host names)")
        })?),
    };
    Ok(Bind {
        addr,
        port,
        text: host.to_string(),
        loc: loc.clone(),
    })
}

/// Splits the manual's version word `HTTP/1.0\r\nName: value\r\n...` into the version and the
/// header lines written after it.
fn split_version(word: &str) -> Result<(String, Vec<(String, String)>), String> {
    let mut parts = word.split("\r\n");
    let version = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    for h in parts {
        if h.is_empty() {
            continue;
        }
        let (name, value) = h.split_once(':').ok_or_else(|| {
            format!(
                "header line {:?} after the HTTP version is not \"Name: value\"",
                h.split(' ').next().unwrap_or_default()
            )
        })?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    Ok((version, headers))
}

impl Parser {
    pub fn new() -> Self {
        Self {
            out: Parsed::default(),
            diags: Vec::new(),
            defaults: Settings::default(),
        }
    }

    /// Parses one file.
    pub fn file(&mut self, file: &str, text: &str) {
        let file: Arc<str> = Arc::from(file);
        let mut section = Section::None;
        let mut ignored_from: Option<(Loc, String, usize)> = None;
        for (i, line) in text.lines().enumerate() {
            let loc = Loc {
                file: file.clone(),
                line: i + 1,
            };
            let w = match words(line) {
                Ok(w) => w,
                Err(e) => {
                    self.diags.push(ctx_err(&loc, e));
                    continue;
                }
            };
            let Some(kw) = w.first() else { continue };
            let new_section = match kw.as_str() {
                "global" => Some(Section::Global),
                "defaults" => Some(Section::Defaults),
                "frontend" | "backend" | "listen" => Some(Section::Proxy),
                "userlist" | "peers" | "resolvers" | "mailers" | "program" | "cache" | "ring"
                | "http-errors" | "fcgi-app" | "crt-store" | "traces" | "log-forward" => {
                    Some(Section::Ignored)
                }
                _ => None,
            };
            if let Some(s) = new_section {
                self.close_ignored(&mut ignored_from);
                section = s;
                match section {
                    Section::Defaults => {
                        // A new defaults section starts from scratch (HAProxy resets them).
                        self.defaults = Settings::default();
                        if w.len() > 2 {
                            self.diags.push(ctx_warn(&loc, format!("defaults {:?}: named defaults with `from` are not supported; the words after the name are ignored", w[1])));
                        }
                    }
                    Section::Proxy => self.start_proxy(&w, &loc),
                    Section::Ignored => ignored_from = Some((loc.clone(), kw.clone(), i + 1)),
                    Section::Global | Section::None => {}
                }
                continue;
            }
            match section {
                Section::None => self.diags.push(ctx_err(
                    &loc,
                    format!("{kw:?} outside of any section (global, defaults, frontend, backend, listen)"),
                )),
                Section::Global => self.global(&w, &loc),
                Section::Defaults => {
                    let mut s = std::mem::take(&mut self.defaults);
                    self.setting(&mut s, &w, &loc, "defaults");
                    self.defaults = s;
                }
                Section::Proxy => self.proxy_line(&w, &loc),
                Section::Ignored => {
                    if let Some(x) = ignored_from.as_mut() {
                        x.2 = i + 1;
                    }
                }
            }
        }
        self.close_ignored(&mut ignored_from);
    }

    fn close_ignored(&mut self, ignored: &mut Option<(Loc, String, usize)>) {
        if let Some((loc, kw, last)) = ignored.take() {
            self.diags.push(ctx_warn(
                &loc,
                format!(
                    "section `{kw}` is not supported by lb: lines {}-{last} are ignored",
                    loc.line
                ),
            ));
        }
    }

    fn global(&mut self, w: &[String], loc: &Loc) {
        match w[0].as_str() {
            "maxconn" => match parse_num::<u32>("maxconn", w.get(1)) {
                Ok(n) => self.out.global_maxconn = Some(At { v: n, loc: loc.clone() }),
                Err(e) => self.diags.push(ctx_err(loc, e)),
            },
            "daemon" | "user" | "group" | "uid" | "gid" | "chroot" | "pidfile" | "nbproc"
            | "nbthread" | "master-worker" => self.diags.push(ctx_note(
                loc,
                format!("global `{}` ignored: process management is the service manager's job (lb runs in the foreground, e.g. under systemd)", w[0]),
            )),
            "log" => self.diags.push(ctx_warn(
                loc,
                "global `log` ignored: lb logs to stderr (journald under systemd)",
            )),
            "stats" => self.diags.push(ctx_warn(
                loc,
                "global `stats` ignored: lb's runtime interface is `lb status` and `lb server NAME drain|disable|enable`",
            )),
            kw => self.diags.push(ctx_warn(
                loc,
                format!("global `{kw}` is not understood by lb: ignored"),
            )),
        }
    }

    fn start_proxy(&mut self, w: &[String], loc: &Loc) {
        let kind = match w[0].as_str() {
            "frontend" => Kind::Frontend,
            "backend" => Kind::Backend,
            _ => Kind::Listen,
        };
        let name = match w.get(1) {
            Some(n) => n.clone(),
            None => {
                self.diags
                    .push(ctx_err(loc, format!("`{}` needs a name", w[0])));
                format!("unnamed-{}", loc.line)
            }
        };
        if w.len() > 2 {
            self.diags.push(ctx_warn(
                loc,
                format!(
                    "{} {name}: the words after the name ({}) are not supported: ignored",
                    w[0],
                    w[2..].join(" ")
                ),
            ));
        }
        let settings = self.defaults.clone();
        self.out.proxies.push(Proxy {
            kind,
            name,
            loc: loc.clone(),
            settings,
            binds: Vec::new(),
            default_backend: None,
            servers: Vec::new(),
            stats_enable: None,
            stats_auth: None,
            stats_refresh: None,
            stats_admin: None,
        });
    }

    /// A line that `defaults` and proxies share. `Ok(true)` if it was one.
    fn setting(&mut self, s: &mut Settings, w: &[String], loc: &Loc, section: &str) -> bool {
        match w[0].as_str() {
            "mode" => match w.get(1).map(String::as_str) {
                Some(m @ ("tcp" | "http")) => s.mode = Some(mk(loc, m.to_string())),
                Some(m) => self.diags.push(ctx_err(loc, format!("mode {m:?}: expected tcp or http"))),
                None => self.diags.push(ctx_err(loc, "mode needs tcp or http")),
            },
            "timeout" => {
                let (Some(which), Some(value)) = (w.get(1), w.get(2)) else {
                    self.diags.push(ctx_err(loc, "timeout needs a name and a time, e.g. `timeout connect 5s`"));
                    return true;
                };
                let d = match parse_time(value) {
                    Ok(d) => d,
                    Err(e) => {
                        self.diags.push(ctx_err(loc, format!("timeout {which}: {e}")));
                        return true;
                    }
                };
                match which.as_str() {
                    "connect" => s.timeout_connect = Some(mk(loc, d)),
                    "client" => s.timeout_client = Some(mk(loc, d)),
                    "server" => s.timeout_server = Some(mk(loc, d)),
                    "check" => s.timeout_check = Some(mk(loc, d)),
                    "http-request" | "http-keep-alive" | "queue" | "tarpit" | "client-fin"
                    | "server-fin" | "tunnel" => self.diags.push(ctx_warn(
                        loc,
                        format!("timeout {which} is not applied: lb balances at L4 and has only `[timeouts] connect` and `idle`"),
                    )),
                    other => self.diags.push(ctx_err(loc, format!("unknown timeout {other:?} (connect, client, server, check)"))),
                }
            }
            "balance" => match w.get(1) {
                Some(b) => s.balance = Some(mk(loc, b.clone())),
                None => self.diags.push(ctx_err(loc, "balance needs an algorithm, e.g. roundrobin")),
            },
            "option" if w.get(1).map(String::as_str) == Some("httpchk") => {
                let mut c = HttpChk {
                    loc: Some(loc.clone()),
                    ..Default::default()
                };
                match &w[2..] {
                    [] => {}
                    [uri] => c.uri = Some(uri.clone()),
                    [m, uri] => {
                        c.method = Some(m.clone());
                        c.uri = Some(uri.clone());
                    }
                    [m, uri, ver, rest @ ..] => {
                        c.method = Some(m.clone());
                        c.uri = Some(uri.clone());
                        match split_version(ver) {
                            Ok((v, h)) => {
                                self.note_secrets(&h);
                                c.version = Some(v);
                                c.headers = h;
                            }
                            Err(e) => self.diags.push(ctx_err(loc, format!("option httpchk: {e}"))),
                        }
                        if !rest.is_empty() {
                            self.diags.push(ctx_err(
                                loc,
                                format!("option httpchk: {} word(s) after the HTTP version (escape spaces in headers with `\\ `, as the manual does)", rest.len()),
                            ));
                        }
                    }
                }
                s.httpchk = Some(c);
            }
            "option" => {
                let o = w.get(1).map(String::as_str).unwrap_or_default();
                let msg = match o {
                    "tcplog" | "httplog" | "dontlognull" | "log-health-checks" => {
                        format!("option {o} ignored: lb logs check transitions and set changes itself; connections are counted, not logged")
                    }
                    "redispatch" => "option redispatch ignored: lb picks a server once, at the SYN, and never re-sends a connection elsewhere".into(),
                    "tcpka" | "clitcpka" | "srvtcpka" => {
                        format!("option {o} ignored: lb forwards TCP keepalives end to end but does not send its own")
                    }
                    "forwardfor" | "http-server-close" | "httpclose" | "http-keep-alive" => {
                        format!("option {o} is an L7 feature: not applied (lb balances at L4)")
                    }
                    "" => "option needs a name".into(),
                    other => format!("option {other} is not understood by lb: ignored"),
                };
                self.diags.push(ctx_warn(loc, msg));
            }
            "http-check" => self.http_check(s, w, loc),
            "default-server" => {
                if let Some(o) = self.server_opts(&w[1..], loc) {
                    s.default_server = o.over(&s.default_server);
                }
            }
            "log" => self.diags.push(ctx_warn(loc, format!("{section}: `log` ignored: lb logs to stderr"))),
            "retries" => self.diags.push(ctx_warn(
                loc,
                "retries ignored: lb does not retry connections (the client's SYN retransmissions reach the same server)",
            )),
            _ => return false,
        }
        true
    }

    fn http_check(&mut self, s: &mut Settings, w: &[String], loc: &Loc) {
        let c = s.httpchk.get_or_insert_with(HttpChk::default);
        match w.get(1).map(String::as_str) {
            Some("send") => {
                let mut i = 2;
                let mut headers = Vec::new();
                while i < w.len() {
                    let key = w[i].as_str();
                    let (Some(v1), v2) = (w.get(i + 1), w.get(i + 2)) else {
                        self.diags.push(ctx_err(loc, format!("http-check send: `{key}` needs a value")));
                        return;
                    };
                    match key {
                        "meth" => c.method = Some(v1.clone()),
                        "uri" => c.uri = Some(v1.clone()),
                        "ver" => c.version = Some(v1.clone()),
                        "hdr" => {
                            let Some(v2) = v2 else {
                                self.diags.push(ctx_err(loc, "http-check send: `hdr` needs a name and a value"));
                                return;
                            };
                            headers.push((v1.clone(), v2.clone()));
                            i += 1;
                        }
                        other => {
                            self.diags.push(ctx_warn(
                                loc,
                                format!("http-check send: `{other}` is not supported (meth, uri, ver, hdr): ignored"),
                            ));
                        }
                    }
                    i += 2;
                }
                self.note_secrets(&headers);
                let c = s.httpchk.get_or_insert_with(HttpChk::default);
                c.headers.extend(headers);
                if c.loc.is_none() {
                    c.loc = Some(loc.clone());
                }
            }
            Some("expect") => match (w.get(2).map(String::as_str), w.get(3)) {
                (Some("status"), Some(v)) => match v.parse::<u16>() {
                    Ok(n) if (100..=599).contains(&n) => c.expect_status = Some(n),
                    _ => self.diags.push(ctx_err(
                        loc,
                        format!("http-check expect status {v:?}: lb expects one status (100-599); lists and ranges are not supported"),
                    )),
                },
                (Some("string"), Some(v)) => c.expect_string = Some(v.clone()),
                (Some(k), _) => self.diags.push(ctx_err(
                    loc,
                    format!("http-check expect {k}: not supported (lb supports `expect status N` and `expect string S`)"),
                )),
                (None, _) => self.diags.push(ctx_err(loc, "http-check expect needs `status N` or `string S`")),
            },
            Some(k) => self.diags.push(ctx_warn(
                loc,
                format!("http-check {k}: not supported (send, expect): ignored"),
            )),
            None => self.diags.push(ctx_err(loc, "http-check needs send or expect")),
        }
    }

    /// Remembers the credentials in `headers` so that no message prints them.
    fn note_secrets(&mut self, headers: &[(String, String)]) {
        for (k, v) in headers {
            if k.eq_ignore_ascii_case("authorization") {
                if let Some((_, token)) = v.split_once(' ') {
                    self.out.secrets.push(token.trim().to_string());
                }
                self.out.secrets.push(v.clone());
            }
        }
    }

    /// The options of a `server` / `default-server` line; `None` after an error.
    fn server_opts(&mut self, w: &[String], loc: &Loc) -> Option<ServerOpts> {
        let mut o = ServerOpts::default();
        let mut i = 0;
        let mut ok = true;
        while i < w.len() {
            let key = w[i].as_str();
            let val = w.get(i + 1);
            let mut took = 0;
            let r: Result<(), String> = (|| {
                match key {
                    "check" => o.check = Some(mk(loc, true)),
                    "no-check" => o.check = Some(mk(loc, false)),
                    "port" => {
                        let v = val.ok_or("port needs a number")?;
                        o.port = Some(mk(loc, parse_port("port", v)?));
                        took = 1;
                    }
                    "inter" | "fastinter" | "downinter" => {
                        let v = val.ok_or_else(|| format!("{key} needs a time"))?;
                        let d = parse_time(v).map_err(|e| format!("{key}: {e}"))?;
                        if d.is_zero() {
                            return Err(format!("{key} must be more than 0"));
                        }
                        let d = Some(mk(loc, d));
                        match key {
                            "inter" => o.inter = d,
                            "fastinter" => o.fastinter = d,
                            _ => o.downinter = d,
                        }
                        took = 1;
                    }
                    "rise" | "fall" => {
                        let n: u32 = parse_num(key, val)?;
                        if n == 0 {
                            return Err(format!("{key} must be at least 1"));
                        }
                        if key == "rise" {
                            o.rise = Some(mk(loc, n));
                        } else {
                            o.fall = Some(mk(loc, n));
                        }
                        took = 1;
                    }
                    "maxconn" => {
                        o.maxconn = Some(mk(loc, parse_num(key, val)?));
                        took = 1;
                    }
                    "on-marked-down" => {
                        let v = val.ok_or("on-marked-down needs an action (shutdown-sessions)")?;
                        if v != "shutdown-sessions" {
                            return Err(format!(
                                "on-marked-down {v:?}: only shutdown-sessions is supported"
                            ));
                        }
                        o.shutdown_sessions = Some(mk(loc, true));
                        took = 1;
                    }
                    "weight" | "backup" | "disabled" | "ssl" | "check-ssl" | "send-proxy"
                    | "send-proxy-v2" | "cookie" | "slowstart" | "agent-check" | "resolvers"
                    | "observe" | "error-limit" | "on-error" | "on-marked-up" | "minconn"
                    | "maxqueue" | "track" => {
                        return Err(format!("server option `{key}` is not supported by lb"))
                    }
                    _ => return Err(format!("unknown server option `{key}`")),
                }
                Ok(())
            })();
            if let Err(e) = r {
                // Unsupported options change routing (backup, weight...): an error, not a note.
                self.diags.push(ctx_err(loc, e));
                ok = false;
            }
            i += 1 + took;
        }
        ok.then_some(o)
    }

    fn proxy_line(&mut self, w: &[String], loc: &Loc) {
        let Some(mut p) = self.out.proxies.pop() else {
            return;
        };
        let kind = p.kind;
        let fe = matches!(kind, Kind::Frontend | Kind::Listen);
        let be = matches!(kind, Kind::Backend | Kind::Listen);
        let kw = w[0].as_str();
        let wrong = |what: &str| format!("`{kw}` is not allowed in a {}: {what}", kind.as_str());
        let mut settings = std::mem::take(&mut p.settings);
        let handled = self.setting(&mut settings, w, loc, kind.as_str());
        p.settings = settings;
        if !handled {
            match kw {
                "bind" if fe => {
                    let Some(addrs) = w.get(1) else {
                        self.diags.push(ctx_err(loc, "bind needs ADDR:PORT, e.g. *:7680"));
                        self.out.proxies.push(p);
                        return;
                    };
                    for a in addrs.split(',') {
                        match parse_bind(a, loc) {
                            Ok(b) => p.binds.push(b),
                            Err(e) => self.diags.push(ctx_err(loc, e)),
                        }
                    }
                    if w.len() > 2 {
                        self.diags.push(ctx_err(
                            loc,
                            format!("bind options ({}) are not supported by lb", w[2..].join(" ")),
                        ));
                    }
                }
                "default_backend" if fe => match w.get(1) {
                    Some(b) => p.default_backend = Some(At { v: b.clone(), loc: loc.clone() }),
                    None => self.diags.push(ctx_err(loc, "default_backend needs a backend name")),
                },
                "use_backend" if fe => self.diags.push(ctx_err(
                    loc,
                    "use_backend (rules choosing a backend per connection) is not supported: lb sends each bind to one backend (default_backend)",
                )),
                "server" if be => self.server(&mut p, w, loc),
                "stats" if kind == Kind::Listen || kind == Kind::Frontend => {
                    match (w.get(1).map(String::as_str), w.get(2)) {
                        (Some("enable"), _) => p.stats_enable = Some(loc.clone()),
                        (Some("auth"), Some(ua)) => match ua.split_once(':') {
                            Some((u, pw)) => {
                                self.out.secrets.push(pw.to_string());
                                p.stats_auth = Some(At { v: (u.to_string(), pw.to_string()), loc: loc.clone() });
                            }
                            None => self.diags.push(ctx_err(loc, "stats auth needs USER:PASSWORD")),
                        },
                        (Some("admin"), _) => p.stats_admin = Some(loc.clone()),
                        (Some("refresh"), Some(t)) => match parse_time(t) {
                            Ok(d) => p.stats_refresh = Some(At { v: d, loc: loc.clone() }),
                            Err(e) => self.diags.push(ctx_err(loc, format!("stats refresh: {e}"))),
                        },
                        (Some(k), _) => self.diags.push(ctx_warn(
                            loc,
                            format!("stats {k}: not supported (lb's admin server has a fixed layout: / dashboard, /stats.json, ;csv, /metrics): ignored"),
                        )),
                        (None, _) => self.diags.push(ctx_err(loc, "stats needs a keyword (enable, auth, refresh)")),
                    }
                }
                "bind" | "default_backend" | "use_backend" => {
                    self.diags.push(ctx_err(loc, wrong("it belongs in a frontend or listen section")))
                }
                "server" => self.diags.push(ctx_err(loc, wrong("it belongs in a backend or listen section"))),
                "acl" | "tcp-request" | "http-request" | "http-response" | "tcp-response"
                | "stick-table" | "stick" | "cookie" | "capture" | "redirect" | "errorfile"
                | "hash-type" | "compression" => self.diags.push(ctx_err(
                    loc,
                    format!("`{kw}` is not supported by lb (an L7 or rule feature): the config would not mean the same"),
                )),
                "maxconn" if fe => self.diags.push(ctx_warn(
                    loc,
                    "frontend maxconn is not implemented by lb yet: not enforced",
                )),
                _ => self.diags.push(ctx_err(loc, format!("unknown keyword `{kw}` in {} {}", kind.as_str(), p.name))),
            }
        }
        self.out.proxies.push(p);
    }

    fn server(&mut self, p: &mut Proxy, w: &[String], loc: &Loc) {
        let Some(name) = w.get(1) else {
            self.diags.push(ctx_err(
                loc,
                "server needs a name and an address: server NAME ADDR:PORT [check]",
            ));
            return;
        };
        let Some(addr) = w.get(2) else {
            self.diags.push(ctx_err(
                loc,
                format!("server {name} has no address: server NAME ADDR:PORT [check]"),
            ));
            return;
        };
        let (addr, port) = match parse_server_addr(addr) {
            Ok(a) => a,
            Err(e) => {
                let hint = if addr.parse::<u32>().is_err() && self.looks_like_option(addr) {
                    format!("server {name} has no address (found option {addr:?}): server NAME ADDR:PORT [check]")
                } else {
                    format!("server {name}: {e}")
                };
                self.diags.push(ctx_err(loc, hint));
                return;
            }
        };
        if p.servers.iter().any(|s| &s.name == name) {
            self.diags.push(ctx_err(
                loc,
                format!(
                    "server {name} is defined twice in {} {}",
                    p.kind.as_str(),
                    p.name
                ),
            ));
            return;
        }
        let Some(opts) = self.server_opts(&w[3..], loc) else {
            return;
        };
        p.servers.push(Server {
            name: name.clone(),
            addr,
            port,
            opts: opts.over(&p.settings.default_server),
            loc: loc.clone(),
        });
    }

    fn looks_like_option(&self, w: &str) -> bool {
        matches!(
            w,
            "check"
                | "port"
                | "inter"
                | "rise"
                | "fall"
                | "maxconn"
                | "weight"
                | "backup"
                | "on-marked-down"
        )
    }
}

fn mk<T>(loc: &Loc, v: T) -> At<T> {
    At {
        v,
        loc: loc.clone(),
    }
}
