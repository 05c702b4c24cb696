//! The script machinery on a real event loop (`LocalLoop`), with tiny scripts.

use std::cell::{Cell, RefCell};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blocksmith_core::control::ServerControl;
use blocksmith_core::error::Errno;
use blocksmith_core::io::reactor::LocalLoop;
use blocksmith_core::layer::{BackendFactory, Done, Extent, Flags, Layer, OpenCx, Stack, Support};
use blocksmith_core::NbdError;

use super::gate::Hub;
use crate::testutil;

/// A scratch directory for scripts and the files they leave behind.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("bs-script-{tag}-{}-{n}", std::process::id()));
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn script(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p.to_string_lossy().into_owned()
    }
    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.0.join(name)).unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct Rig {
    lp: LocalLoop,
    control: Arc<ServerControl>,
}

impl Rig {
    fn new() -> Rig {
        Rig { lp: LocalLoop::new().unwrap(), control: ServerControl::new() }
    }

    fn cx(&self, readonly: bool) -> OpenCx {
        let mut cx = OpenCx::for_tests(self.lp.sched());
        cx.readonly = readonly;
        cx.control = self.control.clone();
        cx
    }

    fn run<T: 'static>(&mut self, f: impl FnOnce(Done<T>)) -> Result<T, NbdError> {
        let out = Rc::new(RefCell::new(None));
        let o = out.clone();
        f(Done::new(move |r| *o.borrow_mut() = Some(r)));
        assert!(
            self.lp.run_until(Duration::from_secs(30), || out.borrow().is_some()),
            "operation never completed"
        );
        let r = out.borrow_mut().take();
        r.unwrap()
    }

    /// Open through a Stack, so the validating shim sits on top as in the server.
    fn open(&mut self, f: &Arc<dyn BackendFactory>, readonly: bool) -> Result<Rc<dyn Layer>, NbdError> {
        let stack = Stack::new(("test".into(), f.clone()), vec![]);
        let cx = self.cx(readonly);
        self.run(|d| stack.open(&cx, d))
    }

    fn read(&mut self, l: &Rc<dyn Layer>, len: usize, offset: u64) -> Result<Vec<u8>, NbdError> {
        self.run(|d| l.pread(vec![0xa5; len], offset, Flags::NONE, d))
    }

    fn hub(&self) -> Rc<Hub> {
        Hub::for_loop(&self.lp.sched()).unwrap()
    }

    /// Close a connection and wait until its close script (and everything else) has finished.
    fn close(&mut self, l: Rc<dyn Layer>) {
        l.close();
        drop(l);
        let hub = self.hub();
        assert!(self.lp.run_until(Duration::from_secs(30), || hub.busy() == 0));
    }
}

impl Drop for Rig {
    /// Let whatever still runs (a `close` after a failed open) finish on this thread: the test
    /// harness does not wait for a test thread's thread-locals, where the hub would otherwise
    /// kill it, and the factory must be dropped here for unload and $tmpdir removal to run.
    fn drop(&mut self) {
        let hub = self.hub();
        self.lp.run_until(Duration::from_secs(30), || hub.busy() == 0);
    }
}

fn sh(kv: &[(&str, &str)]) -> Arc<dyn BackendFactory> {
    testutil::make(&crate::sh::SPEC, kv).unwrap_or_else(|e| panic!("sh {kv:?}: {e}"))
}

fn eval(kv: &[(&str, &str)]) -> Arc<dyn BackendFactory> {
    testutil::make(&crate::eval::SPEC, kv).unwrap_or_else(|e| panic!("eval {kv:?}: {e}"))
}

/// A RAM-ish disk in a file under $tmpdir, the way the talk's demo does it.
const RAMDISK: &str = r#"#!/bin/sh
f=$tmpdir/disk
case "$1" in
  thread_model) echo parallel ;;
  get_ready) truncate -s 1M "$f" ;;
  open) echo "h-$3" ;;
  get_size) test "$2" = h- || { echo "EINVAL bad handle $2" >&2; exit 1; }; stat -c %s "$f" ;;
  can_write|can_flush|can_extents|can_zero) exit 0 ;;
  can_trim) exit 3 ;;
  pread) dd if="$f" skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none ;;
  pwrite) dd of="$f" seek=$4 conv=notrunc oflag=seek_bytes status=none ;;
  zero) exit 2 ;;
  extents) echo "0 512K"; echo "512K 512K hole,zero" ;;
  *) exit 2 ;;
esac
"#;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn a_disk_in_a_dozen_lines() {
    let dir = Scratch::new("ram");
    let f = sh(&[("script", &dir.script("ram.sh", RAMDISK))]);
    let mut rig = Rig::new();
    let l = rig.open(&f, false).unwrap();
    let info = l.info();
    assert_eq!(info.size, 1 << 20);
    assert!(info.can_write && info.can_flush && info.can_extents && !info.can_trim);
    assert_eq!(info.zero, Support::Native);

    // More than a pipe's capacity each way, so both directions need several readiness events.
    let data = pattern(200 * 1024, 7);
    rig.run(|d| l.pwrite(data.clone(), 4096, Flags::NONE, d)).unwrap();
    assert_eq!(rig.read(&l, data.len(), 4096).unwrap(), data);
    // FUA is emulated by a flush (the script has no flush method: that is fine too).
    rig.run(|d| l.pwrite(vec![9; 512], 0, Flags::FUA, d)).unwrap();

    // zero exits 2: the backend falls back to pwrite, streaming zeroes.
    rig.run(|d| l.zero(100 * 1024, 8192, Flags::MAY_TRIM, d)).unwrap();
    let back = rig.read(&l, 200 * 1024, 4096).unwrap();
    assert!(back[4096..4096 + 100 * 1024].iter().all(|&b| b == 0));
    assert_eq!(&back[..4096], &data[..4096]);
    assert_eq!(&back[4096 + 100 * 1024..], &data[4096 + 100 * 1024..]);
    // ...unless the client wants it fast.
    let e = rig.run(|d| l.zero(4096, 0, Flags::FAST_ZERO, d)).unwrap_err();
    assert_eq!(e.errno, Errno::NotSup);

    let e = rig.run(|d| l.extents(1 << 20, 0, Flags::NONE, d)).unwrap();
    assert_eq!(e.0, vec![Extent { length: 512 * 1024, flags: 0 }, Extent { length: 512 * 1024, flags: 3 }]);
    let e = rig.run(|d| l.extents(4096, 600 * 1024, Flags::REQ_ONE, d)).unwrap();
    assert_eq!(e.0, vec![Extent { length: 4096, flags: 3 }]);
    rig.close(l);
}

#[test]
fn exit_codes_errors_fallbacks_and_false() {
    let f = eval(&[
        ("get_size", "echo 1M"),
        ("pread", "echo 'ENOSPC out of room' >&2; exit 1"),
        ("pwrite", "cat >/dev/null"),
        ("flush", "exit 2"),
        ("can_flush", "exit 0"),
        ("can_trim", "exit 3"),
        ("zero", "echo EOPNOTSUPP >&2; exit 1"),
        ("cache", "exit 9"),
        ("can_cache", "echo native"),
        ("thread_model", "echo parallel"),
    ]);
    let mut rig = Rig::new();
    let l = rig.open(&f, false).unwrap();
    let info = l.info();
    // pwrite given, so can_write is implied; can_trim said false.
    assert!(info.can_write && info.can_flush && !info.can_trim && !info.can_extents);
    assert_eq!(info.cache, Support::Native);
    let e = rig.read(&l, 512, 0).unwrap_err();
    assert_eq!(e.errno, Errno::NoSpc);
    assert_eq!(e.message.as_deref(), Some("pread: out of room"));
    rig.run(|d| l.flush(Flags::NONE, d)).unwrap();
    rig.run(|d| l.zero(4096, 0, Flags::NONE, d)).unwrap();
    let e = rig.run(|d| l.cache(4096, 0, Flags::NONE, d)).unwrap_err();
    assert_eq!(e.errno, Errno::Io);
    rig.close(l);
}

#[test]
fn short_reads_and_bad_output_are_errors() {
    let f = eval(&[("get_size", "echo 64K"), ("pread", "echo short"), ("thread_model", "echo parallel")]);
    let mut rig = Rig::new();
    let l = rig.open(&f, false).unwrap();
    let e = rig.read(&l, 512, 0).unwrap_err();
    assert_eq!(e.errno, Errno::Io);
    assert!(e.message.unwrap().contains("expecting 512 bytes but received 6"));
    rig.close(l);
    let f = eval(&[("get_size", "echo lots"), ("pread", "exit 1")]);
    let e = rig.open(&f, false).err().unwrap();
    assert!(e.message.as_deref().unwrap_or("").contains("get_size"), "got {e:?}");
    let f = eval(&[("pread", "exit 1")]);
    assert!(rig.open(&f, false).is_err(), "get_size is required");
}

#[test]
fn a_hung_script_is_killed_and_the_rest_goes_on() {
    let dir = Scratch::new("hang");
    let sleeper = dir.path().join("sleeper");
    let pread = format!(
        "if [ $4 = 0 ]; then sleep 30 & echo $! > {}; wait; fi; dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        sleeper.display()
    );
    let f = eval(&[
        ("get_size", "echo 1M"),
        ("pread", &pread),
        ("thread_model", "echo parallel"),
        ("script-timeout", "300ms"),
    ]);
    let mut rig = Rig::new();
    let l = rig.open(&f, false).unwrap();
    let t0 = Instant::now();
    let e = rig.read(&l, 512, 0).unwrap_err();
    assert_eq!(e.errno, Errno::Io);
    assert!(e.message.as_deref().unwrap_or("").contains("timed out"), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    // The script's own child died with it (its whole process group was killed).
    let pid: i32 = dir.read("sleeper").trim().parse().unwrap();
    let gone = |pid: i32| {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.is_empty() || stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    };
    let hub = rig.hub();
    assert!(rig.lp.run_until(Duration::from_secs(10), || gone(pid) && hub.busy() == 0));
    // Other requests still work.
    assert_eq!(rig.read(&l, 4096, 4096).unwrap(), vec![0; 4096]);
    rig.close(l);
}

type ReadResult = Result<Vec<u8>, NbdError>;

/// Start `n` reads at once on distinct offsets; sample how many scripts run at a time.
fn concurrent_reads(rig: &mut Rig, l: &Rc<dyn Layer>, n: usize) -> (usize, Vec<ReadResult>) {
    let results: Rc<RefCell<Vec<Option<ReadResult>>>> = Rc::new(RefCell::new(vec![None; n]));
    for i in 0..n {
        let r = results.clone();
        l.pread(vec![0; 512], i as u64 * 512, Flags::NONE, Done::new(move |x| r.borrow_mut()[i] = Some(x)));
    }
    let hub = rig.hub();
    let most = Cell::new(0);
    assert!(rig.lp.run_until(Duration::from_secs(60), || {
        most.set(most.get().max(hub.running()));
        results.borrow().iter().all(|r| r.is_some())
    }));
    let v = results.borrow_mut().drain(..).map(|r| r.unwrap()).collect();
    (most.get(), v)
}

#[test]
fn children_are_capped_and_queue_in_order() {
    let dir = Scratch::new("cap");
    let pread = format!(
        "echo $4 >> {}; sleep 0.2; dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        dir.path().join("order").display()
    );
    let f = eval(&[
        ("get_size", "echo 1M"),
        ("pread", &pread),
        ("thread_model", "echo parallel"),
        ("max-children", "2"),
    ]);
    let mut rig = Rig::new();
    let l = rig.open(&f, false).unwrap();
    let (most, results) = concurrent_reads(&mut rig, &l, 6);
    assert!(results.iter().all(|r| r.as_ref().is_ok_and(|b| b == &vec![0; 512])));
    assert_eq!(most, 2, "at most max-children scripts run at once");
    // First come, first served: the starts come in pairs, in submission order.
    let order: Vec<u64> = dir.read("order").lines().map(|l| l.trim().parse::<u64>().unwrap() / 512).collect();
    let mut pairs: Vec<Vec<u64>> = order.chunks(2).map(|c| c.to_vec()).collect();
    pairs.iter_mut().for_each(|p| p.sort_unstable());
    assert_eq!(pairs, vec![vec![0, 1], vec![2, 3], vec![4, 5]], "start order {order:?}");
    rig.close(l);
}

#[test]
fn scripts_without_a_thread_model_run_one_at_a_time() {
    let f = eval(&[
        ("get_size", "echo 1M"),
        ("pread", "sleep 0.05; dd if=/dev/zero count=$3 iflag=count_bytes status=none"),
    ]);
    let mut rig = Rig::new();
    let l = rig.open(&f, false).unwrap();
    let (most, results) = concurrent_reads(&mut rig, &l, 4);
    assert!(results.iter().all(|r| r.is_ok()));
    assert_eq!(most, 1, "serialize_all_requests is nbdkit's default");
    rig.close(l);
}

#[test]
fn disconnect_and_shutdown_codes() {
    let f = eval(&[
        ("get_size", "echo 1M"),
        ("pread", "dd if=/dev/zero count=$3 iflag=count_bytes status=none"),
        ("pwrite", "cat >/dev/null; exit 7"),
        ("flush", "exit 4"),
        ("can_flush", "exit 0"),
        ("thread_model", "echo parallel"),
    ]);
    let mut rig = Rig::new();
    let l = rig.open(&f, false).unwrap();
    rig.run(|d| l.pwrite(vec![1; 512], 0, Flags::NONE, d)).unwrap();
    assert_eq!(rig.read(&l, 512, 0).unwrap_err().errno, Errno::Shutdown);
    rig.close(l);
    let l = rig.open(&f, false).unwrap();
    assert!(!rig.control.is_shutting_down());
    rig.run(|d| l.flush(Flags::NONE, d)).unwrap();
    assert!(rig.control.is_shutting_down());
    rig.close(l);
}

#[test]
fn config_magic_key_and_lifecycle() {
    let dir = Scratch::new("cfg");
    let log = dir.path().join("log");
    let script = format!(
        "#!/bin/sh\necho \"$*\" >> {log}\ncase \"$1\" in\n  magic_config_key) echo file ;;\n  load) echo \"$tmpdir\" > {tmp} ;;\n  \
         config|config_complete|get_ready|close|unload) ;;\n  open) echo myhandle ;;\n  get_size) echo 4K ;;\n  \
         pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;\n  *) exit 2 ;;\nesac\n",
        log = log.display(),
        tmp = dir.path().join("tmpdir").display()
    );
    let f = sh(&[("script", &dir.script("cfg.sh", &script)), ("script", "disk.img"), ("size", "1M")]);
    let calls = |dir: &Scratch| dir.read("log").lines().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(
        calls(&dir)[..6],
        [
            "load",
            "magic_config_key",
            "config file disk.img",
            "config size 1M",
            "config_complete",
            "thread_model"
        ]
    );
    let mut rig = Rig::new();
    let l = rig.open(&f, true).unwrap();
    assert!(!l.info().can_write);
    rig.close(l);
    let c = calls(&dir);
    assert!(c.contains(&"open true  false".to_string()), "{c:?}");
    assert!(c.contains(&"get_size myhandle".to_string()));
    assert!(!c.iter().any(|x| x.starts_with("can_write")), "read-only: can_write is not asked");
    assert_eq!(c.last().map(String::as_str), Some("close myhandle"));
    let tmpdir = PathBuf::from(dir.read("tmpdir").trim());
    assert!(tmpdir.is_dir());
    drop(f);
    assert_eq!(calls(&dir).last().map(String::as_str), Some("unload"));
    assert!(!tmpdir.exists(), "$tmpdir is removed at exit");
}

#[test]
fn config_errors() {
    let dir = Scratch::new("cfgerr");
    let e = testutil::make_err(&crate::eval::SPEC, &[("get_size", "echo 1M"), ("foo", "bar")]);
    assert!(e.contains("callback 'foo' is unknown"), "{e}");
    let e = testutil::make_err(&crate::eval::SPEC, &[("get_size", "echo 1"), ("get_size", "echo 2")]);
    assert!(e.contains("more than once"), "{e}");
    let e = testutil::make_err(
        &crate::eval::SPEC,
        &[("config", "echo 'EINVAL bad key' >&2; exit 1"), ("k", "v")],
    );
    assert!(e.contains("bad key"), "{e}");
    let s = dir.script("nocfg.sh", "#!/bin/sh\nexit 2\n");
    let e = testutil::make_err(&crate::sh::SPEC, &[("script", &s), ("a", "1")]);
    assert!(e.contains("does not need command line configuration"), "{e}");
    let e = testutil::make_err(&crate::sh::SPEC, &[("script", &s), ("script", "bare")]);
    assert!(e.contains("magic_config_key"), "{e}");
    let e = testutil::make_err(&crate::sh::SPEC, &[("script", "/nonexistent/script")]);
    assert!(e.contains("/nonexistent/script"), "{e}");
    let e = testutil::make_err(&crate::sh::SPEC, &[("script", &s), ("max-children", "0")]);
    assert!(e.contains("max-children"), "{e}");
    let e = testutil::make_err(&crate::sh::SPEC, &[]);
    assert!(e.contains("no script"), "{e}");
}

#[test]
fn scripts_without_a_shebang_run_under_sh() {
    let dir = Scratch::new("noshebang");
    let s = dir.script(
        "plain",
        "case \"$1\" in get_size) echo 8K ;; pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;; *) exit 2 ;; esac\n",
    );
    let f = sh(&[("script", &s)]);
    let mut rig = Rig::new();
    let l = rig.open(&f, false).unwrap();
    assert_eq!(l.info().size, 8192);
    assert_eq!(rig.read(&l, 8192, 0).unwrap(), vec![0; 8192]);
    rig.close(l);
}

#[test]
fn missing_fallback_and_export_lists() {
    let f = eval(&[
        ("missing", "case \"$1\" in get_size) echo 2K ;; *) exit 2 ;; esac"),
        ("pread", "dd if=/dev/zero count=$3 iflag=count_bytes status=none"),
        ("list_exports", "echo INTERLEAVED; echo a; echo first; echo b; echo second"),
        ("default_export", "echo a"),
        ("open", "echo \"$3\""),
        ("export_description", "echo \"about $2\""),
    ]);
    assert_eq!(
        f.list_exports().iter().map(|e| (e.name.as_str(), e.description.as_deref())).collect::<Vec<_>>(),
        vec![("a", Some("first")), ("b", Some("second"))]
    );
    let mut rig = Rig::new();
    let l = rig.open(&f, false).unwrap();
    let info = l.info();
    assert_eq!(info.size, 2048);
    // The default export "" became "a" (default_export), which open printed as the handle.
    assert_eq!(info.description.as_deref(), Some("about a"));
    rig.close(l);
}

#[test]
fn serialize_connections_opens_one_at_a_time() {
    let f = eval(&[
        ("get_size", "echo 1M"),
        ("pread", "dd if=/dev/zero count=$3 iflag=count_bytes status=none"),
        ("thread_model", "echo serialize_connections"),
    ]);
    let mut rig = Rig::new();
    let a = rig.open(&f, false).unwrap();
    type Opened = Option<Result<Rc<dyn Layer>, NbdError>>;
    let second: Rc<RefCell<Opened>> = Rc::new(RefCell::new(None));
    let s = second.clone();
    let stack = Stack::new(("test".into(), f.clone()), vec![]);
    stack.open(&rig.cx(false), Done::new(move |r| *s.borrow_mut() = Some(r)));
    // The second connection waits for its turn...
    assert!(!rig.lp.run_until(Duration::from_millis(300), || second.borrow().is_some()));
    assert_eq!(rig.read(&a, 512, 0).unwrap(), vec![0; 512]);
    // ...which comes when the first has closed.
    a.close();
    drop(a);
    assert!(rig.lp.run_until(Duration::from_secs(30), || second.borrow().is_some()));
    let b = second.borrow_mut().take().unwrap().unwrap();
    assert_eq!(rig.read(&b, 512, 0).unwrap(), vec![0; 512]);
    rig.close(b);
}

#[test]
fn without_pidfds_the_exit_is_polled_for() {
    super::child::NO_PIDFD.with(|n| n.set(true));
    let f = eval(&[
        ("get_size", "echo 1M"),
        ("pread", "if [ $4 = 0 ]; then sleep 30; fi; dd if=/dev/zero count=$3 iflag=count_bytes status=none"),
        ("pwrite", "cat >/dev/null; echo 'EPERM nope' >&2; exit 1"),
        ("thread_model", "echo parallel"),
        ("script-timeout", "300ms"),
    ]);
    let mut rig = Rig::new();
    let l = rig.open(&f, false).unwrap();
    assert_eq!(rig.read(&l, 4096, 4096).unwrap(), vec![0; 4096]);
    assert_eq!(rig.run(|d| l.pwrite(vec![1; 100_000], 0, Flags::NONE, d)).unwrap_err().errno, Errno::Perm);
    let e = rig.read(&l, 512, 0).unwrap_err();
    assert!(e.message.as_deref().unwrap_or("").contains("timed out"), "{e:?}");
    rig.close(l);
    super::child::NO_PIDFD.with(|n| n.set(false));
}

#[test]
fn the_cap_is_shared_by_every_loop() {
    let dir = Scratch::new("xloop");
    let log = dir.path().join("log");
    let pread = format!(
        "echo S >> {log}; sleep 0.02; echo E >> {log}; dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        log = log.display()
    );
    let f = eval(&[
        ("get_size", "echo 1M"),
        ("pread", &pread),
        ("thread_model", "echo parallel"),
        ("max-children", "1"),
    ]);
    // Two loops on two threads: a slot freed on one must wake a waiter on the other.
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut rig = Rig::new();
                let l = rig.open(&f, false).unwrap();
                let (_, results) = concurrent_reads(&mut rig, &l, 5);
                assert!(results.iter().all(|r| r.is_ok()));
                rig.close(l);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let lines: Vec<String> = dir.read("log").lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 20);
    assert!(lines.chunks(2).all(|p| p == ["S", "E"]), "two scripts overlapped: {lines:?}");
}

#[test]
fn a_loop_that_goes_away_does_not_take_a_slot_with_it() {
    let f = eval(&[
        ("get_size", "echo 1M"),
        ("pread", "sleep 0.3; dd if=/dev/zero count=$3 iflag=count_bytes status=none"),
        ("thread_model", "echo parallel"),
        ("max-children", "1"),
    ]);
    let mut rig = Rig::new();
    let l = rig.open(&f, false).unwrap();
    // This read holds the only slot for a while...
    let first = Rc::new(RefCell::new(None));
    let r = first.clone();
    l.pread(vec![0; 512], 0, Flags::NONE, Done::new(move |x| *r.borrow_mut() = Some(x)));
    // ...while another loop queues for it, then stops (as a loop does at server shutdown).
    let g = f.clone();
    std::thread::spawn(move || {
        let mut lp = LocalLoop::new().unwrap();
        let stack = Stack::new(("test".into(), g), vec![]);
        let opened = Rc::new(Cell::new(false));
        let o = opened.clone();
        stack.open(&OpenCx::for_tests(lp.sched()), Done::new(move |_| o.set(true)));
        assert!(!lp.run_until(Duration::from_millis(100), || opened.get()));
        blocksmith_core::layer::tearing_down();
    })
    .join()
    .unwrap();
    assert!(rig.lp.run_until(Duration::from_secs(30), || first.borrow().is_some()));
    // The slot the gone loop was queued for came back: reads still run.
    assert_eq!(rig.read(&l, 512, 512).unwrap(), vec![0; 512]);
    rig.close(l);
}
