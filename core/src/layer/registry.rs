//! How backends and filters make themselves known. Each backend or filter crate exports a table
//! of specs; the binary puts the tables together. Adding a layer never touches the core.

use std::rc::Rc;
use std::sync::Arc;

use super::{Done, Layer, Next, OpenCx, Peer};
use crate::config::Params;
use crate::error::{ConfigError, NbdError};

/// One `key=value` parameter a layer accepts, with its `--help` line.
#[derive(Clone, Copy, Debug)]
pub struct ParamSpec {
    pub name: &'static str,
    pub help: &'static str,
}

/// An export a backend offers (answers NBD_OPT_LIST).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportDesc {
    pub name: String,
    pub description: Option<String>,
}

impl ExportDesc {
    pub fn default_export() -> Self {
        ExportDesc { name: String::new(), description: None }
    }
}

/// A configured backend, shared by every event loop.
pub trait BackendFactory: Send + Sync {
    /// Open a per-connection instance. May complete later (an upstream server, a script).
    fn open(&self, cx: &OpenCx, done: Done<Rc<dyn Layer>>);
    /// The exports to list; the default is the single default export "".
    fn list_exports(&self) -> Vec<ExportDesc> {
        vec![ExportDesc::default_export()]
    }
    /// A client has just connected (see [`FilterFactory::preconnect`]).
    fn preconnect(&self, peer: &Peer) -> Result<(), NbdError> {
        let _ = peer;
        Ok(())
    }
}

/// A configured filter, shared by every event loop.
pub trait FilterFactory: Send + Sync {
    /// Make this filter's per-connection instance over `next` (already open).
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError>;
    /// Open, completing later: for a filter that must ask the layer below something first
    /// (`partition` reads the partition table). The default completes at once with
    /// [`FilterFactory::open`]; a filter overriding this may implement `open` as an error.
    fn open_async(&self, cx: &OpenCx, next: Next, done: Done<Rc<dyn Layer>>) {
        done.call(self.open(cx, next))
    }
    /// Rewrite the export list coming from below.
    fn list_exports(&self, below: Vec<ExportDesc>) -> Vec<ExportDesc> {
        below
    }
    /// The same, for a particular client (a filter that lists differently for TLS clients);
    /// the default ignores the client.
    fn list_exports_for(&self, peer: &Peer, below: Vec<ExportDesc>) -> Vec<ExportDesc> {
        let _ = peer;
        self.list_exports(below)
    }
    /// A client has just connected, before it says anything (nbdkit's `preconnect`): refuse it
    /// with an error and the server closes the connection at once. Called top-down; the default
    /// accepts.
    fn preconnect(&self, peer: &Peer) -> Result<(), NbdError> {
        let _ = peer;
        Ok(())
    }
    /// The export name the layers below this filter are opened with, given the name this
    /// filter was asked for. Called top-down before anything is opened; an error refuses the
    /// export (the client sees NBD_REP_ERR_UNKNOWN with the message).
    fn export_name(&self, cx: &OpenCx, name: &str) -> Result<String, NbdError> {
        let _ = cx;
        Ok(name.to_string())
    }
}

pub type MakeBackend = fn(&mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError>;
pub type MakeFilter = fn(&mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError>;

/// A backend kind: its name on the command line, its parameters and its constructor.
pub struct BackendSpec {
    pub name: &'static str,
    /// One line for listings.
    pub summary: &'static str,
    /// A bare `VALUE` on the command line means `magic=VALUE` (nbdkit's magic config key).
    pub magic: Option<&'static str>,
    pub params: &'static [ParamSpec],
    /// Takes its own keys from `Params`; keys left over are reported as unknown.
    pub make: MakeBackend,
}

/// A filter kind. Its constructor takes only its own keys and leaves the rest for the layers
/// below, as nbdkit does.
pub struct FilterSpec {
    pub name: &'static str,
    pub summary: &'static str,
    pub params: &'static [ParamSpec],
    pub make: MakeFilter,
}

fn help_text(kind: &str, name: &str, summary: &str, magic: Option<&str>, params: &[ParamSpec]) -> String {
    let mut s = format!("{kind} {name}: {summary}\n");
    if let Some(m) = magic {
        s.push_str(&format!("  (a bare VALUE on the command line means {m}=VALUE)\n"));
    }
    if params.is_empty() {
        s.push_str("  no parameters\n");
    }
    for p in params {
        s.push_str(&format!("  {}=...\n      {}\n", p.name, p.help.replace('\n', "\n      ")));
    }
    s
}

impl BackendSpec {
    pub fn help(&self) -> String {
        help_text("backend", self.name, self.summary, self.magic, self.params)
    }
}

impl FilterSpec {
    pub fn help(&self) -> String {
        help_text("filter", self.name, self.summary, None, self.params)
    }
}
