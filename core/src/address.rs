//! Machine ids and the addresses a message can be sent to.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A machine's unique id; cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MachineId(Arc<str>);

impl MachineId {
    /// Wraps a string as an id.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        MachineId(id.into())
    }
    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}
impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl Borrow<str> for MachineId {
    fn borrow(&self) -> &str {
        &self.0
    }
}
impl AsRef<str> for MachineId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}
impl From<&str> for MachineId {
    fn from(s: &str) -> Self {
        MachineId(s.into())
    }
}
impl From<String> for MachineId {
    fn from(s: String) -> Self {
        MachineId(s.into())
    }
}
impl From<&String> for MachineId {
    fn from(s: &String) -> Self {
        MachineId(s.as_str().into())
    }
}
impl From<&MachineId> for MachineId {
    fn from(s: &MachineId) -> Self {
        s.clone()
    }
}

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Address {
    /// One machine by id.
    Machine(MachineId),
    /// Exactly one instance of a type, load balanced.
    AnyOfType(Arc<str>),
    /// Every instance of a type.
    AllOfType(Arc<str>),
    /// Every subscriber whose pattern matches the topic.
    Topic(Arc<str>),
    /// Exactly one member of a consumer group.
    Group(Arc<str>),
}

impl Address {
    /// The machine id, for `Address::Machine`.
    pub fn machine(&self) -> Option<&MachineId> {
        match self {
            Address::Machine(id) => Some(id),
            _ => None,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Machine(id) => write!(f, "{id}"),
            Address::AnyOfType(t) => write!(f, "any:{t}"),
            Address::AllOfType(t) => write!(f, "all:{t}"),
            Address::Topic(t) => write!(f, "topic:{t}"),
            Address::Group(g) => write!(f, "group:{g}"),
        }
    }
}
