//! Start-up: who the gateway runs as, its state directory, what a dead
//! predecessor left, and the plan of mappings and exposures — all before
//! anything on the system is touched.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnetwork::Ipv4Network;

use crate::access::AccessLog;
use crate::address::PilotAddr;
use crate::alias::{self, Aliases};
use crate::cli::Target;
use crate::daemon;
use crate::error::{Code, Error, Result};
use crate::ipc::Peer;
use crate::privilege::{self, Switched};
use crate::relay::ConnSettings;
use crate::state::{Entry, Exposed, Mapping, StateDir};
use crate::subnet::{self};
use crate::sys::{self, user::Uid};
use crate::{info, warn};

use super::Config;

/// Learns who serves the daemon socket (its peer credentials, as we are
/// now: root before any switch), decides whom the gateway runs as, and
/// opens (creating) the state directory. Used by the gateway and by the
/// `start` that spawns it, so both refuse the same things before touching
/// anything: a daemon that is not one we may use (`privilege::target_user`),
/// and for a root start a directory owned by a user who is neither root
/// nor the gateway's user (that user's gateway, or a directory planted
/// for us). The last value: whether the daemon's uid is only presumed
/// (see [`identify_daemon`]); then the directory is not opened (`None`):
/// root without CAP_DAC_OVERRIDE cannot open it, its owner can, once the
/// gateway has become that user ([`open_state_dir_as_user`]).
pub fn prepare_state_dir(cfg: &Config) -> Result<(Option<StateDir>, Option<sys::user::User>, Peer, bool)> {
    let (daemon, presumed) = identify_daemon(cfg)?;
    let user = privilege::target_user(
        cfg.user.as_deref(),
        cfg.no_user_switch,
        &cfg.socket,
        cfg.socket_searched,
        daemon,
    )?;
    if presumed {
        return Ok((None, user, daemon, true));
    }
    let dir = StateDir::open(&cfg.state_dir, true)?;
    let owner = dir.owner().0;
    if owner != sys::user::euid() && !owner.is_root() && user.as_ref().map(|u| u.uid) != Some(owner) {
        let who = sys::user::user_by_uid(owner).map_or_else(|| format!("uid {owner}"), |u| u.name);
        return Err(Error::new(
            Code::PermissionDenied,
            format!(
                "state directory {} belongs to {who}, who is not the user this gateway would run as",
                cfg.state_dir.display()
            ),
        )
        .hint(format!(
            "stop that user's gateway, or remove {} (after checking what is in it), or pass --state-dir DIR",
            cfg.state_dir.display()
        )));
    }
    Ok((Some(dir), user, daemon, false))
}

/// Who serves the daemon socket: its peer credentials. A root start
/// without CAP_DAC_OVERRIDE (the systemd unit's bounding set) cannot
/// connect to the socket of a daemon of another user (mode 0600), nor
/// open that user's state directory. Then, if the state directory is a
/// directory of a user other than root, mode 0700 — given by root: the
/// unit's `ExecStartPre=+` step ([`give_state_dir`]), which reached the
/// daemon as full root, or an earlier root start — that user is
/// *presumed* to be the daemon's (`true`). Nothing rests on the
/// presumption: the gateway becomes that user, then opens the directory
/// (walked and checked as for any start of that user: it must be theirs)
/// and makes sure through the daemon's peer credentials that the daemon
/// is theirs, before anything else ([`open_state_dir_as_user`]).
fn identify_daemon(cfg: &Config) -> Result<(Peer, bool)> {
    let err = match daemon::identify(&cfg.socket, &cfg.socket_source, connect_budget(cfg)) {
        Ok(peer) => return Ok((peer, false)),
        Err(e) => e,
    };
    if !sys::user::euid().is_root() || err.code != Code::PermissionDenied {
        return Err(err);
    }
    use std::os::unix::fs::MetadataExt;
    // lstat: a link is nobody's directory. Only whom to become rests on it.
    let owner = std::fs::symlink_metadata(&cfg.state_dir)
        .ok()
        .filter(|m| m.is_dir() && m.mode() & 0o077 == 0 && m.uid() != 0);
    match owner {
        Some(m) => Ok((
            Peer {
                uid: Uid(m.uid()),
                gid: sys::user::Gid(m.gid()),
            },
            true,
        )),
        None => Err(err.hint(format!(
            "root without CAP_DAC_OVERRIDE (as in the systemd unit) cannot open another user's daemon socket: give the state directory to the daemon's user first ({PREPARE_ENV}=1 pilot-gateway start …, the shipped unit's ExecStartPre=+ line), then start"
        ))),
    }
}

/// Set to `1` by the systemd unit's `ExecStartPre=+` line: `start` then
/// only gives the state directory to the user the gateway will run as
/// ([`give_state_dir`]) and exits, so the gateway itself can run with no
/// CAP_CHOWN in its bounding set. Only the operator who starts the
/// gateway sets it.
pub const PREPARE_ENV: &str = "PILOT_GATEWAY_PREPARE_STATE_DIR";

/// Whether this `start` is only the state directory's hand-over
/// ([`PREPARE_ENV`]).
pub fn prepare_only() -> bool {
    matches!(std::env::var_os(PREPARE_ENV), Some(v) if v == "1")
}

/// The one step of a root start that needs CAP_CHOWN, on its own: the
/// same checks as a start ([`prepare_state_dir`]: the daemon's uid from
/// its socket's peer credentials, whom the gateway will run as, the
/// directory's owner), then the directory given to that user. Nothing in
/// the directory is read or opened (the chown of leftover files is by
/// name, never through a link, in a directory still root's); no thread,
/// no network. Returns whom it was given to (`None`: the gateway stays
/// uid 0, or runs as the user that already owns it, or we are not root).
pub fn give_state_dir(cfg: &Config) -> Result<Option<sys::user::User>> {
    let (dir, user, _, _) = prepare_state_dir(cfg)?;
    match (dir, user) {
        (Some(mut dir), Some(u)) if sys::user::euid().is_root() && dir.owner().0 != u.uid => {
            dir.chown(u.uid, u.gid)?;
            Ok(Some(u))
        }
        _ => Ok(None),
    }
}

/// The budget of a start's exchanges with the daemon.
pub(super) fn connect_budget(cfg: &Config) -> Duration {
    cfg.dial_timeout.max(Duration::from_secs(2))
}

/// Opens the state directory and, when started as root, gives it to the
/// user we run as and restricts the process to its two capabilities,
/// switching to that user or staying uid 0 (a root daemon, `--user root`,
/// `--no-user-switch`): root keeps nothing else either way. No thread
/// exists yet, which this needs (capabilities are per thread).
pub(super) fn open_state_dir_as_user(cfg: &Config) -> Result<(StateDir, Option<Switched>, Peer)> {
    let (dir, user, daemon, presumed) = prepare_state_dir(cfg)?;
    let root = sys::user::euid().is_root();
    let mut dir = match dir {
        Some(d) if !root => return Ok((d, None, daemon)),
        other => other,
    };
    // Already the user's: given by the unit's ExecStartPre=+ step
    // (`give_state_dir`), so this process needs no CAP_CHOWN.
    if let Some((dir, user)) = dir
        .as_mut()
        .zip(user.as_ref())
        .filter(|(d, u)| d.owner().0 != u.uid)
    {
        dir.chown(user.uid, user.gid).map_err(|e| {
            e.hint(format!(
                "without CAP_CHOWN (a systemd unit whose bounding set lacks it), give the directory to the gateway's user first: {PREPARE_ENV}=1 pilot-gateway start … (the shipped unit's ExecStartPre=+ line)"
            ))
        })?;
    }
    let switched = privilege::restrict(user.as_ref())?;
    if presumed {
        // Now the presumed user, we may open the socket: it must be served
        // by that user (a socket of anyone else's is refused here or
        // cannot be opened at all).
        let seen = daemon::identify(&cfg.socket, &cfg.socket_source, connect_budget(cfg))?;
        if seen.uid != daemon.uid {
            return Err(Error::new(
                Code::PermissionDenied,
                format!(
                    "the daemon at {} runs as uid {}, not as uid {}, who owns the state directory {}",
                    cfg.socket.display(),
                    seen.uid,
                    daemon.uid,
                    cfg.state_dir.display()
                ),
            )
            .hint("give the state directory to the daemon's user (the unit's ExecStartPre=+ line does), or pass --state-dir DIR"));
        }
    }
    // Opened only now, as its owner: StateDir::open refuses one that is
    // not ours.
    let dir = match dir {
        Some(d) => d,
        None => StateDir::open(&cfg.state_dir, true)?,
    };
    // The start report and `status` say it too; a root gateway that only
    // dropped capabilities logs it at debug level, as before.
    let level = if user.is_some() {
        crate::log::Level::Info
    } else {
        crate::log::Level::Debug
    };
    crate::log::log(
        level,
        format_args!(
            "running as {} (uid {}) with capabilities {}",
            switched.user,
            switched.uid,
            switched.capabilities.join(",")
        ),
    );
    Ok((dir, Some(switched), daemon))
}

/// Refuses to start beside a live gateway; after a dead one, removes the
/// aliases it recorded — only where it is safe (see `alias::check_stale_alias`) —
/// and its files. Returns the aliases removed, and those left only because
/// a process held a socket on them (retried later: `Gateway::retry_stale_aliases`).
/// Runs after the switch to the gateway's user, with only its two capabilities.
pub(super) fn clean_up_after_dead_gateway(
    dir: &StateDir,
    aliases: &Aliases,
    subnet: Ipv4Network,
) -> Result<(Vec<String>, Vec<Ipv4Addr>)> {
    let Some(prev) = dir.read()? else {
        return Ok((Vec::new(), Vec::new()));
    };
    if prev.gateway.is_alive() {
        return Err(Error::new(
            Code::AlreadyExists,
            format!("a gateway is already running (pid {})", prev.gateway.pid),
        )
        .hint("stop it first: pilot-gateway stop"));
    }
    let invalid: BTreeSet<Ipv4Addr> = prev
        .validate(prev.subnet)
        .iter()
        .filter_map(|b| match b.entry {
            Entry::Mapping { local_ip, .. } => Some(local_ip),
            Entry::Exposure { .. } => None,
        })
        .collect();
    let mut cleaned = Vec::new();
    let mut busy = Vec::new();
    for m in prev.mappings.iter().filter(|m| m.alias_added) {
        if !subnet::is_local_address(m.local_ip).unwrap_or(true) {
            continue; // already gone
        }
        let removable = if invalid.contains(&m.local_ip) {
            Err(Error::invalid(format!(
                "it is not valid in the old state's subnet {}",
                prev.subnet
            )))
        } else {
            alias::check_stale_alias(subnet, m.local_ip, &aliases.label)
        };
        if let Err(why) = removable {
            let later = if why.message.contains(alias::BUSY) {
                busy.push(m.local_ip);
                " (tried again once it is unused)"
            } else {
                ""
            };
            warn!(
                "left address {} alone: the old state file says the gateway added it, but {}{later}",
                m.local_ip, why.message
            );
            continue;
        }
        match aliases.remove(m.local_ip) {
            Ok(()) => cleaned.push(m.local_ip.to_string()),
            Err(e) => warn!("could not remove leftover alias {}: {e}", m.local_ip),
        }
    }
    let removed = if cleaned.is_empty() {
        "none".to_string()
    } else {
        cleaned.join(", ")
    };
    info!(
        "cleaned up after gateway pid {} that exited without cleanup (aliases removed: {removed})",
        prev.gateway.pid
    );
    dir.remove("state.json");
    dir.remove("stats.json");
    Ok((cleaned, busy))
}

/// Asks the daemon about every target and allocates local IPs, before
/// anything on the system is touched. Returns the mappings and the trust
/// warnings.
pub(super) fn plan_mappings(
    cfg: &Config,
    targets: &[Target],
    daemon_uid: Uid,
    label: &str,
) -> Result<(Vec<Mapping>, Vec<String>)> {
    let (mut session, _) = daemon::probe(
        &cfg.socket,
        &cfg.socket_source,
        connect_budget(cfg),
        Some(daemon_uid),
    )?;
    let mut used = BTreeSet::new();
    for ip in targets.iter().filter_map(|t| t.ip) {
        if !subnet::is_assignable(cfg.subnet, ip) {
            subnet::parse_local_ip(&ip.to_string(), cfg.subnet)?;
        }
        if !used.insert(ip) {
            return Err(Error::new(
                Code::AlreadyExists,
                format!("local IP {ip} is given twice"),
            ));
        }
        subnet::check_ip_free(ip, label)?;
    }
    let mut mappings: Vec<Mapping> = Vec::new();
    for t in targets {
        let (addr, hostname) = daemon::resolve_target(Some(&mut session), &t.name)?;
        if let Some(m) = mappings.iter().find(|m| m.pilot_addr == addr) {
            if t.ip.is_some_and(|ip| ip != m.local_ip) {
                return Err(Error::new(
                    Code::AlreadyExists,
                    format!("{addr} is given twice with different local IPs"),
                ));
            }
            if t.ports.is_some() && t.ports != m.ports {
                return Err(Error::new(
                    Code::AlreadyExists,
                    format!("{addr} is given twice with different ports"),
                )
                .hint("give each address once, with all its ports: --map ADDR,ports=P+P…"));
            }
            continue; // the same address twice maps once
        }
        let local_ip = match t.ip {
            Some(ip) => ip,
            None => {
                let ip = subnet::next_unused(cfg.subnet, &used, label)?;
                used.insert(ip);
                ip
            }
        };
        mappings.push(Mapping {
            local_ip,
            pilot_addr: addr,
            hostname,
            alias_added: false,
            // The gateway's own list is the gateway's ports, not a copy.
            ports: t.ports.clone().filter(|p| *p != cfg.ports),
            generation: 0,
        });
    }
    let addrs: Vec<PilotAddr> = mappings.iter().map(|m| m.pilot_addr).collect();
    let warnings = if addrs.is_empty() {
        Vec::new()
    } else {
        daemon::trust_warnings(&mut session, &addrs)
    };
    Ok((mappings, warnings))
}

/// The `--expose` requests as state entries: `--allow` hostnames resolved
/// through the daemon now, before any thread exists.
pub(super) fn plan_exposures(cfg: &Config, daemon_uid: Uid) -> Result<Vec<Exposed>> {
    let mut out: Vec<Exposed> = Vec::new();
    for e in &cfg.exposures {
        if out.iter().any(|x| x.port == e.port) {
            return Err(Error::new(
                Code::AlreadyExists,
                format!("pilot port {} is given twice in --expose", e.port),
            ));
        }
        let allow = match &e.allow {
            Some(peers) => Some(daemon::resolve_peers(&cfg.socket, peers, Some(daemon_uid))?),
            None => None,
        };
        out.push(Exposed {
            port: e.port,
            target: e.target,
            allow,
            allow_remote_target: e.allow_remote_target,
            proxy_protocol: e.proxy_protocol,
            generation: 0,
        });
    }
    Ok(out)
}

pub(super) fn open_access_log(cfg: &Config) -> Result<Option<AccessLog>> {
    let Some((path, format)) = &cfg.access_log else {
        return Ok(None);
    };
    AccessLog::open(path, *format).map(Some).map_err(|e| {
        Error::io(format!("cannot open access log {path}"), &e).hint("check the path and its permissions")
    })
}

/// The data path's settings, with `--max-conns` as fitted to the limits
/// (`max_conns`) and the expose side's budgets fitted to it.
pub(super) fn conn_settings(cfg: &Config, max_conns: usize, daemon_uid: Uid) -> ConnSettings {
    let (max_exposed, max_per_peer) =
        crate::limits::fit_exposed(max_conns, cfg.max_conns, cfg.max_exposed, cfg.max_per_peer);
    ConnSettings {
        daemon_socket: cfg.socket.clone(),
        daemon_uid,
        max_conns,
        max_exposed,
        max_per_peer,
        dial_timeout: cfg.dial_timeout,
        idle_timeout: cfg.idle_timeout,
        half_closed_timeout: cfg.half_closed_timeout,
        allow_remote: cfg.allow_remote,
    }
}
