//! The exportname filter (nbdkit-exportname-filter): change the export list clients see and
//! the names the layers below are opened with.
//!
//! - `default-export=NAME`: a client asking for the default export "" gets NAME from below.
//! - `exportname-list=`: what NBD_OPT_LIST answers — `keep` (what the layers below list, the
//!   default), `empty`, `defaultonly` (just the default export's name) or `explicit` (just the
//!   `exportname=` names).
//! - `exportname-strict=true`: only names given with `exportname=` may be opened.
//! - `exportname=NAME` (repeatable): names for `explicit` and `exportname-strict`.
//! - `exportdesc=`: descriptions — `keep` (default), `none` (hide them), `fixed:STRING`.
//!
//! Not supported, refused at start-up: `exportname-list=error` (an export list cannot fail from a
//! filter yet) and `exportdesc=script:` (it would run a script per export on the event loop).

use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::{parse_bool, Params};
use blocksmith_core::error::{ConfigError, NbdError};
use blocksmith_core::layer::registry::ExportDesc;
use blocksmith_core::layer::{
    Done, ExportInfo, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec,
    ReadData,
};

pub const SPEC: FilterSpec = FilterSpec {
    name: "exportname",
    summary: "change the export list and the export names seen by the layers below",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "default-export", help: "The export a client asking for the default (\"\") gets." },
    ParamSpec {
        name: "exportname-list",
        help: "Exports to list: keep (default), empty, defaultonly or explicit.",
    },
    ParamSpec {
        name: "exportname-strict",
        help: "true: clients may only open the exports given with exportname= (default false).",
    },
    ParamSpec { name: "exportname", help: "An export name to list or allow; may be repeated." },
    ParamSpec { name: "exportdesc", help: "Descriptions: keep (default), none, or fixed:STRING." },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListMode {
    Keep,
    Empty,
    DefaultOnly,
    Explicit,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Desc {
    Keep,
    None,
    Fixed(String),
}

impl Desc {
    fn apply(&self, below: Option<String>) -> Option<String> {
        match self {
            Desc::Keep => below,
            Desc::None => None,
            Desc::Fixed(s) => Some(s.clone()),
        }
    }
}

/// The last value of `key` or of its underscore spelling (nbdkit accepts both).
fn take2(p: &mut Params, key: &str) -> Option<String> {
    let a = p.take(key);
    let b = p.take(&key.replace('-', "_"));
    b.or(a)
}

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let default_export = take2(p, "default-export").filter(|s| !s.is_empty());
    let list = match take2(p, "exportname-list").as_deref() {
        None | Some("keep") => ListMode::Keep,
        Some("empty") => ListMode::Empty,
        Some("defaultonly") | Some("default-only") => ListMode::DefaultOnly,
        Some("explicit") => ListMode::Explicit,
        Some("error") => {
            return Err(ConfigError::new(
                "exportname: exportname-list=error is not supported: a filter cannot make the \
                 export list fail yet (use exportname-list=empty to hide the exports)",
            ))
        }
        Some(other) => {
            return Err(ConfigError::new(format!(
                "exportname: unrecognized exportname-list mode '{other}' (keep, empty, defaultonly, explicit)"
            )))
        }
    };
    let strict = match take2(p, "exportname-strict") {
        None => false,
        Some(v) => {
            parse_bool(&v).map_err(|e| ConfigError::new(format!("exportname: exportname-strict: {}", e.0)))?
        }
    };
    let exports = p.take_all("exportname");
    let desc = match p.take("exportdesc") {
        None => Desc::Keep,
        Some(v) if v == "keep" => Desc::Keep,
        Some(v) if v == "none" => Desc::None,
        Some(v) if v.starts_with("fixed:") => Desc::Fixed(v["fixed:".len()..].to_string()),
        Some(v) if v.starts_with("script:") => {
            return Err(ConfigError::new(
                "exportname: exportdesc=script: is not supported: export lists are answered on the \
                 event loop, which must not wait for a script",
            ))
        }
        Some(v) => {
            return Err(ConfigError::new(format!(
                "exportname: unrecognized exportdesc mode '{v}' (keep, none, fixed:STRING)"
            )))
        }
    };
    Ok(Arc::new(ExportnameFactory { default_export, list, strict, exports, desc }))
}

struct ExportnameFactory {
    default_export: Option<String>,
    list: ListMode,
    strict: bool,
    exports: Vec<String>,
    desc: Desc,
}

impl ExportnameFactory {
    fn allowed(&self, name: &str) -> bool {
        self.exports.iter().any(|e| e == name)
    }
}

impl FilterFactory for ExportnameFactory {
    fn list_exports(&self, below: Vec<ExportDesc>) -> Vec<ExportDesc> {
        let named = |name: &str| ExportDesc { name: name.to_string(), description: self.desc.apply(None) };
        match self.list {
            ListMode::Keep => below
                .into_iter()
                .map(|e| ExportDesc { description: self.desc.apply(e.description), name: e.name })
                .collect(),
            ListMode::Empty => Vec::new(),
            ListMode::DefaultOnly => {
                vec![ExportDesc { name: self.default_export.clone().unwrap_or_default(), description: None }]
            }
            ListMode::Explicit => self.exports.iter().map(|n| named(n)).collect(),
        }
    }

    fn export_name(&self, _cx: &OpenCx, name: &str) -> Result<String, NbdError> {
        // As nbdkit: with exportname-strict, "" may be opened only if it was listed; it then
        // resolves to the default export, which must be allowed too.
        if name.is_empty() && self.strict && !self.allowed("") {
            return Err(NbdError::inval(
                "exportname: the default export is not permitted (exportname-strict)",
            ));
        }
        let resolved = match (&self.default_export, name.is_empty()) {
            (Some(d), true) => d.clone(),
            _ => name.to_string(),
        };
        if self.strict && !self.allowed(&resolved) {
            return Err(NbdError::inval(format!("exportname: export '{resolved}' not found")));
        }
        Ok(resolved)
    }

    fn open(&self, _cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        if self.desc == Desc::Keep {
            return Ok(next);
        }
        Ok(Rc::new(FilterLayer { filter: Describe(self.desc.clone()), next }))
    }
}

/// Rewrites the description of the open export (NBD_INFO_DESCRIPTION).
struct Describe(Desc);

impl Filter for Describe {
    /// Read data passes through untouched: replies stay zero-copy.
    fn pread_lent(&self, next: &Next, count: usize, offset: u64, flags: Flags, done: Done<ReadData>) {
        next.pread_lent(count, offset, flags, done)
    }

    fn info(&self, next: &Next) -> ExportInfo {
        let below = next.info();
        ExportInfo { description: self.0.apply(below.description.clone()), ..below }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, Ram};
    use blocksmith_core::sched::SimScheduler;

    fn below() -> Vec<ExportDesc> {
        vec![
            ExportDesc { name: "a".into(), description: Some("disk a".into()) },
            ExportDesc { name: "b".into(), description: None },
        ]
    }

    fn names(v: &[ExportDesc]) -> Vec<&str> {
        v.iter().map(|e| e.name.as_str()).collect()
    }

    #[test]
    fn list_modes() {
        let f = configure(&SPEC, &[]);
        assert_eq!(f.list_exports(below()), below());
        let f = configure(&SPEC, &[("exportname-list", "empty")]);
        assert!(f.list_exports(below()).is_empty());
        let f = configure(&SPEC, &[("exportname-list", "defaultonly"), ("default-export", "b")]);
        assert_eq!(names(&f.list_exports(below())), ["b"]);
        let f =
            configure(&SPEC, &[("exportname_list", "explicit"), ("exportname", "x"), ("exportname", "y")]);
        assert_eq!(names(&f.list_exports(below())), ["x", "y"]);
        let f = configure(&SPEC, &[("exportdesc", "fixed:hello")]);
        assert!(f.list_exports(below()).iter().all(|e| e.description.as_deref() == Some("hello")));
        let f = configure(&SPEC, &[("exportdesc", "none")]);
        assert!(f.list_exports(below()).iter().all(|e| e.description.is_none()));
    }

    #[test]
    fn names_are_rewritten_and_checked() {
        let sim = SimScheduler::new();
        let c = cx(&sim);
        let f = configure(&SPEC, &[("default-export", "disk1")]);
        assert_eq!(f.export_name(&c, "").unwrap(), "disk1");
        assert_eq!(f.export_name(&c, "other").unwrap(), "other");
        let f = configure(&SPEC, &[("exportname-strict", "true"), ("exportname", "a"), ("exportname", "")]);
        assert_eq!(f.export_name(&c, "a").unwrap(), "a");
        assert_eq!(f.export_name(&c, "").unwrap(), "");
        assert!(f.export_name(&c, "b").unwrap_err().message.unwrap().contains("'b' not found"));
        let f = configure(&SPEC, &[("exportname-strict", "1"), ("exportname", "a")]);
        assert!(f.export_name(&c, "").is_err(), "default not listed");
    }

    #[test]
    fn description_of_the_open_export() {
        let sim = SimScheduler::new();
        let ram = Ram::with(4096, |r| r.info.description = Some("below".into()));
        let f = configure(&SPEC, &[("exportdesc", "fixed:mine")]);
        assert_eq!(f.open(&cx(&sim), ram.clone()).unwrap().info().description.as_deref(), Some("mine"));
        let f = configure(&SPEC, &[("exportdesc", "none")]);
        assert_eq!(f.open(&cx(&sim), ram.clone()).unwrap().info().description, None);
        let f = configure(&SPEC, &[]);
        assert_eq!(f.open(&cx(&sim), ram).unwrap().info().description.as_deref(), Some("below"));
    }

    #[test]
    fn unsupported_and_bad_modes_are_rejected() {
        assert!(make_err(&SPEC, &[("exportname-list", "error")]).contains("not supported"));
        assert!(make_err(&SPEC, &[("exportdesc", "script:ls")]).contains("not supported"));
        assert!(make_err(&SPEC, &[("exportname-list", "all")]).contains("unrecognized"));
        assert!(make_err(&SPEC, &[("exportname-strict", "perhaps")]).contains("exportname-strict"));
    }
}
