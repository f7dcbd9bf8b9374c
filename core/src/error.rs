//! Errors returned by every Switchyard crate.

use std::sync::Arc;
use std::time::Duration;

use crate::address::MachineId;
use crate::location::Location;

/// Result alias used across Switchyard.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in Switchyard; each message says what happened and what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The target id is not in the registry.
    #[error(
        "no machine `{0}` is registered: register it first or check the id (discover by type lists the live ids)"
    )]
    UnknownTarget(MachineId),
    /// No machine of the requested type is registered (besides the sender).
    #[error(
        "no machine of type `{0}` is registered (other than the sender): start one or check the type name"
    )]
    NoMachineOfType(Arc<str>),
    /// The id is taken.
    #[error(
        "machine id `{0}` is already registered: pick another id or let the registry generate one"
    )]
    DuplicateId(MachineId),
    /// An id or type name is not usable.
    #[error("invalid name `{name}`: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Strict mode: the sender is not linked to the target.
    #[error(
        "`{from}` is not linked to `{to}` and the session is strict: call connect first or use discover_and_connect"
    )]
    NotLinked {
        /// Sender.
        from: MachineId,
        /// Target.
        to: MachineId,
    },
    /// No configured transport reaches that location.
    #[error(
        "no transport reaches `{target}` at location {location:?}: enable the transport feature for that location or add one to the session"
    )]
    NoTransport {
        /// Target id.
        target: MachineId,
        /// Computed location.
        location: Location,
    },
    /// The target's mailbox is full and its policy is `Fail`.
    #[error(
        "mailbox of `{0}` is full (policy Fail): slow the sender down or raise the mailbox capacity"
    )]
    MailboxFull(MachineId),
    /// A bounded internal queue is full.
    #[error(
        "{what} is full ({capacity} entries): the consumer is not keeping up; slow the producer down"
    )]
    QueueFull {
        /// Which queue.
        what: &'static str,
        /// Its bound.
        capacity: usize,
    },
    /// A request got no reply in time.
    #[error(
        "request to `{target}` got no reply within {timeout:?}: check that its handler replies, or raise the timeout"
    )]
    Timeout {
        /// Target id.
        target: MachineId,
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// The payload could not be read as the requested type.
    #[error("payload is not a `{expected}`: {reason}; read it as the type the sender sent")]
    PayloadType {
        /// The requested type.
        expected: &'static str,
        /// Decoder message.
        reason: String,
    },
    /// A payload or envelope could not be encoded.
    #[error("could not encode message: {0}; payloads must serialize with serde")]
    Encode(String),
    /// Bytes from the wire could not be decoded.
    #[error("could not decode message: {0}; the peer sent a malformed or incompatible frame")]
    Decode(String),
    /// The message exceeds the transport's size limit.
    #[error(
        "message of {size} bytes exceeds the {limit}-byte limit of transport `{transport}`: send less or pick a transport with a larger limit"
    )]
    TooLarge {
        /// Transport name.
        transport: &'static str,
        /// Encoded size.
        size: usize,
        /// Limit.
        limit: usize,
    },
    /// A topic or discovery pattern is malformed.
    #[error("invalid pattern `{pattern}`: {reason}")]
    InvalidPattern {
        /// The rejected pattern.
        pattern: String,
        /// Why.
        reason: &'static str,
    },
    /// The transport has been closed.
    #[error("transport `{0}` is closed: the session was shut down; create a new session")]
    Closed(&'static str),
    /// The target machine is known but no longer reachable.
    #[error("machine `{0}` is gone: it was deregistered or its process exited")]
    TargetGone(MachineId),
    /// The transport does not offer this operation.
    #[error(
        "transport `{transport}` does not support {capability}: pick a transport that does (see docs/SEMANTICS.md)"
    )]
    NotSupported {
        /// Transport name.
        transport: &'static str,
        /// The missing capability.
        capability: &'static str,
    },
    /// A transport-level failure.
    #[error("transport `{transport}` failed: {reason}")]
    Transport {
        /// Transport name.
        transport: &'static str,
        /// What happened.
        reason: String,
        /// Whether another transport may succeed.
        retryable: bool,
    },
    /// The session has been shut down.
    #[error("the session is shut down: create a new session")]
    SessionClosed,
    /// The configuration cannot work (e.g. a selector preference names no configured transport).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A send to several machines reached some of them; the others failed.
    #[error(
        "delivered to {delivered}, failed for {}: {}",
        failed.len(),
        failed.iter().map(|(id, e)| format!("`{id}`: {e}")).collect::<Vec<_>>().join("; ")
    )]
    Partial {
        /// How many machines got it.
        delivered: usize,
        /// Each machine that did not, with why.
        failed: Vec<(MachineId, Error)>,
    },
}

impl Error {
    /// Whether the selector may try the next transport for the same location: the
    /// transport cannot carry anything now (closed, unsupported, not connected).
    ///
    /// A failure of one event ([`Error::TooLarge`], a full mailbox) is not retryable:
    /// sending that event another way would let it overtake the events before it.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Closed(_)
                | Error::NotSupported { .. }
                | Error::Transport {
                    retryable: true,
                    ..
                }
        )
    }
}
