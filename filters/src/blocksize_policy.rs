//! The blocksize-policy filter (nbdkit-blocksize-policy-filter): advertise block size
//! constraints (NBD_INFO_BLOCK_SIZE) the layer below does not, and optionally reject requests
//! that break them with EINVAL before they reach it.
//!
//! Unset values come from the layer below, or, if it advertises nothing, from defaults (minimum
//! 1, preferred 4096, maximum 4G-1), as nbdkit computes them. `blocksize-write-disconnect=N`
//! drops a client that writes more than N at once, as nbdkit does: the write fails with
//! ESHUTDOWN and the connection is closed at once (`OpenCx::disconnect`, forced). When another
//! constraint is configured but no maximum, the advertised maximum becomes N rounded down to the
//! minimum.

use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::{parse_size, Params};
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{
    BlockSize, Disconnect, Done, ExportInfo, Extents, Filter, FilterFactory, FilterLayer, FilterSpec, Flags,
    Layer, Next, OpenCx, ParamSpec,
};

pub const SPEC: FilterSpec = FilterSpec {
    name: "blocksize-policy",
    summary: "advertise block size constraints; optionally reject requests breaking them",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "blocksize-error-policy",
        help: "allow (default): pass requests that break the constraints down anyway;\n\
               error: fail them with EINVAL.",
    },
    ParamSpec { name: "blocksize-minimum", help: "Minimum block size, a power of 2 <= 64K." },
    ParamSpec { name: "blocksize-preferred", help: "Preferred block size, a power of 2 from 512 to 32M." },
    ParamSpec {
        name: "blocksize-maximum",
        help: "Maximum request size, a multiple of the minimum (or -1 for 4G-1).",
    },
    ParamSpec {
        name: "blocksize-write-disconnect",
        help: "Writes larger than this fail with ESHUTDOWN (nbdkit also disconnects the client).",
    },
];

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Config {
    minimum: Option<u32>,
    preferred: Option<u32>,
    maximum: Option<u32>,
    disconnect: Option<u32>,
    error_policy: bool,
}

fn size_param(p: &mut Params, key: &str) -> Result<Option<u32>, ConfigError> {
    let Some(v) = p.take(key) else { return Ok(None) };
    let err =
        || ConfigError::new(format!("blocksize-policy: {key}: could not parse '{v}' (a size up to 4G-1)"));
    if key == "blocksize-maximum" && v.trim() == "-1" {
        return Ok(Some(u32::MAX));
    }
    let n = parse_size(&v).map_err(|_| err())?;
    u32::try_from(n).map(Some).map_err(|_| err())
}

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let error_policy = match p.take("blocksize-error-policy").as_deref() {
        None | Some("allow") => false,
        Some("error") => true,
        Some(other) => {
            return Err(ConfigError::new(format!(
                "blocksize-policy: unknown blocksize-error-policy '{other}' (allow or error)"
            )))
        }
    };
    let c = Config {
        minimum: size_param(p, "blocksize-minimum")?,
        preferred: size_param(p, "blocksize-preferred")?,
        maximum: size_param(p, "blocksize-maximum")?,
        disconnect: size_param(p, "blocksize-write-disconnect")?,
        error_policy,
    };
    check(&c).map_err(|m| ConfigError::new(format!("blocksize-policy: {m}")))?;
    Ok(Arc::new(PolicyFactory(c)))
}

/// The checks nbdkit makes of the configured values. Zero counts as unset, as in nbdkit.
fn check(c: &Config) -> Result<(), String> {
    let set = |v: Option<u32>| v.filter(|v| *v != 0);
    if let Some(m) = set(c.minimum) {
        if !m.is_power_of_two() {
            return Err(format!("blocksize-minimum must be a power of 2 (got {m})"));
        }
        if m > 65536 {
            return Err(format!("blocksize-minimum must be <= 64K (got {m})"));
        }
    }
    if let Some(p) = set(c.preferred) {
        if !p.is_power_of_two() {
            return Err(format!("blocksize-preferred must be a power of 2 (got {p})"));
        }
        if !(512..=32 * 1024 * 1024).contains(&p) {
            return Err(format!("blocksize-preferred must be between 512 and 32M (got {p})"));
        }
    }
    if let (Some(min), Some(max)) = (set(c.minimum), set(c.maximum)) {
        if max != u32::MAX && max % min != 0 {
            return Err(format!(
                "blocksize-maximum must be -1 or a multiple of blocksize-minimum (got {max})"
            ));
        }
    }
    if let (Some(min), Some(pref)) = (set(c.minimum), set(c.preferred)) {
        if min > pref {
            return Err(format!("blocksize-minimum ({min}) must be <= blocksize-preferred ({pref})"));
        }
    }
    if let (Some(pref), Some(max)) = (set(c.preferred), set(c.maximum)) {
        if pref > max {
            return Err(format!("blocksize-preferred ({pref}) must be <= blocksize-maximum ({max})"));
        }
    }
    if let (Some(min), Some(d)) = (set(c.minimum), set(c.disconnect)) {
        if d <= min {
            return Err(format!(
                "blocksize-write-disconnect ({d}) must be larger than blocksize-minimum ({min})"
            ));
        }
    }
    Ok(())
}

/// The constraints to advertise given what the layer below advertises, as nbdkit computes them.
fn constraints(c: &Config, below: Option<BlockSize>) -> Result<Option<BlockSize>, NbdError> {
    let set = |v: Option<u32>| v.filter(|v| *v != 0);
    let (min, pref, max) = (set(c.minimum), set(c.preferred), set(c.maximum));
    let b = match (min, pref, max, below) {
        (Some(minimum), Some(preferred), Some(maximum), _) => BlockSize { minimum, preferred, maximum },
        (None, None, None, below) => return Ok(below),
        (_, _, _, None) => {
            let minimum = min.unwrap_or(1);
            let maximum = max.or_else(|| set(c.disconnect).map(|d| d - d % minimum)).unwrap_or(u32::MAX);
            BlockSize { minimum, preferred: pref.unwrap_or(4096), maximum }
        }
        (_, _, _, Some(b)) => BlockSize {
            minimum: min.unwrap_or(b.minimum),
            preferred: pref.unwrap_or(b.preferred),
            maximum: max.unwrap_or(b.maximum),
        },
    };
    if b.minimum > b.preferred || b.preferred > b.maximum {
        return Err(NbdError::inval(format!(
            "blocksize-policy: computed block size values are invalid: minimum {} > preferred {} or \
             preferred > maximum {}",
            b.minimum, b.preferred, b.maximum
        )));
    }
    Ok(Some(b))
}

struct PolicyFactory(Config);

impl FilterFactory for PolicyFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        // Computed once: the layer below's answer is fixed for the connection.
        let block_size = constraints(&self.0, next.info().block_size)?;
        let filter = PolicyFilter {
            block_size,
            error_policy: self.0.error_policy,
            disconnect: self.0.disconnect,
            client: cx.disconnect.clone(),
        };
        Ok(Rc::new(FilterLayer { filter, next }))
    }
}

struct PolicyFilter {
    block_size: Option<BlockSize>,
    error_policy: bool,
    disconnect: Option<u32>,
    /// Drops this filter's client (for `blocksize-write-disconnect`).
    client: Disconnect,
}

impl PolicyFilter {
    /// With the error policy, a request must be at least the minimum, a multiple of it, aligned
    /// to it, and (reads and writes only) no larger than the maximum. EINVAL, as the NBD spec
    /// says, and the layer below never sees it.
    fn check(&self, what: &str, data: bool, count: u64, offset: u64) -> Result<(), NbdError> {
        let Some(b) = self.block_size.filter(|_| self.error_policy) else { return Ok(()) };
        let (min, max) = (u64::from(b.minimum.max(1)), u64::from(b.maximum));
        let why = if count < min {
            format!("count {count} is smaller than minimum size {min}")
        } else if data && count > max {
            format!("count {count} is larger than maximum size {max}")
        } else if count.checked_rem(min) != Some(0) {
            format!("count {count} is not a multiple of minimum size {min}")
        } else if offset.checked_rem(min) != Some(0) {
            format!("offset {offset} is not aligned to a multiple of minimum size {min}")
        } else {
            return Ok(());
        };
        Err(NbdError::inval(format!("blocksize-policy: client {what} request rejected: {why}")))
    }
}

impl Filter for PolicyFilter {
    fn info(&self, next: &Next) -> ExportInfo {
        ExportInfo { block_size: self.block_size, ..next.info() }
    }

    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        match self.check("pread", true, buf.len() as u64, offset) {
            Ok(()) => next.pread(buf, offset, flags, done),
            Err(e) => done.err(e),
        }
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let count = data.len() as u64;
        if let Some(d) = self.disconnect.filter(|d| *d != 0 && count > u64::from(*d)) {
            ::log::warn!(
                "blocksize-policy: oversize write request ({count} > {d} bytes); disconnecting the client"
            );
            self.client.request(true);
            return done.err(NbdError::msg(
                Errno::Shutdown,
                format!("blocksize-policy: write of {count} bytes is larger than blocksize-write-disconnect ({d})"),
            ));
        }
        match self.check("pwrite", true, count, offset) {
            Ok(()) => next.pwrite(data, offset, flags, done),
            Err(e) => done.err(e),
        }
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.check("zero", false, count, offset) {
            Ok(()) => next.zero(count, offset, flags, done),
            Err(e) => done.err(e),
        }
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.check("trim", false, count, offset) {
            Ok(()) => next.trim(count, offset, flags, done),
            Err(e) => done.err(e),
        }
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.check("cache", false, count, offset) {
            Ok(()) => next.cache(count, offset, flags, done),
            Err(e) => done.err(e),
        }
    }

    fn extents(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        match self.check("extents", false, count, offset) {
            Ok(()) => next.extents(count, offset, flags, done),
            Err(e) => done.err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::sched::SimScheduler;

    fn bs(minimum: u32, preferred: u32, maximum: u32) -> Option<BlockSize> {
        Some(BlockSize { minimum, preferred, maximum })
    }

    fn advertised(params: &[(&str, &str)], below: Option<BlockSize>) -> Option<BlockSize> {
        let sim = SimScheduler::new();
        let ram = Ram::with(1 << 20, |r| r.info.block_size = below);
        open(&configure(&SPEC, params), &cx(&sim), ram).map(|l| l.info().block_size).ok().flatten()
    }

    #[test]
    fn constraints_follow_nbdkit() {
        assert_eq!(advertised(&[], None), None);
        assert_eq!(advertised(&[], bs(512, 4096, 1 << 20)), bs(512, 4096, 1 << 20));
        assert_eq!(advertised(&[("blocksize-preferred", "32K")], None), bs(1, 32768, u32::MAX));
        assert_eq!(
            advertised(&[("blocksize-minimum", "4k")], bs(512, 8192, 1 << 20)),
            bs(4096, 8192, 1 << 20)
        );
        assert_eq!(
            advertised(
                &[("blocksize-minimum", "512"), ("blocksize-preferred", "4k"), ("blocksize-maximum", "1M")],
                bs(1, 512, 4096)
            ),
            bs(512, 4096, 1 << 20)
        );
        assert_eq!(
            advertised(&[("blocksize-minimum", "512"), ("blocksize-write-disconnect", "65000")], None),
            bs(512, 4096, 64512)
        );
        assert_eq!(advertised(&[("blocksize-maximum", "-1")], None), bs(1, 4096, u32::MAX));
        // Inconsistent with what the layer below says: the open fails.
        let sim = SimScheduler::new();
        let ram = Ram::with(1 << 20, |r| r.info.block_size = bs(512, 4096, 8192));
        let e =
            open(&configure(&SPEC, &[("blocksize-preferred", "64k")]), &cx(&sim), ram).err().expect("fails");
        assert!(e.message.unwrap().contains("computed block size values are invalid"));
    }

    #[test]
    fn error_policy_rejects_misaligned_and_oversized_requests() {
        let sim = SimScheduler::new();
        let ram = Ram::new(1 << 20);
        let f = configure(
            &SPEC,
            &[
                ("blocksize-error-policy", "error"),
                ("blocksize-minimum", "512"),
                ("blocksize-maximum", "64k"),
            ],
        );
        let top = open(&f, &cx(&sim), ram.clone()).unwrap();
        for (count, offset) in [(100u64, 0u64), (512, 100), (1000, 0), (128 << 10, 0)] {
            let e = wait(&sim, |d| top.pread(vec![0; count as usize], offset, Flags::NONE, d)).unwrap_err();
            assert_eq!(e.errno, Errno::Inval, "{count}@{offset}");
            let e = wait(&sim, |d| top.pwrite(vec![0; count as usize], offset, Flags::NONE, d)).unwrap_err();
            assert_eq!(e.errno, Errno::Inval, "{count}@{offset}");
        }
        // Zero and trim are not bound by the maximum (they carry no data), only by alignment.
        wait(&sim, |d| top.zero(128 << 10, 0, Flags::NONE, d)).unwrap();
        assert_eq!(wait(&sim, |d| top.trim(100, 512, Flags::NONE, d)).unwrap_err().errno, Errno::Inval);
        assert_eq!(wait(&sim, |d| top.cache(512, 1, Flags::NONE, d)).unwrap_err().errno, Errno::Inval);
        assert_eq!(wait(&sim, |d| top.extents(10, 0, Flags::NONE, d)).unwrap_err().errno, Errno::Inval);
        wait(&sim, |d| top.pread(vec![0; 1024], 512, Flags::NONE, d)).unwrap();
        assert_eq!(ram.calls(), ["zero 131072@0 flags=0", "pread 1024@512"]);

        // The default policy passes everything down.
        let top = open(&configure(&SPEC, &[("blocksize-minimum", "512")]), &cx(&sim), ram.clone()).unwrap();
        wait(&sim, |d| top.pread(vec![0; 3], 1, Flags::NONE, d)).unwrap();
    }

    #[test]
    fn write_disconnect_fails_oversized_writes() {
        let sim = SimScheduler::new();
        let ram = Ram::new(1 << 20);
        let c = cx(&sim);
        let top = open(&configure(&SPEC, &[("blocksize-write-disconnect", "4k")]), &c, ram).unwrap();
        assert_eq!(top.info().block_size, None, "alone it changes nothing advertised, as in nbdkit");
        wait(&sim, |d| top.pwrite(vec![0; 4096], 0, Flags::NONE, d)).unwrap();
        assert_eq!(c.disconnect.requested(), None);
        let e = wait(&sim, |d| top.pwrite(vec![0; 8192], 0, Flags::NONE, d)).unwrap_err();
        assert_eq!(e.errno, Errno::Shutdown);
        assert_eq!(c.disconnect.requested(), Some(true), "the client is dropped at once");
    }

    #[test]
    fn bad_parameters_are_rejected_clearly() {
        assert!(make_err(&SPEC, &[("blocksize-error-policy", "maybe")])
            .contains("unknown blocksize-error-policy"));
        assert!(make_err(&SPEC, &[("blocksize-minimum", "1000")]).contains("must be a power of 2"));
        assert!(make_err(&SPEC, &[("blocksize-minimum", "128k")]).contains("<= 64K"));
        assert!(make_err(&SPEC, &[("blocksize-preferred", "256")]).contains("between 512 and 32M"));
        assert!(
            make_err(&SPEC, &[("blocksize-minimum", "4k"), ("blocksize-maximum", "6k")]).contains("multiple")
        );
        assert!(make_err(&SPEC, &[("blocksize-minimum", "8k"), ("blocksize-preferred", "4k")]).contains("<="));
        assert!(make_err(&SPEC, &[("blocksize-preferred", "8k"), ("blocksize-maximum", "4k")]).contains("<="));
        assert!(make_err(&SPEC, &[("blocksize-minimum", "4k"), ("blocksize-write-disconnect", "4k")])
            .contains("larger than"));
        assert!(make_err(&SPEC, &[("blocksize-maximum", "8G")]).contains("could not parse"));
    }
}
