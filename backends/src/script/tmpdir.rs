//! The `$tmpdir` every script run sees: made at configuration, removed when the server exits.
//!
//! The server may fork into the background after configuration, and then the parent process
//! drops its copy of the configuration while the child serves on. The directory must go with
//! the process that serves last, so it carries a shared flock(2) on the directory itself: the
//! lock belongs to the open file description, which both sides of a fork share. Whoever drops
//! the directory takes a fresh exclusive lock without blocking; that only succeeds when no
//! other process still holds the shared one, and only then is the directory removed.

use std::fs::{self, DirBuilder, File};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::sys;

pub(crate) struct TmpDir {
    path: PathBuf,
    lock: Option<File>,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl TmpDir {
    /// A fresh, private (0700) directory under `$TMPDIR` or /tmp.
    pub(crate) fn create(tag: &str) -> io::Result<TmpDir> {
        let base = std::env::temp_dir();
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        for _ in 0..100 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path =
                base.join(format!("blocksmith-{tag}-{}-{:x}{n}", std::process::id(), nanos & 0xffff_ffff));
            match DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    let lock = File::open(&path)?;
                    sys::flock(&lock, libc::LOCK_SH)?;
                    return Ok(TmpDir { path, lock: Some(lock) });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("no free temporary directory name"))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Give up this process's hold; true if no other process holds the directory (so the
    /// caller may run `unload` and then [`TmpDir::remove`]).
    pub(crate) fn release(&mut self) -> bool {
        let Some(ours) = self.lock.take() else { return false };
        drop(ours);
        let Ok(f) = File::open(&self.path) else { return false };
        // Another holder is either the server that forked into the background (for good), or a
        // process another thread is spawning right now: between its fork and its exec it has a
        // copy of every descriptor, close-on-exec or not. Give the latter a moment to go.
        let mut pause = Duration::from_millis(1);
        for _ in 0..7 {
            if sys::flock(&f, libc::LOCK_EX | libc::LOCK_NB).is_ok() {
                return true;
            }
            std::thread::sleep(pause);
            pause *= 2;
        }
        false
    }

    pub(crate) fn remove(&self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            log::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

impl Drop for TmpDir {
    /// Configuration failed before a runtime took the directory over: nothing ran that needs
    /// unloading, so just clean up (a runtime releases the directory itself).
    fn drop(&mut self) {
        if self.lock.is_some() && self.release() {
            self.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_holder_removes() {
        let mut a = TmpDir::create("t").unwrap();
        assert!(a.path().is_dir());
        // A second holder of the same directory, as a forked child would be.
        let other = File::open(a.path()).unwrap();
        sys::flock(&other, libc::LOCK_SH).unwrap();
        assert!(!a.release());
        drop(other);
        let mut b = TmpDir::create("t").unwrap();
        assert!(b.release());
        b.remove();
        assert!(!b.path().exists());
        a.remove();
        // Dropped while still held: removed.
        let c = TmpDir::create("t").unwrap();
        let p = c.path().to_path_buf();
        drop(c);
        assert!(!p.exists());
    }
}
