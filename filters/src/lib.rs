//! blocksmith filters, named and configured as nbdkit's are.
//!
//! Each filter is one module exporting a `SPEC` ([`FilterSpec`]); [`registry`] lists them. Adding
//! a filter means adding a module and a row to the table, nothing else.

use blocksmith_core::layer::FilterSpec;

pub mod blocksize;
pub mod blocksize_policy;
pub mod cache;
pub mod checkwrite;
pub mod count;
pub mod cow;
pub mod delay;
pub mod error;
pub mod evil;
pub mod exitlast;
pub mod exitwhen;
pub mod exportname;
pub mod fua;
pub mod ip;
pub mod limit;
pub mod log;
pub mod multi_conn;
pub mod nocache;
pub mod noextents;
pub mod noparallel;
pub mod nozero;
pub mod offset;
pub mod partition;
pub mod protect;
pub mod rate;
pub mod readahead;
pub mod readonly;
pub mod scan;
pub mod stats;
pub mod swab;
pub mod time_limit;
pub mod tls_fallback;
pub mod truncate;

mod chunked;
mod overlay;
mod rng;
mod xlock;

#[cfg(test)]
pub(crate) mod testutil;

static REGISTRY: &[FilterSpec] = &[
    blocksize::SPEC,
    blocksize_policy::SPEC,
    cache::SPEC,
    checkwrite::SPEC,
    count::SPEC,
    cow::SPEC,
    delay::SPEC,
    error::SPEC,
    evil::SPEC,
    exitlast::SPEC,
    exitwhen::SPEC,
    exportname::SPEC,
    fua::SPEC,
    ip::SPEC,
    limit::SPEC,
    log::SPEC,
    multi_conn::SPEC,
    nocache::SPEC,
    noextents::SPEC,
    noparallel::SPEC,
    nozero::SPEC,
    offset::SPEC,
    partition::SPEC,
    protect::SPEC,
    rate::SPEC,
    readahead::SPEC,
    readonly::SPEC,
    scan::SPEC,
    stats::SPEC,
    swab::SPEC,
    time_limit::SPEC,
    tls_fallback::SPEC,
    truncate::SPEC,
];

/// Every filter this crate provides, by name.
pub fn registry() -> &'static [FilterSpec] {
    REGISTRY
}

#[cfg(test)]
mod tests {
    use super::*;
    use blocksmith_core::config::Params;

    #[test]
    fn registry_names_are_unique_and_documented() {
        let mut names: Vec<&str> = registry().iter().map(|s| s.name).collect();
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "duplicate filter names: {names:?}");
        for spec in registry() {
            assert!(!spec.summary.is_empty());
            // Some filters (noextents, checkwrite) take no parameters, as in nbdkit.
            let help = spec.help();
            for p in spec.params {
                assert!(help.contains(p.name), "{} help lacks {}", spec.name, p.name);
            }
        }
    }

    #[test]
    fn filters_leave_foreign_keys_for_the_layers_below() {
        let mut p = Params::new();
        p.push("size", "1M");
        p.push("rdelay", "10ms");
        p.push("offset", "4k");
        let delay = registry().iter().find(|s| s.name == "delay").expect("delay registered");
        assert!((delay.make)(&mut p).is_ok());
        assert_eq!(p.keys().collect::<Vec<_>>(), ["size", "offset"]);
        let offset = registry().iter().find(|s| s.name == "offset").expect("offset registered");
        assert!((offset.make)(&mut p).is_ok());
        assert_eq!(p.keys().collect::<Vec<_>>(), ["size"]);
    }
}
