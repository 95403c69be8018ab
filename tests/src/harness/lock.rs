//! One privileged test at a time on this machine, across threads and test binaries.
//!
//! `flock` locks belong to an open file description, so two `TestLock`s in the same process exclude
//! each other too: a test must not hold two topologies at once.

use std::fs::{File, OpenOptions};
use std::path::Path;

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};

/// The lock file every topology holds exclusively for its lifetime.
pub const LOCK_PATH: &str = "/run/lock/lb-tests.lock";

/// An exclusive `flock` on [`LOCK_PATH`]; released when dropped.
pub struct TestLock {
    _lock: Flock<File>,
}

impl TestLock {
    /// Blocks until the lock is ours.
    pub fn acquire() -> Result<TestLock> {
        let path = Path::new(LOCK_PATH);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {LOCK_PATH}"))?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(TestLock { _lock: lock }),
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => file,
            Err((_, e)) => return Err(e).with_context(|| format!("flock {LOCK_PATH}")),
        };
        eprintln!("harness: waiting for {LOCK_PATH}: another privileged test holds it");
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("flock {LOCK_PATH}"))?;
        Ok(TestLock { _lock: lock })
    }
}
