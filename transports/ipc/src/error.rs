//! Errors of the ipc transport and the bus daemon.

use std::path::PathBuf;

use switchyard_core::Error;

/// What went wrong on a local-socket connection; each message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IpcError {
    /// A frame announced more bytes than the configured limit.
    #[error(
        "frame of {size} bytes exceeds the {limit}-byte limit: send smaller messages or raise --max-frame on both sides"
    )]
    FrameTooLarge {
        /// Announced length.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// A frame's bytes do not follow docs/PROTOCOL.md.
    #[error(
        "malformed frame: {0}; the peer does not speak switchyard protocol 1 (see docs/PROTOCOL.md)"
    )]
    Malformed(String),
    /// A frame kind this side does not know.
    #[error(
        "unknown frame kind 0x{0:02x}: the peer speaks another protocol version or sent garbage"
    )]
    UnknownFrame(u8),
    /// The connection ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({have} of {want} bytes received)")]
    Truncated {
        /// Bytes received of the frame.
        have: usize,
        /// Bytes the frame announced.
        want: usize,
    },
    /// The handshake failed (wrong protocol version, bad token, unexpected first frame).
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The peer runs as another user and the daemon only accepts its own uid.
    #[error(
        "peer uid {peer} differs from this process's uid {ours}: run both as the same user or start the daemon with --allow-any-uid / --group"
    )]
    PeerUid {
        /// The peer's uid.
        peer: u32,
        /// Ours.
        ours: u32,
    },
    /// Another daemon already listens on the socket.
    #[error("a bus daemon already listens on {0}: stop it first or pick another --socket path")]
    AlreadyRunning(PathBuf),
    /// A setting this platform cannot honour (e.g. `--group` on Windows); the message says what to do instead.
    #[error("not supported on this platform: {0}")]
    Unsupported(String),
    /// The other side reported an error and closed the connection.
    #[error("the peer closed the connection with error `{code}`: {message}")]
    Remote {
        /// Error code (see docs/PROTOCOL.md).
        code: String,
        /// Human-readable message.
        message: String,
    },
    /// The daemon cannot take this client now (out of file descriptors); retry later.
    #[error("the bus daemon is busy: {0}")]
    Busy(String),
    /// The connection's queue in the daemon stayed full too long; the client is disconnected.
    #[error("slow consumer: {0}")]
    SlowConsumer(String),
    /// A frame did not arrive whole in time, or the connection was idle too long.
    #[error("timed out: {0}")]
    Timeout(String),
    /// An I/O error on the socket.
    #[error("local socket {path}: {source}")]
    Io {
        /// Socket path or peer description.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl IpcError {
    /// The protocol error code sent in an `ERROR` frame (see docs/PROTOCOL.md).
    pub fn code(&self) -> &'static str {
        match self {
            IpcError::FrameTooLarge { .. } => "frame_too_large",
            IpcError::Malformed(_) => "malformed",
            IpcError::UnknownFrame(_) => "unknown_frame",
            IpcError::Truncated { .. } => "truncated",
            IpcError::Handshake(_) => "handshake",
            IpcError::PeerUid { .. } => "permission",
            IpcError::AlreadyRunning(_) => "already_running",
            IpcError::Unsupported(_) => "unsupported",
            IpcError::Remote { .. } => "remote",
            IpcError::Busy(_) => "busy",
            IpcError::SlowConsumer(_) => "slow_consumer",
            IpcError::Timeout(_) => "timeout",
            IpcError::Io { .. } => "io",
        }
    }

    pub(crate) fn io(path: impl Into<String>, source: std::io::Error) -> IpcError {
        IpcError::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<IpcError> for Error {
    fn from(e: IpcError) -> Error {
        Error::Transport {
            transport: crate::NAME,
            reason: e.to_string(),
            retryable: false,
        }
    }
}

/// A transport error for the ipc transport.
pub(crate) fn transport_err(reason: impl Into<String>) -> Error {
    Error::Transport {
        transport: crate::NAME,
        reason: reason.into(),
        retryable: false,
    }
}
