//! What a health check is: the [`CheckSpec`] model, the presets, and the TOML `[[check]]` form.
//!
//! Semantics follow HAProxy's `option httpchk` / `http-check` with lb's role rules (see
//! [`super::machine`]). Deliberate deviations from HAProxy, documented here once:
//! - `fastinter` defaults to 250 ms (or `inter` if that is shorter) for role checks, i.e. checks
//!   with `negative_status` answers, which all presets are; HAProxy defaults it to `inter`.
//! - `timeout` defaults to 1 s, or `inter` if that is shorter (HAProxy: `timeout check`, else
//!   `inter`).
//! - Servers start DOWN until their first check passes (HAProxy starts them UP).
use std::{collections::BTreeMap, fmt, path::PathBuf, time::Duration};

use base64::Engine;
use serde::Deserialize;

/// The request method of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// No body in the answer: only the status is judged (`expect_body` is not checked).
    Head,
    Get,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Head => "HEAD",
            Method::Get => "GET",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The HTTP version written in the request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    /// As in the Neo4j manual (`HEAD ... HTTP/1.0`); the connection closes after the answer.
    Http10,
    /// Sent with `connection: close` (and a `host` header unless one is configured).
    Http11,
}

impl HttpVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpVersion::Http10 => "HTTP/1.0",
            HttpVersion::Http11 => "HTTP/1.1",
        }
    }
}

impl fmt::Display for HttpVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Basic auth credentials. The password is never printed: `Debug` shows `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicAuth {
    pub user: String,
    pub password: String,
}

impl BasicAuth {
    /// The `Authorization` header value: `Basic base64(user:password)`. Never log it.
    pub fn header_value(&self) -> String {
        let raw = format!("{}:{}", self.user, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

impl fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BasicAuth")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// One health check, fully resolved (presets applied, defaults filled in, password read).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckSpec {
    /// The preset or `[[check]]` name.
    pub name: String,
    pub method: Method,
    /// Request target, starting with `/`.
    pub uri: String,
    pub version: HttpVersion,
    /// Extra request headers, in order (names as configured; written lowercased like HAProxy 2.6).
    pub headers: Vec<(String, String)>,
    pub auth: Option<BasicAuth>,
    /// Overrides the backend's check port (Patroni presets: 8008).
    pub port: Option<u16>,
    /// The status of a positive answer (default 200).
    pub expect_status: u16,
    /// A substring that must be in the body of a positive answer. Not checked for HEAD, whose
    /// answers carry no body: the manual's HEAD checks rely on the status alone.
    pub expect_body: Option<String>,
    /// Statuses that are a definitive "not in this role" answer (Neo4j 404, Patroni 503).
    pub negative_status: Vec<u16>,
    /// At most one member may hold the role (master / writable / primary).
    pub exclusive: bool,
    /// Interval while UP and stable (default 2 s).
    pub inter: Duration,
    /// Interval while in transition (default 250 ms for role checks, see the module doc).
    pub fastinter: Duration,
    /// Interval while DOWN (default `inter`).
    pub downinter: Duration,
    /// Consecutive positives that bring a DOWN server UP (default 2).
    pub rise: u32,
    /// Consecutive failures that take an UP server DOWN (default 3).
    pub fall: u32,
    /// Bound on one whole check: connect, request and answer (default 1 s).
    pub timeout: Duration,
}

/// Every preset name, in documentation order.
pub const PRESET_NAMES: &[&str] = &[
    "neo4j-ha-master",
    "neo4j-ha-slave",
    "neo4j-ha-available",
    "neo4j-cluster-writable",
    "neo4j-cluster-read-only",
    "neo4j-cluster-available",
    "patroni-primary",
    "patroni-replica",
];

pub const DEFAULT_INTER: Duration = Duration::from_secs(2);
pub const DEFAULT_ROLE_FASTINTER: Duration = Duration::from_millis(250);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
/// The largest body kept from an answer; the rest is not read.
pub const MAX_BODY: usize = 64 * 1024;

/// The explicit (non-timing) fields of a preset; timings come from the shared defaults.
struct Base {
    method: Method,
    uri: &'static str,
    expect_body: Option<&'static str>,
    negative: &'static [u16],
    exclusive: bool,
    port: Option<u16>,
}

/// The presets:
/// - `neo4j-ha-master|slave|available`: Neo4j 3.x HA, as in the manual (`HEAD
///   /db/manage/server/ha/master HTTP/1.0` on the backend's check port, 7474 by default): the
///   master answers 200 "true", a slave 404 "false", a member whose role is unsettled 404
///   "UNKNOWN". `available` (GET) answers 200 "master"/"slave", else 404.
/// - `neo4j-cluster-writable|read-only|available`: causal clustering 3.5/4.x,
///   `/db/manage/server/causalclustering/...`, 200 "true" / 404 "false". Neo4j 5.x moved these to
///   `/db/<database>/cluster/writable|read-only|available` (same answers); a `database` option
///   selecting that form can be added later; until then use a `[[check]]` with that `uri`.
/// - `patroni-primary|replica`: Patroni's REST API on port 8008, `GET /primary` / `GET
///   /replica`, 200 in role, 503 not.
fn base(name: &str) -> Option<Base> {
    let b = |method, uri, expect_body, negative, exclusive, port| Base {
        method,
        uri,
        expect_body,
        negative,
        exclusive,
        port,
    };
    use Method::{Get, Head};
    Some(match name {
        "neo4j-ha-master" => b(
            Head,
            "/db/manage/server/ha/master",
            Some("true"),
            &[404],
            true,
            None,
        ),
        "neo4j-ha-slave" => b(
            Head,
            "/db/manage/server/ha/slave",
            Some("true"),
            &[404],
            false,
            None,
        ),
        "neo4j-ha-available" => b(
            Get,
            "/db/manage/server/ha/available",
            None,
            &[404],
            false,
            None,
        ),
        "neo4j-cluster-writable" => b(
            Head,
            "/db/manage/server/causalclustering/writable",
            Some("true"),
            &[404],
            true,
            None,
        ),
        "neo4j-cluster-read-only" => b(
            Head,
            "/db/manage/server/causalclustering/read-only",
            Some("true"),
            &[404],
            false,
            None,
        ),
        "neo4j-cluster-available" => b(
            Head,
            "/db/manage/server/causalclustering/available",
            Some("true"),
            &[404],
            false,
            None,
        ),
        "patroni-primary" => b(Get, "/primary", None, &[503], true, Some(8008)),
        "patroni-replica" => b(Get, "/replica", None, &[503], false, Some(8008)),
        _ => return None,
    })
}

/// The preset of that name, with default timings, or `None` if there is none.
pub fn preset(name: &str) -> Option<CheckSpec> {
    let b = base(name)?;
    let negative_status = b.negative.to_vec();
    let inter = DEFAULT_INTER;
    Some(CheckSpec {
        name: name.to_string(),
        method: b.method,
        uri: b.uri.to_string(),
        version: HttpVersion::Http10,
        headers: Vec::new(),
        auth: None,
        port: b.port,
        expect_status: 200,
        expect_body: b.expect_body.map(str::to_string),
        fastinter: default_fastinter(inter, &negative_status),
        negative_status,
        exclusive: b.exclusive,
        inter,
        downinter: inter,
        rise: DEFAULT_RISE,
        fall: DEFAULT_FALL,
        timeout: DEFAULT_TIMEOUT.min(inter),
    })
}

fn default_fastinter(inter: Duration, negative_status: &[u16]) -> Duration {
    if negative_status.is_empty() {
        inter
    } else {
        DEFAULT_ROLE_FASTINTER.min(inter)
    }
}

/// The TOML `[[check]]` table. Every field but `name` is optional; with `preset`, the preset
/// supplies the defaults and the other fields override it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    pub name: String,
    pub preset: Option<String>,
    /// "HEAD" or "GET" (default: the preset's, else "GET").
    pub method: Option<String>,
    /// Required without a preset.
    pub uri: Option<String>,
    /// "HTTP/1.0" (default) or "HTTP/1.1".
    pub version: Option<String>,
    /// Extra headers; `Authorization` is not allowed here (use `user` + `password_file`).
    pub headers: Option<BTreeMap<String, String>>,
    pub user: Option<String>,
    /// A file holding the password (one trailing newline is removed).
    pub password_file: Option<PathBuf>,
    /// The name of an environment variable holding the password.
    pub password_env: Option<String>,
    pub expect_status: Option<u16>,
    pub expect_body: Option<String>,
    pub negative_status: Option<Vec<u16>>,
    pub exclusive: Option<bool>,
    pub port: Option<u16>,
    pub inter: Option<String>,
    pub fastinter: Option<String>,
    pub downinter: Option<String>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub timeout: Option<String>,
}

/// Headers the checker manages itself or that would put a secret where it is printed.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "connection",
    "content-length",
    "transfer-encoding",
];

impl RawCheck {
    /// Validates and resolves into a [`CheckSpec`]: applies the preset, fills in defaults and
    /// reads the password from `password_file` / `password_env`. The error says what is wrong
    /// (the caller adds file and line); it never contains the password.
    pub fn resolve(&self) -> Result<CheckSpec, String> {
        let name = self.name.trim();
        if name.is_empty() {
            return Err("check name is empty".into());
        }
        let mut spec = match &self.preset {
            Some(p) => preset(p).ok_or_else(|| {
                format!(
                    "check {name:?}: unknown preset {p:?} (presets: {})",
                    PRESET_NAMES.join(", ")
                )
            })?,
            None => {
                if self.uri.is_none() {
                    return Err(format!(
                        "check {name:?}: `uri` is required without a `preset` (presets: {})",
                        PRESET_NAMES.join(", ")
                    ));
                }
                CheckSpec {
                    name: String::new(),
                    method: Method::Get,
                    uri: String::new(),
                    version: HttpVersion::Http10,
                    headers: Vec::new(),
                    auth: None,
                    port: None,
                    expect_status: 200,
                    expect_body: None,
                    negative_status: Vec::new(),
                    exclusive: false,
                    inter: DEFAULT_INTER,
                    fastinter: DEFAULT_INTER,
                    downinter: DEFAULT_INTER,
                    rise: DEFAULT_RISE,
                    fall: DEFAULT_FALL,
                    timeout: DEFAULT_TIMEOUT,
                }
            }
        };
        let err = |what: String| format!("check {name:?}: {what}");
        spec.name = name.to_string();
        if let Some(m) = &self.method {
            spec.method = match m.to_ascii_uppercase().as_str() {
                "HEAD" => Method::Head,
                "GET" => Method::Get,
                _ => return Err(err(format!("method {m:?} is not supported (HEAD or GET)"))),
            };
        }
        if let Some(u) = &self.uri {
            if !u.starts_with('/') || u.bytes().any(|c| c <= b' ' || c == 0x7f) {
                return Err(err(format!(
                    "uri {u:?} must start with '/' and contain no spaces or control characters"
                )));
            }
            spec.uri = u.clone();
        }
        if let Some(v) = &self.version {
            spec.version = match v.to_ascii_uppercase().as_str() {
                "HTTP/1.0" => HttpVersion::Http10,
                "HTTP/1.1" => HttpVersion::Http11,
                _ => {
                    return Err(err(format!(
                        "version {v:?} is not supported (\"HTTP/1.0\" or \"HTTP/1.1\")"
                    )))
                }
            };
        }
        if let Some(h) = &self.headers {
            for (k, v) in h {
                if k.is_empty() || !k.bytes().all(is_token) {
                    return Err(err(format!("header name {k:?} is not a valid HTTP token")));
                }
                if RESERVED_HEADERS.contains(&k.to_ascii_lowercase().as_str()) {
                    return Err(err(format!(
                        "header {k:?} cannot be set here (lb sets it; for credentials use `user` with `password_file` or `password_env`)"
                    )));
                }
                if v.bytes().any(|c| (c < b' ' && c != b'\t') || c == 0x7f) {
                    return Err(err(format!(
                        "header {k:?}: the value contains control characters"
                    )));
                }
                spec.headers
                    .retain(|(name, _)| !name.eq_ignore_ascii_case(k));
                spec.headers.push((k.clone(), v.trim().to_string()));
            }
        }
        spec.auth = self.auth(&err)?.or(spec.auth);
        if let Some(s) = self.expect_status {
            spec.expect_status = s;
        }
        if !(100..=599).contains(&spec.expect_status) {
            return Err(err(format!(
                "expect_status {} is not an HTTP status (100-599)",
                spec.expect_status
            )));
        }
        if let Some(b) = &self.expect_body {
            spec.expect_body = if b.is_empty() { None } else { Some(b.clone()) };
        }
        if let Some(n) = &self.negative_status {
            spec.negative_status = n.clone();
        }
        for &s in &spec.negative_status {
            if !(100..=599).contains(&s) {
                return Err(err(format!(
                    "negative_status {s} is not an HTTP status (100-599)"
                )));
            }
            if s == spec.expect_status {
                return Err(err(format!(
                    "status {s} is both expect_status and in negative_status"
                )));
            }
        }
        if let Some(e) = self.exclusive {
            spec.exclusive = e;
        }
        if let Some(p) = self.port {
            if p == 0 {
                return Err(err("port 0 is not a port".into()));
            }
            spec.port = Some(p);
        }
        if let Some(r) = self.rise {
            spec.rise = r;
        }
        if let Some(f) = self.fall {
            spec.fall = f;
        }
        if spec.rise == 0 || spec.fall == 0 {
            return Err(err("rise and fall must be at least 1".into()));
        }
        // Timings: explicit values win; the derived ones follow `inter` (as HAProxy's do).
        let inter = duration("inter", &self.inter)?.unwrap_or(DEFAULT_INTER);
        spec.inter = inter;
        spec.fastinter = duration("fastinter", &self.fastinter)?
            .unwrap_or_else(|| default_fastinter(inter, &spec.negative_status));
        spec.downinter = duration("downinter", &self.downinter)?.unwrap_or(inter);
        spec.timeout = duration("timeout", &self.timeout)?.unwrap_or(DEFAULT_TIMEOUT.min(inter));
        Ok(spec)
    }

    fn auth(&self, err: &dyn Fn(String) -> String) -> Result<Option<BasicAuth>, String> {
        let Some(user) = &self.user else {
            if self.password_file.is_some() || self.password_env.is_some() {
                return Err(err("password_file / password_env need `user`".into()));
            }
            return Ok(None);
        };
        if user.contains(':') || user.bytes().any(|c| c < b' ' || c == 0x7f) {
            return Err(err(format!(
                "user {user:?} must not contain ':' or control characters (Basic auth)"
            )));
        }
        let password = match (&self.password_file, &self.password_env) {
            (Some(_), Some(_)) => return Err(err("set only one of password_file and password_env".into())),
            (None, None) => return Err(err("`user` needs password_file or password_env (passwords are never put in the config)".into())),
            (Some(path), None) => {
                let mut p = std::fs::read_to_string(path)
                    .map_err(|e| err(format!("cannot read password_file {}: {}", path.display(), io_reason(&e))))?;
                if p.ends_with('\n') {
                    p.pop();
                    if p.ends_with('\r') {
                        p.pop();
                    }
                }
                if p.is_empty() {
                    return Err(err(format!("password_file {} is empty", path.display())));
                }
                p
            }
            (None, Some(var)) => match std::env::var(var) {
                Ok(p) if !p.is_empty() => p,
                Ok(_) => return Err(err(format!("environment variable {var} (password_env) is empty"))),
                Err(std::env::VarError::NotPresent) => return Err(err(format!("environment variable {var} (password_env) is not set"))),
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(err(format!("environment variable {var} (password_env) is not valid UTF-8")))
                }
            },
        };
        Ok(Some(BasicAuth {
            user: user.clone(),
            password,
        }))
    }
}

/// The reason of an I/O error without the OS error's own rendering of paths (it has none) and
/// without any file content.
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        std::io::ErrorKind::InvalidData => "not valid UTF-8".into(),
        _ => e.to_string(),
    }
}

fn duration(field: &str, v: &Option<String>) -> Result<Option<Duration>, String> {
    let Some(text) = v else { return Ok(None) };
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        format!("{field} = {text:?} is not a duration ({e}; write e.g. \"2s\" or \"250ms\")")
    })?;
    if d < Duration::from_millis(1) {
        return Err(format!("{field} = {text:?} must be at least 1ms"));
    }
    Ok(Some(d))
}

/// RFC 9110 token characters.
fn is_token(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RawCheck, String> {
        toml::from_str::<RawCheck>(text).map_err(|e| e.to_string())
    }

    fn resolve(text: &str) -> Result<CheckSpec, String> {
        parse(text)?.resolve()
    }

    #[test]
    fn every_preset_exists_and_matches_the_manual() {
        for name in PRESET_NAMES {
            let p = preset(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(p.name, *name);
            assert_eq!(p.version, HttpVersion::Http10);
            assert_eq!(p.expect_status, 200);
            assert_eq!((p.inter, p.rise, p.fall), (Duration::from_secs(2), 2, 3));
            assert_eq!(p.fastinter, Duration::from_millis(250));
            assert_eq!(p.downinter, p.inter);
            assert_eq!(p.timeout, Duration::from_secs(1));
            assert!(p.auth.is_none() && p.headers.is_empty());
        }
        assert!(preset("neo4j-ha-maestro").is_none());
        let m = preset("neo4j-ha-master").unwrap();
        assert_eq!(
            (m.method, m.uri.as_str(), m.port),
            (Method::Head, "/db/manage/server/ha/master", None)
        );
        assert_eq!(
            (
                m.expect_body.as_deref(),
                m.negative_status.as_slice(),
                m.exclusive
            ),
            (Some("true"), &[404][..], true)
        );
        let s = preset("neo4j-ha-slave").unwrap();
        assert_eq!(
            (s.method, s.uri.as_str(), s.exclusive),
            (Method::Head, "/db/manage/server/ha/slave", false)
        );
        let a = preset("neo4j-ha-available").unwrap();
        assert_eq!(
            (a.method, a.uri.as_str(), a.exclusive, a.expect_body),
            (Method::Get, "/db/manage/server/ha/available", false, None)
        );
        assert_eq!(a.negative_status, vec![404]);
        for (n, uri, excl) in [
            (
                "neo4j-cluster-writable",
                "/db/manage/server/causalclustering/writable",
                true,
            ),
            (
                "neo4j-cluster-read-only",
                "/db/manage/server/causalclustering/read-only",
                false,
            ),
            (
                "neo4j-cluster-available",
                "/db/manage/server/causalclustering/available",
                false,
            ),
        ] {
            let c = preset(n).unwrap();
            assert_eq!(
                (
                    c.uri.as_str(),
                    c.exclusive,
                    c.negative_status.as_slice(),
                    c.port
                ),
                (uri, excl, &[404][..], None)
            );
        }
        let p = preset("patroni-primary").unwrap();
        assert_eq!(
            (p.method, p.uri.as_str(), p.port, p.exclusive),
            (Method::Get, "/primary", Some(8008), true)
        );
        assert_eq!(p.negative_status, vec![503]);
        let r = preset("patroni-replica").unwrap();
        assert_eq!(
            (r.method, r.uri.as_str(), r.port, r.exclusive),
            (Method::Get, "/replica", Some(8008), false)
        );
        assert_eq!(r.negative_status, vec![503]);
    }

    #[test]
    fn custom_check_defaults() {
        let c = resolve("name = \"c\"\nuri = \"/health\"\n").unwrap();
        assert_eq!(c.name, "c");
        assert_eq!(
            (c.method, c.version, c.expect_status),
            (Method::Get, HttpVersion::Http10, 200)
        );
        assert_eq!(
            (c.inter, c.fastinter, c.downinter, c.timeout),
            (DEFAULT_INTER, DEFAULT_INTER, DEFAULT_INTER, DEFAULT_TIMEOUT)
        );
        assert_eq!((c.rise, c.fall, c.exclusive, c.port), (2, 3, false, None));
        assert!(c.negative_status.is_empty() && c.expect_body.is_none() && c.auth.is_none());
        // A role check (with negative answers) gets the fast fastinter.
        let c = resolve("name = \"c\"\nuri = \"/r\"\nnegative_status = [404]\n").unwrap();
        assert_eq!(c.fastinter, DEFAULT_ROLE_FASTINTER);
        assert!(resolve("name = \"c\"\n")
            .unwrap_err()
            .contains("`uri` is required"));
    }

    #[test]
    fn preset_with_overrides() {
        let c = resolve(
            r#"
            name = "fast-master"
            preset = "neo4j-ha-master"
            inter = "250ms"
            rise = 1
            fall = 1
            version = "HTTP/1.1"
            headers = { Host = "neo4j", X-Check = " lb " }
            "#,
        )
        .unwrap();
        let mut want = preset("neo4j-ha-master").unwrap();
        want.name = "fast-master".into();
        want.inter = Duration::from_millis(250);
        want.fastinter = Duration::from_millis(250);
        want.downinter = Duration::from_millis(250);
        want.timeout = Duration::from_millis(250);
        want.rise = 1;
        want.fall = 1;
        want.version = HttpVersion::Http11;
        want.headers = vec![
            ("Host".into(), "neo4j".into()),
            ("X-Check".into(), "lb".into()),
        ];
        assert_eq!(c, want);

        // Derived timings follow inter unless set; explicit ones win.
        let c = resolve("name = \"x\"\npreset = \"patroni-primary\"\ninter = \"5s\"\ndowninter = \"10s\"\ntimeout = \"3s\"\nfastinter = \"100ms\"\nport = 18008\nexclusive = false\nnegative_status = [503, 404]\nexpect_body = \"ok\"\nmethod = \"head\"\nuri = \"/leader\"\n").unwrap();
        assert_eq!(
            (c.inter, c.fastinter, c.downinter, c.timeout),
            (
                Duration::from_secs(5),
                Duration::from_millis(100),
                Duration::from_secs(10),
                Duration::from_secs(3)
            )
        );
        assert_eq!(
            (c.port, c.exclusive, c.method, c.uri.as_str()),
            (Some(18008), false, Method::Head, "/leader")
        );
        assert_eq!(
            (c.negative_status.as_slice(), c.expect_body.as_deref()),
            (&[503, 404][..], Some("ok"))
        );
        let c = resolve("name = \"x\"\npreset = \"neo4j-ha-master\"\ninter = \"5s\"\n").unwrap();
        assert_eq!(
            (c.fastinter, c.downinter, c.timeout),
            (
                DEFAULT_ROLE_FASTINTER,
                Duration::from_secs(5),
                DEFAULT_TIMEOUT
            )
        );
        // An empty expect_body clears the preset's.
        assert_eq!(
            resolve("name = \"x\"\npreset = \"neo4j-ha-master\"\nexpect_body = \"\"\n")
                .unwrap()
                .expect_body,
            None
        );

        let e = resolve("name = \"x\"\npreset = \"neo4j-ha-maestro\"\n").unwrap_err();
        assert!(
            e.contains("unknown preset \"neo4j-ha-maestro\"") && e.contains("neo4j-ha-master"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("inter = \"2x\"", "inter = \"2x\" is not a duration"),
            ("timeout = \"2\"", "timeout = \"2\" is not a duration"),
            ("fastinter = \"0s\"", "at least 1ms"),
            ("method = \"POST\"", "method \"POST\" is not supported"),
            ("version = \"HTTP/2\"", "version \"HTTP/2\""),
            ("uri = \"no-slash\"", "must start with '/'"),
            ("uri = \"/a b\"", "no spaces"),
            ("rise = 0", "at least 1"),
            ("expect_status = 42", "not an HTTP status"),
            (
                "negative_status = [200]",
                "both expect_status and in negative_status",
            ),
            ("port = 0", "port 0"),
            (
                "headers = { Authorization = \"Basic eA==\" }",
                "cannot be set here",
            ),
            (
                "headers = { \"bad name\" = \"v\" }",
                "not a valid HTTP token",
            ),
            (
                "headers = { X = \"a\\r\\nInjected: 1\" }",
                "control characters",
            ),
            ("password_env = \"P\"", "need `user`"),
            ("user = \"neo4j\"", "needs password_file or password_env"),
            (
                "user = \"a:b\"\npassword_env = \"P\"",
                "must not contain ':'",
            ),
        ];
        for (line, want) in cases {
            let e = resolve(&format!(
                "name = \"x\"\npreset = \"neo4j-ha-master\"\n{line}\n"
            ))
            .unwrap_err();
            assert!(
                e.contains(want) && e.starts_with("check \"x\": ") || e.contains(want),
                "{line}: {e}"
            );
        }
        // Unknown keys and wrong types are rejected by the parser.
        let e =
            parse("name = \"x\"\npreset = \"neo4j-ha-master\"\nintervall = \"2s\"\n").unwrap_err();
        assert!(e.contains("unknown field `intervall`"), "{e}");
        let e = parse("name = \"x\"\nrise = \"two\"\n").unwrap_err();
        assert!(e.contains("rise"), "{e}");
        assert!(parse("uri = \"/x\"\n")
            .unwrap_err()
            .contains("missing field `name`"));
    }

    #[test]
    fn password_file_is_read_and_errors_leak_nothing() {
        let dir = std::env::temp_dir().join(format!("lb-spec-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "s3cr3t-pw\n").unwrap();
        let c = resolve(&format!(
            "name = \"a\"\npreset = \"neo4j-ha-master\"\nuser = \"neo4j\"\npassword_file = {:?}\n",
            file.display().to_string()
        ))
        .unwrap();
        let auth = c.auth.clone().unwrap();
        assert_eq!(
            (auth.user.as_str(), auth.password.as_str()),
            ("neo4j", "s3cr3t-pw")
        );
        assert_eq!(auth.header_value(), "Basic bmVvNGo6czNjcjN0LXB3");
        let dbg = format!("{c:?}");
        assert!(
            dbg.contains("<redacted>") && !dbg.contains("s3cr3t"),
            "{dbg}"
        );
        assert_eq!(
            format!("{auth:?}"),
            "BasicAuth { user: \"neo4j\", password: \"<redacted>\" }"
        );

        // CRLF and no newline at all.
        std::fs::write(&file, "s3cr3t-pw\r\n").unwrap();
        let text = format!(
            "name = \"a\"\npreset = \"neo4j-ha-master\"\nuser = \"neo4j\"\npassword_file = {:?}\n",
            file.display().to_string()
        );
        assert_eq!(resolve(&text).unwrap().auth.unwrap().password, "s3cr3t-pw");
        std::fs::write(&file, "\n").unwrap();
        assert!(resolve(&text).unwrap_err().contains("is empty"));

        let missing = dir.join("missing-pw");
        let e = resolve(&format!(
            "name = \"a\"\npreset = \"neo4j-ha-master\"\nuser = \"neo4j\"\npassword_file = {:?}\n",
            missing.display().to_string()
        ))
        .unwrap_err();
        assert_eq!(
            e,
            format!(
                "check \"a\": cannot read password_file {}: no such file",
                missing.display()
            )
        );
        std::fs::write(&file, "s3cr3t-pw").unwrap();
        let e = resolve(&format!("{text}password_env = \"LB_TEST_PW\"\n")).unwrap_err();
        assert!(e.contains("only one of") && !e.contains("s3cr3t"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn password_env() {
        // A variable name unique to this test; set and read only here.
        let var = format!("LB_SPEC_TEST_PW_{}", std::process::id());
        let text = format!("name = \"a\"\npreset = \"patroni-primary\"\nuser = \"postgres\"\npassword_env = {var:?}\n");
        let e = resolve(&text).unwrap_err();
        assert_eq!(
            e,
            format!("check \"a\": environment variable {var} (password_env) is not set")
        );
        std::env::set_var(&var, "env-s3cr3t");
        let c = resolve(&text).unwrap();
        std::env::remove_var(&var);
        assert_eq!(c.auth.as_ref().unwrap().password, "env-s3cr3t");
        assert!(!format!("{c:?}").contains("env-s3cr3t"));
    }
}
