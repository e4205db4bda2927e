//! `pilot-gateway`: see `pilot-gateway --help` and the crate docs.
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![deny(unsafe_code)]

fn main() {
    let code = pilot_gateway::commands::main(std::env::args_os().collect());
    std::process::exit(code);
}
