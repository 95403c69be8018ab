//! Many entries of a hash map in one syscall (`BPF_MAP_*_BATCH`, Linux 5.6): the GC's walk
//! reads its tables this way, and a standby installs and deletes its peer's flows this way.
//! aya has no batch calls; these are the raw commands, on plain-old-data keys and values.
//!
//! The kernel stops a batch at its first failing entry and says how many went before it;
//! [`update`] and [`delete`] return that count with the error, so the caller can skip the
//! entry and go on. Element flags other than `BPF_F_LOCK` are refused by the kernel: a batch
//! update always writes (`BPF_ANY`).
use std::os::fd::{AsRawFd, BorrowedFd};

use bytemuck::Pod;

/// `BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH` (linux/bpf.h).
const LOOKUP: libc::c_long = 24;
const UPDATE: libc::c_long = 26;
const DELETE: libc::c_long = 27;

/// `bpf_attr` for the `BPF_MAP_*_BATCH` commands (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct Attr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Runs `cmd` on `attr`: the count the kernel wrote back, and its error if it failed.
fn call(cmd: libc::c_long, attr: &mut Attr) -> (usize, Option<std::io::Error>) {
    // SAFETY: `attr` is the kernel's `bpf_attr.batch` layout (zero-padded by the syscall's
    // size argument); every caller points its key, value and token fields at live buffers
    // holding `count` elements of the map's key and value sizes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>() as u32,
        )
    };
    let err = (r < 0).then(std::io::Error::last_os_error);
    (attr.count as usize, err)
}

/// One `BPF_MAP_LOOKUP_BATCH` call on the hash map `fd`: up to `keys.len()` entries from the
/// bucket `token` names (`None`: the first) into `keys` and `values`. Returns how many were
/// read, the token to go on from, and the kernel's error (`ENOENT`: the table's end, after
/// the entries read).
pub fn lookup<K: Pod, V: Pod>(
    fd: BorrowedFd,
    token: Option<u32>,
    keys: &mut [K],
    values: &mut [V],
) -> (usize, u32, Option<std::io::Error>) {
    let token_in = token.unwrap_or(0);
    let mut token_out = 0u32;
    let mut attr = Attr {
        in_batch: if token.is_some() {
            &token_in as *const u32 as u64
        } else {
            0
        },
        out_batch: &mut token_out as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: keys.len().min(values.len()) as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    let (n, err) = call(LOOKUP, &mut attr);
    (n.min(keys.len()), token_out, err)
}

/// Writes `keys[i]` = `values[i]` into the map `fd`, in order (`BPF_ANY`). Returns how many
/// were written, and why the next was not.
pub fn update<K: Pod, V: Pod>(
    fd: BorrowedFd,
    keys: &[K],
    values: &[V],
) -> (usize, Option<std::io::Error>) {
    let count = keys.len().min(values.len());
    if count == 0 {
        return (0, None);
    }
    let mut attr = Attr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    let (n, err) = call(UPDATE, &mut attr);
    (done(n, count, &err), err)
}

/// Deletes `keys` from the map `fd`, in order. Returns how many went, and why the next did
/// not (`ENOENT`: it was not there).
pub fn delete<K: Pod>(fd: BorrowedFd, keys: &[K]) -> (usize, Option<std::io::Error>) {
    if keys.is_empty() {
        return (0, None);
    }
    let mut attr = Attr {
        keys: keys.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    let (n, err) = call(DELETE, &mut attr);
    (done(n, keys.len(), &err), err)
}

/// How many of `asked` entries a batch call did: all without an error; with one, the count
/// the kernel wrote back, unless it is not below `asked` (the call was refused before its
/// first entry, and the count is still the one passed in).
fn done(n: usize, asked: usize, err: &Option<std::io::Error>) -> usize {
    match err {
        None => asked,
        Some(_) if n < asked => n,
        Some(_) => 0,
    }
}

/// [`update`] over all of `keys`: an entry the kernel refuses is skipped and reported with
/// its index; the rest still go in.
pub fn update_all<K: Pod, V: Pod>(
    fd: BorrowedFd,
    keys: &[K],
    values: &[V],
    refused: impl FnMut(usize, std::io::Error),
) {
    past_refusals(
        keys.len(),
        |at| update(fd, &keys[at..], &values[at..]),
        refused,
    );
}

/// [`delete`] over all of `keys`: a key that is not there (or that the kernel refuses) is
/// skipped and reported with its index; the rest still go.
pub fn delete_all<K: Pod>(fd: BorrowedFd, keys: &[K], refused: impl FnMut(usize, std::io::Error)) {
    past_refusals(keys.len(), |at| delete(fd, &keys[at..]), refused);
}

/// Runs the batch call `from(at)` over entries `at..len` until every entry is done, skipping
/// (and reporting) each one the kernel stops at.
fn past_refusals(
    len: usize,
    mut from: impl FnMut(usize) -> (usize, Option<std::io::Error>),
    mut refused: impl FnMut(usize, std::io::Error),
) {
    let mut at = 0;
    while at < len {
        let (n, err) = from(at);
        at += n;
        match err {
            None => return,
            Some(e) => refused(at, e),
        }
        at += 1;
    }
}
