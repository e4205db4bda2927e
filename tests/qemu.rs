//! The ARM static binary under qemu-user (issue 21): built by
//! scripts/static.sh, run by `qemu-aarch64-static` against pilot-devd (the
//! host's build: the daemon's side is not what is tested). It starts in
//! the foreground, relays 1 MiB each way byte-exact, frees a client that
//! resets at once (and one that closes within --half-closed-timeout: see
//! below), and stops cleanly on SIGTERM. Skipped (with a note) when
//! qemu-user-static is not installed (scripts/deps.sh installs it).
//!
//! What differs under qemu, and why the test does not use the other
//! commands: the kernel sees the emulator, not the gateway. The host's
//! /proc/PID/exe of the gateway names qemu-aarch64-static, and its
//! /proc/PID/stat is the emulator's (inside, qemu fakes /proc/self/stat
//! and /proc/self/exe for its guest, e.g. a start time of its own). The
//! commands that verify a gateway's pid (`stop`, `status`: the recorded
//! start time and, for `stop`, that /proc/PID/exe is the same program)
//! would rightly refuse a host binary's view of it, so the test stops the
//! gateway with a signal and counts its threads from the host's
//! /proc/PID/status (qemu-user runs each guest thread as a host thread,
//! plus a few of its own, which the baseline includes). The security
//! checks themselves are left as they are. And qemu-user refuses sockets
//! of the NETLINK_SOCK_DIAG family, so a client that closes with FIN
//! cannot be told from a half-closed one (natively it can).

mod common;

use std::net::Shutdown;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const QEMU: &str = "/usr/bin/qemu-aarch64-static";

#[test]
fn the_aarch64_binary_relays_frees_and_stops_under_qemu() {
    if !Path::new(QEMU).exists() {
        eprintln!("SKIPPED: {QEMU} is missing (apt-get install qemu-user-static)");
        return;
    }
    let bin = static_binary("aarch64-unknown-linux-musl");
    netns();
    let dir = TempDir::new("qemu-aarch64");
    let _down = Service::start(9000, source);
    let _up = Service::start(9001, sink);
    let _echo = Service::start(8080, echo);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    let mut p = gw.foreground_via(
        &dir,
        &[Path::new(QEMU), &bin],
        &["--ports", "8080,9000,9001", "--half-closed-timeout", "2", A4],
    );
    assert!(has_alias("10.4.0.1"), "{}", p.stderr());

    // 1 MiB each way, byte-exact.
    let len = 1 << 20;
    let (got, hash) = download("10.4.0.1:9000", len);
    assert_eq!((got, hash), (len, expected_download(len)), "download");
    let ((count, theirs), ours) = upload("10.4.0.1:9001", len, 5);
    assert_eq!((count, theirs), (len as u64, ours), "upload");

    // A client that resets is freed at once: the thread count comes back.
    let base = settled_threads(p.pid());
    let freed_after = |close: &dyn Fn(std::net::TcpStream)| {
        let mut s = connect("10.4.0.1:8080");
        assert!(still_echoes(&mut s));
        assert!(
            proc_field(p.pid(), "Threads:") > base,
            "a connection has its threads"
        );
        close(s);
        let closed = Instant::now();
        assert!(
            wait_until(Duration::from_secs(5), || proc_field(p.pid(), "Threads:") == base),
            "threads {} five seconds after the close (baseline {base})",
            proc_field(p.pid(), "Threads:")
        );
        closed.elapsed()
    };
    let reset = freed_after(&|s| {
        use std::os::fd::AsRawFd;
        let l = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on a socket we own, with a linger struct.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&l as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
    });
    assert!(
        reset < Duration::from_secs(1),
        "a reset client freed after {reset:?}"
    );
    // A client that closes with FIN reads like a half-close; natively the
    // gateway asks the kernel (sock_diag) and frees it at once. qemu-user
    // emulates no NETLINK_SOCK_DIAG socket (only NETLINK_ROUTE, _AUDIT and
    // _KOBJECT_UEVENT), so here --half-closed-timeout (2 s) ends it.
    let fin = freed_after(&|s| {
        s.shutdown(Shutdown::Both).unwrap();
    });
    assert!(
        fin < Duration::from_secs(4),
        "a closed client freed after {fin:?}"
    );
    eprintln!("freed {reset:?} after a reset, {fin:?} after a close");

    // SIGTERM: a clean exit that removes the alias and the state file.
    p.signal(libc::SIGTERM);
    let status = p.wait_exit(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {}", p.stderr());
    assert!(!has_alias("10.4.0.1"), "alias removed");
    assert!(!gw.state.join("state.json").exists(), "state removed");
    let log = p.stderr();
    assert!(log.contains("stopped"), "{log}");
}
