//! `pilot-gateway`: see `pilot-gateway --help` and the crate docs.
#![deny(clippy::unwrap_used, clippy::expect_used)]

fn main() {
    let code = pilot_gateway::control::main(std::env::args_os().collect());
    std::process::exit(code);
}
