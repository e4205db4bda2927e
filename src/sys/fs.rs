//! Files and directories, always relative to a directory descriptor and
//! without following links: open, rename, unlink, stat, chown, flock.

use std::os::fd::{AsRawFd, FromRawFd};

use super::user::{Gid, Uid};
use super::{c_name, c_path, cerr, cerr_retry};
use std::io;

/// An exclusive `flock` held until dropped.
pub struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    pub fn acquire(file: std::fs::File) -> io::Result<FileLock> {
        // SAFETY: flock on a file that is open for the call.
        cerr_retry(|| unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) })?;
        Ok(FileLock { _file: file })
    }
}

/// Sets the process's file mode creation mask; returns the one before.
/// It is the process's, not the thread's: call it only while no other
/// thread creates files (pilot-devd, at start, to bind its socket 0600).
pub fn set_umask(mask: u32) -> u32 {
    // SAFETY: umask(2) takes a mode, cannot fail and touches no memory.
    let before = unsafe { libc::umask(mask as libc::mode_t) };
    // mode_t is u32 on Linux, u16 on macOS and FreeBSD.
    before as u32
}

/// Whether we may write `path` (access(2) with W_OK, real ids).
pub fn can_write(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) on a NUL-terminated path that outlives the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Creates directory `path` with `mode` (EEXIST is returned as is: the
/// caller decides whether what exists is acceptable).
pub fn mkdir(path: &std::path::Path, mode: u32) -> io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: mkdir(2) on a NUL-terminated path that outlives the call.
    cerr(unsafe { libc::mkdir(c.as_ptr(), mode as libc::mode_t) }).map(drop)
}

/// Opens `path` as a directory descriptor, refusing a symlink as the
/// last component (O_NOFOLLOW) and anything that is not a directory.
pub fn open_dir(path: &std::path::Path) -> io::Result<std::fs::File> {
    let c = c_path(path)?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: open(2) on a NUL-terminated path; the fd is owned below.
    let fd = cerr(unsafe { libc::open(c.as_ptr(), flags) })?;
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// openat(2) relative to the directory `dir`, always with O_NOFOLLOW and
/// O_CLOEXEC added, so a planted symlink is never followed.
pub fn open_at(dir: &std::fs::File, name: &str, flags: i32, mode: u32) -> io::Result<std::fs::File> {
    let c = c_name(name)?;
    let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: openat(2) with a valid directory fd (borrowed for the call)
    // and a NUL-terminated name; the fd returned is owned below.
    let fd = cerr(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, mode as libc::c_uint) })?;
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// renameat(2) within one directory.
pub fn rename_at(dir: &std::fs::File, from: &str, to: &str) -> io::Result<()> {
    let (f, t) = (c_name(from)?, c_name(to)?);
    let d = dir.as_raw_fd();
    // SAFETY: a valid directory fd and two NUL-terminated names.
    cerr(unsafe { libc::renameat(d, f.as_ptr(), d, t.as_ptr()) }).map(drop)
}

/// unlinkat(2) of a non-directory entry (a symlink itself is removed,
/// never followed).
pub fn unlink_at(dir: &std::fs::File, name: &str) -> io::Result<()> {
    let c = c_name(name)?;
    // SAFETY: a valid directory fd and a NUL-terminated name.
    cerr(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) }).map(drop)
}

/// What fstatat(AT_SYMLINK_NOFOLLOW) says of an entry.
#[derive(Clone, Copy, Debug)]
pub struct EntryStat {
    pub regular: bool,
    pub uid: Uid,
    pub nlink: u64,
}

/// fstatat(2) with AT_SYMLINK_NOFOLLOW: describes the entry itself.
pub fn stat_at(dir: &std::fs::File, name: &str) -> io::Result<EntryStat> {
    let c = c_name(name)?;
    // SAFETY: all-zero is a valid `stat`; fstatat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid directory fd, a NUL-terminated name and a `stat` of
    // the right type that outlives the call.
    cerr(unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(EntryStat {
        regular: st.st_mode & libc::S_IFMT == libc::S_IFREG,
        uid: Uid(st.st_uid),
        nlink: st.st_nlink as u64,
    })
}

/// fchownat(2) with AT_SYMLINK_NOFOLLOW: changes the entry itself.
pub fn chown_at(dir: &std::fs::File, name: &str, uid: Uid, gid: Gid) -> io::Result<()> {
    let c = c_name(name)?;
    let flags = libc::AT_SYMLINK_NOFOLLOW;
    // SAFETY: a valid directory fd and a NUL-terminated name.
    cerr(unsafe { libc::fchownat(dir.as_raw_fd(), c.as_ptr(), uid.0, gid.0, flags) }).map(drop)
}

/// How many symlinks [`open_secure`] follows on the way (as the kernel's
/// own limit, MAXSYMLINKS).
const MAX_LINKS: usize = 40;

/// Opens `path` component by component, like sudo's secure open, for the
/// files the operator names (`--config`, `--access-log`, the state
/// directory), so that nobody but root and we can redirect the open:
///
/// - every directory on the way is opened relative to the one before
///   (`openat`, `O_NOFOLLOW`), then fstat-checked: owned by root or by us
///   (the effective uid), and writable by nobody else — unless it is
///   sticky (`/tmp`), and then what we open in it must be root's or ours;
/// - a symlink on the way is followed only where such a directory holds
///   it (a root-owned `/var/run` → `/run` is fine; a link another user
///   could have placed is refused), at most [`MAX_LINKS`] of them;
/// - the last component is never followed (`O_NOFOLLOW` added to `flags`,
///   with `O_CLOEXEC`): a link there is refused (ELOOP).
///
/// The last component's owner and type are the caller's to check (a
/// state directory of another user is opened by root; see
/// [`open_secure_file`] for files). Errors name the component refused.
pub fn open_secure(path: &std::path::Path, flags: i32, mode: u32) -> io::Result<std::fs::File> {
    let (dir, last) = walk_to_parent(path)?;
    let fd_flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    open_at(&dir.file, &last, fd_flags, mode).map_err(|e| refine(path, e))
}

/// [`open_secure`] for a file: it must then be a regular file owned by
/// root or by us (so a FIFO, a device or another user's file is refused;
/// pass `O_NONBLOCK` when reading, so a FIFO cannot hold the open).
pub fn open_secure_file(path: &std::path::Path, flags: i32, mode: u32) -> io::Result<std::fs::File> {
    use std::os::unix::fs::MetadataExt;
    let f = open_secure(path, flags, mode).map_err(|e| match e.raw_os_error() {
        // A FIFO without a reader, opened O_NONBLOCK for writing; a socket.
        Some(libc::ENXIO | libc::EOPNOTSUPP) => refused(format!("{} is not a regular file", path.display())),
        _ => e,
    })?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(refused(format!("{} is not a regular file", path.display())));
    }
    if meta.uid() != 0 && meta.uid() != super::user::euid().0 {
        return Err(refused(format!(
            "{} belongs to uid {}, neither root nor us (uid {})",
            path.display(),
            meta.uid(),
            super::user::euid()
        )));
    }
    Ok(f)
}

/// [`open_secure`] for a directory, creating it with `mode` first if
/// `create` (EEXIST is fine: the caller checks what it got). Returns the
/// directory and whether we created it.
pub fn open_dir_secure(path: &std::path::Path, create: Option<u32>) -> io::Result<(std::fs::File, bool)> {
    let (dir, last) = walk_to_parent(path)?;
    let mut created = false;
    if let Some(mode) = create {
        let c = c_name(&last)?;
        // SAFETY: mkdirat(2) with a valid directory fd and a NUL-terminated
        // name; it creates, never follows, a link.
        if unsafe { libc::mkdirat(dir.file.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) } == 0 {
            created = true;
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
    }
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let f = open_at(&dir.file, &last, flags, 0).map_err(|e| refine(path, e))?;
    Ok((f, created))
}

/// A directory reached by [`walk_to_parent`], and whether entries in it
/// must be root's or ours (it is sticky and others may write it).
struct Checked {
    file: std::fs::File,
    sticky_open: bool,
}

/// An ELOOP on the last component says "a symlink": say so in words.
fn refine(path: &std::path::Path, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        return refused(format!(
            "{} is a symbolic link, which is not followed",
            path.display()
        ));
    }
    e
}

/// A refusal of [`open_secure`] (not an error of the system): callers
/// tell it apart with [`is_refusal`].
fn refused(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, Refusal(why))
}

#[derive(Debug)]
struct Refusal(String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// Whether `e` is [`open_secure`] refusing a path it does not trust
/// (rather than the system failing to open it).
pub fn is_refusal(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|r| r.is::<Refusal>())
}

/// The flags a directory on the way is opened with: only to look up
/// names in it (O_PATH needs no read permission, as path lookup does not).
#[cfg(target_os = "linux")]
const WALK_FLAGS: i32 = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
#[cfg(not(target_os = "linux"))]
const WALK_FLAGS: i32 = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;

/// Walks every directory of `path` but the last component (see
/// [`open_secure`]); returns the checked parent and that last name.
fn walk_to_parent(path: &std::path::Path) -> io::Result<(Checked, String)> {
    use std::collections::VecDeque;
    use std::path::Component;
    let text = |c: &std::ffi::OsStr| {
        c.to_str()
            .map(str::to_string)
            .ok_or_else(|| refused(format!("{} is not UTF-8", path.display())))
    };
    let mut todo: VecDeque<String> = VecDeque::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => {}
            Component::CurDir => {}
            Component::ParentDir => todo.push_back("..".into()),
            Component::Normal(n) => todo.push_back(text(n)?),
        }
    }
    let Some(last) = todo.pop_back() else {
        return Err(refused(format!("{} names no file", path.display())));
    };
    if last == ".." {
        return Err(refused(format!("{} ends in ..", path.display())));
    }
    let start = if path.is_absolute() { "/" } else { "." };
    let mut here = std::path::PathBuf::from(start);
    let mut dir = check_dir(open_dir_path(start)?, &here, false)?;
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        let next = here.join(&name);
        // Errors of the system keep their errno (callers match on it).
        let st = stat_any(&dir.file, &name)?;
        if st.mode & libc::S_IFMT == libc::S_IFLNK {
            links += 1;
            if links > MAX_LINKS || dir.sticky_open || (st.uid != 0 && st.uid != super::user::euid().0) {
                return Err(refused(format!(
                    "{} is a symbolic link in a directory others may write, or not root's or ours; it is not followed",
                    next.display()
                )));
            }
            let target = read_link_at(&dir.file, &name)?;
            let mut parts: Vec<String> = Vec::new();
            for c in target.components() {
                match c {
                    Component::Normal(n) => parts.push(text(n)?),
                    Component::ParentDir => parts.push("..".into()),
                    _ => {}
                }
            }
            for p in parts.into_iter().rev() {
                todo.push_front(p);
            }
            if target.is_absolute() {
                here = std::path::PathBuf::from("/");
                dir = check_dir(open_dir_path("/")?, &here, false)?;
            }
            continue;
        }
        let f = open_at(&dir.file, &name, WALK_FLAGS, 0)?;
        dir = check_dir(f, &next, dir.sticky_open)?;
        here = next;
    }
    Ok((dir, last))
}

/// Checks a directory on the way: root's or ours (always, when its parent
/// is sticky and open to others, else as below), and writable by nobody
/// else unless sticky.
fn check_dir(file: std::fs::File, path: &std::path::Path, in_sticky: bool) -> io::Result<Checked> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    let me = super::user::euid().0;
    let trusted_owner = meta.uid() == 0 || meta.uid() == me;
    if !trusted_owner {
        let why = if in_sticky {
            "in a sticky directory others may write"
        } else {
            "on the way"
        };
        return Err(refused(format!(
            "{} belongs to uid {}, neither root nor us (uid {me}); a directory {why} must be",
            path.display(),
            meta.uid()
        )));
    }
    let open = meta.mode() & 0o022 != 0;
    let sticky = meta.mode() & 0o1000 != 0;
    if open && !sticky {
        return Err(refused(format!(
            "{} may be written by others (mode {:o}); refusing to open anything through it",
            path.display(),
            meta.mode() & 0o7777
        )));
    }
    Ok(Checked {
        file,
        sticky_open: open,
    })
}

fn open_dir_path(path: &str) -> io::Result<std::fs::File> {
    let c = c_name(path)?;
    // SAFETY: open(2) on a NUL-terminated path; the fd is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), WALK_FLAGS) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// The mode and owner of an entry itself (fstatat, AT_SYMLINK_NOFOLLOW).
struct AnyStat {
    mode: libc::mode_t,
    uid: u32,
}

fn stat_any(dir: &std::fs::File, name: &str) -> io::Result<AnyStat> {
    let c = c_name(name)?;
    // SAFETY: all-zero is a valid `stat`; fstatat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid directory fd, a NUL-terminated name and a `stat` of
    // the right type that outlives the call.
    if unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(AnyStat {
        mode: st.st_mode,
        uid: st.st_uid,
    })
}

fn read_link_at(dir: &std::fs::File, name: &str) -> io::Result<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let c = c_name(name)?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: readlinkat writes at most buf.len() bytes into `buf`.
    let n = unsafe { libc::readlinkat(dir.as_raw_fd(), c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&buf)))
}
