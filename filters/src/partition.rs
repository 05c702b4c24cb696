//! The partition filter (nbdkit-partition-filter): serve one partition of a partitioned disk,
//! chosen by number (`partition=N`, from 1), from an MBR (primary partitions 1-4, logical
//! partitions 5 and up through the extended partition's EBR chain) or a GPT.
//!
//! # Reading the table at open
//!
//! The partition's size must be known when the filter is opened (the client is told it in the
//! reply to NBD_OPT_GO), and the table can only be read through `next`, which may answer later
//! (the `file` backend reads on the blocking pool). So the filter opens asynchronously
//! (`FilterFactory::open_async`): it reads the table with nested `pread` calls on `next`, and
//! the stack waits for it before opening the filter above and answering the client.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{
    Done, ExportInfo, Extents, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx,
    ParamSpec,
};

use crate::chunked::{sequence, Step};

pub const SPEC: FilterSpec = FilterSpec {
    name: "partition",
    summary: "serve one partition of an MBR or GPT partitioned disk",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[ParamSpec {
    name: "partition",
    help: "(required) The partition number, counting from 1. MBR: 1-4 are primary\n\
           partitions, 5 and up logical partitions in the extended partition.",
}];

const SECTOR: u64 = 512;

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let v = p.take("partition").ok_or_else(|| {
        ConfigError::new("partition: you must supply the partition parameter (partition=N, counting from 1)")
    })?;
    let partnum: u32 = v
        .trim()
        .parse()
        .map_err(|_| ConfigError::new(format!("partition: could not parse partition number '{v}'")))?;
    if partnum == 0 {
        return Err(ConfigError::new("partition: invalid partition number 0 (partitions count from 1)"));
    }
    Ok(Arc::new(PartitionFactory { partnum }))
}

/// Where the partition is in the disk below.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub offset: u64,
    pub range: u64,
}

struct PartitionFactory {
    partnum: u32,
}

impl FilterFactory for PartitionFactory {
    /// Synchronous open works only when the layer below answers at once; the stack always uses
    /// [`FilterFactory::open_async`].
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let out = Rc::new(RefCell::new(None));
        let o = out.clone();
        self.open_async(cx, next, Done::new(move |r| *o.borrow_mut() = Some(r)));
        let r = out.borrow_mut().take();
        r.unwrap_or_else(|| {
            Err(NbdError::io("partition: the layer below answers later: open asynchronously"))
        })
    }

    fn open_async(&self, _cx: &OpenCx, next: Next, done: Done<Rc<dyn Layer>>) {
        let n = next.clone();
        read_table(
            &next,
            self.partnum,
            Done::new(move |r: Result<Geometry, NbdError>| match r {
                Ok(g) => done.ok(Rc::new(FilterLayer { filter: PartitionFilter { g }, next: n })),
                Err(e) => {
                    ::log::warn!("{e}");
                    done.err(e)
                }
            }),
        );
    }
}

struct PartitionFilter {
    g: Geometry,
}

impl Filter for PartitionFilter {
    fn info(&self, next: &Next) -> ExportInfo {
        ExportInfo { size: self.g.range, ..next.info() }
    }

    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        let base = self.g.offset;
        next.pread(buf, base + offset, flags, done)
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let base = self.g.offset;
        next.pwrite(data, base + offset, flags, done)
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let base = self.g.offset;
        next.trim(count, base + offset, flags, done)
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let base = self.g.offset;
        next.zero(count, base + offset, flags, done)
    }

    fn extents(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        // Extents are lengths from the request's offset: shifting the request is enough, and the
        // shim above clips whatever runs past the partition's end.
        let base = self.g.offset;
        next.extents(count, base + offset, flags, done)
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let base = self.g.offset;
        next.cache(count, base + offset, flags, done)
    }
}

/// Read `n` bytes at `offset` through `next`.
fn read(next: &Next, offset: u64, n: usize, done: Done<Vec<u8>>) {
    next.pread(vec![0u8; n], offset, Flags::NONE, done)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn fail(msg: impl Into<String>) -> NbdError {
    NbdError::msg(Errno::Io, format!("partition: {}", msg.into()))
}

/// Find partition `partnum` in the disk below: read LBA 0 and 1, then whatever the table type
/// needs. Completes with the partition's place, checked to lie inside the disk.
pub fn read_table(next: &Next, partnum: u32, done: Done<Geometry>) {
    let size = next.info().size;
    if size < 2 * SECTOR {
        return done.err(fail("disk is too small to be a partitioned disk"));
    }
    let n2 = next.clone();
    read(
        next,
        0,
        2 * SECTOR as usize,
        Done::new(move |r: Result<Vec<u8>, NbdError>| {
            let lba01 = match r {
                Ok(b) => b,
                Err(e) => return done.err(e),
            };
            let inside = move |r: Result<Geometry, NbdError>| {
                r.and_then(|g| match g.offset.checked_add(g.range) {
                    Some(end) if end <= size => Ok(g),
                    _ => Err(fail(format!(
                        "partition {partnum} ({} bytes at offset {}) is outside the disk ({size} bytes)",
                        g.range, g.offset
                    ))),
                })
            };
            let done = done.map(inside);
            let lba1 = &lba01[SECTOR as usize..];
            if size >= 2 * 34 * SECTOR && &lba1[..8] == b"EFI PART" {
                gpt(&n2, size, partnum, lba1, done)
            } else if lba01[0x1fe] == 0x55 && lba01[0x1ff] == 0xaa {
                mbr(&n2, size, partnum, &lba01[..SECTOR as usize], done)
            } else {
                done.err(fail("disk does not contain an MBR or GPT partition table signature"))
            }
        }),
    )
}

fn gpt(next: &Next, size: u64, partnum: u32, header: &[u8], done: Done<Geometry>) {
    let entries_lba = le64(header, 72);
    let nr_entries = le32(header, 80);
    let entry_size = u64::from(le32(header, 84));
    if partnum > nr_entries {
        return done
            .err(fail(format!("GPT partition number {partnum} out of range (the table has {nr_entries})")));
    }
    if entry_size < 128 {
        return done.err(fail(format!("GPT partition entry size is {entry_size}, less than 128 bytes")));
    }
    // The table (twice) and the headers must fit, or the header is bogus.
    let table = u64::from(nr_entries).saturating_mul(entry_size);
    if size < (3 * SECTOR).saturating_add(table.saturating_mul(2)) {
        return done.err(fail("GPT partition table is too large for this disk"));
    }
    let at = entries_lba
        .checked_mul(SECTOR)
        .and_then(|o| o.checked_add(u64::from(partnum - 1) * entry_size))
        .filter(|o| o.checked_add(128).is_some_and(|end| end <= size));
    let Some(at) = at else {
        return done.err(fail("GPT partition entries lie outside the disk"));
    };
    read(
        next,
        at,
        128,
        done.map(move |r: Result<Vec<u8>, NbdError>| {
            let e = r?;
            let (first, last) = (le64(&e, 32), le64(&e, 40));
            if e[..16].iter().all(|b| *b == 0) {
                return Err(fail(format!("GPT partition {partnum} not found (unused entry)")));
            }
            let geometry = last
                .checked_sub(first)
                .and_then(|n| n.checked_add(1))
                .and_then(|n| n.checked_mul(SECTOR))
                .zip(first.checked_mul(SECTOR));
            match geometry {
                Some((range, offset)) => Ok(Geometry { offset, range }),
                None => Err(fail(format!("GPT partition {partnum} has bad LBAs {first}..{last}"))),
            }
        }),
    )
}

/// One of the four 16-byte entries of an MBR or EBR sector.
#[derive(Clone, Copy, Debug)]
struct MbrEntry {
    kind: u8,
    start: u32,
    sectors: u32,
}

fn mbr_entry(sector: &[u8], i: usize) -> MbrEntry {
    let at = 0x1be + 16 * i;
    MbrEntry { kind: sector[at + 4], start: le32(sector, at + 8), sectors: le32(sector, at + 12) }
}

/// The extended partition types Linux follows (block/partitions/msdos.c).
fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

fn mbr(next: &Next, size: u64, partnum: u32, sector0: &[u8], done: Done<Geometry>) {
    if partnum <= 4 {
        let p = mbr_entry(sector0, partnum as usize - 1);
        return if p.sectors > 0 && p.kind != 0 && !is_extended(p.kind) {
            done.ok(Geometry { offset: u64::from(p.start) * SECTOR, range: u64::from(p.sectors) * SECTOR })
        } else {
            done.err(fail(format!("MBR partition {partnum} not found")))
        };
    }
    let Some(ext) = (0..4).map(|i| mbr_entry(sector0, i)).find(|p| p.sectors > 0 && is_extended(p.kind))
    else {
        return done.err(fail(
            "MBR logical partition selected, but there is no extended partition in the partition table",
        ));
    };
    logical(next, size, partnum, ext, done)
}

/// Walk the EBR chain of extended partition `ext` to logical partition `partnum` (5 and up). As
/// nbdkit, only chains whose links strictly increase are followed, so the walk must end.
fn logical(next: &Next, size: u64, partnum: u32, ext: MbrEntry, done: Done<Geometry>) {
    let ext_start = u64::from(ext.start) * SECTOR;
    let ext_end = (u64::from(ext.start) + u64::from(ext.sectors)) * SECTOR;
    // Walk state shared between the steps and the final answer.
    struct Walk {
        ebr: u64,
        number: u32,
        sector: Option<Vec<u8>>,
        found: Option<Result<Geometry, NbdError>>,
    }
    let walk = Rc::new(RefCell::new(Walk { ebr: ext_start, number: 5, sector: None, found: None }));
    let w = walk.clone();
    let next = next.clone();
    let steps = move || -> Option<Step> {
        let mut st = w.borrow_mut();
        if st.found.is_some() {
            return None;
        }
        if let Some(sector) = st.sector.take() {
            // The EBR at st.ebr has been read: is it ours, or where is the next one?
            if st.number == partnum {
                let p = mbr_entry(&sector, 0);
                let offset = st.ebr + u64::from(p.start) * SECTOR;
                let range = u64::from(p.sectors) * SECTOR;
                st.found = Some(if offset <= st.ebr || offset + range > ext_end {
                    Err(fail(format!(
                        "logical partition start or size out of range (offset={offset}, range={range}, \
                         extended partition {ext_start}..{ext_end})"
                    )))
                } else {
                    Ok(Geometry { offset, range })
                });
                return None;
            }
            let link = mbr_entry(&sector, 1);
            if link.start == 0 && link.sectors == 0 {
                st.found = Some(Err(fail(format!("MBR partition {partnum} not found"))));
                return None;
            }
            let next_ebr = (u64::from(ext.start) + u64::from(link.start)) * SECTOR;
            if next_ebr <= st.ebr {
                st.found = Some(Err(fail(format!(
                    "invalid EBR chain: next EBR {next_ebr} <= current EBR {}",
                    st.ebr
                ))));
                return None;
            }
            st.ebr = next_ebr;
            st.number += 1;
        }
        let ebr = st.ebr;
        if ebr < SECTOR || ebr >= size - SECTOR {
            st.found =
                Some(Err(fail("invalid EBR chain: next EBR boot sector is located outside disk boundary")));
            return None;
        }
        let (w, next) = (w.clone(), next.clone());
        Some(Box::new(move |k: Done<()>| {
            read(
                &next,
                ebr,
                SECTOR as usize,
                k.map(move |r: Result<Vec<u8>, NbdError>| {
                    w.borrow_mut().sector = Some(r?);
                    Ok(())
                }),
            )
        }))
    };
    sequence(
        steps,
        done.map(move |r: Result<(), NbdError>| {
            r?;
            let found = walk.borrow_mut().found.take();
            found.unwrap_or_else(|| Err(fail(format!("MBR partition {partnum} not found"))))
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::layer::shim::Shim;
    use blocksmith_core::sched::SimScheduler;
    use std::time::Duration;

    fn put32(d: &mut [u8], at: usize, v: u32) {
        d[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn put64(d: &mut [u8], at: usize, v: u64) {
        d[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn mbr_set(d: &mut [u8], sector_at: usize, i: usize, kind: u8, start: u32, sectors: u32) {
        let at = sector_at + 0x1be + 16 * i;
        d[at + 4] = kind;
        put32(d, at + 8, start);
        put32(d, at + 12, sectors);
        d[sector_at + 0x1fe] = 0x55;
        d[sector_at + 0x1ff] = 0xaa;
    }

    /// A 1 MiB disk: primary 1 at sector 8 (16 sectors); primary 2 extended at 32 (200 sectors)
    /// holding logical 5 (EBR at 32, data at 34, 10 sectors) and logical 6 (EBR at 64, data at
    /// 66, 20 sectors); primary 3 at 300 (50 sectors).
    fn mbr_disk() -> Rc<Ram> {
        Ram::with(1 << 20, |r| {
            let d = r.data.get_mut();
            d[..2048].fill(0);
            mbr_set(d, 0, 0, 0x83, 8, 16);
            mbr_set(d, 0, 1, 0x05, 32, 200);
            mbr_set(d, 0, 2, 0x83, 300, 50);
            let ebr1 = 32 * 512;
            d[ebr1..ebr1 + 512].fill(0);
            mbr_set(d, ebr1, 0, 0x83, 2, 10);
            mbr_set(d, ebr1, 1, 0x05, 32, 40);
            let ebr2 = 64 * 512;
            d[ebr2..ebr2 + 512].fill(0);
            mbr_set(d, ebr2, 0, 0x83, 2, 20);
        })
    }

    fn geometry(ram: Rc<Ram>, partnum: &str) -> Result<(u64, Rc<Shim>), NbdError> {
        let sim = SimScheduler::new();
        let top = open(&configure(&SPEC, &[("partition", partnum)]), &cx(&sim), ram)?;
        Ok((top.info().size, top))
    }

    fn geometry_err(ram: Rc<Ram>, partnum: &str) -> NbdError {
        geometry(ram, partnum).err().expect("open fails")
    }

    #[test]
    fn mbr_primary_and_logical_partitions() {
        assert_eq!(geometry(mbr_disk(), "1").unwrap().0, 16 * 512);
        assert_eq!(geometry(mbr_disk(), "3").unwrap().0, 50 * 512);
        assert_eq!(geometry(mbr_disk(), "5").unwrap().0, 10 * 512);
        assert_eq!(geometry(mbr_disk(), "6").unwrap().0, 20 * 512);
        let e = geometry_err(mbr_disk(), "2");
        assert!(e.message.unwrap().contains("MBR partition 2 not found"), "the extended one is not served");
        assert!(geometry(mbr_disk(), "4").is_err());
        let e = geometry_err(mbr_disk(), "7");
        assert!(e.message.unwrap().contains("MBR partition 7 not found"));
    }

    #[test]
    fn requests_are_shifted_into_the_partition() {
        let sim = SimScheduler::new();
        let ram = mbr_disk();
        let top = open(&configure(&SPEC, &[("partition", "6")]), &cx(&sim), ram.clone()).unwrap();
        let base = (64 + 2) * 512;
        let b = wait(&sim, |d| top.pread(vec![0; 4], 10, Flags::NONE, d)).unwrap();
        assert_eq!(b, ram.data.borrow()[base + 10..base + 14]);
        wait(&sim, |d| top.pwrite(vec![0xee; 8], 20 * 512 - 8, Flags::FUA, d)).unwrap();
        assert_eq!(&ram.data.borrow()[base + 20 * 512 - 8..base + 20 * 512], &[0xee; 8]);
        let e = wait(&sim, |d| top.pwrite(vec![1; 1], 20 * 512, Flags::NONE, d)).unwrap_err();
        assert_eq!(e.errno, Errno::NoSpc, "the shim above confines writes to the partition");
        wait(&sim, |d| top.zero(512, 0, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.trim(512, 512, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.cache(512, 1024, Flags::NONE, d)).unwrap();
        let e = wait(&sim, |d| top.extents(1024, 0, Flags::NONE, d)).unwrap();
        assert_eq!(e.total(), 20 * 512, "described up to the partition's end, not the disk's");
        let tail = ram.calls()[ram.calls().len() - 5..].to_vec();
        assert_eq!(
            tail,
            [
                format!("pwrite 8@{} flags=1", base + 20 * 512 - 8),
                format!("zero 512@{base} flags=0"),
                format!("trim 512@{} flags=0", base + 512),
                format!("cache 512@{}", base + 1024),
                format!("extents 1024@{base}"),
            ]
        );
    }

    fn gpt_disk(type_guid_zero_for_2: bool) -> Rc<Ram> {
        Ram::with(1 << 20, |r| {
            let d = r.data.get_mut();
            d[..34 * 512].fill(0);
            // Protective MBR, then the GPT header at LBA 1 with 128 entries of 128 bytes at LBA 2.
            mbr_set(d, 0, 0, 0xee, 1, 2047);
            d[512..520].copy_from_slice(b"EFI PART");
            put64(d, 512 + 72, 2);
            put32(d, 512 + 80, 128);
            put32(d, 512 + 84, 128);
            for (i, (first, last)) in [(34u64, 99u64), (100, 1999)].iter().enumerate() {
                let at = 1024 + i * 128;
                if !(i == 1 && type_guid_zero_for_2) {
                    d[at..at + 16].fill(0xaf);
                }
                put64(d, at + 32, *first);
                put64(d, at + 40, *last);
            }
        })
    }

    #[test]
    fn gpt_partitions() {
        assert_eq!(geometry(gpt_disk(false), "1").unwrap().0, 66 * 512);
        assert_eq!(geometry(gpt_disk(false), "2").unwrap().0, 1900 * 512);
        let e = geometry_err(gpt_disk(true), "2");
        assert!(e.message.unwrap().contains("GPT partition 2 not found"));
        let e = geometry_err(gpt_disk(false), "129");
        assert!(e.message.unwrap().contains("out of range"));
    }

    #[test]
    fn broken_tables_are_errors_not_panics() {
        let blank = Ram::with(1 << 20, |r| r.data.get_mut().fill(0));
        let e = geometry_err(blank, "1");
        assert!(e.message.unwrap().contains("does not contain an MBR or GPT"));
        let tiny = Ram::new(1000);
        assert!(geometry_err(tiny, "1").message.unwrap().contains("too small"));
        // A primary partition past the end of the disk.
        let past = Ram::with(1 << 20, |r| mbr_set(r.data.get_mut(), 0, 0, 0x83, 2000, 100));
        assert!(geometry_err(past, "1").message.unwrap().contains("outside the disk"));
        // An EBR chain that loops back.
        let looping = Ram::with(1 << 20, |r| {
            let d = r.data.get_mut();
            mbr_set(d, 0, 0, 0x0f, 32, 200);
            mbr_set(d, 32 * 512, 0, 0x83, 2, 10);
            mbr_set(d, 32 * 512, 1, 0x05, 0, 40);
        });
        assert!(geometry_err(looping, "6").message.unwrap().contains("invalid EBR chain"));
        // GPT entries pointing past the disk, and absurd LBAs.
        let bad = gpt_disk(false);
        put64(&mut bad.data.borrow_mut(), 512 + 72, u64::MAX / 256);
        assert!(geometry(bad, "1").is_err());
        let bad = gpt_disk(false);
        put64(&mut bad.data.borrow_mut(), 1024 + 40, 10);
        assert!(geometry_err(bad, "1").message.unwrap().contains("bad LBAs"));
    }

    /// The layer below completes reads only after a timer, like the file backend.
    struct Slow {
        inner: Rc<Ram>,
        sched: blocksmith_core::sched::Sched,
    }

    impl Layer for Slow {
        fn info(&self) -> ExportInfo {
            self.inner.info()
        }
        fn pread(&self, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
            let inner = self.inner.clone();
            self.sched.after(Duration::from_millis(1), move || inner.pread(buf, offset, flags, done));
        }
        fn pwrite(&self, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
            self.inner.pwrite(data, offset, flags, done)
        }
    }

    #[test]
    fn asynchronous_below_opens_once_the_table_is_read() {
        let sim = SimScheduler::new();
        let ram = mbr_disk();
        let slow: Rc<dyn Layer> = Rc::new(Slow { inner: ram.clone(), sched: sim.sched() });
        let f = configure(&SPEC, &[("partition", "5")]);
        let got = Rc::new(RefCell::new(None));
        let g = got.clone();
        f.open_async(&cx(&sim), Shim::new(slow, false), Done::new(move |r| *g.borrow_mut() = Some(r)));
        assert!(got.borrow().is_none(), "waits for the table");
        sim.run_until_idle();
        let top = got.borrow_mut().take().expect("opened").expect("partition 5 exists");
        assert_eq!(top.info().size, 10 * 512);
        let b = wait(&sim, |d| top.pread(vec![0; 4], 0, Flags::NONE, d)).unwrap();
        assert_eq!(b, ram.data.borrow()[34 * 512..34 * 512 + 4]);
        // A synchronous open over a layer that answers later says so rather than guessing.
        let slow: Rc<dyn Layer> = Rc::new(Slow { inner: ram.clone(), sched: sim.sched() });
        assert!(f.open(&cx(&sim), Shim::new(slow, false)).is_err());
        sim.run_until_idle();
    }

    #[test]
    fn bad_parameters_are_rejected_clearly() {
        assert!(make_err(&SPEC, &[]).contains("you must supply the partition parameter"));
        assert!(make_err(&SPEC, &[("partition", "0")]).contains("invalid partition number 0"));
        assert!(make_err(&SPEC, &[("partition", "x")]).contains("could not parse partition number 'x'"));
        assert!(make_err(&SPEC, &[("partition", "-1")]).contains("could not parse"));
    }
}
