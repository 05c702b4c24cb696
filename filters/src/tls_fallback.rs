//! The tls-fallback filter (nbdkit-tls-fallback-filter): with `--tls=on`, clients that did not
//! negotiate TLS see a small read-only disk holding a message (`tlsreadme=`), whatever export
//! they asked for; TLS clients see the real export. A gentler refusal than `--tls=require`.
//!
//! One difference from nbdkit: there a plaintext connection never opens the plugin, while here
//! the stack opens the layers below for every connection, so a plaintext client opens the
//! default export below (its requested name is replaced by "") and this filter then serves
//! the message without ever passing a request down. Put this filter first, as nbdkit advises,
//! so the filters in between do as little as possible for plaintext clients.

use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, NbdError};
use blocksmith_core::layer::registry::ExportDesc;
use blocksmith_core::layer::{
    Done, ExportInfo, FilterFactory, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec, Peer,
};

pub const SPEC: FilterSpec = FilterSpec {
    name: "tls-fallback",
    summary: "serve a readme instead of the export to clients without TLS (--tls=on)",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[ParamSpec {
    name: "tlsreadme",
    help: "The text plaintext clients read, padded with zero bytes to a multiple of 512\n\
           (default: \"This NBD server requires TLS authentication before it will serve\n\
           useful data.\").",
}];

const DEFAULT_README: &str =
    "This NBD server requires TLS authentication before it will serve useful data.\n";

/// The fallback disk is whole sectors, as nbdkit's is.
const SECTOR: usize = 512;

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let text = p.take("tlsreadme").unwrap_or_else(|| DEFAULT_README.to_string());
    Ok(Arc::new(Factory { disk: Arc::new(readme_disk(&text)) }))
}

fn readme_disk(text: &str) -> Vec<u8> {
    let mut disk = text.as_bytes().to_vec();
    let padded = disk.len().div_ceil(SECTOR).max(1) * SECTOR;
    disk.resize(padded, 0);
    disk
}

struct Factory {
    disk: Arc<Vec<u8>>,
}

impl FilterFactory for Factory {
    fn export_name(&self, cx: &OpenCx, name: &str) -> Result<String, NbdError> {
        // A plaintext client learns nothing about the exports below: whatever it asked for,
        // the layers below open their default.
        Ok(if cx.is_tls { name.to_string() } else { String::new() })
    }

    fn list_exports_for(&self, peer: &Peer, below: Vec<ExportDesc>) -> Vec<ExportDesc> {
        // Nor does it see the real export names in a listing: only the default export, which
        // for it is the readme.
        if peer.is_tls {
            below
        } else {
            vec![ExportDesc::default_export()]
        }
    }

    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        if cx.is_tls {
            return Ok(next);
        }
        Ok(Rc::new(Readme { disk: self.disk.clone(), next }))
    }
}

/// What a plaintext client gets: the message, read-only. Nothing reaches `next`, which is only
/// held so it is closed with this connection.
struct Readme {
    disk: Arc<Vec<u8>>,
    next: Next,
}

impl Layer for Readme {
    fn info(&self) -> ExportInfo {
        ExportInfo::read_only(self.disk.len() as u64)
    }

    fn pread(&self, mut buf: Vec<u8>, offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        // The shim above has checked the range against our size.
        let range = usize::try_from(offset)
            .ok()
            .and_then(|s| Some(s..s.checked_add(buf.len())?))
            .filter(|r| r.end <= self.disk.len());
        match range {
            Some(r) => {
                buf.copy_from_slice(&self.disk[r]);
                done.ok(buf)
            }
            None => done.err(NbdError::inval("read beyond the end of the readme")),
        }
    }

    fn close(&self) {
        self.next.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, open, wait, Ram};
    use blocksmith_core::layer::shim::Shim;
    use blocksmith_core::sched::SimScheduler;

    fn read_all(layer: &Rc<Shim>, sim: &SimScheduler) -> Vec<u8> {
        let size = layer.info().size as usize;
        wait(sim, |d| layer.pread(vec![0; size], 0, Flags::NONE, d)).expect("read")
    }

    #[test]
    fn plaintext_clients_read_the_readme() {
        let sim = SimScheduler::new();
        let f = configure(&SPEC, &[("tlsreadme", "use TLS")]);
        let mut c = cx(&sim);
        c.export_name = "secret".into();
        assert_eq!(f.export_name(&c, "secret").unwrap(), "", "the requested name is not passed down");
        let ram = Ram::new(1 << 20);
        let layer = open(&f, &c, ram.clone()).expect("open");
        let info = layer.info();
        assert_eq!(info.size, 512);
        assert!(!info.can_write && !info.can_trim && !info.can_extents);
        let data = read_all(&layer, &sim);
        assert_eq!(&data[..7], b"use TLS");
        assert!(data[7..].iter().all(|&b| b == 0));
        assert!(ram.calls().iter().all(|c| !c.starts_with("pread")), "nothing reaches the real export");
    }

    #[test]
    fn tls_clients_see_the_export() {
        let sim = SimScheduler::new();
        let f = configure(&SPEC, &[]);
        let mut c = cx(&sim);
        c.is_tls = true;
        assert_eq!(f.export_name(&c, "secret").unwrap(), "secret");
        let layer = open(&f, &c, Ram::new(4096)).expect("open");
        assert_eq!(layer.info().size, 4096);
        assert_eq!(read_all(&layer, &sim)[..3], [0, 1, 2]);
    }

    #[test]
    fn readme_sizes() {
        assert_eq!(readme_disk("").len(), 512);
        assert_eq!(readme_disk(DEFAULT_README).len(), 512);
        assert_eq!(readme_disk(&"x".repeat(513)).len(), 1024);
    }
}
