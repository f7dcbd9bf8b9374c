//! The envelope every transport carries, and its MessagePack wire form.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::address::{Address, MachineId};
use crate::error::{Error, Result};
use crate::name::Name;
use crate::payload::{Payload, PayloadRef};

/// Microseconds since the Unix epoch, from the precise clock.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch from the coarse clock (a few milliseconds of resolution on Linux).
///
/// Stamping every envelope with the precise clock costs more than the rest of an
/// in-process send, so `sent_at_us` and expiry checks use this one.
#[cfg(target_os = "linux")]
pub fn coarse_now_micros() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_REALTIME_COARSE is a valid clock id.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    if rc != 0 {
        return now_micros();
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1_000)
}

/// Microseconds since the Unix epoch (the precise clock where no coarse one is available).
#[cfg(not(target_os = "linux"))]
pub fn coarse_now_micros() -> u64 {
    now_micros()
}

/// Metadata that travels with every event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Headers {
    /// Ties a reply to its request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<u64>,
    /// Where a reply should go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MachineId>,
    /// Set on replies so they complete the pending request instead of reaching the handler.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_reply: bool,
    /// When the sender created the event, microseconds since the Unix epoch.
    #[serde(default)]
    pub sent_at_us: u64,
    /// Higher is more urgent; transports that cannot reorder ignore it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: u8,
    /// After this instant (microseconds since the Unix epoch) the event is dropped, never delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_us: Option<u64>,
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

/// The fields of an [`Envelope`].
#[derive(Clone, Debug)]
pub struct EnvelopeData {
    /// Unique per sending session.
    pub id: u64,
    /// The sending machine.
    pub source: MachineId,
    /// Where it goes.
    pub target: Address,
    /// The event name, e.g. `"ORDER_PLACED"`.
    pub event: Name,
    /// The data.
    pub payload: Payload,
    /// Correlation, reply-to, timing, priority, expiry.
    pub headers: Headers,
    /// Name of the transport that delivered it (set on delivery).
    pub carried_by: Option<&'static str>,
}

impl EnvelopeData {
    /// The event name.
    pub fn name(&self) -> &str {
        &self.event
    }

    /// Reads the payload as a `T` (see [`Payload::read_cloned`]); a mismatch is [`Error::PayloadType`].
    pub fn data<T: DeserializeOwned + Clone + 'static>(&self) -> Result<T> {
        self.payload.read_cloned()
    }

    /// Whether the expiry has passed at `now_us`.
    pub fn is_expired_at(&self, now_us: u64) -> bool {
        self.headers.expires_at_us.is_some_and(|t| now_us > t)
    }
}

/// One event on its way from a source machine to an address.
///
/// Shared behind one `Arc`: handing it from sender to transport to handler
/// moves one pointer, and a publish to many subscribers shares one envelope
/// instead of copying it. Read its fields directly (`env.headers`,
/// `env.source`) through `Deref`; writing through `DerefMut` copies the fields
/// first if another holder shares them.
#[derive(Clone, Debug)]
pub struct Envelope(Arc<EnvelopeData>);

impl std::ops::Deref for Envelope {
    type Target = EnvelopeData;
    fn deref(&self) -> &EnvelopeData {
        &self.0
    }
}

impl std::ops::DerefMut for Envelope {
    fn deref_mut(&mut self) -> &mut EnvelopeData {
        Arc::make_mut(&mut self.0)
    }
}

impl From<EnvelopeData> for Envelope {
    fn from(d: EnvelopeData) -> Envelope {
        Envelope(Arc::new(d))
    }
}

impl Envelope {
    /// A new envelope stamped with the current (coarse) time.
    pub fn new(
        id: u64,
        source: MachineId,
        target: Address,
        event: Name,
        payload: Payload,
    ) -> Envelope {
        Envelope(Arc::new(EnvelopeData {
            id,
            source,
            target,
            event,
            payload,
            headers: Headers {
                sent_at_us: coarse_now_micros(),
                ..Headers::default()
            },
            carried_by: None,
        }))
    }

    /// An envelope with all its headers given, as a decoder rebuilds it (no clock read).
    pub fn with_headers(
        id: u64,
        source: MachineId,
        target: Address,
        event: Name,
        payload: Payload,
        headers: Headers,
    ) -> Envelope {
        Envelope(Arc::new(EnvelopeData {
            id,
            source,
            target,
            event,
            payload,
            headers,
            carried_by: None,
        }))
    }

    /// The fields (copied if another holder shares them).
    pub fn into_data(self) -> EnvelopeData {
        Arc::try_unwrap(self.0).unwrap_or_else(|shared| (*shared).clone())
    }

    /// Whether no other holder shares this envelope (writing to it then copies nothing).
    pub fn is_unique(&mut self) -> bool {
        Arc::get_mut(&mut self.0).is_some()
    }

    /// Sets an expiry `ttl` from now.
    pub fn with_ttl(mut self, ttl: Duration) -> Envelope {
        self.headers.expires_at_us =
            Some(coarse_now_micros().saturating_add(ttl.as_micros() as u64));
        self
    }

    /// Encodes the envelope as one MessagePack map (see docs/PROTOCOL.md).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let wire = WireEnvelope {
            id: self.id,
            source: self.source.clone(),
            target: self.target.clone(),
            event: self.event.clone(),
            payload: self.payload.to_msgpack()?,
            headers: self.headers.clone(),
        };
        rmp_serde::to_vec_named(&wire).map_err(|e| Error::Encode(e.to_string()))
    }

    /// Decodes an envelope produced by [`Envelope::encode`]; malformed bytes give [`Error::Decode`].
    pub fn decode(bytes: &[u8]) -> Result<Envelope> {
        let wire: WireEnvelope =
            rmp_serde::from_slice(bytes).map_err(|e| Error::Decode(e.to_string()))?;
        Ok(Envelope::from(EnvelopeData {
            id: wire.id,
            source: wire.source,
            target: wire.target,
            event: wire.event,
            payload: Payload::Encoded(wire.payload),
            headers: wire.headers,
            carried_by: None,
        }))
    }
}

#[derive(Serialize, Deserialize)]
struct WireEnvelope {
    id: u64,
    source: MachineId,
    target: Address,
    event: Name,
    #[serde(with = "bytes_as_bin")]
    payload: Bytes,
    headers: Headers,
}

mod bytes_as_bin {
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let v: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
        Ok(Bytes::from(v.into_vec()))
    }
}

/// A received event borrowed from where it arrived: what a borrowed handler
/// ([`crate::MachineBuilder::handler_ref`]) sees.
///
/// A transport that reads frames (ipc) hands these out straight from its read
/// buffer: no allocation, no copy of the payload. Every other delivery borrows
/// the [`Envelope`] it has. Call [`EventRef::to_envelope`] to keep one.
#[derive(Clone, Copy, Debug)]
pub struct EventRef<'a> {
    /// Unique per sending session.
    pub id: u64,
    /// The sending machine.
    pub source: &'a str,
    /// The event name.
    pub event: &'a str,
    /// The data.
    pub payload: PayloadRef<'a>,
    /// Correlation, reply-to, timing, priority, expiry.
    pub headers: &'a Headers,
    /// Name of the transport that delivered it.
    pub carried_by: Option<&'static str>,
}

impl<'a> EventRef<'a> {
    /// Borrows an envelope.
    pub fn of(env: &'a Envelope) -> EventRef<'a> {
        EventRef {
            id: env.id,
            source: env.source.as_str(),
            event: &env.event,
            payload: env.payload.view(),
            headers: &env.headers,
            carried_by: env.carried_by,
        }
    }

    /// The event name.
    pub fn name(&self) -> &'a str {
        self.event
    }

    /// Reads the payload as a `T`, whichever transport carried it.
    pub fn data<T: DeserializeOwned + Clone + 'static>(&self) -> Result<T> {
        match self.payload.get_ref::<T>() {
            Some(t) => Ok(t.clone()),
            None => self.payload.read(),
        }
    }

    /// An owned envelope addressed to `target` (the payload's bytes are copied).
    pub fn to_envelope(&self, target: Address) -> Result<Envelope> {
        let mut env = Envelope::with_headers(
            self.id,
            self.source.into(),
            target,
            Name::new(self.event),
            self.payload.to_payload()?,
            self.headers.clone(),
        );
        env.carried_by = self.carried_by;
        Ok(env)
    }
}
