//! The example configuration the Debian package installs as /etc/lb/example.toml (see
//! packaging/; the package itself is tested by xtask's package tests).
use anyhow::Result;
use lb_tests::harness::repo_root;
use lb_user::config::Config;

#[test]
fn the_packaged_example_configuration_loads_and_names_its_interfaces() -> Result<()> {
    let path = repo_root().join("packaging/example.toml");
    let cfg = Config::load(&path)?;
    let names: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["write", "read", "http"]);
    assert_eq!(cfg.backends.len(), 3);
    let text = std::fs::read_to_string(&path)?;
    assert!(
        text.contains("\nifaces = [\"eth0\"]\n"),
        "lb@NAME needs ifaces"
    );
    Ok(())
}
