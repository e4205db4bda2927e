//! Loopback aliases: giving `lo` the mapped IPs so that listeners can bind
//! them and local clients can reach them.
//!
//! We run the platform's own tool (`ip` on Linux, `ifconfig` on macOS and
//! FreeBSD)
//! with an argument vector — never a shell — rather than speaking netlink,
//! so an auditor sees exactly the command an operator would type. The tool
//! is taken from the usual sbin and bin directories, then from absolute
//! `PATH` entries, and only if root owns it and its directories (see
//! `find_program`).
//!
//! An alias that already existed before we looked is used but never
//! removed: it was not ours. On Linux every alias we add carries the label
//! of its state directory ([`label_for`]: `lo:pgw` and a hash of the
//! directory's device and inode), and we delete with that label, which the
//! kernel matches: an address someone else added (no label, or another
//! gateway's) is never removed by us, whatever a state file claims.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use ipnetwork::Ipv4Network;

use crate::error::{Code, Error, Result};
use crate::{subnet, sys, warn};

/// What every gateway's label starts with on Linux (`ip addr show label
/// 'lo:pgw*'`).
pub const LABEL_PREFIX: &str = "lo:pgw";

/// The label of the aliases of the gateway whose state directory has this
/// identity (device, inode): [`LABEL_PREFIX`] and 8 hex digits of an
/// FNV-1a hash, 14 bytes (a label must start with the interface name and
/// `:`, and fit in 15 bytes). Two gateways (two state directories) get
/// different labels, so one's stale cleanup never matches the other's
/// aliases; a 32-bit hash can collide, which the socket check of the
/// cleanup covers. Stable for as long as the directory exists.
pub fn label_for((dev, ino): (u64, u64)) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in dev.to_le_bytes().into_iter().chain(ino.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{LABEL_PREFIX}{:08x}", (h ^ (h >> 32)) as u32)
}

/// Whose an address on `lo` is, by its label (Linux).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Label {
    /// This state directory's label: our gateway added it.
    Ours,
    /// Another gateway's label (another state directory's, or any other
    /// label that starts with [`LABEL_PREFIX`]): another gateway's alias.
    OtherGateway,
    /// No gateway label (an administrator's address, or none).
    Foreign,
}

impl Label {
    /// Classifies the interface name `getifaddrs` reports for an address
    /// (its label), given our own label.
    pub fn of(name: &str, ours: &str) -> Label {
        if name == ours {
            Label::Ours
        } else if name.starts_with(LABEL_PREFIX) {
            Label::OtherGateway
        } else {
            Label::Foreign
        }
    }
}

/// Which command set to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// `ip addr add|del IP/32 dev lo label LABEL`.
    Linux,
    /// `ifconfig lo0 alias|-alias IP`: macOS and FreeBSD (no labels).
    Bsd,
}

impl Platform {
    pub fn current() -> Platform {
        if cfg!(target_os = "linux") {
            Platform::Linux
        } else {
            Platform::Bsd
        }
    }

    /// The program and arguments that add (`add = true`) or remove an
    /// alias with `label` (Linux; the kernel matches it on removal).
    pub fn command(self, ip: Ipv4Addr, add: bool, label: &str) -> (&'static str, Vec<String>) {
        match self {
            Platform::Linux => {
                let verb = if add { "add" } else { "del" };
                (
                    "ip",
                    vec![
                        "addr".into(),
                        verb.into(),
                        format!("{ip}/32"),
                        "dev".into(),
                        "lo".into(),
                        "label".into(),
                        label.into(),
                    ],
                )
            }
            Platform::Bsd => {
                let verb = if add { "alias" } else { "-alias" };
                ("ifconfig", vec!["lo0".into(), verb.into(), ip.to_string()])
            }
        }
    }
}

/// The outcome of one command: success, or an error whose message is the
/// tool's own words (which [`classify`] reads).
pub type RunResult = Result<()>;

/// Runs a program with arguments. Substitutable so that the command lines
/// can be tested without privilege.
pub trait Runner: Send + Sync {
    fn run(&self, program: &str, args: &[String]) -> RunResult;
}

/// Runs the real tool.
pub struct System;

impl Runner for System {
    fn run(&self, program: &str, args: &[String]) -> RunResult {
        let path = find_program(program)?;
        // A cleared environment: the tool runs with our capabilities, and
        // nothing the caller's environment holds (LD_*, IPROUTE2 variables,
        // locale files, a PATH) may steer it. `classify` reads the tool's
        // English messages: LC_ALL=C keeps them English. `/` as the working
        // directory, so it never looks at the caller's.
        let out = tool_command(&path, args)
            .output()
            .map_err(|e| Error::internal(format!("cannot run {}: {e}", path.display())))?;
        if out.status.success() {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stderr = stderr.trim();
            Err(Error::internal(if stderr.is_empty() {
                format!("exited with {}", out.status)
            } else {
                stderr.to_string()
            }))
        }
    }
}

/// The command line of a tool run: see [`System::run`] for the cleared
/// environment.
fn tool_command(path: &Path, args: &[String]) -> Command {
    let mut c = Command::new(path);
    c.args(args)
        .env_clear()
        .env("LC_ALL", "C")
        .env("PATH", TOOL_PATH)
        .current_dir("/")
        .stdin(std::process::Stdio::null());
    c
}

/// Where the tool is looked for first: root's `PATH` under systemd or sudo
/// does not always contain the sbin directories.
const TOOL_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];
/// The `PATH` the tool runs with (the same directories).
pub const TOOL_PATH: &str = "/usr/sbin:/sbin:/usr/bin:/bin";

/// Finds the tool: in [`TOOL_DIRS`], then in the *absolute* entries of
/// `PATH` (an empty or relative entry means some current directory, where
/// another user may have planted one). The tool runs with the gateway's
/// capabilities (or as root), so a candidate is used only if it and every
/// directory on its path, as written and as resolved, belong to root and
/// are writable by no one else ([`check_trusted`]); else the next one.
fn find_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut refused = Vec::new();
    let dirs = TOOL_DIRS
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::split_paths(&path).filter(|d| d.is_absolute()));
    for candidate in dirs.map(|dir| dir.join(name)).filter(|p| p.is_file()) {
        match check_trusted(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(why) => refused.push(why.message),
        }
    }
    Err(Error::internal(if refused.is_empty() {
        format!(
            "cannot run {name}: not found in {} or an absolute directory of PATH",
            TOOL_DIRS.join(", ")
        )
    } else {
        format!("cannot run {name}: refused {}", refused.join("; "))
    }))
}

/// Whether `tool`, every directory above it, and the same for the path it
/// resolves to (through symlinks), are root's and writable by no one else:
/// then nobody but root can change what runs, between this check and the
/// exec or later. We exec `tool` as found (not the resolved path), since a
/// multi-call binary (busybox) dispatches on its name.
fn check_trusted(tool: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let real = std::fs::canonicalize(tool).map_err(|e| Error::io(tool.display(), &e))?;
    for p in tool.ancestors().chain(real.ancestors()) {
        if p.as_os_str().is_empty() {
            continue;
        }
        let meta = std::fs::metadata(p).map_err(|e| Error::io(p.display(), &e))?;
        if meta.uid() != 0 {
            return Err(Error::new(
                Code::PermissionDenied,
                format!(
                    "{} ({} is owned by uid {}, not root)",
                    tool.display(),
                    p.display(),
                    meta.uid()
                ),
            ));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(Error::new(
                Code::PermissionDenied,
                format!(
                    "{} ({} is writable by group or others)",
                    tool.display(),
                    p.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Adds and removes loopback aliases, labelled `label` on Linux.
pub struct Aliases {
    pub platform: Platform,
    pub runner: Box<dyn Runner>,
    pub label: String,
}

impl Aliases {
    /// The real tool, for the gateway whose aliases carry `label`.
    pub fn labelled(label: String) -> Aliases {
        Aliases {
            platform: Platform::current(),
            runner: Box::new(System),
            label,
        }
    }

    /// Adds `ip` to loopback. Returns `true` if we added it, `false` if it
    /// was already configured (then it is not ours to remove). `exists` is
    /// whether the caller saw it on an interface before asking.
    pub fn add(&self, ip: Ipv4Addr, exists: bool) -> Result<bool> {
        if exists {
            return Ok(false);
        }
        let (program, args) = self.platform.command(ip, true, &self.label);
        match self.runner.run(program, &args) {
            Ok(()) => Ok(true),
            // Someone added it between our look and our add: not ours.
            Err(e) if e.message.contains("File exists") || e.message.contains("already assigned") => {
                Ok(false)
            }
            Err(e) => Err(classify(
                &format!("cannot add loopback alias {ip} ({program} {})", args.join(" ")),
                &e.message,
            )),
        }
    }

    /// Removes an alias we added (on Linux: only if it carries our label,
    /// which the kernel checks). A missing alias is not an error (someone
    /// removed it already).
    pub fn remove(&self, ip: Ipv4Addr) -> Result<()> {
        let (program, args) = self.platform.command(ip, false, &self.label);
        match self.runner.run(program, &args) {
            Ok(()) => Ok(()),
            // Older kernels say "Cannot assign", newer "Address not found";
            // also what a del with our label gets for an unlabelled address.
            Err(e)
                if e.message.contains("Cannot assign requested address")
                    || e.message.contains("Address not found")
                    || e.message.contains("Can't assign") =>
            {
                Ok(())
            }
            Err(e) => Err(classify(
                &format!("cannot remove loopback alias {ip} ({program} {})", args.join(" ")),
                &e.message,
            )),
        }
    }
}

fn classify(what: &str, tool_said: &str) -> Error {
    let lower = tool_said.to_lowercase();
    if lower.contains("not permitted") || lower.contains("permission denied") {
        Error::new(Code::PermissionDenied, format!("{what}: {tool_said}")).hint(
            "adding loopback aliases needs root (CAP_NET_ADMIN): run as root, or use a subnet inside 127.0.0.0/8, which needs no alias on Linux",
        )
    } else if lower.contains("cannot run") && lower.contains("refused") {
        Error::new(Code::PermissionDenied, format!("{what}: {tool_said}")).hint(
            "the tool runs with the gateway's privileges, so it and every directory above it must belong to root and be writable by no one else",
        )
    } else if lower.contains("cannot run") {
        Error::new(Code::Internal, format!("{what}: {tool_said}"))
            .hint("install iproute2 (Linux) so that the `ip` command is available (macOS and FreeBSD have `ifconfig`)")
    } else {
        Error::new(Code::Internal, format!("{what}: {tool_said}"))
    }
}

// ---- Forensics: whose is an alias we find on loopback? ----

/// Part of the reason [`check_stale_alias`] gives when a process holds a
/// socket on the address: a refusal that may pass (the gateway retries
/// such leftovers later, `gateway::Gateway::retry_stale_aliases`).
pub const BUSY: &str = "TCP socket(s) are bound to it";

/// Whether a dead gateway's recorded alias may be removed (`Err`: why
/// not, in its message); [`Aliases::remove`] then removes it with this
/// gateway's label. The old state file was writable by
/// the gateway's user, so nothing in it is taken on its word (its subnet
/// least of all): the IP must be assignable in the *new* start's own
/// subnet (which the operator chose), outside 127.0.0.0/8, and sit on a
/// loopback interface as a /32. On Linux it must also carry this state
/// directory's label (`alias::label_for`), which only our own `ip addr add`
/// sets — an administrator's address (no label) or another gateway's
/// (another directory's label) is never removed, and the removal names
/// the label, so the kernel checks it again. And no process may hold a
/// TCP socket on it: a live gateway listens there. macOS and FreeBSD have
/// no labels: there the subnet rule alone applies.
pub fn check_stale_alias(new: Ipv4Network, ip: Ipv4Addr, ours: &str) -> Result<()> {
    let no = |why: String| Error::new(Code::PermissionDenied, why);
    if !subnet::is_assignable(new, ip) || ip.is_loopback() {
        return Err(no(format!("it is not in this start's subnet {new}")));
    }
    let found = sys::net::interface_addresses()
        .map_err(|e| no(format!("the interface addresses cannot be listed ({e})")))?
        .into_iter()
        .find(|a| a.addr == ip && a.loopback && a.prefix == 32)
        .ok_or_else(|| no("it is not a /32 alias on loopback".into()))?;
    if !cfg!(target_os = "linux") {
        return Ok(());
    }
    let label = found.interface;
    match Label::of(&label, ours) {
        // Only this directory's gateway adds this label, and it is dead
        // (we hold its lock): a kernel that cannot be asked which sockets
        // use it does not keep our own leftover.
        Label::Ours => match sys::sock_diag::tcp_sockets_on(ip) {
            Ok(n @ 1..) => Err(no(format!(
                "{n} {BUSY}: another gateway or program is live there"
            ))),
            Ok(0) => Ok(()),
            Err(e) => {
                warn!("cannot ask the kernel which sockets use {ip}: {e}");
                Ok(())
            }
        },
        Label::OtherGateway => Err(no(format!(
            "it carries another gateway's label {label} (another state directory)"
        ))),
        Label::Foreign => Err(no(format!("it does not carry this gateway's label {ours}"))),
    }
}

/// Refuses `ip` if it is on loopback with another gateway's label and that
/// gateway is live: a process holds a TCP socket on it (its listeners), or
/// the kernel cannot tell. Sharing it would mix the two gateways, and the
/// other's `stop` would pull it from under this one. A labelled address
/// nobody uses was left by a gateway that died: it is used as before, not
/// ours (never removed by us), with a warning.
pub fn check_not_another_gateways(ip: Ipv4Addr, ours: &str) -> Result<()> {
    if !cfg!(target_os = "linux") {
        return Ok(());
    }
    let addrs = sys::net::interface_addresses()
        .map_err(|e| Error::internal(format!("cannot list interface addresses: {e}")))?;
    let Some(other) = addrs
        .iter()
        .find(|a| a.addr == ip && a.loopback && Label::of(&a.interface, ours) == Label::OtherGateway)
    else {
        return Ok(());
    };
    let label = &other.interface;
    let why = match sys::sock_diag::tcp_sockets_on(ip) {
        Ok(0) => {
            warn!("using {ip}, labelled {label} by a gateway that no longer runs (no socket on it): it is not this gateway's alias and stays after it stops (remove it with `ip addr del {ip}/32 dev lo label {label}`)");
            return Ok(());
        }
        Ok(n) => format!("{n} TCP socket(s) are open on it"),
        Err(e) => format!("whether it is in use cannot be checked ({e})"),
    };
    Err(Error::new(
        Code::AddressInUse,
        format!(
            "local IP {ip} belongs to another gateway: it is on loopback with that gateway's label {label} (this one's is {ours}), and {why}"
        ),
    )
    .hint("give this gateway a subnet no other gateway uses (--subnet, e.g. 10.5.0.0/16) or another local IP; `ip addr show label 'lo:pgw*'` lists every gateway's aliases"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records every command and answers from a script.
    struct Fake {
        calls: Arc<Mutex<Vec<String>>>,
        answer: fn(&str) -> RunResult,
    }

    impl Runner for Fake {
        fn run(&self, program: &str, args: &[String]) -> RunResult {
            let line = format!("{program} {}", args.join(" "));
            self.calls.lock().unwrap().push(line.clone());
            (self.answer)(&line)
        }
    }

    fn aliases(platform: Platform, answer: fn(&str) -> RunResult) -> (Aliases, Arc<Mutex<Vec<String>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let runner = Box::new(Fake {
            calls: calls.clone(),
            answer,
        });
        let label = "lo:pgw0123abcd".to_string();
        (
            Aliases {
                platform,
                runner,
                label,
            },
            calls,
        )
    }

    const IP: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 1);

    #[test]
    fn linux_commands() {
        let (a, calls) = aliases(Platform::Linux, |_| Ok(()));
        assert!(a.add(IP, false).unwrap());
        a.remove(IP).unwrap();
        assert_eq!(
            *calls.lock().unwrap(),
            [
                "ip addr add 10.4.0.1/32 dev lo label lo:pgw0123abcd",
                "ip addr del 10.4.0.1/32 dev lo label lo:pgw0123abcd"
            ]
        );
    }

    #[test]
    fn labels_per_state_directory() {
        let a = label_for((2049, 131_073));
        assert_eq!(a, label_for((2049, 131_073)), "stable");
        assert_eq!(a.len(), 14, "{a}: at most 15 bytes");
        assert!(a.starts_with("lo:pgw"), "{a}");
        assert!(a[6..].bytes().all(|b| b.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, label_for((2049, 131_074)));
        assert_ne!(a, label_for((2050, 131_073)));
        assert_eq!(Label::of(&a, &a), Label::Ours);
        assert_eq!(
            Label::of("lo:pgw", &a),
            Label::OtherGateway,
            "any gateway label but ours"
        );
        assert_eq!(Label::of(&label_for((1, 2)), &a), Label::OtherGateway);
        assert_eq!(Label::of("lo", &a), Label::Foreign);
        assert_eq!(Label::of("lo:admin", &a), Label::Foreign);
    }

    #[test]
    fn macos_and_freebsd_commands() {
        let (a, calls) = aliases(Platform::Bsd, |_| Ok(()));
        assert!(a.add(IP, false).unwrap());
        a.remove(IP).unwrap();
        assert_eq!(
            *calls.lock().unwrap(),
            ["ifconfig lo0 alias 10.4.0.1", "ifconfig lo0 -alias 10.4.0.1"]
        );
    }

    #[test]
    fn existing_alias_is_not_ours() {
        let (a, calls) = aliases(Platform::Linux, |_| Ok(()));
        assert!(!a.add(IP, true).unwrap());
        assert!(
            calls.lock().unwrap().is_empty(),
            "nothing runs for an alias that exists"
        );
        let (raced, _) = aliases(Platform::Linux, |_| {
            Err(Error::internal("RTNETLINK answers: File exists"))
        });
        assert!(!raced.add(IP, false).unwrap());
    }

    #[test]
    fn errors_are_classified() {
        let (a, _) = aliases(Platform::Linux, |_| {
            Err(Error::internal("RTNETLINK answers: Operation not permitted"))
        });
        let e = a.add(IP, false).unwrap_err();
        assert_eq!(e.code, Code::PermissionDenied);
        assert!(
            e.message
                .contains("ip addr add 10.4.0.1/32 dev lo label lo:pgw0123abcd"),
            "{}",
            e.message
        );
        assert!(e.hint.unwrap().contains("127.0.0.0/8"));
        let (gone, _) = aliases(Platform::Linux, |_| {
            Err(Error::internal(
                "RTNETLINK answers: Cannot assign requested address",
            ))
        });
        assert!(gone.remove(IP).is_ok());
        let (gone, _) = aliases(Platform::Linux, |_| {
            Err(Error::internal("Error: ipv4: Address not found."))
        });
        assert!(gone.remove(IP).is_ok());
        let (missing, _) = aliases(Platform::Linux, |_| {
            Err(Error::internal("cannot run ip: No such file or directory"))
        });
        let (refused, _) = aliases(Platform::Linux, |_| {
            Err(Error::internal(
                "cannot run ip: refused /opt/ip (/opt/ip is owned by uid 12345, not root)",
            ))
        });
        let e = refused.add(IP, false).unwrap_err();
        assert_eq!(e.code, Code::PermissionDenied);
        assert!(e.hint.unwrap().contains("belong to root"));
        assert!(missing
            .add(IP, false)
            .unwrap_err()
            .hint
            .unwrap()
            .contains("iproute2"));
    }

    #[test]
    fn only_root_owned_tools_in_safe_directories_run() {
        use std::os::unix::fs::{chown, PermissionsExt};
        assert!(check_trusted(Path::new("/usr/bin/env")).is_ok());
        let dir = std::env::temp_dir().join(format!("pgw-alias-tool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tool = dir.join("ip");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_trusted(&tool).unwrap_err();
        // As an ordinary user the tool is ours, not root's: refused for that first.
        let root = crate::sys::user::euid().is_root();
        let why = if root {
            "writable by group or others"
        } else {
            "not root"
        };
        assert!(e.message.contains(why), "{e}");
        if root {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            chown(&tool, Some(12345), None).unwrap();
            let e = check_trusted(&tool).unwrap_err();
            assert!(e.message.contains("owned by uid 12345"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
        // The tool sees LC_ALL=C and the fixed PATH, nothing of ours.
        let out = tool_command(&find_program("env").unwrap(), &[]).output().unwrap();
        let mut env: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        env.sort();
        assert_eq!(env, ["LC_ALL=C", &format!("PATH={TOOL_PATH}")]);
        // `env` is found in the fixed directories whatever PATH holds.
        assert!(find_program("env").unwrap().is_absolute());
        assert!(find_program("no-such-tool-pgw")
            .unwrap_err()
            .message
            .contains("not found"));
    }
}
