//! blocksmith backends: the plugins at the bottom of a layer stack, one module each.
//!
//! Every module exports a `SPEC` ([`BackendSpec`]): its name, `--help` text, magic key and
//! constructor. The constructor takes its own keys from `Params`, calls `params.finish(name)`
//! so an unknown key is an error, and opens whatever must exist (a file, a shared RAM store) at
//! configuration time so mistakes show at start-up rather than at the first connection.
//!
//! Adding a backend = adding a module and a row in [`REGISTRY`].

// `unsafe` is confined to system-call wrappers (`file::sys`, which `split` uses too, and `script::sys`),
// which opt back in; each block there must say why it is sound.
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

use blocksmith_core::layer::BackendSpec;

pub mod data;
pub mod eval;
pub mod file;
pub mod full;
pub mod info;
pub mod memory;
pub mod nbd;
pub mod null;
pub mod ones;
pub mod partitioning;
pub mod pattern;
pub mod random;
pub mod sh;
pub mod sparse_random;
pub mod split;
pub mod zero;

mod constant;
mod util;
// Shared machinery of sh and eval; its `sys` submodule opts back in to `unsafe`.
mod script;

#[cfg(test)]
mod testutil;

/// Every backend this crate provides, in `--help` listing order.
static REGISTRY: &[BackendSpec] = &[
    data::SPEC,
    eval::SPEC,
    file::SPEC,
    full::SPEC,
    info::SPEC,
    memory::SPEC,
    nbd::SPEC,
    null::SPEC,
    ones::SPEC,
    partitioning::SPEC,
    pattern::SPEC,
    random::SPEC,
    sh::SPEC,
    sparse_random::SPEC,
    split::SPEC,
    zero::SPEC,
];

/// The backend table the binary looks names up in.
pub fn registry() -> &'static [BackendSpec] {
    REGISTRY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_documented() {
        let mut names: Vec<_> = registry().iter().map(|b| b.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), registry().len());
        for b in registry() {
            assert!(!b.summary.is_empty(), "{} has no summary", b.name);
            for p in b.params {
                assert!(!p.help.is_empty(), "{}: {} has no help", b.name, p.name);
            }
            // The magic key must be one of the documented parameters.
            if let Some(m) = b.magic {
                assert!(b.params.iter().any(|p| p.name == m), "{}: magic {m} undocumented", b.name);
            }
            assert!(b.help().contains(b.name));
        }
    }
}
