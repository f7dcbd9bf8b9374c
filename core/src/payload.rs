//! Event payloads: any serde value, handed over as-is in process and MessagePack across processes.

use std::any::{Any, TypeId};
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// MessagePack encoding of `nil`, what an empty payload looks like on the wire.
const MSGPACK_NIL: &[u8] = &[0xc0];

/// A value that can travel in-process without serialization and be encoded when it must cross a process.
pub trait LocalValue: Any + Send + Sync {
    /// Upcast for downcasting to the concrete type.
    fn as_any(&self) -> &dyn Any;
    /// MessagePack (named struct fields) encoding of the value.
    fn encode(&self) -> Result<Vec<u8>>;
    /// Appends the same encoding to `buf`, for transports that write straight into their frame buffer.
    fn encode_into(&self, buf: &mut Vec<u8>) -> Result<()> {
        buf.extend_from_slice(&self.encode()?);
        Ok(())
    }
}

impl<T: Serialize + Any + Send + Sync> LocalValue for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn encode(&self) -> Result<Vec<u8>> {
        rmp_serde::to_vec_named(self).map_err(|e| Error::Encode(e.to_string()))
    }
    fn encode_into(&self, buf: &mut Vec<u8>) -> Result<()> {
        rmp_serde::encode::write_named(buf, self).map_err(|e| Error::Encode(e.to_string()))
    }
}

/// The data carried by an event.
#[derive(Clone, Default)]
pub enum Payload {
    /// No data (reads as `()` or `None`).
    #[default]
    Empty,
    /// A value in this process, shared without copying.
    Value(Arc<dyn LocalValue>),
    /// MessagePack bytes, as received from another process.
    Encoded(Bytes),
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Empty => f.write_str("Empty"),
            Payload::Value(_) => f.write_str("Value(..)"),
            Payload::Encoded(b) => write!(f, "Encoded({} bytes)", b.len()),
        }
    }
}

impl Payload {
    /// Wraps a value; `()` becomes [`Payload::Empty`], and a `Payload` is taken as it is
    /// (so a received payload can be sent on without wrapping it again).
    pub fn new<T: Serialize + Send + Sync + 'static>(value: T) -> Payload {
        if TypeId::of::<T>() == TypeId::of::<()>() {
            return Payload::Empty;
        }
        let mut slot = Some(value);
        if let Some(p) = (&mut slot as &mut dyn Any).downcast_mut::<Option<Payload>>() {
            return p.take().unwrap_or_default();
        }
        match slot {
            Some(value) => Payload::Value(Arc::new(value)),
            None => Payload::Empty,
        }
    }

    /// Wraps MessagePack bytes received from the wire.
    pub fn from_msgpack(bytes: impl Into<Bytes>) -> Payload {
        Payload::Encoded(bytes.into())
    }

    /// Whether there is no data.
    pub fn is_empty(&self) -> bool {
        matches!(self, Payload::Empty)
    }

    /// Borrows the in-process value if it is exactly a `T` (no copy, no decoding).
    pub fn get_ref<T: 'static>(&self) -> Option<&T> {
        self.view().get_ref()
    }

    /// Reads the payload as a `T`, whichever transport carried it.
    ///
    /// In process the value is cloned when it is exactly a `T`; otherwise (another
    /// type with the same shape, or bytes from another process) it goes through
    /// MessagePack, so the result is the same on every transport.
    pub fn read<T: DeserializeOwned + 'static>(&self) -> Result<T> {
        self.view().read()
    }

    /// Like [`Payload::read`] but clones an in-process `T` instead of round-tripping it.
    pub fn read_cloned<T: DeserializeOwned + Clone + 'static>(&self) -> Result<T> {
        if let Some(t) = self.get_ref::<T>() {
            return Ok(t.clone());
        }
        self.read()
    }

    /// Appends the MessagePack encoding to `buf` without an intermediate allocation.
    pub fn write_msgpack(&self, buf: &mut Vec<u8>) -> Result<()> {
        self.view().write_msgpack(buf)
    }

    /// The MessagePack encoding, for transports that cross a process.
    pub fn to_msgpack(&self) -> Result<Bytes> {
        match self {
            Payload::Empty => Ok(Bytes::from_static(MSGPACK_NIL)),
            Payload::Encoded(b) => Ok(b.clone()),
            Payload::Value(v) => Ok(Bytes::from(v.encode()?)),
        }
    }
}

/// A payload borrowed from an envelope, a frame or a batch: what borrowed handlers and encoders see.
#[derive(Clone, Copy)]
pub enum PayloadRef<'a> {
    /// No data.
    Empty,
    /// A value in this process.
    Value(&'a dyn LocalValue),
    /// MessagePack bytes, e.g. straight from a transport's read buffer.
    Encoded(&'a [u8]),
}

impl fmt::Debug for PayloadRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayloadRef::Empty => f.write_str("Empty"),
            PayloadRef::Value(_) => f.write_str("Value(..)"),
            PayloadRef::Encoded(b) => write!(f, "Encoded({} bytes)", b.len()),
        }
    }
}

impl<'a> PayloadRef<'a> {
    /// Borrows a value to be sent; `()` is [`PayloadRef::Empty`] and a `Payload` lends
    /// its own view, as with [`Payload::new`].
    pub fn of<T: Serialize + Send + Sync + 'static>(value: &'a T) -> PayloadRef<'a> {
        if TypeId::of::<T>() == TypeId::of::<()>() {
            return PayloadRef::Empty;
        }
        if let Some(p) = (value as &dyn Any).downcast_ref::<Payload>() {
            return p.view();
        }
        PayloadRef::Value(value)
    }

    /// Whether there is no data.
    pub fn is_empty(&self) -> bool {
        matches!(self, PayloadRef::Empty)
    }

    /// The MessagePack bytes when that is what is held (no encoding, no copy).
    pub fn as_msgpack(&self) -> Option<&'a [u8]> {
        match self {
            PayloadRef::Empty => Some(MSGPACK_NIL),
            PayloadRef::Encoded(b) => Some(b),
            PayloadRef::Value(_) => None,
        }
    }

    /// Borrows the in-process value if it is exactly a `T`.
    pub fn get_ref<T: 'static>(&self) -> Option<&'a T> {
        match self {
            PayloadRef::Value(v) => v.as_any().downcast_ref::<T>(),
            _ => None,
        }
    }

    /// Reads the payload as a `T`, as [`Payload::read`] does.
    pub fn read<T: DeserializeOwned + 'static>(&self) -> Result<T> {
        let decode = |bytes: &[u8]| {
            rmp_serde::from_slice::<T>(bytes).map_err(|e| Error::PayloadType {
                expected: std::any::type_name::<T>(),
                reason: e.to_string(),
            })
        };
        match self {
            PayloadRef::Empty => decode(MSGPACK_NIL),
            PayloadRef::Encoded(b) => decode(b),
            PayloadRef::Value(v) => decode(&v.encode()?),
        }
    }

    /// Appends the MessagePack encoding to `buf`.
    pub fn write_msgpack(&self, buf: &mut Vec<u8>) -> Result<()> {
        match self {
            PayloadRef::Empty => {
                buf.extend_from_slice(MSGPACK_NIL);
                Ok(())
            }
            PayloadRef::Encoded(b) => {
                buf.extend_from_slice(b);
                Ok(())
            }
            PayloadRef::Value(v) => v.encode_into(buf),
        }
    }

    /// An owned payload: bytes are copied, a borrowed value is encoded.
    pub fn to_payload(&self) -> Result<Payload> {
        Ok(match self {
            PayloadRef::Empty => Payload::Empty,
            PayloadRef::Encoded(b) => Payload::Encoded(Bytes::copy_from_slice(b)),
            PayloadRef::Value(v) => Payload::Encoded(Bytes::from(v.encode()?)),
        })
    }
}

/// A payload serializes as the value it holds, so it can travel inside other values.
impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Payload::Empty => s.serialize_unit(),
            Payload::Encoded(b) => transcode(b, s),
            Payload::Value(v) => {
                let bytes = v.encode().map_err(serde::ser::Error::custom)?;
                transcode(&bytes, s)
            }
        }
    }
}

fn transcode<S: serde::Serializer>(bytes: &[u8], s: S) -> std::result::Result<S::Ok, S::Error> {
    let v = rmpv::decode::read_value(&mut &bytes[..]).map_err(serde::ser::Error::custom)?;
    v.serialize(s)
}

impl Payload {
    /// Borrows the payload.
    pub fn view(&self) -> PayloadRef<'_> {
        match self {
            Payload::Empty => PayloadRef::Empty,
            Payload::Value(v) => PayloadRef::Value(&**v),
            Payload::Encoded(b) => PayloadRef::Encoded(b),
        }
    }
}
