//! Starting the gateway in the background: `start` re-runs its own
//! command line as a detached child (new session, stderr to
//! `gateway.log`) and waits for one JSON line on a pipe: the start report,
//! or the error. The child runs the gateway and, once ready, points its
//! stdout at /dev/null, since nobody reads the pipe after that line.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::cli::Target;
use crate::error::{Code, Error, Result};
use crate::gateway::{self, Config};
use crate::json::{self, Value};
use crate::output::{error_from_json, error_json, report_json};
use crate::state::StateDir;
use crate::sys;

/// How long a background `start` waits for the gateway to be ready.
const READY_WAIT: Duration = Duration::from_secs(60);
/// Set in the environment of the background gateway that `start` spawns.
const DETACHED_ENV: &str = "PILOT_GATEWAY_DETACHED";

/// The value of [`DETACHED_ENV`] that asks the gateway to create its own
/// gateway.log once it runs as the directory's owner.
const OWN_LOG: &str = "own-log";

/// Whether we are a background gateway whose `start` left gateway.log to
/// us: the directory is another user's, and a root `start` opens no file
/// in it. Setting this by hand only makes a gateway write its log itself.
pub fn creates_own_log() -> bool {
    std::env::var_os(DETACHED_ENV).is_some_and(|v| v == OWN_LOG)
}

/// Whether we are the background gateway that a `start` spawned.
pub fn is_detached() -> bool {
    std::env::var_os(DETACHED_ENV).is_some()
}

/// The background gateway: runs, and reports readiness (or the error) as
/// one JSON line on stdout, which is a pipe to the `start` that spawned it.
pub fn run_detached(cfg: Config, targets: Vec<Target>) -> Result<()> {
    let result = gateway::run(cfg, targets, &mut |report| {
        let line = Value::obj([("status", Value::from("ok")), ("data", report_json(report))]);
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
        // Detach: nobody reads our stdout after this line.
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            let _ = sys::proc::redirect_stdout(&null);
        }
    });
    if let Err(e) = &result {
        // Tell the waiting `start` why; it prints the error in its own form.
        println!("{}", error_json(e));
        crate::error!("{e}");
    }
    result
}

/// Starts the gateway as a detached child and waits for its readiness
/// line; returns the start report's data.
pub fn spawn(cfg: &Config, argv0: &str, raw: &[OsString]) -> Result<Value> {
    // Same checks as the gateway will make, before we touch anything.
    // Unlike the other commands we stay root here: the gateway we spawn
    // must start as root to keep its two capabilities. So in a directory
    // of another user (the gateway's) we open nothing at all: the gateway
    // checks for a live predecessor and creates its own gateway.log once
    // it has become that user. In our own (root's) directory we read the
    // state through the checked descriptor and create gateway.log fresh
    // (see StateDir::create_log, never through a planted name). We signal
    // nothing. Once the gateway is spawned, root's part is over: when the
    // gateway runs as another user, we become that user before reading a
    // byte of what it says (its readiness line, its log), so root never
    // parses what that user's process wrote.
    // A daemon uid only presumed (root without CAP_DAC_OVERRIDE) is
    // checked by the gateway once it runs as that user.
    let (dir, user, _, _) = gateway::prepare_state_dir(cfg)?;
    let ours = dir.as_ref().filter(|d| d.owner().0 == sys::user::euid());
    if let Some(dir) = ours {
        if let Some(st) = dir.read()? {
            if st.gateway.is_alive() {
                return Err(Error::new(
                    Code::AlreadyExists,
                    format!("a gateway is already running (pid {})", st.gateway.pid),
                )
                .hint("stop it first: pilot-gateway stop"));
            }
        }
    }
    let log_path = cfg.state_dir.join("gateway.log");
    let log = match ours {
        Some(dir) => Some(dir.create_log()?),
        None => None,
    };
    let mut child = spawn_child(argv0, raw, log)?;
    if let Some(u) = &user {
        // Before the reader thread: the switch needs a single thread.
        if let Err(e) = crate::privilege::become_owner(u.uid, u.gid) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    }
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::internal("no pipe to the gateway process"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let see_log = format!("see {}", log_path.display());
    let Ok(line) = rx.recv_timeout(READY_WAIT) else {
        // As the gateway's user we may signal it only once it has switched
        // too; one still root after a minute is left to its own bounds.
        if child.kill().is_ok() {
            let _ = child.wait();
        }
        return Err(Error::new(
            Code::Timeout,
            format!("the gateway did not become ready within {READY_WAIT:?}"),
        )
        .hint(see_log));
    };
    readiness(&line, &mut child, ours, &log_path)
}

/// Runs our own executable again, as `argv0 raw…`, detached, its stderr
/// to `log`; without one, to /dev/null and the gateway creates its own
/// (see [`creates_own_log`]).
fn spawn_child(argv0: &str, raw: &[OsString], log: Option<File>) -> Result<Child> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::internal(format!("cannot find our own executable: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.arg0(argv0)
        .args(raw)
        .env(DETACHED_ENV, if log.is_some() { "1" } else { OWN_LOG })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.map_or_else(Stdio::null, Stdio::from));
    sys::proc::new_session_on_spawn(&mut cmd);
    cmd.spawn()
        .map_err(|e| Error::internal(format!("cannot start the gateway process: {e}")))
}

/// Reads the child's one line: its start report, its error, or nothing
/// (it died; the last line of its log says why).
fn readiness(
    line: &str,
    child: &mut Child,
    dir: Option<&StateDir>,
    log_path: &std::path::Path,
) -> Result<Value> {
    match json::parse(line.trim()).ok() {
        Some(v) if v.get("status").and_then(Value::as_str) == Some("ok") => {
            Ok(v.get("data").cloned().unwrap_or(Value::Null))
        }
        Some(v) => {
            let _ = child.wait();
            Err(error_from_json(&v))
        }
        None => {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            // Another user's log is not read as root.
            let tail = dir.map(StateDir::log_tail).unwrap_or_default();
            let last = tail.lines().last().unwrap_or("").to_string();
            Err(Error::internal(format!(
                "the gateway exited before it was ready ({status}): {last}"
            ))
            .hint(format!("see {}", log_path.display())))
        }
    }
}
