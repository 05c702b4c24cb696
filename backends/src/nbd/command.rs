//! `command=`: run the upstream server ourselves, as nbdkit's nbd plugin does through libnbd's
//! `nbd_connect_systemd_socket_activation`: we bind a Unix socket in a private directory and
//! hand it to the command as fd 3 with `LISTEN_PID`/`LISTEN_FDS` (systemd socket activation,
//! which qemu-nbd and nbdkit understand). Lanes then connect to that socket like `socket=`.
//!
//! `LISTEN_PID` must be the server's own pid, known only after fork; rather than `unsafe`
//! pre-exec code, a tiny `/bin/sh` wrapper moves the socket from stdin to fd 3, exports its own
//! `$$` and `exec`s the command (keeping that pid).
//!
//! The command starts at the first client (after blocksmith has daemonized, so it is our child
//! and not our parent's) and is killed when the backend is dropped at shutdown.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};

use blocksmith_core::error::NbdError;

const WRAPPER: &str = "exec 3<&0 0</dev/null; LISTEN_PID=$$; LISTEN_FDS=1; LISTEN_FDNAMES=nbd; \
                       export LISTEN_PID LISTEN_FDS LISTEN_FDNAMES; exec \"$@\"";

pub struct CommandServer {
    program: String,
    args: Vec<String>,
    dir: PathBuf,
    child: Mutex<Option<Result<Child, String>>>,
}

impl CommandServer {
    /// Choose the private directory; create nothing and start nothing yet. Both happen at the
    /// first client, in the process that serves (after a daemonizing fork: the parent's copy of
    /// this backend is dropped when it exits, and must not remove what the child made).
    pub fn new(program: String, args: Vec<String>, id: u64) -> CommandServer {
        let dir = std::env::temp_dir().join(format!("blocksmith-nbd-{}-{id}", std::process::id()));
        CommandServer { program, args, dir, child: Mutex::new(None) }
    }

    /// Where the command listens.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("sock")
    }

    /// Start the command unless it was started already. A failure to start is remembered and
    /// reported to every client.
    pub fn ensure_started(&self) -> Result<(), NbdError> {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        if child.is_none() {
            let r = self.spawn();
            match &r {
                Ok(c) => log::debug!("nbd: started command {} (pid {})", self.program, c.id()),
                Err(e) => log::error!("nbd: {e}"),
            }
            *child = Some(r);
        }
        match child.as_ref() {
            Some(Err(e)) => Err(NbdError::io(e.clone())),
            _ => Ok(()),
        }
    }

    fn spawn(&self) -> Result<Child, String> {
        // A fresh directory only (never one that exists: /tmp is shared, and a directory someone
        // else made could hold anything).
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| format!("cannot create directory {}: {e}", self.dir.display()))?;
        let r = self.spawn_in_dir();
        if r.is_err() {
            let _ = fs::remove_dir_all(&self.dir);
        }
        r
    }

    fn spawn_in_dir(&self) -> Result<Child, String> {
        let sock = self.socket();
        let listener =
            UnixListener::bind(&sock).map_err(|e| format!("cannot listen on {}: {e}", sock.display()))?;
        // The command's stdout must never reach ours: with -s, our stdout is an NBD connection.
        let stderr =
            std::io::stderr().as_fd().try_clone_to_owned().map_err(|e| format!("dup stderr: {e}"))?;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(WRAPPER)
            .arg("blocksmith-nbd")
            .arg(&self.program)
            .args(&self.args)
            .stdin(Stdio::from(OwnedFd::from(listener)))
            .stdout(Stdio::from(stderr));
        cmd.spawn().map_err(|e| format!("cannot run command {}: {e}", self.program))
    }
}

impl Drop for CommandServer {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        // Only the process that started the command made the directory.
        if let Some(Ok(c)) = child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
