//! Attaches the `lb_pass` program (XDP_PASS, shipped in the agent's own object) to veths.
//!
//! On veth, frames that the balancer sends with XDP_TX arrive only if the receiving peer carries an
//! XDP program, and XDP_REDIRECT frames only if the peer has GRO on or a program (platform-facts).
//! `lb_pass` lets every frame through unchanged, so it is the cheapest way to satisfy both.

use anyhow::{anyhow, Context, Result};
use aya::programs::{Xdp, XdpMode};
use aya::Ebpf;

use super::Ns;

/// Name of the pass-through program in `lb_user::EBPF_OBJECT`.
pub const PROGRAM: &str = "lb_pass";

/// One loaded copy of `lb_pass` and the interfaces it is attached to. Dropping it detaches
/// everywhere (aya attaches through bpf_links owned by the program).
pub struct XdpPass {
    ebpf: Ebpf,
    attached: Vec<(String, String)>,
}

impl XdpPass {
    /// Loads the agent's object and the `lb_pass` program into the kernel (nothing attached yet).
    pub fn load() -> Result<XdpPass> {
        let mut ebpf = Ebpf::load(lb_user::EBPF_OBJECT).context("loading lb_user::EBPF_OBJECT")?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("the eBPF object has no program named {PROGRAM}"))?
            .try_into()
            .with_context(|| format!("{PROGRAM} is not an XDP program"))?;
        prog.load()
            .with_context(|| format!("loading {PROGRAM} into the kernel"))?;
        Ok(XdpPass {
            ebpf,
            attached: Vec::new(),
        })
    }

    /// Attaches `lb_pass` in native (driver) mode to `iface` inside `ns`. The name is resolved and the
    /// link created on a thread that entered `ns`, since both happen in the caller's namespace.
    pub fn attach(&mut self, ns: &Ns, iface: &str) -> Result<()> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("{PROGRAM} vanished from the loaded object"))?
            .try_into()
            .with_context(|| format!("{PROGRAM} is not an XDP program"))?;
        ns.run_in(|| prog.attach(iface, XdpMode::Driver))?
            .with_context(|| format!("attaching {PROGRAM} to {iface} in {}", ns.name))?;
        self.attached.push((ns.name.clone(), iface.to_string()));
        Ok(())
    }

    /// `(namespace, interface)` pairs carrying the program.
    pub fn attached(&self) -> &[(String, String)] {
        &self.attached
    }
}
