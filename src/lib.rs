//! Switchyard: messaging middleware for state machines.
//!
//! One API whether the peer is on the same thread, in the same process, in
//! another process or on another host: every send goes through a selector that
//! looks up where the target lives and hands the message to the best transport
//! for that distance.
//!
//! Start with [`builder`] (it wires the transports enabled by cargo features) and
//! `use switchyard::prelude::*`:
//!
//! | feature | what | reaches |
//! |---|---|---|
//! | `direct` (default) | [`direct`] transport | same thread |
//! | `memory` (default) | [`memory`] transport | same thread, same process |
//! | `ipc` (default) | [`ipc`] transport | same host, other process (bus daemon or peer-to-peer); added with [`Builder::ipc`] |
//! | `rabbitmq` | [`rabbitmq`] transport (RabbitMQ broker, at-least-once) | other hosts; added with [`Builder::rabbitmq`] |
//! | `redis` | [`redis`] registry spanning hosts, and transport (pub/sub + streams, at-least-once on streams) | other hosts; added with [`Builder::redis`] |
//! | `rabbitmq-tls`, `redis-tls` | `amqps://` and `rediss://` URLs (rustls with ring) | |
//! | `zeromq` (default) | [`zeromq`] transport (brokerless ROUTER/DEALER + PUB/SUB, no server) | other hosts (`Remote`); same host by configuration; added with [`Builder::zeromq`] |
//! | `machine` (default) | [`machine`]: XState-style JSON statecharts bound to a [`Node`] | |
//!
//! ```
//! use std::time::Duration;
//! use switchyard::prelude::*;
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> switchyard::Result<()> {
//! let session = switchyard::builder().build()?;
//! let _pong = session
//!     .machine("pong", "PongService")
//!     .handler(|node, ev| { let _ = node.post_reply(&ev, "PONG", ()); })
//!     .build()
//!     .await?;
//! let ping = session.machine("ping", "PingService").build().await?;
//! // Resolve once, then send without lookups.
//! let to_pong = ping.sender("pong").await?;
//! let reply = to_pong.message("PING", ()).request(Duration::from_secs(1)).await?;
//! assert_eq!(reply.name(), "PONG");
//! assert_eq!(reply.carried_by, Some("memory"));
//! # Ok(()) }
//! ```
//!
//! Writing a transport? Everything it implements and uses is in [`transport`].

use std::sync::Arc;

pub use switchyard_core::{
    Address, Balance, ContextId, Delayed, Envelope, EnvelopeData, Error, EventRef, FullPolicy,
    Headers, Location, MachineBuilder, MachineEntry, MachineId, MailboxConfig, Message, Name, Node,
    NodeStats, Payload, PayloadRef, Publisher, Registry, RegistryEvent, ReplyTo, Result, Route,
    Sender, Session, SubscribeOptions, SubscriptionHandle, TopicPattern, glob_matches,
};
#[cfg(feature = "direct")]
pub use switchyard_direct as direct;
#[cfg(feature = "ipc")]
pub use switchyard_ipc as ipc;
#[cfg(feature = "machine")]
pub use switchyard_machine as machine;
#[cfg(feature = "memory")]
pub use switchyard_memory as memory;
#[cfg(feature = "rabbitmq")]
pub use switchyard_rabbitmq as rabbitmq;
#[cfg(feature = "redis")]
pub use switchyard_redis as redis;
pub use switchyard_selector::{Selector, SelectorBuilder};
#[cfg(feature = "zeromq")]
pub use switchyard_zeromq as zeromq;

/// What most programs need: `use switchyard::prelude::*;`.
pub mod prelude {
    pub use crate::{Builder, builder};
    pub use switchyard_core::{
        Address, Envelope, Error, EventRef, FullPolicy, Location, MachineId, Node, Publisher,
        Result, Sender, Session, SubscribeOptions,
    };
}

/// For transport and registry authors: the traits a transport implements and the
/// types it meets (see docs/ARCHITECTURE.md).
pub mod transport {
    /// Envelope details transports need (clocks, headers).
    pub use switchyard_core::envelope;
    pub use switchyard_core::{
        Capabilities, DeliveryGuarantee, Filter, Handler, Inbox, LocalRegistry, Mailbox,
        MessageOrdering, Offer, OneEvent, Outgoing, OutgoingRef, PubSub, Reach, RoutePlan, Router,
        SessionBuilder, Subscription, SubscriptionId, Transport, TransportHealth,
    };
    pub use switchyard_core::{Link, LocalValue};
}

/// Run on the built session (a transport that needs the session's registry).
type AfterBuild = Box<dyn FnOnce(&Session) + Send>;

/// A session builder with the enabled transports wired into the selector.
pub struct Builder {
    session: switchyard_core::SessionBuilder,
    selector: SelectorBuilder,
    after_build: Vec<AfterBuild>,
}

/// Starts a [`Builder`] with every transport enabled by cargo features: the one way to build a session.
pub fn builder() -> Builder {
    #[allow(unused_mut)]
    let mut selector = Selector::builder();
    #[cfg(feature = "direct")]
    {
        selector = selector.transport(Arc::new(direct::DirectTransport::new()));
    }
    #[cfg(feature = "memory")]
    {
        selector = selector.transport(Arc::new(memory::MemoryTransport::new()));
    }
    Builder {
        session: switchyard_core::SessionBuilder::new(),
        selector,
        after_build: Vec::new(),
    }
}

impl Builder {
    /// Adjusts the session settings (strict links, registry, heartbeats, host id).
    pub fn session(
        mut self,
        f: impl FnOnce(switchyard_core::SessionBuilder) -> switchyard_core::SessionBuilder,
    ) -> Self {
        self.session = f(self.session);
        self
    }
    /// Adjusts the selector (preferences, overrides, removing or adding transports).
    pub fn selector(mut self, f: impl FnOnce(SelectorBuilder) -> SelectorBuilder) -> Self {
        self.selector = f(self.selector);
        self
    }
    /// Adds a transport after the built-in ones.
    pub fn transport(mut self, t: Arc<dyn transport::Transport>) -> Self {
        self.selector = self.selector.transport(t);
        self
    }
    /// Adds the ipc transport of `bus` and makes its daemon-backed registry the session's registry,
    /// so discovery and sends span every process of the host.
    #[cfg(feature = "ipc")]
    pub fn ipc(self, bus: &ipc::IpcBus) -> Self {
        let registry = bus.registry();
        self.transport(bus.transport())
            .session(|s| s.registry(registry))
    }
    /// Adds the RabbitMQ transport: machines on other hosts are reached through the broker
    /// (after the transports added before it for `Remote`; reorder with
    /// `selector(|s| s.prefer(Location::Remote, [...]))`), and every machine's registry
    /// entry names the namespace it consumes in, so senders elsewhere can reach it.
    /// Each session needs a transport of its own (`RabbitTransport::connect`).
    #[cfg(feature = "rabbitmq")]
    pub fn rabbitmq(self, t: &rabbitmq::RabbitTransport) -> Self {
        let ns = t.namespace().to_string();
        self.transport(Arc::new(t.clone()))
            .session(|s| s.entry_metadata(rabbitmq::META_NAMESPACE, ns))
    }
    /// Adds the Redis transport `t` (one per session) for `Remote` targets: every machine's
    /// registry entry names the namespace it reads its inbox in, so senders on other hosts
    /// can reach it. Sessions on several hosts must share a registry that spans them
    /// (`switchyard::redis::RedisRegistry`).
    #[cfg(feature = "redis")]
    pub fn redis(self, t: &redis::RedisTransport) -> Self {
        let ns = t.namespace().to_string();
        self.transport(Arc::new(t.clone()))
            .session(|s| s.entry_metadata(redis::META_NAMESPACE, ns))
    }
    /// Adds the zeromq transport `zmq` (one per session) for `Remote` targets: its ROUTER and
    /// PUB endpoints go into every machine's registry entry, and once the session is built the
    /// transport gets the session's registry to find its peer processes. Sessions on several
    /// hosts must share a registry that spans them.
    #[cfg(feature = "zeromq")]
    pub fn zeromq(mut self, zmq: &Arc<zeromq::ZmqTransport>) -> Self {
        let meta = zmq.entry_metadata();
        self.session = meta
            .into_iter()
            .fold(self.session, |s, (k, v)| s.entry_metadata(k, v));
        let t = zmq.clone();
        self.after_build.push(Box::new(move |session: &Session| {
            t.attach(
                session.registry().clone(),
                session.host_id(),
                session.process_id(),
            );
        }));
        self.transport(zmq.clone())
    }
    /// Builds the session; must run inside a tokio runtime. A selector preference naming a
    /// transport that is not configured is [`Error::Config`].
    pub fn build(self) -> Result<Session> {
        let selector = self.selector.build()?;
        let session = self.session.router(Arc::new(selector)).build()?;
        for f in self.after_build {
            f(&session);
        }
        Ok(session)
    }
}
