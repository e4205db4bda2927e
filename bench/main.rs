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
use pilot_gateway::ipc::{self, cmd, FrameReader, Session};
use pilot_gateway::json::Value;

const AGENT: &str = "0:0000.0000.0004";
const SOURCE: u16 = 9001; // 8-byte length N, then N bytes to the client, close
const SINK: u16 = 9002; // 8-byte length N, N bytes from the client, 8-byte reply, close
const ONCE: u16 = 9003; // 1 KiB in, 1 KiB out, close
const STREAM: u16 = 9004; // 1 KiB in, 1 KiB out, repeated
const HOLD: u16 = 9005; // 1 byte in, 1 byte out, then hold until a second byte
const TICK: u16 = 9006; // 1 byte in, 1 byte out, close
const PORTS: [u16; 6] = [SOURCE, SINK, ONCE, STREAM, HOLD, TICK];

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

struct Env {
    socket: PathBuf,
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
        Route::Gateway => tcp("10.4.0.1"),
        Route::Socat => tcp("127.0.0.2"),
        Route::Devd => {
            let mut s = Session::connect(&env.socket)?;
            s.set_timeout(Some(Duration::from_secs(30)))?;
            let agent: PilotAddr = AGENT.parse().map_err(|e| io::Error::other(format!("{e}")))?;
            let id = s.dial(agent, port).map_err(|e| io::Error::other(e.to_string()))?;
            let (reader, writer) = s.into_parts();
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

fn proc_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

struct Level {
    conns: u64,
    errors: u64,
    rss_kib: u64,
    threads: u64,
}

/// Holds `levels` of bridged connections open at once through the gateway;
/// returns the gateway's footprint at baseline, each level, and after.
fn concurrency(env: &Env, gw_pid: u32, levels: &[u64]) -> (Level, Vec<Level>, Level, u64) {
    let snap = |conns, errors| Level {
        conns,
        errors,
        rss_kib: proc_status(gw_pid, "VmRSS:"),
        threads: proc_status(gw_pid, "Threads:"),
    };
    let base = snap(0, 0);
    let fds_before = proc_fds(gw_pid);
    let mut held: Vec<Box<dyn Duplex>> = Vec::new();
    let mut errors = 0;
    let mut out = Vec::new();
    for &level in levels {
        while (held.len() as u64) < level {
            match open(env, Route::Gateway, HOLD).and_then(|mut c| {
                c.write_all(&[1])?;
                let mut b = [0u8; 1];
                c.read_exact(&mut b)?;
                Ok(c)
            }) {
                Ok(c) => held.push(c),
                Err(_) => {
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
    let after = snap(0, errors);
    let fds_left = proc_fds(gw_pid).saturating_sub(fds_before);
    (base, out, after, fds_left)
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

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn main() {
    raise_fd_limit();
    let bin = PathBuf::from(std::env::var("BENCH_BIN").unwrap_or_else(|_| "target/release".into()));
    let work = std::env::temp_dir().join(format!("pilot-gateway-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");
    let bulk = env_num("BENCH_BULK_MB", 1024) << 20;
    let conns = env_num("BENCH_CONNS", 5000);
    let levels = [env_num("BENCH_LEVEL1", 1000), env_num("BENCH_LEVEL2", 5000)];
    let secs = 3.0;

    for (port, h) in PORTS
        .iter()
        .zip([source, sink, once, stream, hold, tick] as [fn(TcpStream) -> io::Result<()>; 6])
    {
        serve(*port, h);
    }
    let socket = work.join("devd.sock");
    let mut procs = Procs(Vec::new());
    procs.0.push(
        Command::new(bin.join("pilot-devd"))
            .arg("--socket")
            .arg(&socket)
            .args([
                "--route",
                &format!("{AGENT}=127.0.0.1"),
                "--max-clients",
                "100000",
            ])
            .stderr(Stdio::null())
            .spawn()
            .expect("pilot-devd"),
    );
    wait_for("pilot-devd", || UnixStream::connect(&socket).is_ok());
    for p in PORTS {
        let listen = format!("TCP-LISTEN:{p},bind=127.0.0.2,fork,reuseaddr,backlog=4096");
        match Command::new("socat")
            .args([&listen, &format!("TCP:127.0.0.1:{p}")])
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => procs.0.push(c),
            Err(e) => panic!("socat: {e} (scripts/bench.sh installs it)"),
        }
    }
    let state = work.join("state");
    let gw = |args: &[&str]| {
        Command::new(bin.join("pilot-gateway"))
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
            .expect("pilot-gateway")
    };
    let ports: Vec<String> = PORTS.iter().map(u16::to_string).collect();
    let out = gw(&[
        "--json",
        "start",
        "--ports",
        &ports.join(","),
        "--max-conns",
        "20000",
        AGENT,
    ]);
    assert!(
        out.status.success(),
        "gateway: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gw_pid = pilot_gateway::json::parse(String::from_utf8_lossy(&out.stdout).trim())
        .ok()
        .and_then(|v| v.get("data")?.get("pid")?.as_u64())
        .expect("gateway pid") as u32;
    wait_for("socat", || TcpStream::connect(("127.0.0.2", TICK)).is_ok());
    let env = Arc::new(Env {
        socket: socket.clone(),
    });
    let started = Instant::now();

    let mut results: Vec<(String, Value)> = Vec::new();
    let mut table: Vec<(String, [String; 4], String)> = Vec::new();
    let mut row = |name: &str, unit: &str, vals: [f64; 4], higher_better: bool| {
        let g = vals[2];
        let ratio = |r: f64| {
            if r > 0.0 {
                format!("{:.2}", g / r)
            } else {
                "-".into()
            }
        };
        let ratios = format!("{} / {} / {}", ratio(vals[1]), ratio(vals[0]), ratio(vals[3]));
        table.push((format!("{name} ({unit})"), vals.map(fmt), ratios));
        results.push((
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
    };

    // BENCH_ONLY=bulk,latency,rate,accept,concurrency runs a subset (for
    // quick comparisons while optimising); skipped figures read 0.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let on = |s: &str| only.is_empty() || only.split(',').any(|o| o == s);
    let per = |f: &dyn Fn(Route) -> io::Result<f64>| {
        ROUTES.map(|r| f(r).unwrap_or_else(|e| panic!("{}: {e}", r.name())))
    };
    let zero = [0.0; 4];
    let down = if on("bulk") {
        per(&|r| download(&env, r, bulk))
    } else {
        zero
    };
    let up = if on("bulk") {
        per(&|r| upload(&env, r, bulk))
    } else {
        zero
    };
    let lat: Vec<(f64, f64, f64)> = if on("latency") {
        ROUTES
            .iter()
            .map(|&r| latency(&env, r, conns).unwrap_or_else(|e| panic!("{}: {e}", r.name())))
            .collect()
    } else {
        vec![(0.0, 0.0, 0.0); 4]
    };
    let rps = if on("rate") {
        per(&|r| request_rate(&env, r, secs))
    } else {
        zero
    };
    let acc: Vec<(f64, u64)> = if on("accept") {
        ROUTES.iter().map(|&r| accept_rate(&env, r, 32, secs)).collect()
    } else {
        vec![(0.0, 0); 4]
    };
    let (base, lv, after, fds_left) =
        concurrency(&env, gw_pid, if on("concurrency") { &levels } else { &[] });

    row("download 1 conn", "MB/s", down, true);
    row("upload 1 conn", "MB/s", up, true);
    row(
        "new conn p50",
        "µs",
        [lat[0].0, lat[1].0, lat[2].0, lat[3].0],
        false,
    );
    row(
        "new conn p99",
        "µs",
        [lat[0].1, lat[1].1, lat[2].1, lat[3].1],
        false,
    );
    row(
        "new conn max",
        "µs",
        [lat[0].2, lat[1].2, lat[2].2, lat[3].2],
        false,
    );
    row("round trips, kept conn", "/s", rps, true);
    row(
        "accept rate, 32 clients",
        "conn/s",
        [acc[0].0, acc[1].0, acc[2].0, acc[3].0],
        true,
    );

    println!(
        "\npilot-gateway benchmark — {} cores, {}",
        thread::available_parallelism().map_or(0, |n| n.get()),
        machine()
    );
    println!(
        "bulk {} MiB each way, {conns} sequential connections, {secs} s rate runs\n",
        bulk >> 20
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10}   gateway ÷ devd / direct / socat",
        "", "direct", "devd", "gateway", "socat"
    );
    for (name, v, ratios) in &table {
        println!(
            "{name:<34} {:>10} {:>10} {:>10} {:>10}   {ratios}",
            v[0], v[1], v[2], v[3]
        );
    }
    let acc_errors: u64 = acc.iter().map(|a| a.1).sum();
    println!(
        "\nconcurrency through the gateway (baseline RSS {} KiB, {} threads):",
        base.rss_kib, base.threads
    );
    let mut levels_json = Vec::new();
    for l in &lv {
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
        ]));
    }
    println!(
        "  after closing: RSS {} KiB, {} threads (baseline {}), {} descriptors left over",
        after.rss_kib, after.threads, base.threads, fds_left
    );

    // The targets of issue 4, informational.
    let last = lv.last().map_or(0.0, |l| {
        (l.rss_kib.saturating_sub(base.rss_kib)) as f64 / l.conns.max(1) as f64
    });
    let checks = [
        ("download ≥ 0.8 × devd", down[2] >= 0.8 * down[1]),
        ("upload ≥ 0.8 × devd", up[2] >= 0.8 * up[1]),
        ("p50 ≤ devd p50 + 150 µs", lat[2].0 <= lat[1].0 + 150.0),
        ("p99 ≤ 2 × devd p99", lat[2].1 <= 2.0 * lat[1].1),
        ("≤ 64 KiB RSS per idle connection", last <= 64.0),
        (
            "2 threads per connection",
            lv.iter()
                .all(|l| l.threads.saturating_sub(base.threads) == 2 * l.conns),
        ),
        (
            "zero errors at every level",
            lv.iter().all(|l| l.errors == 0) && acc_errors == 0,
        ),
        (
            "threads and fds back to baseline",
            after.threads == base.threads && fds_left == 0,
        ),
        (
            "RSS back within 16 MiB of baseline",
            after.rss_kib <= base.rss_kib + 16 * 1024,
        ),
    ];
    println!("\ntargets:");
    for (name, ok) in &checks {
        println!("  [{}] {name}", if *ok { "ok" } else { "MISSED" });
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("\nmeasured in {elapsed:.0} s; JSON in target/bench/latest.json");

    let json = Value::obj([
        ("machine", Value::from(machine())),
        (
            "cores",
            thread::available_parallelism().map_or(0, |n| n.get()).into(),
        ),
        ("bulk_mib", (bulk >> 20).into()),
        ("sequential_connections", conns.into()),
        ("results", Value::Obj(results)),
        ("accept_errors", acc_errors.into()),
        (
            "concurrency",
            Value::obj([
                ("baseline_rss_kib", Value::from(base.rss_kib)),
                ("baseline_threads", base.threads.into()),
                ("levels", Value::Arr(levels_json)),
                ("after_rss_kib", after.rss_kib.into()),
                ("after_threads", after.threads.into()),
                ("fds_left", fds_left.into()),
            ]),
        ),
        (
            "targets",
            Value::Obj(
                checks
                    .iter()
                    .map(|(n, ok)| (n.to_string(), Value::from(*ok)))
                    .collect(),
            ),
        ),
        ("seconds", elapsed.into()),
    ]);
    let dir = Path::new("target/bench");
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(dir.join("latest.json"), format!("{json}\n"));
    let _ = gw(&["stop"]);
    drop(procs);
    let _ = std::fs::remove_dir_all(&work);
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
