//! Trust boundaries of the data path (issue 11): clients from another
//! host, a daemon that stalls or trickles its replies, running out of
//! descriptors or threads, and the connections `stop` and `unmap` cut or
//! drain. Each test in its own network namespace; the "other host" is a
//! second namespace joined to the test's by a veth pair.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::thread;
use std::time::Duration;

use common::*;
use pilot_gateway::json::Value;

#[test]
fn a_client_from_another_host_is_refused_before_any_dial_unless_allowed() {
    netns();
    let dir = TempDir::new("remote");
    let _echo = Service::start(8080, echo);
    let devd = Devd::start(&dir, &[&routes()[..], &["--verbose"]].concat());
    let gw = Gw::new(&dir, &devd.socket);
    let host = OtherHost::new(&dir);
    let mut p = gw.foreground(&dir, &["--ports", "8080", A4]);
    assert!(short_exchange("10.4.0.1:8080"), "a local client is served");
    let dials = || devd.log().matches("dial 0:0000.0000.0004:8080").count();
    let dials_before = dials();
    assert!(
        host.run(|| reset_soon("10.4.0.1:8080", Duration::from_secs(5))),
        "a client from another host is reset"
    );
    let st = status(&gw);
    assert_eq!(n(&st, "refused_remote"), 1, "{st}");
    assert_eq!(n(&st, "total"), 1, "only the local client was served: {st}");
    assert_eq!(st.get("allow_remote").and_then(Value::as_bool), Some(false));
    assert_eq!(dials(), dials_before, "no dial reached the daemon");
    assert!(gw.ok(&["status"]).contains("clients from other hosts: refused 1"));
    let list = gw.data(&["list"]);
    let row = &list.get("mappings").and_then(Value::as_array).unwrap()[0];
    assert_eq!(n(row, "refused_remote"), 1, "{list}");
    assert!(std::fs::read_to_string(dir.path("gateway.log"))
        .unwrap()
        .contains("not a local client"));
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(15)).is_some());

    let _p = gw.foreground(&dir, &["--ports", "8080", "--allow-remote", A4]);
    assert!(
        host.run(|| short_exchange("10.4.0.1:8080")),
        "--allow-remote serves the other host"
    );
    let st = status(&gw);
    assert_eq!(st.get("allow_remote").and_then(Value::as_bool), Some(true));
    assert_eq!((n(&st, "refused_remote"), n(&st, "total")), (0, 1), "{st}");
}

#[test]
fn a_stalled_daemon_costs_clients_their_dial_and_never_a_listener_or_stop() {
    netns();
    let dir = TempDir::new("stall");
    let _echo = Service::start(8080, echo);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    let mut p = gw.foreground(&dir, &["--ports", "8080", "--dial-timeout", "1", A4, A5]);
    assert!(short_exchange("10.4.0.1:8080"));
    devd.proc.signal(libc::SIGUSR1);
    assert!(wait_until(Duration::from_secs(5), || devd
        .log()
        .contains("stalled")));
    // More clients than the stalled daemon's backlog holds, on both
    // mappings: every one is reset (within the dial timeout), none hangs.
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let addr = if i % 2 == 0 {
                "10.4.0.1:8080"
            } else {
                "10.4.0.2:8080"
            };
            thread::spawn(move || reset_soon(addr, Duration::from_secs(8)))
        })
        .collect();
    for c in clients {
        assert!(
            c.join().unwrap(),
            "a client of a stalled daemon is reset, not left hanging"
        );
    }
    // The counters are still written, with the daemon shown unreachable.
    assert!(wait_until(Duration::from_secs(15), || {
        let st = status(&gw);
        n(&st, "dial_failures") >= 6 && st.get("daemon_reachable").and_then(Value::as_bool) == Some(false)
    }));
    let out = gw.run(&["stop"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(p.wait_exit(Duration::from_secs(5)).is_some());
}

#[test]
fn a_trickling_daemon_cannot_hold_status_list_or_sigterm() {
    netns();
    let dir = TempDir::new("trickle");
    let _echo = Service::start(8080, echo);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    let mut p = gw.foreground(&dir, &["--ports", "8080", A4]);
    // The same socket, now served by a daemon that answers a byte every 200 ms.
    drop(devd);
    let mut args = routes();
    args.extend(["--trickle", "200"]);
    let _devd = Devd::start(&dir, &args);
    let answered_in_time = |st: &Value| {
        let daemon = st.get("daemon").cloned().unwrap_or(Value::Null);
        let error = daemon
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        !error.contains("did not answer")
    };
    assert!(
        wait_until(Duration::from_secs(20), || !answered_in_time(&status(&gw))),
        "status answers, and shows the daemon not answering in time"
    );
    assert!(gw.ok(&["status"]).contains("did not answer"));
    gw.ok(&["list"]);
    p.signal(libc::SIGTERM);
    assert!(
        p.wait_exit(Duration::from_secs(10)).is_some(),
        "SIGTERM completes"
    );
}

#[test]
fn a_trickled_dial_reply_cannot_stretch_the_dial_past_its_timeout() {
    netns();
    let dir = TempDir::new("trickle-dial");
    let _echo = Service::start(8080, echo);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    let _p = gw.foreground(&dir, &["--ports", "8080", "--dial-timeout", "1", A4]);
    // The same socket, now served by a daemon that answers a byte every
    // 400 ms: its 9-byte DialOK takes 3.2 s, each byte well within the
    // 1 s a per-read timeout would allow.
    drop(devd);
    let mut args = routes();
    args.extend(["--trickle", "400"]);
    let _devd = Devd::start(&dir, &args);
    assert!(
        reset_soon("10.4.0.1:8080", Duration::from_secs(3)),
        "the dial ends at --dial-timeout, before the trickled DialOK is complete"
    );
    assert!(
        wait_until(Duration::from_secs(10), || n(&status(&gw), "dial_failures") == 1),
        "the dial counted as failed: {}",
        status(&gw)
    );
}

/// Sets the soft descriptor limit of a running process (the hard one stays:
/// raising it back needs CAP_SYS_RESOURCE, which a container may lack).
fn set_nofile(pid: u32, n: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on our own child, reading into a valid rlimit.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    let rl = libc::rlimit {
        rlim_cur: n.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above, with a valid new rlimit.
    let r = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, &rl, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
}

fn held_exchange(addr: &str) -> TcpStream {
    let mut s = connect(addr);
    s.write_all(b"hi").unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).unwrap();
    s
}

#[test]
fn a_low_descriptor_limit_lowers_max_conns_and_clients_beyond_are_reset_at_once() {
    netns();
    let dir = TempDir::new("nofile");
    let _echo = Service::start(8080, echo);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    let mut p = gw.foreground_with(&dir, &["--ports", "8080", "--max-conns", "1000", A4], |c| {
        nofile(c, 64)
    });
    assert!(
        p.stderr().contains("does not fit the limit of 64 open files"),
        "{}",
        p.stderr()
    );
    let st = status(&gw);
    let cap = n(&st, "max_conns");
    assert!((1..1000).contains(&cap), "{st}");
    assert_eq!(n(&st, "max_conns_requested"), 1000);
    assert!(gw.ok(&["status"]).contains("lowered from 1000"));
    let held: Vec<TcpStream> = (0..cap).map(|_| held_exchange("10.4.0.1:8080")).collect();
    assert!(
        reset_soon("10.4.0.1:8080", Duration::from_secs(5)),
        "beyond the lowered cap: reset at once"
    );
    // Every slot taken, and the counters are still written (the headroom).
    let st = status(&gw);
    assert_eq!((n(&st, "active"), n(&st, "refused")), (cap, 1), "{st}");
    gw.ok(&["list"]);
    // Later mappings' listeners must fit what the cap and the headroom
    // leave (64 - 32 - 2 × 15 = 2 here): one more fits, a third does not.
    assert_eq!(cap, 15, "{st}");
    gw.ok(&["map", A5]);
    let out = gw.run(&["map", A6]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("open-file limit"), "{err}");
    let st = status(&gw);
    assert_eq!(n(&st, "max_conns"), cap, "{st}");
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(15)).is_some());
    drop(held);

    // Out of descriptors altogether (the limit cut under a running gateway
    // to what about one more connection needs): clients are still reset
    // at once, never left waiting in the backlog, on either listener:
    // one listener waiting for a client of its own must not hold up
    // another's shedding, nor `unmap`.
    let mut p = gw.foreground(&dir, &["--ports", "8080", A4, A5]);
    // The limit is the lowest descriptor number free now, once the
    // start's own have closed: the kernel hands out the lowest free
    // number and fails with EMFILE when that is not below the limit, so
    // the next accept must shed its client. (An accept thread already
    // blocked has its number reserved, invisible in /proc: that one
    // client is accepted and its dial fails, which refuses it as well.)
    // The start's first daemon health check holds a socket for a moment
    // (longer on a loaded machine): the lowest seen over a second after
    // the count settles is what stays.
    let mut fds = proc_fds(p.pid());
    wait_until(Duration::from_secs(5), || {
        thread::sleep(Duration::from_millis(100));
        let now = proc_fds(p.pid());
        std::mem::replace(&mut fds, now) == now
    });
    let mut lowest_free = usize::MAX;
    for _ in 0..10 {
        thread::sleep(Duration::from_millis(100));
        lowest_free = lowest_free.min(lowest_free_fd(p.pid()));
    }
    set_nofile(p.pid(), lowest_free as u64);
    let mut served = Vec::new();
    let mut refused = [0; 2];
    for i in 0..8 {
        let addr = ["10.4.0.1:8080", "10.4.0.2:8080"][i % 2];
        match exchange_or_refusal(addr) {
            Ok(s) => served.push(s),
            Err(hung) => {
                assert!(
                    !hung,
                    "out of descriptors, a client of {addr} was left hanging: {}",
                    p.stderr()
                );
                refused[i % 2] += 1;
            }
        }
    }
    assert!(
        refused.iter().all(|&r| r > 0),
        "out of descriptors, clients of each listener are refused: {refused:?}"
    );
    for ip in ["10.4.0.1", "10.4.0.2"] {
        let shed = format!("to {ip}:8080: out of file descriptors");
        assert!(p.stderr().contains(&shed), "{ip} sheds: {}", p.stderr());
    }
    set_nofile(p.pid(), 1024);
    gw.ok(&["list"]);
    let mut unmap = gw.cmd();
    unmap.args(["unmap", "10.4.0.2"]).stdout(Stdio::null());
    let mut unmap = Proc::spawn(&mut unmap, dir.path("unmap.log"));
    let done = unmap.wait_exit(Duration::from_secs(10));
    assert!(
        done.is_some_and(|s| s.success()),
        "unmap completes: {}",
        unmap.stderr()
    );
    gw.ok(&["stop"]);
    assert!(p.wait_exit(Duration::from_secs(10)).is_some());
}

/// The lowest descriptor number `pid` has not open.
fn lowest_free_fd(pid: u32) -> usize {
    let open: std::collections::BTreeSet<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !open.contains(n)).unwrap()
}

/// One exchange: `Ok` if served; `Err(false)` if reset or closed at once,
/// `Err(true)` if left hanging.
fn exchange_or_refusal(addr: &str) -> Result<TcpStream, bool> {
    // The reset may already arrive during the connect itself.
    let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5)).map_err(|e| {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "connect {addr}: {e}"
        );
        false
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"hi");
    let mut b = [0u8; 2];
    match s.read(&mut b) {
        Ok(0) => Err(false),
        Ok(_) => Ok(s),
        Err(e) => Err(matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
    }
}

/// Service: reads a request, answers 64 KiB a second and a half later, closes.
fn slow_reply(mut c: TcpStream) {
    let mut b = [0u8; 2];
    if c.read_exact(&mut b).is_ok() {
        thread::sleep(Duration::from_millis(1500));
        let _ = c.write_all(&pattern(7, 64 * 1024));
    }
}

/// A client that sends a request and reads the whole reply (its length).
fn slow_client(addr: &'static str) -> thread::JoinHandle<std::io::Result<usize>> {
    thread::spawn(move || {
        let mut s = connect(addr);
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(b"go")?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(buf.len())
    })
}

/// Whether the stream ends (EOF or reset) within a bound.
/// A cut client must see a reset, never a plain end of stream it could
/// take for a complete reply.
fn is_reset_soon(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn stop_and_unmap_report_the_connections_they_cut() {
    netns();
    let dir = TempDir::new("cut");
    let _echo = Service::start(8080, echo);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    let mut p = gw.foreground(&dir, &["--ports", "8080", A4, A5]);
    let mut c = held_exchange("10.4.0.2:8080");
    let d = gw.data(&["unmap", "10.4.0.2"]);
    assert_eq!(n(&d, "cut"), 1, "{d}");
    assert!(is_reset_soon(&mut c), "the cut client is reset, not sent a FIN");
    let mut idle = held_exchange("10.4.0.1:8080");
    let out = gw.ok(&["stop"]);
    assert!(out.contains("(1 live connection cut)"), "{out}");
    assert!(p.wait_exit(Duration::from_secs(5)).is_some());
    assert!(is_reset_soon(&mut idle), "stop resets a live client");
    let _p = gw.foreground(&dir, &["--ports", "8080", A4]);
    let d = gw.data(&["stop"]);
    assert_eq!(n(&d, "cut"), 0, "{d}");
}

#[test]
fn drain_lets_live_connections_finish() {
    netns();
    let dir = TempDir::new("drain");
    let _slow = Service::start(8081, slow_reply);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    let mut p = gw.foreground(&dir, &["--ports", "8081", A4, A5]);
    let client = slow_client("10.4.0.2:8081");
    assert!(wait_until(Duration::from_secs(5), || n(&status(&gw), "active") == 1));
    let d = gw.data(&["unmap", "--drain", "5", "--wait", "10.4.0.2"]);
    assert_eq!(n(&d, "cut"), 0, "{d}");
    assert_eq!(
        client.join().unwrap().unwrap(),
        64 * 1024,
        "the whole reply arrived"
    );

    let client = slow_client("10.4.0.1:8081");
    assert!(wait_until(Duration::from_secs(5), || n(&status(&gw), "active") == 1));
    let d = gw.data(&["stop", "--drain", "5", "--wait"]);
    assert_eq!(n(&d, "cut"), 0, "{d}");
    assert_eq!(
        client.join().unwrap().unwrap(),
        64 * 1024,
        "the whole reply arrived"
    );
    assert!(p.wait_exit(Duration::from_secs(5)).is_some());
}

#[test]
fn a_client_that_gets_no_thread_is_reset_and_counted() {
    netns();
    let dir = TempDir::new("nproc");
    let _echo = Service::start(8080, echo);
    // The daemon as nobody, so that the gateway switches to nobody, whose
    // thread count RLIMIT_NPROC limits (root's it does not).
    let (socket, _devd) = devd_as_nobody(&dir, &routes());
    let gw = Gw::new(&dir, &socket);
    // Beside the socket: a directory nobody may write to.
    let access = dir.path("nobody").join("access.log");
    let access_arg = access.display().to_string();
    let p = gw.foreground(&dir, &["--ports", "8080", "--access-log", &access_arg, A4]);
    assert!(short_exchange("10.4.0.1:8080"));
    // No more threads for nobody (set as nobody: the same user may).
    let pid = p.pid().to_string();
    run_ok(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "prlimit",
            "--pid",
            &pid,
            "--nproc=1:",
        ],
    );
    assert!(
        reset_soon("10.4.0.1:8080", Duration::from_secs(5)),
        "a client that gets no thread is reset"
    );
    let st = status(&gw);
    assert_eq!(n(&st, "spawn_failures"), 1, "{st}");
    assert!(gw.ok(&["status"]).contains("thread failures 1"));
    assert!(std::fs::read_to_string(dir.path("gateway.log"))
        .unwrap()
        .contains("cannot start a thread"));
    assert!(wait_until(Duration::from_secs(5), || std::fs::read_to_string(
        &access
    )
    .unwrap_or_default()
    .contains("cannot start a thread")));
}
