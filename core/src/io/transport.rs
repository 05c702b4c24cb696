//! The byte streams a connection runs over.

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

pub enum Transport {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
    /// `-s`: stdin and stdout, which may be one socket (libnbd's `connect_command` passes a
    /// socketpair as both) or two pipes.
    Stdio {
        input: File,
        output: File,
        same: bool,
    },
}

impl Transport {
    /// Take over fds 0 and 1 for `-s`, in nonblocking mode.
    pub fn stdio() -> io::Result<Transport> {
        use std::os::fd::AsFd;
        let input: OwnedFd = io::stdin().as_fd().try_clone_to_owned()?;
        let output: OwnedFd = io::stdout().as_fd().try_clone_to_owned()?;
        super::process::set_nonblocking(input.as_raw_fd())?;
        super::process::set_nonblocking(output.as_raw_fd())?;
        let same = super::process::same_file(input.as_raw_fd(), output.as_raw_fd());
        Ok(Transport::Stdio { input: File::from(input), output: File::from(output), same })
    }

    /// Register for both readiness kinds. `read_token` is used for everything except a separate
    /// output fd, which gets `write_token`.
    pub fn register(&mut self, reg: &Registry, read_token: Token, write_token: Token) -> io::Result<()> {
        let both = Interest::READABLE | Interest::WRITABLE;
        match self {
            Transport::Tcp(s) => reg.register(s, read_token, both),
            Transport::Unix(s) => reg.register(s, read_token, both),
            Transport::Stdio { input, output, same } => {
                let infd: RawFd = input.as_raw_fd();
                if *same {
                    reg.register(&mut SourceFd(&infd), read_token, both)
                } else {
                    let outfd: RawFd = output.as_raw_fd();
                    reg.register(&mut SourceFd(&infd), read_token, Interest::READABLE)?;
                    reg.register(&mut SourceFd(&outfd), write_token, Interest::WRITABLE)
                }
            }
        }
    }

    pub fn deregister(&mut self, reg: &Registry) {
        let _ = match self {
            Transport::Tcp(s) => reg.deregister(s),
            Transport::Unix(s) => reg.deregister(s),
            Transport::Stdio { input, output, same } => {
                let infd = input.as_raw_fd();
                let r = reg.deregister(&mut SourceFd(&infd));
                if !*same {
                    let outfd = output.as_raw_fd();
                    let _ = reg.deregister(&mut SourceFd(&outfd));
                }
                r
            }
        };
    }

    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Tcp(s) => s.read(buf),
            Transport::Unix(s) => s.read(buf),
            Transport::Stdio { input, .. } => input.read(buf),
        }
    }

    /// Send `len` bytes of `file` from `offset` straight from the page cache (no copy through
    /// user space).
    pub fn sendfile(&mut self, file: &File, offset: u64, len: usize) -> io::Result<usize> {
        let out = match self {
            Transport::Tcp(s) => s.as_raw_fd(),
            Transport::Unix(s) => s.as_raw_fd(),
            Transport::Stdio { output, .. } => output.as_raw_fd(),
        };
        let mut off =
            libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: both descriptors are open for the call (`self` and `file` are borrowed), and
        // `off` is a valid off_t the kernel updates in place.
        let n = unsafe { libc::sendfile(out, file.as_raw_fd(), &mut off, len) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    pub fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Transport::Tcp(s) => send_vectored(s.as_raw_fd(), bufs),
            Transport::Unix(s) => send_vectored(s.as_raw_fd(), bufs),
            Transport::Stdio { output, .. } => output.write_vectored(bufs),
        }
    }

    /// The client's credentials when it is on a Unix socket (including `-s` over a socketpair).
    pub fn peer_cred(&self) -> Option<crate::layer::PeerCred> {
        let fd = match self {
            Transport::Tcp(_) => return None,
            Transport::Unix(s) => s.as_raw_fd(),
            Transport::Stdio { input, .. } => input.as_raw_fd(),
        };
        super::process::peer_cred(fd)
    }

    /// Half-close our sending side so the client sees EOF after the last reply.
    pub fn shutdown_write(&mut self) {
        let _ = match self {
            Transport::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Transport::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Transport::Stdio { .. } => Ok(()),
        };
    }
}

/// `sendmsg` rather than `writev` on sockets: the same bytes, without the file layer `writev`
/// goes through first (a few percent of a small reply's cost in profiles), and with
/// `MSG_NOSIGNAL`, so a client gone away is an `EPIPE`, never a signal.
fn send_vectored(fd: RawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // The kernel takes at most IOV_MAX pieces per call; the rest go in the next write.
    const IOV_MAX: usize = 1024;
    let bufs = &bufs[..bufs.len().min(IOV_MAX)];
    // SAFETY: an all-zero msghdr is a valid empty message (null pointers with zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with iovec on Unix; sendmsg only reads the array.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    loop {
        // SAFETY: `fd` is an open socket borrowed from its owner for the call, and `msg` points
        // to `bufs.len()` iovecs that stay borrowed until it returns.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The socket as a byte stream, for TLS sessions that read ciphertext from it and write
/// ciphertext to it (`tls::TlsSession::read_tls`/`write_tls`).
impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Transport::read(self, buf)
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Transport::write_vectored(self, bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
