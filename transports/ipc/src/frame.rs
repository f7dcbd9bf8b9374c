//! The wire format (docs/PROTOCOL.md): length-prefixed frames whose body is MessagePack.
//!
//! A frame is `len: u32 big-endian` (the byte count of what follows), `kind: u8`,
//! then `len - 1` bytes of body. Control bodies are MessagePack maps; the hot
//! frames (`SEND`, `PUBLISH`, `TOPIC`, `GROUP`, `GROUP_DELIVER`) are MessagePack
//! arrays whose last element is the envelope map, so a router reads the first
//! elements and forwards the frame without decoding the envelope.

use serde::{Deserialize, Serialize};
use switchyard_core::{Envelope, Error, MachineEntry, MachineId, OutgoingRef, Result};

use crate::error::IpcError;

/// Protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u32 = 1;
/// Bytes before the body: 4 of length, 1 of kind.
pub const HEADER_LEN: usize = 5;
/// Default largest frame (length field value), 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Frame kinds (the byte after the length).
/// The request id of a `PUBLISH` whose publisher wants no `REPLY` (see [`crate::IpcTransport`]'s `emit`).
pub const NO_REPLY: u64 = 0;

pub mod kind {
    /// Client → server: first frame of every connection.
    pub const HELLO: u8 = 0x01;
    /// Server → client: handshake accepted.
    pub const WELCOME: u8 = 0x02;
    /// Either way: fatal error; the sender closes the connection after it.
    pub const ERROR: u8 = 0x03;
    /// Client → daemon: registry and subscription operations.
    pub const REQUEST: u8 = 0x04;
    /// Daemon → client: the answer to a `REQUEST`, `PUBLISH` or `GROUP`.
    pub const REPLY: u8 = 0x05;
    /// Daemon → watching client: a registry change.
    pub const EVENT: u8 = 0x06;
    /// `[to, envelope]`: route (client → daemon, peer → peer) or deliver (daemon → client).
    pub const SEND: u8 = 0x10;
    /// Client → daemon: `[req, topic, envelope]`, answered by a `REPLY` with `count`.
    pub const PUBLISH: u8 = 0x11;
    /// Daemon → client: `[topic, envelope]`, for the client's matching subscriptions.
    pub const TOPIC: u8 = 0x12;
    /// Client → daemon: `[req, group, envelope]`, answered by a `REPLY` with `count` (0 or 1).
    pub const GROUP: u8 = 0x13;
    /// Daemon → client: `[subscription id, envelope]`, for one group member.
    pub const GROUP_DELIVER: u8 = 0x14;
    /// Daemon/peer → sender: a `SEND` could not be delivered.
    pub const NACK: u8 = 0x15;
    /// Daemon → client that asked for it in `HELLO`: `{settled: n}`, n more of its data frames are settled.
    pub const ACK: u8 = 0x16;
    /// Client → daemon: `[count id, delivered]`, answering a `TOPIC_COUNTED`.
    pub const TOPIC_COUNT: u8 = 0x17;
    /// Daemon → client: `[topic, count id, envelope]`, a `TOPIC` whose publisher wants to
    /// know how many machines got it: deliver, then answer `TOPIC_COUNT`.
    pub const TOPIC_COUNTED: u8 = 0x18;
}

/// `NACK` codes: why one event was not delivered (docs/PROTOCOL.md §7).
pub mod nack {
    /// No machine of that id is registered.
    pub const UNKNOWN_TARGET: &str = "unknown_target";
    /// The target's queue in the daemon is full (its policy is `nack`).
    pub const FULL: &str = "full";
    /// The envelope's `source` is not a machine this connection registered.
    pub const NOT_OWNER: &str = "not_owner";
    /// The envelope is not what docs/PROTOCOL.md §2 describes.
    pub const MALFORMED: &str = "malformed";
    /// `to` (or the topic, or the group) disagrees with the envelope's `target`.
    pub const WRONG_TARGET: &str = "wrong_target";
    /// The frame is bigger than the receiver accepts.
    pub const TOO_LARGE: &str = "too_large";
    /// The daemon's memory budget had no room for this large frame.
    pub const OVER_BUDGET: &str = "over_budget";
    /// The published topic is not a valid topic (empty segment, wildcard).
    pub const INVALID_TOPIC: &str = "invalid_topic";
}

/// An `ACK` frame: `n` publishes or group messages handled, and bytes of sends per target settled.
pub fn ack_frame(n: u64, sends: &[(std::sync::Arc<str>, u64)]) -> Vec<u8> {
    let msg = AckMsg {
        settled: n,
        sends: sends.iter().map(|(t, b)| (t.to_string(), *b)).collect(),
    };
    // Plain integers and strings: encoding cannot fail.
    msg_frame(kind::ACK, &msg).unwrap_or_default()
}

/// Body of an `ACK` frame.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AckMsg {
    /// How many more of the client's `PUBLISH` and `GROUP` frames the daemon handled.
    #[serde(default)]
    pub settled: u64,
    /// Per target machine, bytes of the client's `SEND` frames the daemon wrote to it, dropped or refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sends: Vec<(String, u64)>,
}

/// A `TooLarge` error that names the payload: its size and the largest payload this event could carry.
pub fn too_large(frame_len: usize, max: usize, payload_len: usize) -> Error {
    let overhead = frame_len.saturating_sub(payload_len);
    Error::TooLarge {
        transport: crate::NAME,
        size: payload_len,
        limit: max.saturating_sub(overhead),
    }
}

/// First frame of a connection.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// Must be [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// Free-form name of the client, for logs.
    pub client_id: String,
    /// Shared secret, when the daemon requires one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Whether the daemon should push registry `EVENT`s to this connection.
    #[serde(default)]
    pub watch: bool,
    /// The largest frame this client accepts (absent: the server's own limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frame: Option<u64>,
    /// Whether the daemon should send `ACK` frames for this client's data frames.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub acks: bool,
}

/// Answer to `HELLO`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Welcome {
    /// The server's protocol version.
    pub protocol: u32,
    /// Free-form name of the server.
    pub server_id: String,
    /// The largest frame (length field) the server accepts.
    pub max_frame: u64,
    /// A connection that sends nothing for this long is closed (0 or absent: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// A frame must arrive whole within this long of its first byte (absent: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_timeout_ms: Option<u64>,
    /// Bytes of events the daemon queues per receiving connection (a sender that wants `ACK`s
    /// keeps at most half of it in flight per target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_limit: Option<u64>,
}

/// Body of an `ERROR` frame.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// Machine-readable code (see docs/PROTOCOL.md).
    pub code: String,
    /// Human-readable message.
    pub message: String,
}

/// Body of a `REQUEST` frame; `op` selects which other fields matter.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RequestMsg {
    /// Request id, echoed in the `REPLY`.
    pub req: u64,
    /// Operation: register, deregister, heartbeat, get, discover, discover_pattern, types, is_healthy, health, subscribe, unsubscribe.
    pub op: String,
    /// Machine id (deregister, heartbeat, get, is_healthy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Machine entry (register).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<MachineEntry>,
    /// Heartbeat TTL of the registered machine in milliseconds (register).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Machine type (discover).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub machine_type: Option<String>,
    /// Glob (discover_pattern) or topic pattern (subscribe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// Subscription id chosen by the client (subscribe, unsubscribe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<u64>,
    /// Consumer group (subscribe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// What happens to a send when the machine's queue in the daemon is full (register):
    /// `"nack"` (the sender gets `NACK full`) or `"drop_oldest"`; absent: the daemon's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when_full: Option<String>,
}

/// The daemon's health report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonHealth {
    /// Open client connections.
    pub connections: u64,
    /// Registered machines.
    pub machines: u64,
    /// Frames routed to another connection (sends, topic and group deliveries).
    pub routed: u64,
    /// Messages the daemon could not deliver (unknown target, no subscriber for a group).
    pub dropped: u64,
    /// Clients dropped for protocol violations.
    pub rejected: u64,
    /// Last frame received, microseconds since the Unix epoch (0: none yet).
    pub last_activity_us: u64,
    /// Sends refused with `NACK full` (the target's queue was full).
    #[serde(default)]
    pub nacked_full: u64,
    /// Events dropped oldest-first from full queues (machines registered with `drop_oldest`).
    #[serde(default)]
    pub dropped_oldest: u64,
    /// Topic and group deliveries dropped because the subscriber's queue was full.
    #[serde(default)]
    pub dropped_slow: u64,
    /// Subscribers disconnected for staying too slow.
    #[serde(default)]
    pub slow_disconnects: u64,
    /// Frames refused because the memory budget was spent.
    #[serde(default)]
    pub over_budget: u64,
    /// Bytes of the memory budget in use, and its size.
    #[serde(default)]
    pub budget_used: u64,
    /// The memory budget (bytes).
    #[serde(default)]
    pub budget_limit: u64,
    /// Connections refused or closed because the process was out of file descriptors.
    #[serde(default)]
    pub fd_exhausted: u64,
}

/// Body of a `REPLY` frame.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReplyMsg {
    /// The request id.
    pub req: u64,
    /// Whether the operation succeeded.
    pub ok: bool,
    /// Error code when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Error message when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// register (the stored entry, with a generated id), get.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<MachineEntry>,
    /// discover, discover_pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<MachineEntry>>,
    /// types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<String>>,
    /// is_healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    /// publish, group: receivers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<DaemonHealth>,
}

impl ReplyMsg {
    /// A successful, empty reply.
    pub fn ok(req: u64) -> ReplyMsg {
        ReplyMsg {
            req,
            ok: true,
            ..ReplyMsg::default()
        }
    }
    /// A failed reply carrying a core error.
    pub fn err(req: u64, e: &Error) -> ReplyMsg {
        ReplyMsg {
            req,
            ok: false,
            code: Some(error_code(e).into()),
            message: Some(e.to_string()),
            ..ReplyMsg::default()
        }
    }
    /// The error of a failed reply, as a core error.
    pub fn into_error(self, subject: Option<&str>) -> Error {
        let code = self.code.unwrap_or_default();
        let message = self.message.unwrap_or_default();
        let id = || MachineId::from(subject.unwrap_or_default());
        match code.as_str() {
            "unknown_target" => Error::UnknownTarget(id()),
            "duplicate_id" => Error::DuplicateId(id()),
            "invalid_pattern" => Error::InvalidPattern {
                pattern: subject.unwrap_or_default().to_string(),
                reason: "rejected by the bus daemon",
            },
            "invalid_name" => Error::InvalidName {
                name: subject.unwrap_or_default().to_string(),
                reason: "rejected by the bus daemon",
            },
            _ => crate::error::transport_err(format!("bus daemon: {code}: {message}")),
        }
    }
}

/// The protocol code of a core error in a `REPLY`.
pub fn error_code(e: &Error) -> &'static str {
    match e {
        Error::UnknownTarget(_) => "unknown_target",
        Error::DuplicateId(_) => "duplicate_id",
        Error::InvalidPattern { .. } => "invalid_pattern",
        Error::InvalidName { .. } => "invalid_name",
        _ => "failed",
    }
}

/// Body of an `EVENT` frame.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventMsg {
    /// `joined`, `left` or `health`.
    pub event: String,
    /// joined: the entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<MachineEntry>,
    /// left, health: the machine id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// health: the new health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
}

/// Body of a `NACK` frame.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NackMsg {
    /// The target that could not be reached.
    pub to: String,
    /// The envelope id.
    pub id: u64,
    /// Error code (see [`nack`]).
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// The envelope's source, when the daemon could read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// The event a receiving client sends each sending machine after the bus daemon it shared
/// with them restarted: how many of that machine's sends it received through the lost one.
pub const DELIVERED_EVENT: &str = "switchyard.ipc.delivered";

/// Event names starting with this are the ipc transport's own and never reach handlers.
pub const RESERVED_PREFIX: &str = "switchyard.ipc.";

/// Payload of a [`DELIVERED_EVENT`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    /// The lost daemon's `server_id` (from its `WELCOME`).
    pub epoch: String,
    /// `SEND`s from the event's target machine to its source machine received through it.
    pub received: u64,
}

/// Appends a frame whose body `body` writes; fails (leaving `buf` as it was) on encode errors or when over `max`.
pub fn write_frame(
    buf: &mut Vec<u8>,
    kind: u8,
    max: usize,
    body: impl FnOnce(&mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0, 0, 0, kind]);
    if let Err(e) = body(buf) {
        buf.truncate(start);
        return Err(e);
    }
    let len = buf.len() - start - 4;
    if len > max {
        buf.truncate(start);
        return Err(Error::TooLarge {
            transport: crate::NAME,
            size: len,
            limit: max,
        });
    }
    buf[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Appends a control frame whose body is `msg` as a named MessagePack map.
pub fn write_msg<T: Serialize>(buf: &mut Vec<u8>, kind: u8, max: usize, msg: &T) -> Result<()> {
    write_frame(buf, kind, max, |b| {
        rmp_serde::encode::write_named(b, msg).map_err(|e| Error::Encode(e.to_string()))
    })
}

/// One control frame as a fresh buffer.
pub fn msg_frame<T: Serialize>(kind: u8, msg: &T) -> Result<Vec<u8>> {
    let mut v = Vec::with_capacity(64);
    write_msg(&mut v, kind, usize::MAX, msg)?;
    Ok(v)
}

/// Writes the envelope map exactly as `Envelope::encode` does, without an intermediate buffer.
pub fn write_envelope(buf: &mut Vec<u8>, env: &Envelope) -> Result<()> {
    crate::codec::write_envelope(buf, env)
}

/// Writes a MessagePack string.
pub fn write_str(buf: &mut Vec<u8>, s: &str) -> Result<()> {
    rmp::encode::write_str(buf, s).map_err(|e| Error::Encode(e.to_string()))
}

/// Writes a MessagePack unsigned integer.
pub fn write_uint(buf: &mut Vec<u8>, v: u64) -> Result<()> {
    rmp::encode::write_uint(buf, v)
        .map(|_| ())
        .map_err(|e| Error::Encode(e.to_string()))
}

/// Writes a MessagePack array header.
pub fn write_array(buf: &mut Vec<u8>, n: u32) -> Result<()> {
    rmp::encode::write_array_len(buf, n)
        .map(|_| ())
        .map_err(|e| Error::Encode(e.to_string()))
}

/// Appends a `SEND` frame `[to, envelope]`.
pub fn write_send(buf: &mut Vec<u8>, max: usize, to: &str, env: &Envelope) -> Result<()> {
    write_send_event(buf, max, to, &OutgoingRef::of(env))
}

/// Appends a `SEND` frame `[to, envelope]` for a borrowed event.
pub fn write_send_event(
    buf: &mut Vec<u8>,
    max: usize,
    to: &str,
    ev: &OutgoingRef<'_>,
) -> Result<()> {
    write_frame(buf, kind::SEND, max, |b| {
        b.push(0x92);
        crate::codec::put_str(b, to)?;
        crate::codec::write_event(b, ev)
    })
    .map_err(|e| match e {
        // Say it in payload bytes, which the caller controls.
        Error::TooLarge { size, limit, .. } => {
            let mut p = Vec::new();
            let payload = match &ev.payload {
                switchyard_core::PayloadRef::Encoded(b) => b.len(),
                other => other.write_msgpack(&mut p).map_or(0, |_| p.len()),
            };
            too_large(size, limit, payload)
        }
        e => e,
    })
}

/// A cursor over a frame body that reads the leading array elements of the hot frames.
pub struct Body<'a> {
    rest: &'a [u8],
}

fn malformed(what: &str, e: impl std::fmt::Display) -> IpcError {
    IpcError::Malformed(format!("{what}: {e}"))
}

impl<'a> Body<'a> {
    /// Starts reading a body that must be an array of `n` elements.
    pub fn array(body: &'a [u8], n: u32) -> std::result::Result<Body<'a>, IpcError> {
        let mut rd = body;
        let len = rmp::decode::read_array_len(&mut rd).map_err(|e| malformed("array", e))?;
        if len != n {
            return Err(IpcError::Malformed(format!(
                "expected an array of {n} elements, got {len}"
            )));
        }
        Ok(Body { rest: rd })
    }
    /// Reads a string element.
    pub fn str(&mut self) -> std::result::Result<&'a str, IpcError> {
        let (s, rest) =
            rmp::decode::read_str_from_slice(self.rest).map_err(|e| malformed("string", e))?;
        self.rest = rest;
        Ok(s)
    }
    /// Reads a string element's bytes without checking they are UTF-8 (the caller does, if it must).
    pub fn raw_str(&mut self) -> std::result::Result<&'a [u8], IpcError> {
        let mut rd = self.rest;
        let n = rmp::decode::read_str_len(&mut rd).map_err(|e| malformed("string", e))? as usize;
        if rd.len() < n {
            return Err(IpcError::Malformed("string: truncated".into()));
        }
        let (s, rest) = rd.split_at(n);
        self.rest = rest;
        Ok(s)
    }
    /// Reads an unsigned integer element.
    pub fn uint(&mut self) -> std::result::Result<u64, IpcError> {
        let mut rd = self.rest;
        let v: u64 = rmp::decode::read_int(&mut rd).map_err(|e| malformed("integer", e))?;
        self.rest = rd;
        Ok(v)
    }
    /// The remaining bytes (the envelope map).
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }
    /// Decodes the remaining bytes as an envelope.
    pub fn envelope(&self) -> std::result::Result<Envelope, IpcError> {
        crate::codec::decode_envelope(self.rest).map_err(|e| malformed("envelope", e))
    }
    /// Reads the trailing envelope, reusing the connection's strings (see [`crate::codec::Interner`]).
    pub fn envelope_with(
        &self,
        names: &mut crate::codec::Interner,
    ) -> std::result::Result<Envelope, IpcError> {
        crate::codec::decode_envelope_with(self.rest, names).map_err(|e| malformed("envelope", e))
    }
}

/// Decodes a control body.
pub fn decode_msg<'a, T: Deserialize<'a>>(body: &'a [u8]) -> std::result::Result<T, IpcError> {
    rmp_serde::from_slice(body).map_err(|e| malformed("control body", e))
}

/// Where one complete frame sits in a read buffer.
pub struct FrameRef {
    /// The kind byte.
    pub kind: u8,
    /// Total bytes of the frame including the header.
    pub total: usize,
    /// The daemon read this frame without keeping it (over its memory budget); only its head is left.
    pub refused: bool,
}

/// Looks at the start of `buf`: a complete frame, `None` when more bytes are needed, or a typed error.
pub fn peek_frame(buf: &[u8], max: usize) -> std::result::Result<Option<FrameRef>, IpcError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 {
        return Err(IpcError::Malformed(
            "zero-length frame (the length counts the kind byte)".into(),
        ));
    }
    if len > max {
        return Err(IpcError::FrameTooLarge {
            size: len,
            limit: max,
        });
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some(FrameRef {
        kind: buf[4],
        total: 4 + len,
        refused: false,
    }))
}

/// What is left in a buffer when the stream ended: a truncation error if it holds part of a frame.
pub fn check_eof(buf: &[u8]) -> std::result::Result<(), IpcError> {
    if buf.is_empty() {
        return Ok(());
    }
    let want = if buf.len() >= 4 {
        4 + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
    } else {
        HEADER_LEN
    };
    Err(IpcError::Truncated {
        have: buf.len(),
        want,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::{Address, Payload};

    #[test]
    fn envelope_encoding_matches_core() {
        let mut env = Envelope::new(
            7,
            "a".into(),
            Address::Machine("b".into()),
            "EV".into(),
            Payload::new(vec![1u32, 2, 3]),
        );
        env.headers.correlation_id = Some(9);
        let mut mine = Vec::new();
        write_envelope(&mut mine, &env).unwrap();
        assert_eq!(mine, env.encode().unwrap());
        let back = Envelope::decode(&mine).unwrap();
        assert_eq!(back.payload.read::<Vec<u32>>().unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn send_frame_round_trips() {
        let env = Envelope::new(
            1,
            "a".into(),
            Address::Machine("b".into()),
            "EV".into(),
            Payload::Empty,
        );
        let mut buf = Vec::new();
        write_send(&mut buf, DEFAULT_MAX_FRAME, "b", &env).unwrap();
        let f = peek_frame(&buf, DEFAULT_MAX_FRAME).unwrap().unwrap();
        assert_eq!((f.kind, f.total), (kind::SEND, buf.len()));
        let mut body = Body::array(&buf[HEADER_LEN..], 2).unwrap();
        assert_eq!(body.str().unwrap(), "b");
        assert_eq!(&*body.envelope().unwrap().event, "EV");
        assert!(matches!(
            peek_frame(&buf, 3),
            Err(IpcError::FrameTooLarge { .. })
        ));
        assert!(
            peek_frame(&buf[..buf.len() - 1], 1 << 20)
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            check_eof(&buf[..7]),
            Err(IpcError::Truncated { .. })
        ));
    }
}
