//! A hand-written MessagePack codec for the envelope map, byte-identical to `Envelope::encode`.
//!
//! Encoding and decoding the envelope through serde costs more than the rest
//! of an ipc send (field names are matched as UTF-8 strings, every string is
//! validated twice). This codec writes and reads the same map directly with
//! `rmp`. The decoder accepts exactly the shapes this crate and
//! docs/PROTOCOL.md produce; anything else (other integer widths, extra keys in
//! an unusual order are fine, but e.g. a payload sent as a string) falls back
//! to serde, so foreign clients keep working.

use std::sync::Arc;

use bytes::Bytes;
use rmp::Marker;
use switchyard_core::{
    Address, Envelope, Error, Headers, MachineId, OutgoingRef, Payload, PayloadRef, Result,
};

fn enc(e: impl std::fmt::Display) -> Error {
    Error::Encode(e.to_string())
}

/// Appends a MessagePack string (the shortest header, as rmp writes it).
#[inline]
pub(crate) fn put_str(buf: &mut Vec<u8>, s: &str) -> Result<()> {
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

/// Appends a MessagePack unsigned integer in its shortest form, as rmp writes it.
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

/// The target's variant written as a one-entry map with its key: `{"Machine": …}` and so on.
fn variant(a: &Address) -> (&'static [u8], &str) {
    match a {
        Address::Machine(id) => (b"\x81\xa7Machine", id.as_str()),
        Address::AnyOfType(t) => (b"\x81\xa9AnyOfType", t),
        Address::AllOfType(t) => (b"\x81\xa9AllOfType", t),
        Address::Topic(t) => (b"\x81\xa5Topic", t),
        Address::Group(g) => (b"\x81\xa5Group", g),
    }
}

/// Writes the envelope map exactly as `Envelope::encode` (rmp-serde, named fields) does.
pub fn write_envelope(buf: &mut Vec<u8>, env: &Envelope) -> Result<()> {
    write_event(buf, &OutgoingRef::of(env))
}

/// Writes the envelope map of a borrowed event, byte for byte as [`write_envelope`] would.
///
/// The keys are constants, so they are copied as ready-made MessagePack bytes.
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

/// The payload as MessagePack binary data holding its MessagePack encoding.
#[inline]
fn write_payload(buf: &mut Vec<u8>, payload: &PayloadRef<'_>) -> Result<()> {
    match payload {
        PayloadRef::Encoded(b) => put_bin(buf, b)?,
        other => {
            // Encode in place behind a bin8 header, widened afterwards when the value is bigger.
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

/// Writes `SEND` frames for a run of events, reusing the bytes consecutive events share.
///
/// In a batch the target, the source and the headers (only the send time) are
/// the same from one event to the next, and so is usually the event name: the
/// frame is three cached segments around the id and the payload. Output is byte-identical to
/// [`crate::frame::write_send`]; an event that does not fit the pattern is
/// written the general way.
#[derive(Default)]
pub(crate) struct SendEncoder {
    /// `[0x92, to, {0x86, "id"}]` for `to`.
    head: Vec<u8>,
    to: Vec<u8>,
    /// `"source" src "target" {"Machine": tgt} "event" ev "payload"` for `(src, tgt, ev)`.
    mid: Vec<u8>,
    src: Vec<u8>,
    tgt: Vec<u8>,
    ev: Vec<u8>,
    /// `"payload"`, then after the payload `"headers" {"sent_at_us": t}` for `t`.
    tail: Vec<u8>,
    sent_at: Option<u64>,
}

impl SendEncoder {
    /// Appends one `SEND` frame `[to, envelope]`, as `frame::write_send` would.
    pub(crate) fn write(
        &mut self,
        buf: &mut Vec<u8>,
        max: usize,
        to: &str,
        ev: &OutgoingRef<'_>,
    ) -> Result<()> {
        let h = ev.headers;
        let plain = h.correlation_id.is_none()
            && h.reply_to.is_none()
            && !h.is_reply
            && h.priority == 0
            && h.expires_at_us.is_none();
        let Address::Machine(tgt) = ev.target else {
            return crate::frame::write_send_event(buf, max, to, ev);
        };
        if !plain {
            return crate::frame::write_send_event(buf, max, to, ev);
        }
        if !same(&self.to, to.as_bytes()) || self.head.is_empty() {
            // Keys first: a rebuild that fails halfway must not leave a matching key behind.
            self.to.clear();
            self.head.clear();
            self.head.push(0x92);
            put_str(&mut self.head, to)?;
            self.head.extend_from_slice(b"\x86\xa2id");
            self.to.extend_from_slice(to.as_bytes());
        }
        let src = ev.source.as_str().as_bytes();
        if !same(&self.src, src)
            || !same(&self.tgt, tgt.as_str().as_bytes())
            || !same(&self.ev, ev.event.as_bytes())
            || self.mid.is_empty()
        {
            self.mid.clear();
            self.src.clear();
            self.tgt.clear();
            self.ev.clear();
            self.mid.extend_from_slice(b"\xa6source");
            put_str(&mut self.mid, ev.source.as_str())?;
            self.mid.extend_from_slice(b"\xa6target\x81\xa7Machine");
            put_str(&mut self.mid, tgt.as_str())?;
            self.mid.extend_from_slice(b"\xa5event");
            put_str(&mut self.mid, ev.event)?;
            self.mid.extend_from_slice(b"\xa7payload");
            self.src.extend_from_slice(src);
            self.tgt.extend_from_slice(tgt.as_str().as_bytes());
            self.ev.extend_from_slice(ev.event.as_bytes());
        }
        if self.sent_at != Some(h.sent_at_us) {
            self.tail.clear();
            self.tail
                .extend_from_slice(b"\xa7headers\x81\xaasent_at_us");
            put_uint(&mut self.tail, h.sent_at_us);
            self.sent_at = Some(h.sent_at_us);
        }
        let start = buf.len();
        buf.reserve(HEAD_ROOM + self.head.len() + self.mid.len() + self.tail.len());
        buf.extend_from_slice(&[0, 0, 0, 0, crate::frame::kind::SEND]);
        buf.extend_from_slice(&self.head);
        put_uint(buf, ev.id);
        buf.extend_from_slice(&self.mid);
        let at = buf.len();
        if let Err(e) = write_payload(buf, &ev.payload) {
            buf.truncate(start);
            return Err(e);
        }
        let payload = payload_len(&buf[at..]);
        buf.extend_from_slice(&self.tail);
        let len = buf.len() - start - 4;
        if len > max {
            buf.truncate(start);
            return Err(crate::frame::too_large(len, max, payload));
        }
        buf[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

/// The length of the payload inside a `bin` written by [`write_payload`].
fn payload_len(bin: &[u8]) -> usize {
    let header = match bin.first() {
        Some(0xc4) => 2,
        Some(0xc5) => 3,
        _ => 5,
    };
    bin.len().saturating_sub(header)
}

/// Room for the frame header, the id and the payload's own header.
const HEAD_ROOM: usize = 32;

/// Appends MessagePack binary data with its shortest header.
#[inline]
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

/// Reads what the fast path understands; `None` means "let serde try".
struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    #[inline]
    fn marker(&mut self) -> Option<Marker> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(Marker::from_u8(b))
    }
    #[inline]
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    #[inline]
    fn be(&mut self, n: usize) -> Option<u64> {
        let b = self.take(n)?;
        Some(match n {
            1 => u64::from(b[0]),
            2 => u64::from(u16::from_be_bytes(b.try_into().ok()?)),
            4 => u64::from(u32::from_be_bytes(b.try_into().ok()?)),
            8 => u64::from_be_bytes(b.try_into().ok()?),
            _ => b.iter().fold(0u64, |a, &b| (a << 8) | u64::from(b)),
        })
    }
    /// A string's bytes, unvalidated: keys are compared as bytes, values validated by [`Rd::str`].
    #[inline]
    fn raw_str(&mut self) -> Option<&'a [u8]> {
        // Names are short: a fixstr is one mask away, anything else takes the general path.
        if let Some((&b, rest)) = self.0.split_first()
            && b & 0xe0 == 0xa0
        {
            let n = usize::from(b & 0x1f);
            if rest.len() >= n {
                let (s, rest) = rest.split_at(n);
                self.0 = rest;
                return Some(s);
            }
            return None;
        }
        let n = match self.marker()? {
            Marker::FixStr(n) => n as usize,
            Marker::Str8 => self.be(1)? as usize,
            Marker::Str16 => self.be(2)? as usize,
            Marker::Str32 => self.be(4)? as usize,
            _ => return None,
        };
        self.take(n)
    }
    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.raw_str()?).ok()
    }
    #[inline]
    fn uint(&mut self) -> Option<u64> {
        let (&b, rest) = self.0.split_first()?;
        let (v, rest) = match (b, rest) {
            (0..=0x7f, r) => (u64::from(b), r),
            (0xcc, [x, r @ ..]) => (u64::from(*x), r),
            (0xcd, [x0, x1, r @ ..]) => (u64::from(u16::from_be_bytes([*x0, *x1])), r),
            (0xce, [x0, x1, x2, x3, r @ ..]) => {
                (u64::from(u32::from_be_bytes([*x0, *x1, *x2, *x3])), r)
            }
            (0xcf, r) => {
                let (x, r) = r.split_first_chunk::<8>()?;
                (u64::from_be_bytes(*x), r)
            }
            _ => return None,
        };
        self.0 = rest;
        Some(v)
    }
    #[inline]
    fn map(&mut self) -> Option<usize> {
        match self.marker()? {
            Marker::FixMap(n) => Some(n as usize),
            Marker::Map16 => Some(self.be(2)? as usize),
            Marker::Map32 => Some(self.be(4)? as usize),
            _ => None,
        }
    }
    #[inline]
    fn bin(&mut self) -> Option<&'a [u8]> {
        if let [0xc4, n, rest @ ..] = self.0 {
            let n = usize::from(*n);
            if rest.len() >= n {
                let (b, rest) = rest.split_at(n);
                self.0 = rest;
                return Some(b);
            }
            return None;
        }
        let n = match self.marker()? {
            Marker::Bin8 => self.be(1)? as usize,
            Marker::Bin16 => self.be(2)? as usize,
            Marker::Bin32 => self.be(4)? as usize,
            _ => return None,
        };
        self.take(n)
    }
    fn opt_str(&mut self) -> Option<Option<&'a str>> {
        if self.0.first() == Some(&0xc0) {
            self.0 = &self.0[1..];
            return Some(None);
        }
        self.str().map(Some)
    }
    fn opt_uint(&mut self) -> Option<Option<u64>> {
        if self.0.first() == Some(&0xc0) {
            self.0 = &self.0[1..];
            return Some(None);
        }
        self.uint().map(Some)
    }
}

/// The strings of the last envelope decoded on one connection, reused while they repeat.
///
/// A stream of events between the same two machines then decodes without
/// allocating or re-validating its source, target and event name: the bytes are
/// compared with the previous ones, and only a change costs a new string.
#[derive(Default)]
pub struct Interner {
    source: Option<Arc<str>>,
    target: Option<Arc<str>>,
    event: Option<Arc<str>>,
}

/// Byte equality without a `memcmp` call for the short names that make up an envelope.
///
/// Up to 16 bytes it compares two overlapping words from each side (the usual
/// trick for short keys): no call, no copy to the stack.
#[inline(always)]
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    fn w8(s: &[u8], i: usize) -> u64 {
        s.get(i..i + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
            .map_or(0, u64::from_ne_bytes)
    }
    fn w4(s: &[u8], i: usize) -> u32 {
        s.get(i..i + 4)
            .and_then(|w| <[u8; 4]>::try_from(w).ok())
            .map_or(0, u32::from_ne_bytes)
    }
    match n {
        0 => true,
        1..=3 => a.iter().zip(b).all(|(x, y)| x == y),
        4..=7 => w4(a, 0) == w4(b, 0) && w4(a, n - 4) == w4(b, n - 4),
        8..=16 => w8(a, 0) == w8(b, 0) && w8(a, n - 8) == w8(b, n - 8),
        _ => a == b,
    }
}

fn intern(slot: &mut Option<Arc<str>>, raw: &[u8]) -> Option<Arc<str>> {
    if let Some(s) = slot
        && same(s.as_bytes(), raw)
    {
        return Some(s.clone());
    }
    let s: Arc<str> = std::str::from_utf8(raw).ok()?.into();
    *slot = Some(s.clone());
    Some(s)
}

/// Like [`intern`] but lends the string instead of sharing it: no reference count touched.
fn intern_str<'n>(slot: &'n mut Option<Arc<str>>, raw: &[u8]) -> Option<&'n str> {
    let hit = matches!(slot, Some(s) if same(s.as_bytes(), raw));
    if !hit {
        *slot = Some(std::str::from_utf8(raw).ok()?.into());
    }
    slot.as_deref()
}

/// A plain event read in place from a `SEND` frame: the fields a borrowed handler sees.
pub(crate) struct View<'a> {
    /// The target machine named by the frame (valid UTF-8).
    pub(crate) to: &'a [u8],
    pub(crate) id: u64,
    pub(crate) source: &'a str,
    pub(crate) event: &'a str,
    pub(crate) payload: &'a [u8],
    pub(crate) headers: &'a Headers,
}

/// Reads `SEND` frames in place, reusing what the previous frame on the connection validated.
///
/// In a stream the bytes around the id, the event name and the payload repeat
/// from frame to frame (target, source, keys, send time). The reader keeps the
/// last frame's three such segments; a frame that repeats them is checked with
/// three comparisons instead of being parsed again. Anything that differs is
/// parsed (and cached) the long way; anything outside the exact layout
/// [`write_envelope`] produces for a plain event to a machine gives `None`, and
/// the envelope path decides whether the bytes are valid at all.
#[derive(Default)]
pub(crate) struct ViewReader {
    /// `[2-array, to, {6-map, "id"}]` and where `to` lies in it.
    head: Vec<u8>,
    to_at: std::ops::Range<usize>,
    /// `"source" src "target" {"Machine": to} "event"`, and `src` as a string.
    mid: Vec<u8>,
    source: Option<Arc<str>>,
    event: Option<Arc<str>>,
    /// `"headers" {"sent_at_us": t}` (the end of the frame) and those headers.
    tail: Vec<u8>,
    headers: Headers,
}

impl ViewReader {
    /// Reads the body of a `SEND` frame (after the kind byte) in place; `None` for anything
    /// but a plain event in this crate's layout.
    pub(crate) fn read<'a>(&'a mut self, body: &'a [u8]) -> Option<View<'a>> {
        let mut r = Rd(body);
        if self.head.is_empty() || !r.0.starts_with(&self.head) {
            r.lit(&[0x92])?;
            let to = r.raw_str()?;
            std::str::from_utf8(to).ok()?;
            let end = body.len() - r.0.len();
            r.lit(b"\x86\xa2id")?;
            self.to_at = end - to.len()..end;
            // The cached middle names the old target: parse it again against this one.
            self.mid.clear();
            self.head.clear();
            self.head.extend_from_slice(&body[..body.len() - r.0.len()]);
        } else {
            r.0 = &r.0[self.head.len()..];
        }
        let to = &body[self.to_at.clone()];
        let id = r.uint()?;
        if self.mid.is_empty() || !r.0.starts_with(&self.mid) {
            let at = r.0;
            r.lit(b"\xa6source")?;
            let source = std::str::from_utf8(r.raw_str()?).ok()?;
            r.lit(b"\xa6target\x81\xa7Machine")?;
            if !same(r.raw_str()?, to) {
                return None;
            }
            r.lit(b"\xa5event")?;
            self.source = Some(source.into());
            self.mid.clear();
            self.mid.extend_from_slice(&at[..at.len() - r.0.len()]);
        } else {
            r.0 = &r.0[self.mid.len()..];
        }
        intern_str(&mut self.event, r.raw_str()?)?;
        r.lit(b"\xa7payload")?;
        let payload = r.bin()?;
        if self.tail.is_empty() || r.0 != self.tail.as_slice() {
            let at = r.0;
            r.lit(b"\xa7headers\x81\xaasent_at_us")?;
            let sent_at = r.uint()?;
            if !r.0.is_empty() {
                return None;
            }
            self.tail.clear();
            self.tail.extend_from_slice(at);
            self.headers = Headers {
                sent_at_us: sent_at,
                ..Headers::default()
            };
        }
        let this: &'a ViewReader = self;
        Some(View {
            to,
            id,
            source: this.source.as_deref()?,
            event: this.event.as_deref()?,
            payload,
            headers: &this.headers,
        })
    }
}

impl Rd<'_> {
    /// Skips `lit` if the input starts with it.
    #[inline]
    fn lit(&mut self, lit: &[u8]) -> Option<()> {
        let rest = self.0.strip_prefix(lit)?;
        self.0 = rest;
        Some(())
    }

    fn headers(&mut self) -> Option<Headers> {
        // A plain event's headers, as write_headers writes them: only the send time.
        if self.lit(b"\x81\xaasent_at_us").is_some() {
            return Some(Headers {
                sent_at_us: self.uint()?,
                ..Headers::default()
            });
        }
        let mut headers = Headers::default();
        let mut seen = 0u8;
        for _ in 0..self.map()? {
            let key = self.raw_str()?;
            // serde refuses a repeated field: decline, so the two paths agree.
            let bit = match key {
                b"correlation_id" => 1,
                b"reply_to" => 2,
                b"is_reply" => 4,
                b"sent_at_us" => 8,
                b"priority" => 16,
                b"expires_at_us" => 32,
                _ => return None,
            };
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            match key {
                b"correlation_id" => headers.correlation_id = self.opt_uint()?,
                b"reply_to" => headers.reply_to = self.opt_str()?.map(MachineId::from),
                b"is_reply" => {
                    headers.is_reply = match self.marker()? {
                        Marker::True => true,
                        Marker::False => false,
                        _ => return None,
                    }
                }
                b"sent_at_us" => headers.sent_at_us = self.uint()?,
                b"priority" => headers.priority = u8::try_from(self.uint()?).ok()?,
                b"expires_at_us" => headers.expires_at_us = self.opt_uint()?,
                _ => return None,
            }
        }
        Some(headers)
    }
}

/// The exact layout [`write_envelope`] produces for a machine target, keys compared as
/// constants in their fixed order; anything else goes to [`fast_decode`].
fn canonical_decode(bytes: &[u8], names: &mut Interner) -> Option<Envelope> {
    let mut r = Rd(bytes);
    r.lit(b"\x86\xa2id")?;
    let id = r.uint()?;
    r.lit(b"\xa6source")?;
    let source = MachineId::new(intern(&mut names.source, r.raw_str()?)?);
    r.lit(b"\xa6target\x81\xa7Machine")?;
    let target = Address::Machine(MachineId::new(intern(&mut names.target, r.raw_str()?)?));
    r.lit(b"\xa5event")?;
    let event = intern(&mut names.event, r.raw_str()?)?;
    r.lit(b"\xa7payload")?;
    let payload = Bytes::copy_from_slice(r.bin()?);
    r.lit(b"\xa7headers")?;
    let headers = r.headers()?;
    Some(Envelope::with_headers(
        id,
        source,
        target,
        event.into(),
        Payload::Encoded(payload),
        headers,
    ))
}

fn fast_decode(bytes: &[u8], names: &mut Interner) -> Option<Envelope> {
    let mut r = Rd(bytes);
    let n = r.map()?;
    let (mut id, mut source, mut target, mut event, mut payload) = (None, None, None, None, None);
    let mut headers = None;
    for _ in 0..n {
        match r.raw_str()? {
            // serde refuses a repeated field: decline, so the two paths agree.
            b"id" if id.is_some() => return None,
            b"source" if source.is_some() => return None,
            b"target" if target.is_some() => return None,
            b"event" if event.is_some() => return None,
            b"payload" if payload.is_some() => return None,
            b"headers" if headers.is_some() => return None,
            b"id" => id = Some(r.uint()?),
            b"source" => source = Some(MachineId::new(intern(&mut names.source, r.raw_str()?)?)),
            b"target" => {
                if r.map()? != 1 {
                    return None;
                }
                let v = r.raw_str()?;
                let s = intern(&mut names.target, r.raw_str()?)?;
                target = Some(match v {
                    b"Machine" => Address::Machine(MachineId::new(s)),
                    b"AnyOfType" => Address::AnyOfType(s),
                    b"AllOfType" => Address::AllOfType(s),
                    b"Topic" => Address::Topic(s),
                    b"Group" => Address::Group(s),
                    _ => return None,
                });
            }
            b"event" => event = Some(intern(&mut names.event, r.raw_str()?)?),
            b"payload" => payload = Some(Bytes::copy_from_slice(r.bin()?)),
            b"headers" => headers = Some(r.headers()?),
            _ => return None,
        }
    }
    Some(Envelope::with_headers(
        id?,
        source?,
        target?,
        event?.into(),
        Payload::Encoded(payload?),
        // serde requires the headers map (its fields have defaults, the map does not).
        headers?,
    ))
}

/// The target and source of a `SEND` body (after the kind byte), read without decoding the
/// rest: `[to, {"id": …, "source": …` as every encoder of this crate writes it, else the
/// source found by [`check_envelope`]. `None` when it cannot be read.
#[inline]
pub(crate) fn send_pair(body: &[u8]) -> Option<(&str, &str)> {
    let mut r = Rd(body);
    r.lit(&[0x92])?;
    let to = r.raw_str()?;
    let at = r.0;
    if r.lit(b"\x86\xa2id").is_some() && r.uint().is_some() && r.lit(b"\xa6source").is_some() {
        let source = r.raw_str()?;
        return Some((
            std::str::from_utf8(to).ok()?,
            std::str::from_utf8(source).ok()?,
        ));
    }
    let to = std::str::from_utf8(to).ok()?;
    check_envelope(at).ok().map(|c| (to, c.source))
}

/// The address kind of a checked envelope's target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// `{"Machine": id}`.
    Machine,
    /// `{"AnyOfType": type}`.
    AnyOfType,
    /// `{"AllOfType": type}`.
    AllOfType,
    /// `{"Topic": topic}`.
    Topic,
    /// `{"Group": group}`.
    Group,
}

/// What a router needs from an envelope it checked with [`check_envelope`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked<'a> {
    /// The envelope id.
    pub id: u64,
    /// The sending machine.
    pub source: &'a str,
    /// The target's address kind.
    pub kind: TargetKind,
    /// The target's id, type, topic or group.
    pub target: &'a str,
}

/// Checks that `bytes` is exactly one envelope map of docs/PROTOCOL.md §2, without looking
/// inside the payload; the error says what is wrong.
///
/// The rules are a subset of what [`decode_envelope`] accepts (so whatever passes
/// decodes everywhere): a map of exactly the six keys, each once, in any order; `id` and
/// the header times unsigned integers; strings valid UTF-8; the payload a `bin`; the
/// headers only the documented keys, each once; nothing after the map. It does not
/// recurse, so nesting cannot exhaust the stack.
pub fn check_envelope(bytes: &[u8]) -> std::result::Result<Checked<'_>, &'static str> {
    let mut r = Rd(bytes);
    let n = r.map().ok_or("the envelope is not a MessagePack map")?;
    if n != 6 {
        return Err(
            "the envelope map must have exactly the keys id, source, target, event, payload and headers",
        );
    }
    let (mut id, mut source, mut target, mut event, mut payload, mut headers) =
        (None, None, None, None, false, false);
    for _ in 0..n {
        let key = r.raw_str().ok_or("an envelope key is not a string")?;
        let dup = match key {
            b"id" => id
                .replace(r.uint().ok_or("`id` is not an unsigned integer")?)
                .is_some(),
            b"source" => source
                .replace(r.str().ok_or("`source` is not a UTF-8 string")?)
                .is_some(),
            b"target" => {
                if r.map() != Some(1) {
                    return Err("`target` is not a map with one entry");
                }
                let kind = match r.raw_str().ok_or("the `target` key is not a string")? {
                    b"Machine" => TargetKind::Machine,
                    b"AnyOfType" => TargetKind::AnyOfType,
                    b"AllOfType" => TargetKind::AllOfType,
                    b"Topic" => TargetKind::Topic,
                    b"Group" => TargetKind::Group,
                    _ => {
                        return Err(
                            "unknown `target` kind (Machine, AnyOfType, AllOfType, Topic, Group)",
                        );
                    }
                };
                let name = r.str().ok_or("the `target` value is not a UTF-8 string")?;
                target.replace((kind, name)).is_some()
            }
            b"event" => event
                .replace(r.str().ok_or("`event` is not a UTF-8 string")?)
                .is_some(),
            b"payload" => {
                r.bin().ok_or("`payload` is not a MessagePack bin")?;
                std::mem::replace(&mut payload, true)
            }
            b"headers" => {
                check_headers(&mut r)?;
                std::mem::replace(&mut headers, true)
            }
            _ => {
                return Err(
                    "unknown envelope key (the six keys are id, source, target, event, payload, headers)",
                );
            }
        };
        if dup {
            return Err("an envelope key appears twice");
        }
    }
    if !r.0.is_empty() {
        return Err("bytes after the envelope map");
    }
    let (Some(id), Some(source), Some((kind, target)), Some(_), true, true) =
        (id, source, target, event, payload, headers)
    else {
        return Err("an envelope key is missing");
    };
    Ok(Checked {
        id,
        source,
        kind,
        target,
    })
}

fn check_headers(r: &mut Rd<'_>) -> std::result::Result<(), &'static str> {
    let n = r.map().ok_or("`headers` is not a map")?;
    let mut seen = 0u8;
    for _ in 0..n {
        let key = r.raw_str().ok_or("a header key is not a string")?;
        let (bit, ok) = match key {
            b"correlation_id" => (1, r.opt_uint().is_some()),
            b"reply_to" => (2, r.opt_str().is_some()),
            b"is_reply" => (4, matches!(r.marker(), Some(Marker::True | Marker::False))),
            b"sent_at_us" => (8, r.uint().is_some()),
            b"priority" => (16, r.uint().is_some_and(|p| p <= 255)),
            b"expires_at_us" => (32, r.opt_uint().is_some()),
            _ => return Err("unknown header key (see docs/PROTOCOL.md §2)"),
        };
        if !ok {
            return Err("a header value has the wrong type");
        }
        if seen & bit != 0 {
            return Err("a header key appears twice");
        }
        seen |= bit;
    }
    Ok(())
}

/// Decodes an envelope map: the fast path for this crate's own shape, serde for anything else.
pub fn decode_envelope(bytes: &[u8]) -> Result<Envelope> {
    decode_envelope_with(bytes, &mut Interner::default())
}

/// [`decode_envelope`] reusing the strings of the previous envelope on the same connection.
pub fn decode_envelope_with(bytes: &[u8], names: &mut Interner) -> Result<Envelope> {
    match canonical_decode(bytes, names).or_else(|| fast_decode(bytes, names)) {
        Some(env) => Ok(env),
        None => Envelope::decode(bytes),
    }
}

/// Checks the decoders against each other on one `SEND` body (after the kind byte), for the
/// fuzz targets and property tests: the in-place view reader (cold, and warm after `prev`),
/// the fast envelope decoders and [`check_envelope`] must each agree with serde
/// (`Envelope::decode`) or decline. `Err` describes a disagreement.
#[doc(hidden)]
pub fn check_decoders_agree(prev: &[u8], body: &[u8]) -> std::result::Result<(), String> {
    let mut b = body;
    let Ok(n) = rmp::decode::read_array_len(&mut b) else {
        return Ok(());
    };
    let Ok((to, env)) = rmp::decode::read_str_from_slice(b) else {
        return Ok(());
    };
    if n != 2 {
        return Ok(());
    }
    let serde = Envelope::decode(env);
    let same_fields = |e: &Envelope, what: &str| -> std::result::Result<(), String> {
        let Ok(s) = &serde else {
            return Err(format!(
                "{what} accepted what serde refuses: {:?}",
                serde.as_ref().err()
            ));
        };
        if (e.id, &e.source, &e.target, &e.event, &e.headers)
            != (s.id, &s.source, &s.target, &s.event, &s.headers)
            || e.payload.to_msgpack().ok() != s.payload.to_msgpack().ok()
        {
            return Err(format!("{what} read other fields than serde"));
        }
        Ok(())
    };
    if let Ok(e) = decode_envelope(env) {
        same_fields(&e, "decode_envelope")?;
    } else if serde.is_ok() {
        return Err("decode_envelope refused what serde accepts".into());
    }
    if let Some(e) = canonical_decode(env, &mut Interner::default()) {
        same_fields(&e, "canonical_decode")?;
    }
    if let Some(e) = fast_decode(env, &mut Interner::default()) {
        same_fields(&e, "fast_decode")?;
    }
    if let Ok(c) = check_envelope(env) {
        let e = serde
            .as_ref()
            .map_err(|e| format!("check_envelope passed what serde refuses: {e}"))?;
        let (kind, target) = match &e.target {
            Address::Machine(m) => (TargetKind::Machine, m.as_str()),
            Address::AnyOfType(t) => (TargetKind::AnyOfType, &**t),
            Address::AllOfType(t) => (TargetKind::AllOfType, &**t),
            Address::Topic(t) => (TargetKind::Topic, &**t),
            Address::Group(g) => (TargetKind::Group, &**g),
        };
        if (c.id, c.source, c.kind, c.target) != (e.id, e.source.as_str(), kind, target) {
            return Err("check_envelope read other fields than serde".into());
        }
    }
    let mut view = ViewReader::default();
    for warm in [false, true] {
        if warm {
            let _ = view.read(prev);
        }
        if let Some(v) = view.read(body) {
            let Ok(s) = &serde else {
                return Err(format!(
                    "the view reader (warm: {warm}) accepted what serde refuses"
                ));
            };
            let plain = Headers {
                sent_at_us: s.headers.sent_at_us,
                ..Headers::default()
            };
            if v.to != to.as_bytes()
                || (v.id, v.source, v.event, v.headers)
                    != (s.id, s.source.as_str(), &*s.event, &plain)
                || s.headers != plain
                || s.target != Address::Machine(to.into())
                || s.payload.to_msgpack().ok().as_deref() != Some(v.payload)
            {
                return Err(format!(
                    "the view reader (warm: {warm}) read other fields than serde"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Envelope> {
        let mut out = Vec::new();
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
            out.push(e);
        }
        out
    }

    #[test]
    fn encoding_is_byte_identical_to_core() {
        for e in sample() {
            let mut mine = Vec::new();
            write_envelope(&mut mine, &e).unwrap();
            assert_eq!(mine, e.encode().unwrap());
        }
    }

    #[test]
    fn batch_encoder_is_byte_identical_to_write_send() {
        // Repeats, then changes of target, source, send time and headers, in every order.
        let mut envs = Vec::new();
        for (i, (src, to, t)) in [
            ("a", "b", 1),
            ("a", "b", 1),
            ("a", "c", 1),
            ("z", "c", 1),
            ("z", "c", 2),
            ("a-much-longer-source-name-over-32", "b", 2),
        ]
        .into_iter()
        .enumerate()
        {
            let mut e = Envelope::new(
                (i as u64) << (i * 9),
                src.into(),
                Address::Machine(to.into()),
                if i % 3 == 2 { "OTHER" } else { "EV" }.into(),
                Payload::new(vec![7u8; i * 60]),
            );
            e.headers.sent_at_us = t;
            envs.push((to.to_string(), e));
        }
        for e in sample() {
            envs.push(("b".to_string(), e.clone()));
            envs.push(("b".to_string(), e));
        }
        let mut enc = SendEncoder::default();
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        for (to, e) in &envs {
            enc.write(&mut mine, usize::MAX, to, &OutgoingRef::of(e))
                .unwrap();
            crate::frame::write_send(&mut theirs, usize::MAX, to, e).unwrap();
            assert_eq!(mine, theirs);
        }
        // Over the limit: an error and nothing written.
        let before = mine.len();
        let err = enc.write(&mut mine, 10, "b", &OutgoingRef::of(&envs[0].1));
        assert!(matches!(err, Err(Error::TooLarge { .. })));
        assert_eq!(mine.len(), before);
    }

    /// The body of a `SEND` frame (after the kind byte).
    fn send_body(to: &str, e: &Envelope) -> Vec<u8> {
        let mut f = Vec::new();
        crate::frame::write_send(&mut f, usize::MAX, to, e).unwrap();
        f.split_off(crate::frame::HEADER_LEN)
    }

    #[test]
    fn views_match_serde_through_repeats_and_changes() {
        let mut rd = ViewReader::default();
        let mut n = 0u64;
        let mut ev = |src: &str, to: &str, name: &str, t: u64, data: u32| {
            n += 1;
            let mut e = Envelope::new(
                n << 20,
                src.into(),
                Address::Machine(to.into()),
                switchyard_core::Name::new(name),
                Payload::new(data),
            );
            e.headers.sent_at_us = t;
            e
        };
        let cases = [
            ("b", ev("a", "b", "X", 1, 1)),
            ("b", ev("a", "b", "X", 1, 2)),
            ("b", ev("a", "b", "Y", 1, 3)),
            ("b", ev("a2", "b", "Y", 1, 4)),
            ("b", ev("a2", "b", "Y", 9, 5)),
            ("c", ev("a2", "c", "Y", 9, 6)),
            ("b", ev("a2", "b", "Y", 9, 7)),
            (
                "b",
                ev(
                    "ünï",
                    "b",
                    "a-long-event-name-of-more-than-32-bytes",
                    1 << 40,
                    8,
                ),
            ),
        ];
        for (to, e) in &cases {
            let body = send_body(to, e);
            let v = rd.read(&body).expect("a plain event reads in place");
            let d = Envelope::decode(&body[1 + 1 + to.len()..]).unwrap();
            assert_eq!(v.to, to.as_bytes());
            assert_eq!(
                (v.id, v.source, v.event, v.headers),
                (d.id, d.source.as_str(), &*d.event, &d.headers)
            );
            let p: u32 = rmp_serde::from_slice(v.payload).unwrap();
            assert_eq!(p, d.data::<u32>().unwrap());
        }
        // A frame naming one machine with an envelope for another, right after a good one.
        let mut body = send_body("b", &cases[1].1);
        assert!(rd.read(&body).is_some());
        let at = body.len() - 1 - body.iter().rev().position(|&c| c == b'b').unwrap();
        let first_b = body.iter().position(|&c| c == b'b').unwrap();
        assert_ne!(at, first_b);
        let mut other = body.clone();
        other[first_b] = b'c';
        assert!(rd.read(&other).is_none(), "target differs from `to`");
        // Extra bytes after the headers, headers with more than the send time, a
        // non-UTF-8 source: not read in place.
        body.push(0xc0);
        assert!(rd.read(&body).is_none());
        let mut e = cases[1].1.clone();
        e.headers.priority = 3;
        assert!(rd.read(&send_body("b", &e)).is_none());
        let mut bad = send_body("b", &ev("zz", "b", "X", 1, 1));
        let z = bad.windows(2).position(|w| w == b"zz").unwrap();
        bad[z] = 0xff;
        assert!(rd.read(&bad).is_none());
        // And it still reads good frames afterwards.
        assert_eq!(
            rd.read(&send_body("b", &cases[0].1)).unwrap().id,
            cases[0].1.id
        );
    }

    #[test]
    fn fast_decoding_matches_serde() {
        for e in sample() {
            let bytes = e.encode().unwrap();
            let fast = fast_decode(&bytes, &mut Interner::default())
                .expect("the fast path takes our own shape");
            let canonical = canonical_decode(&bytes, &mut Interner::default());
            if matches!(e.target, Address::Machine(_)) {
                let c = canonical.expect("the canonical path takes a machine target");
                assert_eq!(
                    (c.id, &c.source, &c.target, &c.event, &c.headers),
                    (
                        fast.id,
                        &fast.source,
                        &fast.target,
                        &fast.event,
                        &fast.headers
                    )
                );
                assert_eq!(
                    c.payload.to_msgpack().unwrap(),
                    fast.payload.to_msgpack().unwrap()
                );
            } else {
                assert!(canonical.is_none(), "other targets take the general path");
            }
            let slow = Envelope::decode(&bytes).unwrap();
            assert_eq!(
                (
                    fast.id,
                    &fast.source,
                    &fast.target,
                    &fast.event,
                    &fast.headers
                ),
                (
                    slow.id,
                    &slow.source,
                    &slow.target,
                    &slow.event,
                    &slow.headers
                )
            );
            assert_eq!(
                fast.payload.to_msgpack().unwrap(),
                slow.payload.to_msgpack().unwrap()
            );
        }
    }

    #[test]
    fn short_equality_agrees_with_slices() {
        let words: Vec<Vec<u8>> = (0..=20)
            .flat_map(|n| {
                let base: Vec<u8> = (0..n as u8).collect();
                let mut changed = Vec::new();
                for i in 0..n {
                    let mut c = base.clone();
                    c[i] ^= 0x80;
                    changed.push(c);
                }
                std::iter::once(base).chain(changed)
            })
            .collect();
        for a in &words {
            for b in &words {
                assert_eq!(same(a, b), a == b, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn interned_strings_follow_the_bytes() {
        let mut names = Interner::default();
        let mut seen = Vec::new();
        for (src, to, ev) in [
            ("a", "b", "X"),
            ("a", "b", "X"),
            ("a", "c", "Y"),
            ("é", "b", "X"),
        ] {
            let e = Envelope::new(
                1,
                src.into(),
                Address::Machine(to.into()),
                ev.into(),
                Payload::Empty,
            );
            let d = decode_envelope_with(&e.encode().unwrap(), &mut names).unwrap();
            assert_eq!(
                (d.source.as_str(), d.target.to_string(), &*d.event),
                (src, e.target.to_string(), ev)
            );
            seen.push(d.event.clone());
        }
        // A repeated name is the same allocation, not a copy.
        assert!(std::ptr::eq(seen[0].as_ptr(), seen[1].as_ptr()));
        assert!(!std::ptr::eq(seen[1].as_ptr(), seen[2].as_ptr()));
        // Invalid UTF-8 in a name is still refused (falls back to serde, which errors).
        let e = Envelope::new(
            1,
            "zz".into(),
            Address::Machine("b".into()),
            "X".into(),
            Payload::Empty,
        );
        let mut bytes = e.encode().unwrap();
        let at = bytes.windows(2).position(|w| w == b"zz").unwrap();
        bytes[at] = 0xff;
        assert!(decode_envelope_with(&bytes, &mut names).is_err());
    }

    #[test]
    fn unusual_shapes_fall_back_and_garbage_is_an_error() {
        // A foreign client may send the payload as nil instead of bin: serde decides.
        let e = &sample()[0];
        let mut bytes = e.encode().unwrap();
        bytes.truncate(bytes.len() - 3);
        assert!(decode_envelope(&bytes).is_err());
        assert!(decode_envelope(&[0xc1, 0xc1]).is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn name() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-z]{1,3}",
                "[a-zA-Z0-9_.-]{0,40}",
                any::<String>().prop_map(|s| s.chars().take(40).collect()),
            ]
        }

        fn address() -> impl Strategy<Value = Address> {
            (0..5u8, name()).prop_map(|(k, n)| match k {
                0 => Address::Machine(n.into()),
                1 => Address::AnyOfType(n.into()),
                2 => Address::AllOfType(n.into()),
                3 => Address::Topic(n.into()),
                _ => Address::Group(n.into()),
            })
        }

        fn headers() -> impl Strategy<Value = Headers> {
            (
                proptest::option::of(any::<u64>()),
                proptest::option::of(name()),
                any::<bool>(),
                any::<u64>(),
                prop_oneof![Just(0u8), any::<u8>()],
                proptest::option::of(any::<u64>()),
            )
                .prop_map(|(c, r, is_reply, t, priority, x)| Headers {
                    correlation_id: c,
                    reply_to: r.map(MachineId::from),
                    is_reply,
                    sent_at_us: t,
                    priority,
                    expires_at_us: x,
                })
        }

        fn envelope() -> impl Strategy<Value = Envelope> {
            (
                any::<u64>(),
                name(),
                address(),
                name(),
                proptest::collection::vec(any::<u8>(), 0..400),
                prop_oneof![3 => Just(None), 1 => headers().prop_map(Some)],
            )
                .prop_map(|(id, src, target, ev, payload, h)| {
                    let mut e = Envelope::new(
                        id,
                        src.into(),
                        target,
                        ev.into(),
                        Payload::Encoded(Bytes::from(payload)),
                    );
                    if let Some(h) = h {
                        e.headers = h;
                    }
                    e
                })
        }

        proptest! {
            #[test]
            fn envelopes_round_trip_through_every_decoder(e in envelope(), prev in envelope()) {
                let mut mine = Vec::new();
                write_envelope(&mut mine, &e).unwrap();
                prop_assert_eq!(&mine, &e.encode().unwrap());
                let d = decode_envelope(&mine).unwrap();
                prop_assert_eq!(
                    (d.id, &d.source, &d.target, &d.event, &d.headers),
                    (e.id, &e.source, &e.target, &e.event, &e.headers)
                );
                prop_assert_eq!(d.payload.to_msgpack().unwrap(), e.payload.to_msgpack().unwrap());
                let c = check_envelope(&mine).unwrap();
                prop_assert_eq!((c.id, c.source), (e.id, e.source.as_str()));
                // A SEND to the envelope's own target (or to another name): the view reader
                // and the fast decoders agree with serde, cold and warm.
                let to = match &e.target { Address::Machine(m) => m.to_string(), _ => "x".into() };
                let body = send_body(&to, &e);
                let prev_body = send_body(&to, &prev);
                prop_assert_eq!(check_decoders_agree(&prev_body, &body), Ok(()));
                prop_assert_eq!(check_decoders_agree(&body, &body), Ok(()));
            }

            #[test]
            fn the_batch_encoder_writes_what_write_send_writes(es in proptest::collection::vec(envelope(), 1..12)) {
                let mut enc = SendEncoder::default();
                let (mut mine, mut theirs) = (Vec::new(), Vec::new());
                for e in &es {
                    let to = e.target.to_string();
                    enc.write(&mut mine, usize::MAX, &to, &OutgoingRef::of(e)).unwrap();
                    crate::frame::write_send(&mut theirs, usize::MAX, &to, e).unwrap();
                    prop_assert_eq!(&mine, &theirs);
                }
            }

            #[test]
            fn arbitrary_bytes_never_make_the_decoders_disagree(
                prev in proptest::collection::vec(any::<u8>(), 0..80),
                body in proptest::collection::vec(any::<u8>(), 0..200),
            ) {
                prop_assert_eq!(check_decoders_agree(&prev, &body), Ok(()));
                let mut framed = vec![0x92, 0xa1, b'b'];
                framed.extend_from_slice(&body);
                prop_assert_eq!(check_decoders_agree(&prev, &framed), Ok(()));
            }

            #[test]
            fn mutated_envelopes_never_make_the_decoders_disagree(
                e in envelope(),
                at in any::<prop::sample::Index>(),
                byte in any::<u8>(),
            ) {
                let mut body = send_body("b", &e);
                let i = at.index(body.len());
                body[i] = byte;
                prop_assert_eq!(check_decoders_agree(&[], &body), Ok(()));
            }
        }
    }
}
