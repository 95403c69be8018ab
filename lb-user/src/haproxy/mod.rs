//! HAProxy configurations as lb configurations: `lb import-haproxy` and `lb run --haproxy-config`.
//!
//! The subset is the one the Neo4j manual's configurations use, plus HAProxy 2.x's
//! `http-check send/expect`: `global maxconn`; `defaults` (mode, timeouts, balance, `option
//! httpchk`, `default-server`); `frontend` (bind, default_backend, mode); `backend` (balance,
//! `option httpchk` with the manual's header-after-version trick, `http-check`, `server` and
//! `default-server` with check, port, inter, fastinter, downinter, rise, fall, maxconn,
//! `on-marked-down shutdown-sessions`); `listen` with `bind` and `stats enable` (the admin
//! server). [`parse`] reads the files into a model; [`translate`] decides lb's equivalent and
//! writes TOML text with every note and warning as a comment next to what it concerns.
//!
//! Nothing is dropped silently: each line lb does not understand is a [`Diagnostic`] with its
//! `file:line`. Credentials found in a check line never appear in any output: they go to
//! [`Secret`] files (0600) referenced by `password_file`, and every message is redacted.
pub mod parse;
pub mod tokenize;
pub mod translate;

use std::{
    fmt,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

use crate::config::Config;
pub use parse::Loc;

/// How much a diagnostic matters. `--strict` fails on warnings too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// A deliberate mapping, stated.
    Note,
    /// lb will not behave as HAProxy did, or a line was ignored.
    Warning,
    /// The configuration cannot be imported.
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Note => "note",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// A message about a line of a HAProxy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub loc: Loc,
    pub msg: String,
}

impl Diagnostic {
    pub fn new(severity: Severity, loc: Loc, msg: impl Into<String>) -> Self {
        Self {
            severity,
            loc,
            msg: msg.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.loc, self.severity.as_str(), self.msg)
    }
}

/// What the import may decide on its own.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--vip ADDR`: the VIP of every service, whatever the binds say.
    pub vip: Option<Ipv4Addr>,
    /// The address `bind *:PORT` means (the first address of lb's first interface, when
    /// running); `None`: a placeholder with a warning.
    pub wildcard_vip: Option<Ipv4Addr>,
    /// `--faithful`: keep HAProxy's round robin where lb would import an exclusive role.
    pub faithful: bool,
    /// Where credentials found in check lines are written (`password_file`).
    pub password_dir: PathBuf,
}

/// A password to write to `path` (mode 0600). `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    pub path: PathBuf,
    password: String,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("path", &self.path)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Secret {
    pub fn new(path: PathBuf, password: String) -> Self {
        Self { path, password }
    }

    /// The password (only the code that writes it or compares it in tests calls this).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Writes the password to its file, readable by its owner only (0600, also when the file
    /// existed with wider permissions).
    pub fn write(&self) -> Result<()> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.path)
            .with_context(|| format!("cannot write password file {}", self.path.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot chmod 0600 {}", self.path.display()))?;
        f.write_all(self.password.as_bytes())
            .with_context(|| format!("cannot write password file {}", self.path.display()))?;
        Ok(())
    }
}

/// The result of an import: the TOML text (credentials redacted), every diagnostic, and the
/// password files the TOML references.
#[derive(Debug)]
pub struct Import {
    pub toml: String,
    pub diags: Vec<Diagnostic>,
    pub secrets: Vec<Secret>,
}

impl Import {
    /// The diagnostics that fail the import: errors, and warnings too when `strict`.
    pub fn failures(&self, strict: bool) -> usize {
        self.diags
            .iter()
            .filter(|d| {
                d.severity == Severity::Error || (strict && d.severity == Severity::Warning)
            })
            .count()
    }
}

/// Imports `files` (display name, text), in order, as HAProxy reads several `-f` files.
pub fn import(files: &[(String, String)], opts: &Options) -> Import {
    let mut p = parse::Parser::new();
    for (name, text) in files {
        p.file(name, text);
    }
    let parse::Parser {
        out: parsed,
        mut diags,
        ..
    } = p;
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    let (toml, secrets) = translate::translate(&parsed, &names, opts, &mut diags);
    let mut hidden: Vec<String> = parsed.secrets.clone();
    hidden.extend(secrets.iter().map(|s| s.password.clone()));
    hidden.retain(|s| !s.is_empty());
    // Longest first, so that a secret containing another is redacted whole.
    hidden.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for d in &mut diags {
        d.msg = redact(&d.msg, &hidden);
    }
    diags.sort_by(|a, b| {
        (names.iter().position(|n| *n == &*a.loc.file), a.loc.line)
            .cmp(&(names.iter().position(|n| *n == &*b.loc.file), b.loc.line))
    });
    Import {
        toml: redact(&toml, &hidden),
        diags,
        secrets,
    }
}

fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        out = out.replace(s.as_str(), "<redacted>");
    }
    out
}

/// Reads and imports `paths`; file names in messages are as given.
pub fn import_paths(paths: &[PathBuf], opts: &Options) -> Result<Import> {
    if paths.is_empty() {
        bail!("no HAProxy configuration file given");
    }
    let mut files = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read HAProxy config {}", p.display()))?;
        files.push((p.display().to_string(), text));
    }
    Ok(import(&files, opts))
}

/// `lb run --haproxy-config FILE...`: imports the files with `bind *` meaning the first IPv4
/// address of the first interface, prints the diagnostics to stderr, and parses the TOML in
/// memory. Credentials go to a private directory only while the configuration is parsed (the
/// parsed configuration holds the password).
pub fn load_for_run(paths: &[PathBuf], ifaces: &[String], faithful: bool) -> Result<Config> {
    let first = ifaces
        .first()
        .context("no --iface given: `bind *:PORT` means the address of the first --iface")?;
    let wildcard_vip = crate::host::iface_addrs(first)
        .with_context(|| format!("reading the addresses of --iface {first}"))?
        .into_iter()
        .next();
    if wildcard_vip.is_none() {
        eprintln!("lb: {first} has no IPv4 address: `bind *:PORT` cannot be served there");
    }
    let dir = std::env::temp_dir().join(format!("lb-haproxy-{}", std::process::id()));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let result = (|| {
        let opts = Options {
            wildcard_vip,
            password_dir: dir.clone(),
            faithful,
            ..Default::default()
        };
        let imp = import_paths(paths, &opts)?;
        for d in &imp.diags {
            eprintln!("{d}");
        }
        let n = imp.failures(false);
        if n > 0 {
            bail!("{n} error(s) in the HAProxy configuration (listed above); lb did not start");
        }
        for s in &imp.secrets {
            s.write()?;
        }
        let label = PathBuf::from(format!(
            "{} (as lb TOML; see `lb import-haproxy`)",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        ));
        Config::parse(&label, &imp.toml)
    })();
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        eprintln!("lb: cannot remove {}: {e}", dir.display());
    }
    result
}

/// The directory credentials are written to by default: the current one, made absolute so
/// that the TOML works from anywhere.
pub fn default_password_dir(given: Option<&Path>) -> Result<PathBuf> {
    let d = given.unwrap_or(Path::new("."));
    std::path::absolute(d).with_context(|| format!("cannot resolve {}", d.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str, opts: &Options) -> Import {
        import(&[("h.cfg".to_string(), text.to_string())], opts)
    }

    fn opts() -> Options {
        Options {
            password_dir: PathBuf::from("/secrets"),
            ..Default::default()
        }
    }

    const MASTER: &str = "frontend w\n    bind 10.0.0.5:7680\n    default_backend m\nbackend m\n";

    #[test]
    fn the_manuals_credentials_trick_goes_to_a_password_file_and_is_never_printed() {
        // base64("neo4j:s3cret") = bmVvNGo6czNjcmV0
        let text = format!(
            "{MASTER}    option httpchk HEAD /db/manage/server/ha/master HTTP/1.0\\r\\nAuthorization:\\ Basic\\ bmVvNGo6czNjcmV0\n    server db01 10.0.1.10:7687 check port 7474\n"
        );
        let imp = run(&text, &opts());
        assert_eq!(imp.failures(false), 0, "{:#?}", imp.diags);
        assert_eq!(imp.secrets.len(), 1);
        assert_eq!(imp.secrets[0].password(), "s3cret");
        assert_eq!(imp.secrets[0].path, PathBuf::from("/secrets/m.password"));
        let all = format!(
            "{}{}{:?}",
            imp.toml,
            imp.diags.iter().map(|d| d.to_string()).collect::<String>(),
            imp.secrets
        );
        assert!(
            !all.contains("s3cret") && !all.contains("bmVvNGo6czNjcmV0"),
            "{all}"
        );
        assert!(imp.toml.contains("user = \"neo4j\""), "{}", imp.toml);
        assert!(imp.toml.contains("password_file = \"/secrets/m.password\""));
        assert!(imp.toml.contains("preset = \"neo4j-ha-master\""));
    }

    #[test]
    fn the_stats_page_is_read_only_unless_stats_admin_and_then_needs_auth_off_loopback() {
        let admin = |body: &str| {
            run(&format!("{MASTER}    server db01 10.0.1.10:7687\nlisten admin\n    bind {body}\n    stats enable\n"), &opts())
        };
        // The manual's: every address, no credentials, no `stats admin`: read-only.
        let imp = admin("*:8080");
        assert_eq!(imp.failures(false), 0, "{:#?}", imp.diags);
        assert!(!imp.toml.contains("operations"), "{}", imp.toml);
        let imp = admin("127.0.0.1:8080\n    stats admin if TRUE");
        assert_eq!(imp.failures(false), 0, "{:#?}", imp.diags);
        assert!(imp.toml.contains("operations = true"), "{}", imp.toml);
        let imp = admin("*:8080\n    stats auth ops:pw\n    stats admin if TRUE");
        assert_eq!(imp.failures(false), 0, "{:#?}", imp.diags);
        assert!(imp.toml.contains("operations = true"), "{}", imp.toml);
        let imp = admin("*:8080\n    stats admin if TRUE");
        let all: String = imp.diags.iter().map(|d| d.to_string()).collect();
        assert!(
            imp.failures(false) == 1 && all.contains("stats admin without stats auth"),
            "{all}"
        );
    }

    #[test]
    fn a_bad_authorization_header_is_an_error_that_does_not_show_it() {
        let text = format!(
            "{MASTER}    option httpchk HEAD /db/manage/server/ha/master HTTP/1.0\\r\\nAuthorization:\\ Bearer\\ tok3n\n    server db01 10.0.1.10:7687 check\n"
        );
        let imp = run(&text, &opts());
        assert!(imp.failures(false) > 0);
        let all: String = imp.diags.iter().map(|d| d.to_string()).collect();
        assert!(
            all.contains("Basic auth only") && !all.contains("tok3n"),
            "{all}"
        );
    }

    #[test]
    fn http_check_send_and_expect_and_default_server_options() {
        let text = format!(
            "{MASTER}    option httpchk\n    http-check send meth GET uri /health ver HTTP/1.1 hdr Host neo4j\n    http-check expect status 204\n    default-server inter 500ms rise 1 fall 2 on-marked-down shutdown-sessions\n    server db01 10.0.1.10:7687 check port 8080\n    server db02 10.0.1.11:7687 check port 8080\n"
        );
        let imp = run(&text, &opts());
        assert_eq!(imp.failures(false), 0, "{:#?}", imp.diags);
        for want in [
            "uri = \"/health\"",
            "method = \"GET\"",
            "version = \"HTTP/1.1\"",
            "expect_status = 204",
            "headers = { \"Host\" = \"neo4j\" }",
            "inter = \"500ms\"",
            "rise = 1",
            "fall = 2",
            "on_down = \"reset\"",
            "check_port = 8080",
        ] {
            assert!(imp.toml.contains(want), "{want} missing:\n{}", imp.toml);
        }
        crate::config::Config::parse(Path::new("t.toml"), &imp.toml).unwrap();
    }

    #[test]
    fn faithful_keeps_round_robin_for_the_master_backend() {
        let text = format!(
            "{MASTER}    option httpchk HEAD /db/manage/server/ha/master HTTP/1.0\n    server db01 10.0.1.10:7687 check port 7474\n    server db02 10.0.1.11:7687 check port 7474\n"
        );
        let imp = run(
            &text,
            &Options {
                faithful: true,
                ..opts()
            },
        );
        let c = crate::config::Config::parse(Path::new("t.toml"), &imp.toml).unwrap();
        assert!(!c.services[0].exclusive, "{}", imp.toml);
        assert_eq!(c.services[0].balance, crate::config::Balance::RoundRobin);
        let c =
            crate::config::Config::parse(Path::new("t.toml"), &run(&text, &opts()).toml).unwrap();
        assert!(c.services[0].exclusive);
    }

    #[test]
    fn vips_from_bind_wildcard_and_override() {
        let text = "frontend a\n    bind *:7681\n    default_backend b\nbackend b\n    server s 10.0.1.10:7687\n";
        assert!(run(text, &opts())
            .toml
            .contains("vip = \"192.0.2.10:7681\""));
        let w = Options {
            wildcard_vip: Some(Ipv4Addr::new(198, 18, 0, 1)),
            ..opts()
        };
        assert!(run(text, &w).toml.contains("vip = \"198.18.0.1:7681\""));
        let v = Options {
            vip: Some(Ipv4Addr::new(10, 9, 9, 9)),
            ..w
        };
        assert!(run(text, &v).toml.contains("vip = \"10.9.9.9:7681\""));
        let exact = text.replace("*:7681", "10.1.1.1:7681");
        assert!(run(&exact, &opts())
            .toml
            .contains("vip = \"10.1.1.1:7681\""));
    }

    #[test]
    fn unchecked_servers_stay_unchecked_with_the_fix_offered() {
        let text = "frontend a\n    bind 10.0.0.5:80\n    default_backend b\nbackend b\n    option httpchk GET /db/manage/server/ha/available\n    server s 10.0.1.10:7474\n";
        let imp = run(text, &opts());
        assert!(
            imp.toml.contains("# check = \"neo4j-ha-available\""),
            "{}",
            imp.toml
        );
        assert!(imp
            .diags
            .iter()
            .any(|d| d.severity == Severity::Warning && d.msg.contains("never checks")));
        assert_eq!(imp.failures(false), 0);
        assert!(imp.failures(true) > 0);
    }

    #[test]
    fn haproxy_times() {
        use std::time::Duration;
        assert_eq!(parse::parse_time("5000").unwrap(), Duration::from_secs(5));
        assert_eq!(parse::parse_time("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse::parse_time("1d").unwrap(), Duration::from_secs(86400));
        assert!(parse::parse_time("2hours").is_err());
        assert_eq!(translate::human(Duration::from_millis(50000)), "50s");
        assert_eq!(translate::human(Duration::from_millis(1500)), "1500ms");
        assert_eq!(translate::human(Duration::from_secs(7200)), "2h");
    }
}
