//! Switchyard core: the pieces every transport and every machine share.
//!
//! - [`Envelope`], [`Address`], [`Location`] and [`Payload`] (any serde value, MessagePack on the wire);
//! - the object-safe [`Transport`] trait, with its [`Capabilities`] as data;
//! - the [`Registry`] trait and the in-process [`LocalRegistry`];
//! - [`Session`] (an isolated universe) and [`Node`] (what a machine holds to talk).
//!
//! Transports live in their own crates; `switchyard-selector` picks one per send by location.

pub mod address;
pub mod batch;
pub mod envelope;
pub mod error;
pub mod location;
pub mod node;
pub mod payload;
pub mod registry;
pub mod session;
pub mod topic;
pub mod transport;

pub use address::{Address, MachineId};
pub use batch::{Outgoing, OutgoingRef};
pub use envelope::{Envelope, EnvelopeData, EventRef, Headers};
pub use error::{Error, Result};
pub use location::Location;
pub use node::{
    Balance, Delayed, FullPolicy, Handler, Inbox, MachineBuilder, MailboxConfig, Node, NodeStats,
    SubscribeOptions, SubscriptionHandle,
};
pub use payload::{LocalValue, Payload, PayloadRef};
pub use registry::{LocalRegistry, MachineEntry, Registry, RegistryEvent, glob_matches};
pub use session::{ContextId, Route, Router, Session, SessionBuilder};
pub use topic::TopicPattern;
pub use transport::{
    Capabilities, DeliveryGuarantee, Filter, MessageOrdering, Subscription, SubscriptionId,
    TargetHandle, Transport, TransportHealth, TrySend,
};
