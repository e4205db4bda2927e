//! The settings every command shares, merged: flags over `-config FILE`
//! over defaults, and the daemon socket found as upstream tools find it.

use std::path::{Path, PathBuf};

use crate::cli::Args;
use crate::error::{Code, Error, Result};
use crate::json::{self, Value};
use crate::log::{Format, Level};
use crate::{state, subnet};

/// Settings merged from flags, `-config FILE` and defaults. Values each
/// command checks itself (subnet, ports) stay text here.
pub struct Settings {
    pub socket: PathBuf,
    /// Where the socket path came from (for error messages).
    pub socket_source: String,
    pub subnet: String,
    pub ports: String,
    pub state_dir: PathBuf,
    pub log_level: Level,
    pub log_format: Format,
}

impl Settings {
    pub fn from_args(args: &Args) -> Result<Settings> {
        let file = match &args.config {
            Some(path) => read_config(path)?,
            None => FileConfig::default(),
        };
        let (log_level, log_format) = log_settings(args, &file)?;
        let config_source = args
            .config
            .as_ref()
            .map(|p| format!("from \"socket\" in -config {}", p.display()));
        let flag = match (&args.socket, &file.socket, &config_source) {
            (Some(p), _, _) => Some((p.clone(), "from --socket".to_string())),
            (None, Some(p), Some(src)) => Some((PathBuf::from(p), src.clone())),
            _ => None,
        };
        let (socket, socket_source) = resolve_socket(flag.as_ref().map(|(p, s)| (p.as_path(), s.as_str())))?;
        Ok(Settings {
            socket,
            socket_source,
            subnet: args
                .subnet
                .clone()
                .or(file.subnet)
                .unwrap_or_else(|| subnet::DEFAULT_SUBNET.into()),
            ports: args
                .ports
                .clone()
                .or(file.ports)
                .unwrap_or_else(|| subnet::DEFAULT_PORTS.into()),
            state_dir: state::resolve_dir(args.state_dir.as_deref()),
            log_level,
            log_format,
        })
    }
}

fn log_settings(args: &Args, file: &FileConfig) -> Result<(Level, Format)> {
    let level = match args.log_level.as_ref().or(file.log_level.as_ref()) {
        Some(l) => Level::parse(l).ok_or_else(|| {
            Error::invalid(format!("invalid log level {l:?}")).hint("use one of: error, warn, info, debug")
        })?,
        None => Level::Info,
    };
    let format = match args.log_format.as_ref().or(file.log_format.as_ref()) {
        Some(f) => Format::parse(f)
            .ok_or_else(|| Error::invalid(format!("invalid log format {f:?}")).hint("use text or json"))?,
        None => Format::Text,
    };
    Ok((level, format))
}

/// The daemon socket and a phrase saying where it came from, found as
/// upstream tools find it: `--socket` (or `-config`'s `socket`), then
/// `$PILOT_SOCKET`, then `socket` in `$PILOT_HOME/config.json` (default
/// `~/.pilot/config.json`), then `$XDG_RUNTIME_DIR/pilot.sock` on Linux
/// when it exists, then `/tmp/pilot.sock`.
pub fn resolve_socket(flag: Option<(&Path, &str)>) -> Result<(PathBuf, String)> {
    resolve_socket_with(flag, &|k| {
        std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from)
    })
}

/// A `config.json` that cannot be read or parsed is passed over, as
/// upstream tools do; one that belongs to another user is refused (see
/// [`read_bounded`]).
pub fn resolve_socket_with(
    flag: Option<(&Path, &str)>,
    env: &dyn Fn(&str) -> Option<PathBuf>,
) -> Result<(PathBuf, String)> {
    if let Some((p, source)) = flag {
        return Ok((p.to_path_buf(), source.to_string()));
    }
    if let Some(p) = env("PILOT_SOCKET") {
        return Ok((p, "from $PILOT_SOCKET".into()));
    }
    let home = env("PILOT_HOME").or_else(|| env("HOME").map(|h| h.join(".pilot")));
    if let Some(file) = home.map(|h| h.join("config.json")) {
        let text = read_checked(&file)?.ok();
        let socket = text
            .and_then(|t| json::parse(&t).ok())
            .and_then(|v| v.get("socket").and_then(Value::as_str).map(PathBuf::from))
            .filter(|p| !p.as_os_str().is_empty());
        if let Some(p) = socket {
            return Ok((p, format!("from \"socket\" in {}", file.display())));
        }
    }
    if cfg!(target_os = "linux") {
        if let Some(p) = env("XDG_RUNTIME_DIR")
            .map(|d| d.join("pilot.sock"))
            .filter(|p| p.exists())
        {
            return Ok((p, XDG_SOURCE.into()));
        }
    }
    Ok((PathBuf::from("/tmp/pilot.sock"), DEFAULT_SOURCE.into()))
}

const XDG_SOURCE: &str = "from $XDG_RUNTIME_DIR";
const DEFAULT_SOURCE: &str = "the default";

/// Whether a socket was found by the default search (`$XDG_RUNTIME_DIR`,
/// `/tmp/pilot.sock`) rather than named by someone (`--socket`,
/// `$PILOT_SOCKET`, a config file). Only a named socket is trusted to say
/// whose daemon it is when its directory is writable by others.
pub fn is_searched(source: &str) -> bool {
    source == XDG_SOURCE || source == DEFAULT_SOURCE
}

/// Largest config file read (`-config FILE`, `config.json`): a settings
/// file is a few hundred bytes; a bound means `--config /dev/zero` or a
/// huge file fails at once instead of eating memory.
pub const MAX_CONFIG: u64 = 64 << 10;

/// Reads a config file: a regular file (not a FIFO or device, which could
/// block or never end) of at most [`MAX_CONFIG`] bytes, as UTF-8 text,
/// owned by us or root.
///
/// The owner matters because the file names the daemon socket, which
/// decides whom a root start becomes and where every client goes: root
/// with another user's `HOME` (`sudo -E`) would otherwise take that user's
/// `~/.pilot/config.json` for the operator's word.
pub fn read_bounded(path: &Path) -> Result<String> {
    read_checked(path)?
}

/// [`read_bounded`], with the refusal of another user's file apart (the
/// outer error) from every other failure (the inner one): the default
/// search passes over an unreadable `config.json`, never over a foreign one.
fn read_checked(path: &Path) -> Result<Result<String>> {
    use std::io::Read;
    let name = path.display();
    let cannot = |e: &std::io::Error| Error::io(format!("cannot read config file {name}"), e);
    // Component by component, no link another user could place followed
    // (sys::fs::open_secure). O_NONBLOCK: opening a FIFO must not wait
    // for a writer.
    let file = crate::sys::fs::open_secure(path, libc::O_RDONLY | libc::O_NONBLOCK, 0);
    let file = match file {
        Ok(f) => f,
        Err(e) if crate::sys::fs::is_refusal(&e) => {
            return Err(Error::new(
                Code::PermissionDenied,
                format!("config file {name} is not taken for our settings: {e}"),
            )
            .hint("use a config file of your own (or root's) in directories only root or you can write"))
        }
        Err(e) => return Ok(Err(cannot(&e))),
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Ok(Err(cannot(&e))),
    };
    if !meta.is_file() {
        return Ok(Err(Error::invalid(format!(
            "config file {name} is not a regular file"
        ))));
    }
    check_owner(path, &meta)?;
    let mut bytes = Vec::new();
    if let Err(e) = file.take(MAX_CONFIG + 1).read_to_end(&mut bytes) {
        return Ok(Err(cannot(&e)));
    }
    if bytes.len() as u64 > MAX_CONFIG {
        return Ok(Err(Error::invalid(format!(
            "config file {name} is larger than {} KiB",
            MAX_CONFIG >> 10
        ))));
    }
    Ok(String::from_utf8(bytes).map_err(|_| Error::invalid(format!("config file {name} is not UTF-8 text"))))
}

/// Refuses a config file owned by neither us nor root (see [`read_bounded`]).
fn check_owner(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (owner, me) = (crate::sys::user::Uid(meta.uid()), crate::sys::user::euid());
    if owner == me || owner.is_root() {
        return Ok(());
    }
    let who = crate::sys::user::user_by_uid(owner).map_or_else(|| format!("uid {owner}"), |u| u.name);
    Err(Error::new(
        Code::PermissionDenied,
        format!(
            "config file {} belongs to {who}, not to us (uid {me}) or root: it is not taken for our settings",
            path.display()
        ),
    )
    .hint("use a config file of your own (or root's), or name the daemon's socket with --socket PATH; as root, do not keep another user's HOME or PILOT_HOME (sudo without -E)"))
}

/// Settings read from `-config FILE`: a flat JSON object of flag names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileConfig {
    pub socket: Option<String>,
    pub subnet: Option<String>,
    pub ports: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
}

/// Reads `-config FILE`. Keys may use `-` or `_`; every value is a string
/// (`ports` as a comma-separated list). Unknown keys and wrong types are
/// errors naming the file and the key.
pub fn read_config(path: &Path) -> Result<FileConfig> {
    let hint = "the config file is a JSON object such as {\"socket\": \"/tmp/pilot.sock\", \"subnet\": \"10.4.0.0/16\", \"ports\": \"80,443\", \"log-level\": \"info\", \"log-format\": \"text\"}";
    let text = read_bounded(path).map_err(|e| match e.code {
        Code::PermissionDenied => e, // its own hint says what to do
        _ => e.hint(hint),
    })?;
    let v = json::parse(&text).map_err(|e| {
        Error::invalid(format!("config file {} is not valid JSON: {e}", path.display())).hint(hint)
    })?;
    let Value::Obj(pairs) = v else {
        return Err(Error::invalid(format!(
            "config file {} must hold a JSON object, not {}",
            path.display(),
            v.kind()
        ))
        .hint(hint));
    };
    let mut cfg = FileConfig::default();
    for (key, value) in pairs {
        let slot = match key.replace('_', "-").as_str() {
            "socket" => &mut cfg.socket,
            "subnet" => &mut cfg.subnet,
            "ports" => &mut cfg.ports,
            "log-level" => &mut cfg.log_level,
            "log-format" => &mut cfg.log_format,
            _ => {
                return Err(Error::invalid(format!(
                "config file {}: unknown key {key:?} (known: socket, subnet, ports, log-level, log-format)",
                path.display()
            ))
                .hint(hint))
            }
        };
        match value {
            Value::Str(s) => *slot = Some(s),
            other => {
                return Err(Error::invalid(format!(
                    "config file {}: {key:?} must be a string, not {}",
                    path.display(),
                    other.kind()
                ))
                .hint(hint))
            }
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<PathBuf> {
        let m: HashMap<String, PathBuf> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn socket_order() {
        let dir = std::env::temp_dir().join(format!("pgw-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), r#"{"socket":"/from/config.sock"}"#).unwrap();
        std::fs::write(dir.join("pilot.sock"), "").unwrap();
        let d = dir.to_str().unwrap();
        let flag = (Path::new("/flag.sock"), "from --socket");
        let all = env(&[
            ("PILOT_SOCKET", "/env.sock"),
            ("PILOT_HOME", d),
            ("XDG_RUNTIME_DIR", d),
        ]);
        assert_eq!(
            resolve_socket_with(Some(flag), &all).unwrap().0,
            PathBuf::from("/flag.sock")
        );
        let (p, src) = resolve_socket_with(None, &all).unwrap();
        assert_eq!(
            (p.to_str().unwrap(), src.as_str()),
            ("/env.sock", "from $PILOT_SOCKET")
        );
        let no_env = env(&[("PILOT_HOME", d), ("XDG_RUNTIME_DIR", d)]);
        let (p, src) = resolve_socket_with(None, &no_env).unwrap();
        assert_eq!(p, PathBuf::from("/from/config.sock"));
        assert!(src.contains("config.json"), "{src}");
        let xdg = env(&[("HOME", "/nonexistent"), ("XDG_RUNTIME_DIR", d)]);
        assert_eq!(resolve_socket_with(None, &xdg).unwrap().0, dir.join("pilot.sock"));
        let none = env(&[("HOME", "/nonexistent"), ("XDG_RUNTIME_DIR", "/nonexistent")]);
        assert_eq!(
            resolve_socket_with(None, &none).unwrap(),
            (PathBuf::from("/tmp/pilot.sock"), "the default".into())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Item 9: root with another user's HOME (`sudo -E`) must not take that
    /// user's config.json (or a `-config FILE` of theirs) for its own.
    #[test]
    fn a_config_file_of_another_user_is_refused() {
        use std::os::unix::fs::chown;
        if !crate::sys::user::euid().is_root() {
            return; // needs root to give a file away; the suite runs as root
        }
        let dir = std::env::temp_dir().join(format!("pgw-cfgowner-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.json");
        std::fs::write(&file, r#"{"socket":"/home/mallory/fake.sock"}"#).unwrap();
        chown(&file, Some(65534), Some(65534)).unwrap();
        let d = dir.to_str().unwrap();
        let e = resolve_socket_with(None, &env(&[("PILOT_HOME", d)])).unwrap_err();
        assert_eq!(e.code, Code::PermissionDenied);
        assert!(
            e.message.contains("config.json") && e.message.contains("nobody"),
            "{}",
            e.message
        );
        assert!(e.hint.as_deref().unwrap_or("").contains("--socket PATH"), "{e:?}");
        let e = read_config(&file).unwrap_err();
        assert_eq!(e.code, Code::PermissionDenied, "{}", e.message);
        // Naming the socket needs no config file; root's own file is fine.
        assert!(resolve_socket_with(
            Some((Path::new("/s"), "from --socket")),
            &env(&[("PILOT_HOME", d)])
        )
        .is_ok());
        chown(&file, Some(0), Some(0)).unwrap();
        assert!(read_config(&file).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn config_files() {
        let dir = std::env::temp_dir().join(format!("pgw-cfgfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.json");
        std::fs::write(&f, r#"{"socket":"/s","subnet":"10.9.0.0/16","ports":"80,81","log_level":"debug","log-format":"json"}"#)
            .unwrap();
        let c = read_config(&f).unwrap();
        assert_eq!(c.socket.as_deref(), Some("/s"));
        assert_eq!(c.log_level.as_deref(), Some("debug"));
        assert_eq!(c.log_format.as_deref(), Some("json"));
        for (text, want) in [
            (r#"{"sockets":"/s"}"#, "unknown key \"sockets\""),
            (r#"{"ports":[80]}"#, "\"ports\" must be a string, not an array"),
            (r#"{"subnet":1}"#, "\"subnet\" must be a string, not a number"),
            ("[1]", "must hold a JSON object"),
            ("{", "not valid JSON"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = read_config(&f).unwrap_err().message;
            assert!(e.contains(want) && e.contains("c.json"), "{text}: {e}");
        }
        assert!(read_config(&dir.join("missing.json"))
            .unwrap_err()
            .message
            .contains("cannot read config file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
