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
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;

use crate::address::PilotAddr;
use crate::error::{Code, Error, Result};
use crate::json::{self, Value};
use crate::stats::Stats;
use crate::sys::{self, FileLock, ProcId};

/// Version of the state file format; a file of another version is refused.
pub const VERSION: u64 = 1;
/// Largest state file we read (a full /16 of mappings is ~8 MiB).
const MAX_FILE: u64 = 16 << 20;
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

/// The gateway's answer to a generation it could not apply: why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyFailure {
    pub generation: u64,
    pub error: Error,
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
    /// The user the gateway runs as, when it switched from root.
    pub user: Option<String>,
    pub generation: u64,
    pub applied: u64,
    pub mappings: Vec<Mapping>,
    pub failures: Vec<ApplyFailure>,
}

impl State {
    pub fn used_ips(&self) -> BTreeSet<Ipv4Addr> {
        self.mappings.iter().map(|m| m.local_ip).collect()
    }

    pub fn find_ip(&self, ip: Ipv4Addr) -> Option<&Mapping> {
        self.mappings.iter().find(|m| m.local_ip == ip)
    }

    pub fn find_addr(&self, addr: PilotAddr) -> Option<&Mapping> {
        self.mappings.iter().find(|m| m.pilot_addr == addr)
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
            ("user", self.user.clone().into()),
            ("generation", self.generation.into()),
            ("applied", self.applied.into()),
            ("mappings", Value::Arr(mappings)),
            ("failures", Value::Arr(failures)),
        ])
    }

    /// Reads a state file's JSON; the error says which field is wrong.
    pub fn from_json(v: &Value) -> std::result::Result<State, String> {
        let version = num(v, "version")?;
        if version != VERSION {
            return Err(format!(
                "format version {version}, but this pilot-gateway reads version {VERSION}"
            ));
        }
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
            user: v.get("user").and_then(Value::as_str).map(str::to_string),
            generation: num(v, "generation")?,
            applied: num(v, "applied")?,
            mappings,
            failures,
        })
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
    if run.is_dir() && sys::can_write(run) {
        return run.join("pilot-gateway");
    }
    if let Some(p) = std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("pilot-gateway");
    }
    PathBuf::from(format!("/tmp/pilot-gateway-{}", sys::euid()))
}

/// An opened, checked state directory.
#[derive(Debug)]
pub struct StateDir {
    pub path: PathBuf,
    /// Owner of the directory; files we create are given to this user, so
    /// root and the gateway's own user can both work in it.
    owner: (u32, u32),
}

impl StateDir {
    /// Opens the directory, creating it (0700) if `create`. Refuses a
    /// symlink, a non-directory, loose permissions, or — unless we are
    /// root — a directory owned by someone else.
    pub fn open(path: &Path, create: bool) -> Result<StateDir> {
        let hint = "use a private directory: --state-dir DIR (mode 0700, owned by you)";
        let meta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let mut b = fs::DirBuilder::new();
                std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
                b.create(path).map_err(|e| {
                    Error::io(format!("cannot create state directory {}", path.display()), &e)
                        .hint("pass --state-dir DIR for a directory you may create")
                })?;
                // The umask may have removed bits we want; set exactly 0700.
                fs::set_permissions(path, fs::Permissions::from_mode(0o700))
                    .map_err(|e| Error::io(path.display(), &e))?;
                fs::symlink_metadata(path).map_err(|e| Error::io(path.display(), &e))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::new(
                    Code::NotRunning,
                    format!("no gateway state at {}", path.display()),
                )
                .hint("start one with: pilot-gateway start"))
            }
            Err(e) => return Err(Error::io(format!("state directory {}", path.display()), &e)),
        };
        if meta.file_type().is_symlink() {
            return Err(Error::new(
                Code::PermissionDenied,
                format!(
                    "state directory {} is a symbolic link; refusing to follow it",
                    path.display()
                ),
            )
            .hint(hint));
        }
        if !meta.is_dir() {
            return Err(
                Error::invalid(format!("state directory {} is not a directory", path.display())).hint(hint),
            );
        }
        let me = sys::euid();
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
            owner: (meta.uid(), meta.gid()),
        })
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
    /// switches to the daemon's user can keep using it.
    pub fn chown(&mut self, uid: u32, gid: u32) -> Result<()> {
        std::os::unix::fs::lchown(&self.path, Some(uid), Some(gid))
            .map_err(|e| Error::io(format!("cannot give {} to uid {uid}", self.path.display()), &e))?;
        for f in ["lock", "state.json", "stats.json", "gateway.log"] {
            let _ = std::os::unix::fs::lchown(self.path.join(f), Some(uid), Some(gid));
        }
        self.owner = (uid, gid);
        Ok(())
    }

    /// Opens a file in the directory without following symlinks, creating
    /// it 0600 and owned by the directory's owner.
    pub fn open_file(&self, name: &str, options: &mut OpenOptions) -> Result<File> {
        let path = self.path.join(name);
        let file = options
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), &e))?;
        self.give(&file);
        Ok(file)
    }

    fn give(&self, file: &File) {
        if sys::euid() == 0 && self.owner.0 != 0 {
            let _ = std::os::unix::fs::fchown(file, Some(self.owner.0), Some(self.owner.1));
        }
    }

    /// Takes the lock; every read-modify-write happens while it is held.
    pub fn lock(&self) -> Result<FileLock> {
        let file = self.open_file("lock", OpenOptions::new().read(true).write(true).create(true))?;
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
        let mut file = match self.open_file("state.json", OpenOptions::new().read(true)) {
            Ok(f) => f,
            Err(e) if e.code == Code::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut text = String::new();
        let read = Read::by_ref(&mut file)
            .take(MAX_FILE + 1)
            .read_to_string(&mut text);
        let problem = match read {
            Err(e) => format!("cannot be read as text: {e}"),
            Ok(n) if n as u64 > MAX_FILE => format!("is larger than {} MiB", MAX_FILE >> 20),
            Ok(0) => "is empty".to_string(),
            Ok(_) => match json::parse(&text) {
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
        self.write_atomic("state.json", &format!("{}\n", state.to_json()))
    }

    pub fn write_atomic(&self, name: &str, text: &str) -> Result<()> {
        let tmp_name = format!(".{name}.{}.tmp", std::process::id());
        let tmp = self.path.join(&tmp_name);
        let _ = fs::remove_file(&tmp);
        let mut f = self.open_file(&tmp_name, OpenOptions::new().write(true).create_new(true))?;
        let done = f
            .write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .and_then(|_| fs::rename(&tmp, self.path.join(name)));
        if let Err(e) = done {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(
                format!("cannot write {}", self.path.join(name).display()),
                &e,
            ));
        }
        // Make the rename itself durable.
        if let Ok(d) = File::open(&self.path) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    pub fn remove(&self, name: &str) {
        let _ = fs::remove_file(self.path.join(name));
    }

    /// Reads stats.json: `None` if there is none yet; an error that names
    /// the file if it does not hold what the gateway writes.
    pub fn read_stats(&self) -> Result<Option<Stats>> {
        let path = self.stats_file();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), &e)),
        };
        json::parse(&text)
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
        let file = self.open_file(name, OpenOptions::new().read(true)).ok()?;
        let mut text = String::new();
        file.take(4096).read_to_string(&mut text).ok()?;
        json::parse(&text).ok()
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
            user: None,
            generation: 3,
            applied: 2,
            mappings: vec![Mapping {
                local_ip: Ipv4Addr::new(10, 4, 0, 1),
                pilot_addr: PilotAddr::new(0, 4),
                hostname: Some("lab-b".into()),
                alias_added: true,
                generation: 1,
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
            ("{\"version\":2}", "format version 2"),
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
}
