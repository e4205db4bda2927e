//! Floods, end to end (issue 18): every log line a local client or an
//! overlay peer can cause at will is rate-limited per kind and per source
//! (`engine::report`), with a periodic "N similar lines (KIND) suppressed"
//! line, while the counters count every event. For each kind: 1,500
//! events against the real gateway (through pilot-devd, `--inbound` for
//! peers), then at most 150 of its lines in the gateway's log, its
//! summary line, and 1,500 in its counter.
//!
//! The kinds, by who causes them:
//! - a local client: connect, send a byte, reset (`reset`); refused at
//!   `--max-conns` (`refused_max_conns`); a failed dial (`dial_failed`);
//!   a half-close held past `--half-closed-timeout` (`half_closed_timeout`,
//!   an info line);
//! - another host (a second namespace over veth): `refused_remote`;
//! - an overlay peer: outside `--allow` (`refused_peer`), the exposure's
//!   target down (`connect_failed`), a connection left idle past
//!   `--idle-timeout` (`idle_timeout`, an info line), the expose side full
//!   (`refused_max_exposed`), one peer at its cap (`refused_per_peer`),
//!   an exposure draining (`refused_draining`).
//!
//! Each test floods several kinds at once, in its own namespace with its
//! own gateway; each flood runs from many threads, so the file stays short.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use pilot_gateway::json::Value;

/// Events per kind, and the most lines they may write.
const EVENTS: usize = 1500;
const MOST_LINES: usize = 150;
/// Client threads per flood: each event waits for the gateway's answer
/// (a refused Accept is closed once it reached the dialer, up to
/// `closing::ACCEPT_SETTLE`, 300 ms), so many at once.
const THREADS: usize = 40;
/// Bound on one flood, and on the counters catching up with it.
const FLOOD_LIMIT: Duration = Duration::from_secs(40);

const P9: &str = "0:0000.0000.0009";
const P8: &str = "0:0000.0000.0008";
const P7: &str = "0:0000.0000.0007";
const P6: &str = "0:0000.0000.0006";

/// Runs `event` `EVENTS` times, spread over `THREADS` threads (each in
/// this thread's namespace, or in `host`'s when given), bounded in time.
fn flood(host: Option<&OtherHost>, event: fn()) {
    let run = move || {
        let t0 = Instant::now();
        thread::scope(|s| {
            for t in 0..THREADS {
                s.spawn(move || {
                    for _ in (t..EVENTS).step_by(THREADS) {
                        assert!(t0.elapsed() < FLOOD_LIMIT, "the flood took too long");
                        event();
                    }
                });
            }
        });
    };
    match host {
        Some(h) => h.run(run),
        None => run(),
    }
}

/// One flood: from where (this namespace, or another host's), and its event.
type Flood<'a> = (Option<&'a OtherHost>, fn());

/// Floods several kinds at once.
fn flood_all(floods: &[Flood]) {
    thread::scope(|s| {
        for &(host, event) in floods {
            s.spawn(move || flood(host, event));
        }
    });
}

/// Resets a socket on close (SO_LINGER with a zero timeout): the peer
/// gets RST instead of FIN.
fn reset(s: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a linger struct of the
    // size we pass.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(s);
}

fn connect_to(addr: &str) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    Ok(s)
}

/// A local client that connects, sends a byte, gets it echoed through the
/// agent, and resets.
fn send_a_byte_and_reset() {
    let mut s = connect_to("10.4.0.1:8080").unwrap();
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 1, "echoed through the agent");
    reset(s);
}

/// A local client that gets a byte echoed, shuts down its sending side
/// and waits, holding its socket, until `--half-closed-timeout` ends it.
fn half_close_and_wait() {
    let mut s = connect_to("10.4.0.3:8080").unwrap();
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 1, "echoed through the agent");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("a half-closed client was not ended: {other:?}"),
    }
}

/// A client that connects and waits for the gateway to end it (a reset
/// or a close) within 5 s, without sending.
fn connect_and_be_ended(addr: &str) {
    let mut s = match connect_to(addr) {
        Ok(s) => s,
        // Reset as it was established (the non-blocking connect saw the
        // RST): ended at once.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
        Err(e) => panic!("{addr}: no connection: {e}"),
    };
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("{addr}: not ended at once: {other:?}"),
    }
}

fn client_at_the_cap() {
    connect_and_be_ended("10.4.0.1:8080");
}

fn client_whose_dial_fails() {
    connect_and_be_ended("10.4.0.2:8080");
}

/// An inbound connection from a peer (devd turns a connection to `via`
/// into one), held until the gateway ends it (a refusal, or the failed
/// connect to the target), which must come within a few seconds.
fn peer_via(via: &str) {
    connect_and_be_ended(via);
}

fn peer_7100() {
    peer_via("127.0.0.1:7100");
}
fn peer_7101() {
    peer_via("127.0.0.1:7101");
}
fn peer_7102() {
    peer_via("127.0.0.1:7102");
}

/// The lines of `kind` in `log`: those carrying `mark`, and the limiter's
/// summaries of the kind.
fn lines_of(log: &str, mark: &str, kind: &str) -> usize {
    let summary = format!("similar lines ({kind}) suppressed");
    log.lines()
        .filter(|l| l.contains(mark) || l.contains(&summary))
        .count()
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// A counter of one kind, read from the running gateway.
type Counter<'a> = &'a dyn Fn(&Gw) -> u64;

/// Waits until every kind's counter reaches `EVENTS` and its summary
/// line is in the log (each `status` wakes the gateway's main thread,
/// which writes the summaries at most every 5 s); then checks every
/// kind's count and lines. `kinds`: (kind, a text only its lines carry,
/// its counter).
fn check(gw: &Gw, p: &Proc, kinds: &[(&str, &str, Counter)]) {
    let settled = wait_until(Duration::from_secs(30), || {
        let log = p.stderr();
        let done = kinds.iter().all(|(kind, _, counted)| {
            counted(gw) >= EVENTS as u64 && log.contains(&format!("similar lines ({kind}) suppressed"))
        });
        if !done {
            thread::sleep(Duration::from_millis(500));
        }
        done
    });
    let log = p.stderr();
    let counts: Vec<u64> = kinds.iter().map(|(_, _, counted)| counted(gw)).collect();
    assert!(
        settled,
        "counters {counts:?} or summaries missing:\n{}",
        tail(&log)
    );
    for ((kind, mark, _), n) in kinds.iter().zip(counts) {
        assert_eq!(n, EVENTS as u64, "{kind}: every event counted");
        let lines = lines_of(&log, mark, kind);
        assert!(
            lines <= MOST_LINES,
            "{kind}: {EVENTS} events wrote {lines} lines:\n{}",
            tail(&log)
        );
        assert!(
            lines >= 2,
            "{kind}: its lines are not recognised ({mark:?}):\n{}",
            tail(&log)
        );
    }
}

/// A whole-number field of `status --json`.
fn status_num(gw: &Gw, key: &str) -> u64 {
    num(&gw.data(&["status"]), key)
}

/// A whole-number field of the `list --json` row whose `key` is `id`
/// (0 while it is not listed).
fn row_num(gw: &Gw, rows: &str, key: &str, id: &Value, field: &str) -> u64 {
    let list = gw.data(&["list"]);
    list.get(rows)
        .and_then(Value::as_array)
        .and_then(|rs| rs.iter().find(|r| r.get(key) == Some(id)).cloned())
        .map_or(0, |r| num(&r, field))
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Local clients: 1,500 that send a byte and reset, 1,500 whose dial
/// fails (the daemon refuses the agent) and 1,500 that shut down their
/// sending side and wait out `--half-closed-timeout`, at once.
#[test]
fn resets_and_failed_dials() {
    netns();
    let dir = TempDir::new("flood-map");
    let _echo = Service::start(8080, echo);
    let d = Devd::start(
        &dir,
        &[
            "--route",
            "0:0000.0000.0004=127.0.0.1",
            "--dial-error",
            "0:0000.0000.0005=no route to the agent",
            "--route",
            "0:0000.0000.0006=127.0.0.1",
        ],
    );
    let gw = Gw::new(&dir, &d.socket);
    let p = gw.foreground(
        &dir,
        &["--ports", "8080", "--half-closed-timeout", "0.3", A4, A5, A6],
    );
    flood_all(&[
        (None, send_a_byte_and_reset),
        (None, client_whose_dial_fails),
        (None, half_close_and_wait),
    ]);
    let resets = |gw: &Gw| row_num(gw, "mappings", "local_ip", &"10.4.0.1".into(), "total");
    let dials = |gw: &Gw| row_num(gw, "mappings", "local_ip", &"10.4.0.2".into(), "dial_failures");
    let half_closed = |gw: &Gw| status_num(gw, "idle_timeouts");
    let all: [(&str, &str, Counter); 3] = [
        ("reset", " ended: reset ", &resets),
        ("dial_failed", " failed: ", &dials),
        (
            "half_closed_timeout",
            " ended: half_closed_timeout ",
            &half_closed,
        ),
    ];
    check(&gw, &p, &all);
    let st = gw.data(&["status"]);
    assert_eq!(
        (
            num(&st, "total"),
            num(&st, "dial_failures"),
            num(&st, "idle_timeouts")
        ),
        (3 * EVENTS as u64, EVENTS as u64, EVENTS as u64),
        "{st}"
    );
}

/// Local clients refused at `--max-conns`, and clients of another host
/// refused as not local, at once.
#[test]
fn refusals_at_max_conns_and_of_other_hosts() {
    netns();
    let dir = TempDir::new("flood-refused");
    let _echo = Service::start(8080, echo);
    let d = Devd::start(&dir, &["--route", "0:0000.0000.0004=127.0.0.1"]);
    let gw = Gw::new(&dir, &d.socket);
    let host = OtherHost::new(&dir);
    let p = gw.foreground(&dir, &["--ports", "8080", "--max-conns", "1", A4]);
    // The one slot, held.
    let mut held = connect("10.4.0.1:8080");
    held.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    held.read_exact(&mut b).unwrap();
    flood_all(&[(None, client_at_the_cap), (Some(&host), client_at_the_cap)]);
    let refused = |gw: &Gw| status_num(gw, "refused");
    let remote = |gw: &Gw| status_num(gw, "refused_remote");
    check(
        &gw,
        &p,
        &[
            ("refused_max_conns", "--max-conns 1 reached", &refused),
            ("refused_remote", "not a local client", &remote),
        ],
    );
    drop(held);
}

/// Peers outside `--allow`, peers of an exposure whose target is down,
/// and peers that open a connection and send nothing (`--idle-timeout`).
#[test]
fn peers_outside_allow_a_target_that_is_down_and_idle_peers() {
    netns();
    let dir = TempDir::new("flood-peer");
    let _svc = Service::start(8000, echo);
    let d = Devd::start(
        &dir,
        &[
            "--inbound",
            &format!("127.0.0.1:7100={P9}:80"),
            "--inbound",
            &format!("127.0.0.1:7101={P9}:81"),
            "--inbound",
            &format!("127.0.0.1:7102={P9}:83"),
        ],
    );
    let gw = Gw::new(&dir, &d.socket);
    // Nothing listens on 8009. Budgets wide enough that the floods meet
    // only the refusal under test.
    let p = gw.foreground(
        &dir,
        &[
            "--max-conns",
            "4000",
            "--max-exposed",
            "4000",
            "--max-per-peer",
            "4000",
            "--expose",
            &format!("80=8000,allow={P7}"),
            "--expose",
            "81=8009",
            "--expose",
            "83=8000",
            "--idle-timeout",
            "0.3",
        ],
    );
    flood_all(&[(None, peer_7100), (None, peer_7101), (None, peer_7102)]);
    let allow = |gw: &Gw| row_num(gw, "exposures", "port", &80u64.into(), "refused");
    let down = |gw: &Gw| row_num(gw, "exposures", "port", &81u64.into(), "connect_failures");
    let idle = |gw: &Gw| row_num(gw, "exposures", "port", &83u64.into(), "idle_timeouts");
    check(
        &gw,
        &p,
        &[
            ("refused_peer", "(not in the allow-list)", &allow),
            ("connect_failed", " ended: connect_failed ", &down),
            ("idle_timeout", " ended: idle_timeout ", &idle),
        ],
    );
}

/// The expose side full (`--max-exposed`) and one peer at its cap
/// (`--max-per-peer`), then an exposure draining.
#[test]
fn peers_over_the_exposed_budgets_and_a_draining_exposure() {
    netns();
    let dir = TempDir::new("flood-budget");
    let _svc = Service::start(8000, echo);
    let d = Devd::start(
        &dir,
        &[
            "--inbound",
            &format!("127.0.0.1:7100={P9}:80"),
            "--inbound",
            &format!("127.0.0.1:7101={P7}:80"),
            "--inbound",
            &format!("127.0.0.1:7102={P8}:80"),
            "--inbound",
            &format!("127.0.0.1:7103={P6}:82"),
        ],
    );
    let gw = Gw::new(&dir, &d.socket);
    // Sessions of 80 and 82, P9 and P7 on 80: the expose side's 4 slots.
    let p = gw.foreground(
        &dir,
        &[
            "--max-conns",
            "20",
            "--max-exposed",
            "4",
            "--max-per-peer",
            "1",
            "--expose",
            "80=8000",
            "--expose",
            "82=8000",
        ],
    );
    let live = |via: &str| {
        let mut s = connect(via);
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        let echoed = s.read_exact(&mut b);
        assert!(echoed.is_ok(), "{via}: {echoed:?}\n{}", tail(&p.stderr()));
        s
    };
    let held = [live("127.0.0.1:7100"), live("127.0.0.1:7101")];
    assert_eq!(num(&gw.data(&["status"]), "exposed_in_use"), 4);
    // P9 (holding one) is over its own cap; P8 finds the expose side full.
    flood_all(&[(None, peer_7100), (None, peer_7102)]);
    let per_peer = |gw: &Gw| status_num(gw, "refused_per_peer");
    let full = |gw: &Gw| status_num(gw, "refused_max_exposed");
    check(
        &gw,
        &p,
        &[
            ("refused_per_peer", "(--max-per-peer 1 reached", &per_peer),
            ("refused_max_exposed", "(--max-exposed 4 reached", &full),
        ],
    );
    drop(held);
    assert!(wait_until(Duration::from_secs(10), || status_num(
        &gw,
        "exposed_in_use"
    ) == 2));
    // Port 82 drains (a peer's connection keeps it draining); every
    // Accept still arriving is refused.
    let _on82 = live("127.0.0.1:7103");
    gw.data(&["unexpose", "82", "--drain", "60"]);
    flood(None, || peer_via("127.0.0.1:7103"));
    // While it drains, `status` shows it under `draining`, with the
    // Accepts it refused.
    let draining = |gw: &Gw| {
        let st = gw.data(&["status"]);
        st.get("draining")
            .and_then(|d| d.get("exposures"))
            .and_then(Value::as_array)
            .and_then(|rs| {
                rs.iter()
                    .find(|r| r.get("port").and_then(Value::as_u64) == Some(82))
                    .cloned()
            })
            .map_or(0, |r| num(&r, "refused"))
    };
    check(
        &gw,
        &p,
        &[("refused_draining", "(draining: no new connections)", &draining)],
    );
}
