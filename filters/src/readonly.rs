//! The readonly filter (nbdkit-readonly-filter, nbdkit 1.38+): make the layer below read-only,
//! always, or only while a trigger file exists (`readonly-file=PATH`).
//!
//! Without `readonly-file` the export is advertised read-only, like `-r`, and the shim refuses
//! writes with EPERM. With it, the export is advertised as the layer below is, and every write,
//! zero and trim first checks whether the file exists: if it does, the request fails with EPERM
//! ("Operation not permitted"), otherwise it goes through. So the disk can be switched between
//! writable and write-protected at run time by creating and removing the file.
//!
//! The check is a `stat` of a path that may be on any file system, so it runs on the blocking
//! pool, not on the event loop. If the existence of the file cannot be determined (a permission
//! error on a directory on the way, say), writes are refused: when in doubt, protect the data.
//! nbdkit treats that case as "no file" and allows writes.

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{
    Done, ExportInfo, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec,
    ReadData,
};
use blocksmith_core::sched::Sched;

pub const SPEC: FilterSpec = FilterSpec {
    name: "readonly",
    summary: "make the layer below read-only, always or while a trigger file exists",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[ParamSpec {
    name: "readonly-file",
    help: "Refuse writes (EPERM) while this file exists; allow them when it does not.\n\
           Without it the export is always read-only.",
}];

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let file = match p.take("readonly-file") {
        None => None,
        Some(f) if f.is_empty() => return Err(ConfigError::new("readonly: readonly-file must not be empty")),
        // Made absolute now: a daemonized server changes its directory.
        Some(f) => Some(Arc::new(std::path::absolute(&f).map_err(|e| {
            ConfigError::new(format!("readonly: readonly-file '{f}': cannot make the path absolute: {e}"))
        })?)),
    };
    Ok(Arc::new(ReadonlyFactory { file }))
}

struct ReadonlyFactory {
    file: Option<Arc<PathBuf>>,
}

impl FilterFactory for ReadonlyFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let filter = ReadonlyFilter { file: self.file.clone(), sched: cx.sched.clone() };
        Ok(Rc::new(FilterLayer { filter, next }))
    }
}

struct ReadonlyFilter {
    file: Option<Arc<PathBuf>>,
    sched: Sched,
}

impl ReadonlyFilter {
    /// Run `op` unless the trigger file exists, checked off the loop; fail with EPERM if it does.
    fn unless_protected(&self, done: Done<()>, op: impl FnOnce(Done<()>) + 'static) {
        let Some(file) = self.file.clone() else {
            // Advertised read-only: the shim above never lets a write through.
            return done.err(NbdError::msg(Errno::Perm, "readonly: the export is read-only"));
        };
        self.sched.blocking(
            move || match file.try_exists() {
                Ok(false) => Ok(()),
                Ok(true) => Err(format!("readonly: {} exists: the export is read-only", file.display())),
                Err(e) => {
                    Err(format!("readonly: cannot tell whether {} exists ({e}): refusing", file.display()))
                }
            },
            move |r: Result<(), String>| match r {
                Ok(()) => op(done),
                Err(m) => done.err(NbdError::msg(Errno::Perm, m)),
            },
        )
    }
}

impl Filter for ReadonlyFilter {
    /// Read data passes through untouched: replies stay zero-copy.
    fn pread_lent(&self, next: &Next, count: usize, offset: u64, flags: Flags, done: Done<ReadData>) {
        next.pread_lent(count, offset, flags, done)
    }

    fn info(&self, next: &Next) -> ExportInfo {
        let below = next.info();
        match self.file {
            // Like -r: the shim turns off every write-like capability along with can_write.
            None => ExportInfo { can_write: false, ..below },
            Some(_) => below,
        }
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let next = next.clone();
        self.unless_protected(done, move |d| next.pwrite(data, offset, flags, d))
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let next = next.clone();
        self.unless_protected(done, move |d| next.zero(count, offset, flags, d))
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let next = next.clone();
        self.unless_protected(done, move |d| next.trim(count, offset, flags, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::sched::SimScheduler;

    #[test]
    fn without_a_file_the_export_is_read_only() {
        let sim = SimScheduler::new();
        let ram = Ram::new(4096);
        let top = open(&configure(&SPEC, &[]), &cx(&sim), ram.clone()).unwrap();
        let info = top.info();
        assert!(!info.can_write && !info.can_trim);
        assert_eq!(wait(&sim, |d| top.pwrite(vec![1], 0, Flags::NONE, d)).unwrap_err().errno, Errno::Perm);
        wait(&sim, |d| top.pread(vec![0; 4], 0, Flags::NONE, d)).unwrap();
        assert_eq!(ram.calls(), ["pread 4@0"]);
    }

    #[test]
    fn the_trigger_file_switches_writes_on_and_off() {
        let dir = std::env::temp_dir().join(format!("blocksmith-readonly-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let trigger = dir.join("ro");
        let _ = std::fs::remove_file(&trigger);
        let sim = SimScheduler::new();
        let ram = Ram::new(4096);
        let f = configure(&SPEC, &[("readonly-file", trigger.to_str().unwrap())]);
        let top = open(&f, &cx(&sim), ram.clone()).unwrap();
        assert!(top.info().can_write, "advertised writable: the file decides per request");

        wait(&sim, |d| top.pwrite(vec![1; 4], 0, Flags::NONE, d)).unwrap();
        std::fs::write(&trigger, b"").unwrap();
        let e = wait(&sim, |d| top.pwrite(vec![2; 4], 0, Flags::NONE, d)).unwrap_err();
        assert_eq!(e.errno, Errno::Perm);
        assert_eq!(wait(&sim, |d| top.zero(4, 0, Flags::NONE, d)).unwrap_err().errno, Errno::Perm);
        assert_eq!(wait(&sim, |d| top.trim(4, 0, Flags::NONE, d)).unwrap_err().errno, Errno::Perm);
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();
        std::fs::remove_file(&trigger).unwrap();
        wait(&sim, |d| top.pwrite(vec![3; 4], 0, Flags::NONE, d)).unwrap();
        assert_eq!(&ram.data.borrow()[..4], &[3; 4]);
        assert_eq!(ram.calls(), ["pwrite 4@0 flags=0", "flush", "pwrite 4@0 flags=0"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_parameters_are_rejected_clearly() {
        assert_eq!(make_err(&SPEC, &[("readonly-file", "")]), "readonly: readonly-file must not be empty");
    }
}
