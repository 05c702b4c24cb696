//! `partitioning`: a partitioned disk made from files, one partition each, with a generated MBR
//! or GPT partition table (nbdkit-partitioning-plugin). The layout is nbdkit 1.32's, byte for
//! byte, except the GPT partitions' unique GUIDs, which are random in both.
//!
//! The disk is a list of regions: the partition table, then for each file optional zero padding
//! up to its alignment, the file, and zero padding to a whole 512-byte sector; for GPT the backup
//! table at the end. With MBR and more than four files, files 4 onwards are logical partitions
//! in an extended partition, each preceded by its extended boot record (EBR).
//!
//! `mbr-id=`, `type-guid=` and `alignment=` apply to the files given after them, so the order of
//! parameters matters.
//!
//! Clients may read everything and write the partitions freely; writing anything different to
//! the partition tables, or anything but zeroes to the padding, fails with EIO (nothing of the
//! request is written then). Partition data is read and written on the blocking pool.
//!
//! Differences from nbdkit, on purpose: a file that cannot be opened read-write is served
//! read-only (nbdkit refuses to start); an alignment that is not a power of two is refused at
//! start-up (nbdkit would abort on an assertion).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use blocksmith_core::config::Params;
use blocksmith_core::error::Errno;
use blocksmith_core::layer::{
    BackendFactory, BackendSpec, Done, ExportInfo, Flags, Layer, OpenCx, ParamSpec, Support,
};
use blocksmith_core::sched::Sched;
use blocksmith_core::{ConfigError, NbdError};

use crate::random::Xoshiro;
use crate::util;

const NAME: &str = "partitioning";

pub const SPEC: BackendSpec = BackendSpec {
    name: NAME,
    summary:
        "partitioned disk built from files, with a virtual MBR or GPT table (nbdkit-partitioning-plugin)",
    magic: Some("file"),
    params: &[
        ParamSpec {
            name: "file",
            help: "(required, repeatable) A regular, non-empty file holding one partition. Partitions\n\
                   appear in the order given.",
        },
        ParamSpec {
            name: "partition-type",
            help: "mbr (or dos) or gpt. Default: gpt if there are more than 4 files or they add up to\n\
                   more than MBR can address (about 2 TB), else mbr. MBR with more than 4 files puts\n\
                   files 4 onwards in an extended partition.",
        },
        ParamSpec {
            name: "alignment",
            help: "Alignment of the following partitions: a power of two from 512 to 1M (default 1M).",
        },
        ParamSpec {
            name: "mbr-id",
            help: "MBR partition type byte of the following partitions, e.g. 0x82, or 'default' (0x83).",
        },
        ParamSpec {
            name: "type-guid",
            help: "GPT partition type GUID of the following partitions, or 'default'\n\
                   (0FC63DAF-8483-4772-8E79-3D69D8477DE4, Linux filesystem).",
        },
    ],
    make,
};

const SECTOR: u64 = 512;
const MAX_ALIGNMENT: u64 = 2048 * SECTOR;
const DEFAULT_MBR_ID: u8 = 0x83;
const DEFAULT_TYPE_GUID: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
/// nbdkit's estimate of the largest disk MBR can describe: 2^32 sectors less some padding.
const MAX_MBR_DISK_SIZE: u64 = u32::MAX as u64 * SECTOR - 5 * MAX_ALIGNMENT;
/// GPT partition entries come in groups of 128 (the UEFI minimum), 128 bytes each.
const GPT_MIN_PARTITIONS: u64 = 128;
const GPT_ENTRY_SIZE: u64 = 128;
/// The GPT header's size as nbdkit declares it (and covers by the header CRC): its 92 bytes of
/// fields plus the 4 bytes of padding its C struct has. UEFI allows any size from 92 to a sector.
const GPT_HEADER_SIZE: usize = 96;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PartType {
    Mbr,
    Gpt,
}

/// A partition's file and the settings in force when it was named.
struct Part {
    /// As given on the command line (GPT partition names are made from it, as nbdkit does).
    name: String,
    file: File,
    size: u64,
    alignment: u64,
    mbr_id: u8,
    type_guid: [u8; 16],
    unique_guid: [u8; 16],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A generated table: index into `Layout::tables`.
    Table(usize),
    /// A partition: index into the files.
    File(usize),
    Zero,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Region {
    start: u64,
    len: u64,
    kind: Kind,
}

impl Region {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The virtual disk: contiguous regions from 0 and the tables they refer to.
struct Layout {
    regions: Vec<Region>,
    tables: Vec<Vec<u8>>,
    size: u64,
}

impl Layout {
    fn push(&mut self, len: u64, kind: Kind) {
        if len > 0 {
            self.regions.push(Region { start: self.size, len, kind });
            self.size += len;
        }
    }

    /// Zero padding up to a multiple of `align` (a power of two).
    fn pad_to(&mut self, align: u64) {
        let r = self.size & (align - 1);
        if r != 0 {
            self.push(align - r, Kind::Zero);
        }
    }

    fn table(&mut self, bytes: u64) -> Kind {
        self.tables.push(vec![0; bytes as usize]);
        Kind::Table(self.tables.len() - 1)
    }

    fn region_of(&self, kind: Kind) -> Region {
        // Every table and file is in the layout by construction.
        self.regions.iter().copied().find(|r| r.kind == kind).unwrap_or(Region { start: 0, len: 0, kind })
    }

    /// The index of the region holding `offset` (which is within the disk).
    fn find(&self, offset: u64) -> usize {
        self.regions.partition_point(|r| r.end() <= offset)
    }
}

/// GPT: entries in the partition table array, and the sectors the array takes.
fn gpt_pta(nfiles: usize) -> (u64, u64) {
    let entries = (nfiles as u64).div_ceil(GPT_MIN_PARTITIONS) * GPT_MIN_PARTITIONS;
    (entries, entries * GPT_ENTRY_SIZE / SECTOR)
}

/// Lay the disk out and generate its tables.
fn build(parts: &[Part], ptype: PartType) -> Result<Layout, String> {
    let n = parts.len();
    let mut l = Layout { regions: Vec::new(), tables: Vec::new(), size: 0 };
    let (pta_entries, pta_lbas) = gpt_pta(n);
    let primary = match ptype {
        PartType::Mbr => l.table(SECTOR),
        PartType::Gpt => l.table((2 + pta_lbas) * SECTOR),
    };
    l.push(l.tables[0].len() as u64, primary);
    let mut ebrs = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if ptype == PartType::Mbr && n > 4 && i >= 3 {
            let ebr = l.table(SECTOR);
            l.push(SECTOR, ebr);
            ebrs.push(ebr);
        }
        l.pad_to(p.alignment);
        l.push(p.size, Kind::File(i));
        l.pad_to(SECTOR);
    }
    let secondary = if ptype == PartType::Gpt {
        let t = l.table((pta_lbas + 1) * SECTOR);
        l.push((pta_lbas + 1) * SECTOR, t);
        Some(t)
    } else {
        None
    };
    if l.size > i64::MAX as u64 {
        return Err("the disk would be larger than 2^63-1 bytes".into());
    }
    match (ptype, secondary) {
        (PartType::Gpt, Some(secondary)) => {
            gpt_tables(&mut l, parts, primary, secondary, pta_entries, pta_lbas);
        }
        _ => mbr_tables(&mut l, parts, primary, &ebrs)?,
    }
    Ok(l)
}

fn table_index(k: Kind) -> usize {
    match k {
        Kind::Table(t) => t,
        _ => 0,
    }
}

/// An MBR partition entry (16 bytes) for `len` bytes from byte `start` (both relative to
/// whatever the entry is relative to). CHS fields are "too large", as nbdkit writes them.
fn mbr_entry(out: &mut [u8], start: u64, len: u64, bootable: bool, id: u8) -> Result<(), String> {
    let start_sector = u32::try_from(start / SECTOR);
    let sectors = u32::try_from(len.div_ceil(SECTOR));
    let (Ok(start_sector), Ok(sectors)) = (start_sector, sectors) else {
        return Err("the disk is too large for an MBR partition table: use partition-type=gpt".into());
    };
    // CHS 1023/254/63 (head 254; sector 63 with cylinder bits 8-9; cylinder bits 0-7): "beyond
    // what CHS can say, use the LBA fields".
    let chs = [0xfe, 0xff, 0xff];
    out[0] = if bootable { 0x80 } else { 0 };
    out[1..4].copy_from_slice(&chs);
    out[4] = id;
    out[5..8].copy_from_slice(&chs);
    out[8..12].copy_from_slice(&start_sector.to_le_bytes());
    out[12..16].copy_from_slice(&sectors.to_le_bytes());
    Ok(())
}

fn mbr_tables(l: &mut Layout, parts: &[Part], primary: Kind, ebrs: &[Kind]) -> Result<(), String> {
    let size = l.size;
    let file = |l: &Layout, i: usize| l.region_of(Kind::File(i));
    let mut mbr = std::mem::take(&mut l.tables[table_index(primary)]);
    mbr[0x1fe] = 0x55;
    mbr[0x1ff] = 0xaa;
    let primaries = if parts.len() <= 4 { parts.len() } else { 3 };
    for (i, p) in parts.iter().enumerate().take(primaries) {
        let r = file(l, i);
        mbr_entry(&mut mbr[0x1be + 16 * i..0x1be + 16 * (i + 1)], r.start, r.len, i == 0, p.mbr_id)?;
    }
    if parts.len() > 4 {
        // The 4th entry is the extended partition: from the first EBR to the end of the disk.
        let ext = l.region_of(ebrs[0]);
        mbr_entry(&mut mbr[0x1ee..0x1fe], ext.start, size - ext.start, false, 0x0f)?;
        for (k, &e) in ebrs.iter().enumerate() {
            let i = k + 3;
            let this = l.region_of(e);
            let r = file(l, i);
            let mut ebr = std::mem::take(&mut l.tables[table_index(e)]);
            ebr[0x1fe] = 0x55;
            ebr[0x1ff] = 0xaa;
            // Entry 1: the logical partition, relative to this EBR.
            mbr_entry(&mut ebr[0x1be..0x1ce], r.start - this.start, r.len, false, parts[i].mbr_id)?;
            // Entry 2: the next EBR, relative to the extended partition, covering that EBR and
            // its partition.
            if let Some(&next) = ebrs.get(k + 1) {
                let nx = l.region_of(next);
                let nr = file(l, i + 1);
                mbr_entry(&mut ebr[0x1ce..0x1de], nx.start - ext.start, nr.end() - nx.start, false, 0x0f)?;
            }
            l.tables[table_index(e)] = ebr;
        }
    }
    l.tables[table_index(primary)] = mbr;
    Ok(())
}

/// The CRC-32 UEFI uses (the zlib/Ethernet one).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// The partition table array: one entry per file, the rest zero.
fn gpt_entries(l: &Layout, parts: &[Part], out: &mut [u8]) {
    for (i, p) in parts.iter().enumerate() {
        let r = l.region_of(Kind::File(i));
        let e = &mut out[i * GPT_ENTRY_SIZE as usize..(i + 1) * GPT_ENTRY_SIZE as usize];
        e[..16].copy_from_slice(&p.type_guid);
        e[16..32].copy_from_slice(&p.unique_guid);
        e[32..40].copy_from_slice(&(r.start / SECTOR).to_le_bytes());
        e[40..48].copy_from_slice(&((r.end() - 1) / SECTOR).to_le_bytes());
        // Attribute bit 2, "legacy BIOS bootable", on the first partition.
        let attrs: u64 = if i == 0 { 4 } else { 0 };
        e[48..56].copy_from_slice(&attrs.to_le_bytes());
        // The name is the file name as given, if shorter than 36 bytes, each byte widened to a
        // UTF-16 unit: what nbdkit does (its check for non-ASCII bytes never fires).
        if p.name.len() < 36 {
            for (k, &c) in p.name.as_bytes().iter().enumerate() {
                e[56 + 2 * k] = c;
            }
        }
    }
}

fn gpt_header(out: &mut [u8], pta: &[u8], primary: bool, nr_lbas: u64, entries: u64, pta_lbas: u64) {
    let h = &mut out[..GPT_HEADER_SIZE];
    h.fill(0);
    h[..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&[0, 0, 1, 0]); // revision 1.0
    h[12..16].copy_from_slice(&(GPT_HEADER_SIZE as u32).to_le_bytes());
    let (current, backup, pta_lba) =
        if primary { (1, nr_lbas - 1, 2) } else { (nr_lbas - 1, 1, nr_lbas - pta_lbas - 1) };
    h[24..32].copy_from_slice(&current.to_le_bytes());
    h[32..40].copy_from_slice(&backup.to_le_bytes());
    h[40..48].copy_from_slice(&(2 + pta_lbas).to_le_bytes());
    h[48..56].copy_from_slice(&(nr_lbas - pta_lbas - 2).to_le_bytes());
    // Bytes 56..72, the disk GUID, stay zero as in nbdkit 1.32.
    h[72..80].copy_from_slice(&pta_lba.to_le_bytes());
    h[80..84].copy_from_slice(&(entries as u32).to_le_bytes());
    h[84..88].copy_from_slice(&(GPT_ENTRY_SIZE as u32).to_le_bytes());
    h[88..92].copy_from_slice(&crc32(pta).to_le_bytes());
    // Computed last, over the header with this field zero.
    let crc = crc32(h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
}

fn gpt_tables(l: &mut Layout, parts: &[Part], primary: Kind, secondary: Kind, entries: u64, pta_lbas: u64) {
    let nr_lbas = l.size / SECTOR;
    let pta_bytes = (entries * GPT_ENTRY_SIZE) as usize;
    let mut pta = vec![0u8; pta_bytes];
    gpt_entries(l, parts, &mut pta);

    let mut p = std::mem::take(&mut l.tables[table_index(primary)]);
    // LBA 0: the protective MBR, one 0xee partition over the whole disk (or as much as MBR can
    // say).
    let end = (l.size - 1).min(u64::from(u32::MAX) * SECTOR);
    // Cannot fail: the start is sector 1 and the length at most 2^32-1 sectors.
    let _ = mbr_entry(&mut p[0x1be..0x1ce], SECTOR, end - SECTOR + 1, false, 0xee);
    p[0x1fe] = 0x55;
    p[0x1ff] = 0xaa;
    // LBA 1: the header; LBA 2 on: the array.
    p[2 * SECTOR as usize..2 * SECTOR as usize + pta_bytes].copy_from_slice(&pta);
    gpt_header(&mut p[SECTOR as usize..], &pta, true, nr_lbas, entries, pta_lbas);
    l.tables[table_index(primary)] = p;

    // At the end: the backup array, then the backup header in the last sector.
    let mut s = std::mem::take(&mut l.tables[table_index(secondary)]);
    s[..pta_bytes].copy_from_slice(&pta);
    gpt_header(&mut s[pta_bytes..], &pta, false, nr_lbas, entries, pta_lbas);
    l.tables[table_index(secondary)] = s;
}

/// Parse a GUID `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX` (optionally in braces) into GPT's byte
/// order: the first three groups little-endian, the last two as written.
fn parse_guid(s: &str) -> Option<[u8; 16]> {
    let s = s.strip_prefix('{').and_then(|t| t.strip_suffix('}')).unwrap_or(s);
    let b = s.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let hex: Vec<u8> = b.iter().filter(|&&c| c != b'-').copied().collect();
    if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let byte = |i: usize| -> u8 {
        let d = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
        d(hex[2 * i]) << 4 | d(hex[2 * i + 1])
    };
    let order = [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15];
    let mut out = [0u8; 16];
    for (k, &i) in order.iter().enumerate() {
        out[k] = byte(i);
    }
    Some(out)
}

fn make(params: &mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    let err = |m: String| ConfigError::new(format!("{NAME}: {m}"));
    // mbr-id, type-guid and alignment apply to the files after them: walk the parameters in
    // command-line order (Params hands out values per key, in order; the key sequence says how
    // they interleave).
    const ORDERED: [&str; 4] = ["file", "alignment", "mbr-id", "type-guid"];
    let order: Vec<String> = params.keys().filter(|k| ORDERED.contains(k)).map(str::to_string).collect();
    let mut values: Vec<std::collections::VecDeque<String>> =
        ORDERED.iter().map(|k| params.take_all(k).into()).collect();
    let ptype = match params.take("partition-type") {
        None => None,
        Some(t) => match t.to_ascii_lowercase().as_str() {
            "mbr" | "dos" => Some(PartType::Mbr),
            "gpt" => Some(PartType::Gpt),
            _ => return Err(err(format!("unknown partition-type '{t}' (expected mbr or gpt)"))),
        },
    };
    params.finish(NAME)?;

    let default_guid = parse_guid(DEFAULT_TYPE_GUID).unwrap_or_default();
    let (mut alignment, mut mbr_id, mut type_guid) = (MAX_ALIGNMENT, DEFAULT_MBR_ID, default_guid);
    // Unique partition GUIDs: random, as nbdkit's (which seeds with the time only; adding the
    // process id and nanoseconds keeps two servers started in the same second apart).
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut rng =
        Xoshiro::new(now.as_secs() ^ u64::from(now.subsec_nanos()) << 32 ^ u64::from(std::process::id()));
    let mut parts = Vec::new();
    let mut writable = true;
    for key in order {
        let idx = ORDERED.iter().position(|k| *k == key).unwrap_or(0);
        let Some(v) = values[idx].pop_front() else { continue };
        match key.as_str() {
            "alignment" => {
                let a = blocksmith_core::config::parse_size(&v)
                    .map_err(|e| err(format!("alignment: {}", e.0)))?;
                if !(SECTOR..=MAX_ALIGNMENT).contains(&a) || !a.is_power_of_two() {
                    return Err(err(format!(
                        "alignment {a} must be a power of two from {SECTOR} to {MAX_ALIGNMENT}"
                    )));
                }
                alignment = a;
            }
            "mbr-id" => {
                mbr_id = if v.eq_ignore_ascii_case("default") {
                    DEFAULT_MBR_ID
                } else {
                    util::parse_u8("mbr-id", &v).map_err(|e| util::named(NAME, e))?
                }
            }
            "type-guid" => {
                type_guid = if v.eq_ignore_ascii_case("default") {
                    default_guid
                } else {
                    parse_guid(&v).ok_or_else(|| err(format!("could not parse GUID '{v}'")))?
                }
            }
            _ => {
                let meta = std::fs::metadata(&v).map_err(|e| err(format!("{v}: {e}")))?;
                if !meta.is_file() {
                    return Err(err(format!("{v} is not a regular file")));
                }
                let file = match OpenOptions::new().read(true).write(true).open(&v) {
                    Ok(f) => f,
                    Err(e) => {
                        log::debug!("{NAME}: cannot open {v} read-write ({e}): the export is read-only");
                        writable = false;
                        File::open(&v).map_err(|e| err(format!("cannot open {v}: {e}")))?
                    }
                };
                let size = file.metadata().map_err(|e| err(format!("{v}: {e}")))?.len();
                if size == 0 {
                    return Err(err(format!("{v}: zero length partitions are not allowed")));
                }
                let mut unique_guid = [0u8; 16];
                for b in unique_guid.iter_mut() {
                    *b = rng.next_u64() as u8;
                }
                parts.push(Part { name: v, file, size, alignment, mbr_id, type_guid, unique_guid });
            }
        }
    }
    if parts.is_empty() {
        return Err(err("at least one file= is required".into()));
    }
    let total = parts.iter().fold(0u64, |t, p| t.saturating_add(p.size));
    // Room for the tables and the worst-case padding, so laying out cannot overflow.
    let overhead = (parts.len() as u64 + 1).saturating_mul(MAX_ALIGNMENT + 2 * SECTOR) + (64 << 20);
    if total.saturating_add(overhead) > i64::MAX as u64 {
        return Err(err(format!("the files add up to {total} bytes, too large for a disk (2^63-1)")));
    }
    let needs_gpt = total > MAX_MBR_DISK_SIZE;
    let ptype = match ptype {
        None if needs_gpt || parts.len() > 4 => PartType::Gpt,
        None => PartType::Mbr,
        Some(PartType::Mbr) if needs_gpt => {
            return Err(err(format!(
                "MBR supports a disk of at most about 2 TB, but the {} file(s) add up to {total} \
                 bytes (> {MAX_MBR_DISK_SIZE}): use partition-type=gpt",
                parts.len()
            )))
        }
        Some(t) => t,
    };
    let layout = build(&parts, ptype).map_err(err)?;
    log::debug!("{NAME}: {ptype:?}, {} partitions, {} bytes", parts.len(), layout.size);
    let files = parts.into_iter().map(|p| p.file).collect();
    Ok(Arc::new(PartitioningFactory { shared: Arc::new(Shared { layout, files, writable }) }))
}

struct Shared {
    layout: Layout,
    files: Vec<File>,
    writable: bool,
}

fn io_error(op: &str, e: &io::Error) -> NbdError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return NbdError::io(format!("{op}: unexpected end of file"));
    }
    let mut n = NbdError::from_io(e);
    n.message = Some(format!("{op}: {e}"));
    n
}

impl Shared {
    /// Call `f` with each region a request touches: the region, the offset within it, the
    /// offset within the request and the length.
    fn each(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&Region, u64, usize, usize) -> Result<(), NbdError>,
    ) -> Result<(), NbdError> {
        let regions = &self.layout.regions;
        let mut i = self.layout.find(offset);
        let mut at = 0u64;
        while at < len {
            let Some(r) = regions.get(i) else {
                return Err(NbdError::io("request beyond the last region"));
            };
            let pos = offset + at;
            let n = (r.end() - pos).min(len - at);
            f(r, pos - r.start, at as usize, n as usize)?;
            at += n;
            i += 1;
        }
        Ok(())
    }

    /// Whether a request touches any partition (and so needs the blocking pool).
    fn touches_files(&self, offset: u64, len: u64) -> bool {
        let regions = &self.layout.regions;
        let first = self.layout.find(offset);
        regions[first.min(regions.len())..]
            .iter()
            .take_while(|r| r.start < offset + len)
            .any(|r| matches!(r.kind, Kind::File(_)))
    }

    fn read(&self, mut buf: Vec<u8>, offset: u64) -> Result<Vec<u8>, NbdError> {
        let len = buf.len() as u64;
        self.each(offset, len, |r, within, at, n| {
            let dst = &mut buf[at..at + n];
            match r.kind {
                Kind::Table(t) => {
                    dst.copy_from_slice(&self.layout.tables[t][within as usize..within as usize + n])
                }
                Kind::Zero => dst.fill(0),
                Kind::File(i) => {
                    self.files[i].read_exact_at(dst, within).map_err(|e| io_error("pread", &e))?
                }
            }
            Ok(())
        })?;
        Ok(buf)
    }

    fn write(&self, data: &[u8], offset: u64) -> Result<(), NbdError> {
        let len = data.len() as u64;
        // Check the table and padding parts first, so a refused request writes nothing.
        self.each(offset, len, |r, within, at, n| {
            let src = &data[at..at + n];
            match r.kind {
                Kind::Table(t) if src != &self.layout.tables[t][within as usize..within as usize + n] => {
                    Err(NbdError::msg(Errno::Io, "attempt to change partition table of virtual disk"))
                }
                Kind::Zero if !util::is_zero(src) => {
                    Err(NbdError::msg(Errno::Io, "write non-zeroes to padding region"))
                }
                _ => Ok(()),
            }
        })?;
        self.each(offset, len, |r, within, at, n| match r.kind {
            Kind::File(i) => {
                self.files[i].write_all_at(&data[at..at + n], within).map_err(|e| io_error("pwrite", &e))
            }
            _ => Ok(()),
        })
    }

    fn flush(&self) -> Result<(), NbdError> {
        for f in &self.files {
            f.sync_data().map_err(|e| io_error("fdatasync", &e))?;
        }
        Ok(())
    }
}

struct PartitioningFactory {
    shared: Arc<Shared>,
}

impl BackendFactory for PartitioningFactory {
    fn open(&self, cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        done.ok(Rc::new(PartitioningLayer {
            shared: self.shared.clone(),
            sched: cx.sched.clone(),
            can_write: self.shared.writable && !cx.readonly,
        }))
    }
}

struct PartitioningLayer {
    shared: Arc<Shared>,
    sched: Sched,
    can_write: bool,
}

impl Layer for PartitioningLayer {
    fn info(&self) -> ExportInfo {
        ExportInfo {
            can_write: self.can_write,
            can_flush: true,
            fua: Support::Emulate,
            zero: Support::Emulate,
            cache: Support::Emulate,
            can_multi_conn: true,
            ..ExportInfo::read_only(self.shared.layout.size)
        }
    }

    fn pread(&self, buf: Vec<u8>, offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        if !self.shared.touches_files(offset, buf.len() as u64) {
            // Only tables and padding: in memory, answered at once.
            return done.call(self.shared.read(buf, offset));
        }
        let sh = self.shared.clone();
        self.sched.blocking(move || sh.read(buf, offset), move |r| done.call(r))
    }

    fn pwrite(&self, data: Vec<u8>, offset: u64, _flags: Flags, done: Done<()>) {
        if !self.shared.touches_files(offset, data.len() as u64) {
            return done.call(self.shared.write(&data, offset));
        }
        let sh = self.shared.clone();
        self.sched.blocking(move || sh.write(&data, offset), move |r| done.call(r))
    }

    fn flush(&self, _flags: Flags, done: Done<()>) {
        let sh = self.shared.clone();
        self.sched.blocking(move || sh.flush(), move |r| done.call(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{make, make_err, open, Conn};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Files in a fresh directory, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Dir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let name = format!("bs-part-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
            let p = std::env::temp_dir().join(name);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn file(&self, name: &str, len: usize, byte: u8) -> String {
            let p = self.0.join(name);
            std::fs::write(&p, vec![byte; len]).unwrap();
            p.to_str().unwrap().to_string()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn le32(b: &[u8]) -> u32 {
        u32::from_le_bytes(b[..4].try_into().unwrap())
    }

    fn le64(b: &[u8]) -> u64 {
        u64::from_le_bytes(b[..8].try_into().unwrap())
    }

    fn conn(kv: &[(&str, &str)]) -> Conn {
        open(make(&SPEC, kv).unwrap(), false)
    }

    #[test]
    fn mbr_layout() {
        let d = Dir::new();
        let a = d.file("a", 1000, 0xaa);
        let b = d.file("b", 3000, 0xbb);
        let c = conn(&[("file", &a), ("mbr-id", "0x82"), ("alignment", "4096"), ("file", &b)]);
        // MBR, 1 MiB alignment for a, 4 KiB for b, both padded to whole sectors.
        let size = c.info().size;
        assert_eq!(size, 1048576 + 4096 + 3072);
        let mbr = c.read(512, 0).unwrap();
        assert_eq!(&mbr[0x1fe..], &[0x55, 0xaa]);
        let e1 = &mbr[0x1be..0x1ce];
        assert_eq!(&e1[..8], &[0x80, 0xfe, 0xff, 0xff, 0x83, 0xfe, 0xff, 0xff]);
        assert_eq!((le32(&e1[8..]), le32(&e1[12..])), (2048, 2));
        let e2 = &mbr[0x1ce..0x1de];
        assert_eq!((e2[0], e2[4], le32(&e2[8..]), le32(&e2[12..])), (0, 0x82, 2056, 6));
        assert!(mbr[0x1de..0x1fe].iter().all(|&x| x == 0));
        // Partition data, padding and the gap before the first partition.
        assert_eq!(c.read(1000, 1048576).unwrap(), vec![0xaa; 1000]);
        assert_eq!(c.read(3096, 1048576 + 1000).unwrap(), vec![0; 3096]);
        assert_eq!(c.read(3000, 1048576 + 4096).unwrap(), vec![0xbb; 3000]);
        assert_eq!(c.read(72, 1048576 + 4096 + 3000).unwrap(), vec![0; 72]);
        assert_eq!(c.read(10, 1048576 - 5).unwrap(), [0, 0, 0, 0, 0, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa]);
    }

    #[test]
    fn mbr_logical_partitions() {
        let d = Dir::new();
        let files: Vec<String> =
            (0..6).map(|i| d.file(&format!("f{i}"), 512 * (i + 1), i as u8 + 1)).collect();
        let mut kv = vec![("partition-type", "mbr"), ("alignment", "512")];
        kv.extend(files.iter().map(|f| ("file", f.as_str())));
        let c = conn(&kv);
        // MBR, f0..f2, then EBR+f3, EBR+f4, EBR+f5, all sector-aligned.
        let sectors = 1 + 1 + 2 + 3 + (1 + 4) + (1 + 5) + (1 + 6);
        assert_eq!(c.info().size, sectors * 512);
        let mbr = c.read(512, 0).unwrap();
        let ent = |t: &[u8], k: usize| {
            let e = &t[0x1be + 16 * k..0x1ce + 16 * k];
            (e[4], le32(&e[8..]), le32(&e[12..]))
        };
        assert_eq!(ent(&mbr, 0), (0x83, 1, 1));
        assert_eq!(ent(&mbr, 1), (0x83, 2, 2));
        assert_eq!(ent(&mbr, 2), (0x83, 4, 3));
        // The extended partition: from the first EBR (sector 7) to the end.
        assert_eq!(ent(&mbr, 3), (0x0f, 7, sectors as u32 - 7));
        let ebr1 = c.read(512, 7 * 512).unwrap();
        assert_eq!(&ebr1[0x1fe..], &[0x55, 0xaa]);
        assert_eq!(ent(&ebr1, 0), (0x83, 1, 4));
        // The next EBR is at sector 12, 5 into the extended partition, covering it and f4.
        assert_eq!(ent(&ebr1, 1), (0x0f, 5, 6));
        let ebr3 = c.read(512, 18 * 512).unwrap();
        assert_eq!(ent(&ebr3, 0), (0x83, 1, 6));
        assert_eq!(ent(&ebr3, 1), (0, 0, 0));
        assert_eq!(c.read(512 * 6, 19 * 512).unwrap(), vec![6; 512 * 6]);
    }

    #[test]
    fn gpt_layout() {
        let d = Dir::new();
        let a = d.file("a", 1000, 1);
        let b = d.file("b", 3000, 2);
        let guid = "{C12A7328-F81F-11D2-BA4B-00A0C93EC93B}";
        let c = conn(&[("file", &a), ("type-guid", guid), ("file", &b), ("partition-type", "GPT")]);
        let size = c.info().size;
        // Primary (34 sectors), pad to 1M, a (2 sectors), pad to 2M, b (6 sectors), backup (33).
        assert_eq!(size, (4096 + 6 + 33) * 512);
        let nr_lbas = size / 512;
        let head = c.read(34 * 512, 0).unwrap();
        // Protective MBR.
        assert_eq!(
            &head[0x1be..0x1ce],
            &[0, 0xfe, 0xff, 0xff, 0xee, 0xfe, 0xff, 0xff, 1, 0, 0, 0, 0x26, 0x10, 0, 0]
        );
        assert_eq!(&head[0x1fe..0x200], &[0x55, 0xaa]);
        let h = &head[512..1024];
        assert_eq!(&h[..16], b"EFI PART\0\0\x01\0\x60\0\0\0");
        assert_eq!(
            (le64(&h[24..]), le64(&h[32..]), le64(&h[40..]), le64(&h[48..])),
            (1, nr_lbas - 1, 34, nr_lbas - 34)
        );
        assert_eq!((le64(&h[72..]), le32(&h[80..]), le32(&h[84..])), (2, 128, 128));
        let pta = &head[1024..];
        assert_eq!(le32(&h[88..]), crc32(pta));
        let mut zeroed = h[..96].to_vec();
        zeroed[16..20].fill(0);
        assert_eq!(le32(&h[16..]), crc32(&zeroed));
        assert!(h[92..].iter().all(|&x| x == 0));
        // Entries.
        assert_eq!(&pta[..16], &parse_guid(DEFAULT_TYPE_GUID).unwrap());
        assert_eq!(&pta[..4], &[0xaf, 0x3d, 0xc6, 0x0f]);
        assert_eq!((le64(&pta[32..]), le64(&pta[40..]), le64(&pta[48..])), (2048, 2049, 4));
        assert_eq!(&pta[128..132], &[0x28, 0x73, 0x2a, 0xc1]);
        assert_eq!(&pta[136..144], &[0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b]);
        assert_eq!((le64(&pta[160..]), le64(&pta[168..]), le64(&pta[176..])), (4096, 4101, 0));
        assert_ne!(&pta[16..32], &pta[144..160], "unique GUIDs differ");
        // Names: the path as given, if short enough (ours are long: no name).
        assert!(pta[56..128].iter().all(|&x| x == 0) || a.len() < 36);
        // The backup: the same array, then a header pointing the other way.
        let tail = c.read(33 * 512, size - 33 * 512).unwrap();
        assert_eq!(&tail[..16384], pta);
        let bh = &tail[16384..];
        assert_eq!((le64(&bh[24..]), le64(&bh[32..]), le64(&bh[72..])), (nr_lbas - 1, 1, nr_lbas - 33));
        assert_eq!(le32(&bh[88..]), le32(&h[88..]));
        let mut zeroed = bh[..96].to_vec();
        zeroed[16..20].fill(0);
        assert_eq!(le32(&bh[16..]), crc32(&zeroed));
    }

    #[test]
    fn gpt_names_and_many_partitions() {
        let d = Dir::new();
        let names: Vec<String> = (0..130).map(|i| d.file(&format!("p{i}"), 512, i as u8)).collect();
        let mut kv = vec![("alignment", "512")];
        kv.extend(names.iter().map(|f| ("file", f.as_str())));
        let c = conn(&kv);
        // More than 4 files: GPT, with the array grown to 256 entries (64 sectors).
        let size = c.info().size;
        assert_eq!(size, (2 + 64 + 130 + 64 + 1) * 512);
        let h = c.read(512, 512).unwrap();
        assert_eq!((le32(&h[80..]), le64(&h[40..])), (256, 66));
        // A short relative name is stored as UTF-16.
        std::fs::write(d.0.join("x.img"), [9u8; 512]).unwrap();
        let mut e = [0u8; 128];
        let l = Layout {
            regions: vec![Region { start: 1024, len: 512, kind: Kind::File(0) }],
            tables: vec![],
            size: 4096,
        };
        let p = Part {
            name: "x.img".into(),
            file: File::open(d.0.join("x.img")).unwrap(),
            size: 512,
            alignment: 512,
            mbr_id: 0x83,
            type_guid: [0; 16],
            unique_guid: [0; 16],
        };
        gpt_entries(&l, std::slice::from_ref(&p), &mut e);
        assert_eq!(&e[56..66], b"x\0.\0i\0m\0g\0");
        assert_eq!(le64(&e[32..]), 2);
    }

    #[test]
    fn writes_only_change_partitions() {
        let d = Dir::new();
        let a = d.file("a", 1000, 1);
        let c = conn(&[("alignment", "512"), ("file", &a)]);
        assert_eq!(c.info().size, 1536);
        let i = c.info();
        assert!(i.can_write && i.can_flush && i.can_multi_conn && !i.can_trim && !i.can_extents);
        // Rewriting the table and zeroes to padding is fine; the partition takes anything.
        let all = c.read(1536, 0).unwrap();
        c.write(&all, 0, Flags::FUA).unwrap();
        c.write(&[7; 10], 600, Flags::NONE).unwrap();
        assert_eq!(std::fs::read(&a).unwrap()[88..98], [7; 10]);
        c.zero(1536 - 512, 512, Flags::NONE).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), vec![0; 1000]);
        // Changing the table or the padding fails, and writes nothing at all.
        let mut t = all[..512].to_vec();
        t[0x1be + 4] = 0x82;
        assert_eq!(c.write(&t, 0, Flags::NONE).unwrap_err().errno, Errno::Io);
        assert_eq!(c.write(&[5; 30], 1500, Flags::NONE).unwrap_err().errno, Errno::Io);
        assert_eq!(std::fs::read(&a).unwrap(), vec![0; 1000]);
        c.flush().unwrap();
        c.cache(1536, 0).unwrap();
        let ro = open(make(&SPEC, &[("file", &a)]).unwrap(), true);
        assert_eq!(ro.write(&[0], 600, Flags::NONE).unwrap_err().errno, Errno::Perm);
    }

    #[test]
    fn guids_and_crc() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        let g = parse_guid("0fc63daf-8483-4772-8e79-3d69d8477de4").unwrap();
        assert_eq!(
            g,
            [0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4]
        );
        for bad in [
            "",
            "0FC63DAF-8483-4772-8E79-3D69D8477DE",
            "0FC63DAF-8483-4772-8E793-D69D8477DE4",
            "{0FC63DAF-8483-4772-8E79-3D69D8477DE4",
            "0FC63DAF-8483-4772-8E79-3D69D8477DEG",
        ] {
            assert!(parse_guid(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn parameters() {
        let d = Dir::new();
        let a = d.file("a", 512, 1);
        let empty = d.file("e", 0, 0);
        assert!(make_err(&SPEC, &[]).contains("at least one file="));
        assert!(make_err(&SPEC, &[("file", &empty)]).contains("zero length"));
        assert!(make_err(&SPEC, &[("file", "/nonexistent")]).contains("/nonexistent"));
        assert!(make_err(&SPEC, &[("file", &a), ("partition-type", "bsd")]).contains("partition-type"));
        assert!(make_err(&SPEC, &[("alignment", "256"), ("file", &a)]).contains("alignment"));
        assert!(make_err(&SPEC, &[("alignment", "2M"), ("file", &a)]).contains("alignment"));
        assert!(make_err(&SPEC, &[("alignment", "1536"), ("file", &a)]).contains("power of two"));
        assert!(make_err(&SPEC, &[("mbr-id", "256"), ("file", &a)]).contains("mbr-id"));
        assert!(make_err(&SPEC, &[("type-guid", "x"), ("file", &a)]).contains("GUID"));
        assert!(make_err(&SPEC, &[("file", &a), ("bogus", "1")]).contains("unknown parameter 'bogus'"));
        // Settings apply to later files only; 'default' resets them.
        let c = conn(&[("file", &a), ("mbr-id", "0x0c"), ("file", &a), ("mbr-id", "default"), ("file", &a)]);
        let mbr = c.read(512, 0).unwrap();
        assert_eq!([mbr[0x1be + 4], mbr[0x1ce + 4], mbr[0x1de + 4]], [0x83, 0x0c, 0x83]);
    }
}
