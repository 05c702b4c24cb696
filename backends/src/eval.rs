//! `eval`: a script plugin written on the command line, one shell fragment per method
//! (nbdkit-eval-plugin): `blocksmith eval get_size='echo 64M' pread='dd ...'`.
//!
//! As nbdkit does, each fragment is saved as `$tmpdir/METHOD` and run by /bin/sh with the same
//! arguments as nbdkit-sh-plugin's methods; methods not given run `missing` (default `exit 2`);
//! `can_write`, `can_flush`, `can_trim`, `can_zero` and `can_extents` default to true when the
//! method they guard is given; other keys go to the `config` fragment. There is no `load`.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::layer::{BackendFactory, BackendSpec, ParamSpec};
use blocksmith_core::ConfigError;

use crate::script::{self, Programs, Runtime, ScriptBackend, TmpDir};

const NAME: &str = "eval";

/// The methods a fragment may be given for (nbdkit 1.32's list, less `missing`).
const METHODS: &[&str] = &[
    "after_fork",
    "block_size",
    "cache",
    "can_cache",
    "can_extents",
    "can_fast_zero",
    "can_flush",
    "can_fua",
    "can_multi_conn",
    "can_trim",
    "can_write",
    "can_zero",
    "close",
    "config",
    "config_complete",
    "default_export",
    "dump_plugin",
    "export_description",
    "extents",
    "flush",
    "get_ready",
    "get_size",
    "is_rotational",
    "list_exports",
    "open",
    "pread",
    "preconnect",
    "pwrite",
    "thread_model",
    "trim",
    "unload",
    "zero",
];

/// (method, the can_* answered "true" when only the method is given).
const IMPLIED: &[(&str, &str)] = &[
    ("pwrite", "can_write"),
    ("flush", "can_flush"),
    ("trim", "can_trim"),
    ("zero", "can_zero"),
    ("extents", "can_extents"),
];

pub const SPEC: BackendSpec = BackendSpec {
    name: NAME,
    summary: "a disk written as shell fragments on the command line, one per method (nbdkit-eval-plugin)",
    magic: None,
    params: &[
        ParamSpec {
            name: "METHOD",
            help: "A shell fragment for one method, run by /bin/sh with nbdkit-sh-plugin's arguments\n\
                   and exit codes, $tmpdir set. METHOD is one of: get_size, pread, pwrite, flush,\n\
                   trim, zero, extents, cache, open, close, can_write, can_flush, can_trim,\n\
                   can_zero, can_fast_zero, can_extents, can_fua, can_cache, can_multi_conn,\n\
                   is_rotational, block_size, export_description, list_exports, default_export,\n\
                   preconnect, config, config_complete, thread_model, get_ready, after_fork,\n\
                   unload, dump_plugin. Example: get_size='echo 64M'. Without a thread_model\n\
                   fragment, runs happen one at a time (serialize_all_requests), as in nbdkit.",
        },
        ParamSpec {
            name: "missing",
            help: "The fragment run for every method not given (default: exit 2, 'not implemented').",
        },
        script::COMMON_PARAMS[0],
        script::COMMON_PARAMS[1],
        ParamSpec { name: "KEY", help: "Any other KEY=VALUE is passed to the config fragment, in order." },
    ],
    make,
};

fn save(dir: &Path, method: &str, text: &str) -> Result<(), ConfigError> {
    let path = dir.join(method);
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o500).open(&path)?;
        f.write_all(text.as_bytes())?;
        if !text.is_empty() && !text.ends_with('\n') {
            f.write_all(b"\n")?;
        }
        Ok(())
    };
    write().map_err(|e| ConfigError::new(format!("eval: saving the {method} fragment: {e}")))
}

fn make(params: &mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    let settings = script::take_settings(params, NAME)?;
    let items = script::drain_params(params);
    let tmpdir =
        TmpDir::create(NAME).map_err(|e| ConfigError::new(format!("eval: cannot create $tmpdir: {e}")))?;
    let dir = tmpdir.path().to_path_buf();
    let mut defined = BTreeSet::new();
    let mut missing: Option<String> = None;
    let mut user = Vec::new();
    for (key, value) in items {
        if key == "missing" {
            if missing.replace(value).is_some() {
                return Err(ConfigError::new(
                    "eval: method missing defined more than once on the command line",
                ));
            }
        } else if METHODS.contains(&key.as_str()) {
            if !defined.insert(key.clone()) {
                return Err(ConfigError::new(format!(
                    "eval: method {key} defined more than once on the command line"
                )));
            }
            save(&dir, &key, &value)?;
        } else {
            user.push((key, value));
        }
    }
    save(&dir, "missing", missing.as_deref().unwrap_or("exit 2"))?;
    for (method, can) in IMPLIED {
        if defined.contains(*method) && !defined.contains(*can) {
            save(&dir, can, "exit 0")?;
            defined.insert(can.to_string());
        }
    }
    let mut rt = Runtime::new(NAME, Programs::Fragments { dir, defined }, tmpdir, &settings);
    // nbdkit passes keys that name no method to config as they come; here every fragment is
    // in place first, so config may be given after the keys it handles.
    for (key, value) in user {
        rt.config(&key, &value, |k| {
            format!("callback '{k}' is unknown, and there is no 'config' callback to handle it")
        })?;
    }
    rt.finish_config()?;
    Ok(Arc::new(ScriptBackend::new(rt)))
}
