//! Loading, attaching and pinning the XDP program and its maps.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::names;
use tracing::{info, warn};

use crate::{config::Config, host};

/// Where instances pin their maps: `/sys/fs/bpf/lb/<instance>/`.
pub const PIN_ROOT: &str = "/sys/fs/bpf/lb";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// How to attach the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Driver (native) mode; fails where the driver has no XDP support.
    Native,
    /// Generic (SKB) mode: works everywhere, slower; frames may be GSO super-packets.
    Generic,
    /// Native, falling back to generic with a log line.
    Auto,
}

pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(instance)
}

/// Mounts bpffs at /sys/fs/bpf unless it is there.
pub fn ensure_bpffs() -> Result<()> {
    let st = nix::sys::statfs::statfs("/sys/fs/bpf").context("statfs /sys/fs/bpf")?;
    if st.filesystem_type().0 as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mount -t bpf bpf /sys/fs/bpf (needed to pin maps)")?;
    info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Loads the object with the configured table sizes. Nothing is attached yet.
pub fn load(cfg: &Config) -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(names::CT_EMBRYONIC, cfg.embryonic_entries)
        .map_max_entries(names::CT_ESTABLISHED, cfg.established_entries)
        .load(crate::EBPF_OBJECT)
        .context("loading the XDP object into the kernel failed (are you root? is the kernel >= 6.7 with BTF?)")?;
    let prog: &mut Xdp = ebpf
        .program_mut("lb_xdp")
        .context("the object has no lb_xdp program")?
        .try_into()
        .context("lb_xdp is not an XDP program")?;
    prog.load().context("the verifier rejected lb_xdp")?;
    if let Ok(info) = prog.info() {
        if let Some(n) = info.verified_instruction_count() {
            info!(verified_insns = n, "XDP program lb_xdp loaded");
        }
    }
    Ok(ebpf)
}

/// Attaches `lb_xdp` to each interface; returns the mode each one got.
pub fn attach(ebpf: &mut Ebpf, ifaces: &[String], mode: AttachMode) -> Result<Vec<XdpMode>> {
    let prog: &mut Xdp = ebpf
        .program_mut("lb_xdp")
        .context("no lb_xdp")?
        .try_into()?;
    let mut modes = Vec::new();
    for iface in ifaces {
        let veth = host::driver(iface).as_deref() == Some("veth");
        let got = match mode {
            AttachMode::Native => {
                prog.attach(iface, XdpMode::Driver).with_context(|| {
                    format!("attaching XDP in native mode to {iface} failed; its driver may lack XDP support: try --xdp-mode generic or auto")
                })?;
                XdpMode::Driver
            }
            AttachMode::Generic => {
                prog.attach(iface, XdpMode::Skb)
                    .with_context(|| format!("attaching XDP in generic mode to {iface} failed"))?;
                XdpMode::Skb
            }
            AttachMode::Auto => match prog.attach(iface, XdpMode::Driver) {
                Ok(_) => XdpMode::Driver,
                Err(e) => {
                    warn!(
                        iface,
                        "native XDP refused ({e}); falling back to generic (SKB) mode"
                    );
                    prog.attach(iface, XdpMode::Skb).with_context(|| {
                        format!("attaching XDP to {iface} failed in native and generic mode")
                    })?;
                    XdpMode::Skb
                }
            },
        };
        if got == XdpMode::Driver && veth {
            warn!(
                iface,
                "native XDP on a veth: the peer must carry an XDP program to receive XDP_TX/REDIRECT frames, \
                 and local senders behind it need `ethtool -K <veth> tx off` (partial checksums)"
            );
        }
        info!(
            iface,
            mode = if got == XdpMode::Driver {
                "native"
            } else {
                "generic"
            },
            "XDP attached"
        );
        modes.push(got);
    }
    Ok(modes)
}

/// Pins every map under `dir` (created; it must not exist yet).
pub fn pin_maps(ebpf: &Ebpf, dir: &Path) -> Result<()> {
    if dir.exists() {
        bail!(
            "{} exists: instance is already running, or a previous run was killed. \
             Stop it, or remove the stale pins with `lb detach --instance {}`",
            dir.display(),
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("?")
        );
    }
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    for name in names::ALL {
        let map = ebpf
            .map(name)
            .with_context(|| format!("the object has no map {name}"))?;
        map.pin(dir.join(name))
            .with_context(|| format!("pin {name} under {}", dir.display()))?;
    }
    Ok(())
}

/// Removes an instance's pins.
pub fn unpin(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    Ok(())
}
