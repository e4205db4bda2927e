//! The state directory: the shared state between the running gateway and
//! the commands that steer it.
//!
//! ```text
//! STATE_DIR/            mode 0700, owned by the gateway's user
//!   lock                flock(2) held around every read-modify-write
//!   state.json          desired configuration + the gateway's identity (0600)
//!   stats.json          live counters, written by the gateway on SIGUSR2 (0600)
//!   gateway.log         the background gateway's stderr
//! ```
//!
//! `state.json` is the single source of truth for what should be mapped.
//! A command changes it under the lock, bumps `generation`, and signals the
//! gateway (SIGHUP); the gateway applies the difference under the lock,
//! records a result for each generation it could not apply, and sets
//! `applied`. Writes are atomic (temporary file, fsync, rename), so readers
//! that only look (list, status, waiting commands) need no lock.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnetwork::Ipv4Network;

use crate::address::PilotAddr;
use crate::error::{Code, Error, Result};
use crate::json::{self, Value};
use crate::stats::Stats;
use crate::sys::{self, fs::FileLock, proc::ProcId};

/// Version of the state file format written. Version 2 added
/// `exposures`; version 1 files (none) are still read. A file of any other
/// version is refused.
pub const VERSION: u64 = 2;
const READABLE: [u64; 2] = [1, 2];
/// Largest state file we read. 1 MiB holds several thousand mappings; a
/// bigger file is refused before it is read, so a planted one cannot make
/// a command eat memory.
const MAX_FILE: u64 = 1 << 20;
/// How many apply results are kept for waiting commands.
const MAX_RESULTS: usize = 256;

/// One mapping as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub local_ip: Ipv4Addr,
    pub pilot_addr: PilotAddr,
    /// The hostname it was mapped by, if any (shown in reports).
    pub hostname: Option<String>,
    /// Whether the gateway added the loopback alias (and so must remove it).
    pub alias_added: bool,
    /// The generation that added this mapping.
    pub generation: u64,
}

/// One exposure as recorded: pilot port `port` of this node serves the
/// local TCP service `target` (`pilot-gateway expose`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposed {
    pub port: u16,
    pub target: SocketAddr,
    /// Admit only these peers (`None`: whoever the daemon lets in), each
    /// with the hostname it was given by, if any (for display only: the
    /// address is what is enforced).
    pub allow: Option<Vec<(PilotAddr, Option<String>)>>,
    /// The target may be another host (`--allow-remote-target`).
    pub allow_remote_target: bool,
    /// The generation that added this exposure.
    pub generation: u64,
}

impl Exposed {
    /// The allow-list as the engine takes it.
    pub fn allow_set(&self) -> Option<std::collections::HashSet<PilotAddr>> {
        self.allow.as_ref().map(|l| l.iter().map(|(a, _)| *a).collect())
    }

    /// Whether `other` asks for the same service (target, peers, remote).
    pub fn same_service(&self, other: &Exposed) -> bool {
        self.port == other.port
            && self.target == other.target
            && self.allow_set() == other.allow_set()
            && self.allow_remote_target == other.allow_remote_target
    }

    /// The exposure as the state file records it; commands report the same
    /// without `generation` (`output::exposure_json`).
    pub fn to_json(&self) -> Value {
        let allow = self.allow.as_ref().map(|l| {
            Value::Arr(
                l.iter()
                    .map(|(a, name)| {
                        Value::obj([
                            ("addr", Value::from(a.to_string())),
                            ("name", name.clone().into()),
                        ])
                    })
                    .collect(),
            )
        });
        Value::obj([
            ("port", Value::from(self.port)),
            ("target", self.target.to_string().into()),
            ("allow", allow.unwrap_or(Value::Null)),
            ("allow_remote_target", self.allow_remote_target.into()),
            ("generation", self.generation.into()),
        ])
    }

    /// Reads one exposure; the error says which field is wrong.
    pub fn from_json(e: &Value) -> std::result::Result<Exposed, String> {
        let port = e
            .get("port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or("an exposure has a bad \"port\"")?;
        let target = text(e, "target")?
            .parse()
            .map_err(|_| "an exposure has a bad \"target\"".to_string())?;
        let allow = match e.get("allow") {
            None | Some(Value::Null) => None,
            Some(list) => {
                let mut peers = Vec::new();
                for p in list.as_array().ok_or("an exposure's \"allow\" is not a list")? {
                    let addr = text(p, "addr")?
                        .parse::<PilotAddr>()
                        .map_err(|e| format!("an exposure's allow entry: {e}"))?;
                    peers.push((addr, p.get("name").and_then(Value::as_str).map(str::to_string)));
                }
                Some(peers)
            }
        };
        Ok(Exposed {
            port,
            target,
            allow,
            allow_remote_target: e
                .get("allow_remote_target")
                .and_then(Value::as_bool)
                .ok_or("an exposure lacks \"allow_remote_target\"")?,
            generation: num(e, "generation")?,
        })
    }
}

/// The gateway's answer to a generation it could not apply: why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyFailure {
    pub generation: u64,
    pub error: Error,
}

/// An entry of the state file that fails [`State::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub entry: Entry,
    pub generation: u64,
    pub why: String,
}

/// Which entry of the state file, by position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// `State::mappings[index]`, with its local IP.
    Mapping { index: usize, local_ip: Ipv4Addr },
    /// `State::exposures[index]`, with its pilot port.
    Exposure { index: usize, port: u16 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    pub gateway: ProcId,
    /// Unix time the gateway started.
    pub started_at: u64,
    pub socket: PathBuf,
    pub subnet: Ipv4Network,
    pub ports: Vec<u16>,
    pub max_conns: usize,
    /// `--half-closed-timeout`; `None` in state written before it existed.
    pub half_closed_timeout: Option<Duration>,
    /// The user the gateway runs as, when it switched from root.
    pub user: Option<String>,
    /// The daemon's uid, from the peer credentials seen at start: commands
    /// refuse a socket served by another uid (`ipc::connect_by`). `None`
    /// in state written before it existed.
    pub daemon_uid: Option<u32>,
    pub generation: u64,
    pub applied: u64,
    pub mappings: Vec<Mapping>,
    pub exposures: Vec<Exposed>,
    pub failures: Vec<ApplyFailure>,
}

impl State {
    pub fn find_exposure(&self, port: u16) -> Option<&Exposed> {
        self.exposures.iter().find(|e| e.port == port)
    }

    pub fn used_ips(&self) -> BTreeSet<Ipv4Addr> {
        self.mappings.iter().map(|m| m.local_ip).collect()
    }

    pub fn find_ip(&self, ip: Ipv4Addr) -> Option<&Mapping> {
        self.mappings.iter().find(|m| m.local_ip == ip)
    }

    pub fn find_addr(&self, addr: PilotAddr) -> Option<&Mapping> {
        self.mappings.iter().find(|m| m.pilot_addr == addr)
    }

    /// Checks everything in the file that could steer the system, against
    /// `subnet` — the running gateway's own, from memory, never the file's.
    /// Returns the mappings that must not be applied, each with why: an IP
    /// that is not assignable in the subnet (outside it, its network or
    /// broadcast address, 127.0.0.1) or that appears twice, or an address
    /// mapped twice; and the exposures that must not be applied: port 0,
    /// a port exposed twice, a target that is not a service address of
    /// this host (unless the entry says `allow_remote_target`). Nothing in
    /// the file is trusted before this; it is the one entry point for
    /// validation.
    pub fn validate(&self, subnet: Ipv4Network) -> Vec<Invalid> {
        let mut bad = self.validate_mappings(subnet);
        let mut ports = BTreeSet::new();
        for (index, e) in self.exposures.iter().enumerate() {
            let why = if e.port == 0 {
                Some("pilot port 0 cannot be exposed".to_string())
            } else if !ports.insert(e.port) {
                Some(format!("pilot port {} is exposed twice", e.port))
            } else {
                crate::expose::check_target(e.target, e.allow_remote_target, Some(subnet))
                    .err()
                    .map(|err| format!("pilot port {}: {}", e.port, err.message))
            };
            if let Some(why) = why {
                bad.push(Invalid {
                    entry: Entry::Exposure { index, port: e.port },
                    generation: e.generation,
                    why,
                });
            }
        }
        bad
    }

    fn validate_mappings(&self, subnet: Ipv4Network) -> Vec<Invalid> {
        let mut ips = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        let mut bad = Vec::new();
        for (index, m) in self.mappings.iter().enumerate() {
            let why = if !crate::subnet::is_assignable(subnet, m.local_ip) {
                Some(format!(
                    "local IP {} is not an assignable address of the gateway's subnet {subnet}",
                    m.local_ip
                ))
            } else if !ips.insert(m.local_ip) {
                Some(format!("local IP {} is mapped twice", m.local_ip))
            } else if !addrs.insert(m.pilot_addr) {
                Some(format!("{} is mapped twice", m.pilot_addr))
            } else {
                None
            };
            if let Some(why) = why {
                bad.push(Invalid {
                    entry: Entry::Mapping {
                        index,
                        local_ip: m.local_ip,
                    },
                    generation: m.generation,
                    why,
                });
            }
        }
        bad
    }

    /// Records that `generation` failed, keeping the list bounded.
    pub fn record_failure(&mut self, generation: u64, error: Error) {
        self.failures.push(ApplyFailure { generation, error });
        let excess = self.failures.len().saturating_sub(MAX_RESULTS);
        self.failures.drain(..excess);
    }

    pub fn failure(&self, generation: u64) -> Option<&Error> {
        self.failures
            .iter()
            .find(|o| o.generation == generation)
            .map(|o| &o.error)
    }

    pub fn to_json(&self) -> Value {
        let mappings = self
            .mappings
            .iter()
            .map(|m| {
                Value::obj([
                    ("local_ip", m.local_ip.to_string().into()),
                    ("pilot_addr", m.pilot_addr.to_string().into()),
                    ("hostname", m.hostname.clone().into()),
                    ("alias_added", m.alias_added.into()),
                    ("generation", m.generation.into()),
                ])
            })
            .collect();
        let failures = self
            .failures
            .iter()
            .map(|o| {
                Value::obj([
                    ("generation", o.generation.into()),
                    ("code", o.error.code.as_str().into()),
                    ("message", o.error.message.clone().into()),
                    ("hint", o.error.hint.clone().into()),
                ])
            })
            .collect();
        Value::obj([
            ("version", VERSION.into()),
            ("pid", self.gateway.pid.into()),
            ("start_time", self.gateway.start_time.into()),
            ("started_at", self.started_at.into()),
            ("socket", self.socket.display().to_string().into()),
            ("subnet", self.subnet.to_string().into()),
            (
                "ports",
                Value::Arr(self.ports.iter().map(|&p| p.into()).collect()),
            ),
            ("max_conns", self.max_conns.into()),
            (
                "half_closed_timeout_secs",
                self.half_closed_timeout.map(|d| d.as_secs_f64()).into(),
            ),
            ("user", self.user.clone().into()),
            ("daemon_uid", self.daemon_uid.map(u64::from).into()),
            ("generation", self.generation.into()),
            ("applied", self.applied.into()),
            ("mappings", Value::Arr(mappings)),
            (
                "exposures",
                Value::Arr(self.exposures.iter().map(Exposed::to_json).collect()),
            ),
            ("failures", Value::Arr(failures)),
        ])
    }

    /// Reads a state file's JSON; the error says which field is wrong.
    pub fn from_json(v: &Value) -> std::result::Result<State, String> {
        let version = num(v, "version")?;
        if !READABLE.contains(&version) {
            return Err(format!(
                "format version {version}, but this pilot-gateway reads versions 1 and {VERSION}"
            ));
        }
        // Version 1 had no exposures.
        let exposures = match v.get("exposures") {
            None if version == 1 => Vec::new(),
            _ => arr(v, "exposures")?
                .iter()
                .map(Exposed::from_json)
                .collect::<std::result::Result<_, _>>()?,
        };
        let mut mappings = Vec::new();
        for m in arr(v, "mappings")? {
            mappings.push(Mapping {
                local_ip: text(m, "local_ip")?
                    .parse()
                    .map_err(|_| "a mapping has a bad \"local_ip\"".to_string())?,
                pilot_addr: text(m, "pilot_addr")?.parse().map_err(|e| format!("{e}"))?,
                hostname: m.get("hostname").and_then(Value::as_str).map(str::to_string),
                alias_added: m
                    .get("alias_added")
                    .and_then(Value::as_bool)
                    .ok_or("a mapping lacks \"alias_added\"")?,
                generation: num(m, "generation")?,
            });
        }
        let mut failures = Vec::new();
        for f in arr(v, "failures")? {
            let mut error = Error::new(Code::from_name(text(f, "code")?), text(f, "message")?);
            error.hint = f.get("hint").and_then(Value::as_str).map(str::to_string);
            failures.push(ApplyFailure {
                generation: num(f, "generation")?,
                error,
            });
        }
        let ports = arr(v, "ports")?
            .iter()
            .map(|p| p.as_u64().and_then(|p| u16::try_from(p).ok()).filter(|&p| p > 0))
            .collect::<Option<Vec<u16>>>()
            .ok_or("\"ports\" holds a value that is not a port")?;
        Ok(State {
            gateway: ProcId {
                pid: u32::try_from(num(v, "pid")?).map_err(|_| "\"pid\" is out of range")?,
                start_time: num(v, "start_time")?,
            },
            started_at: num(v, "started_at")?,
            socket: PathBuf::from(text(v, "socket")?),
            subnet: text(v, "subnet")?
                .parse()
                .map_err(|_| "\"subnet\" is not a CIDR block".to_string())?,
            ports,
            max_conns: num(v, "max_conns")? as usize,
            half_closed_timeout: match v.get("half_closed_timeout_secs") {
                None | Some(Value::Null) => None,
                Some(t) => Some(
                    t.as_f64()
                        .filter(|s| s.is_finite() && *s > 0.0)
                        .map(Duration::from_secs_f64)
                        .ok_or("\"half_closed_timeout_secs\" is not a positive number")?,
                ),
            },
            user: v.get("user").and_then(Value::as_str).map(str::to_string),
            daemon_uid: daemon_uid(v)?,
            generation: num(v, "generation")?,
            applied: num(v, "applied")?,
            mappings,
            exposures,
            failures,
        })
    }
}

/// `daemon_uid`: absent (or null) in state written before it existed.
fn daemon_uid(v: &Value) -> std::result::Result<Option<u32>, String> {
    match v.get("daemon_uid") {
        None | Some(Value::Null) => Ok(None),
        Some(u) => u
            .as_u64()
            .and_then(|u| u32::try_from(u).ok())
            .map(Some)
            .ok_or_else(|| "\"daemon_uid\" is not a uid".to_string()),
    }
}

fn num(v: &Value, key: &str) -> std::result::Result<u64, String> {
    v.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("\"{key}\" is missing or not a whole number"))
}

fn text<'a>(v: &'a Value, key: &str) -> std::result::Result<&'a str, String> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("\"{key}\" is missing or not a string"))
}

fn arr<'a>(v: &'a Value, key: &str) -> std::result::Result<&'a [Value], String> {
    v.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("\"{key}\" is missing or not a list"))
}

/// Where the state directory is: the flag, `$PILOT_GATEWAY_STATE_DIR`,
/// `/run/pilot-gateway` when we may write `/run` (root), else
/// `$XDG_RUNTIME_DIR/pilot-gateway`, else a per-user directory in /tmp.
pub fn resolve_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("PILOT_GATEWAY_STATE_DIR").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let run = Path::new("/run");
    if run.is_dir() && sys::fs::can_write(run) {
        return run.join("pilot-gateway");
    }
    if let Some(p) = std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("pilot-gateway");
    }
    PathBuf::from(format!("/tmp/pilot-gateway-{}", sys::user::euid()))
}

/// Largest stats file we read.
const MAX_STATS: u64 = 1 << 20;
/// How much of gateway.log's end is read to explain a failed start.
const LOG_TAIL: u64 = 64 << 10;

/// An opened, checked state directory.
///
/// Everything in it is reached through the directory's descriptor
/// (openat and friends, never a path), with O_NOFOLLOW, and every file is
/// fstat-checked (regular, owned by the directory's owner, one link,
/// bounded size) before a byte of it is used. The directory belongs to the
/// gateway's user, who may plant anything in it; these checks are what
/// lets a root-run command look inside without acting as root on a name
/// that user controls (see SECURITY.md, "Trust boundaries").
#[derive(Debug)]
pub struct StateDir {
    pub path: PathBuf,
    dir: File,
    /// Owner of the directory; files we create are given to this user, so
    /// root and the gateway's own user can both work in it.
    owner: (u32, u32),
}

impl StateDir {
    /// Opens the directory, creating it (0700) if `create`. Refuses a
    /// symlink, a non-directory, loose permissions, or — unless we are
    /// root — a directory owned by someone else. Several `start`s racing
    /// to create it all succeed: EEXIST just means someone else made it,
    /// and the same checks then decide whether it is acceptable.
    pub fn open(path: &Path, create: bool) -> Result<StateDir> {
        let hint = "use a private directory: --state-dir DIR (mode 0700, owned by you)";
        let mut created = false;
        if create {
            match sys::fs::mkdir(path, 0o700) {
                Ok(()) => created = true,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(
                        Error::io(format!("cannot create state directory {}", path.display()), &e)
                            .hint("pass --state-dir DIR for a directory you may create"),
                    )
                }
            }
        }
        let dir = sys::fs::open_dir(path).map_err(|e| open_error(path, &e))?;
        if created {
            // The umask may have removed bits we want; set exactly 0700.
            dir.set_permissions(fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(path.display(), &e))?;
        }
        let meta = dir.metadata().map_err(|e| Error::io(path.display(), &e))?;
        let me = sys::user::euid();
        if meta.uid() != me && me != 0 {
            return Err(Error::new(
                Code::PermissionDenied,
                format!(
                    "state directory {} is owned by uid {}, not by you (uid {me}); refusing to use it",
                    path.display(),
                    meta.uid()
                ),
            )
            .hint(hint));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(Error::new(
                Code::PermissionDenied,
                format!(
                    "state directory {} has loose permissions {:o}; it must be accessible to its owner only",
                    path.display(),
                    meta.mode() & 0o777
                ),
            )
            .hint(format!("chmod 700 {}", path.display())));
        }
        Ok(StateDir {
            path: path.to_path_buf(),
            dir,
            owner: (meta.uid(), meta.gid()),
        })
    }

    /// The directory's identity (device, inode), from the descriptor we
    /// hold: what names this directory's aliases (`alias::label_for`),
    /// whatever path reached it.
    pub fn identity(&self) -> Result<(u64, u64)> {
        let meta = self
            .dir
            .metadata()
            .map_err(|e| Error::io(self.path.display(), &e))?;
        Ok((meta.dev(), meta.ino()))
    }

    /// The directory's owner (uid, gid): the gateway's user.
    pub fn owner(&self) -> (u32, u32) {
        self.owner
    }

    pub fn state_file(&self) -> PathBuf {
        self.path.join("state.json")
    }

    pub fn stats_file(&self) -> PathBuf {
        self.path.join("stats.json")
    }

    pub fn log_file(&self) -> PathBuf {
        self.path.join("gateway.log")
    }

    /// Gives the directory to `uid:gid` (root only), so a gateway that
    /// switches to the daemon's user can keep using it. Only ever called
    /// on a directory owned by root or already by that user. The files go
    /// first, while the directory is still root's 0700 and nobody else can
    /// swap its entries between our check and the chown: only regular
    /// files with one link are given away (never through a link). Then
    /// the directory.
    pub fn chown(&mut self, uid: u32, gid: u32) -> Result<()> {
        if self.owner.0 != 0 && self.owner.0 != uid {
            return Err(Error::internal(format!(
                "refusing to give {} (owned by uid {}) to uid {uid}",
                self.path.display(),
                self.owner.0
            )));
        }
        if self.owner.0 == 0 {
            for f in ["lock", "state.json", "stats.json", "gateway.log"] {
                if sys::fs::stat_at(&self.dir, f).is_ok_and(|s| s.regular && s.nlink == 1) {
                    let _ = sys::fs::chown_at(&self.dir, f, uid, gid);
                }
            }
        }
        std::os::unix::fs::fchown(&self.dir, Some(uid), Some(gid))
            .map_err(|e| Error::io(format!("cannot give {} to uid {uid}", self.path.display()), &e))?;
        self.owner = (uid, gid);
        Ok(())
    }

    fn name_error(&self, name: &str, what: &str) -> Error {
        Error::new(
            Code::PermissionDenied,
            format!("{} {what}; refusing to use it", self.path.join(name).display()),
        )
        .hint(format!(
            "only the gateway writes its state directory; stop any gateway, then remove {}",
            self.path.join(name).display()
        ))
    }

    /// Opens `name` in the directory (never through a symlink) and checks
    /// what was opened: a regular file, owned by the directory's owner,
    /// with one link, at most `limit` bytes. O_NONBLOCK so a FIFO planted
    /// under the name never blocks the open. Every check runs before a
    /// file we created is given to the owner, and only a file known to be
    /// new (created with O_EXCL) is ever given: a hard link planted under
    /// the name must not get its target chowned.
    fn open_checked(&self, name: &str, flags: i32, mode: u32, limit: u64) -> Result<Option<File>> {
        let Some((file, created)) = self.open_or_create(name, flags | libc::O_NONBLOCK, mode)? else {
            return Ok(None);
        };
        let meta = file
            .metadata()
            .map_err(|e| Error::io(self.path.join(name).display(), &e))?;
        if !meta.is_file() {
            return Err(self.name_error(name, "is not a regular file"));
        }
        // 0 links is fine: a writer renamed a new file over this one after
        // we opened it, and we read the old, complete snapshot. More than
        // one would be a hard link to a file elsewhere.
        if meta.nlink() > 1 {
            return Err(self.name_error(name, "has more than one link"));
        }
        if meta.len() > limit {
            return Err(self.name_error(name, &format!("is larger than {limit} bytes")));
        }
        if meta.uid() != self.owner.0 {
            if !created {
                return Err(self.name_error(
                    name,
                    &format!("is owned by uid {}, not by the directory's owner", meta.uid()),
                ));
            }
            self.give(&file); // we just created it (as root)
        }
        Ok(Some(file))
    }

    /// Opens `name`; with O_CREAT, creates it with O_EXCL first and opens
    /// an existing one without O_CREAT, so the caller knows which it got
    /// (`true`: created now). `None` if it does not exist (without
    /// O_CREAT, or removed between the two opens twice over).
    fn open_or_create(&self, name: &str, flags: i32, mode: u32) -> Result<Option<(File, bool)>> {
        let open = |flags| sys::fs::open_at(&self.dir, name, flags, mode);
        let create = flags & libc::O_CREAT != 0;
        for _ in 0..2 {
            let (opened, created) = match create {
                true => match open(flags | libc::O_EXCL) {
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => (open(flags & !libc::O_CREAT), false),
                    other => (other, true),
                },
                false => (open(flags), false),
            };
            match opened {
                Ok(f) => return Ok(Some((f, created))),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create && !created => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                    return Err(self.name_error(name, "is a symbolic link"))
                }
                Err(e) => {
                    return Err(Error::io(
                        format!("cannot open {}", self.path.join(name).display()),
                        &e,
                    ))
                }
            }
        }
        Ok(None)
    }

    /// Reads `name` whole, but never more than `limit + 1` bytes: a
    /// result longer than `limit` means the file is too large (the caller
    /// says so in its own terms). `None` if it does not exist.
    fn read_file(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let Some(file) = self.open_checked(name, libc::O_RDONLY, 0, u64::MAX)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        file.take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(format!("cannot read {}", self.path.join(name).display()), &e))?;
        Ok(Some(bytes))
    }

    fn give(&self, file: &File) {
        if sys::user::euid() == 0 && self.owner.0 != 0 {
            let _ = std::os::unix::fs::fchown(file, Some(self.owner.0), Some(self.owner.1));
        }
    }

    /// Takes the lock; every read-modify-write happens while it is held.
    pub fn lock(&self) -> Result<FileLock> {
        let file = self
            .open_checked("lock", libc::O_RDWR | libc::O_CREAT, 0o600, 0)?
            .ok_or_else(|| Error::internal(format!("{}/lock vanished", self.path.display())))?;
        FileLock::acquire(file)
            .map_err(|e| Error::io(format!("cannot lock {}/lock", self.path.display()), &e))
    }

    /// Reads the state file; `None` if there is none. A corrupt file is an
    /// error that names it and says what to do; the file is left exactly as
    /// it is (no copy is written: a root command copying files inside a
    /// directory is one planted symlink away from writing elsewhere), so no
    /// mapping is ever dropped silently.
    pub fn read(&self) -> Result<Option<State>> {
        let path = self.state_file();
        let Some(bytes) = self.read_file("state.json", MAX_FILE)? else {
            return Ok(None);
        };
        let too_large = bytes.len() as u64 > MAX_FILE;
        let problem = match String::from_utf8(bytes) {
            _ if too_large => format!("is larger than {} MiB", MAX_FILE >> 20),
            Err(_) => "is not UTF-8 text".to_string(),
            Ok(text) if text.is_empty() => "is empty".to_string(),
            Ok(text) => match json::parse(&text) {
                Err(e) => format!("is not valid JSON ({e})"),
                Ok(v) => match State::from_json(&v) {
                    Ok(s) => return Ok(Some(s)),
                    Err(why) => format!("is not a pilot-gateway state file: {why}"),
                },
            },
        };
        Err(Error::internal(format!(
            "state file {} {problem}; it is left as it is",
            path.display()
        ))
        .hint(format!(
            "if a gateway still runs, stop it with `kill <pid>` and remove its aliases by hand; then move {} aside (it lists the mappings) and start again",
            path.display()
        )))
    }

    /// Writes the state file atomically: temporary file, fsync, rename.
    pub fn write(&self, state: &State) -> Result<()> {
        let text = format!("{}\n", state.to_json());
        if text.len() as u64 > MAX_FILE {
            return Err(Error::new(
                Code::SubnetExhausted,
                format!(
                    "the state file would exceed {} MiB with {} mappings",
                    MAX_FILE >> 20,
                    state.mappings.len()
                ),
            )
            .hint("unmap addresses you no longer need, or run a second gateway with its own --state-dir"));
        }
        self.write_atomic("state.json", &text)
    }

    /// Writes `name` atomically: a fresh temporary name created with
    /// O_EXCL (never an existing file or link), written, fsynced, renamed
    /// into place within the directory, and the directory fsynced.
    pub fn write_atomic(&self, name: &str, text: &str) -> Result<()> {
        self.replace_file(name, |f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
            .map_err(|e| Error::io(format!("cannot write {}", self.path.join(name).display()), &e))?;
        // Make the rename itself durable.
        let _ = self.dir.sync_all();
        Ok(())
    }

    /// Creates a fresh, empty gateway.log for a background gateway's
    /// stderr: a new file under a temporary name (O_EXCL, never an existing
    /// file or link), renamed over whatever has the name — a rename replaces
    /// a planted link itself, so nothing is truncated or created through it,
    /// and parallel starts never trip over each other's file.
    pub fn create_log(&self) -> Result<File> {
        self.replace_file("gateway.log", |_| Ok(()))
            .map_err(|e| Error::io(format!("cannot create {}", self.log_file().display()), &e))
    }

    /// Puts a new file at `name`: created under a fresh temporary name with
    /// O_EXCL (never an existing file or link), given to the gateway's
    /// user, filled by `fill`, then renamed over whatever has the name. A
    /// failure removes the temporary file.
    fn replace_file(
        &self,
        name: &str,
        fill: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> std::io::Result<File> {
        let tmp = format!(".{name}.{}.tmp", std::process::id());
        let _ = sys::fs::unlink_at(&self.dir, &tmp);
        let mut f = sys::fs::open_at(
            &self.dir,
            &tmp,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )?;
        self.give(&f);
        if let Err(e) = fill(&mut f).and_then(|_| sys::fs::rename_at(&self.dir, &tmp, name)) {
            let _ = sys::fs::unlink_at(&self.dir, &tmp);
            return Err(e);
        }
        Ok(f)
    }

    /// The last lines of gateway.log (checked like every file here), to
    /// explain a background gateway that died before it was ready.
    pub fn log_tail(&self) -> String {
        let Ok(Some(mut f)) = self.open_checked("gateway.log", libc::O_RDONLY, 0, u64::MAX) else {
            return String::new();
        };
        let len = f.metadata().map_or(0, |m| m.len());
        let _ = std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(len.saturating_sub(LOG_TAIL)));
        let mut bytes = Vec::new();
        let _ = f.take(LOG_TAIL).read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn remove(&self, name: &str) {
        let _ = sys::fs::unlink_at(&self.dir, name);
    }

    /// Reads stats.json: `None` if there is none yet; an error that names
    /// the file if it does not hold what the gateway writes.
    pub fn read_stats(&self) -> Result<Option<Stats>> {
        let path = self.stats_file();
        let Some(bytes) = self.read_file("stats.json", MAX_STATS)? else {
            return Ok(None);
        };
        if bytes.len() as u64 > MAX_STATS {
            return Err(self.name_error("stats.json", &format!("is larger than {} MiB", MAX_STATS >> 20)));
        }
        json::parse_bytes(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|v| Stats::from_json(&v))
            .map(Some)
            .map_err(|why| Error::internal(format!("counters file {} is unreadable: {why}", path.display())))
    }

    /// Writes stats.json atomically.
    pub fn write_stats(&self, stats: &Stats) -> Result<()> {
        self.write_atomic("stats.json", &format!("{}\n", stats.to_json()))
    }

    /// Reads a small JSON note the gateway and the commands pass each other
    /// (`drain`, `stopped.json`, `applied.json`): `None` if it is missing,
    /// too large, or not JSON. Opened like every file here (no symlinks).
    pub fn read_note(&self, name: &str) -> Option<Value> {
        const MAX_NOTE: u64 = 4096;
        let bytes = self.read_file(name, MAX_NOTE).ok()??;
        if bytes.len() as u64 > MAX_NOTE {
            return None;
        }
        json::parse_bytes(&bytes).ok()
    }
}

/// Explains why the state directory could not be opened.
fn open_error(path: &Path, e: &std::io::Error) -> Error {
    let hint = "use a private directory: --state-dir DIR (mode 0700, owned by you)";
    // O_NOFOLLOW|O_DIRECTORY on a symlink gives ELOOP or ENOTDIR
    // depending on the kernel; lstat tells which it was, for the message.
    let is_link = || fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    match e.raw_os_error() {
        Some(libc::ELOOP | libc::ENOTDIR) if is_link() => Error::new(
            Code::PermissionDenied,
            format!(
                "state directory {} is a symbolic link; refusing to follow it",
                path.display()
            ),
        )
        .hint(hint),
        Some(libc::ENOENT) => Error::new(
            Code::NotRunning,
            format!("no gateway state at {}", path.display()),
        )
        .hint("start one with: pilot-gateway start"),
        Some(libc::EACCES) => match fs::symlink_metadata(path) {
            Ok(m) if m.uid() != sys::user::euid() => Error::new(
                Code::PermissionDenied,
                format!(
                    "state directory {} is owned by uid {}, not by you (uid {}); refusing to use it",
                    path.display(),
                    m.uid(),
                    sys::user::euid()
                ),
            )
            .hint(hint),
            _ => Error::io(format!("state directory {}", path.display()), e),
        },
        Some(libc::ENOTDIR) => {
            Error::invalid(format!("state directory {} is not a directory", path.display())).hint(hint)
        }
        _ => Error::io(format!("state directory {}", path.display()), e),
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            gateway: ProcId {
                pid: 42,
                start_time: 7,
            },
            started_at: 1,
            socket: "/tmp/pilot.sock".into(),
            subnet: "10.4.0.0/16".parse().unwrap(),
            ports: vec![80, 443],
            max_conns: 1000,
            half_closed_timeout: Some(Duration::from_millis(2500)),
            user: None,
            daemon_uid: Some(65534),
            generation: 3,
            applied: 2,
            mappings: vec![Mapping {
                local_ip: Ipv4Addr::new(10, 4, 0, 1),
                pilot_addr: PilotAddr::new(0, 4),
                hostname: Some("lab-b".into()),
                alias_added: true,
                generation: 1,
            }],
            exposures: vec![Exposed {
                port: 2222,
                target: "127.0.0.1:22".parse().unwrap(),
                allow: Some(vec![
                    (PilotAddr::new(0, 7), Some("lab-a".into())),
                    (PilotAddr::new(0, 8), None),
                ]),
                allow_remote_target: false,
                generation: 2,
            }],
            failures: vec![ApplyFailure {
                generation: 3,
                error: Error::new(Code::AddressInUse, "port busy").hint("free it"),
            }],
        }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("pgw-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(
            State::from_json(&json::parse(&s.to_json().to_string()).unwrap()).unwrap(),
            s
        );
    }

    #[test]
    fn version_1_files_are_read_without_exposures() {
        let mut v1 = sample();
        v1.exposures.clear();
        let text = v1
            .to_json()
            .to_string()
            .replace("\"version\":2", "\"version\":1")
            .replace(",\"exposures\":[]", "");
        assert!(
            !text.contains("exposures") && text.contains("\"version\":1"),
            "{text}"
        );
        assert_eq!(State::from_json(&json::parse(&text).unwrap()).unwrap(), v1);
    }

    #[test]
    fn validate_checks_exposures() {
        let mut s = sample();
        let good = s.exposures[0].clone();
        let with = |port: u16, target: &str, remote: bool| Exposed {
            port,
            target: target.parse().unwrap(),
            allow_remote_target: remote,
            generation: 9,
            ..good.clone()
        };
        s.exposures = vec![
            good.clone(),
            with(0, "127.0.0.1:80", false),
            with(2222, "127.0.0.1:80", false),
            with(81, "192.0.2.1:80", false),
            with(82, "192.0.2.1:80", true),
            with(83, "127.0.0.1:0", false),
            // The gateway's own mapped IPs: never, not even when remote.
            with(84, "10.4.0.1:9090", true),
            with(85, "[::ffff:10.4.0.1]:9090", true),
            with(86, "[::ffff:0.0.0.0]:80", true),
            with(87, "[::ffff:127.0.0.1]:80", false),
        ];
        let bad: Vec<(Entry, String)> = s
            .validate(s.subnet)
            .into_iter()
            .map(|b| (b.entry, b.why))
            .collect();
        let ports: Vec<u16> = bad
            .iter()
            .map(|(e, _)| match e {
                Entry::Exposure { port, .. } => *port,
                Entry::Mapping { .. } => panic!("mapping flagged: {bad:?}"),
            })
            .collect();
        assert_eq!(ports, vec![0, 2222, 81, 83, 84, 85, 86], "{bad:?}");
        assert!(bad[1].1.contains("exposed twice"), "{bad:?}");
        assert!(bad[2].1.contains("not on this host"), "{bad:?}");
        assert!(bad[4].1.contains("inside the gateway's subnet"), "{bad:?}");
        assert!(bad[5].1.contains("inside the gateway's subnet"), "{bad:?}");
    }

    #[test]
    fn directory_checks_and_atomic_files() {
        let p = tempdir("dir");
        let d = StateDir::open(&p, true).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o700);
        assert!(d.read().unwrap().is_none());
        d.write(&sample()).unwrap();
        assert_eq!(fs::metadata(d.state_file()).unwrap().mode() & 0o777, 0o600);
        assert_eq!(d.read().unwrap(), Some(sample()));
        {
            let _l = d.lock().unwrap();
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(StateDir::open(&p, false)
            .unwrap_err()
            .message
            .contains("loose permissions"));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).unwrap();
        let link = tempdir("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(StateDir::open(&link, true)
            .unwrap_err()
            .message
            .contains("symbolic link"));
        fs::remove_file(&link).unwrap();
        fs::remove_dir_all(&p).unwrap();
    }

    #[test]
    fn corrupt_files_are_named_and_left_alone() {
        let p = tempdir("bad");
        let d = StateDir::open(&p, true).unwrap();
        for (content, want) in [
            ("", "is empty"),
            ("{", "not valid JSON"),
            ("{\"version\":3}", "format version 3"),
            ("{\"version\":1}", "\"mappings\" is missing"),
        ] {
            fs::write(d.state_file(), content).unwrap();
            let e = d.read().unwrap_err();
            assert!(e.message.contains(want), "{content:?}: {}", e.message);
            assert!(e.message.contains("left as it is"), "{}", e.message);
            assert!(e.message.contains("state.json"));
            assert!(e.hint.as_deref().unwrap_or("").contains("move"), "{e:?}");
            assert_eq!(fs::read_to_string(d.state_file()).unwrap(), content);
        }
        let names: Vec<String> = fs::read_dir(&p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.contains("bad")), "no copies: {names:?}");
        fs::remove_dir_all(&p).unwrap();
    }

    #[test]
    fn chown_gives_away_only_plain_files_then_the_directory() {
        if crate::sys::user::euid() != 0 {
            return; // needs root to give files away
        }
        let owner = |p: &Path| fs::symlink_metadata(p).unwrap().uid();
        let p = tempdir("chown");
        let mut d = StateDir::open(&p, true).unwrap();
        d.write(&sample()).unwrap();
        let outside = tempdir("chown-outside");
        fs::write(&outside, "root's").unwrap();
        fs::hard_link(&outside, p.join("gateway.log")).unwrap();
        std::os::unix::fs::symlink(&outside, p.join("stats.json")).unwrap();
        d.chown(12345, 12345).unwrap();
        assert_eq!(owner(&p), 12345);
        assert_eq!(owner(&d.state_file()), 12345);
        assert_eq!(owner(&outside), 0, "never through a hard or symbolic link");
        assert_eq!(owner(&p.join("stats.json")), 0, "the link itself stays root's");
        // Given away, it is never taken from its owner for another user.
        assert!(d.chown(23456, 23456).is_err());
        fs::remove_dir_all(&p).unwrap();
        fs::remove_file(&outside).unwrap();
    }

    #[test]
    fn a_hard_link_planted_as_the_lock_is_refused_and_its_target_never_given() {
        if crate::sys::user::euid() != 0 {
            return; // needs root: only root gives files away
        }
        let owner = |p: &Path| fs::symlink_metadata(p).unwrap().uid();
        let p = tempdir("lock-link");
        let mut d = StateDir::open(&p, true).unwrap();
        d.chown(12345, 12345).unwrap();
        let outside = tempdir("lock-link-outside");
        fs::write(&outside, "root's").unwrap();
        fs::hard_link(&outside, p.join("lock")).unwrap();
        let e = d.lock().err().expect("a planted hard link is refused");
        assert!(e.to_string().contains("more than one link"), "{e}");
        assert_eq!(owner(&outside), 0, "the link's target keeps its owner");
        // A lock created now is new, so it is given to the directory's owner.
        fs::remove_file(p.join("lock")).unwrap();
        drop(d.lock().unwrap());
        assert_eq!(owner(&p.join("lock")), 12345);
        fs::remove_dir_all(&p).unwrap();
        fs::remove_file(&outside).unwrap();
    }
}
