//! Thin, checked wrappers over the few POSIX calls the gateway needs
//! beyond std, one module per concern. Every `unsafe` block of the product
//! outside `privilege.rs` is here (the rest of the crate denies
//! `unsafe_code`), each with a SAFETY note that says why it holds.

pub mod fs;
pub mod net;
pub mod proc;
pub mod signal;
pub mod sock_diag;
pub mod user;

use std::ffi::CString;
use std::io;

/// Makes `name` a C string, refusing an interior NUL.
fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn c_path(path: &std::path::Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}
