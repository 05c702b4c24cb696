//! blocksmith filters, named and configured as nbdkit's are.
//!
//! Each filter is one module exporting a `SPEC` ([`FilterSpec`]); [`registry`] lists them. Adding
//! a filter means adding a module and a row to the table, nothing else.

use blocksmith_core::layer::FilterSpec;

pub mod delay;
pub mod log;
pub mod offset;

#[cfg(test)]
pub(crate) mod testutil;

static REGISTRY: [FilterSpec; 3] = [delay::SPEC, log::SPEC, offset::SPEC];

/// Every filter this crate provides, by name.
pub fn registry() -> &'static [FilterSpec] {
    &REGISTRY
}

#[cfg(test)]
mod tests {
    use super::*;
    use blocksmith_core::config::Params;

    #[test]
    fn registry_names_are_unique_and_documented() {
        let names: Vec<&str> = registry().iter().map(|s| s.name).collect();
        assert_eq!(names, ["delay", "log", "offset"]);
        for spec in registry() {
            assert!(!spec.summary.is_empty());
            assert!(!spec.params.is_empty());
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
