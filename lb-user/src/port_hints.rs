//! The SNAT port hints the GC rewrites every pass (`PORT_HINTS`): per backend, a bitmap of the
//! SNAT ports its flows hold, which the data path's port search follows to a free port with
//! one probe (lb-ebpf `snat.rs`). Only a hint: the connection tables stay the authority.
use std::collections::BTreeMap;

use lb_common::{PortHints, PORT_HINT_WORDS};

/// The bitmaps one pass builds from the flows it keeps.
pub struct HintBits {
    /// The SNAT range, inclusive, host order: bit `i` of word `w` is port `range.0 + 64 w + i`.
    range: (u16, u16),
    bitmaps: BTreeMap<u32, Box<PortHints>>,
}

impl HintBits {
    /// Empty bitmaps for the backends in `rewrite` (those that held ports at the last write:
    /// written again even if they hold none now, so that their freed ports show free).
    pub fn new(range: (u16, u16), rewrite: impl IntoIterator<Item = u32>) -> Self {
        Self {
            range,
            bitmaps: rewrite.into_iter().map(|id| (id, Box::default())).collect(),
        }
    }

    /// Backend `backend`'s flow holds SNAT `port` (host order); a port outside the range (an
    /// earlier range's flow) is not hinted.
    pub fn hold(&mut self, backend: u32, port: u16) {
        let (min, max) = self.range;
        if port < min || port > max {
            return;
        }
        let off = usize::from(port - min);
        if off / 64 >= PORT_HINT_WORDS as usize {
            return;
        }
        self.bitmaps.entry(backend).or_default().words[off / 64] |= 1 << (off % 64);
    }

    /// The bitmap of every backend that holds a port or is to be rewritten.
    pub fn into_bitmaps(self) -> BTreeMap<u32, Box<PortHints>> {
        self.bitmaps
    }
}

/// Whether `hints` holds any port (a backend to rewrite at the next pass).
pub fn holds_any(hints: &PortHints) -> bool {
    hints.words.iter().any(|w| *w != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_held_port_sets_its_own_bit_of_its_backends_bitmap() {
        let mut h = HintBits::new((10_000, 32_767), []);
        h.hold(3, 10_000);
        h.hold(3, 10_065);
        h.hold(7, 32_767);
        let b = h.into_bitmaps();
        assert_eq!(b.keys().copied().collect::<Vec<_>>(), [3, 7]);
        assert_eq!((b[&3].words[0], b[&3].words[1]), (1, 2));
        let last = 32_767 - 10_000;
        assert_eq!(b[&7].words[last / 64], 1 << (last % 64));
        assert_eq!(b[&3].words.iter().map(|w| w.count_ones()).sum::<u32>(), 2);
    }

    #[test]
    fn ports_outside_the_range_are_not_hinted() {
        let mut h = HintBits::new((20_000, 20_099), []);
        h.hold(1, 19_999);
        h.hold(1, 20_100);
        assert!(h.into_bitmaps().is_empty());
    }

    #[test]
    fn a_backend_that_held_ports_last_time_is_rewritten_empty() {
        let h = HintBits::new((10_000, 10_999), [4]);
        let b = h.into_bitmaps();
        assert!(!holds_any(&b[&4]), "its freed ports show free again");
    }

    #[test]
    fn the_widest_range_fits_the_bitmap() {
        let mut h = HintBits::new((1024, 65_535), []);
        h.hold(0, 65_535);
        let b = h.into_bitmaps();
        let off = 65_535 - 1024;
        assert_eq!(b[&0].words[off / 64], 1 << (off % 64));
    }
}
