//! `make bench`: pilot-gateway measured side by side with the paths a user
//! could take instead, in one run, on this machine.
//!
//! - direct:  client → service (the machine's own reference)
//! - devd:    client speaks IPC to pilot-devd itself (the daemon path
//!   without the gateway, as an overlay-native program would)
//! - gateway: client → pilot-gateway → pilot-devd → service
//! - socat:   client → socat TCP relay → service
//!
//! Run it through `scripts/bench.sh`, which makes a private network
//! namespace (the gateway binds 10.4.0.1) and installs socat. Results go to
//! stdout as a table and to `target/bench/latest.json`. The targets are
//! reported, never asserted: these machines are shared and noisy.
//!
//! The gateway route is the glibc release build. The binary shipped for
//! small hosts (`make static`, musl) holds idle connections at a different
//! cost (see THREAD_STACK in src/relay.rs), so when scripts/bench.sh could
//! build it (BENCH_STATIC_BIN) a second gateway runs it on the same devd
//! and its idle cost is measured the same way.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use pilot_gateway::address::PilotAddr;
use pilot_gateway::ipc::{self, cmd, FrameReader};
use pilot_gateway::json::Value;

const AGENT: &str = "0:0000.0000.0004";
const SOURCE: u16 = 9001; // 8-byte length N, then N bytes to the client, close
const SINK: u16 = 9002; // 8-byte length N, N bytes from the client, 8-byte reply, close
const ONCE: u16 = 9003; // 1 KiB in, 1 KiB out, close
const STREAM: u16 = 9004; // 1 KiB in, 1 KiB out, repeated
const HOLD: u16 = 9005; // 1 byte in, 1 byte out, then hold until a second byte
const TICK: u16 = 9006; // 1 byte in, 1 byte out, close
const CHURN: u16 = 9007; // 16 bytes in, 16 bytes out, then silent until the peer closes
const PORTS: [u16; 7] = [SOURCE, SINK, ONCE, STREAM, HOLD, TICK, CHURN];
/// A thread's kernel stack on x86-64 (THREAD_SIZE), not counted in RSS.
const KERNEL_STACK_KIB: u64 = 16;
/// The churn gateways' second agent, whose dials take as long as the real
/// daemon's (PROTOCOL.md: ~11 ms of dial polling per new connection): the
/// sequential-connections row, what issue 19 asked to keep within 10 %
/// on the real daemon (40 sequential curls, 92 ms each there).
const SLOW_AGENT: &str = "0:0000.0000.0005";
const REAL_DIAL_MS: &str = "11";

/// The connection cap of the client-churn row (gateway, devd, socat).
const CHURN_CAP: u64 = 100;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------- services

fn serve(port: u16, handler: fn(TcpStream) -> io::Result<()>) {
    let l = TcpListener::bind(("127.0.0.1", port)).expect("bind service");
    thread::spawn(move || {
        for c in l.incoming().flatten() {
            let _ = c.set_nodelay(true);
            let _ = thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || handler(c));
        }
    });
}

fn read_len(c: &mut TcpStream) -> io::Result<u64> {
    let mut b = [0u8; 8];
    c.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn source(mut c: TcpStream) -> io::Result<()> {
    let mut left = read_len(&mut c)?;
    let buf = vec![0x5Au8; 256 << 10];
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        c.write_all(&buf[..k])?;
        left -= k as u64;
    }
    Ok(())
}

fn sink(mut c: TcpStream) -> io::Result<()> {
    let mut left = read_len(&mut c)?;
    let mut buf = vec![0u8; 256 << 10];
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        let n = c.read(&mut buf[..k])?;
        if n == 0 {
            return Ok(());
        }
        left -= n as u64;
    }
    c.write_all(&[1; 8])
}

fn once(mut c: TcpStream) -> io::Result<()> {
    let mut b = [0u8; 1024];
    c.read_exact(&mut b)?;
    c.write_all(&b)
}

fn stream(mut c: TcpStream) -> io::Result<()> {
    let mut b = [0u8; 1024];
    loop {
        c.read_exact(&mut b)?;
        c.write_all(&b)?;
    }
}

fn hold(mut c: TcpStream) -> io::Result<()> {
    let mut b = [0u8; 1];
    c.read_exact(&mut b)?;
    c.write_all(&b)?;
    // The second byte says goodbye: pilot streams carry no half-close, so
    // the client's close alone would not reach us.
    c.read_exact(&mut b)
}

fn tick(mut c: TcpStream) -> io::Result<()> {
    let mut b = [0u8; 1];
    c.read_exact(&mut b)?;
    c.write_all(&b)
}

/// An agent that answers once and then stays silent: only the peer's close
/// (or two minutes) ends its side, as with a server holding keep-alive.
fn churn(mut c: TcpStream) -> io::Result<()> {
    let mut b = [0u8; 16];
    c.read_exact(&mut b)?;
    c.write_all(&b)?;
    c.set_read_timeout(Some(Duration::from_secs(120)))?;
    while c.read(&mut b)? > 0 {}
    Ok(())
}

// ------------------------------------------------------------------- paths

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Direct,
    Devd,
    Gateway,
    Socat,
}

const ROUTES: [Route; 4] = [Route::Direct, Route::Devd, Route::Gateway, Route::Socat];

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Devd => "devd",
            Route::Gateway => "gateway",
            Route::Socat => "socat",
        }
    }
}

trait Duplex: Read + Write + Send {}
impl<T: Read + Write + Send> Duplex for T {}

/// A pilot stream spoken directly over IPC, as an overlay-native client.
struct DevdConn {
    reader: FrameReader<UnixStream>,
    writer: UnixStream,
    id: u32,
    out: Vec<u8>,
    /// Payload bytes of the current Recv frame not yet handed out.
    pending: std::ops::Range<usize>,
    closed: bool,
}

impl Read for DevdConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pending.is_empty() {
            if self.closed {
                return Ok(0);
            }
            let (c, r) = self
                .reader
                .read_frame()
                .map_err(|e| io::Error::other(e.to_string()))?;
            match c {
                cmd::RECV => self.pending = r.start + 4..r.end,
                cmd::CLOSE_OK => self.closed = true,
                other => return Err(io::Error::other(format!("unexpected 0x{other:02X}"))),
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.reader.buffer()[self.pending.start..self.pending.start + n]);
        self.pending.start += n;
        Ok(n)
    }
}

impl Write for DevdConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(64 << 10);
        self.out.clear();
        self.out.resize(ipc::DATA_HEADER + n, 0);
        self.out[ipc::DATA_HEADER..].copy_from_slice(&buf[..n]);
        ipc::put_send_header(&mut self.out, self.id, n);
        self.writer.write_all(&self.out)?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where each route's connections go.
struct Env {
    socket: PathBuf,
    gateway_ip: &'static str,
    socat_ip: &'static str,
}

fn open(env: &Env, route: Route, port: u16) -> io::Result<Box<dyn Duplex>> {
    let tcp = |host: &str| -> io::Result<Box<dyn Duplex>> {
        let s = TcpStream::connect((host, port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Box::new(s))
    };
    match route {
        Route::Direct => tcp("127.0.0.1"),
        Route::Gateway => tcp(env.gateway_ip),
        Route::Socat => tcp(env.socat_ip),
        Route::Devd => {
            // A data session as the relay opens one: a Dial, then frames.
            let writer = UnixStream::connect(&env.socket)?;
            writer.set_read_timeout(Some(Duration::from_secs(30)))?;
            let agent: PilotAddr = AGENT.parse().map_err(|e| io::Error::other(format!("{e}")))?;
            (&writer).write_all(&ipc::encode(cmd::DIAL, &[&agent.to_wire(), &port.to_be_bytes()]))?;
            let mut reader = FrameReader::new(writer.try_clone()?, ipc::READ_BUFFER);
            let (c, range) = reader.read_frame().map_err(|e| io::Error::other(e.to_string()))?;
            let id =
                ipc::dial_reply(c, &reader.buffer()[range]).map_err(|e| io::Error::other(e.to_string()))?;
            Ok(Box::new(DevdConn {
                reader,
                writer,
                id,
                out: Vec::new(),
                pending: 0..0,
                closed: false,
            }))
        }
    }
}

// --------------------------------------------------------------- scenarios

fn download(env: &Env, route: Route, bytes: u64) -> io::Result<f64> {
    let t = Instant::now();
    let mut c = open(env, route, SOURCE)?;
    c.write_all(&bytes.to_be_bytes())?;
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0u64;
    while got < bytes {
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::other(format!("download ended after {got} bytes")));
        }
        got += n as u64;
    }
    Ok(bytes as f64 / t.elapsed().as_secs_f64() / 1e6)
}

fn upload(env: &Env, route: Route, bytes: u64) -> io::Result<f64> {
    let t = Instant::now();
    let mut c = open(env, route, SINK)?;
    c.write_all(&bytes.to_be_bytes())?;
    let buf = vec![0xA5u8; 256 << 10];
    let mut sent = 0u64;
    while sent < bytes {
        let k = (bytes - sent).min(buf.len() as u64) as usize;
        c.write_all(&buf[..k])?;
        sent += k as u64;
    }
    let mut reply = [0u8; 8];
    c.read_exact(&mut reply)?;
    Ok(bytes as f64 / t.elapsed().as_secs_f64() / 1e6)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// New-connection latency in µs: (p50, p99, max).
fn latency(env: &Env, route: Route, n: u64) -> io::Result<(f64, f64, f64)> {
    let mut samples = Vec::with_capacity(n as usize);
    let msg = [7u8; 1024];
    let mut back = [0u8; 1024];
    for _ in 0..n {
        let t = Instant::now();
        let mut c = open(env, route, ONCE)?;
        c.write_all(&msg)?;
        c.read_exact(&mut back)?;
        drop(c);
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    Ok((
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1],
    ))
}

/// Round trips per second on one kept connection.
fn request_rate(env: &Env, route: Route, secs: f64) -> io::Result<f64> {
    let mut c = open(env, route, STREAM)?;
    let msg = [7u8; 1024];
    let mut back = [0u8; 1024];
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed().as_secs_f64() < secs {
        c.write_all(&msg)?;
        c.read_exact(&mut back)?;
        n += 1;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Connections per second with `threads` parallel clients for `secs`.
fn accept_rate(env: &Arc<Env>, route: Route, threads: usize, secs: f64) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (env, done, errors, stop) = (env.clone(), done.clone(), errors.clone(), stop.clone());
            thread::spawn(move || {
                // Bounded by the stop flag, set after `secs`.
                while !stop.load(Relaxed) {
                    let ok = (|| -> io::Result<()> {
                        let mut c = open(&env, route, TICK)?;
                        c.write_all(&[1])?;
                        let mut b = [0u8; 1];
                        c.read_exact(&mut b)
                    })();
                    if ok.is_ok() {
                        done.fetch_add(1, Relaxed);
                    } else {
                        errors.fetch_add(1, Relaxed);
                        thread::sleep(Duration::from_millis(1));
                    }
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Relaxed);
    for w in workers {
        let _ = w.join();
    }
    (
        done.load(Relaxed) as f64 / t.elapsed().as_secs_f64(),
        errors.load(Relaxed),
    )
}

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system, seconds) one process has used, its ended
/// threads included (/proc/PID/stat fields 14 and 15, in clock ticks of
/// 1/100 s: `sysconf(_SC_CLK_TCK)` is 100 on Linux).
fn proc_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // "pid (comm) state ppid …": comm may hold spaces; fields count after it.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

/// The open descriptors of `pid`: number → what it is (link target).
fn proc_fds(pid: u32) -> std::collections::BTreeMap<String, String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Default::default();
    };
    dir.filter_map(Result::ok)
        .map(|e| {
            let what =
                std::fs::read_link(e.path()).map_or_else(|e| e.to_string(), |p| p.display().to_string());
            (e.file_name().to_string_lossy().into_owned(), what)
        })
        .collect()
}

#[derive(Clone)]
struct Level {
    conns: u64,
    errors: u64,
    rss_kib: u64,
    threads: u64,
    /// pilot-devd's RSS and threads at the same moment: the daemon's share
    /// of the same connections, which an overlay-native client costs too.
    devd_rss_kib: u64,
    devd_threads: u64,
}

/// Holds `levels` of bridged connections open at once through the gateway;
/// returns the gateway's footprint at baseline, each level, and after.
fn concurrency(env: &Env, pids: (u32, u32), levels: &[u64]) -> Concurrency {
    let (gw_pid, devd_pid) = pids;
    let snap = |conns, errors| {
        let ((rss_kib, threads), (devd_rss_kib, devd_threads)) = (footprint(gw_pid), footprint(devd_pid));
        Level {
            conns,
            errors,
            rss_kib,
            threads,
            devd_rss_kib,
            devd_threads,
        }
    };
    let base = snap(0, 0);
    let fds_before = proc_fds(gw_pid);
    let mut held: Vec<Box<dyn Duplex>> = Vec::new();
    let mut errors = 0;
    let mut out = Vec::new();
    for &level in levels {
        while (held.len() as u64) < level {
            match hold_one(env, Route::Gateway) {
                Ok(c) => held.push(c),
                Err(e) => {
                    if errors == 0 {
                        eprintln!("concurrency: first error after {} connections: {e}", held.len());
                    }
                    errors += 1;
                    if errors > level {
                        break;
                    }
                }
            }
        }
        thread::sleep(Duration::from_millis(500));
        out.push(snap(held.len() as u64, errors));
    }
    for mut c in held.drain(..) {
        let _ = c.write_all(&[2]); // goodbye: the agent closes its side
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && proc_status(gw_pid, "Threads:") > base.threads {
        thread::sleep(Duration::from_millis(100));
    }
    // The gateway returns freed memory every few seconds after a burst.
    let deadline = Instant::now() + Duration::from_secs(12);
    while Instant::now() < deadline && proc_status(gw_pid, "VmRSS:") > base.rss_kib + 16 * 1024 {
        thread::sleep(Duration::from_millis(200));
    }
    // The close poller keeps its daemon session (two descriptors) for 5 s
    // after the last close it confirmed (`closing::IDLE_KEEP`).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && proc_fds(gw_pid).len() > fds_before.len() {
        thread::sleep(Duration::from_millis(200));
    }
    let after = snap(0, errors);
    let fds_after = proc_fds(gw_pid);
    let left: Vec<_> = fds_after
        .iter()
        .filter(|(fd, _)| !fds_before.contains_key(*fd))
        .collect();
    if !left.is_empty() {
        eprintln!("concurrency: descriptors left over in the gateway: {left:?}");
    }
    let fds_left = (fds_after.len() as u64).saturating_sub(fds_before.len() as u64);
    (base, out, after, fds_left)
}

/// Sequential short connections that the client closes first while the
/// agent stays silent: (replies per second, refusals, attempts). A refusal
/// is a connection that ended (reset or EOF) or failed before the reply.
fn client_churn(env: &Env, route: Route, secs: f64) -> (f64, u64, u64) {
    let (ok, refused, took) = churn_turn(env, route, secs);
    (ok as f64 / took, refused, ok + refused)
}

/// One run of [`client_churn`]: (replies, refusals, seconds taken).
fn churn_turn(env: &Env, route: Route, secs: f64) -> (u64, u64, f64) {
    let msg = [3u8; 16];
    let t = Instant::now();
    let (mut ok, mut refused) = (0u64, 0u64);
    // Bounded by time and by attempts (refusals can be very fast).
    while t.elapsed().as_secs_f64() < secs && ok + refused < 50_000 {
        let reply = open(env, route, CHURN).and_then(|mut c| {
            c.write_all(&msg)?;
            let mut b = [0u8; 16];
            c.read_exact(&mut b)
        });
        match reply {
            Ok(()) => ok += 1,
            Err(_) => refused += 1,
        }
    }
    (ok, refused, t.elapsed().as_secs_f64())
}

/// The churn gateway with a confirmed close and its twin with an immediate
/// one, measured in turns (A B B A, a quarter of `secs` each: the load of
/// a shared machine drifts within a run, and what one turn leaves
/// lingering weighs on the next as much one way as the other): for each,
/// the figures of [`client_churn`] over `secs`, and the CPU time its
/// gateway and daemon (`pids`) used per reply, in µs — a figure that the
/// machine's other load hardly moves, unlike the rate.
fn churn_pair(envs: [&Env; 2], pids: [[u32; 2]; 2], secs: f64) -> [((f64, u64, u64), f64); 2] {
    let cpu = |i: usize| pids[i].iter().map(|&p| proc_cpu(p)).sum::<f64>();
    let cpu_before = [cpu(0), cpu(1)];
    // Per path: (replies, refusals, seconds).
    let mut sums = [(0u64, 0u64, 0.0f64); 2];
    for i in [0, 1, 1, 0] {
        let (ok, refused, took) = churn_turn(envs[i], Route::Gateway, secs / 4.0);
        sums[i] = (sums[i].0 + ok, sums[i].1 + refused, sums[i].2 + took);
    }
    // What the last turns left lingering (the confirmed closes) is done
    // within the close poller's few rounds.
    thread::sleep(Duration::from_millis(500));
    [0, 1].map(|i| {
        let (ok, refused, took) = sums[i];
        let per_reply = (cpu(i) - cpu_before[i]) * 1e6 / ok.max(1) as f64;
        ((ok as f64 / took.max(1e-9), refused, ok + refused), per_reply)
    })
}

/// Sequential connections as a user's `curl`s make them, to an agent whose
/// every dial takes the real daemon's time ([`REAL_DIAL_MS`]): each
/// connects, sends a request, reads the answer and closes, and only then
/// the next starts. Through the churn gateway (confirmed close) and its
/// twin (immediate close), `n` each, in turns (A B B A): the mean
/// milliseconds per connection of each, and the connections that failed.
fn sequential_pair(envs: [&Env; 2], n: u64) -> ([f64; 2], u64) {
    let msg = [3u8; 16];
    let mut sums = [(0u64, 0.0f64); 2];
    let mut failed = 0;
    for i in [0, 1, 1, 0] {
        for _ in 0..n.div_ceil(4) {
            let t = Instant::now();
            let reply = open(envs[i], Route::Gateway, CHURN).and_then(|mut c| {
                c.write_all(&msg)?;
                let mut b = [0u8; 16];
                c.read_exact(&mut b)
            });
            match reply {
                Ok(()) => sums[i] = (sums[i].0 + 1, sums[i].1 + t.elapsed().as_secs_f64()),
                Err(_) => failed += 1,
            }
        }
    }
    (sums.map(|(k, secs)| secs * 1e3 / k.max(1) as f64), failed)
}

/// RSS (KiB) and threads of one process.
fn footprint(pid: u32) -> (u64, u64) {
    (proc_status(pid, "VmRSS:"), proc_status(pid, "Threads:"))
}

/// The children of `parent` (socat's forked relays).
fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // /proc/PID/stat: "pid (comm) state ppid …"; comm may hold spaces.
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
                st.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

/// socat's cost for its open connections: the summed PSS (KiB; RSS would
/// count the shared libraries once per process) and thread count of its
/// forked children.
fn socat_footprint(listener: u32) -> (u64, u64) {
    children(listener).iter().fold((0, 0), |(kib, threads), &pid| {
        let pss = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        (kib + pss, threads + proc_status(pid, "Threads:"))
    })
}

/// Opens one held connection on `route` (1 byte there and back).
fn hold_one(env: &Env, route: Route) -> io::Result<Box<dyn Duplex>> {
    let mut c = open(env, route, HOLD)?;
    c.write_all(&[1])?;
    let mut b = [0u8; 1];
    c.read_exact(&mut b)?;
    Ok(c)
}

/// Idle connections held through socat at each level: per level, socat's
/// (connections, PSS KiB, threads) for those connections.
fn socat_idle(env: &Env, listener: u32, levels: &[u64]) -> Vec<(u64, u64, u64)> {
    let mut held = Vec::new();
    let mut out = Vec::new();
    let mut errors = 0;
    for &level in levels {
        while (held.len() as u64) < level && errors <= level {
            match hold_one(env, Route::Socat) {
                Ok(c) => held.push(c),
                Err(_) => errors += 1,
            }
        }
        // Every forked relay has started once they are all counted.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && (children(listener).len() as u64) < held.len() as u64 {
            thread::sleep(Duration::from_millis(50));
        }
        let (kib, threads) = socat_footprint(listener);
        out.push((held.len() as u64, kib, threads));
    }
    for mut c in held.drain(..) {
        let _ = c.write_all(&[2]);
    }
    out
}

// ------------------------------------------------------------------ set-up

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "{what} did not come up");
        thread::sleep(Duration::from_millis(20));
    }
}

fn raise_fd_limit() {
    let lim = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: 1 << 20,
    };
    // SAFETY: setrlimit with a valid struct; failure leaves the old limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        let lim = libc::rlimit {
            rlim_cur: 65536,
            rlim_max: 65536,
        };
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// `a ÷ b` for the ratio column ("-" when `b` was not measured).
fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "-".into() // not applicable to this route
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The side-by-side rows: printed as a table, kept for the JSON.
#[derive(Default)]
struct Table {
    rows: Vec<(String, [String; 4], String)>,
    results: Vec<(String, Value)>,
}

impl Table {
    /// `vals` per route (direct, devd, gateway, socat); NaN where the
    /// figure does not apply. Ratios are the gateway's over each other.
    fn row(&mut self, name: &str, unit: &str, vals: [f64; 4], higher_better: bool) {
        let g = vals[2];
        let ratios = [1, 0, 3].map(|i| ratio(g, vals[i])).join(" / ");
        self.row_with(name, unit, vals, higher_better, ratios);
    }

    /// A row with its own text in the ratio column.
    fn row_with(&mut self, name: &str, unit: &str, vals: [f64; 4], higher_better: bool, ratios: String) {
        self.rows
            .push((format!("{name} ({unit})"), vals.map(fmt), ratios));
        self.results.push((
            name.to_string(),
            Value::obj([
                ("unit", Value::from(unit)),
                ("higher_is_better", higher_better.into()),
                ("direct", vals[0].into()),
                ("devd", vals[1].into()),
                ("gateway", vals[2].into()),
                ("socat", vals[3].into()),
            ]),
        ));
    }

    /// A row whose figures could not be measured, with why.
    fn note(&mut self, name: &str, unit: &str, why: &str) {
        let dashes = [(); 4].map(|_| "-".to_string());
        self.rows.push((format!("{name} ({unit})"), dashes, why.into()));
        self.results.push((
            name.to_string(),
            Value::obj([("unit", Value::from(unit)), ("not_measured", why.into())]),
        ));
    }

    fn print(&self) {
        let w = self.rows.iter().map(|r| r.0.chars().count()).fold(34, usize::max);
        println!(
            "{:<w$} {:>10} {:>10} {:>10} {:>10}   gateway ÷ devd / direct / socat",
            "", "direct", "devd", "gateway", "socat"
        );
        for (name, v, ratios) in &self.rows {
            println!(
                "{name:<w$} {:>10} {:>10} {:>10} {:>10}   {ratios}",
                v[0], v[1], v[2], v[3]
            );
        }
    }
}

/// What to measure, from the environment.
struct Config {
    bin: PathBuf,
    bulk: u64,
    conns: u64,
    levels: [u64; 2],
    secs: f64,
    churn_secs: f64,
    /// Connections per gateway of the sequential row.
    sequential: u64,
    /// BENCH_ONLY=bulk,latency,rate,accept,churn,concurrency runs a subset
    /// (for quick comparisons while optimising); skipped figures read 0.
    only: String,
    /// The static musl gateway (`make static`), when scripts/bench.sh built it.
    static_bin: Option<PathBuf>,
}

impl Config {
    fn from_env() -> Config {
        Config {
            bin: PathBuf::from(std::env::var("BENCH_BIN").unwrap_or_else(|_| "target/release".into())),
            bulk: env_num("BENCH_BULK_MB", 1024) << 20,
            conns: env_num("BENCH_CONNS", 5000),
            levels: [env_num("BENCH_LEVEL1", 1000), env_num("BENCH_LEVEL2", 5000)],
            secs: 3.0,
            churn_secs: env_num("BENCH_CHURN_SECS", 2) as f64,
            sequential: env_num("BENCH_SEQUENTIAL", 100),
            only: std::env::var("BENCH_ONLY").unwrap_or_default(),
            static_bin: std::env::var_os("BENCH_STATIC_BIN")
                .map(PathBuf::from)
                .filter(|p| p.is_file()),
        }
    }

    fn on(&self, s: &str) -> bool {
        self.only.is_empty() || self.only.split(',').any(|o| o == s)
    }
}

/// The processes of one run; `Procs` reaps them when dropped.
struct Rig {
    work: PathBuf,
    procs: Procs,
    env: Arc<Env>,
    /// The client-churn row's paths, each capped at CHURN_CAP connections.
    churn_env: Env,
    /// The churn gateway's twin whose daemon has no `conn_list`: every
    /// Close at once (gateway route only).
    churn_immediate_env: Env,
    /// (gateway, daemon) pids of the confirmed and the immediate path.
    churn_pids: [[u32; 2]; 2],
    /// The same two gateways' mappings of [`SLOW_AGENT`].
    slow_envs: [Env; 2],
    gw_pid: u32,
    devd_pid: u32,
    /// socat's listener for HOLD, whose children are the idle relays.
    socat_hold_pid: u32,
    /// The static musl gateway's pid and where its HOLD listener is.
    musl: Option<(u32, Env)>,
}

fn start_devd(cfg: &Config, socket: &Path, max_clients: u64, extra: &[&str]) -> Child {
    let child = Command::new(cfg.bin.join("pilot-devd"))
        .arg("--socket")
        .arg(socket)
        .args(["--route", &format!("{AGENT}=127.0.0.1")])
        .args(["--max-clients", &max_clients.to_string()])
        .args(extra)
        .stderr(Stdio::null())
        .spawn()
        .expect("pilot-devd");
    wait_for("pilot-devd", || UnixStream::connect(socket).is_ok());
    child
}

fn start_socat(ip: &str, port: u16, options: &str) -> Child {
    let listen = format!("TCP-LISTEN:{port},bind={ip},fork,reuseaddr,backlog=4096{options}");
    Command::new("socat")
        .args([&listen, &format!("TCP:127.0.0.1:{port}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("socat: {e} (scripts/bench.sh installs it)"))
}

/// Runs pilot-gateway with a state directory under `work`.
fn gateway(cfg: &Config, work: &Path, state: &str, args: &[&str]) -> std::process::Output {
    run_gateway(&cfg.bin.join("pilot-gateway"), work, state, args)
}

/// The daemon socket of the gateway whose state directory is `state`: the
/// churn row's two gateways each have a pilot-devd of their own (their
/// `conn_list` holds only their own connections), every other gateway
/// shares the main one.
fn devd_socket(state: &str) -> &'static str {
    match state {
        CHURN_STATE => "devd-churn-confirmed.sock",
        CHURN_IMMEDIATE_STATE => "devd-churn-immediate.sock",
        _ => "devd.sock",
    }
}

const CHURN_STATE: &str = "state-churn";
const CHURN_IMMEDIATE_STATE: &str = "state-churn-immediate";

/// Runs the pilot-gateway binary `bin` with a state directory under `work`.
fn run_gateway(bin: &Path, work: &Path, state: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin)
        .arg("--state-dir")
        .arg(work.join(state))
        .arg("--socket")
        .arg(work.join(devd_socket(state)))
        .args(args)
        .output()
        .expect("pilot-gateway")
}

/// Starts a background gateway from binary `bin`; returns its pid.
fn start_gateway(bin: &Path, work: &Path, state: &str, args: &[&str]) -> u32 {
    let mut all = vec!["--json", "start"];
    all.extend_from_slice(args);
    let out = run_gateway(bin, work, state, &all);
    assert!(
        out.status.success(),
        "gateway: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pilot_gateway::json::parse(String::from_utf8_lossy(&out.stdout).trim())
        .ok()
        .and_then(|v| v.get("data")?.get("pid")?.as_u64())
        .expect("gateway pid") as u32
}

fn set_up(cfg: &Config) -> Rig {
    let work = std::env::temp_dir().join(format!("pilot-gateway-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");
    let handlers: [fn(TcpStream) -> io::Result<()>; 7] = [source, sink, once, stream, hold, tick, churn];
    for (port, h) in PORTS.iter().zip(handlers) {
        serve(*port, h);
    }
    let mut procs = Procs(Vec::new());
    let socket = work.join("devd.sock");
    procs.0.push(start_devd(cfg, &socket, 100_000, &[]));
    let devd_pid = procs.0[0].id();
    let churn_socket = work.join("devd-churn.sock");
    procs.0.push(start_devd(cfg, &churn_socket, CHURN_CAP, &[]));
    // The churn gateways' daemons: one as the Feb-2026 daemon (conn_list:
    // the gateway confirms delivery before each Close), one as a daemon
    // without conn_list (the gateway closes at once, as before issue 19).
    let mut churn_pids = [[0; 2]; 2];
    let slow_route = format!("{SLOW_AGENT}=127.0.0.1");
    let slow_dial = format!("{SLOW_AGENT}={REAL_DIAL_MS}");
    let slow = ["--route", &slow_route, "--dial-delay", &slow_dial];
    for (i, (state, extra)) in [
        (CHURN_STATE, &[][..]),
        (CHURN_IMMEDIATE_STATE, &["--no-conn-list"][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let extra = [&slow[..], extra].concat();
        let devd = start_devd(cfg, &work.join(devd_socket(state)), 100_000, &extra);
        churn_pids[i][1] = devd.id();
        procs.0.push(devd);
    }
    let mut socat_hold_pid = 0;
    for p in PORTS {
        let c = start_socat("127.0.0.2", p, "");
        if p == HOLD {
            socat_hold_pid = c.id();
        }
        procs.0.push(c);
    }
    procs.0.push(start_socat(
        "127.0.0.3",
        CHURN,
        &format!(",max-children={CHURN_CAP}"),
    ));
    let ports: Vec<String> = PORTS.iter().map(u16::to_string).collect();
    let gw_pid = start_gateway(
        &cfg.bin.join("pilot-gateway"),
        &work,
        "state",
        &["--ports", &ports.join(","), "--max-conns", "20000", AGENT],
    );
    let (churn_ports, cap) = (CHURN.to_string(), CHURN_CAP.to_string());
    for (i, (state, subnet, ips)) in [
        (CHURN_STATE, "10.5.0.0/16", ["10.5.0.1", "10.5.0.2"]),
        (CHURN_IMMEDIATE_STATE, "10.7.0.0/16", ["10.7.0.1", "10.7.0.2"]),
    ]
    .into_iter()
    .enumerate()
    {
        let args = [
            "--subnet",
            subnet,
            "--ports",
            &churn_ports,
            "--max-conns",
            &cap,
            AGENT,
            ips[0],
            SLOW_AGENT,
            ips[1],
        ];
        churn_pids[i][0] = start_gateway(&cfg.bin.join("pilot-gateway"), &work, state, &args);
    }
    let musl = start_musl(cfg, &work, &socket);
    wait_for("socat", || TcpStream::connect(("127.0.0.2", TICK)).is_ok());
    wait_for("socat", || TcpStream::connect(("127.0.0.3", CHURN)).is_ok());
    let env = Arc::new(Env {
        socket,
        gateway_ip: "10.4.0.1",
        socat_ip: "127.0.0.2",
    });
    let churn_env = Env {
        socket: churn_socket,
        gateway_ip: "10.5.0.1",
        socat_ip: "127.0.0.3",
    };
    let churn_immediate_env = Env {
        socket: PathBuf::new(),
        gateway_ip: "10.7.0.1",
        socat_ip: "127.0.0.3",
    };
    let slow_envs = ["10.5.0.2", "10.7.0.2"].map(|gateway_ip| Env {
        socket: PathBuf::new(),
        gateway_ip,
        socat_ip: "127.0.0.3",
    });
    Rig {
        work,
        procs,
        env,
        churn_env,
        churn_immediate_env,
        churn_pids,
        slow_envs,
        gw_pid,
        devd_pid,
        socat_hold_pid,
        musl,
    }
}

/// The static musl gateway, when built: HOLD only, on 10.6.0.1, on the
/// same devd as the release build.
fn start_musl(cfg: &Config, work: &Path, socket: &Path) -> Option<(u32, Env)> {
    let bin = cfg.static_bin.as_ref()?;
    let hold = HOLD.to_string();
    let args = [
        "--subnet",
        "10.6.0.0/16",
        "--ports",
        &hold,
        "--max-conns",
        "20000",
        AGENT,
    ];
    let pid = start_gateway(bin, work, "state-musl", &args);
    let env = Env {
        socket: socket.to_path_buf(),
        gateway_ip: "10.6.0.1",
        socat_ip: "127.0.0.2",
    };
    Some((pid, env))
}

/// Everything one run measures; skipped parts read 0 (or stay empty).
struct Figures {
    down: [f64; 4],
    up: [f64; 4],
    /// CPU per GiB moved (ms) of the daemon on the devd route and of
    /// gateway + daemon on the gateway route: download, upload.
    bulk_cpu: [[f64; 2]; 2],
    lat: Vec<(f64, f64, f64)>,
    rps: [f64; 4],
    acc: Vec<(f64, u64)>,
    /// Per route: (replies per second, refusals, attempts).
    churn: Vec<(f64, u64, u64)>,
    /// The same for the gateway whose daemon has no `conn_list` (every
    /// Close at once): the reference for the gateway's confirmed close.
    churn_immediate: (f64, u64, u64),
    /// CPU per reply (µs) of the churn gateway and its daemon: confirmed
    /// close, immediate close.
    churn_cpu: [f64; 2],
    /// [`sequential_pair`]: ms per connection (confirmed, immediate), and
    /// the connections that failed.
    sequential: ([f64; 2], u64),
    base: Level,
    levels: Vec<Level>,
    after: Level,
    fds_left: u64,
    /// Per level: socat's (connections, PSS KiB, threads).
    socat_idle: Vec<(u64, u64, u64)>,
    /// The static musl gateway's (baseline, levels, after, fds left over);
    /// None when it was not built.
    musl: Option<Concurrency>,
}

/// What `concurrency` measures: baseline, each level, after, fds left over.
type Concurrency = (Level, Vec<Level>, Level, u64);

fn measure(cfg: &Config, rig: &Rig) -> Figures {
    let env = &rig.env;
    let per = |f: &dyn Fn(Route) -> io::Result<f64>| {
        ROUTES.map(|r| f(r).unwrap_or_else(|e| panic!("{}: {e}", r.name())))
    };
    let zero = [0.0; 4];
    let bulk = cfg.on("bulk");
    // The CPU the daemon (and the gateway) used for each route's transfer:
    // a figure the machine's other load hardly moves, unlike the rates.
    let gib = cfg.bulk as f64 / f64::from(1u32 << 30);
    let with_cpu = |f: &dyn Fn(Route) -> io::Result<f64>| {
        let mut cpu = [f64::NAN; 2];
        let rates = ROUTES.map(|r| {
            let before = proc_cpu(rig.devd_pid) + proc_cpu(rig.gw_pid);
            let rate = f(r).unwrap_or_else(|e| panic!("{}: {e}", r.name()));
            let used = proc_cpu(rig.devd_pid) + proc_cpu(rig.gw_pid) - before;
            match r {
                Route::Devd => cpu[0] = used * 1000.0 / gib,
                Route::Gateway => cpu[1] = used * 1000.0 / gib,
                _ => {}
            }
            rate
        });
        (rates, cpu)
    };
    let no_cpu = [f64::NAN; 2];
    let (down, down_cpu) = if bulk {
        with_cpu(&|r| download(env, r, cfg.bulk))
    } else {
        (zero, no_cpu)
    };
    let (up, up_cpu) = if bulk {
        with_cpu(&|r| upload(env, r, cfg.bulk))
    } else {
        (zero, no_cpu)
    };
    let lat = if cfg.on("latency") {
        ROUTES
            .iter()
            .map(|&r| latency(env, r, cfg.conns).unwrap_or_else(|e| panic!("{}: {e}", r.name())))
            .collect()
    } else {
        vec![(0.0, 0.0, 0.0); 4]
    };
    let rps = if cfg.on("rate") {
        per(&|r| request_rate(env, r, cfg.secs))
    } else {
        zero
    };
    let acc = if cfg.on("accept") {
        ROUTES
            .iter()
            .map(|&r| accept_rate(env, r, 32, cfg.secs))
            .collect()
    } else {
        vec![(0.0, 0); 4]
    };
    let (churn, churn_immediate, churn_cpu) = if cfg.on("churn") {
        let mut rows: Vec<_> = ROUTES
            .iter()
            .filter(|&&r| r != Route::Gateway)
            .map(|&r| client_churn(&rig.churn_env, r, cfg.churn_secs))
            .collect();
        let envs = [&rig.churn_env, &rig.churn_immediate_env];
        let [(confirmed, cpu_c), (immediate, cpu_i)] = churn_pair(envs, rig.churn_pids, cfg.churn_secs);
        rows.insert(2, confirmed);
        (rows, immediate, [cpu_c, cpu_i])
    } else {
        (vec![(0.0, 0, 0); 4], (0.0, 0, 0), [0.0; 2])
    };
    let sequential = if cfg.on("churn") {
        let [a, b] = &rig.slow_envs;
        sequential_pair([a, b], cfg.sequential)
    } else {
        ([0.0; 2], 0)
    };
    // The churn gateways' held connections must not weigh on what follows.
    for state in [CHURN_STATE, CHURN_IMMEDIATE_STATE] {
        let _ = gateway(cfg, &rig.work, state, &["stop"]);
    }
    let levels: &[u64] = if cfg.on("concurrency") { &cfg.levels } else { &[] };
    if !levels.is_empty() {
        wait_idle(cfg, &rig.work);
    }
    let (base, levels_out, after, fds_left) = concurrency(env, (rig.gw_pid, rig.devd_pid), levels);
    let socat_idle = socat_idle(env, rig.socat_hold_pid, levels);
    let musl = (rig.musl.as_ref()).map(|(pid, musl_env)| concurrency(musl_env, (*pid, rig.devd_pid), levels));
    Figures {
        down,
        up,
        bulk_cpu: [down_cpu, up_cpu],
        lat,
        rps,
        acc,
        churn,
        churn_immediate,
        churn_cpu,
        sequential,
        base,
        levels: levels_out,
        after,
        fds_left,
        socat_idle,
        musl,
    }
}

/// Waits (at most 40 s) until the gateway holds no connection: one whose
/// client closed first stays until the agent closes or the half-closed
/// limit (30 s) passes, and would count in the idle baseline.
fn wait_idle(cfg: &Config, work: &Path) {
    let active = || {
        let out = gateway(cfg, work, "state", &["--json", "status"]);
        pilot_gateway::json::parse(String::from_utf8_lossy(&out.stdout).trim())
            .ok()
            .and_then(|v| v.get("data")?.get("active")?.as_u64())
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    while active() != Some(0) {
        if Instant::now() >= deadline {
            eprintln!("note: the gateway still holds connections: the idle baseline includes them");
            return;
        }
        thread::sleep(Duration::from_millis(250));
    }
}

fn speed_rows(t: &mut Table, f: &Figures) {
    let lat = &f.lat;
    let acc = &f.acc;
    t.row("download 1 conn", "MB/s", f.down, true);
    t.row("upload 1 conn", "MB/s", f.up, true);
    for (name, [devd, gw]) in ["download", "upload"].iter().zip(f.bulk_cpu) {
        t.row_with(
            &format!("{name}, daemon (+gateway) CPU"),
            "ms/GiB",
            [f64::NAN, devd, gw, f64::NAN],
            false,
            format!("gateway+daemon ÷ daemon alone {}", ratio(gw, devd)),
        );
    }
    t.row(
        "new conn p50",
        "µs",
        [lat[0].0, lat[1].0, lat[2].0, lat[3].0],
        false,
    );
    t.row(
        "new conn p99",
        "µs",
        [lat[0].1, lat[1].1, lat[2].1, lat[3].1],
        false,
    );
    t.row(
        "new conn max",
        "µs",
        [lat[0].2, lat[1].2, lat[2].2, lat[3].2],
        false,
    );
    t.row("round trips, kept conn", "/s", f.rps, true);
    t.row(
        "accept rate, 32 clients",
        "conn/s",
        [acc[0].0, acc[1].0, acc[2].0, acc[3].0],
        true,
    );
}

/// Client churn (replies per second, refused share) and the cost of an
/// idle connection (RSS, and RSS plus kernel stacks, per connection).
fn churn_and_idle_rows(t: &mut Table, f: &Figures) {
    let c = &f.churn;
    let refused = |i: usize| 100.0 * c[i].1 as f64 / c[i].2.max(1) as f64;
    t.row(
        &format!("client churn, cap {CHURN_CAP}"),
        "conn/s",
        [c[0].0, c[1].0, c[2].0, c[3].0],
        true,
    );
    t.row("client churn refused", "%", [0, 1, 2, 3].map(refused), false);
    // The reference of the confirmed close: the same gateway on a daemon
    // without conn_list, which closes at once (gateway column only; the
    // ratio is the row above's gateway over this one).
    let imm = f.churn_immediate;
    t.row_with(
        "client churn, immediate close",
        "conn/s",
        [f64::NAN, f64::NAN, imm.0, f64::NAN],
        true,
        format!("confirmed ÷ immediate {}", ratio(c[2].0, imm.0)),
    );
    let [cpu_c, cpu_i] = f.churn_cpu;
    t.row_with(
        "client churn, gateway+daemon CPU",
        "µs/conn",
        [f64::NAN, f64::NAN, cpu_c, f64::NAN],
        false,
        format!("immediate {} ({} ÷ immediate)", fmt(cpu_i), ratio(cpu_c, cpu_i)),
    );
    let ([seq_c, seq_i], failed) = f.sequential;
    t.row_with(
        &format!("sequential conns, {REAL_DIAL_MS} ms dial"),
        "ms/conn",
        [f64::NAN, f64::NAN, seq_c, f64::NAN],
        false,
        format!(
            "immediate {} (confirmed ÷ immediate {}), {failed} failed",
            fmt(seq_i),
            ratio(seq_c, seq_i)
        ),
    );
    idle_rows(t, f, (&f.base, &f.levels), "", true);
}

/// Per connection between a baseline and a level: (RSS, RSS + kernel
/// stacks) in KiB.
fn per_conn(kib: u64, base_kib: u64, threads: u64, base_threads: u64, n: u64) -> (f64, f64) {
    let rss = kib.saturating_sub(base_kib) as f64 / n.max(1) as f64;
    let stacks = (threads.saturating_sub(base_threads) * KERNEL_STACK_KIB) as f64 / n.max(1) as f64;
    (rss, rss + stacks)
}

/// The idle-cost rows of one gateway build (`label` after the level):
/// the gateway from its run, socat's relays at the same level, and devd
/// only for the first run (`with_devd`): the daemon is not back at its
/// baseline after it, so a later run's devd figures would mislead.
fn idle_rows(t: &mut Table, f: &Figures, run: (&Level, &[Level]), label: &str, with_devd: bool) {
    let (b, levels) = run;
    for (i, l) in levels.iter().enumerate() {
        let gw = per_conn(l.rss_kib, b.rss_kib, l.threads, b.threads, l.conns);
        let devd = if with_devd {
            per_conn(
                l.devd_rss_kib,
                b.devd_rss_kib,
                l.devd_threads,
                b.devd_threads,
                l.conns,
            )
        } else {
            (f64::NAN, f64::NAN)
        };
        let socat = f
            .socat_idle
            .get(i)
            .map_or((0.0, 0.0), |&(n, kib, threads)| per_conn(kib, 0, threads, 0, n));
        let n = l.conns;
        t.row(
            &format!("idle RSS, {n} conns{label}"),
            "KiB/conn",
            [f64::NAN, devd.0, gw.0, socat.0],
            false,
        );
        t.row(
            &format!("idle RSS+kstacks, {n}{label}"),
            "KiB/conn",
            [f64::NAN, devd.1, gw.1, socat.1],
            false,
        );
    }
}

const MUSL_LABEL: &str = ", static musl";
const MUSL_MISSING: &str = "not built (rustup target add x86_64-unknown-linux-musl)";

/// The static musl gateway's idle rows, or why they are missing.
fn musl_rows(t: &mut Table, f: &Figures, cfg: &Config) {
    match &f.musl {
        Some((base, levels, _, _)) => idle_rows(t, f, (base, levels), MUSL_LABEL, false),
        None if cfg.on("concurrency") => {
            for n in cfg.levels {
                t.note(
                    &format!("idle RSS, {n} conns{MUSL_LABEL}"),
                    "KiB/conn",
                    MUSL_MISSING,
                );
                t.note(
                    &format!("idle RSS+kstacks, {n}{MUSL_LABEL}"),
                    "KiB/conn",
                    MUSL_MISSING,
                );
            }
        }
        None => {}
    }
}

/// Prints one gateway's footprint at each level; returns it as JSON.
fn print_concurrency(what: &str, run: &Concurrency) -> Value {
    let (base, levels, after, fds_left) = run;
    println!(
        "\nconcurrency through {what} (baseline RSS {} KiB, {} threads):",
        base.rss_kib, base.threads
    );
    let mut levels_json = Vec::new();
    for l in levels {
        let per_conn = (l.rss_kib.saturating_sub(base.rss_kib)) as f64 / l.conns.max(1) as f64;
        let extra_threads = l.threads as i64 - base.threads as i64 - 2 * l.conns as i64;
        println!(
            "  {:>5} connections: {} errors, RSS {} KiB ({:.1} KiB per connection), {} threads (2 per connection {:+})",
            l.conns, l.errors, l.rss_kib, per_conn, l.threads, extra_threads
        );
        levels_json.push(Value::obj([
            ("connections", Value::from(l.conns)),
            ("errors", l.errors.into()),
            ("rss_kib", l.rss_kib.into()),
            ("rss_per_conn_kib", per_conn.into()),
            ("threads", l.threads.into()),
            ("devd_rss_kib", l.devd_rss_kib.into()),
            ("devd_threads", l.devd_threads.into()),
        ]));
    }
    println!(
        "  after closing: RSS {} KiB, {} threads (baseline {}), {} descriptors left over",
        after.rss_kib, after.threads, base.threads, fds_left
    );
    Value::obj([
        ("baseline_rss_kib", Value::from(base.rss_kib)),
        ("baseline_threads", base.threads.into()),
        ("levels", Value::Arr(levels_json)),
        ("after_rss_kib", after.rss_kib.into()),
        ("after_threads", after.threads.into()),
        ("fds_left", (*fds_left).into()),
    ])
}

/// RSS per connection at the last level.
fn last_per_conn(base: &Level, levels: &[Level]) -> f64 {
    levels.last().map_or(0.0, |l| {
        (l.rss_kib.saturating_sub(base.rss_kib)) as f64 / l.conns.max(1) as f64
    })
}

/// The targets of issues 4 and 12 (and later ones), informational. A
/// verdict is `None` when its scenario was left out (`BENCH_ONLY`) or, for
/// the musl row, when the static build is missing; the third field says
/// which.
fn checks(cfg: &Config, f: &Figures) -> Vec<(&'static str, Option<bool>, &'static str)> {
    let (base, lv, after, lat) = (&f.base, &f.levels, &f.after, &f.lat);
    let acc_errors: u64 = f.acc.iter().map(|a| a.1).sum();
    let last = last_per_conn(base, lv);
    let musl = (f.musl.as_ref()).map(|(b, levels, _, _)| last_per_conn(b, levels) <= 16.0);
    let all = [
        ("bulk", "download ≥ 0.8 × devd", f.down[2] >= 0.8 * f.down[1]),
        ("bulk", "upload ≥ 0.8 × devd", f.up[2] >= 0.8 * f.up[1]),
        ("latency", "p50 ≤ devd p50 + 150 µs", lat[2].0 <= lat[1].0 + 150.0),
        ("latency", "p99 ≤ 2 × devd p99", lat[2].1 <= 2.0 * lat[1].1),
        (
            "concurrency",
            "≤ 64 KiB RSS per idle connection (glibc release build)",
            last <= 64.0,
        ),
        (
            "concurrency",
            "2 threads per connection",
            lv.iter()
                .all(|l| l.threads.saturating_sub(base.threads) == 2 * l.conns),
        ),
        (
            "churn",
            "churn with confirmed close ≥ 0.9 × immediate close",
            f.churn[2].0 >= 0.9 * f.churn_immediate.0,
        ),
        (
            "churn",
            "sequential conns at the real daemon's dial time: confirmed ≤ 1.1 × immediate",
            f.sequential.0[0] <= 1.1 * f.sequential.0[1] && f.sequential.1 == 0,
        ),
        (
            "accept,concurrency",
            "zero errors at every level",
            lv.iter().all(|l| l.errors == 0) && acc_errors == 0,
        ),
        (
            "concurrency",
            "threads and fds back to baseline",
            after.threads == base.threads && f.fds_left == 0,
        ),
        (
            "concurrency",
            "RSS back within 16 MiB of baseline",
            after.rss_kib <= base.rss_kib + 16 * 1024,
        ),
    ];
    let mut checks: Vec<_> = all
        .into_iter()
        .map(|(scenario, name, ok)| {
            let run = scenario.split(',').any(|s| cfg.on(s));
            (name, run.then_some(ok), "not run")
        })
        .collect();
    let (musl, why) = if cfg.on("concurrency") {
        (musl, "not built")
    } else {
        (None, "not run")
    };
    checks.insert(
        5,
        ("≤ 16 KiB RSS per idle connection (static musl build)", musl, why),
    );
    checks
}

fn write_json(cfg: &Config, f: &Figures, table: Table, concurrency: [Value; 2], elapsed: f64) {
    let [concurrency, musl] = concurrency;
    let checks = checks(cfg, f);
    let json = Value::obj([
        ("machine", Value::from(machine())),
        (
            "cores",
            thread::available_parallelism().map_or(0, |n| n.get()).into(),
        ),
        ("bulk_mib", (cfg.bulk >> 20).into()),
        ("sequential_connections", cfg.conns.into()),
        ("results", Value::Obj(table.results)),
        ("accept_errors", f.acc.iter().map(|a| a.1).sum::<u64>().into()),
        (
            "churn_attempts",
            Value::Arr(f.churn.iter().map(|c| c.2.into()).collect()),
        ),
        ("concurrency", concurrency),
        ("concurrency_static_musl", musl),
        (
            "targets",
            Value::Obj(
                checks
                    .iter()
                    .map(|(n, ok, _)| (n.to_string(), Value::from(*ok)))
                    .collect(),
            ),
        ),
        ("seconds", elapsed.into()),
    ]);
    let dir = Path::new("target/bench");
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(dir.join("latest.json"), format!("{json}\n"));
}

fn main() {
    raise_fd_limit();
    let cfg = Config::from_env();
    let rig = set_up(&cfg);
    let started = Instant::now();
    let f = measure(&cfg, &rig);
    let mut table = Table::default();
    speed_rows(&mut table, &f);
    churn_and_idle_rows(&mut table, &f);
    musl_rows(&mut table, &f, &cfg);

    println!(
        "\npilot-gateway benchmark — {} cores, {}",
        thread::available_parallelism().map_or(0, |n| n.get()),
        machine()
    );
    println!(
        "bulk {} MiB each way, {} sequential connections, {} s rate runs, {} s churn runs\n",
        cfg.bulk >> 20,
        cfg.conns,
        cfg.secs,
        cfg.churn_secs
    );
    table.print();
    println!(
        "\nchurn: one reply per connection, then the agent stays silent until the peer closes;\n\
         \x20 refused = reset or EOF before the reply. idle: per held connection; kstacks = threads × {KERNEL_STACK_KIB} KiB;\n\
         \x20 devd = the daemon's share of the same connections; socat = PSS of its forked relays;\n\
         \x20 gateway = the glibc release build; static musl = a second gateway, the `make static` binary,\n\
         \x20 on the same devd after the first (socat's figures repeated; devd's only in the first run)."
    );
    let gw = (f.base.clone(), f.levels.clone(), f.after.clone(), f.fds_left);
    let concurrency = [
        print_concurrency("the gateway, glibc release build", &gw),
        (f.musl.as_ref()).map_or(Value::Null, |m| {
            print_concurrency("the gateway, static musl build", m)
        }),
    ];
    println!("\ntargets:");
    for (name, ok, why) in checks(&cfg, &f) {
        let mark = ok.map_or(why, |ok| if ok { "ok" } else { "MISSED" });
        println!("  [{mark}] {name}");
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("\nmeasured in {elapsed:.0} s; JSON in target/bench/latest.json");
    write_json(&cfg, &f, table, concurrency, elapsed);
    let _ = gateway(&cfg, &rig.work, "state", &["stop"]);
    if let Some(bin) = &cfg.static_bin {
        let _ = run_gateway(bin, &rig.work, "state-musl", &["stop"]);
    }
    drop(rig.procs);
    let _ = std::fs::remove_dir_all(&rig.work);
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, Linux {}", kernel.trim())
}
