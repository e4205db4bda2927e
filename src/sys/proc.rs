//! Processes: identity that survives pid reuse (`ProcId`), what /proc says
//! of a process, resource limits, detaching, memory release.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::cerr;
use super::user::Uid;

/// Identity of a process that survives pid reuse: its pid and its start
/// time (clock ticks since boot, field 22 of `/proc/PID/stat`). On systems
/// without `/proc` the start time is 0 and only the pid is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcId {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcId {
    pub fn current() -> ProcId {
        let pid = std::process::id();
        ProcId {
            pid,
            start_time: start_time(pid).unwrap_or(0),
        }
    }

    /// Whether this exact process is still alive (not a zombie, not a new
    /// process that reuses the pid).
    pub fn is_alive(self) -> bool {
        if self.pid == 0 || self.pid > i32::MAX as u32 {
            return false;
        }
        if cfg!(target_os = "linux") {
            return match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
                Ok(stat) => parse_stat_start_time(&stat) == Some(self.start_time),
                // Not in /proc: gone, or hidden from us (/proc mounted with
                // hidepid, the unit's ProtectProc=invisible: another user's
                // process, or our own user's after a uid switch made it
                // undumpable). kill(pid, 0) tells which. A hidden one
                // cannot be told from a new process under the same pid, so
                // it is taken for alive: a refusal ("already running"),
                // never a live gateway's state removed.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
                    ) =>
                {
                    exists(self.pid)
                }
                Err(_) => false,
            };
        }
        // SAFETY: signal 0 only checks for existence and permission.
        match cerr(unsafe { libc::kill(self.pid as libc::pid_t, 0) }) {
            Ok(_) => true,
            Err(e) => e.raw_os_error() == Some(libc::EPERM),
        }
    }

    /// Sends `sig` to this process, but only if it is still this process.
    pub fn signal(self, sig: i32) -> io::Result<()> {
        if !self.is_alive() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: plain kill(2) on a pid we just verified.
        cerr(unsafe { libc::kill(self.pid as libc::pid_t, sig) }).map(drop)
    }
}

/// Whether a process `pid` exists (a zombie counts): kill(pid, 0), where
/// EPERM (another user's) still means it does. Unlike /proc, which hidepid
/// (systemd's ProtectProc=invisible) empties of other users' processes,
/// this sees every process of our pid namespace.
pub fn exists(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    match cerr(unsafe { libc::kill(pid as libc::pid_t, 0) }) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() == Some(libc::EPERM),
    }
}

/// Whether `/proc` answers for this process (Linux). Without it every
/// liveness check (`ProcId::is_alive`) would answer "dead", and a second
/// `start` would take a live gateway's state for a dead one's and remove
/// it; so commands refuse to run instead of guessing.
pub fn proc_available() -> bool {
    !cfg!(target_os = "linux") || start_time(std::process::id()).is_some()
}

/// Start time of a live, non-zombie process; `None` if it is gone.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_start_time(&stat)
}

/// Reads field 22 (starttime) of a `/proc/PID/stat` line. The command name
/// (field 2) is in parentheses and may itself contain spaces and ')', so
/// fields are counted from the last ')'. Zombies and dead tasks count as gone.
pub fn parse_stat_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X") | Some(&"x")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// CLOCK_MONOTONIC in microseconds (0 if it cannot be read), the clock
/// systemd compares a `MONOTONIC_USEC=` with (see `notify`).
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, a local we own.
    if cerr(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) }).is_err() {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// Lowers our soft RLIMIT_NPROC to `n` (never raises it; lowering needs
/// no privilege); returns the soft limit now in force (`None`: unlimited).
pub fn lower_nproc_limit(n: Option<u64>) -> io::Result<Option<u64>> {
    // SAFETY: rlimit is plain data; getrlimit fills it.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to an rlimit.
    cerr(unsafe { libc::getrlimit(libc::RLIMIT_NPROC, &mut rl) })?;
    if let Some(n) = n {
        if rl.rlim_cur == libc::RLIM_INFINITY || (rl.rlim_cur as u64) > n {
            let lowered = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: rl.rlim_max,
            };
            // SAFETY: a valid pointer to an rlimit.
            cerr(unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &lowered) })?;
            rl.rlim_cur = lowered.rlim_cur;
        }
    }
    Ok((rl.rlim_cur != libc::RLIM_INFINITY).then_some(rl.rlim_cur as u64))
}

/// What the processes of `uid` (ours aside) say of that user, from /proc
/// (readable by everyone): how many threads they run, and the lowest soft
/// "Max processes" limit among them — the user's own `ulimit -u`, as their
/// sessions (the daemon's among them) got it. At most `scan` processes.
pub fn user_threads_and_nproc(uid: u32, scan: usize) -> (u64, Option<u64>) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return (0, None);
    };
    let me = std::process::id();
    let (mut threads, mut limit): (u64, Option<u64>) = (0, None);
    for pid in entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| p != me)
        .take(scan)
    {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
        let real_uid = field("Uid:").and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok());
        if real_uid != Some(uid) {
            continue;
        }
        threads += field("Threads:").and_then(|v| v.parse().ok()).unwrap_or(1);
        let soft = std::fs::read_to_string(format!("/proc/{pid}/limits"))
            .ok()
            .and_then(|l| {
                let line = l.lines().find(|l| l.starts_with("Max processes"))?;
                line["Max processes".len()..]
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            });
        if let Some(s) = soft {
            limit = Some(limit.map_or(s, |l| l.min(s)));
        }
    }
    (threads, limit)
}

/// Raises the soft limit on open descriptors to the hard limit; returns
/// the soft limit now in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    // SAFETY: rlimit is plain data; getrlimit fills it.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to an rlimit.
    cerr(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) })?;
    if rl.rlim_cur < rl.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: rl.rlim_max,
            rlim_max: rl.rlim_max,
        };
        // SAFETY: a valid pointer to an rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            rl.rlim_cur = rl.rlim_max;
        }
    }
    Ok(rl.rlim_cur as u64)
}

/// Hands freed heap memory back to the system. glibc keeps what thousands
/// of connection threads freed in its per-thread arenas; without this, RSS
/// after a burst stays near its peak. Other C libraries return memory on
/// their own or offer no such call.
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists, under
    // the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Makes `cmd`'s child a session leader (setsid), detaching it from our
/// terminal and process group.
pub fn new_session_on_spawn(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and calls
    // only setsid(2), which is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
}

/// Points our stdout (fd 1) at `file`, e.g. /dev/null once nobody reads
/// the pipe it was.
pub fn redirect_stdout(file: &std::fs::File) -> io::Result<()> {
    redirect(file, 1)
}

/// Points our stderr (fd 2) at `file`.
pub fn redirect_stderr(file: &std::fs::File) -> io::Result<()> {
    redirect(file, 2)
}

fn redirect(file: &std::fs::File, fd: i32) -> io::Result<()> {
    // SAFETY: dup2 onto fd 1 or 2 from a file that stays open for the
    // call; std's handle keeps using that fd, which now names `file`.
    cerr(unsafe { libc::dup2(file.as_raw_fd(), fd) }).map(drop)
}

/// The real and effective uid of a process, from the `Uid:` line of
/// `/proc/PID/status` (readable by everyone).
pub fn process_uids(pid: u32) -> Option<(Uid, Uid)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut ids = line.split_whitespace().map(|t| t.parse::<u32>().ok().map(Uid));
    Some((ids.next()??, ids.next()??))
}

/// Whether process `pid` runs this same program: `/proc/PID/exe` names
/// the same file as `/proc/self/exe` (device and inode), or — when the
/// binary was replaced in place since the process started — the same
/// path with " (deleted)" after it, or another file with the same bytes
/// (an identical copy elsewhere). `None` when we may not look
/// (EACCES: the process is not dumpable and we lack CAP_SYS_PTRACE).
pub fn runs_same_program(pid: u32) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let theirs = format!("/proc/{pid}/exe");
    let ours = std::fs::metadata("/proc/self/exe").ok()?;
    match std::fs::metadata(&theirs) {
        Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => return Some(true),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return None,
        Err(_) => return Some(false),
    }
    let (Ok(t), Ok(o)) = (std::fs::read_link(&theirs), std::fs::read_link("/proc/self/exe")) else {
        return Some(false);
    };
    let t = t.to_string_lossy().into_owned();
    let o = o.to_string_lossy().into_owned();
    let o = o.strip_suffix(" (deleted)").unwrap_or(&o);
    if t.strip_suffix(" (deleted)") == Some(o) {
        return Some(true);
    }
    // Another file (the installed copy beside target/release, say): the
    // same program if its bytes are ours. `/proc/PID/exe` opens the very
    // file the process runs, whatever became of its path.
    Some(same_contents(Path::new(&theirs), Path::new("/proc/self/exe")))
}

/// Largest binary compared byte for byte (ours is a few MiB).
const MAX_EXE: u64 = 256 << 20;

/// Whether two files hold the same bytes (both readable, same size, at
/// most [`MAX_EXE`]); compared in chunks, so memory stays small.
fn same_contents(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (Ok(mut fa), Ok(mut fb)) = (std::fs::File::open(a), std::fs::File::open(b)) else {
        return false;
    };
    let (Ok(ma), Ok(mb)) = (fa.metadata(), fb.metadata()) else {
        return false;
    };
    if ma.len() != mb.len() || ma.len() > MAX_EXE {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    loop {
        let n = match fa.read(&mut ba) {
            Ok(0) => return fb.read(&mut bb[..1]).is_ok_and(|m| m == 0),
            Ok(n) => n,
            Err(_) => return false,
        };
        if fb.read_exact(&mut bb[..n]).is_err() || ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// The path of the program process `pid` runs, as the kernel names it.
pub fn exe_path(pid: u32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// How many threads this process has (Linux: /proc/self/task); `None`
/// where that cannot be seen.
pub fn thread_count() -> Option<usize> {
    std::fs::read_dir("/proc/self/task").ok().map(Iterator::count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identical_copy_is_the_same_program_and_another_file_is_not() {
        let dir = std::env::temp_dir().join(format!("pgw-exe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let copy = dir.join("copy");
        std::fs::copy("/proc/self/exe", &copy).unwrap();
        assert!(same_contents(&copy, Path::new("/proc/self/exe")));
        // One byte changed, or one byte more: not ours.
        let mut bytes = std::fs::read(&copy).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&copy, &bytes).unwrap();
        assert!(!same_contents(&copy, Path::new("/proc/self/exe")));
        bytes[mid] ^= 1;
        bytes.push(0);
        std::fs::write(&copy, &bytes).unwrap();
        assert!(!same_contents(&copy, Path::new("/proc/self/exe")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stat_parsing() {
        let line = "123 (a b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20 21";
        assert_eq!(parse_stat_start_time(line), Some(987654));
        let zombie = "123 (x) Z 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20";
        assert_eq!(parse_stat_start_time(zombie), None);
        assert_eq!(parse_stat_start_time("garbage"), None);
        assert_eq!(parse_stat_start_time("1 (x) S 1"), None);
    }

    #[test]
    fn own_process_is_alive_and_pid_reuse_is_not() {
        let me = ProcId::current();
        assert!(me.is_alive());
        let other = ProcId {
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        assert!(!other.is_alive(), "same pid, other start time: not us");
    }
}
