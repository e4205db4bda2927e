//! The one error type of pilot-gateway.
//!
//! Every failure a user can see is an [`Error`]: a [`Code`] that scripts can
//! match on (the same strings upstream `pilotctl` uses, plus a few precise
//! ones), a message that says what went wrong, and a hint that says what to
//! do about it. The CLI turns it into a text line or a JSON envelope and an
//! exit status; nothing else in the program formats errors for people.

use std::fmt;

/// What kind of failure this is; `as_str` is the code shown to scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// The command line itself is malformed (unknown flag, missing value).
    /// Shown as `invalid_argument`, but exits 2 instead of 1.
    Usage,
    InvalidArgument,
    NotRunning,
    AlreadyExists,
    NotFound,
    ConnectionFailed,
    Timeout,
    TrustRequired,
    NotSupported,
    Internal,
    DaemonUnreachable,
    PermissionDenied,
    SubnetExhausted,
    AddressInUse,
    /// A pilot port is already bound (by another program or the daemon).
    PortInUse,
    /// An exposure's local target is not acceptable.
    BadTarget,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Usage | Code::InvalidArgument => "invalid_argument",
            Code::NotRunning => "not_running",
            Code::AlreadyExists => "already_exists",
            Code::NotFound => "not_found",
            Code::ConnectionFailed => "connection_failed",
            Code::Timeout => "timeout",
            Code::TrustRequired => "trust_required",
            Code::NotSupported => "not_supported",
            Code::Internal => "internal",
            Code::DaemonUnreachable => "daemon_unreachable",
            Code::PermissionDenied => "permission_denied",
            Code::SubnetExhausted => "subnet_exhausted",
            Code::AddressInUse => "address_in_use",
            Code::PortInUse => "port_in_use",
            Code::BadTarget => "bad_target",
        }
    }

    /// Parses a code string back (the running gateway reports its errors
    /// through the state file as strings).
    pub fn from_name(s: &str) -> Code {
        [
            Code::InvalidArgument,
            Code::NotRunning,
            Code::AlreadyExists,
            Code::NotFound,
            Code::ConnectionFailed,
            Code::Timeout,
            Code::TrustRequired,
            Code::NotSupported,
            Code::DaemonUnreachable,
            Code::PermissionDenied,
            Code::SubnetExhausted,
            Code::AddressInUse,
            Code::PortInUse,
            Code::BadTarget,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
        .unwrap_or(Code::Internal)
    }

    /// Exit status: 2 for a malformed command line, 1 for everything else.
    pub fn exit_status(self) -> i32 {
        if self == Code::Usage {
            2
        } else {
            1
        }
    }
}

/// A failure with its code, a message naming what was wrong, and a hint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub code: Code,
    pub message: String,
    pub hint: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Error {
        self.hint = Some(hint.into());
        self
    }

    pub fn usage(message: impl Into<String>) -> Error {
        Error::new(Code::Usage, message)
    }

    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(Code::InvalidArgument, message)
    }

    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(Code::Internal, message)
    }

    /// An I/O failure on `what` (a path, a socket), classified by errno so
    /// that "permission denied" and "address in use" get their own codes.
    pub fn io(what: impl fmt::Display, err: &std::io::Error) -> Error {
        use std::io::ErrorKind;
        let code = match err.kind() {
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::AddrInUse => Code::AddressInUse,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Code::Timeout,
            _ => Code::Internal,
        };
        Error::new(code, format!("{what}: {err}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}
