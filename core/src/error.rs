//! Error types. `NbdError` is what goes on the wire for a failed request; `ConfigError` is
//! reported at start-up. A client breaking the protocol is a `conn::Violation`, not an error
//! value that travels through layers.

use std::fmt;

/// The errno values the NBD protocol allows on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Errno {
    Perm,
    Io,
    NoMem,
    Inval,
    NoSpc,
    Overflow,
    NotSup,
    Shutdown,
}

impl Errno {
    /// The value sent on the wire (NBD_E*).
    pub fn wire(self) -> u32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::Shutdown => 108,
        }
    }

    /// Decode a wire value; anything unknown is treated as EINVAL, as the spec tells clients to.
    pub fn from_wire(v: u32) -> Errno {
        match v {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            22 => Errno::Inval,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => Errno::Inval,
        }
    }

    /// Map a host errno (from a syscall) onto the NBD set, as nbdkit does, except that a host
    /// ENOMEM becomes EIO: the spec asks servers not to send ENOMEM if at all possible. (An
    /// ENOMEM chosen by name, in the error filter or a script, still goes out as chosen.)
    pub fn from_host(e: i32) -> Errno {
        match e {
            libc::EPERM | libc::EROFS | libc::EACCES => Errno::Perm,
            libc::EIO | libc::ENOMEM => Errno::Io,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Errno::NoSpc,
            libc::EOVERFLOW => Errno::Overflow,
            libc::ENOTSUP => Errno::NotSup,
            libc::ESHUTDOWN => Errno::Shutdown,
            libc::EINVAL => Errno::Inval,
            _ => Errno::Io,
        }
    }

    /// The conventional name (`EIO`...), as used by nbdkit's sh plugin and error filter.
    pub fn name(self) -> &'static str {
        match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        }
    }

    /// Parse a name such as `EIO` or `ENOSPC` (also accepts `EOPNOTSUPP`, `EROFS`, `EDQUOT`...).
    pub fn from_name(s: &str) -> Option<Errno> {
        Some(match s.trim().to_ascii_uppercase().as_str() {
            "EPERM" | "EROFS" | "EACCES" => Errno::Perm,
            "EIO" => Errno::Io,
            "ENOMEM" => Errno::NoMem,
            "EINVAL" => Errno::Inval,
            "ENOSPC" | "EDQUOT" | "EFBIG" => Errno::NoSpc,
            "EOVERFLOW" => Errno::Overflow,
            "ENOTSUP" | "EOPNOTSUPP" => Errno::NotSup,
            "ESHUTDOWN" => Errno::Shutdown,
            _ => return None,
        })
    }
}

/// A failed request: the errno for the wire plus an optional message, which structured
/// replies carry in their error chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdError {
    pub errno: Errno,
    pub message: Option<String>,
}

impl NbdError {
    pub fn new(errno: Errno) -> Self {
        NbdError { errno, message: None }
    }
    pub fn msg(errno: Errno, message: impl Into<String>) -> Self {
        NbdError { errno, message: Some(message.into()) }
    }
    pub fn from_io(e: &std::io::Error) -> Self {
        let errno = e.raw_os_error().map(Errno::from_host).unwrap_or(Errno::Io);
        NbdError::msg(errno, e.to_string())
    }
    pub fn inval(message: impl Into<String>) -> Self {
        NbdError::msg(Errno::Inval, message)
    }
    pub fn io(message: impl Into<String>) -> Self {
        NbdError::msg(Errno::Io, message)
    }
}

impl From<Errno> for NbdError {
    fn from(e: Errno) -> Self {
        NbdError::new(e)
    }
}

impl From<std::io::Error> for NbdError {
    fn from(e: std::io::Error) -> Self {
        NbdError::from_io(&e)
    }
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.message {
            Some(m) => write!(f, "{}: {}", self.errno.name(), m),
            None => f.write_str(self.errno.name()),
        }
    }
}

impl std::error::Error for NbdError {}

/// A problem with the command line or a layer's parameters, reported before serving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl ConfigError {
    pub fn new(s: impl Into<String>) -> Self {
        ConfigError(s.into())
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}
