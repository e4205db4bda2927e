//! The state directory itself (`StateDir`): the code root relies on when
//! it looks inside a directory another user owns. Everything is reached
//! through the directory's descriptor, without following links, and
//! checked with fstat before a byte of it is used.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Code, Error, Result};
use crate::json::{self, Value};
use crate::stats::Stats;
use crate::sys::user::{Gid, Uid};
use crate::sys::{self, fs::FileLock};

use super::{State, MAX_FILE};

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
/// that user controls (see docs/THREAT_MODEL.md, "The state directory").
#[derive(Debug)]
pub struct StateDir {
    pub path: PathBuf,
    dir: File,
    /// Owner of the directory; files we create are given to this user, so
    /// root and the gateway's own user can both work in it.
    owner: (Uid, Gid),
}

impl StateDir {
    /// Opens the directory, creating it (0700) if `create`. Refuses a
    /// symlink, a non-directory, loose permissions, or — unless we are
    /// root — a directory owned by someone else. Several `start`s racing
    /// to create it all succeed: EEXIST just means someone else made it,
    /// and the same checks then decide whether it is acceptable.
    pub fn open(path: &Path, create: bool) -> Result<StateDir> {
        let hint = "use a private directory: --state-dir DIR (mode 0700, owned by you)";
        // Component by component: no directory on the way another user
        // may write or owns, no link they could place (sys::fs::open_secure).
        let (dir, created) = match sys::fs::open_dir_secure(path, create.then_some(0o700)) {
            Ok(x) => x,
            Err(e) if sys::fs::is_refusal(&e) => {
                return Err(Error::new(
                    Code::PermissionDenied,
                    format!("refusing state directory {}: {e}", path.display()),
                )
                .hint(hint))
            }
            Err(e) if create && e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(
                    Error::io(format!("cannot create state directory {}", path.display()), &e)
                        .hint("pass --state-dir DIR for a directory you may create"),
                )
            }
            Err(e) => return Err(open_error(path, &e)),
        };
        if created {
            // The umask may have removed bits we want; set exactly 0700.
            dir.set_permissions(fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(path.display(), &e))?;
        }
        let meta = dir.metadata().map_err(|e| Error::io(path.display(), &e))?;
        let me = sys::user::euid();
        if Uid(meta.uid()) != me && !me.is_root() {
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
            owner: (Uid(meta.uid()), Gid(meta.gid())),
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
    pub fn owner(&self) -> (Uid, Gid) {
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
    pub fn chown(&mut self, uid: Uid, gid: Gid) -> Result<()> {
        if !self.owner.0.is_root() && self.owner.0 != uid {
            return Err(Error::internal(format!(
                "refusing to give {} (owned by uid {}) to uid {uid}",
                self.path.display(),
                self.owner.0
            )));
        }
        if self.owner.0.is_root() {
            for f in ["lock", "state.json", "stats.json", "gateway.log"] {
                if sys::fs::stat_at(&self.dir, f).is_ok_and(|s| s.regular && s.nlink == 1) {
                    let _ = sys::fs::chown_at(&self.dir, f, uid, gid);
                }
            }
        }
        std::os::unix::fs::fchown(&self.dir, Some(uid.0), Some(gid.0))
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
        if Uid(meta.uid()) != self.owner.0 {
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
        if sys::user::euid().is_root() && !self.owner.0.is_root() {
            let _ = std::os::unix::fs::fchown(file, Some(self.owner.0 .0), Some(self.owner.1 .0));
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
                    Err(why) => format!("is not a pilot-gateway state file: {}", why.message),
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
            .and_then(|v| Stats::from_json(&v).map_err(|e| e.message))
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
        self.read_note_max(name, 4096)
    }

    /// [`read_note`](Self::read_note) of a note up to `max` bytes.
    pub fn read_note_max(&self, name: &str, max: u64) -> Option<Value> {
        let bytes = self.read_file(name, max).ok()??;
        if bytes.len() as u64 > max {
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
            Ok(m) if Uid(m.uid()) != sys::user::euid() => Error::new(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::sample;

    fn tempdir(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("pgw-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        p
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
            ("{\"version\":4}", "format version 4"),
            ("{\"version\":2}", "format version 2"),
            ("{\"version\":3}", "\"exposures\" is missing"),
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
        if !crate::sys::user::euid().is_root() {
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
        d.chown(Uid(12345), Gid(12345)).unwrap();
        assert_eq!(owner(&p), 12345);
        assert_eq!(owner(&d.state_file()), 12345);
        assert_eq!(owner(&outside), 0, "never through a hard or symbolic link");
        assert_eq!(owner(&p.join("stats.json")), 0, "the link itself stays root's");
        // Given away, it is never taken from its owner for another user.
        assert!(d.chown(Uid(23456), Gid(23456)).is_err());
        fs::remove_dir_all(&p).unwrap();
        fs::remove_file(&outside).unwrap();
    }

    #[test]
    fn a_hard_link_planted_as_the_lock_is_refused_and_its_target_never_given() {
        if !crate::sys::user::euid().is_root() {
            return; // needs root: only root gives files away
        }
        let owner = |p: &Path| fs::symlink_metadata(p).unwrap().uid();
        let p = tempdir("lock-link");
        let mut d = StateDir::open(&p, true).unwrap();
        d.chown(Uid(12345), Gid(12345)).unwrap();
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
