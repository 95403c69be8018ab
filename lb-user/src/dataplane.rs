//! Loading, attaching and pinning the XDP program and its maps.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, Map, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        TestRun, TracePoint, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{abi, names, Flow, FlowKey};
use tracing::{info, warn};

use crate::{config::Config, control::Control, host};

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

/// The map pinned as `name` in `dir` (an instance's pin directory).
pub fn open_pinned(dir: &Path, name: &str) -> Result<Map> {
    let data = MapData::from_pin(dir.join(name))
        .with_context(|| format!("open pinned map {name} in {}", dir.display()))?;
    Ok(Map::from_map_data(data)?)
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
    load_with(cfg, None)
}

/// The configured size of a map that has one (the connection tables), else 0.
fn configured_size(cfg: &Config, name: &str) -> u32 {
    match name {
        names::CT_EMBRYONIC => cfg.embryonic_entries,
        names::CT_ESTABLISHED => cfg.established_entries,
        names::SLOTS => slots_size(cfg),
        _ => 0,
    }
}

/// Connection slots: one per connection the two tables can hold.
fn slots_size(cfg: &Config) -> u32 {
    cfg.embryonic_entries / 2 + cfg.established_entries / 2
}

/// The `META` hashes this build expects for `cfg`, by map name.
/// META slot `i` holds map `names::ALL[i]`'s layout hash, slot `SIZE_SLOTS + i` its size.
fn expected_meta() -> Result<Vec<(&'static str, u64)>> {
    names::ALL
        .iter()
        .map(|&n| {
            Ok((
                n,
                abi::layout(n).with_context(|| format!("no ABI layout for map {n}"))?,
            ))
        })
        .collect()
}

const SIZE_SLOTS: u32 = 24;

/// Bytes of the `FLOW_SYNC` ring: the object's size in a pair, else one page (the program
/// never writes it).
fn flow_sync_size(cfg: &Config) -> u32 {
    if cfg.pair.is_some() {
        lb_common::FLOW_SYNC_BYTES
    } else {
        4096
    }
}

/// Whether an instance was found pinned and adopted, and how many flows it carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pins {
    Fresh,
    Adopted { flows: u64 },
}

/// Counts the flows (two entries each) of a pinned established table.
fn pinned_flows(dir: &Path) -> u64 {
    let Ok(data) = MapData::from_pin(dir.join(names::CT_ESTABLISHED)) else {
        return 0;
    };
    let Ok(map) = Map::from_map_data(data) else {
        return 0;
    };
    let Ok(table) = aya::maps::HashMap::<_, FlowKey, Flow>::try_from(map) else {
        return 0;
    };
    table.keys().filter(|k| k.is_ok()).count() as u64 / 2
}

/// Refuses to reuse pinned maps whose layout differs from this build's. A pinned table keeps
/// its size (the kernel cannot resize a map): `cfg` is adjusted to it, with a warning.
fn check_meta(cfg: &mut Config, dir: &Path) -> Result<Pins> {
    let meta_path = dir.join(names::META);
    if !meta_path.exists() {
        if dir.exists()
            && fs::read_dir(dir)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false)
        {
            bail!(
                "{} holds pins without a META map (an older or foreign build): `lb detach --instance {}` removes them",
                dir.display(),
                cfg.instance
            );
        }
        return Ok(Pins::Fresh);
    }
    let meta: Array<MapData, u64> = Array::try_from(Map::from_map_data(
        MapData::from_pin(&meta_path).context("open pinned META")?,
    )?)
    .context("pinned META has an unexpected layout")?;
    let version = meta.get(&abi::META_VERSION_SLOT, 0).unwrap_or(0);
    let (mut changed, mut replaced) = (Vec::new(), Vec::new());
    for (i, (name, want)) in expected_meta()?.into_iter().enumerate() {
        let pinned = meta.get(&(i as u32), 0).unwrap_or(0);
        if pinned == 0 && !dir.join(name).exists() {
            // A map this build added: created and pinned with the others, recorded below.
            info!(
                map = name,
                "a map new in this build is added to the running instance"
            );
            continue;
        }
        if pinned != want && names::REPLACEABLE.contains(&name) {
            // State the data path may lose (handshakes in progress): replaced (below).
            replaced.push(name);
        } else if pinned != want {
            changed.push(name);
        }
        let pinned = meta.get(&(SIZE_SLOTS + i as u32), 0).unwrap_or(0) as u32;
        let configured = configured_size(cfg, name);
        if configured != 0 && pinned != 0 && pinned != configured {
            warn!(
                map = name,
                "the pinned table keeps its size {pinned} (configured {configured}); the new size applies after `lb detach`"
            );
            match name {
                names::CT_EMBRYONIC => cfg.embryonic_entries = pinned,
                names::CT_ESTABLISHED => cfg.established_entries = pinned,
                _ => {}
            }
        }
    }
    let flows = pinned_flows(dir);
    if !changed.is_empty() {
        bail!(
            "{} layout changed (v{version} -> v{}): this build cannot reuse the pinned maps of instance {:?}. \
             `lb detach --instance {}` drops {flows} flows and lets it start",
            changed.join(", "),
            abi::ABI_VERSION,
            cfg.instance,
            cfg.instance
        );
    }
    // An older layout's replaceable map is dropped and this build's created in its place.
    // The running program keeps the old one until the new program replaces it; a handshake
    // caught in between starts over (its client's next segment is refused, and its SYN
    // retransmit opens a new one).
    for name in replaced {
        let pin = dir.join(name);
        fs::remove_file(&pin)
            .with_context(|| format!("remove {} (an older layout)", pin.display()))?;
        warn!(
            map = name,
            "the pinned map has an older layout: replaced (settings are written again; handshakes in progress start over)"
        );
    }
    Ok(Pins::Adopted { flows })
}

/// Writes this build's META into the instance's pinned META (created and pinned if absent).
fn write_meta(cfg: &Config, dir: &Path) -> Result<()> {
    let path = dir.join(names::META);
    let pinned = path.exists();
    let mut meta = if pinned {
        Array::<MapData, u64>::try_from(Map::from_map_data(
            MapData::from_pin(&path).context("open pinned META")?,
        )?)
        .context("pinned META has an unexpected layout")?
    } else {
        Array::<MapData, u64>::create(abi::META_ENTRIES, 0).context("create META")?
    };
    for (i, (name, h)) in expected_meta()?.into_iter().enumerate() {
        meta.set(i as u32, h, 0)?;
        if !pinned {
            meta.set(SIZE_SLOTS + i as u32, configured_size(cfg, name) as u64, 0)?;
        }
    }
    meta.set(abi::META_VERSION_SLOT, abi::ABI_VERSION, 0)?;
    if !pinned {
        meta.pin(&path).context("pin META")?;
    }
    Ok(())
}

/// Loads the object with every map pinned under `dir`: maps already pinned there (a running or
/// crashed instance) are reused after their layout hashes match this build's, so connection
/// tables and counters survive an agent restart or upgrade.
pub fn load_pinned(cfg: &mut Config, dir: &Path) -> Result<(Ebpf, Pins)> {
    let pins = check_meta(cfg, dir)?;
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let ebpf = load_with(cfg, Some(dir))?;
    // A fresh instance's META is new; an adopted one's gets the slots of maps this build added
    // (the others are equal, checked above).
    write_meta(cfg, dir)?;
    Ok((ebpf, pins))
}

fn load_with(cfg: &Config, pin_dir: Option<&Path>) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(
            names::CT_EMBRYONIC,
            lb_common::handshake_slots(cfg.embryonic_entries),
        )
        .map_max_entries(names::CT_ESTABLISHED, cfg.established_entries)
        .map_max_entries(names::SLOTS, slots_size(cfg).max(1))
        .map_max_entries(names::FLOW_SYNC, flow_sync_size(cfg));
    if let Some(dir) = pin_dir {
        for name in names::ALL {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    let custom;
    let object: &[u8] = match &cfg.xdp_object {
        Some(p) => {
            custom = fs::read(p).with_context(|| format!("read the XDP object {}", p.display()))?;
            info!(object = %p.display(), bytes = custom.len(), "loading this XDP object instead of the built-in one");
            &custom
        }
        None => crate::EBPF_OBJECT,
    };
    let mut ebpf = loader
        .load(object)
        .context("loading the XDP object into the kernel failed (are you root? is the kernel >= 6.1 with BTF?)")?;
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
    // The never-attached helpers the agent runs through BPF_PROG_TEST_RUN: the maxconn slot
    // release and claim, and the probe of the kernel's FIB lookup.
    for name in ["lb_release", "lb_acquire", "lb_probe_fib_src"] {
        let p: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("the object has no {name} program"))?
            .try_into()
            .with_context(|| format!("{name} is not an XDP program"))?;
        p.load()
            .with_context(|| format!("the verifier rejected {name}"))?;
    }
    Ok(ebpf)
}

/// Decides where new flows get their source (SNAT) address: from the kernel's FIB lookup where
/// it can say (Linux 6.7+), else from this host's route to each backend as resolved now (a
/// backend without a route gets none: its new flows are dropped as "no SNAT address", and the
/// FIB lookup refuses them first anyway). Returns whether the FIB gives it.
pub fn set_source_addresses(ebpf: &Ebpf, control: &mut Control, cfg: &Config) -> Result<Source> {
    if let Some(a) = cfg.snat_address {
        let sources: Vec<_> = cfg.backends.iter().map(|b| (b.address, a)).collect();
        control.use_route_sources(&sources)?;
        return Ok(Source::Configured(a));
    }
    if fib_src_supported(ebpf)? {
        return Ok(Source::Fib);
    }
    let mut sources = Vec::new();
    for b in &cfg.backends {
        match host::route_src(b.address) {
            Ok(src) => sources.push((b.address, src)),
            Err(e) => warn!(backend = %b.name, "{e:#}"),
        }
    }
    control.use_route_sources(&sources)?;
    Ok(Source::Routes)
}

/// Where a new flow's source address comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The kernel's FIB lookup (`BPF_FIB_LOOKUP_SRC`, Linux 6.7+).
    Fib,
    /// This host's route to each backend, resolved by the agent at start (older kernels).
    Routes,
    /// `snat_address`, for every backend.
    Configured(std::net::Ipv4Addr),
}

/// Whether the kernel's `bpf_fib_lookup` accepts `BPF_FIB_LOOKUP_SRC` (Linux 6.7+), asked by
/// running the object's probe program once. Without it the agent resolves each backend's
/// source address itself (`CONFIG_F_ROUTE_SRC`).
pub fn fib_src_supported(ebpf: &Ebpf) -> Result<bool> {
    let prog: &Xdp = ebpf
        .program("lb_probe_fib_src")
        .context("the object has no lb_probe_fib_src program")?
        .try_into()?;
    let frame = [0u8; 64];
    let mut out = [0u8; 128];
    let r = prog
        .test_run(aya::programs::TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN of lb_probe_fib_src")?;
    // XDP_PASS (2): the flag was accepted; XDP_DROP (1): refused as invalid.
    Ok(r.return_value == 2)
}

/// Counts the kernel's XDP failure tracepoints (`xdp:xdp_redirect_err`, `xdp:xdp_exception`)
/// into the global counters while the agent runs. tracefs is mounted if needed.
pub fn attach_failure_tracepoints(ebpf: &mut Ebpf) -> Result<()> {
    if !Path::new("/sys/kernel/tracing/events").exists() {
        nix::mount::mount(
            Some("nodev"),
            "/sys/kernel/tracing",
            Some("tracefs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mount tracefs at /sys/kernel/tracing")?;
    }
    for (prog, event) in [
        ("lb_redirect_err", "xdp_redirect_err"),
        ("lb_exception", "xdp_exception"),
    ] {
        let tp: &mut TracePoint = ebpf
            .program_mut(prog)
            .with_context(|| format!("no {prog}"))?
            .try_into()?;
        tp.load().with_context(|| format!("load {prog}"))?;
        tp.attach("xdp", event)
            .with_context(|| format!("attach to xdp:{event}"))?;
    }
    Ok(())
}

/// Attaches `lb_xdp` to each interface through a link pinned under `dir`: where a link is
/// already pinned for the interface (an earlier agent's), the program behind it is replaced
/// atomically instead, so traffic never stops. The links outlive the agent; `lb detach`
/// removes them.
pub fn attach_pinned(
    ebpf: &mut Ebpf,
    ifaces: &[String],
    mode: AttachMode,
    dir: &Path,
) -> Result<Vec<XdpMode>> {
    let prog: &mut Xdp = ebpf
        .program_mut("lb_xdp")
        .context("no lb_xdp")?
        .try_into()?;
    let mut modes = Vec::new();
    for iface in ifaces {
        let path = dir.join(format!("link_{iface}"));
        if path.exists() {
            let pinned = PinnedLink::from_pin(&path)
                .with_context(|| format!("open pinned link {}", path.display()))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .context("the pinned link is not an XDP link")?;
            prog.attach_to_link(link)
                .with_context(|| format!("replace the program attached to {iface}"))?;
            let m = if host::has_generic_xdp(iface) {
                XdpMode::Skb
            } else {
                XdpMode::Driver
            };
            info!(
                iface,
                "XDP program replaced atomically through the pinned link; traffic kept flowing"
            );
            modes.push(m);
            continue;
        }
        let (m, id) = attach_one(prog, iface, mode)?;
        let link = prog.take_link(id).context("take the XDP link")?;
        let fd_link = FdLink::try_from(link)
            .context("the kernel attached XDP without a bpf_link, which cannot be pinned")?;
        fd_link
            .pin(&path)
            .with_context(|| format!("pin the XDP link at {}", path.display()))?;
        modes.push(m);
    }
    Ok(modes)
}

/// A handle of its own on the loaded XDP program `name` of `ebpf`, for another thread (the
/// GC's): pinned for a moment under `pin_dir` and opened from the pin, which is removed again.
pub fn own_program(ebpf: &mut Ebpf, name: &str, pin_dir: &Path) -> Result<Xdp> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("the object has no {name} program"))?
        .try_into()
        .with_context(|| format!("{name} is not an XDP program"))?;
    // No dot in the name: bpffs refuses names with one (EPERM).
    let path = pin_dir.join(format!("{name}_own_{}", std::process::id()));
    prog.pin(&path)
        .with_context(|| format!("pin {name} at {}", path.display()))?;
    let own = Xdp::from_pin(&path, aya_obj::programs::XdpAttachType::Interface)
        .with_context(|| format!("open {name} from its pin"));
    prog.unpin()
        .with_context(|| format!("remove the pin {}", path.display()))?;
    own
}

/// Attaches `lb_xdp` to each interface; returns the mode each one got. The links live as long
/// as the `Ebpf` object.
pub fn attach(ebpf: &mut Ebpf, ifaces: &[String], mode: AttachMode) -> Result<Vec<XdpMode>> {
    let prog: &mut Xdp = ebpf
        .program_mut("lb_xdp")
        .context("no lb_xdp")?
        .try_into()?;
    ifaces
        .iter()
        .map(|i| attach_one(prog, i, mode).map(|(m, _)| m))
        .collect()
}

fn attach_one(prog: &mut Xdp, iface: &str, mode: AttachMode) -> Result<(XdpMode, XdpLinkId)> {
    let veth = host::driver(iface).as_deref() == Some("veth");
    let (got, id) = match mode {
        AttachMode::Native => {
            let id = prog.attach(iface, XdpMode::Driver).with_context(|| {
                format!("attaching XDP in native mode to {iface} failed; its driver may lack XDP support: try --xdp-mode generic or auto")
            })?;
            (XdpMode::Driver, id)
        }
        AttachMode::Generic => {
            let id = prog
                .attach(iface, XdpMode::Skb)
                .with_context(|| format!("attaching XDP in generic mode to {iface} failed"))?;
            (XdpMode::Skb, id)
        }
        AttachMode::Auto => match prog.attach(iface, XdpMode::Driver) {
            Ok(id) => (XdpMode::Driver, id),
            Err(e) => {
                warn!(
                    iface,
                    "native XDP refused ({e}); falling back to generic (SKB) mode"
                );
                let id = prog.attach(iface, XdpMode::Skb).with_context(|| {
                    format!("attaching XDP to {iface} failed in native and generic mode")
                })?;
                (XdpMode::Skb, id)
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
    Ok((got, id))
}

/// Removes an instance's pins.
pub fn unpin(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    Ok(())
}

/// A new inner map for `BACKEND_SETS` (an array of one [`lb_common::BackendSet`]), created with
/// BTF for its key and value like the template the kernel compares it with. On Linux 6.1 the
/// kernel refuses an inner map whose BTF-derived properties differ from the template's (a map
/// made without BTF has another `timer_off`), so aya's BTF-less `Array::create` is not enough
/// there. The BTF is the least that describes the layout: a 32-bit int key and a value struct
/// of the set's size without members.
pub fn create_set_map() -> Result<Array<MapData, lb_common::BackendSet>> {
    use std::os::fd::{FromRawFd, OwnedFd};
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_BTF_LOAD: libc::c_long = 18;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    const BTF_KIND_INT: u32 = 1;
    const BTF_KIND_STRUCT: u32 = 4;
    let value_size = std::mem::size_of::<lb_common::BackendSet>() as u32;

    // Type section: [1] INT "u32" (4 bytes, 32 bits), [2] STRUCT "backend_set" (value_size, no
    // members). Strings: "\0u32\0backend_set\0".
    let strings = b"\0u32\0backend_set\0";
    let mut types = Vec::new();
    for w in [
        1,
        BTF_KIND_INT << 24,
        4,
        32,
        5,
        BTF_KIND_STRUCT << 24,
        value_size,
    ] {
        types.extend_from_slice(&u32::to_ne_bytes(w));
    }
    let mut btf = Vec::new();
    btf.extend_from_slice(&0xeb9f_u16.to_ne_bytes()); // magic
    btf.extend_from_slice(&[1, 0]); // version, flags
    for w in [
        24,
        0,
        types.len() as u32,
        types.len() as u32,
        strings.len() as u32,
    ] {
        btf.extend_from_slice(&w.to_ne_bytes()); // hdr_len, type_off, type_len, str_off, str_len
    }
    btf.extend_from_slice(&types);
    btf.extend_from_slice(strings);

    let sys_bpf = |cmd: libc::c_long, attr: &mut [u8; 128]| -> Result<OwnedFd> {
        // SAFETY: `attr` is a zero-filled, 128-byte `union bpf_attr` prefix for `cmd` (the kernel
        // reads at most that many bytes and needs the rest zero); pointers inside it point to
        // `btf`, alive for the call.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: on success the bpf syscall returned a new file descriptor that we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    };
    let put =
        |attr: &mut [u8; 128], off: usize, v: &[u8]| attr[off..off + v.len()].copy_from_slice(v);

    // BPF_BTF_LOAD: u64 btf, u64 btf_log_buf, u32 btf_size, ...
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &(btf.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 16, &(btf.len() as u32).to_ne_bytes());
    let btf_fd = sys_bpf(BPF_BTF_LOAD, &mut attr).context("load the BTF of a backend-set map")?;

    // BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, map_flags, inner_map_fd,
    // numa_node, map_name[16], map_ifindex, btf_fd (48), btf_key_type_id, btf_value_type_id.
    let mut attr = [0u8; 128];
    for (off, w) in [(0, BPF_MAP_TYPE_ARRAY), (4, 4), (8, value_size), (12, 1)] {
        put(&mut attr, off, &w.to_ne_bytes());
    }
    put(&mut attr, 28, b"lb_set");
    use std::os::fd::AsRawFd;
    put(&mut attr, 48, &(btf_fd.as_raw_fd() as u32).to_ne_bytes());
    put(&mut attr, 52, &1u32.to_ne_bytes());
    put(&mut attr, 56, &2u32.to_ne_bytes());
    let fd = sys_bpf(BPF_MAP_CREATE, &mut attr).context("create a backend-set map")?;
    let data = MapData::from_fd(fd).context("open the new backend-set map")?;
    Array::try_from(Map::from_map_data(data)?).context("the new backend-set map is not an array")
}
