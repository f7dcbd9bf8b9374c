//! What travels in the frames of a zeromq message (docs/PROTOCOL.md §12).
//!
//! The envelope is the same MessagePack map as everywhere else; the writer here
//! encodes it straight from a borrowed event, byte for byte what
//! `Envelope::encode` produces (the same hand-written encoder as the ipc crate's
//! codec, kept here because transport crates depend on core only).

use serde::{Deserialize, Serialize};
use switchyard_core::{Address, Envelope, Error, Headers, OutgoingRef, PayloadRef, Result};

/// First frame of a message a DEALER sends to a ROUTER (and of a ROUTER's answers).
pub mod kind {
    /// `[HELLO, req, {process, host, router, pub, version, subs}]`: a process introduces itself.
    pub const HELLO: u8 = 0x01;
    /// `[REPLY, req, {ok, count?, code?, message?}]`: the answer to a request.
    pub const REPLY: u8 = 0x02;
    /// `[SUBS, req, {process, host, version, subs, marker?}]`: a process's subscriptions, whole.
    pub const SUBS: u8 = 0x03;
    /// `[MARK, req, marker]`: publish `marker` on the PUB socket (the slow-joiner check).
    pub const MARK: u8 = 0x04;
    /// `[SEND, to, envelope, envelope, ...]`: events for machine `to`, in order.
    pub const SEND: u8 = 0x10;
    /// `[GROUP, req, sub, envelope]`: a group message for subscription `sub`.
    pub const GROUP: u8 = 0x11;
    /// `[COUNT, count_id, delivered, process]`: how many machines got a counted topic message.
    pub const COUNT: u8 = 0x12;
    /// `[NACK, {to, id, code, message}]`: an event for a machine that is not here.
    pub const NACK: u8 = 0x15;
    /// `[ACK, bytes]`: bytes of `SEND` messages received since the last `ACK`.
    pub const ACK: u8 = 0x20;
}

/// The first byte of a PUB message's first frame that marks it as ours, not a topic.
pub const CONTROL_PREFIX: u8 = 0;

/// Protocol version in `HELLO`.
pub const PROTOCOL: u32 = 1;

fn enc(e: impl std::fmt::Display) -> Error {
    Error::Encode(e.to_string())
}

/// A big-endian u64 frame.
pub fn u64_frame(v: u64) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(&v.to_be_bytes())
}

/// Reads a big-endian u64 frame; `None` when it is not 8 bytes.
pub fn read_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// One subscription of a process, as its peers learn it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubInfo {
    /// Unique within the announcing process.
    pub sub: u64,
    /// Topic pattern (`*`/`#`), if a topic subscription.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// Consumer group, if a membership.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// `HELLO` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// Must be [`PROTOCOL`].
    pub protocol: u32,
    /// The sender's process instance id.
    pub process: String,
    /// The sender's host id.
    pub host: String,
    /// The sender's ROUTER endpoint.
    pub router: String,
    /// The sender's PUB endpoint.
    #[serde(rename = "pub")]
    pub pub_ep: String,
    /// Version of `subs` (grows with every change).
    pub version: u64,
    /// The sender's subscriptions.
    pub subs: Vec<SubInfo>,
}

/// `SUBS` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Subs {
    /// The sender's process instance id.
    pub process: String,
    /// The sender's host id.
    pub host: String,
    /// The sender's ROUTER endpoint.
    pub router: String,
    /// The sender's PUB endpoint.
    #[serde(rename = "pub")]
    pub pub_ep: String,
    /// Version of `subs`; an older one than already known is ignored.
    pub version: u64,
    /// Every subscription of the sender (replaces what the receiver knew).
    pub subs: Vec<SubInfo>,
    /// Publish this on the PUB socket once stored (the sender waits for it): a NUL, `m`, hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker: Option<String>,
}

/// `REPLY` body.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// `GROUP`: machines that got it (0 or 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Error code when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Error text when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `NACK` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Nack {
    /// The machine that is not here.
    pub to: String,
    /// The refused envelope's id.
    pub id: u64,
    /// `unknown_target` or `malformed`.
    pub code: String,
    /// Human-readable detail.
    pub message: String,
}

/// The second frame of a topic message on the PUB socket.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    /// Publisher's process instance id.
    pub process: String,
    /// Publisher's host id.
    pub host: String,
    /// Set when the publisher wants `COUNT [count, delivered]` back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Nearest subscriber location to deliver to (0 same thread .. 3 remote).
    pub near: u8,
    /// Farthest subscriber location to deliver to.
    pub far: u8,
}

/// Encodes a control map (named fields, so other languages read it by key).
pub fn to_map<T: Serialize>(v: &T) -> Result<bytes::Bytes> {
    rmp_serde::to_vec_named(v).map(Into::into).map_err(enc)
}

/// Decodes a control map; a malformed one is [`Error::Decode`].
pub fn from_map<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T> {
    rmp_serde::from_slice(b).map_err(|e| Error::Decode(e.to_string()))
}

/// Decodes an envelope frame.
pub fn decode_envelope(b: &[u8]) -> Result<Envelope> {
    Envelope::decode(b)
}

#[inline]
fn put_str(buf: &mut Vec<u8>, s: &str) -> Result<()> {
    let n = s.len();
    if n < 32 {
        buf.push(0xa0 | n as u8);
    } else if n < 0x100 {
        buf.extend_from_slice(&[0xd9, n as u8]);
    } else if n < 0x1_0000 {
        buf.push(0xda);
        buf.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        buf.push(0xdb);
        buf.extend_from_slice(&u32::try_from(n).map_err(enc)?.to_be_bytes());
    }
    buf.extend_from_slice(s.as_bytes());
    Ok(())
}

#[inline]
fn put_uint(buf: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        buf.push(v as u8);
    } else if v < 0x100 {
        buf.extend_from_slice(&[0xcc, v as u8]);
    } else if v < 0x1_0000 {
        buf.push(0xcd);
        buf.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v < 0x1_0000_0000 {
        buf.push(0xce);
        buf.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        buf.push(0xcf);
        buf.extend_from_slice(&v.to_be_bytes());
    }
}

fn put_bin(buf: &mut Vec<u8>, b: &[u8]) -> Result<()> {
    let n = b.len();
    if n < 0x100 {
        buf.extend_from_slice(&[0xc4, n as u8]);
    } else if n < 0x1_0000 {
        buf.push(0xc5);
        buf.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        buf.push(0xc6);
        buf.extend_from_slice(&u32::try_from(n).map_err(enc)?.to_be_bytes());
    }
    buf.extend_from_slice(b);
    Ok(())
}

fn variant(a: &Address) -> (&'static [u8], &str) {
    match a {
        Address::Machine(id) => (b"\x81\xa7Machine", id.as_str()),
        Address::AnyOfType(t) => (b"\x81\xa9AnyOfType", t),
        Address::AllOfType(t) => (b"\x81\xa9AllOfType", t),
        Address::Topic(t) => (b"\x81\xa5Topic", t),
        Address::Group(g) => (b"\x81\xa5Group", g),
    }
}

/// Writes the envelope map of a borrowed event, byte for byte as `Envelope::encode` would.
pub fn write_event(buf: &mut Vec<u8>, env: &OutgoingRef<'_>) -> Result<()> {
    let (v, target) = variant(env.target);
    buf.reserve(96 + env.source.as_str().len() + target.len() + env.event.len());
    buf.extend_from_slice(b"\x86\xa2id");
    put_uint(buf, env.id);
    buf.extend_from_slice(b"\xa6source");
    put_str(buf, env.source.as_str())?;
    buf.extend_from_slice(b"\xa6target");
    buf.extend_from_slice(v);
    put_str(buf, target)?;
    buf.extend_from_slice(b"\xa5event");
    put_str(buf, env.event)?;
    buf.extend_from_slice(b"\xa7payload");
    write_payload(buf, &env.payload)?;
    buf.extend_from_slice(b"\xa7headers");
    write_headers(buf, env.headers)
}

/// Writes an owned envelope (see [`write_event`]).
pub fn write_envelope(buf: &mut Vec<u8>, env: &Envelope) -> Result<()> {
    write_event(buf, &OutgoingRef::of(env))
}

fn write_payload(buf: &mut Vec<u8>, payload: &PayloadRef<'_>) -> Result<()> {
    match payload {
        PayloadRef::Encoded(b) => put_bin(buf, b)?,
        other => {
            // Encoded in place behind a bin8 header, widened afterwards when the value is bigger.
            let start = buf.len();
            buf.extend_from_slice(&[0xc4, 0]);
            other.write_msgpack(buf)?;
            let len = buf.len() - start - 2;
            if len < 0x100 {
                buf[start + 1] = len as u8;
            } else if len < 0x1_0000 {
                let h = [0xc5, (len >> 8) as u8, len as u8];
                buf.splice(start..start + 2, h);
            } else {
                let n = u32::try_from(len).map_err(enc)?.to_be_bytes();
                let h = [0xc6, n[0], n[1], n[2], n[3]];
                buf.splice(start..start + 2, h);
            }
        }
    }
    Ok(())
}

fn write_headers(buf: &mut Vec<u8>, h: &Headers) -> Result<()> {
    let n = 1
        + h.correlation_id.is_some() as u8
        + h.reply_to.is_some() as u8
        + h.is_reply as u8
        + (h.priority != 0) as u8
        + h.expires_at_us.is_some() as u8;
    buf.push(0x80 | n);
    if let Some(c) = h.correlation_id {
        buf.extend_from_slice(b"\xaecorrelation_id");
        put_uint(buf, c);
    }
    if let Some(r) = &h.reply_to {
        buf.extend_from_slice(b"\xa8reply_to");
        put_str(buf, r.as_str())?;
    }
    if h.is_reply {
        buf.extend_from_slice(b"\xa8is_reply\xc3");
    }
    buf.extend_from_slice(b"\xaasent_at_us");
    put_uint(buf, h.sent_at_us);
    if h.priority != 0 {
        buf.extend_from_slice(b"\xa8priority");
        put_uint(buf, u64::from(h.priority));
    }
    if let Some(x) = h.expires_at_us {
        buf.extend_from_slice(b"\xadexpires_at_us");
        put_uint(buf, x);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::Payload;

    #[test]
    fn envelope_encoding_is_byte_identical_to_core() {
        for (i, target) in [
            Address::Machine("b".into()),
            Address::AnyOfType("T".into()),
            Address::AllOfType("T".into()),
            Address::Topic("a.b".into()),
            Address::Group("g".into()),
        ]
        .into_iter()
        .enumerate()
        {
            let mut e = Envelope::new(
                (i as u64) << (i * 12),
                "ünï-source".into(),
                target,
                "EV".into(),
                Payload::new(vec![i as u32; [0, 40, 300, 20_000, 3][i]]),
            );
            if i % 2 == 1 {
                e.headers.correlation_id = Some(1 << 40);
                e.headers.reply_to = Some("me".into());
                e.headers.is_reply = true;
                e.headers.priority = 7;
                e.headers.expires_at_us = Some(u64::MAX);
            }
            let mut mine = Vec::new();
            write_envelope(&mut mine, &e).unwrap();
            assert_eq!(mine, e.encode().unwrap());
            let back = decode_envelope(&mine).unwrap();
            assert_eq!(back.id, e.id);
            assert_eq!(back.headers, e.headers);
        }
    }

    #[test]
    fn control_maps_round_trip_and_bad_bytes_are_errors() {
        let s = Subs {
            process: "p".into(),
            host: "h".into(),
            router: "tcp://127.0.0.1:1".into(),
            pub_ep: "tcp://127.0.0.1:2".into(),
            version: 3,
            subs: vec![SubInfo {
                sub: 1,
                pattern: Some("a.*".into()),
                group: None,
            }],
            marker: Some("\0m00ff".into()),
        };
        let b = to_map(&s).unwrap();
        let back: Subs = from_map(&b).unwrap();
        assert_eq!(back.subs, s.subs);
        assert_eq!(back.marker, s.marker);
        assert!(matches!(from_map::<Subs>(b"\xc1"), Err(Error::Decode(_))));
        assert_eq!(read_u64(&u64_frame(77)), Some(77));
        assert_eq!(read_u64(b"short"), None);
    }
}
