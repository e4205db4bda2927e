//! The command-line parser, over NUL-separated arguments: it returns a
//! command or an error, and never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let argv0 = if data.first() == Some(&1) { "pilotctl" } else { "pilot-gateway" };
    let _ = parts.next();
    let args: Vec<OsString> = parts.take(32).map(|p| OsString::from_vec(p.to_vec())).collect();
    let _ = pilot_gateway::cli::parse(argv0, args);
});
