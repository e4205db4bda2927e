//! Thin, checked wrappers over the few POSIX calls the gateway needs
//! beyond std, one module per concern. Every `unsafe` block of the product
//! outside `privilege.rs` is here (the rest of the crate denies
//! `unsafe_code`), each with a SAFETY note that says why it holds
//! (Cargo.toml's `[lints]` make a missing note an error).
//!
//! Linux, macOS and FreeBSD: where a call differs, the variant is chosen
//! with `cfg` beside the call (see the README's "Platforms").

pub mod fs;
pub mod net;
pub mod proc;
pub mod signal;
pub mod sock_diag;
pub mod user;

use std::ffi::CString;
use std::io;

/// The one errno check: a C call's return value `-1` becomes the error
/// `errno` names (read once, right after the call, by `last_os_error`);
/// any other value is returned. For calls that report failure as -1 (almost
/// all of POSIX); not for those that return an error number (getpwnam_r).
pub(crate) fn cerr<T: Copy + PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// [`cerr`] for a call that an interrupting signal may cut short (EINTR):
/// calls it again until it completes or fails otherwise.
pub(crate) fn cerr_retry<T: Copy + PartialEq + From<i8>>(mut call: impl FnMut() -> T) -> io::Result<T> {
    loop {
        match cerr(call()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Makes `name` a C string, refusing an interior NUL.
fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn c_path(path: &std::path::Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}
