//! `lb import-haproxy`: the manual's two configurations import to the checked-in TOML (golden
//! files, regenerated with `UPDATE_GOLDEN=1`), which lb's own parser accepts; every broken
//! configuration of the corpus fails with a `file:line:` message saying why.
use std::path::{Path, PathBuf};

use lb_user::{
    config::Config,
    haproxy::{import, Options, Severity},
};

fn dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(sub)
}

fn opts() -> Options {
    Options {
        password_dir: PathBuf::from("/etc/lb"),
        ..Default::default()
    }
}

fn golden(name: &str) {
    let cfg = dir("golden").join(format!("{name}.cfg"));
    let text = std::fs::read_to_string(&cfg).unwrap();
    let imp = import(&[(format!("{name}.cfg"), text)], &opts());
    assert_eq!(imp.failures(false), 0, "{:#?}", imp.diags);
    let want_path = dir("golden").join(format!("{name}.toml"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&want_path, &imp.toml).unwrap();
    }
    let want = std::fs::read_to_string(&want_path).unwrap_or_default();
    assert!(
        imp.toml == want,
        "{name}: import differs from {} (UPDATE_GOLDEN=1 rewrites it):\n{}",
        want_path.display(),
        imp.toml
    );
    Config::parse(&want_path, &imp.toml).unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn the_manuals_bolt_configuration_imports_to_the_golden_toml() {
    golden("neo4j-ha-bolt");
    let c = Config::parse(
        Path::new("bolt.toml"),
        &std::fs::read_to_string(dir("golden").join("neo4j-ha-bolt.toml")).unwrap(),
    )
    .unwrap();
    let write = &c.services[0];
    assert!(
        write.exclusive,
        "current-master is the exclusive master role"
    );
    assert_eq!(write.check.as_ref().unwrap().name, "neo4j-ha-master");
    assert_eq!(c.services[1].check.as_ref().unwrap().name, "neo4j-ha-slave");
    assert_eq!(c.connect_timeout, std::time::Duration::from_secs(30));
    assert_eq!(c.idle_timeout, std::time::Duration::from_secs(7200));
}

#[test]
fn the_manuals_http_configuration_imports_to_the_golden_toml() {
    golden("neo4j-ha-http");
    let c = Config::parse(
        Path::new("http.toml"),
        &std::fs::read_to_string(dir("golden").join("neo4j-ha-http.toml")).unwrap(),
    )
    .unwrap();
    assert!(
        c.services[0].check.is_none(),
        "the manual's HTTP servers have no `check`: never checked"
    );
    assert_eq!(c.idle_timeout, std::time::Duration::from_secs(50));
}

#[test]
fn every_broken_configuration_fails_with_file_line_and_why() {
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(dir("haproxy_broken"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cfg"))
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{name}: first line must be `# expect: LINE: text`"));
        let (line, want) = expect.split_once(": ").unwrap();
        let imp = import(&[(name.clone(), text.clone())], &opts());
        assert!(imp.failures(true) > 0, "{name}: imported under --strict");
        let prefix = format!("{name}:{line}: ");
        let hit = imp.diags.iter().find(|d| {
            d.severity >= Severity::Warning
                && d.to_string().starts_with(&prefix)
                && d.msg.contains(want)
        });
        assert!(
            hit.is_some(),
            "{name}: no diagnostic `{prefix}...{want}...` among:\n{}",
            imp.diags
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
        n += 1;
    }
    assert!(n >= 8, "the corpus has {n} files");
}
