//! A configured stack: filters (nearest the client first) over one backend. Opening it for a
//! connection opens the backend, then each filter from the bottom up, with a [`Shim`] above
//! every layer.

use std::rc::Rc;
use std::sync::Arc;

use super::registry::{BackendFactory, ExportDesc, FilterFactory};
use super::shim::Shim;
use super::{Done, Layer, OpenCx};
use crate::error::NbdError;

#[derive(Clone)]
pub struct Stack {
    /// Filters in command-line order: `filters[0]` is nearest the client.
    pub filters: Vec<(String, Arc<dyn FilterFactory>)>,
    pub backend: (String, Arc<dyn BackendFactory>),
}

impl Stack {
    pub fn new(
        backend: (String, Arc<dyn BackendFactory>),
        filters: Vec<(String, Arc<dyn FilterFactory>)>,
    ) -> Self {
        Stack { filters, backend }
    }

    /// Open the whole stack for one connection. `done` gets the top shim, the layer the
    /// connection talks to; `cx.readonly` (the server's `-r`) is enforced there.
    pub fn open(&self, cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        // Each layer is opened with the export name the filter above it chose (top-down), so
        // keep the context each filter saw.
        let mut contexts = Vec::with_capacity(self.filters.len());
        let mut below = cx.clone();
        for (_, f) in &self.filters {
            let name = match f.export_name(&below, &below.export_name) {
                Ok(n) => n,
                Err(e) => return done.err(e),
            };
            contexts.push(below.clone());
            below.export_name = name;
        }
        let filters = self.filters.clone();
        let readonly = cx.readonly;
        self.backend.1.open(
            &below,
            Done::new(move |r: Result<Rc<dyn Layer>, NbdError>| {
                let r = r.and_then(|backend| {
                    // A shim above every layer; the topmost also applies the server's `-r`.
                    let top = filters.len();
                    let mut layer: Rc<dyn Layer> = Shim::new(backend, top == 0 && readonly);
                    for (depth, ((_, f), fcx)) in filters.iter().zip(&contexts).enumerate().rev() {
                        layer = match f.open(fcx, layer.clone()) {
                            Ok(l) => Shim::new(l, depth == 0 && readonly),
                            Err(e) => {
                                // What is already open below must hear that it is closed.
                                layer.close();
                                return Err(e);
                            }
                        };
                    }
                    Ok(layer)
                });
                done.call(r)
            }),
        )
    }

    /// The export list as the client sees it, after every filter has had its say.
    pub fn list_exports(&self) -> Vec<ExportDesc> {
        let mut list = self.backend.1.list_exports();
        for (_, f) in self.filters.iter().rev() {
            list = f.list_exports(list);
        }
        list
    }
}
