//! The help texts: `pilot-gateway help [COMMAND]`, `COMMAND --help`.
//! Kept apart from the parser (`cli`) so that each reads as one thing.

pub const USAGE: &str = "\
pilot-gateway — reach Pilot Protocol agents from ordinary TCP clients

Usage:
  pilot-gateway [--json] [--socket PATH] [--state-dir DIR] COMMAND …
  pilotctl [--json] gateway COMMAND …          (through a link named pilotctl)
  pilot-gateway [-socket PATH] [-subnet CIDR] [-ports LIST] [-config FILE] run [ADDR [IP]]…

Commands:
  start [ADDR [IP]]…   start the gateway (in the background unless --foreground)
  map ADDR [IP] [--ports LIST]
                       map an agent (address or hostname) to a local IP, on its
                       own ports if given (again with other ports: changed live)
  unmap IP             remove a mapping, closing its connections
  expose PORT [HOST:]TPORT  serve a local TCP service on pilot port PORT of this node
  unexpose PORT        stop serving pilot port PORT, closing its connections
  list                 show mappings and exposures with live counters
  status               show the gateway, the daemon and totals
  stop                 stop the gateway and remove its aliases
  run [ADDR [IP]]…     upstream's form: start in the foreground

Global flags:
  --json               machine-readable output ({\"status\":\"ok\",\"data\":…})
  --socket PATH        daemon socket (default: $PILOT_SOCKET, ~/.pilot/config.json,
                       $XDG_RUNTIME_DIR/pilot.sock, /tmp/pilot.sock)
  --state-dir DIR      state directory (default: $PILOT_GATEWAY_STATE_DIR,
                       /run/pilot-gateway as root, $XDG_RUNTIME_DIR/pilot-gateway)
  --config FILE        JSON object of flag values; command-line flags win
  --log-level LEVEL    error, warn, info (default) or debug
  --log-format FORMAT  text (default) or json
  -h, --help           help (also: pilot-gateway help COMMAND)
  -V, --version        version

Run `pilot-gateway help COMMAND` for a command's flags. Manual: pilot-gateway(8).
";

const START_HELP: &str = "\
Usage: pilot-gateway start [flags] [ADDR [LOCAL_IP]]… [--map ADDR[,ip=IP][,ports=P+P…]]…
       pilot-gateway [flags] run [ADDR [LOCAL_IP]]…     (foreground, upstream's form)

Maps each ADDR (a pilot address such as 0:0000.0000.0004, or a hostname the
daemon resolves) to the next free IP of the subnet, or to LOCAL_IP, adds the
loopback aliases, listens on every port of every mapped IP, and relays each
connection to the same port of the agent through the daemon. Returns once
everything is up, printing pid, subnet, ports and mappings.

Flags:
  --subnet CIDR          IPv4 subnet to hand out (default 10.4.0.0/16)
  --ports LIST           the gateway's ports, for every mapping without its own
                         (default 80,443,1000,1001,1002,7,8080,8443)
  --map ADDR[,ip=IP][,ports=P+P…]
                         one mapping with its own local IP and/or ports
                         (repeatable; ports=80,9000 works too), e.g.
                         --map lab-b,ports=80+9000
  --foreground           stay attached (for systemd); stop with SIGTERM/SIGINT
  --max-conns N          concurrent bridged connections (default 1000)
  --max-exposed N        of those, slots exposures and their connections may hold;
                         while one runs, forwarded connections hold at most the
                         rest: neither side takes the other's (default half)
  --max-per-peer N       exposed connections one peer node may hold
                         (default a tenth of --max-exposed, at least 1)
  --dial-timeout SECS    give up on a dial after SECS (default 10)
  --idle-timeout SECS    close a connection idle for SECS (default 300)
  --half-closed-timeout SECS
                         close a client that shut down its sending side (but
                         did not close) after SECS without data (default 10)
  --close-linger SECS    before closing a pilot connection, wait until the daemon
                         reports everything sent delivered, at most SECS without
                         progress (default 5; longer while data still moves)
  --access-log PATH      one line per finished connection (- for stderr)
  --access-log-format F  text (default) or json
  --user NAME            run as NAME, keeping only CAP_NET_ADMIN and CAP_NET_BIND_SERVICE
  --no-user-switch       as root, do not switch to the daemon socket's owner
  --allow-any-subnet     allow a subnet outside private, shared and loopback ranges
  --allow-remote         also serve clients from other hosts (off: only this host's
                         own clients; see SECURITY.md before turning it on)
  --expose P=[HOST:]PORT[,allow=PEER+PEER…][,proxy]
                         also serve the local TCP service HOST:PORT (127.0.0.1 if
                         no HOST) on pilot port P, as `expose` does; repeatable;
                         allow= admits only the listed peers (addresses or hostnames);
                         proxy sends a PROXY v2 header first (--proxy-protocol)
  --allow-remote-target  let every --expose target be another host's address

A gateway may run with only exposures and no ADDR.
";

const EXPOSE_HELP: &str = "\
Usage: pilot-gateway expose [--allow PEERS] [--allow-remote-target] [--proxy-protocol] PILOT_PORT [HOST:]PORT

Serves the local TCP service HOST:PORT (a bare PORT means 127.0.0.1:PORT) on
pilot port PILOT_PORT of this node, through the running gateway: each inbound
pilot connection to that port becomes a TCP connection to the service. A
gateway started with no mappings can serve exposures only.

Fails with port_in_use when the daemon or another program holds the port (the
daemon itself holds 7, 1001 and 1002), bad_target for a target that is not a
service address of this host, already_exists when the port is exposed with
another target.

Flags:
  --allow PEERS          admit only these peers: comma-separated pilot addresses
                         or hostnames (resolved through the daemon now); others
                         are closed at once, counted and logged
  --allow-remote-target  allow a target on another host: every peer the daemon
                         trusts then becomes a client of that host's network
  --proxy-protocol       send the service a PROXY protocol v2 header before any
                         data: the peer's pilot address as source (IPv6
                         fd70:696c:6f74::NNNN:HHHH:LLLL, and as text in TLV 0xE0)
                         and port; for nginx: listen … proxy_protocol and
                         $proxy_protocol_addr
";

const UNEXPOSE_HELP: &str = "\
Usage: pilot-gateway unexpose [--drain SECS [--wait]] PILOT_PORT

Stops serving PILOT_PORT: the gateway releases the port (the daemon frees it
and resets its live connections). Reports how many live connections were
cut (`cut`). Fails with not_found for a port not exposed.

Flags:
  --drain SECS           refuse new connections at once, let live ones finish
                         for up to SECS in the background, then cut the rest;
                         returns at once with what is draining (status shows it)
  --wait                 with --drain: wait until the drain is over, printing
                         progress, and report how many were cut
";

pub fn command_help(topic: &str) -> Option<&'static str> {
    Some(match topic {
        "start" | "run" => START_HELP,
        "map" => {
            "\
Usage: pilot-gateway map ADDR [LOCAL_IP] [--ports LIST]

Adds a mapping to the running gateway. ADDR is a pilot address or a
hostname (resolved through the daemon). LOCAL_IP must lie in the gateway's
subnet and be free (no other program's socket on it); without it the next
free IP is used, skipping addresses others use. Mapping an address that is
already mapped returns its existing IP. Warns at once when the daemon does
not trust the node (connections would fail).

Flags:
  --ports LIST           the mapping's own ports (default: the gateway's).
                         For an address already mapped with other ports, its
                         listeners change live: added ports open, removed ones
                         stop accepting, live connections stay.
"
        }
        "unmap" => {
            "\
Usage: pilot-gateway unmap [--drain SECS [--wait]] LOCAL_IP

Removes a mapping from the running gateway: its listeners close, its live
connections are closed and its loopback alias is removed (if the gateway added it).
Reports how many live connections were cut (`cut`).

Flags:
  --drain SECS           stop accepting, let live connections finish for up to
                         SECS in the background, then cut the rest; returns at
                         once with what is draining (status shows it)
  --wait                 with --drain: wait until the drain is over, printing
                         progress, and report how many were cut
"
        }
        "expose" => EXPOSE_HELP,
        "unexpose" => UNEXPOSE_HELP,
        "list" => {
            "\
Usage: pilot-gateway list

Shows the mappings of the running gateway with their ports (marked (own) when
the mapping has its own) and live counters: active and total connections,
bytes each way (up: client to agent, down: agent to client), failed dials,
and the last failed dial's reason under the mapping.
Then the exposures: pilot port, target, state (bound, or rebinding after the
daemon went away), active and total connections, bytes in (peer to service)
and out, peers refused by --allow, connections reset because the service
stopped reading.
"
        }
        "status" => {
            "\
Usage: pilot-gateway status

Shows pid, uptime, socket, whether the daemon answers, subnet, ports,
totals (connections, bytes, refused connections, failed dials), the
mappings with their own ports, the last few distinct failed dials, each
exposure with its state and counters, what is draining and for how long
still, and the uid and capabilities the gateway runs with.
"
        }
        "stop" => {
            "\
Usage: pilot-gateway stop [--drain SECS [--wait]]

Stops the running gateway and waits until it has exited and removed its aliases.
Reports how many live connections were cut (`cut`), forwarded and exposed.
A stop during a drain ends the drain and cuts what is left.

Flags:
  --drain SECS           stop accepting (and refuse new inbound connections to
                         exposed ports), let live connections of both kinds
                         finish for up to SECS in the background, then cut
                         the rest and exit; returns at once (status shows the
                         drain; another stop cuts at once)
  --wait                 with --drain: wait until the gateway has exited,
                         printing progress
"
        }
        _ => return None,
    })
}
