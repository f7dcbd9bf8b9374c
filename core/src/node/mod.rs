//! Nodes: what a machine holds to talk.
//!
//! The module is split by job:
//! - [`inbox`]: the receiving side (handlers, the rules every delivery keeps) and
//!   [`mailbox`], the bounded queue drained by the machine's task;
//! - [`builder`]: describing a machine and joining the session;
//! - [`route`]: resolving targets into cached routes and sending along them;
//! - [`sender`]: declared senders and the per-message builder;
//! - [`multi`]: any-of-type, all-of-type and broadcast sends;
//! - [`request`] (request/reply);
//! - [`pubsub`]: topics, groups and declared publishers.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rustc_hash::FxHashMap;
use tokio::sync::oneshot;

use crate::address::MachineId;
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::location::Location;
use crate::registry::MachineEntry;
use crate::session::{SessionInner, lock};
use crate::transport::{PubSub, SubscriptionId, Transport};

pub mod builder;
pub mod inbox;
pub mod mailbox;
pub mod multi;
pub mod pubsub;
pub mod request;
pub mod route;
pub mod sender;

pub use builder::MachineBuilder;
pub use inbox::{FullPolicy, Handled, Handler, Inbox, MailboxConfig, Offer};
pub use mailbox::Mailbox;
pub use multi::Balance;
pub use pubsub::{Publisher, SubscribeOptions, SubscriptionHandle};
pub use route::Route;
pub use sender::{Delayed, Message, Sender};

/// Counters of one machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Events given to the handler.
    pub handled: u64,
    /// Events dropped because their expiry had passed.
    pub expired: u64,
    /// Events dropped for other reasons (full mailbox policy, no handler, late reply, handler panic).
    pub dropped: u64,
    /// Sends that failed after the call that made them had returned (a `post` finished in a
    /// task, a delayed send); each is also given to the [`MachineBuilder::on_error`] hook.
    pub failed_sends: u64,
    /// Events waiting in the mailbox now (0 for a machine whose events run in the sender's
    /// call): the backlog a monitor watches, and what a test awaits to know its events arrived.
    pub queued: usize,
}

/// Called with every send failure the caller could not be told about directly.
pub type ErrorHook = Arc<dyn Fn(&Node, &Error) + Send + Sync>;

/// A subscription made by this machine, kept so closing the machine ends it.
type OwnSub = (Arc<dyn Transport>, SubscriptionId);

pub(crate) struct NodeInner {
    pub(crate) entry: MachineEntry,
    pub(crate) session: Arc<SessionInner>,
    pub(crate) handler: Option<Handler>,
    pub(crate) mailbox_cfg: MailboxConfig,
    pub(crate) mailbox: OnceLock<Arc<Mailbox>>,
    pub(crate) balance: Balance,
    pub(crate) on_error: Option<ErrorHook>,
    pub(crate) pending: Mutex<FxHashMap<u64, oneshot::Sender<Envelope>>>,
    pub(crate) routes: Mutex<route::RouteCache>,
    pub(crate) types: Mutex<FxHashMap<Arc<str>, multi::TypeCache>>,
    pub(crate) subscriptions: Mutex<Vec<OwnSub>>,
    pub(crate) rng: Mutex<fastrand::Rng>,
    pub(crate) handled: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) failed_sends: AtomicU64,
    pub(crate) closed: AtomicBool,
}

impl NodeInner {
    pub(crate) fn mailbox(&self) -> &Arc<Mailbox> {
        self.mailbox
            .get_or_init(|| Arc::new(Mailbox::new(self.mailbox_cfg)))
    }
}

/// What a machine holds to talk: cheap to clone, usable from any task.
#[derive(Clone)]
pub struct Node(pub(crate) Arc<NodeInner>);

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Node({})", self.0.entry.id)
    }
}

impl Node {
    pub(crate) fn from_inner(inner: Arc<NodeInner>) -> Node {
        Node(inner)
    }

    pub(crate) fn inbox(&self) -> Inbox {
        Inbox(self.clone())
    }

    /// Forgets cached routes and type lists (they may hold other machines alive) and stops the mailbox.
    pub(crate) fn shut(&self) {
        self.0.closed.store(true, Ordering::Release);
        lock(&self.0.routes).clear();
        lock(&self.0.types).clear();
        lock(&self.0.pending).clear();
        if let Some(mb) = self.0.mailbox.get() {
            mb.close();
        }
    }

    /// The machine's id.
    pub fn id(&self) -> &MachineId {
        &self.0.entry.id
    }
    /// The machine's type.
    pub fn machine_type(&self) -> &str {
        &self.0.entry.machine_type
    }
    /// The machine's registry entry.
    pub fn entry(&self) -> &MachineEntry {
        &self.0.entry
    }
    /// Counters.
    pub fn stats(&self) -> NodeStats {
        NodeStats {
            handled: self.0.handled.load(Ordering::Relaxed),
            expired: self.0.expired.load(Ordering::Relaxed),
            dropped: self.0.dropped.load(Ordering::Relaxed),
            failed_sends: self.0.failed_sends.load(Ordering::Relaxed),
            queued: self.0.mailbox.get().map_or(0, |m| m.len()),
        }
    }

    /// Whether the machine has left (closed, or its session shut down).
    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire) || self.0.session.is_closed()
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            return Err(Error::SessionClosed);
        }
        Ok(())
    }

    pub(crate) fn check_link(&self, to: &MachineId) -> Result<()> {
        let s = &self.0.session;
        if s.strict && to != self.id() && !s.is_linked(self.id(), to) {
            return Err(Error::NotLinked {
                from: self.id().clone(),
                to: to.clone(),
            });
        }
        Ok(())
    }

    /// Reports a send failure the caller could not be told about (counted, logged, hooked).
    pub(crate) fn report_failure(&self, what: &str, to: &dyn fmt::Display, e: &Error) {
        self.0.failed_sends.fetch_add(1, Ordering::Relaxed);
        if matches!(e, Error::SessionClosed | Error::Closed(_)) {
            tracing::debug!(from = %self.id(), to = %to, error = %e, "{what} after shutdown dropped");
        } else {
            tracing::warn!(from = %self.id(), to = %to, error = %e, "{what} failed");
        }
        if let Some(hook) = &self.0.on_error {
            hook(self, e);
        }
    }

    /// Where a machine lives relative to this one, with its registry entry.
    pub async fn locate(&self, to: &MachineId) -> Result<(MachineEntry, Location)> {
        let s = &self.0.session;
        let entry = s
            .registry
            .get(to)
            .await?
            .ok_or_else(|| Error::UnknownTarget(to.clone()))?;
        let location = s.router.locate(&self.0.entry, &entry);
        Ok((entry, location))
    }

    /// Links this machine to another in both directions (needed in strict mode).
    pub fn connect(&self, other: impl Into<MachineId>) {
        self.0.session.link(self.id(), &other.into());
    }
    /// Removes the link to another machine; returns whether there was one.
    pub fn disconnect(&self, other: impl Into<MachineId>) -> bool {
        self.0.session.unlink(self.id(), &other.into())
    }
    /// Whether this machine is linked to another.
    pub fn is_connected(&self, other: &MachineId) -> bool {
        self.0.session.is_linked(self.id(), other)
    }
    /// The machines linked to this one, sorted.
    pub fn connections(&self) -> Vec<MachineId> {
        self.0.session.linked_peers(self.id())
    }

    /// Every machine of a type (including this one if it is of that type).
    pub async fn discover(&self, machine_type: &str) -> Result<Vec<MachineEntry>> {
        self.0.session.registry.discover(machine_type).await
    }
    /// Every machine whose type matches a glob (`*`, `?`; anchored, case-insensitive).
    pub async fn discover_pattern(&self, pattern: &str) -> Result<Vec<MachineEntry>> {
        self.0.session.registry.discover_pattern(pattern).await
    }
    /// Discovers the other machines of a type and links to each; returns them.
    pub async fn discover_and_connect(&self, machine_type: &str) -> Result<Vec<MachineEntry>> {
        let found: Vec<MachineEntry> = self
            .discover(machine_type)
            .await?
            .into_iter()
            .filter(|e| &e.id != self.id())
            .collect();
        for e in &found {
            self.connect(e.id.clone());
        }
        Ok(found)
    }
    /// Records a heartbeat for this machine.
    pub async fn heartbeat(&self) -> Result<()> {
        self.0.session.registry.heartbeat(self.id()).await
    }

    /// Leaves the session: unsubscribes, unbinds from every transport, deregisters.
    ///
    /// Events still queued in its mailbox are dropped; links to it close, so senders
    /// resolve it again (and get [`Error::UnknownTarget`] once it is gone).
    pub async fn close(&self) -> Result<()> {
        if self.0.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let s = &self.0.session;
        let subs: Vec<_> = lock(&self.0.subscriptions).drain(..).collect();
        for (t, id) in subs {
            if let Some(ps) = t.pubsub() {
                let _ = ps.unsubscribe(id).await;
            }
        }
        for t in s.router.transports() {
            let _ = t.unbind(self.id()).await;
        }
        s.unlink_all(self.id());
        lock(&s.nodes).remove(self.id());
        self.shut();
        // Senders of this session learn it at once; others when the registry says it left.
        s.invalidate_routes(self.id());
        s.registry.deregister(self.id()).await
    }
}

/// The pub/sub side of a transport, or the error saying it has none.
pub(crate) fn pubsub_of(t: &Arc<dyn Transport>) -> Result<&dyn PubSub> {
    t.pubsub().ok_or(Error::NotSupported {
        transport: t.name(),
        capability: "topics",
    })
}
