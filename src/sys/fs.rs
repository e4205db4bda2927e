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
