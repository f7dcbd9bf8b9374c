//! What a transport implements: the [`Transport`] trait, the per-target [`Link`] it
//! resolves, the optional [`PubSub`] trait, and its [`Capabilities`] as data.
//!
//! A send travels `Node` → cached route → [`Link`] → the target's inbox. The
//! transport resolves a target into a link once ([`Transport::link`]); the
//! route caches it until the target leaves or the link closes, and every send
//! path (one event, a batch, a borrowed event encoded in place) goes through
//! the link. docs/ARCHITECTURE.md walks through it.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::address::MachineId;
use crate::batch::Outgoing;
use crate::envelope::Envelope;
use crate::error::Result;
use crate::location::Location;
use crate::node::Inbox;
use crate::registry::MachineEntry;
use crate::topic::TopicPattern;

/// Ordering a transport promises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageOrdering {
    /// No promise.
    Unordered,
    /// FIFO for each sender → receiver pair.
    PerSenderReceiver,
}

/// Delivery guarantee a transport promises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryGuarantee {
    /// Delivered at most once; may be lost (full mailbox with a drop policy, dead peer).
    AtMostOnce,
    /// Delivered at least once; may be duplicated after a failure.
    AtLeastOnce,
}

/// What a transport can do, as data the selector and the conformance suite read.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// Locations it can reach.
    pub locations: Vec<Location>,
    /// Ordering promise.
    pub ordering: MessageOrdering,
    /// Delivery promise.
    pub delivery: DeliveryGuarantee,
    /// Largest message it carries, in bytes of encoded envelope; `None` when nothing is encoded.
    pub max_message_size: Option<usize>,
    /// Whether payloads are serialized (crossing a process).
    pub serializes: bool,
    /// Topic publish/subscribe (the transport implements [`PubSub`]).
    pub topics: bool,
    /// Consumer groups (exactly one member receives).
    pub groups: bool,
    /// Request/reply (replies routed back by correlation id).
    pub request: bool,
    /// Whether events wait in the target's mailbox, so `MailboxConfig` (bound and full policy) applies.
    pub mailboxes: bool,
    /// Whether a higher-priority event overtakes queued lower-priority ones to the same machine.
    pub priority: bool,
}

impl Capabilities {
    /// Whether the transport can reach `loc`.
    pub fn reaches(&self, loc: Location) -> bool {
        self.locations.contains(&loc)
    }
}

/// One way of carrying envelopes; implemented once per transport crate, used as `Arc<dyn Transport>`.
///
/// A transport binds the machines of its session (so they can receive), resolves
/// targets into [`Link`]s (so others can send to them), reports its health and
/// closes. Everything on the hot path lives on the link. Transports with topics
/// also implement [`PubSub`] and return it from [`Transport::pubsub`].
#[async_trait]
pub trait Transport: Send + Sync {
    /// Short name, e.g. `"memory"`; shown in [`EnvelopeData::carried_by`](crate::EnvelopeData::carried_by).
    fn name(&self) -> &'static str;

    /// What it can do.
    fn capabilities(&self) -> &Capabilities;

    /// Makes a machine of this session reachable through this transport.
    ///
    /// Called for every machine when it is built; a transport should do as little
    /// as it can here (no task per machine) and start work on first use.
    async fn bind(&self, entry: &MachineEntry, inbox: Inbox) -> Result<()>;

    /// Makes a machine unreachable through this transport; links to it close.
    async fn unbind(&self, id: &MachineId) -> Result<()>;

    /// Resolves a target (its registry entry, with whatever endpoints it advertises) into a
    /// link that carries sends to it. Called once per route, not per send.
    ///
    /// A target this transport cannot reach is [`Error::TargetGone`](crate::Error::TargetGone)
    /// (bound nowhere it knows) or a retryable error (the transport cannot carry anything now).
    async fn link(&self, to: &MachineEntry) -> Result<Arc<dyn Link>>;

    /// Its topics and groups, if it has them.
    fn pubsub(&self) -> Option<&dyn PubSub> {
        None
    }

    /// Health and counters.
    fn health(&self) -> TransportHealth;

    /// Stops everything the transport started; later sends fail with [`Error::Closed`](crate::Error::Closed).
    fn close(&self);
}

/// A transport's resolved way to one target: its mailbox, its connection.
///
/// Every send path takes events from an [`Outgoing`]: one event or a batch, each
/// offered borrowed ([`Outgoing::front`], for a transport that encodes it in
/// place) or owned ([`Outgoing::pop`], an envelope built on demand). What a link
/// does not take stays in `out`, in order, so the route can hand it to the next
/// transport without losing or repeating anything.
///
/// Only [`Link::send`] is required; a link implementing just that is correct.
#[async_trait]
pub trait Link: Send + Sync {
    /// Takes every event from the front of `out`, in order, waiting where the target's
    /// policy says to wait.
    ///
    /// On error, the event that failed and those after it are still in `out`.
    async fn send(&self, out: &mut dyn Outgoing) -> Result<()>;

    /// Takes events from the front of `out` without waiting, in order, and stops (with
    /// `Ok`) at the first one it could only take by waiting, leaving it and the rest in
    /// `out` for [`Link::send`]. The default takes nothing.
    ///
    /// This is the path synchronous handlers (`Node::post`) and the in-process fast
    /// path use: it must not block.
    fn try_send(&self, out: &mut dyn Outgoing) -> Result<()> {
        let _ = out;
        Ok(())
    }

    /// Whether the link still reaches its target; `false` once the target left or the
    /// connection behind the link closed, so the route resolves the target again.
    fn is_open(&self) -> bool {
        true
    }
}

/// Which subscribers a publish on one transport must reach, by their location
/// relative to the publisher: the selector gives each pub/sub transport the
/// nearest-to-farthest span it covers, so that every subscriber gets each publish
/// exactly once, from the nearest transport that reaches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reach {
    /// Nearest location covered.
    pub nearest: Location,
    /// Farthest location covered.
    pub farthest: Location,
}

impl Reach {
    /// Every location.
    pub const ALL: Reach = Reach {
        nearest: Location::SameThread,
        farthest: Location::Remote,
    };

    /// The span from `nearest` to `farthest`.
    pub fn new(nearest: Location, farthest: Location) -> Reach {
        Reach { nearest, farthest }
    }

    /// Whether a subscriber at `loc` (relative to the publisher) is covered.
    pub fn covers(&self, loc: Location) -> bool {
        self.nearest <= loc && loc <= self.farthest
    }
}

/// Topics and consumer groups of a transport; see [`Transport::pubsub`].
#[async_trait]
pub trait PubSub: Send + Sync {
    /// Delivers a topic (`Address::Topic`) or group (`Address::Group`) envelope published by
    /// `from` to the matching subscribers whose location relative to `from` is within `reach`.
    ///
    /// Each machine gets a publish at most once, however many of its subscriptions
    /// match; content filters run before delivery. Returns how many machines got it.
    async fn publish(&self, from: &MachineEntry, env: Envelope, reach: Reach) -> Result<usize>;

    /// Like [`PubSub::publish`] without the count, so a transport that must ask another
    /// process for it can pipeline a stream of publishes. The default publishes.
    async fn emit(&self, from: &MachineEntry, env: Envelope, reach: Reach) -> Result<()> {
        self.publish(from, env, reach).await.map(drop)
    }

    /// Adds a subscription.
    async fn subscribe(&self, sub: Subscription) -> Result<SubscriptionId>;

    /// Removes a subscription.
    async fn unsubscribe(&self, id: SubscriptionId) -> Result<()>;
}

/// A content filter run on each published envelope before delivery.
pub type Filter = Arc<dyn Fn(&Envelope) -> bool + Send + Sync>;

/// A subscription to topics and/or a consumer group.
#[derive(Clone)]
pub struct Subscription {
    /// Topics to receive; `None` for a group-only membership.
    pub topic: Option<TopicPattern>,
    /// Consumer group: among members of one group each message reaches exactly one.
    pub group: Option<Arc<str>>,
    /// Optional content filter.
    pub filter: Option<Filter>,
    /// Where matching messages go.
    pub inbox: Inbox,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("filter", &self.filter.is_some())
            .field("inbox", &self.inbox.id())
            .finish()
    }
}

/// Identifies a subscription within one transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubscriptionId(pub u64);

/// A transport's health and counters.
#[derive(Clone, Debug, Default)]
pub struct TransportHealth {
    /// Whether it can carry messages now.
    pub healthy: bool,
    /// Human-readable detail.
    pub detail: String,
    /// Messages handed to an inbox.
    pub delivered: u64,
    /// Messages dropped (full mailbox policy, expiry, no subscriber).
    pub dropped: u64,
}
