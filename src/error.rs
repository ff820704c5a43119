//! The library's one error type.
//!
//! Expected conditions (a refusal from the other side, a malformed frame, a bad name) have their
//! own variants so callers can match on them; the binaries turn them into one-line messages and
//! exit codes (see [`Error::exit_code`]).

use std::fmt;
use std::io;

use serde::{Deserialize, Serialize};

/// Why a request was refused; carried in every refusal on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The frame was too large or did not decode; the connection is closed after this.
    BadFrame,
    /// A well-formed request that is not allowed here or now (for example before `Hello`).
    BadRequest,
    /// A name broke the naming rules.
    InvalidName,
    /// Signup with a name that is already registered.
    NameTaken,
    /// Wrong user name or password (deliberately not saying which).
    InvalidCredentials,
    /// The session token is unknown or expired.
    InvalidToken,
    /// The named recipient does not exist.
    UnknownUser,
    /// The named group does not exist (or the caller may not know it does).
    UnknownGroup,
    /// The caller is not allowed to do this (not a member, not the admin).
    NotAllowed,
    /// The request is based on stale state (for example a group epoch that has moved on);
    /// fetch the state again and retry.
    Conflict,
    /// A message with no content, or over the size limit.
    BadMessage,
    /// No chat server is available.
    NoServers,
    /// The server is at capacity or shutting down; try again or elsewhere.
    Unavailable,
    /// Too many attempts (failed logins); the message says how long to wait.
    RateLimited,
    /// A quota is full (a recipient's queue, a user's files); the message says which.
    QuotaExceeded,
    /// Something failed inside the server; the request had no effect.
    Internal,
}

/// Everything that can go wrong in fastchat.
#[derive(Debug)]
pub enum Error {
    /// A socket or file operation failed.
    Io(io::Error),
    /// Could not connect to an address (nothing listening, refused, timed out).
    Unreachable {
        /// What we tried to reach, for example `balancer 127.0.0.1:7000`.
        what: String,
        /// The underlying socket error.
        source: io::Error,
    },
    /// The database refused an operation.
    Db(rusqlite::Error),
    /// PostgreSQL refused an operation, or the connection to it failed.
    Postgres(postgres::Error),
    /// A batch of writes could not be committed (the reason, as the database gave it).
    Commit(String),
    /// OpenSSL reported an error.
    Crypto(openssl::error::ErrorStack),
    /// A frame announced a body larger than the link allows.
    FrameTooLarge {
        /// The announced body length, in bytes.
        len: usize,
        /// The largest body the link accepts here.
        max: usize,
    },
    /// A frame body did not decode as the expected message.
    Malformed(String),
    /// The peer sent something valid but out of place (a reply to nothing, a frame before Hello).
    Protocol(String),
    /// The other side refused a request with a reasoned error.
    Refused {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable reason, one line.
        message: String,
    },
    /// A user, group or file name broke the naming rules.
    InvalidName(String),
    /// Input given on the command line or in a file was unusable.
    Invalid(String),
    /// A local file, folder or process this program keeps could not be made or used (a key
    /// file, the key agent, a download folder): exit code 4.
    Local(String),
    /// Decryption or verification failed: the data was tampered with or not meant for us.
    Integrity(String),
    /// A message came before what opens it (a group message before its sender's key, which
    /// comes as a direct message): keep it and try again when more has arrived.
    Early(String),
    /// A chat server's work that was not done because the process was frozen (stopped) since
    /// its request was read (see [`crate::freeze`]): its client may have sent it again
    /// elsewhere. The server closes that client's connection instead of answering.
    Frozen,
    /// Our standard output was closed (`fastchat recv | head -1`): the command ends quietly,
    /// having shown (and acknowledged) only what was written.
    OutputClosed,
}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The process exit code a binary should use for this error.
    ///
    /// 0: standard output was closed (the reader had enough); 1: the request was refused or
    /// invalid; 3: a server could not be reached, none is available, or the connection broke;
    /// 4: local trouble (files, database, crypto). 2 is left to argument parsing.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::OutputClosed => 0,
            Error::Refused {
                code: ErrorCode::NoServers | ErrorCode::Unavailable,
                ..
            } => 3,
            Error::Refused { .. }
            | Error::InvalidName(_)
            | Error::Invalid(_)
            | Error::Integrity(_)
            | Error::Early(_) => 1,
            Error::Unreachable { .. }
            | Error::FrameTooLarge { .. }
            | Error::Protocol(_)
            | Error::Frozen => 3,
            Error::Malformed(_) => 3,
            Error::Io(e) if is_disconnect(e) => 3,
            Error::Io(_)
            | Error::Db(_)
            | Error::Postgres(_)
            | Error::Commit(_)
            | Error::Crypto(_)
            | Error::Local(_) => 4,
        }
    }

    /// Whether this is the database saying another process holds its lock (or, for
    /// PostgreSQL, that the database cannot be reached now).
    pub fn is_busy(&self) -> bool {
        if let Error::Postgres(e) = self {
            use postgres::error::SqlState;
            return e.is_closed()
                || e.code().is_some_and(|c| {
                    [
                        SqlState::LOCK_NOT_AVAILABLE,
                        SqlState::T_R_SERIALIZATION_FAILURE,
                        SqlState::T_R_DEADLOCK_DETECTED,
                        SqlState::QUERY_CANCELED,
                        SqlState::ADMIN_SHUTDOWN,
                        SqlState::CANNOT_CONNECT_NOW,
                        SqlState::TOO_MANY_CONNECTIONS,
                    ]
                    .contains(c)
                });
        }
        self.sqlite_code().is_some_and(|code| {
            matches!(
                code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            )
        })
    }

    /// Whether this is the disk (or the database's size limit) being full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Error::Io(e) => e.kind() == std::io::ErrorKind::StorageFull,
            Error::Postgres(e) => e.code() == Some(&postgres::error::SqlState::DISK_FULL),
            _ => self.sqlite_code() == Some(rusqlite::ErrorCode::DiskFull),
        }
    }

    /// A storage failure the caller can do something about (wait, free space), as the
    /// sentence a client should read; `None` for every other error.
    pub fn storage_refusal(&self) -> Option<String> {
        if self.is_busy() {
            Some(
                "the database is busy: another process has held it longer than the time \
                 allowed; nothing was stored, try again"
                    .to_string(),
            )
        } else if self.is_disk_full() {
            Some("server storage is full; nothing was stored, try again later".to_string())
        } else {
            None
        }
    }

    /// What a server answers when handling request `id` failed with this error: a refusal
    /// passes through, a storage failure becomes `Unavailable` with its reason, and anything
    /// else is logged and becomes an `Internal` error that reveals nothing.
    pub fn into_refusal(self, id: u64) -> (ErrorCode, String) {
        match self {
            Error::Refused { code, message } => (code, message),
            Error::InvalidName(message) => (ErrorCode::InvalidName, message),
            e @ Error::Frozen => (ErrorCode::Unavailable, e.to_string()),
            e => match e.storage_refusal() {
                Some(message) => {
                    log::warn!("request {id} refused: {e}");
                    (ErrorCode::Unavailable, message)
                }
                None => {
                    log::error!("request {id} failed: {e}");
                    (
                        ErrorCode::Internal,
                        "internal error; the request had no effect".to_string(),
                    )
                }
            },
        }
    }

    fn sqlite_code(&self) -> Option<rusqlite::ErrorCode> {
        match self {
            Error::Db(rusqlite::Error::SqliteFailure(e, _)) => Some(e.code),
            _ => None,
        }
    }

    /// Shorthand for a refusal with a code and message.
    pub fn refused(code: ErrorCode, message: impl Into<String>) -> Error {
        Error::Refused {
            code,
            message: message.into(),
        }
    }

    /// True when the error means the connection is gone (as opposed to a refused request).
    pub fn is_disconnect(&self) -> bool {
        match self {
            Error::Io(e) => is_disconnect(e),
            Error::Unreachable { .. } => true,
            _ => false,
        }
    }
}

/// True for the I/O errors that mean "the other end went away".
pub fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::TimedOut
            | io::ErrorKind::WouldBlock
    )
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) if is_disconnect(e) => write!(f, "connection lost ({e})"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Unreachable { what, source } => write!(f, "cannot reach {what}: {source}"),
            Error::Db(e) => write!(f, "database error: {e}"),
            Error::Postgres(e) => match e.as_db_error() {
                Some(db) => write!(f, "database error: {}", db.message()),
                None => write!(f, "database error: {e}"),
            },
            Error::Commit(e) => write!(f, "database commit failed: {e}"),
            Error::Crypto(e) => write!(f, "crypto error: {e}"),
            Error::FrameTooLarge { len, max } => {
                write!(f, "frame of {len} bytes is over the limit of {max} bytes")
            }
            Error::Malformed(m) => write!(f, "malformed frame: {m}"),
            Error::Protocol(m) => write!(f, "protocol error: {m}"),
            Error::Refused { message, .. } => write!(f, "{message}"),
            Error::InvalidName(m) => write!(f, "{m}"),
            Error::Invalid(m) => write!(f, "{m}"),
            Error::Local(m) => write!(f, "{m}"),
            Error::Integrity(m) | Error::Early(m) => write!(f, "{m}"),
            Error::Frozen => write!(
                f,
                "this server did not run for a while (it was stopped); what it was sent before \
                 is not stored: send it again"
            ),
            Error::OutputClosed => write!(f, "standard output was closed"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            Error::Unreachable { source, .. } => Some(source),
            Error::Db(e) => Some(e),
            Error::Postgres(e) => Some(e),
            Error::Crypto(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Error {
        Error::Db(e)
    }
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Error {
        Error::Postgres(e)
    }
}

impl From<openssl::error::ErrorStack> for Error {
    fn from(e: openssl::error::ErrorStack) -> Error {
        Error::Crypto(e)
    }
}
