//! The one object-safe `Transport` trait every transport crate implements, and what it can do as data.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::address::MachineId;
use crate::batch::{Outgoing, OutgoingRef};
use crate::envelope::Envelope;
use crate::error::{Error, Result};
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
    /// Topic publish/subscribe.
    pub topics: bool,
    /// Consumer groups (exactly one member receives).
    pub groups: bool,
    /// Request/reply (replies routed back by correlation id).
    pub request: bool,
    /// Whether it queues into per-machine mailboxes that honour `MailboxConfig` (bound and full policy).
    pub mailboxes: bool,
}

impl Capabilities {
    /// Whether the transport can reach `loc`.
    pub fn reaches(&self, loc: Location) -> bool {
        self.locations.contains(&loc)
    }
}

/// Outcome of [`Transport::try_send`].
pub enum TrySend {
    /// Finished without awaiting.
    Done(Result<()>),
    /// Needs the async path; here is the envelope back.
    Pending(Envelope),
    /// Failed in a way another transport may not (see [`Error::is_retryable`]); here is the envelope back.
    Retry(Error, Envelope),
}

/// A transport's pre-resolved way to reach one target (its mailbox, its connection), cached in a route.
pub type TargetHandle = Arc<dyn Any + Send + Sync>;

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

/// One way of carrying envelopes; implemented once per transport crate, used as `Arc<dyn Transport>`.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Short name, e.g. `"memory"`; shown in [`EnvelopeData::carried_by`](crate::EnvelopeData::carried_by).
    fn name(&self) -> &'static str;

    /// What it can do.
    fn capabilities(&self) -> &Capabilities;

    /// Makes a machine reachable through this transport.
    async fn bind(&self, entry: &MachineEntry, inbox: Inbox) -> Result<()>;

    /// Makes a machine unreachable through this transport.
    async fn unbind(&self, id: &MachineId) -> Result<()>;

    /// Sends without awaiting when the transport can; otherwise gives the envelope back.
    fn try_send(&self, _to: &MachineId, env: Envelope) -> TrySend {
        TrySend::Pending(env)
    }

    /// Resolves a target once so later sends skip the lookup; the handle is cached in the route
    /// until the registry changes.
    fn resolve(&self, _to: &MachineId) -> Option<TargetHandle> {
        None
    }

    /// [`Transport::try_send`] through a handle from [`Transport::resolve`].
    fn try_send_resolved(&self, _handle: &TargetHandle, to: &MachineId, env: Envelope) -> TrySend {
        self.try_send(to, env)
    }

    /// Takes a borrowed event now without an envelope if this transport can (a wire transport
    /// encodes it in place); `false` means nothing was sent and the caller builds the envelope
    /// and takes the usual paths, which also report any error. `handle` is the route's
    /// handle from [`Transport::resolve`], if any. The default declines.
    fn try_send_ref(
        &self,
        _handle: Option<&TargetHandle>,
        _to: &MachineId,
        _ev: &OutgoingRef<'_>,
    ) -> bool {
        false
    }

    /// Sends to one machine.
    async fn send(&self, to: &MachineId, env: Envelope) -> Result<()>;

    /// Sends events to one machine in order, taking them from the front of `envs`.
    ///
    /// On error the event that failed and those after it are still in `envs`,
    /// so a caller can fall back to another transport without losing or
    /// repeating any. Transports that can take a batch at once (one lock, one
    /// wake-up of their writer) override this; the default sends one by one.
    async fn send_batch(&self, to: &MachineId, envs: &mut dyn Outgoing) -> Result<()> {
        while let Some(env) = envs.pop() {
            match self.try_send(to, env) {
                TrySend::Done(r) => r?,
                TrySend::Retry(e, back) => {
                    envs.push_front(back);
                    return Err(e);
                }
                TrySend::Pending(env) => {
                    let keep = env.clone();
                    if let Err(e) = self.send(to, env).await {
                        envs.push_front(keep);
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Publishes to a topic (`Address::Topic`) or a group (`Address::Group`); returns how many inboxes got it.
    async fn publish(&self, _env: Envelope) -> Result<usize> {
        Err(Error::NotSupported {
            transport: self.name(),
            capability: "publish",
        })
    }

    /// Publishes to a topic without learning how many got it, so a stream of publishes need not
    /// wait for each count; delivery is the same as [`Transport::publish`]. The default publishes.
    async fn emit(&self, env: Envelope) -> Result<()> {
        self.publish(env).await.map(drop)
    }

    /// Adds a subscription.
    async fn subscribe(&self, _sub: Subscription) -> Result<SubscriptionId> {
        Err(Error::NotSupported {
            transport: self.name(),
            capability: "subscribe",
        })
    }

    /// Removes a subscription.
    async fn unsubscribe(&self, _id: SubscriptionId) -> Result<()> {
        Err(Error::NotSupported {
            transport: self.name(),
            capability: "subscribe",
        })
    }

    /// Health and counters.
    fn health(&self) -> TransportHealth;

    /// Stops everything the transport started; later sends fail with [`Error::Closed`].
    fn close(&self);
}
