//! The handshake table (`CT_EMBRYONIC`) as the agent sees it: an array of slots
//! ([`HandshakeSlot`]), one record each. The data path claims and frees slots with atomic
//! operations on their control words. The agent reads the slots in place: the table is
//! `BPF_F_MMAPABLE` and mapped read-only into the process, so a GC pass reads each slot's
//! control word and copies only the records it holds, with no syscall (copying all 65,536
//! slots through `BPF_MAP_LOOKUP_BATCH` every second cost the agent about 0.4 µs per
//! connection under churn). A table that cannot be mapped (pinned by an older build) is read
//! in batches (one syscall per [`BATCH_SLOTS`]). The agent writes a slot only to forget the
//! self-test's handshake; that write races with a data-path claim of the same slot, and loses
//! at worst that handshake (as an eviction would).
use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    ptr::NonNull,
};

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData};
use lb_common::{
    handshake_ctrl, handshake_slot_of, handshake_tag, names, FlowKey, Handshake, HandshakeSlot,
};

/// Slots per `BPF_MAP_LOOKUP_BATCH` call (about 170 KiB).
const BATCH_SLOTS: usize = 1024;

/// The handshake table of a loaded or pinned program.
pub struct Handshakes {
    map: Array<MapData, HandshakeSlot>,
    fd: OwnedFd,
    slots: u32,
    /// The slots mapped into this process, if the map allows it.
    mapped: Option<Mapped>,
}

/// The table's slots, mapped read-only (`mmap` of an array map created with
/// `BPF_F_MMAPABLE`: its values, in order, from offset 0).
struct Mapped {
    base: NonNull<HandshakeSlot>,
    bytes: usize,
}

// SAFETY: the mapping is read only through `Handshakes::for_each`, by volatile reads of map
// memory that the kernel keeps alive until `munmap`; nothing in it is tied to a thread.
unsafe impl Send for Mapped {}

impl Mapped {
    /// Maps the `slots` slots of the array map `fd`; `None` if the map is not mmapable.
    fn new(fd: &OwnedFd, slots: u32) -> Option<Mapped> {
        let bytes = slots as usize * std::mem::size_of::<HandshakeSlot>();
        if bytes == 0 {
            return None;
        }
        // SAFETY: a fresh read-only shared mapping of the map's values (the kernel checks the
        // size against the map's); no Rust reference into it outlives this struct.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        NonNull::new(p.cast()).map(|base| Mapped { base, bytes })
    }

    /// Calls `each` with every record a slot holds, read as the data path's readers read it:
    /// the control word, then the slot, then the word again; a slot being written, or
    /// rewritten while it was read, is skipped (it holds no complete record at that instant).
    fn for_each(&self, slots: u32, each: &mut impl FnMut(FlowKey, &Handshake)) {
        for i in 0..slots as usize {
            // SAFETY: `i` < `slots`, within the mapping; the slot's first field is its
            // aligned u64 control word, which the data path changes only with single stores
            // and atomics; a torn copy of the rest is caught by the second read of the word.
            unsafe {
                let slot = self.base.as_ptr().add(i);
                let ctrl = std::ptr::addr_of!((*slot).ctrl);
                let seen = ctrl.read_volatile();
                if !HandshakeSlot::holds(seen) {
                    continue;
                }
                let copy = slot.read_volatile();
                if ctrl.read_volatile() == seen {
                    if let Some(hs) = copy.record() {
                        each(hs.key(), hs);
                    }
                }
            }
        }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; nothing refers into it any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

impl Handshakes {
    /// Opens `map` (the program's `CT_EMBRYONIC`).
    pub fn new(map: Map) -> Result<Self> {
        let name = names::CT_EMBRYONIC;
        let fd = crate::gc::map_fd(&map, name)?;
        let map = Array::<MapData, HandshakeSlot>::try_from(map)
            .with_context(|| format!("map {name} has an unexpected type or layout"))?;
        let slots = map.len();
        let mapped = Mapped::new(&fd, slots);
        Ok(Self {
            map,
            fd,
            slots,
            mapped,
        })
    }

    /// Whether the slots are read in place (mapped), not copied in batches.
    pub fn in_place(&self) -> bool {
        self.mapped.is_some()
    }

    /// A second handle on the table of the loaded object `ebpf`, which keeps its own.
    pub fn of(ebpf: &aya::Ebpf) -> Result<Self> {
        Self::new(crate::gc::share(ebpf, names::CT_EMBRYONIC)?)
    }

    /// How many records the table holds at most.
    pub fn capacity(&self) -> usize {
        self.slots as usize
    }

    /// Calls `each` with every record the table holds and its key (the reply tuple).
    pub fn for_each(&self, mut each: impl FnMut(FlowKey, &Handshake)) -> Result<()> {
        if let Some(m) = &self.mapped {
            m.for_each(self.slots, &mut each);
            return Ok(());
        }
        let mut keys = vec![0u32; BATCH_SLOTS];
        let mut values = vec![HandshakeSlot::default(); BATCH_SLOTS];
        let mut token = None;
        loop {
            let (n, next, err) =
                crate::batch::lookup(self.fd.as_fd(), token, &mut keys, &mut values);
            for hs in values[..n].iter().filter_map(HandshakeSlot::record) {
                each(hs.key(), hs);
            }
            match err {
                None => token = Some(next),
                // The end of the array (the last batch's slots were read above).
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Some(e) => {
                    return Err(e).with_context(|| {
                        format!("BPF_MAP_LOOKUP_BATCH on {}", names::CT_EMBRYONIC)
                    })
                }
            }
        }
    }

    /// Every record with its key.
    pub fn records(&self) -> Result<Vec<(FlowKey, Handshake)>> {
        let mut v = Vec::new();
        self.for_each(|k, hs| v.push((k, *hs)))?;
        Ok(v)
    }

    /// Rewrites the slot of reply key `key` through `change`; false if `change` declines.
    fn rewrite(
        &mut self,
        key: &FlowKey,
        change: impl FnOnce(&mut HandshakeSlot) -> bool,
    ) -> Result<bool> {
        let i = handshake_slot_of(key, self.slots);
        let mut slot = self
            .map
            .get(&i, 0)
            .with_context(|| format!("reading {}[{i}]", names::CT_EMBRYONIC))?;
        if !change(&mut slot) {
            return Ok(false);
        }
        self.map
            .set(i, slot, 0)
            .with_context(|| format!("writing {}[{i}]", names::CT_EMBRYONIC))?;
        Ok(true)
    }

    /// Frees the slot of the record under `key`, if its handshake is client tuple `fwd_key`'s
    /// (any client's with `None`). Returns whether it did.
    pub fn forget(&mut self, key: &FlowKey, fwd_key: Option<&FlowKey>) -> Result<bool> {
        self.rewrite(key, |slot| {
            let ours = slot.holds_key(key) && fwd_key.is_none_or(|f| slot.hs.fwd_key() == *f);
            if ours {
                slot.ctrl &= u32::MAX as u64;
            }
            ours
        })
    }

    /// Writes `hs` as the record under its key, over whatever its slot held, as claimed when
    /// its handshake began (`hs.rev.created_ns`).
    pub fn put(&mut self, hs: &Handshake) -> Result<()> {
        let key = hs.key();
        self.rewrite(&key, |slot| {
            slot.ctrl = handshake_ctrl(handshake_tag(&key), hs.rev.created_ns);
            slot.hs = *hs;
            true
        })?;
        Ok(())
    }
}
