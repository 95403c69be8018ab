//! Test suites inside a qemu VM that boots another kernel than the host's: Debian 12's own Linux
//! 6.1 (`cargo xtask test --kernel debian-6.1`, and after the host suites in a plain `cargo xtask
//! test`).
//!
//! - The kernel is Debian's `linux-image-6.1.0-<abi>-amd64-unsigned` package, extracted with
//!   `dpkg-deb -x` into `.tools/kernels/debian-6.1/` (`depmod` run on it). Not the `-cloud-amd64`
//!   flavour: that one is built without 9p (`# CONFIG_NET_9P is not set`), and virtiofsd, the
//!   only other way to share the host's file system, is not packaged in Debian 12. Both flavours
//!   are the same 6.1 source; only their driver configurations differ.
//! - The guest runs over the host's root file system, read-only, through 9p (`-virtfs`): the test
//!   binaries, `lb`, `ip`, `nsenter`, Python and its venv are the host's own files at the same
//!   paths. PID 1 is busybox from a small initramfs built here (busybox-static, the modules 9p
//!   needs, an init script); it mounts the host root, tmpfs on /tmp, /run, /var/tmp and
//!   /dev/shm, bpffs, tracefs, /proc, /sys, /dev, points the kernel's module loader at the
//!   extracted package's modules (the host has no `/lib/modules/6.1*`), brings `lo` up, runs the
//!   generated suite script after switching root to it, and powers off whatever the script did.
//! - qemu uses TCG (`-accel tcg -cpu max`): nested KVM stops while this kernel boots here.
//! - Output: the guest's console (kernel messages) goes to a log file, shown when something went
//!   wrong; the suites' output goes to a second serial port, qemu's stdout, and is read here line
//!   by line, with `@@lb-vm` marker lines between suites.
//! - Time bounds: each suite is killed in the guest after `LB_SUITE_TIMEOUT_SECS` (as on the host),
//!   the whole VM here after `LB_VM_TIMEOUT_SECS` (default 45 min); unfinished suites count as failed.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{cmd, describe, probe, probe_stdout, repo, run};
use crate::testrun::{parse_result_line, Counts, Row, Suite};

/// Debian 12's own kernel: what CI runs the VM suites on.
pub const DEBIAN_6_1: &str = "debian-6.1";

/// A kernel from Debian's archive the suites can run on.
pub struct KernelSpec {
    /// `--kernel` name and directory under `.tools/kernels/`.
    pub name: &'static str,
    /// `apt-cache search --names-only` pattern of its packages.
    search: &'static str,
    /// The package's release (`uname -r`) starts with this; the number after it picks the newest.
    release_prefix: &'static str,
}

/// The kernels `--kernel` knows: Debian 12's own 6.1, and the 6.12 Debian 12 also ships (opt-in,
/// not run by default).
pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        name: DEBIAN_6_1,
        search: r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
        release_prefix: "6.1.0-",
    },
    KernelSpec {
        name: "debian-6.12",
        search: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$",
        release_prefix: "6.12.",
    },
];

/// The spec of the kernel `name`.
pub fn spec(name: &str) -> Result<&'static KernelSpec> {
    KERNELS.iter().find(|k| k.name == name).with_context(|| {
        let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        format!(
            "unknown kernel `{name}`: use `all`, `host` or one of {}",
            names.join(", ")
        )
    })
}
/// Written last into an installed kernel's directory: `<package> <release>`.
const STAMP: &str = "lb-installed";
/// Modules the initramfs loads to mount the host's root (their dependencies come along).
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];
/// The 9p mount tag of the host's root.
const ROOT_TAG: &str = "hostroot";
/// The static busybox of Debian's busybox-static (PID 1 and the tools of the initramfs).
const BUSYBOX: &str = "/bin/busybox";
/// Prefix of the guest's marker lines on the output port.
const MARK: &str = "@@lb-vm ";

/// One kernel extracted under `.tools/kernels/<name>/`.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub name: String,
    /// Holds `boot/vmlinuz-<release>` and `lib/modules/<release>/`.
    pub root: PathBuf,
    /// `uname -r` of the guest, e.g. `6.1.0-57-amd64`.
    pub release: String,
    pub package: String,
}

impl Kernel {
    fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    fn modules(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

fn kernels_dir() -> PathBuf {
    repo().join(".tools").join("kernels")
}

/// The installed kernel `name`, if its stamp says the install completed.
pub fn installed(name: &str) -> Option<Kernel> {
    let root = kernels_dir().join(name);
    let stamp = fs::read_to_string(root.join(STAMP)).ok()?;
    let mut words = stamp.split_whitespace();
    let package = words.next()?.to_string();
    let release = words.next()?.to_string();
    let kernel = Kernel {
        name: name.to_string(),
        root,
        release,
        package,
    };
    (kernel.vmlinuz().is_file() && kernel.modules().is_dir()).then_some(kernel)
}

/// The newest `linux-image-<release>-unsigned` in `apt-cache search` output whose release starts
/// with `release_prefix` and ends in `-amd64` (newest: the highest number right after the
/// prefix), with its release, e.g. `6.1.0-57-amd64`.
pub fn pick_package(search: &str, release_prefix: &str) -> Option<(String, String)> {
    search
        .lines()
        .filter_map(|l| {
            let name = l.split_whitespace().next()?;
            let release = name
                .strip_prefix("linux-image-")?
                .strip_suffix("-unsigned")?;
            let rest = release
                .strip_prefix(release_prefix)?
                .strip_suffix("-amd64")?;
            // `57` (6.1) or `118+deb12` (6.12); not `60-cloud`, another flavour.
            let (digits, tail) = rest.split_at(
                rest.find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len()),
            );
            if !(tail.is_empty() || tail.starts_with('+')) {
                return None;
            }
            let number: u32 = digits.parse().ok()?;
            Some((number, name.to_string(), release.to_string()))
        })
        .max()
        .map(|(_, name, release)| (name, release))
}

/// Removes a directory tree when dropped (a half-done install, a VM run's files).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Setup step: downloads and extracts the kernel `name` unless installed. Quick when it is.
pub fn ensure_kernel(name: &str, done: &mut Vec<String>) -> Result<Kernel> {
    let spec = spec(name)?;
    if let Some(k) = installed(name) {
        return Ok(k);
    }
    crate::setup::require_root(&format!("downloading the kernel {name}"))?;
    let search = || {
        probe_stdout(&mut cmd(
            "apt-cache",
            &["search", "--names-only", spec.search],
        ))
        .unwrap_or_default()
    };
    let found = match pick_package(&search(), spec.release_prefix) {
        Some(p) => Some(p),
        None => {
            run(&mut cmd("apt-get", &["update"]))?;
            pick_package(&search(), spec.release_prefix)
        }
    };
    let Some((package, release)) = found else {
        bail!(
            "apt-cache finds no package matching {}: the Debian 12 (bookworm) archive and its \
             security updates must be in the apt sources to test on its kernel",
            spec.search
        );
    };
    let dir = kernels_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let staging = dir.join(format!(".{name}.partial-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(staging.clone());
    fs::create_dir_all(&staging)?;
    // As root apt would hand the download to its `_apt` user, who cannot write here.
    run(cmd(
        "apt-get",
        &["download", "-o", "APT::Sandbox::User=root", &package],
    )
    .current_dir(&staging))?;
    let deb = fs::read_dir(&staging)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let tree = staging.join("root");
    run(cmd("dpkg-deb", &["-x"]).arg(&deb).arg(&tree))?;
    // The package ships no modules.dep (its postinst makes it); modprobe in the guest needs it.
    run(cmd("depmod", &["-b"]).arg(&tree).arg(&release))?;
    fs::write(tree.join(STAMP), format!("{package} {release}\n"))?;
    let target = dir.join(name);
    if target.exists() {
        fs::remove_dir_all(&target)
            .with_context(|| format!("removing the incomplete {}", target.display()))?;
    }
    fs::rename(&tree, &target).with_context(|| format!("moving into {}", target.display()))?;
    done.push(format!("kernel {name}: {package} in {}", target.display()));
    installed(name).with_context(|| format!("{} is incomplete after install", target.display()))
}

/// The module files (paths relative to the modules directory) that loading `roots` needs, in an
/// order `insmod` accepts (dependencies first), from the text of `modules.dep`. Roots listed in
/// `modules.builtin` (text) are skipped: they are in the kernel image.
pub fn load_order(modules_dep: &str, builtin: &str, roots: &[&str]) -> Result<Vec<String>> {
    let deps: BTreeMap<&str, Vec<&str>> = modules_dep
        .lines()
        .filter_map(|l| {
            let (module, deps) = l.split_once(':')?;
            Some((module.trim(), deps.split_whitespace().collect()))
        })
        .collect();
    fn visit<'a>(
        m: &'a str,
        deps: &BTreeMap<&'a str, Vec<&'a str>>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<()> {
        if order.iter().any(|o| o == m) {
            return Ok(());
        }
        if depth > 64 {
            bail!("modules.dep: dependency cycle at {m}");
        }
        let Some(ds) = deps.get(m) else {
            bail!("modules.dep does not list {m}");
        };
        for d in ds {
            visit(d, deps, order, depth + 1)?;
        }
        order.push(m.to_string());
        Ok(())
    }
    let mut order = Vec::new();
    let file_of = |path: &str| -> String {
        let base = path.rsplit('/').next().unwrap_or(path);
        base.split(".ko").next().unwrap_or(base).to_string()
    };
    for root in roots {
        if builtin.lines().any(|l| file_of(l.trim()) == *root) {
            continue;
        }
        let path = deps
            .keys()
            .find(|k| file_of(k) == *root)
            .with_context(|| format!("modules.dep has no {root}.ko and it is not built in"))?;
        visit(path, &deps, &mut order, 0)?;
    }
    Ok(order)
}

/// An `newc` cpio archive (the initramfs format), written in memory.
#[derive(Default)]
pub struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            body.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    pub fn file(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.entry(name, 0o100000 | mode, (0, 0), body);
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}

/// `s` quoted for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// PID 1 of the guest (busybox sh). `{modules}`: the insmod lines; `{modroot}`: the extracted
/// package's root, where the guest's modprobe finds `lib/modules/<release>`.
const INIT: &str = r#"#!/bin/busybox sh
# PID 1 of the lb test VM, written by xtask/src/vm.rs: mounts the host's root read-only over 9p
# and switches to it, where /pid1 runs /guest.sh and powers off, whatever happens.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev
out=/dev/ttyS1
stty -F $out raw -echo
fail() { echo "@@lb-vm fatal $*" >$out; poweroff -f; }
mount -t proc proc /proc || fail "mounting /proc"
mount -t sysfs sys /sys || fail "mounting /sys"
{modules}
mkdir -p /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 {tag} /newroot \
    || fail "mounting the host's root over 9p"
r=/newroot
# The repository (test binaries, the kernel's modules) may live below a directory the tmpfs
# mounts hide (/tmp, /var/tmp, /run): keep it aside and put it back on top of them.
case {repo} in /tmp/*|/var/tmp/*|/run/*)
    mkdir -p /keep && mount --bind $r{repo} /keep || fail "keeping the repository";;
esac
mount -t tmpfs -o mode=1777 tmpfs $r/tmp || fail "tmpfs on /tmp"
mount -t tmpfs -o mode=1777 tmpfs $r/var/tmp || fail "tmpfs on /var/tmp"
mount -t tmpfs -o mode=755 tmpfs $r/run || fail "tmpfs on /run"
case {repo} in /tmp/*|/var/tmp/*|/run/*)
    mkdir -p $r{repo} && mount --move /keep $r{repo} || fail "putting the repository back";;
esac
mount -t proc proc $r/proc || fail "proc in the root"
mount -t sysfs sys $r/sys || fail "sysfs in the root"
mount -t devtmpfs dev $r/dev || fail "devtmpfs in the root"
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts devpts $r/dev/pts || fail "devpts"
mount -t tmpfs -o mode=1777 tmpfs $r/dev/shm || fail "tmpfs on /dev/shm"
mount -t bpf bpf $r/sys/fs/bpf || fail "bpffs on /sys/fs/bpf"
mount -t tracefs tracefs $r/sys/kernel/tracing || fail "tracefs on /sys/kernel/tracing"
mkdir -p $r/run/lock $r/run/netns $r/run/lb-vm/bin $r/tmp/home
cp /guest.sh /pid1 $r/run/lb-vm/
# The host has no /lib/modules/<release> and its root is read-only here: modprobe (the kernel's
# module loader and anyone calling it) reads the extracted package's modules instead.
printf '#!/bin/sh\nexec /sbin/modprobe -d %s "$@"\n' {modroot} > $r/run/lb-vm/bin/modprobe
chmod 755 $r/run/lb-vm/bin/modprobe
echo /run/lb-vm/bin/modprobe > /proc/sys/kernel/modprobe
hostname lb-vm
ip link set lo up || fail "loopback up"
# A real root switch, not a chroot: the kernel runs its helpers (modprobe) in PID 1's root.
exec switch_root $r /bin/busybox sh /run/lb-vm/pid1
"#;

/// PID 1 after the root switch (the host's busybox): the suites, then power-off. Should PID 1
/// exit instead, the kernel panics, reboots, and qemu (`-no-reboot`) ends all the same.
const PID1: &str = r#"/bin/sh /run/lb-vm/guest.sh >/dev/ttyS1 2>&1 </dev/null
echo "@@lb-vm exit $?" >/dev/ttyS1
/bin/busybox poweroff -f
"#;

/// A suite to run in the guest with its arguments.
#[derive(Debug, Clone)]
pub struct GuestRun {
    pub suite: Suite,
    pub args: Vec<String>,
}

/// The script the guest runs (under the host's /bin/sh): every suite in turn, each between
/// `begin`/`end` marker lines, the end line carrying its exit status and milliseconds.
pub fn guest_script(runs: &[GuestRun], env: &[(&str, PathBuf)], suite_limit: Duration) -> String {
    let mut s = String::from(
        "# Written by xtask/src/vm.rs: the suites of one VM run.\n\
         export PATH=/run/lb-vm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export HOME=/tmp/home\n",
    );
    for (k, v) in env {
        s += &format!("export {k}={}\n", sh_quote(&v.to_string_lossy()));
    }
    // The harness gives `lb run` 20 s to get ready; under TCG loading the program takes 13 s
    // (two verifier passes when it fails): time enough to see its own error instead of a timeout.
    let ready = std::env::var("LB_READY_TIMEOUT_SECS").unwrap_or_else(|_| "120".into());
    s += &format!("export LB_READY_TIMEOUT_SECS={}\n", sh_quote(&ready));
    // TCG runs the guest several times slower than the host: tests scale their timing bounds.
    let slowdown = std::env::var("LB_TEST_SLOWDOWN").unwrap_or_else(|_| "4".into());
    s += &format!("export LB_TEST_SLOWDOWN={}\n", sh_quote(&slowdown));
    for var in ["RUST_BACKTRACE", "RUST_LOG"] {
        if let Ok(v) = std::env::var(var) {
            s += &format!("export {var}={}\n", sh_quote(&v));
        }
    }
    s += "ms() { echo $(( $(date +%s%N) / 1000000 )); }\n";
    s += "echo \"@@lb-vm kernel $(uname -r)\"\n";
    for (i, r) in runs.iter().enumerate() {
        let dir = sh_quote(&r.suite.package_dir.to_string_lossy());
        let args: Vec<String> = r.args.iter().map(|a| sh_quote(a)).collect();
        s += &format!(
            "t=$(ms); echo '@@lb-vm begin {i}'\n\
             (cd {dir} && CARGO_MANIFEST_DIR={dir} CARGO_PKG_NAME={pkg} exec timeout -s KILL {secs} {exe} {args})\n\
             echo \"@@lb-vm end {i} $? $(( $(ms) - t ))\"\n",
            pkg = sh_quote(&r.suite.package),
            secs = suite_limit.as_secs().max(1),
            exe = sh_quote(&r.suite.executable.to_string_lossy()),
            args = args.join(" "),
        );
    }
    s += "echo '@@lb-vm done'\n";
    s
}

/// The initramfs for `kernel` running `guest_sh`.
fn initramfs(kernel: &Kernel, guest_sh: &str) -> Result<Vec<u8>> {
    let modules = kernel.modules();
    let dep = fs::read_to_string(modules.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", modules.display()))?;
    let builtin = fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    let order = load_order(&dep, &builtin, BOOT_MODULES)?;
    let busybox = fs::read(BUSYBOX).with_context(|| {
        format!("reading {BUSYBOX}: install busybox-static (`cargo xtask setup` does)")
    })?;
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "modules"] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox);
    let mut insmods = String::new();
    for m in &order {
        let path = modules.join(m);
        let file = m.rsplit('/').next().unwrap_or(m);
        let base = format!("{}.ko", file.split(".ko").next().unwrap_or(file));
        // busybox's insmod takes plain modules; newer Debian kernels ship them xz-compressed.
        let body = if file.ends_with(".ko.xz") {
            let out = probe(cmd("xz", &["-dc"]).arg(&path))?;
            if !out.status.success() {
                bail!("xz -dc {} failed", path.display());
            }
            out.stdout
        } else {
            fs::read(&path).with_context(|| format!("reading {}", path.display()))?
        };
        cpio.file(&format!("modules/{base}"), 0o644, &body);
        insmods += &format!("insmod /modules/{base} || fail \"insmod {base}\"\n");
    }
    let modroot = fs::canonicalize(&kernel.root)
        .with_context(|| format!("resolving {}", kernel.root.display()))?;
    let init = INIT
        .replace("{modules}", insmods.trim_end())
        .replace("{tag}", ROOT_TAG)
        .replace("{repo}", &sh_quote(&repo().to_string_lossy()))
        .replace("{modroot}", &sh_quote(&modroot.to_string_lossy()));
    cpio.file("init", 0o755, init.as_bytes());
    cpio.file("guest.sh", 0o644, guest_sh.as_bytes());
    cpio.file("pid1", 0o644, PID1.as_bytes());
    Ok(cpio.finish())
}

/// The whole VM's time limit: `$LB_VM_TIMEOUT_SECS`, default 45 minutes.
fn vm_timeout() -> Duration {
    let secs = std::env::var("LB_VM_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45 * 60);
    Duration::from_secs(secs)
}

/// What one guest suite did, from the marker lines.
#[derive(Debug, Default, Clone)]
struct SuiteOutcome {
    counts: Counts,
    saw_result: bool,
    /// `(exit status, milliseconds)` from its end line; `None`: it never ended.
    end: Option<(i32, u64)>,
    /// `test NAME ... ok` and `... FAILED` lines, for a suite cut off before its result line.
    ok_lines: u64,
    failed_lines: u64,
    /// When its begin line arrived here (its time when it never ends).
    began: Option<Instant>,
}

/// Boots `kernel` in qemu, runs `runs` there and returns one row per suite, named
/// `<suite> [<kernel>]`. Suites that did not finish (guest crash, time limit) count one failure.
pub fn run_suites(
    kernel: &Kernel,
    runs: &[GuestRun],
    env: &[(&str, PathBuf)],
    suite_limit: Duration,
) -> Result<Vec<Row>> {
    let qemu = "qemu-system-x86_64";
    if probe(&mut cmd(qemu, &["--version"])).is_err() {
        bail!("{qemu} is missing: run `cargo xtask setup` (installs qemu-system-x86)");
    }
    let dir =
        repo()
            .join("target")
            .join("vm")
            .join(format!("{}-{}", kernel.name, std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let image = dir.join("initramfs.cpio");
    let console = dir.join("console.log");
    fs::write(
        &image,
        initramfs(kernel, &guest_script(runs, env, suite_limit))?,
    )
    .with_context(|| format!("writing {}", image.display()))?;

    let mut q = Command::new(qemu);
    q.args(["-nodefaults", "-no-user-config", "-no-reboot"])
        .args(["-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2"])
        .args(["-display", "none", "-monitor", "none"])
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(&image)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(["-serial", "stdio"])
        .arg("-virtfs")
        .arg(format!(
            "local,path=/,mount_tag={ROOT_TAG},security_model=passthrough,readonly=on,multidevs=remap"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    eprintln!("xtask$ {}", describe(&q));
    let started = Instant::now();
    let mut child = q.spawn().with_context(|| format!("starting {qemu}"))?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let pid = child.id();
    let limit = vm_timeout();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit) == Err(RecvTimeoutError::Timeout) {
            eprintln!(
                "xtask: the VM exceeded {limit:?} (LB_VM_TIMEOUT_SECS), killing qemu (pid {pid})"
            );
            // SAFETY: plain kill(2) on our own child's pid; it is not reaped before done_tx fires.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            true
        } else {
            false
        }
    });

    let mut outcomes = vec![SuiteOutcome::default(); runs.len()];
    let mut current: Option<usize> = None;
    let mut fatal: Option<String> = None;
    let mut booted: Option<Duration> = None;
    let mut finished = false;
    let out = std::io::stdout();
    let mut reader = BufReader::new(stdout);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                eprintln!("xtask: reading the VM's output: {e}");
                break;
            }
        }
        let text = String::from_utf8_lossy(&raw);
        let line = text.trim_end_matches(['\n', '\r']);
        if let Some(mark) = line.strip_prefix(MARK) {
            let words: Vec<&str> = mark.split_whitespace().collect();
            match words.as_slice() {
                ["kernel", release] => {
                    booted = Some(started.elapsed());
                    println!(
                        "\n[{}] guest kernel {release} ({}) ready after {:.1} s",
                        kernel.name,
                        kernel.package,
                        started.elapsed().as_secs_f64()
                    );
                }
                ["begin", i] => {
                    current = i.parse().ok().filter(|i: &usize| *i < runs.len());
                    if let Some(i) = current {
                        outcomes[i].began = Some(Instant::now());
                        println!("\n=== {} [{}] ===", runs[i].suite.name, kernel.name);
                    }
                }
                ["end", i, rc, ms] => {
                    if let (Ok(i), Ok(rc), Ok(ms)) = (i.parse::<usize>(), rc.parse(), ms.parse()) {
                        if let Some(o) = outcomes.get_mut(i) {
                            o.end = Some((rc, ms));
                        }
                    }
                    current = None;
                }
                ["done"] => finished = true,
                ["exit", _] => {}
                _ if mark.starts_with("fatal") => fatal = Some(mark.to_string()),
                _ => {}
            }
            continue;
        }
        {
            let mut out = out.lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        if let Some(i) = current {
            let o = &mut outcomes[i];
            if let Some(c) = parse_result_line(line) {
                o.counts.add(c);
                o.saw_result = true;
            } else if line.starts_with("test ") && line.ends_with(" ... ok") {
                o.ok_lines += 1;
            } else if line.starts_with("test ") && line.ends_with(" ... FAILED") {
                o.failed_lines += 1;
            }
        }
    }
    let _ = done_tx.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    let status = child.wait().context("waiting for qemu")?;
    let elapsed = started.elapsed();

    let mut problem = Vec::new();
    if let Some(f) = &fatal {
        problem.push(format!("the guest failed to set up: {f}"));
    }
    if timed_out {
        problem.push(format!(
            "the VM did not finish within {:?}: raise LB_VM_TIMEOUT_SECS, or look for a hung test",
            vm_timeout()
        ));
    } else if !finished {
        problem.push(format!(
            "qemu ended ({status}) before the guest finished its suites"
        ));
    }
    if !problem.is_empty() {
        eprintln!("xtask: [{}] {}", kernel.name, problem.join("; "));
        let log = fs::read_to_string(&console).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        if tail.is_empty() {
            eprintln!("xtask: the guest's console (kernel warnings and worse) is empty");
        } else {
            eprintln!("xtask: last lines of the guest's console:");
            for l in tail.iter().rev() {
                eprintln!("  {l}");
            }
        }
    }
    println!(
        "\n[{}] VM: {:.1} s in all (boot {}), {} suites",
        kernel.name,
        elapsed.as_secs_f64(),
        booted.map_or("never finished".into(), |b| format!(
            "{:.1} s",
            b.as_secs_f64()
        )),
        runs.len()
    );

    let mut rows = Vec::new();
    for (r, o) in runs.iter().zip(outcomes) {
        let mut counts = o.counts;
        if !o.saw_result {
            counts.passed += o.ok_lines;
            counts.failed += o.failed_lines;
        }
        let secs = match (o.end, o.began) {
            (Some((_, ms)), _) => ms as f64 / 1000.0,
            (None, Some(began)) => began.elapsed().as_secs_f64(),
            (None, None) => 0.0,
        };
        match o.end {
            None => {
                eprintln!(
                    "xtask: [{}] {} did not run to its end",
                    kernel.name, r.suite.name
                );
                counts.failed += 1;
            }
            Some((137, _)) => {
                eprintln!(
                    "xtask: [{}] {} exceeded {suite_limit:?} (LB_SUITE_TIMEOUT_SECS) and was killed",
                    kernel.name, r.suite.name
                );
                counts.failed += 1;
            }
            Some((rc, _)) if rc != 0 && (!o.saw_result || counts.failed == 0) => {
                eprintln!(
                    "xtask: [{}] {} exited with status {rc}",
                    kernel.name, r.suite.name
                );
                counts.failed += 1;
            }
            Some(_) => {}
        }
        rows.push(Row {
            name: format!("{} [{}]", r.suite.name, kernel.name),
            counts,
            secs,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_abi_of_the_generic_flavour_is_picked() {
        let search = "linux-image-6.1.0-47-amd64-unsigned - Linux 6.1 for 64-bit PCs\n\
                      linux-image-6.1.0-57-amd64-unsigned - Linux 6.1 for 64-bit PCs\n\
                      linux-image-6.1.0-9-amd64-unsigned - Linux 6.1 for 64-bit PCs\n\
                      linux-image-6.1.0-60-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud\n";
        assert_eq!(
            pick_package(search, "6.1.0-"),
            Some((
                "linux-image-6.1.0-57-amd64-unsigned".to_string(),
                "6.1.0-57-amd64".to_string()
            ))
        );
        assert_eq!(pick_package("", "6.1.0-"), None);
        let search = "linux-image-6.12.99+deb12-amd64-unsigned - Linux 6.12\n\
                      linux-image-6.12.118+deb12-amd64-unsigned - Linux 6.12\n";
        assert_eq!(
            pick_package(search, "6.12.").map(|p| p.1),
            Some("6.12.118+deb12-amd64".to_string())
        );
    }

    #[test]
    fn modules_load_after_their_dependencies_once_each() {
        let dep = "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko\n\
                   kernel/fs/netfs/netfs.ko:\n\
                   kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko\n\
                   kernel/net/9p/9pnet.ko:\n\
                   kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko\n\
                   kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/virtio/virtio_ring.ko:\n";
        let order = load_order(
            dep,
            "kernel/drivers/virtio/virtio_pci.ko\n",
            &["virtio_pci", "9pnet_virtio", "9p"],
        )
        .unwrap();
        let pos = |m: &str| order.iter().position(|o| o.ends_with(m)).unwrap();
        assert_eq!(order.len(), 7);
        assert!(pos("/virtio_ring.ko") < pos("/virtio.ko"));
        assert!(pos("/virtio.ko") < pos("/9pnet_virtio.ko"));
        assert!(pos("/9pnet.ko") < pos("/9pnet_virtio.ko"));
        assert!(pos("/netfs.ko") < pos("/fscache.ko"));
        assert!(pos("/fscache.ko") < pos("/9p.ko"));
        assert!(load_order(dep, "", &["veth"]).is_err());
    }

    #[test]
    fn cpio_entries_are_newc_and_4_byte_aligned() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"#!x");
        let data = c.finish();
        assert!(data.starts_with(b"070701"));
        assert!(data.len().is_multiple_of(4));
        // mode of the first entry, then the trailer's name
        assert_eq!(&data[14..22], b"000081ed");
        assert!(data.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn shell_quoting_survives_single_quotes() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
