//! The `blocksmith` binary: parse nbdkit's command line, build the layer stack, open the
//! listeners, and hand them to the event loops.

mod cli;
mod logger;
mod uri;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use blocksmith_core::conn::ConnConfig;
use blocksmith_core::control::ServerControl;
use blocksmith_core::io::process::{self, Forked};
use blocksmith_core::io::server::{self, Listener, ServerConfig};
use blocksmith_core::layer::{BackendSpec, FilterSpec, Stack};
use blocksmith_core::tls::{self, ServerTls, TlsPolicy};
use blocksmith_core::{limits, ConfigError};

use cli::Options;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match cli::parse(&args) {
        Ok(o) => o,
        Err(e) => return fail(&e.to_string()),
    };
    logger::init(opts.verbose);
    match run(opts) {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("blocksmith: error: {msg}");
    ExitCode::from(1)
}

fn backend_spec(name: &str) -> Result<&'static BackendSpec, String> {
    blocksmith_backends::registry().iter().find(|b| b.name == name).ok_or_else(|| {
        let all: Vec<_> = blocksmith_backends::registry().iter().map(|b| b.name).collect();
        format!("unknown backend '{name}' (available: {})", all.join(", "))
    })
}

fn filter_spec(name: &str) -> Result<&'static FilterSpec, String> {
    blocksmith_filters::registry().iter().find(|f| f.name == name).ok_or_else(|| {
        let all: Vec<_> = blocksmith_filters::registry().iter().map(|f| f.name).collect();
        format!("unknown filter '{name}' (available: {})", all.join(", "))
    })
}

fn print_help(opts: &Options) -> Result<(), String> {
    match &opts.backend {
        None => {
            print!("{}", cli::USAGE);
            println!("\nBackends:");
            for b in blocksmith_backends::registry() {
                println!("  {:<14} {}", b.name, b.summary);
            }
            println!("\nFilters:");
            for f in blocksmith_filters::registry() {
                println!("  {:<14} {}", f.name, f.summary);
            }
        }
        Some(b) => {
            for f in &opts.filters {
                println!("{}", filter_spec(f)?.help());
            }
            print!("{}", backend_spec(b)?.help());
        }
    }
    Ok(())
}

/// Build the layer stack from the command line, as nbdkit does: each filter, nearest the client
/// first, takes its own keys; the backend gets what is left and must take all of it.
fn build_stack(opts: &Options, backend_name: &str) -> Result<Stack, ConfigError> {
    let spec = backend_spec(backend_name).map_err(ConfigError)?;
    let mut params = cli::params(opts, spec.magic, backend_name)?;
    let mut filters = Vec::new();
    for name in &opts.filters {
        let f = filter_spec(name).map_err(ConfigError)?;
        filters.push((name.clone(), (f.make)(&mut params)?));
    }
    let backend = (spec.make)(&mut params)?;
    params.finish(backend_name)?;
    Ok(Stack::new((backend_name.to_string(), backend), filters))
}

/// TLS as the command line asks for it, after loading the credentials.
struct TlsSetup {
    /// The policy in force: `--tls=on` falls back to off when no certificates load, as nbdkit's.
    policy: TlsPolicy,
    creds: Option<ServerTls>,
    /// Absolute, for URIs and `$tls_certificates` (the daemon changes directory).
    certificates: Option<PathBuf>,
    /// The PSK file (absolute) and its first user.
    psk: Option<(PathBuf, Option<String>)>,
}

impl TlsSetup {
    /// What `--print-uri` and `$uri` say: only `require` makes it an `nbds` URI.
    fn uri_hint(&self) -> uri::Tls<'_> {
        if self.policy != TlsPolicy::Require {
            return uri::Tls::Plain;
        }
        match (&self.psk, &self.certificates) {
            (Some((file, user)), _) => uri::Tls::Psk { file, user: user.as_deref() },
            (None, Some(dir)) => uri::Tls::Certificates(dir),
            (None, None) => uri::Tls::Plain,
        }
    }
}

fn absolute(p: &str) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| PathBuf::from(p))
}

/// nbdkit's rules: `--tls-psk` overrides certificates; without `--tls-certificates` the
/// default directories are searched; failing to load is fatal for `require` and turns TLS
/// off (with a warning) for `on`.
fn tls_setup(opts: &Options) -> Result<TlsSetup, String> {
    let off = TlsSetup { policy: TlsPolicy::Off, creds: None, certificates: None, psk: None };
    let policy = opts.tls;
    if policy == TlsPolicy::Off {
        return Ok(off);
    }
    if opts.oldstyle && policy == TlsPolicy::Require {
        return Err("cannot use the oldstyle protocol (-o) and require TLS".into());
    }
    if let Some(f) = &opts.tls_psk {
        let file = absolute(f);
        let user = tls::read_psk_file(&file)?.first().map(|k| k.username.clone());
        let creds = ServerTls::psk(&file)?;
        log::debug!("TLS ({policy:?}): {}", creds.describe());
        return Ok(TlsSetup { policy, creds: Some(creds), certificates: None, psk: Some((file, user)) });
    }
    let loaded = match &opts.tls_certificates {
        Some(d) => Ok(absolute(d)),
        None => tls::find_default_certificates(),
    }
    .and_then(|dir| ServerTls::certificates(&dir, opts.tls_verify_peer).map(|c| (dir, c)));
    match loaded {
        Ok((dir, creds)) => {
            log::debug!("TLS ({policy:?}): {}", creds.describe());
            Ok(TlsSetup { policy, creds: Some(creds), certificates: Some(dir), psk: None })
        }
        Err(e) if policy == TlsPolicy::On => {
            log::warn!("--tls=on but the TLS certificates could not be loaded: {e}");
            log::warn!("TLS is disabled: STARTTLS will be refused");
            Ok(off)
        }
        Err(e) => Err(format!("--tls=require but the TLS certificates could not be loaded: {e}")),
    }
}

/// Where we listen, and the URI that reaches it.
struct Endpoint {
    listeners: Vec<Listener>,
    uri: String,
    port: Option<u16>,
    unix: Option<PathBuf>,
    /// A private socket directory to remove on exit (`-U -`).
    cleanup_dir: Option<PathBuf>,
}

fn listen(opts: &Options, tls: &uri::Tls<'_>) -> Result<Endpoint, String> {
    let export = opts.exportname.clone().unwrap_or_default();
    let unix = match opts.unix.as_deref() {
        Some(u) => Some(u.to_string()),
        // Captive mode with no address given uses a private socket, as nbdkit >= 1.36 does.
        None if opts.run.is_some() && opts.port.is_none() && opts.ipaddr.is_none() => Some("-".to_string()),
        None => None,
    };
    if let Some(u) = unix {
        let (path, cleanup_dir) = if u == "-" {
            let dir = private_dir().map_err(|e| format!("cannot create a socket directory: {e}"))?;
            (dir.join("socket"), Some(dir))
        } else {
            (PathBuf::from(u), None)
        };
        let l = std::os::unix::net::UnixListener::bind(&path)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        let uri = uri::unix(&export, &path, tls);
        return Ok(Endpoint {
            listeners: vec![Listener::Unix(l)],
            uri,
            port: None,
            unix: Some(path),
            cleanup_dir,
        });
    }
    let port: u16 = match &opts.port {
        None => 10809,
        Some(p) => p.parse().map_err(|_| format!("bad port '{p}'"))?,
    };
    let mut addrs: Vec<SocketAddr> = match &opts.ipaddr {
        Some(host) => (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve '{host}': {e}"))?
            .collect(),
        None => {
            let mut v = Vec::new();
            if !opts.ipv4_only {
                v.push(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)));
            }
            if !opts.ipv6_only {
                v.push(SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)));
            }
            v
        }
    };
    addrs.retain(|a| !(opts.ipv4_only && a.is_ipv6() || opts.ipv6_only && a.is_ipv4()));
    let mut listeners = Vec::new();
    let mut errors = Vec::new();
    for a in &addrs {
        match tcp_listener(*a, opts.ipaddr.is_none()) {
            Ok(l) => listeners.push(Listener::Tcp(l)),
            Err(e) => errors.push(format!("{a}: {e}")),
        }
    }
    if listeners.is_empty() {
        return Err(format!("cannot listen on port {port}: {}", errors.join("; ")));
    }
    let host = opts.ipaddr.clone().unwrap_or_else(|| "localhost".to_string());
    let uri = uri::tcp(&export, &host, port, tls);
    Ok(Endpoint { listeners, uri, port: Some(port), unix: None, cleanup_dir: None })
}

fn tcp_listener(addr: SocketAddr, wildcard: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() && wildcard {
        // With both wildcards bound, keep them apart: [::] serves IPv6, 0.0.0.0 serves IPv4.
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(limits::LISTEN_BACKLOG)?;
    Ok(s.into())
}

fn private_dir() -> std::io::Result<PathBuf> {
    let base = std::env::temp_dir();
    let stamp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    for i in 0..100u32 {
        let dir = base.join(format!("blocksmith-{}-{stamp:x}-{i}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free temporary directory name"))
}

fn run(opts: Options) -> Result<ExitCode, String> {
    if opts.version {
        println!("blocksmith {}", env!("CARGO_PKG_VERSION"));
        return Ok(ExitCode::SUCCESS);
    }
    if opts.help {
        print_help(&opts)?;
        return Ok(ExitCode::SUCCESS);
    }
    let Some(backend_name) = opts.backend.clone() else {
        return Err("no backend given (try 'blocksmith --help')".to_string());
    };
    let stack = build_stack(&opts, &backend_name).map_err(|e| e.to_string())?;
    let tls = tls_setup(&opts)?;

    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut conn = ConnConfig { oldstyle: opts.oldstyle, ..ConnConfig::default() };
    if let Some(t) = opts.timeout {
        conn.handshake_timeout = if t.is_zero() { None } else { Some(t) };
    }
    conn.tls = tls.policy;
    conn.structured_replies = !opts.no_sr;
    conn.meta_contexts = !opts.no_mc;
    if let Some(m) = opts.mask_handshake {
        conn.handshake_flags &= m;
    }
    if let Some(m) = opts.max_request {
        conn.max_request = m;
    }
    // The default is sized to the machine (1/8 of RAM or of the cgroup limit, clamped): see
    // `limits::default_memory_limit`.
    let limit_in_use = match opts.memory_limit {
        Some(n) => {
            limits::MemoryLimit { bytes: n as u64, source: limits::LimitSource::CommandLine, clamped: false }
        }
        None => limits::default_memory_limit(limits::MachineMemory::read(), conn.max_request),
    };
    let memory_limit = usize::try_from(limit_in_use.bytes).unwrap_or(usize::MAX);
    if memory_limit < 2 * conn.max_request as usize {
        return Err(format!(
            "--memory-limit must be at least twice the largest request ({} bytes)",
            2 * conn.max_request as usize
        ));
    }
    if tls.policy != TlsPolicy::Off && memory_limit < tls::SESSION_BUDGET_BYTES {
        return Err(format!(
            "--memory-limit must be at least {} bytes with TLS: each TLS session reserves that much",
            tls::SESSION_BUDGET_BYTES
        ));
    }
    let cfg = ServerConfig {
        conn,
        loops: opts.threads.unwrap_or(cores),
        io_threads: opts.io_threads.unwrap_or(limits::DEFAULT_IO_THREADS),
        memory_limit,
        readonly: opts.readonly,
        tls: tls.creds.clone(),
        reply_hold: opts.reply_hold.unwrap_or(limits::DEFAULT_REPLY_HOLD),
    };
    // Recycled payload buffers are part of the memory bound: their pool shrinks with the limit.
    let pooled = blocksmith_core::bufpool::configure(memory_limit, cfg.loops);
    log::debug!(
        "{} event loop(s), {} blocking IO thread(s), memory limit {limit_in_use} = {memory_limit} bytes, \
         recycled buffers at most {} per loop",
        cfg.loops,
        cfg.io_threads,
        limits::human_bytes(pooled as u64)
    );

    if opts.io_pool {
        blocksmith_core::io::uring::set_enabled(false);
        log::debug!("file IO: blocking thread pool (--io=pool)");
    }
    if opts.exit_with_parent {
        process::exit_with_parent().map_err(|e| format!("--exit-with-parent: {e}"))?;
    }
    let shutdown = ServerControl::new();

    if opts.single {
        start_signal_thread(shutdown.clone())?;
        server::serve_stdio(cfg, stack, shutdown).map_err(|e| e.to_string())?;
        return Ok(ExitCode::SUCCESS);
    }

    let ep = listen(&opts, &tls.uri_hint())?;
    if opts.print_uri {
        println!("{}", ep.uri);
    }
    let foreground = opts.foreground || opts.run.is_some() || opts.exit_with_parent;
    if !foreground {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        match process::daemonize().map_err(|e| format!("cannot fork: {e}"))? {
            Forked::Parent(_) => return Ok(ExitCode::SUCCESS),
            Forked::Child => {}
        }
    }
    if let Some(p) = &opts.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("cannot write pidfile {p}: {e}"))?;
    }
    // Before the threads start: growing the table later stalls a loop for an RCU grace period.
    match process::reserve_descriptor_table() {
        Some(n) => log::debug!("descriptor table: {n} slots reserved"),
        None => log::debug!("descriptor table: not reserved (it grows as clients arrive)"),
    }
    start_signal_thread(shutdown.clone())?;

    let Endpoint { listeners, uri, port, unix, cleanup_dir } = ep;
    let server_shutdown = shutdown.clone();
    let server = std::thread::Builder::new()
        .name("blocksmith-main".into())
        .spawn(move || server::serve(cfg, stack, listeners, server_shutdown))
        .map_err(|e| e.to_string())?;

    let mut code = ExitCode::SUCCESS;
    if let Some(cmd) = &opts.run {
        let export = opts.exportname.as_deref().unwrap_or("");
        code = run_captive(cmd, &uri, port, unix.as_deref(), export, &tls);
        shutdown.shutdown();
    }
    let served = server.join();
    if let Some(d) = cleanup_dir {
        let _ = std::fs::remove_dir_all(d);
    }
    match served {
        Ok(Ok(())) => Ok(code),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("server thread panicked".to_string()),
    }
}

/// `--run`: run the command with the connection details in its environment; its exit status
/// becomes ours (128 + signal if it was killed, as a shell reports it).
fn run_captive(
    cmd: &str,
    uri: &str,
    port: Option<u16>,
    unix: Option<&Path>,
    export: &str,
    tls: &TlsSetup,
) -> ExitCode {
    let mut c = std::process::Command::new("/bin/sh");
    c.arg("-c").arg(cmd);
    c.env("uri", uri).env("nbd", uri).env("exportname", export);
    // nbdkit's TLS variables: the policy as 0/1/2 and where the client's credentials are.
    c.env("tls", tls.policy.as_number().to_string());
    let path_env = |p: Option<&PathBuf>| p.map(|p| p.display().to_string()).unwrap_or_default();
    c.env("tls_certificates", path_env(tls.certificates.as_ref()));
    c.env("tls_psk", path_env(tls.psk.as_ref().map(|(f, _)| f)));
    c.env("port", port.map(|p| p.to_string()).unwrap_or_default());
    c.env("unixsocket", unix.map(|p| p.display().to_string()).unwrap_or_default());
    match c.status() {
        Ok(st) => {
            use std::os::unix::process::ExitStatusExt;
            let n = st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
            ExitCode::from(n.clamp(0, 255) as u8)
        }
        Err(e) => {
            log::error!("--run: cannot run /bin/sh: {e}");
            ExitCode::from(1)
        }
    }
}

/// One thread for the whole process turns SIGINT/SIGTERM/SIGQUIT/SIGHUP into a clean shutdown,
/// and SIGUSR1 into a report (the stats filter writes its file now).
fn start_signal_thread(shutdown: Arc<ServerControl>) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGQUIT, SIGHUP, SIGUSR1])
        .map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("blocksmith-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGUSR1 {
                    log::debug!("signal {sig}: writing reports");
                    blocksmith_core::control::report_now();
                    continue;
                }
                log::debug!("signal {sig}: shutting down");
                shutdown.shutdown();
                return;
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}
