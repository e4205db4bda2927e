//! `pilot-gateway`: see `pilot-gateway --help` and the crate docs.

fn main() {
    let code = pilot_gateway::control::main(std::env::args_os().collect());
    std::process::exit(code);
}
