//! In a pair: frames a switch flooded to this node that are meant for the other one.
use aya_ebpf::programs::XdpContext;
use lb_common::{Config, Counter, CONFIG_F_SYNC};
use network_types::eth::EthHdr;

use crate::{maps::addressed_here, stats};

/// In a pair, whether a frame that is ours (to a VIP, to an SNAT port, or an ICMP error about
/// one of those) is addressed to another MAC than its interface's: a switch flooding a frame
/// meant for the other node. Counted; the caller passes it to the kernel, which drops it
/// (another host's MAC), and only the node it was sent to forwards it. Outside a pair, no map
/// is read.
#[inline(always)]
pub fn for_the_other_host(ctx: &XdpContext, eth: &EthHdr, cfg: &Config) -> bool {
    let other = cfg.flags & CONFIG_F_SYNC != 0
        && !addressed_here(ctx.ingress_ifindex() as u32, &eth.dst_addr);
    if other {
        stats::count(Counter::PassOtherHost);
    }
    other
}
