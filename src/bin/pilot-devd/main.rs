//! `pilot-devd`: a stand-in Pilot daemon for development and tests. See
//! `pilot-devd --help` and `daemon.rs` beside this file.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![deny(unsafe_code)]

use std::time::Duration;

use lexopt::prelude::*;
use pilot_gateway::address::PilotAddr;
mod conns;
mod daemon;
mod faults;

use daemon::{Config, Misbehave};

const HELP: &str = "\
pilot-devd — a stand-in for the Pilot daemon's IPC socket (development and tests only)

It is not the overlay: a dial to a pilot address connects to a local TCP endpoint.

Usage: pilot-devd [flags]
  --socket PATH            socket to serve (default /tmp/pilot.sock)
  --route ADDR=HOST        dials to port P of ADDR go to HOST:P
  --route ADDR:PORT=HOST:PORT   one port of ADDR goes to HOST:PORT
  --untrusted ADDR         refuse dials to ADDR as untrusted (and leave it out of the trusted list)
  --dial-error ADDR=TEXT   dials to ADDR fail with error TEXT (\\n is a newline, \\e is ESC)
  --dial-delay MS          delay every dial by MS milliseconds
  --dial-delay ADDR=MS     delay dials to ADDR by MS milliseconds
  --host NAME=ADDR         answer hostname lookups of NAME with ADDR
  --max-clients N          serve at most N clients at once (default 1024)
  --any-uid                accept clients of any uid (default: only our own)
  --node-id N              our node id in Info (default 1)
  --hostname NAME          our hostname in Info (default devd)
  --misbehave MODE         break the protocol after each successful dial: oversize,
                           truncated, unknown-cmd, recv-unknown-id, short-dialok, flood
  --misbehave ADDR=MODE    the same for dials to ADDR only
  --stall-accept           accept no clients, backlog cut to the minimum (a wedged daemon);
                           SIGUSR1 toggles this while running
  --trickle MS             write every reply one byte at a time, MS milliseconds apart
  --inbound LOCALTCP=ADDR:PORT   each TCP connection to LOCALTCP (IP:PORT) arrives, as
                           a connection from ADDR, at the client that bound PORT
                           (nobody bound it: the TCP connection is reset); repeatable
  --unbind                 answer Unbind (0x37) as newer daemons do (default: unknown
                           command, like the Feb-2026 daemon)
  --lossy-close MS         lose data at Close as the Feb-2026 daemon does: every Send
                           reaches the peer MS later (in_flight/unacked in Info's
                           conn_list until then), a Close drops what is undelivered,
                           and a Close within MS of an Accept is lost (the dialer
                           waits out its dial)
  --no-conn-list           leave conn_list out of Info, as daemons before Feb-2026
  --verbose                log every client and dial

Ports 7, 1001 and 1002 are held by the daemon's own services, as on the real daemon.
";

fn fail(msg: String) -> ! {
    eprintln!("pilot-devd: {msg}");
    std::process::exit(2);
}

fn addr(s: &str, flag: &str) -> PilotAddr {
    s.parse::<PilotAddr>()
        .unwrap_or_else(|e| fail(format!("{flag}: {e}")))
}

fn parse() -> Result<Config, lexopt::Error> {
    let mut cfg = Config::default();
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next()? {
        match arg {
            Long(name) if FAULT_FLAGS.contains(&name) => {
                let name = name.to_string();
                fault_flag(&mut cfg, &name, &mut p)?;
            }
            Long("socket") => cfg.socket = p.value()?.into(),
            Long("route") => {
                let v = p.value()?.string()?;
                cfg.routes
                    .push(Config::parse_route(&v).unwrap_or_else(|e| fail(e)));
            }
            Long("untrusted") => {
                let v = p.value()?.string()?;
                cfg.untrusted.insert(addr(&v, "--untrusted"));
            }
            Long("host") => {
                let v = p.value()?.string()?;
                let (name, a) = v
                    .split_once('=')
                    .unwrap_or_else(|| fail(format!("--host {v:?}: expected NAME=ADDR")));
                cfg.hosts.insert(name.to_string(), addr(a, "--host"));
            }
            Long("max-clients") => {
                cfg.max_clients = p.value()?.parse()?;
            }
            Long("any-uid") => cfg.any_uid = true,
            Long("node-id") => cfg.node_id = p.value()?.parse()?,
            Long("hostname") => cfg.hostname = p.value()?.string()?,
            Long("inbound") => {
                let v = p.value()?.string()?;
                cfg.inbound
                    .push(Config::parse_inbound(&v).unwrap_or_else(|e| fail(e)));
            }
            Long("unbind") => cfg.unbind = true,
            Long("no-conn-list") => cfg.no_conn_list = true,
            Long("lossy-close") => {
                let ms: u64 = p.value()?.parse()?;
                cfg.lossy_close = (ms > 0).then(|| Duration::from_millis(ms));
            }
            Long("verbose") => cfg.verbose = true,
            Short('h') | Long("help") => {
                print!("{HELP}");
                std::process::exit(0);
            }
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(cfg)
}

/// The flags that make this daemon slow or wrong on purpose, for fault tests.
const FAULT_FLAGS: [&str; 5] = ["dial-error", "dial-delay", "misbehave", "stall-accept", "trickle"];

fn fault_flag(cfg: &mut Config, name: &str, p: &mut lexopt::Parser) -> Result<(), lexopt::Error> {
    match name {
        "dial-error" => {
            let v = p.value()?.string()?;
            let (a, text) = v
                .split_once('=')
                .unwrap_or_else(|| fail(format!("--dial-error {v:?}: expected ADDR=TEXT")));
            let text = text.replace("\\n", "\n").replace("\\e", "\u{1b}");
            cfg.dial_error.insert(addr(a, "--dial-error"), text);
        }
        "dial-delay" => {
            let v = p.value()?.string()?;
            let ms = |t: &str| {
                t.parse::<u64>()
                    .map(Duration::from_millis)
                    .unwrap_or_else(|_| fail(format!("--dial-delay {v:?}: not milliseconds")))
            };
            match v.split_once('=') {
                Some((a, t)) => {
                    cfg.dial_delay_for.insert(addr(a, "--dial-delay"), ms(t));
                }
                None => cfg.dial_delay = ms(&v),
            }
        }
        "misbehave" => {
            let v = p.value()?.string()?;
            let mode = |m: &str| {
                Misbehave::parse(m).unwrap_or_else(|| fail(format!("--misbehave {v:?}: unknown mode")))
            };
            match v.split_once('=') {
                Some((a, m)) => {
                    cfg.misbehave_for.insert(addr(a, "--misbehave"), mode(m));
                }
                None => cfg.misbehave = Some(mode(&v)),
            }
        }
        "stall-accept" => faults::stall_from_start(),
        "trickle" => {
            let ms: u64 = p.value()?.parse()?;
            faults::trickle(ms);
        }
        _ => {}
    }
    Ok(())
}

fn main() {
    let cfg = parse().unwrap_or_else(|e| fail(format!("{e} (see --help)")));
    let socket = cfg.socket.clone();
    // Remove the socket on SIGTERM/SIGINT.
    let signals = pilot_gateway::sys::signal::Signals::install(&[libc::SIGTERM, libc::SIGINT, libc::SIGUSR1])
        .unwrap_or_else(|e| fail(format!("signals: {e}")));
    std::thread::spawn(move || loop {
        for sig in signals.wait(Duration::from_secs(3600)) {
            if sig == libc::SIGUSR1 {
                let stalled = faults::toggle_stall();
                eprintln!(
                    "pilot-devd: {}",
                    if stalled {
                        "stalled: accepting no clients"
                    } else {
                        "accepting clients again"
                    }
                );
            } else {
                let _ = std::fs::remove_file(&socket);
                std::process::exit(0);
            }
        }
    });
    if let Err(e) = daemon::serve(cfg) {
        fail(format!("{e}"));
    }
}
