//! Signals through a self-pipe, so the main loop can wait for them with a
//! timeout (portable, unlike sigtimedwait).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use super::cerr;

/// The signals the gateway handles, delivered through a self-pipe so the
/// main loop can wait for them with a timeout (portable, unlike sigtimedwait).
pub struct Signals {
    read: OwnedFd,
}

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    let b = sig as u8;
    // SAFETY: errno_location returns this thread's errno slot; write(2) is
    // async-signal-safe and a full pipe just drops the byte. errno is saved
    // and restored, so the interrupted code never sees write's EAGAIN.
    unsafe {
        let errno = errno_location();
        let saved = *errno;
        libc::write(fd, (&b as *const u8).cast(), 1);
        *errno = saved;
    }
}

/// Where the calling thread's `errno` lives (glibc and musl name the
/// function `__errno_location`, macOS and FreeBSD `__error`).
fn errno_location() -> *mut libc::c_int {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    // SAFETY: takes nothing, cannot fail, async-signal-safe; returns the
    // calling thread's own errno slot.
    unsafe {
        libc::__errno_location()
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    // SAFETY: as above.
    unsafe {
        libc::__error()
    }
}

impl Signals {
    pub fn install(signals: &[i32]) -> io::Result<Signals> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe fills two fds.
        cerr(unsafe { libc::pipe(fds.as_mut_ptr()) })?;
        // SAFETY: both fds were just created and are owned here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        for fd in [&read, &write] {
            set_flags(fd.as_raw_fd())?;
        }
        SIGNAL_PIPE.store(write.as_raw_fd(), Ordering::Relaxed);
        std::mem::forget(write); // lives as long as the process
        for &sig in signals {
            // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the
            // handler only saves errno, calls write(2) and restores errno, all
            // async-signal-safe, on a pipe stored before it is installed.
            cerr(unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut())
            })?;
        }
        Ok(Signals { read })
    }

    /// Waits up to `timeout` for signals; returns those that arrived.
    pub fn wait(&self, timeout: Duration) -> Vec<i32> {
        let mut pfd = libc::pollfd {
            fd: self.read.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        let mut buf = [0u8; 64];
        // SAFETY: non-blocking read into a local buffer.
        let n = unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        buf[..n.max(0) as usize].iter().map(|&b| i32::from(b)).collect()
    }
}

fn set_flags(fd: RawFd) -> io::Result<()> {
    super::net::set_nonblocking(fd)?;
    super::net::set_cloexec(fd)
}
