//! Shared test support: private network namespaces, child processes that
//! are always reaped, the stand-in daemon, and small local services.
//!
//! Each test calls [`netns`] first. Network namespaces belong to a thread
//! on Linux, so the calling test thread (and every thread and process it
//! starts afterwards) gets its own loopback: tests never touch the host's
//! network or each other, and may use fixed ports.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pilot_gateway::ipc::{self, cmd, FrameReader};

pub const GATEWAY: &str = env!("CARGO_BIN_EXE_pilot-gateway");
pub const DEVD: &str = env!("CARGO_BIN_EXE_pilot-devd");
pub const A4: &str = "0:0000.0000.0004";
pub const A5: &str = "0:0000.0000.0005";
pub const A6: &str = "0:0000.0000.0006";
/// The uid and gid of `nobody`, the unprivileged user of the tests.
pub const NOBODY: u32 = 65534;

/// Moves this thread into a fresh network namespace with loopback up.
pub fn netns() {
    // SAFETY: unshare affects only the calling thread's namespaces.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        r,
        0,
        "unshare(CLONE_NEWNET) failed ({}): these tests need root (CI runs them as root)",
        std::io::Error::last_os_error()
    );
    run_ok("ip", &["link", "set", "lo", "up"]);
}

pub fn run_ok(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command that runs `program` as nobody (uid and gid 65534, no groups).
pub fn as_nobody(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", program]);
    c
}

/// pilot-devd running as nobody with `args` after its `--socket`, the
/// socket in a directory nobody owns. Waits for the socket (bounded).
pub fn devd_as_nobody(dir: &TempDir, args: &[&str]) -> (PathBuf, Proc) {
    let sockdir = dir.path("nobody");
    std::fs::create_dir_all(&sockdir).unwrap();
    std::os::unix::fs::chown(&sockdir, Some(NOBODY), Some(NOBODY)).unwrap();
    let socket = sockdir.join("devd.sock");
    // The temp dir itself must be traversable by nobody.
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut c = as_nobody(DEVD);
    c.args(["--socket"]).arg(&socket).args(args);
    let p = Proc::spawn(&mut c, dir.path("devd.log"));
    assert!(
        wait_until(Duration::from_secs(10), || socket.exists()),
        "devd: {}",
        p.stderr()
    );
    (socket, p)
}

/// Shell lines (sh or bash) for a script already in a private mount
/// namespace: a private tmpfs on /tmp (mode 1777, like the real one), with
/// `$GW` and `$DEVD` set to copies of the two binaries inside it. The build
/// tree may itself live under /tmp (a clone there), which the mount hides:
/// so both binaries are held open first and copied from those descriptors.
pub fn private_tmp_shell() -> String {
    format!(
        r#"exec 8<'{gw}' 9<'{devd}' || exit 91
mount -t tmpfs -o mode=1777 tmpfs /tmp || exit 90
mkdir -m 0755 /tmp/.pgw-bin && cp /proc/self/fd/8 /tmp/.pgw-bin/pilot-gateway && cp /proc/self/fd/9 /tmp/.pgw-bin/pilot-devd || exit 91
chmod 0755 /tmp/.pgw-bin/pilot-gateway /tmp/.pgw-bin/pilot-devd
exec 8<&- 9<&-
GW=/tmp/.pgw-bin/pilot-gateway; DEVD=/tmp/.pgw-bin/pilot-devd
"#,
        gw = GATEWAY,
        devd = DEVD
    )
}

/// The static binary for `triple` (target/TRIPLE/static/pilot-gateway),
/// built or brought up to date by scripts/static.sh (cargo rebuilds only
/// what changed), once per test process.
pub fn static_binary(triple: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|t| t == triple) {
        let out = Command::new("bash")
            .arg(root.join("scripts/static.sh"))
            .env("STATIC_TARGETS", triple)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/static.sh {triple}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        built.push(triple.to_string());
    }
    root.join("target").join(triple).join("static/pilot-gateway")
}

/// Addresses on `lo`, as `ip -4 addr show dev lo` lists them.
pub fn lo_addrs() -> String {
    run_ok("ip", &["-4", "addr", "show", "dev", "lo"])
}

pub fn has_alias(ip: &str) -> bool {
    lo_addrs().contains(&format!("inet {ip}/32"))
}

/// A fresh private directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "pgw-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process that is killed and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub stderr_path: PathBuf,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, stderr_path: PathBuf) -> Proc {
        let err = std::fs::File::create(&stderr_path).unwrap();
        let child = cmd.stdin(Stdio::null()).stderr(err).spawn().unwrap();
        Proc { child, stderr_path }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 10 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The stand-in daemon on a socket in `dir`.
pub struct Devd {
    pub socket: PathBuf,
    pub proc: Proc,
}

impl Devd {
    pub fn start(dir: &TempDir, args: &[&str]) -> Devd {
        let socket = dir.path("devd.sock");
        let mut cmd = Command::new(DEVD);
        cmd.arg("--socket").arg(&socket).args(args).stdout(Stdio::null());
        let proc = Proc::spawn(&mut cmd, dir.path("devd.log"));
        assert!(
            wait_until(Duration::from_secs(10), || {
                std::os::unix::net::UnixStream::connect(&socket).is_ok()
            }),
            "pilot-devd did not come up: {}",
            proc.stderr()
        );
        Devd { socket, proc }
    }

    pub fn log(&self) -> String {
        self.proc.stderr()
    }
}

/// Runs `pilot-gateway` with this test's state directory and socket. The
/// owner (made by `new`) stops any background gateway it left running
/// when dropped, so a failing test leaves no process behind.
pub struct Gw {
    pub state: PathBuf,
    pub socket: PathBuf,
    owner: bool,
}

impl Gw {
    pub fn new(dir: &TempDir, socket: &Path) -> Gw {
        Gw {
            state: dir.path("state"),
            socket: socket.to_path_buf(),
            owner: true,
        }
    }

    /// Another handle on the same gateway (for worker threads); it does
    /// not stop the gateway when dropped.
    pub fn handle(state: PathBuf, socket: PathBuf) -> Gw {
        Gw {
            state,
            socket,
            owner: false,
        }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(GATEWAY);
        c.arg("--state-dir")
            .arg(&self.state)
            .arg("--socket")
            .arg(&self.socket);
        c.stdin(Stdio::null());
        c
    }

    /// Runs a command to completion (bounded by the commands' own waits).
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "pilot-gateway {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a foreground gateway as a child; waits for its report.
    pub fn foreground(&self, dir: &TempDir, args: &[&str]) -> Proc {
        self.foreground_with(dir, args, |_| {})
    }

    /// [`Gw::foreground`], with `prepare` applied to the command first
    /// (for example a resource limit set in `pre_exec`).
    pub fn foreground_with(&self, dir: &TempDir, args: &[&str], prepare: impl FnOnce(&mut Command)) -> Proc {
        let mut c = self.cmd();
        prepare(&mut c);
        c.args(["start", "--foreground"]).args(args);
        await_running(Proc::spawn(c.stdout(Stdio::piped()), dir.path("gateway.log")))
    }

    /// A foreground gateway run by `program` (e.g. another build of it,
    /// or an emulator with that build as its first argument).
    pub fn foreground_via(&self, dir: &TempDir, program: &[&Path], args: &[&str]) -> Proc {
        let mut c = Command::new(program[0]);
        // The emulator's own threads cannot be restricted (see
        // privilege::EMULATED_ENV).
        c.args(&program[1..])
            .env("PILOT_GATEWAY_EMULATED", "1")
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--socket")
            .arg(&self.socket)
            .args(["start", "--foreground"])
            .args(args)
            .stdin(Stdio::null());
        await_running(Proc::spawn(c.stdout(Stdio::piped()), dir.path("gateway.log")))
    }

    /// Runs `--json ARGS`, which must succeed; returns the `data` object.
    pub fn data(&self, args: &[&str]) -> pilot_gateway::json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        ok_data(&self.ok(&a))
    }

    /// The pid the state file records for the running gateway.
    pub fn pid(&self) -> u32 {
        let text = std::fs::read_to_string(self.state.join("state.json")).unwrap();
        let v = pilot_gateway::json::parse(&text).unwrap();
        v.get("pid").and_then(pilot_gateway::json::Value::as_u64).unwrap() as u32
    }

    /// Stops a background gateway if one runs (for cleanup).
    pub fn stop_quietly(&self) {
        let _ = self.run(&["stop"]);
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if self.owner && self.state.join("state.json").exists() {
            let _ = self.cmd().arg("stop").output();
        }
    }
}

/// Waits (bounded) for a foreground gateway's "gateway running" report on
/// its piped stdout, then keeps draining it so it never blocks.
pub fn await_running(mut p: Proc) -> Proc {
    let mut stdout = p.child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&seen).contains("gateway running") {
        assert!(Instant::now() < deadline, "gateway not ready: {}", p.stderr());
        match stdout.read(&mut buf) {
            Ok(0) | Err(_) => panic!("gateway exited: {}{}", String::from_utf8_lossy(&seen), p.stderr()),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    // Keep draining stdout so the gateway never blocks on it.
    thread::spawn(move || {
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    });
    p
}

/// The `data` of a `{"status":"ok","data":…}` reply.
pub fn ok_data(stdout: &str) -> pilot_gateway::json::Value {
    use pilot_gateway::json::{self, Value};
    let v = json::parse(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    assert_eq!(v.get("status").and_then(Value::as_str), Some("ok"), "{stdout}");
    v.get("data").cloned().unwrap()
}

/// pilot-devd's `--route` arguments for agents 4 and 5, both on loopback.
pub fn routes() -> Vec<&'static str> {
    vec![
        "--route",
        "0:0000.0000.0004=127.0.0.1",
        "--route",
        "0:0000.0000.0005=127.0.0.1",
    ]
}

/// The gateway's `status` data.
pub fn status(gw: &Gw) -> pilot_gateway::json::Value {
    gw.data(&["status"])
}

/// The whole number under `k`, or `u64::MAX` (no real count) when it is
/// missing.
pub fn n(v: &pilot_gateway::json::Value, k: &str) -> u64 {
    v.get(k)
        .and_then(pilot_gateway::json::Value::as_u64)
        .unwrap_or(u64::MAX)
}

/// A service thread pool on 127.0.0.1: `handler` runs per connection.
pub struct Service {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Service {
    pub fn start(port: u16, handler: fn(TcpStream)) -> Service {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s2.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(c) = conn {
                    thread::spawn(move || handler(c));
                }
            }
        });
        Service { addr, stop }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Echoes until EOF, then closes.
pub fn echo(mut c: TcpStream) {
    let mut buf = vec![0u8; 65536];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// A minimal HTTP server: reads the request head, answers, closes.
pub fn http(mut c: TcpStream) {
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&req)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let body = format!("hello from the agent: {line}\n");
    let _ = write!(
        c,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Deterministic pseudo-random bytes (xorshift), so both ends agree.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a over a stream, for byte-exact comparisons.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Fnv {
    pub fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub fn update(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// Service: reads an 8-byte length N, then sends N pattern bytes and closes.
pub fn source(mut c: TcpStream) {
    let mut n = [0u8; 8];
    if c.read_exact(&mut n).is_err() {
        return;
    }
    let total = u64::from_be_bytes(n) as usize;
    let chunk = pattern(7, 1 << 20);
    let mut sent = 0;
    while sent < total {
        let k = (total - sent).min(chunk.len());
        if c.write_all(&chunk[..k]).is_err() {
            return;
        }
        sent += k;
    }
}

/// Service: reads an 8-byte length N, then N bytes, then replies with the
/// byte count and FNV hash. (It cannot wait for EOF: pilot streams have no
/// half-close, so the agent never sees the client's shutdown.)
pub fn sink(mut c: TcpStream) {
    let mut n = [0u8; 8];
    if c.read_exact(&mut n).is_err() {
        return;
    }
    let want = u64::from_be_bytes(n);
    let mut h = Fnv::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 65536];
    while total < want {
        let k = buf.len().min((want - total) as usize);
        match c.read(&mut buf[..k]) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                h.update(&buf[..n]);
                total += n as u64;
            }
        }
    }
    let _ = c.write_all(&total.to_be_bytes());
    let _ = c.write_all(&h.0.to_be_bytes());
}

/// Connects with a timeout and bounded reads/writes.
pub fn connect(addr: &str) -> TcpStream {
    let a: SocketAddr = addr.parse().unwrap();
    let s = TcpStream::connect_timeout(&a, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Sends an HTTP GET and returns the whole response.
pub fn http_get(addr: &str, path: &str) -> String {
    let mut s = connect(addr);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp
}

/// Downloads `len` bytes from a `source` service; returns their hash.
pub fn download(addr: &str, len: usize) -> (usize, u64) {
    let mut s = connect(addr);
    s.write_all(&(len as u64).to_be_bytes()).unwrap();
    let mut h = Fnv::new();
    let mut got = 0;
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                got += n;
            }
            Err(e) => panic!("download from {addr} after {got} bytes: {e}"),
        }
    }
    (got, h.0)
}

/// The hash `download` should see for `len` bytes.
pub fn expected_download(len: usize) -> u64 {
    let chunk = pattern(7, 1 << 20);
    let mut h = Fnv::new();
    let mut left = len;
    while left > 0 {
        let k = left.min(chunk.len());
        h.update(&chunk[..k]);
        left -= k;
    }
    h.0
}

/// Uploads `len` pattern bytes to a `sink`, half-closes, and returns the
/// sink's (count, hash) plus the hash we sent.
pub fn upload(addr: &str, len: usize, seed: u64) -> ((u64, u64), u64) {
    let mut s = connect(addr);
    s.write_all(&(len as u64).to_be_bytes()).unwrap();
    let chunk = pattern(seed, 1 << 20);
    let mut h = Fnv::new();
    let mut sent = 0;
    while sent < len {
        let k = (len - sent).min(chunk.len());
        s.write_all(&chunk[..k]).unwrap();
        h.update(&chunk[..k]);
        sent += k;
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply)
        .unwrap_or_else(|e| panic!("upload reply from {addr}: {e}"));
    let count = u64::from_be_bytes(reply[..8].try_into().unwrap());
    let hash = u64::from_be_bytes(reply[8..].try_into().unwrap());
    ((count, hash), h.0)
}

/// Whether the peer reset the connection (vs. a clean EOF) within `limit`.
pub fn sees_reset(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

/// Connects and expects a reset within `limit` (the reset may already
/// arrive during the connect itself).
pub fn reset_soon(addr: &str, limit: Duration) -> bool {
    let a: SocketAddr = addr.parse().unwrap();
    match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(mut s) => sees_reset(&mut s, limit),
    }
}

/// A field of `/proc/PID/status` as a number (VmRSS in KiB, Threads).
pub fn proc_field(pid: u32, name: &str) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    st.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn proc_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Service: echoes one read (up to 64 bytes) and closes.
pub fn echo_once(mut c: TcpStream) {
    let mut b = [0u8; 64];
    if let Ok(n) = c.read(&mut b) {
        let _ = c.write_all(&b[..n]);
    }
}

/// Service: accepts and never reads (holds the socket for a minute).
pub fn never_reads(c: TcpStream) {
    thread::sleep(Duration::from_secs(60));
    drop(c);
}

/// One short exchange through `addr`; true if the echo came back.
pub fn short_exchange(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut b = [0u8; 5];
    s.write_all(b"hello").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"hello"
}

/// The live connections `list` counts on the mapping of `ip` (0 when the
/// mapping is not listed).
pub fn active(gw: &Gw, ip: &str) -> u64 {
    use pilot_gateway::json::Value;
    let list = gw.data(&["list"]);
    list.get("mappings")
        .and_then(Value::as_array)
        .and_then(|rows| {
            rows.iter()
                .find(|r| r.get("local_ip").and_then(Value::as_str) == Some(ip))
        })
        .and_then(|r| r.get("active").and_then(Value::as_u64))
        .unwrap_or(0)
}

/// The thread count of `pid` once it holds still for 10 ms (a transient
/// client, such as [`Devd::start`]'s probe, has ended by then).
pub fn settled_threads(pid: u32) -> u64 {
    // Settled: the same count for 300 ms in a row (a session that start-up
    // opened, e.g. the gateway's first health check, may still be closing).
    let (mut last, mut since) = (proc_field(pid, "Threads:"), Instant::now());
    assert!(
        wait_until(Duration::from_secs(10), || {
            let now = proc_field(pid, "Threads:");
            if now != last {
                (last, since) = (now, Instant::now());
            }
            since.elapsed() >= Duration::from_millis(300)
        }),
        "the thread count of {pid} does not settle"
    );
    last
}

/// Whether a fresh session can Bind `port` (BindOK), polled: the daemon
/// frees a port when it notices the owner's session has closed.
pub fn can_bind(socket: &Path, port: u16) -> bool {
    wait_until(Duration::from_secs(10), || {
        try_bind(socket, port).unwrap_or(false)
    })
}

/// One Bind attempt on a fresh session: whether it got BindOK. An error
/// only when the daemon's socket takes no connection.
pub fn try_bind(socket: &Path, port: u16) -> std::io::Result<bool> {
    let s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(&ipc::encode(cmd::BIND, &[&port.to_be_bytes()]))
        .unwrap();
    let mut r = FrameReader::new(s, 1024);
    Ok(matches!(r.read_frame(), Ok((cmd::BIND_OK, _))))
}

/// Whether a live connection to an echo service still echoes.
pub fn still_echoes(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 4];
    s.write_all(b"more").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"more"
}

/// Binds `port` on a fresh session, as another program would; the
/// session (holding the port while it lives) if the daemon said BindOK.
pub fn hold_port(socket: &Path, port: u16) -> Option<std::os::unix::net::UnixStream> {
    let s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(&ipc::encode(cmd::BIND, &[&port.to_be_bytes()]))
        .unwrap();
    let mut r = FrameReader::new(s, 1024);
    matches!(r.read_frame(), Ok((cmd::BIND_OK, _))).then_some(w)
}

/// A service on 127.0.0.1:`port` for `conns` connections: it holds the
/// first one and never reads it; the others echo.
pub struct NeverReadsFirst {
    accepted: Arc<AtomicUsize>,
    held: Arc<Mutex<Option<TcpStream>>>,
}

impl NeverReadsFirst {
    pub fn start(port: u16, conns: usize) -> NeverReadsFirst {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let held: Arc<Mutex<Option<TcpStream>>> = Arc::default();
        let (a, h) = (accepted.clone(), held.clone());
        thread::spawn(move || {
            for c in listener.incoming().flatten().take(conns) {
                if a.fetch_add(1, Ordering::SeqCst) == 0 {
                    *h.lock().unwrap() = Some(c);
                } else {
                    thread::spawn(move || echo(c));
                }
            }
        });
        NeverReadsFirst { accepted, held }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The connection it never reads (panics when none came yet).
    pub fn take_held(&self) -> TcpStream {
        self.held.lock().unwrap().take().unwrap()
    }
}

/// On a thread: pours up to 256 MiB at `addr`, ending at the first write
/// that fails (the connection was reset).
pub fn pour(addr: &'static str) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut s = connect(addr);
        let chunk = vec![5u8; 1 << 20];
        for _ in 0..256 {
            if s.write_all(&chunk).is_err() {
                return;
            }
        }
    })
}

/// `n` connections to an echo behind `addr` at once, each writing 128 KiB
/// of its own pattern while it reads; asserts every one came back
/// byte-exact.
pub fn echoes_byte_exact(addr: &'static str, n: u64) {
    let others: Vec<_> = (0..n)
        .map(|i| {
            thread::spawn(move || {
                let s = connect(addr);
                let data = pattern(100 + i, 128 * 1024);
                let (mut w, expect) = (s.try_clone().unwrap(), data.clone());
                let writer = thread::spawn(move || w.write_all(&data).unwrap());
                let mut got = vec![0u8; expect.len()];
                (&s).read_exact(&mut got).unwrap();
                writer.join().unwrap();
                got == expect
            })
        })
        .collect();
    for (i, t) in others.into_iter().enumerate() {
        assert!(t.join().unwrap(), "connection {i} did not echo byte-exact");
    }
}

/// Service: reads an 8-byte length N, then N bytes, which it compares with
/// the pattern as they come; replies with the count and the offset of the
/// first difference (u64::MAX: none). Comparing slices keeps it fast even
/// in a debug build.
pub fn verify(c: TcpStream) {
    verify_paced(c, 1 << 20, Duration::ZERO);
}

/// `verify` that reads at most `chunk` bytes at a time and sleeps `pause`
/// after each read: a service that keeps reading, only slowly.
pub fn verify_paced(mut c: TcpStream, chunk: usize, pause: Duration) {
    let mut n = [0u8; 8];
    if c.read_exact(&mut n).is_err() {
        return;
    }
    let want = u64::from_be_bytes(n);
    let expect = pattern(11, 1 << 20);
    let (mut total, mut first_diff) = (0u64, u64::MAX);
    let mut buf = vec![0u8; chunk.min(1 << 20)];
    while total < want {
        // Reads never cross a pattern boundary, so each compares in one piece.
        let at = (total % (1 << 20)) as usize;
        let k = buf.len().min((1 << 20) - at).min((want - total) as usize);
        match c.read(&mut buf[..k]) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if first_diff == u64::MAX && buf[..n] != expect[at..at + n] {
                    first_diff = total;
                }
                total += n as u64;
            }
        }
        if !pause.is_zero() {
            thread::sleep(pause);
        }
    }
    let _ = c.write_all(&total.to_be_bytes());
    let _ = c.write_all(&first_diff.to_be_bytes());
}

/// Sends `len` pattern bytes to a `verify` service without half-closing
/// (an exposed service never sees our half-close before its reply);
/// returns its (count, first difference).
pub fn upload_whole(to: &str, len: usize) -> (u64, u64) {
    let mut s = connect(to);
    s.write_all(&(len as u64).to_be_bytes()).unwrap();
    let chunk = pattern(11, 1 << 20);
    let mut sent = 0;
    while sent < len {
        let k = (len - sent).min(chunk.len());
        s.write_all(&chunk[..k]).unwrap();
        sent += k;
    }
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    let count = u64::from_be_bytes(reply[..8].try_into().unwrap());
    let diff = u64::from_be_bytes(reply[8..].try_into().unwrap());
    (count, diff)
}

/// Sets the descriptor limit of the command's process before it runs.
pub fn nofile(c: &mut Command, n: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in pre_exec.
    unsafe {
        c.pre_exec(move || {
            let rl = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Service: echoes, except that a connection opening with `BIG` gets an
/// endless reply (a download the peer never reads).
pub fn echo_or_flood(mut c: TcpStream) {
    let mut buf = [0u8; 4096];
    let Ok(n) = c.read(&mut buf) else { return };
    if buf[..n].starts_with(b"BIG") {
        let chunk = [b'x'; 65536];
        while c.write_all(&chunk).is_ok() {}
        return;
    }
    let mut n = n;
    while n > 0 && c.write_all(&buf[..n]).is_ok() {
        n = c.read(&mut buf).unwrap_or(0);
    }
}

/// A raw IPC client of pilot-devd: frames written and read as they are.
pub struct Raw {
    pub r: FrameReader<UnixStream>,
    pub w: UnixStream,
}

impl Raw {
    pub fn open(d: &Devd) -> Raw {
        let s = UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            w: s.try_clone().unwrap(),
            r: FrameReader::new(s, 64 * 1024),
        }
    }

    pub fn send(&mut self, command: u8, parts: &[&[u8]]) {
        self.w.write_all(&ipc::encode(command, parts)).unwrap();
    }

    pub fn frame(&mut self) -> (u8, Vec<u8>) {
        let (c, range) = self.r.read_frame().unwrap();
        (c, self.r.buffer()[range].to_vec())
    }

    /// Bind's answer: Ok(port) for BindOK, Err(text) for Error.
    pub fn bind(&mut self, port: u16) -> Result<u16, String> {
        self.send(cmd::BIND, &[&port.to_be_bytes()]);
        match self.frame() {
            (cmd::BIND_OK, p) => Ok(u16::from_be_bytes([p[0], p[1]])),
            (cmd::ERROR, p) => Err(ipc::error_text(&p)),
            (c, _) => panic!("unexpected 0x{c:02X} after Bind"),
        }
    }

    pub fn accept(&mut self) -> ipc::Accept {
        let (c, p) = self.frame();
        assert_eq!(c, cmd::ACCEPT, "expected Accept");
        ipc::parse_accept(&p).unwrap()
    }

    /// Recv data of `conn` until `len` bytes have come.
    pub fn recv(&mut self, conn: u32, len: usize) -> Vec<u8> {
        let mut data = Vec::new();
        while data.len() < len {
            let (c, p) = self.frame();
            assert_eq!(c, cmd::RECV, "expected Recv");
            assert_eq!(ipc::be_u32(&p), Some(conn));
            assert!(p.len() - 4 <= 4096, "Recv frames carry at most 4096 data bytes");
            data.extend_from_slice(&p[4..]);
        }
        data
    }
}

/// Another host: a network namespace (held open by a `sleep` child) with
/// a veth link to ours, 192.168.77.2 there and 192.168.77.1 here, that
/// routes the gateway's subnet to us, as a neighbour on the LAN could.
pub struct OtherHost {
    _holder: Proc,
    ns: PathBuf,
}

impl OtherHost {
    pub fn new(dir: &TempDir) -> OtherHost {
        let holder = Proc::spawn(
            Command::new("unshare").args(["--net", "sleep", "120"]),
            dir.path("other-host.log"),
        );
        let pid = holder.pid().to_string();
        let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let ours = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || std::fs::read_link(&ns)
                .is_ok_and(|l| l != ours)),
            "the other host's namespace did not appear"
        );
        run_ok(
            "ip",
            &["link", "add", "pgw-a", "type", "veth", "peer", "name", "pgw-b"],
        );
        run_ok("ip", &["link", "set", "pgw-b", "netns", &pid]);
        run_ok("ip", &["addr", "add", "192.168.77.1/24", "dev", "pgw-a"]);
        run_ok("ip", &["link", "set", "pgw-a", "up"]);
        let net = format!("--net={}", ns.display());
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", "192.168.77.2/24", "dev", "pgw-b"],
            &["link", "set", "pgw-b", "up"],
            &["route", "add", "10.4.0.0/16", "via", "192.168.77.1"],
        ] {
            let mut a = vec![net.as_str(), "ip"];
            a.extend_from_slice(args);
            run_ok("nsenter", &a);
        }
        OtherHost { _holder: holder, ns }
    }

    /// Runs `f` on a thread inside the other host's namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = self.ns.clone();
        thread::spawn(move || {
            let file = std::fs::File::open(&ns).unwrap();
            // SAFETY: setns moves only this thread into the namespace.
            let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}
