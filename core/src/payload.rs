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
    /// Wraps a value; `()` becomes [`Payload::Empty`].
    pub fn new<T: Serialize + Send + Sync + 'static>(value: T) -> Payload {
        if TypeId::of::<T>() == TypeId::of::<()>() {
            Payload::Empty
        } else {
            Payload::Value(Arc::new(value))
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
        match self {
            Payload::Value(v) => v.as_any().downcast_ref::<T>(),
            _ => None,
        }
    }

    /// Reads the payload as a `T`, whichever transport carried it.
    ///
    /// In process the value is cloned when it is exactly a `T`; otherwise (another
    /// type with the same shape, or bytes from another process) it goes through
    /// MessagePack, so the result is the same on every transport.
    pub fn read<T: DeserializeOwned + 'static>(&self) -> Result<T> {
        let decode = |bytes: &[u8]| {
            rmp_serde::from_slice::<T>(bytes).map_err(|e| Error::PayloadType {
                expected: std::any::type_name::<T>(),
                reason: e.to_string(),
            })
        };
        match self {
            Payload::Empty => decode(MSGPACK_NIL),
            Payload::Encoded(b) => decode(b),
            Payload::Value(v) => decode(&v.encode()?),
        }
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
        match self {
            Payload::Empty => {
                buf.extend_from_slice(MSGPACK_NIL);
                Ok(())
            }
            Payload::Encoded(b) => {
                buf.extend_from_slice(b);
                Ok(())
            }
            Payload::Value(v) => v.encode_into(buf),
        }
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
