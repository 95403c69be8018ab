//! `cargo xtask package`: the release agent in a Debian package (cargo-deb, configured by
//! `[package.metadata.deb]` in lb-user/Cargo.toml; the unit, example configuration and
//! maintainer scripts live in `packaging/`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cmd::{cargo, describe, probe, run};

/// Builds the release `lb` and its `.deb` in `target/debian/`; returns the package's path.
pub fn package() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "lb-user"]))?;
    build_deb(None, None, false)
}

/// `cargo deb --no-build`: packages `<target>/release/lb` as built, from `target_dir` instead
/// of the workspace's `target/` if given, into `out_dir` (default `target/debian/`). `fast`:
/// quicker compression, for tests. Returns the `.deb`'s path, which cargo-deb prints.
pub fn build_deb(target_dir: Option<&Path>, out_dir: Option<&Path>, fast: bool) -> Result<PathBuf> {
    let mut c = cargo();
    c.args(["deb", "-p", "lb-user", "--no-build"]);
    if let Some(dir) = target_dir {
        c.env("CARGO_TARGET_DIR", dir);
    }
    if fast {
        c.arg("--fast");
    }
    if let Some(dir) = out_dir {
        c.arg("--output").arg(dir);
    }
    let out = probe(&mut c)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}",
            describe(&c),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // cargo-deb's warnings (a missing field, a stripping problem) are worth seeing.
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| l.ends_with(".deb"))
        .with_context(|| format!("cargo deb printed no .deb path: {stdout:?}"))?;
    Ok(PathBuf::from(deb))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::{cmd, repo};
    use std::process::{Command, Output};

    /// A directory under the system temp dir, removed on drop (also when a check fails).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Result<Self> {
            let dir = std::env::temp_dir().join(format!("lb-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            Ok(TempDir(dir))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn output(c: &mut Command) -> Result<Output> {
        let out = probe(c)?;
        if !out.status.success() {
            bail!(
                "`{}` failed ({}): {}",
                describe(c),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    fn stdout(c: &mut Command) -> Result<String> {
        Ok(String::from_utf8_lossy(&output(c)?.stdout).into_owned())
    }

    /// The package `cargo xtask package` makes, around the debug `lb` that `cargo xtask test`
    /// has already built (`$LB_BIN`), posing as `release/lb` in a target directory of its own: a
    /// release build here would double CI's build time, and cargo-deb packages release builds only.
    #[test]
    #[ignore = "needs cargo-deb and systemd-analyze (cargo xtask setup) and a built lb: run cargo xtask test"]
    fn the_deb_holds_the_agent_a_unit_systemd_accepts_and_its_metadata() -> Result<()> {
        let tmp = TempDir::new("package-test")?;
        let built = std::env::var_os("LB_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("target/debug/lb"));
        let target = tmp.0.join("target");
        std::fs::create_dir_all(target.join("release"))?;
        std::fs::copy(&built, target.join("release/lb"))
            .with_context(|| format!("copying {} (build it first)", built.display()))?;
        let deb = build_deb(Some(&target), Some(&tmp.0), true)?;
        let deb_s = deb.to_string_lossy().into_owned();
        let name = deb.file_name().unwrap_or_default().to_string_lossy();
        assert!(
            name.starts_with("lb_") && name.ends_with("_amd64.deb"),
            "{name}"
        );

        let contents = stdout(&mut cmd("dpkg-deb", &["--contents", &deb_s]))?;
        for want in [
            "./usr/sbin/lb",
            "./lib/systemd/system/lb@.service",
            "./etc/lb/example.toml",
            "./usr/share/doc/lb/README.md",
        ] {
            assert!(
                contents
                    .lines()
                    .any(|l| l.split_whitespace().last() == Some(want)),
                "{want} missing from {name}:\n{contents}"
            );
        }
        assert!(
            contents
                .lines()
                .any(|l| l.starts_with("-rwxr-xr-x 0/0 ") && l.ends_with(" ./usr/sbin/lb")),
            "lb is not an executable owned by root:\n{contents}"
        );

        let fields = stdout(&mut cmd(
            "dpkg-deb",
            &[
                "--field",
                &deb_s,
                "Package",
                "Depends",
                "Section",
                "Description",
            ],
        ))?;
        assert!(fields.contains("Package: lb\n"), "{fields}");
        let depends = fields
            .lines()
            .find_map(|l| l.strip_prefix("Depends: "))
            .unwrap_or_default();
        for dep in ["iproute2", "ethtool", "libc6"] {
            assert!(depends.contains(dep), "Depends lacks {dep}: {depends}");
        }
        assert!(fields.contains("Section: net\n"), "{fields}");
        assert!(
            fields.contains("Description: XDP load balancer for Neo4j clusters"),
            "{fields}"
        );

        // Control area: the example is a conffile; the maintainer scripts came along.
        let control = tmp.0.join("control");
        output(cmd("dpkg-deb", &["--control", &deb_s]).arg(&control))?;
        let conffiles = std::fs::read_to_string(control.join("conffiles"))?;
        assert_eq!(conffiles.trim(), "/etc/lb/example.toml");
        for script in ["postinst", "prerm", "postrm"] {
            let text = std::fs::read_to_string(control.join(script))
                .with_context(|| format!("no {script} in {name}"))?;
            output(cmd("sh", &["-n"]).arg(control.join(script)))?;
            assert!(!text.contains("lb detach") || script == "prerm", "{script}");
        }
        let copyright = stdout(&mut cmd(
            "sh",
            &[
                "-c",
                &format!(
                    "dpkg-deb --fsys-tarfile '{deb_s}' | tar -xOf - ./usr/share/doc/lb/copyright"
                ),
            ],
        ))?;
        assert!(copyright.contains("MIT OR Apache-2.0"), "{copyright}");

        // The packaged unit, verified offline against the packaged binary: systemd-analyze checks
        // that ExecStart is executable, so a copy points it at the extracted /usr/sbin/lb.
        let root = tmp.0.join("root");
        output(cmd("dpkg-deb", &["-x", &deb_s]).arg(&root))?;
        let lb = root.join("usr/sbin/lb");
        let version = stdout(Command::new(&lb).arg("--version"))?;
        assert!(version.starts_with("lb "), "{version}");
        // Its log under journald (JOURNAL_STREAM names its stderr) and not: `lb detach` of an
        // instance that does not exist logs one info line and changes nothing; a missing
        // configuration is a fatal error.
        let instance = format!("pkgtest{}", std::process::id());
        let stderr_of = |args: &[&str], journal: bool| -> Result<String> {
            use std::os::unix::fs::MetadataExt;
            let path = tmp.0.join("stderr.log");
            let file = std::fs::File::create(&path)?;
            let meta = file.metadata()?;
            let mut c = Command::new(&lb);
            c.args(args)
                .env_remove("RUST_LOG")
                .env_remove("JOURNAL_STREAM")
                .stderr(file);
            if journal {
                c.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
            }
            probe(&mut c)?;
            Ok(std::fs::read_to_string(&path)?)
        };
        let detach = ["detach", "--instance", instance.as_str()];
        let journal = stderr_of(&detach, true)?;
        assert!(
            journal.starts_with("<6> INFO lb_user::run: nothing pinned for this instance"),
            "{journal:?}"
        );
        let plain = stderr_of(&detach, false)?;
        assert!(
            plain.starts_with(|c: char| c.is_ascii_digit())
                && plain.contains(" INFO lb_user::run: "),
            "a timestamp first: {plain:?}"
        );
        assert!(
            !journal.contains('\x1b') && !plain.contains('\x1b'),
            "colours in a file"
        );
        let missing = tmp.0.join("absent.toml");
        let run = ["run", "--config", &missing.to_string_lossy()];
        let fatal = stderr_of(&run, true)?;
        assert!(
            fatal.starts_with("<3>Error: reading the configuration "),
            "{fatal:?}"
        );
        assert!(stderr_of(&run, false)?.starts_with("Error: reading the configuration "));

        let unit = std::fs::read_to_string(root.join("lib/systemd/system/lb@.service"))?;
        let exec = "ExecStart=/usr/sbin/lb run --config /etc/lb/%i.toml --instance %i\n";
        assert!(unit.contains(exec), "{unit}");
        for line in [
            "Type=exec\n",
            "Restart=on-failure\n",
            "KillSignal=SIGTERM\n",
        ] {
            assert!(unit.contains(line), "no {line} in the unit");
        }
        assert!(
            !unit.lines().any(|l| l.starts_with("ExecStop")),
            "stopping must leave the data path (lb detach is the operator's)"
        );
        let units = tmp.0.join("units");
        std::fs::create_dir_all(&units)?;
        let copy = units.join("lb@.service");
        std::fs::write(&copy, unit.replace("/usr/sbin/lb", &lb.to_string_lossy()))?;
        let verify = probe(cmd("systemd-analyze", &["verify"]).arg(&copy))?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );
        // verify exits 0 on unknown keys and bad values too: any line about our unit fails.
        assert!(
            verify.status.success() && !said.contains("lb@"),
            "systemd-analyze verify: {}\n{said}",
            verify.status
        );
        Ok(())
    }
}
