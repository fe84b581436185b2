//! Errors of the crate and the status a handler answers the runtime with.

use std::fmt;

/// gRPC status codes, as carried in a ttrpc response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    pub fn from_i32(v: i32) -> Code {
        use Code::*;
        [
            Ok,
            Cancelled,
            Unknown,
            InvalidArgument,
            DeadlineExceeded,
            NotFound,
            AlreadyExists,
            PermissionDenied,
            ResourceExhausted,
            FailedPrecondition,
            Aborted,
            OutOfRange,
            Unimplemented,
            Internal,
            Unavailable,
            DataLoss,
            Unauthenticated,
        ]
        .into_iter()
        .find(|c| *c as i32 == v)
        .unwrap_or(Unknown)
    }
}

/// What a handler answers when it refuses an event. The runtime sees `code` and `message`;
/// containerd and CRI-O fail CreateContainer on any status, and containerd fails
/// StartContainer too.
///
/// Do not use [`Code::NotFound`] to mean "not handled": containerd treats it as a real error.
/// Unhandled methods are answered with [`Code::Unimplemented`] by the crate itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
        }
    }
    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Status::new(Code::FailedPrecondition, message)
    }
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Status::new(Code::InvalidArgument, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Status::new(Code::Internal, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Status::new(Code::Unavailable, message)
    }
    pub fn unimplemented(message: impl Into<String>) -> Self {
        Status::new(Code::Unimplemented, message)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for Status {}

/// Failures of the connection to the runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot connect to the NRI socket {path}: {error}")]
    Connect {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("cannot use the pre-connected NRI socket (NRI_PLUGIN_SOCKET={value}): {reason}")]
    PreConnected { value: String, reason: String },
    #[error("invalid plugin name {0:?}: use letters, digits and _.+-")]
    InvalidName(String),
    #[error("invalid plugin index {0:?}: it must be exactly two digits")]
    InvalidIndex(String),
    #[error("connection to the runtime failed: {0}")]
    Io(std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the runtime refused the registration: {0}")]
    Registration(Status),
    #[error("the runtime did not answer {what} within {timeout:?}")]
    Timeout {
        what: &'static str,
        timeout: std::time::Duration,
    },
    #[error("the runtime answered {method} with {status}")]
    Call {
        method: &'static str,
        status: Status,
    },
    #[error("the connection to the runtime is closed")]
    Closed,
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}
