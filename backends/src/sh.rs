//! `sh`: a block device implemented by a script or any executable, run once per plugin method
//! (nbdkit-sh-plugin). Scripts written for nbdkit's sh plugin run unchanged.
//!
//! `blocksmith sh SCRIPT [KEY=VALUE...]`, or `blocksmith sh - <<'EOF' ... EOF` to read the
//! script from stdin. See [`crate::script`] for how runs are scheduled; this module only turns
//! the command line into a configured script.

use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::layer::{BackendFactory, BackendSpec, ParamSpec};
use blocksmith_core::ConfigError;

use crate::script::{self, Programs, Runtime, ScriptBackend, TmpDir};

const NAME: &str = "sh";

pub const SPEC: BackendSpec = BackendSpec {
    name: NAME,
    summary: "a disk implemented by a shell script or any executable, run per request (nbdkit-sh-plugin)",
    magic: Some("script"),
    params: &[
        ParamSpec {
            name: "script",
            help: "(required) The script or program: run as SCRIPT METHOD ARGS... for each plugin\n\
                   method, answering through its exit code (0 ok, 1 error with an errno name on\n\
                   stderr, 2 not implemented, 3 false), stdout and stderr, as nbdkit-sh-plugin.\n\
                   '-' reads the script from stdin. Each run gets $tmpdir, a private directory\n\
                   removed when the server exits. Further bare values go to the key the script's\n\
                   magic_config_key method prints. The script's thread_model is honoured; without\n\
                   one, runs happen one at a time (serialize_all_requests), as in nbdkit.",
        },
        script::COMMON_PARAMS[0],
        script::COMMON_PARAMS[1],
        ParamSpec {
            name: "KEY",
            help: "Any other KEY=VALUE is passed to the script as 'config KEY VALUE', in command-line\n\
                   order.",
        },
    ],
    make,
};

fn make(params: &mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    let settings = script::take_settings(params, NAME)?;
    let mut items = script::drain_params(params);
    let at = items.iter().position(|(k, _)| k == "script").ok_or_else(|| {
        ConfigError::new(
            "sh: no script given (usage: blocksmith sh SCRIPT [KEY=VALUE...], or sh - to read it from stdin)",
        )
    })?;
    let (_, script) = items.remove(at);
    let tmpdir =
        TmpDir::create(NAME).map_err(|e| ConfigError::new(format!("sh: cannot create $tmpdir: {e}")))?;
    let path = if script == "-" { inline_script(&tmpdir)? } else { script_path(&script)? };
    let mut rt = Runtime::new(NAME, Programs::Script(path), tmpdir, &settings);
    rt.load()?;
    let magic = rt.magic_config_key()?;
    for (key, value) in items {
        // Bare values arrive under this backend's magic key; they belong to the script's.
        let key = if key == "script" {
            magic.clone().ok_or_else(|| {
                ConfigError::new(format!(
                    "sh: unexpected parameter '{value}': the script has no magic_config_key, so give it as \
                     key=value"
                ))
            })?
        } else {
            key
        };
        rt.config(&key, &value, |_| "this plugin does not need command line configuration".to_string())?;
    }
    rt.finish_config()?;
    Ok(Arc::new(ScriptBackend::new(rt)))
}

/// `sh -`: the script comes from stdin, saved as an executable file in $tmpdir (run by /bin/sh
/// unless it starts with `#!`).
fn inline_script(tmpdir: &TmpDir) -> Result<PathBuf, ConfigError> {
    let mut text = Vec::new();
    std::io::stdin()
        .read_to_end(&mut text)
        .map_err(|e| ConfigError::new(format!("sh: reading the script from stdin: {e}")))?;
    if text.is_empty() {
        return Err(ConfigError::new("sh: the script read from stdin is empty"));
    }
    let path = tmpdir.path().join("inline-script.sh");
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o700).open(&path)?;
        std::io::Write::write_all(&mut f, &text)?;
        f.sync_all()
    };
    write().map_err(|e| ConfigError::new(format!("sh: saving the script from stdin: {e}")))?;
    Ok(path)
}

/// The script as an absolute path (a server in the background must still find it).
fn script_path(script: &str) -> Result<PathBuf, ConfigError> {
    let p = PathBuf::from(script);
    let p = if p.is_absolute() {
        p
    } else {
        std::env::current_dir().map_err(|e| ConfigError::new(format!("sh: current directory: {e}")))?.join(p)
    };
    match fs::metadata(&p) {
        Ok(m) if m.is_file() => Ok(p),
        Ok(_) => Err(ConfigError::new(format!("sh: {script}: not a regular file"))),
        Err(e) => Err(ConfigError::new(format!("sh: {script}: {e}"))),
    }
}
