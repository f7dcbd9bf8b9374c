//! Switchyard core: the pieces every transport and every machine share.
//!
//! - [`Envelope`], [`Address`], [`Location`], [`Name`] and [`Payload`] (any serde
//!   value, handed over as it is in process and MessagePack on the wire);
//! - the object-safe [`Transport`] trait, the per-target [`Link`] it resolves and the
//!   optional [`PubSub`] trait, with [`Capabilities`] as data;
//! - the [`Registry`] trait and the in-process [`LocalRegistry`];
//! - [`Session`] (an isolated universe) and [`Node`] (what a machine holds to talk),
//!   with declared [`Sender`]s and [`Publisher`]s for hot paths.
//!
//! Transports live in their own crates; `switchyard-selector` picks one per send by
//! location. docs/ARCHITECTURE.md shows how a send travels from a `Node` to a handler.

pub mod address;
pub mod batch;
pub mod envelope;
pub mod error;
pub mod letter;
pub mod location;
pub mod name;
pub mod node;
pub mod payload;
pub mod registry;
pub mod session;
pub mod topic;
pub mod transport;

pub use address::{Address, MachineId};
pub use batch::{OneEvent, Outgoing, OutgoingRef};
pub use envelope::{Envelope, EnvelopeData, EventRef, Headers};
pub use error::{Error, Result};
pub use letter::{Done, InlineValue, Letter, LetterData, LetterPayload, LetterPool};
pub use location::Location;
pub use name::Name;
pub use node::request::ReplyTo;
pub use node::{
    Balance, Delayed, ErrorHook, FullPolicy, Handled, Handler, Inbox, MachineBuilder, Mailbox,
    MailboxConfig, Message, Node, NodeStats, Offer, Publisher, Route, Sender, SubscribeOptions,
    SubscriptionHandle,
};
pub use payload::{LocalValue, Payload, PayloadRef};
pub use registry::{
    ChangeHook, ChangeHooks, LocalRegistry, MachineEntry, Registry, RegistryEvent, glob_matches,
};
pub use session::{ContextId, RoutePlan, Router, Session, SessionBuilder};
pub use topic::TopicPattern;
pub use transport::{
    Capabilities, DeliveryGuarantee, Filter, Link, MessageOrdering, PubSub, Reach, Subscription,
    SubscriptionId, Transport, TransportHealth,
};
