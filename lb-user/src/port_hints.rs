//! The SNAT port bitmap (`PORT_HINTS`): per backend, the SNAT ports its flows hold, which the
//! data path's port search follows to a free port with one probe (lb-ebpf `hints.rs`). A port
//! with an established flow always has its bit set, so the search tests a port with a clear bit
//! in the handshake table only. The agent keeps that rule where it writes the bitmap
//! ([`HintMap`]): it sets every bit before a program serves tables it adopted, sets the bits of
//! a pair peer's flows before installing them, and clears a bit only by [`HintMap::release`],
//! which looks the port up again after clearing it.
use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, OwnedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{bail, Context, Result};
use lb_common::{PortHints, MAX_BACKENDS, PORT_HINT_WORDS};

/// The program's `PORT_HINTS`, mapped into this process (the map is created with
/// `BPF_F_MMAPABLE`), for the SNAT range `range`. Its words are changed only with atomic
/// operations, as the data path changes them.
pub struct HintMap {
    base: NonNull<AtomicU64>,
    bytes: usize,
    range: (u16, u16),
}

// SAFETY: the mapping is accessed only through `AtomicU64`s in map memory that the kernel
// keeps alive until `munmap`; nothing in it is tied to a thread.
unsafe impl Send for HintMap {}
// SAFETY: as above: every access is an atomic operation.
unsafe impl Sync for HintMap {}

impl HintMap {
    /// Maps `fd`, the program's `PORT_HINTS`, for SNAT range `range` (inclusive, host order).
    pub fn new(fd: &OwnedFd, range: (u16, u16)) -> Result<Self> {
        Self::map(Some(fd), range).with_context(|| {
            format!(
                "mapping {} (the map must be created with BPF_F_MMAPABLE)",
                lb_common::names::PORT_HINTS
            )
        })
    }

    /// Maps the values of map `fd` (`None`: anonymous memory of the same layout, for tests).
    fn map(fd: Option<&OwnedFd>, range: (u16, u16)) -> Result<Self> {
        let bytes = MAX_BACKENDS as usize * std::mem::size_of::<PortHints>();
        let (flags, raw) = match fd {
            Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping (of the map's values: the kernel checks the size against the
        // map's), owned by the returned struct; nothing refers into it beyond it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        let Some(base) = NonNull::new(p.cast()) else {
            bail!("mmap returned null");
        };
        Ok(Self { base, bytes, range })
    }

    /// The SNAT range the bits stand for.
    pub fn range(&self) -> (u16, u16) {
        self.range
    }

    /// Word `w` of backend `id`'s bitmap (`None` out of bounds).
    fn word(&self, id: u32, w: usize) -> Option<&AtomicU64> {
        if id >= MAX_BACKENDS || w >= PORT_HINT_WORDS as usize {
            return None;
        }
        let i = id as usize * PORT_HINT_WORDS as usize + w;
        // SAFETY: `i` indexes a u64 of the mapping (bounds checked above; map values are laid
        // out in order from offset 0, each `PortHints` a plain array of u64), aligned, and
        // accessed only atomically, here and in the data path.
        Some(unsafe { &*self.base.as_ptr().add(i) })
    }

    /// The word of SNAT `port` (host order) for backend `id`, and the port's bit in it.
    fn bit(&self, id: u32, port: u16) -> Option<(&AtomicU64, u64)> {
        let (min, max) = self.range;
        if port < min || port > max {
            return None;
        }
        let off = usize::from(port - min);
        Some((self.word(id, off / 64)?, 1 << (off % 64)))
    }

    /// Words per backend that hold a port of the range.
    fn words(&self) -> usize {
        let (min, max) = self.range;
        (usize::from(max.saturating_sub(min)) + 64) / 64
    }

    /// Sets every bit of every backend: before a program serves tables an earlier one filled
    /// (their established flows' bits are unknown until the GC's first pass).
    pub fn hold_all(&self) {
        let ports = usize::from(self.range.1.saturating_sub(self.range.0)) + 1;
        for id in 0..MAX_BACKENDS {
            for w in 0..self.words() {
                // The last word's bits beyond the range stay clear.
                let valid = (ports - w * 64).min(64);
                let bits = if valid == 64 {
                    u64::MAX
                } else {
                    (1 << valid) - 1
                };
                if let Some(word) = self.word(id, w) {
                    word.fetch_or(bits, Ordering::SeqCst);
                }
            }
        }
    }

    /// Sets the bit of SNAT `port` (host order) of backend `id`.
    pub fn hold(&self, id: u32, port: u16) {
        if let Some((word, bit)) = self.bit(id, port) {
            word.fetch_or(bit, Ordering::SeqCst);
        }
    }

    /// Brings backend `id`'s bitmap in line with `held` (its ports in a pass's tables): sets
    /// the bits of held ports, and releases each set bit of a port not held, through
    /// `established` (whether an established flow holds that port now: a flow established
    /// after the pass read the tables). Returns how many bits it cleared.
    ///
    /// A bit is cleared first and the port looked up after, so that a flow established at any
    /// moment is not missed: one established before the lookup is found (its bit is set back),
    /// one established after it sets its bit itself. Between the clear and the setting back, a
    /// new flow's search could take that port; that needs a flow established after the pass
    /// read the tables on a port the pass saw free, and a search meeting that bit in those
    /// microseconds.
    pub fn release(
        &self,
        id: u32,
        held: &PortHints,
        mut established: impl FnMut(u16) -> bool,
    ) -> usize {
        let mut cleared = 0;
        for w in 0..self.words() {
            let Some(word) = self.word(id, w) else {
                break;
            };
            let h = held.words[w];
            let now = word.load(Ordering::SeqCst);
            if h & !now != 0 {
                word.fetch_or(h, Ordering::SeqCst);
            }
            let free = now & !h;
            if free == 0 {
                continue;
            }
            word.fetch_and(!free, Ordering::SeqCst);
            let mut bits = free;
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                let port = self.range.0 as usize + w * 64 + b as usize;
                if port > usize::from(self.range.1) {
                    break;
                }
                if established(port as u16) {
                    word.fetch_or(1 << b, Ordering::SeqCst);
                } else {
                    cleared += 1;
                }
            }
        }
        cleared
    }

    /// Sets the bits of the ports in `held` for backend `id`.
    pub fn hold_ports(&self, id: u32, held: &PortHints) {
        for w in 0..self.words() {
            let h = held.words[w];
            if h != 0 {
                if let Some(word) = self.word(id, w) {
                    word.fetch_or(h, Ordering::SeqCst);
                }
            }
        }
    }

    /// Whether any bit of backend `id` is set.
    pub fn holds_any(&self, id: u32) -> bool {
        (0..self.words()).any(|w| {
            self.word(id, w)
                .is_some_and(|word| word.load(Ordering::SeqCst) != 0)
        })
    }
}

impl Drop for HintMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; nothing refers into it any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

/// The bitmaps one pass builds from the flows it keeps.
pub struct HintBits {
    /// The SNAT range, inclusive, host order: bit `i` of word `w` is port `range.0 + 64 w + i`.
    range: (u16, u16),
    bitmaps: BTreeMap<u32, Box<PortHints>>,
}

impl HintBits {
    /// No port held yet, for SNAT range `range`.
    pub fn new(range: (u16, u16)) -> Self {
        Self {
            range,
            bitmaps: BTreeMap::new(),
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

    /// The bitmap of every backend that holds a port.
    pub fn into_bitmaps(self) -> BTreeMap<u32, Box<PortHints>> {
        self.bitmaps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_held_port_sets_its_own_bit_of_its_backends_bitmap() {
        let mut h = HintBits::new((10_000, 32_767));
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
        let mut h = HintBits::new((20_000, 20_099));
        h.hold(1, 19_999);
        h.hold(1, 20_100);
        assert!(h.into_bitmaps().is_empty());
    }

    /// A bitmap over anonymous memory laid out as the map's (the same code as over the map).
    fn anonymous(range: (u16, u16)) -> HintMap {
        HintMap::map(None, range).unwrap()
    }

    fn bit_set(m: &HintMap, id: u32, port: u16) -> bool {
        let (word, bit) = m.bit(id, port).unwrap();
        word.load(Ordering::SeqCst) & bit != 0
    }

    #[test]
    fn a_release_clears_free_ports_keeps_held_ones_and_sets_back_a_port_established_since() {
        let m = anonymous((10_000, 10_999));
        for port in [10_000, 10_001, 10_002, 10_500] {
            m.hold(2, port);
        }
        let mut held = HintBits::new(m.range());
        held.hold(2, 10_001);
        // A port held in the pass's tables but whose bit is clear (a lost set) gets it back.
        held.hold(2, 10_999);
        let held = held.into_bitmaps();
        let mut looked_up = Vec::new();
        let cleared = m.release(2, &held[&2], |port| {
            looked_up.push(port);
            // 10_002: a flow established after the pass read the tables.
            port == 10_002
        });
        assert_eq!(cleared, 2, "10_000 and 10_500 were free");
        assert_eq!(
            looked_up,
            [10_000, 10_002, 10_500],
            "only the bits to clear"
        );
        assert!(!bit_set(&m, 2, 10_000) && !bit_set(&m, 2, 10_500));
        assert!(bit_set(&m, 2, 10_001), "held in the pass");
        assert!(
            bit_set(&m, 2, 10_002),
            "set back: an established flow holds it"
        );
        assert!(bit_set(&m, 2, 10_999), "set: held in the pass");
        assert!(!m.holds_any(3), "other backends untouched");
    }

    #[test]
    fn holding_all_sets_every_port_of_every_backend_and_releases_find_them_free() {
        let m = anonymous((30_000, 30_099));
        m.hold_all();
        for id in [0, 17, MAX_BACKENDS - 1] {
            assert!(bit_set(&m, id, 30_000) && bit_set(&m, id, 30_099));
        }
        let ones: u32 = (0..m.words())
            .map(|w| m.word(17, w).unwrap().load(Ordering::SeqCst).count_ones())
            .sum();
        assert_eq!(ones, 100, "every port of the range, none beyond it");
        let cleared = m.release(17, &PortHints::default(), |_| false);
        assert_eq!(cleared, 100);
        assert!(!m.holds_any(17) && m.holds_any(16));
    }

    #[test]
    fn ports_outside_the_range_have_no_bit() {
        let m = anonymous((40_000, 40_063));
        m.hold(1, 39_999);
        m.hold(1, 40_064);
        assert!(!m.holds_any(1));
        m.hold(1, 40_063);
        assert!(bit_set(&m, 1, 40_063));
    }

    #[test]
    fn the_widest_range_fits_the_bitmap() {
        let mut h = HintBits::new((1024, 65_535));
        h.hold(0, 65_535);
        let b = h.into_bitmaps();
        let off = 65_535 - 1024;
        assert_eq!(b[&0].words[off / 64], 1 << (off % 64));
    }
}
