//! Describing a machine and joining a session.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};

use crate::address::MachineId;
use crate::envelope::{Envelope, EventRef};
use crate::error::{Error, Result};
use crate::node::inbox::{FullPolicy, Handler, Inbox, MailboxConfig};
use crate::node::multi::Balance;
use crate::node::{ErrorHook, Node, NodeInner};
use crate::registry::MachineEntry;
use crate::session::{ContextId, SessionInner, lock};

/// Describes a machine before it joins a session; see [`crate::Session::machine`].
pub struct MachineBuilder {
    session: Arc<SessionInner>,
    id: MachineId,
    machine_type: Arc<str>,
    context: Option<ContextId>,
    version: Option<String>,
    accepts: Vec<String>,
    metadata: BTreeMap<String, String>,
    mailbox: MailboxConfig,
    balance: Balance,
    handler: Option<Handler>,
    on_error: Option<ErrorHook>,
}

impl MachineBuilder {
    pub(crate) fn new(session: Arc<SessionInner>, id: MachineId, machine_type: Arc<str>) -> Self {
        MachineBuilder {
            session,
            id,
            machine_type,
            context: None,
            version: None,
            accepts: Vec::new(),
            metadata: BTreeMap::new(),
            mailbox: MailboxConfig::default(),
            balance: Balance::default(),
            handler: None,
            on_error: None,
        }
    }
    /// Pins the machine to a single-threaded context.
    pub fn context(mut self, ctx: ContextId) -> Self {
        self.context = Some(ctx);
        self
    }
    /// The service version.
    pub fn version(mut self, v: impl Into<String>) -> Self {
        self.version = Some(v.into());
        self
    }
    /// The events the machine accepts (informational).
    pub fn accepts<I: IntoIterator<Item = S>, S: Into<String>>(mut self, events: I) -> Self {
        self.accepts = events.into_iter().map(Into::into).collect();
        self
    }
    /// One metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
    /// Mailbox bound and full policy.
    pub fn mailbox(mut self, capacity: usize, policy: FullPolicy) -> Self {
        self.mailbox = MailboxConfig {
            capacity: capacity.max(1),
            policy,
        };
        self
    }
    /// How `send_to_any_of_type` picks an instance.
    pub fn balance(mut self, balance: Balance) -> Self {
        self.balance = balance;
        self
    }
    /// A synchronous handler.
    pub fn handler<F: Fn(&Node, Envelope) + Send + Sync + 'static>(mut self, f: F) -> Self {
        self.handler = Some(Handler::sync(f));
        self
    }
    /// A synchronous handler on borrowed events: the fastest way to receive.
    ///
    /// Where the transport reads frames (ipc) the event is handed over straight from
    /// its read buffer, and a same-thread send hands over the sender's value: no
    /// allocation, no copy of the payload. Elsewhere it borrows the envelope. Replies
    /// to [`Node::request`] still complete their request as usual. Use
    /// [`EventRef::to_envelope`] to keep an event.
    pub fn handler_ref<F: Fn(&Node, EventRef<'_>) + Send + Sync + 'static>(mut self, f: F) -> Self {
        self.handler = Some(Handler::borrowed(f));
        self
    }
    /// An async handler; it runs on the machine's mailbox task, one event at a time.
    pub fn handler_async<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Node, Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handler = Some(Handler::async_fn(f));
        self
    }
    /// A prepared handler.
    pub fn with_handler(mut self, h: Handler) -> Self {
        self.handler = Some(h);
        self
    }
    /// Called with every send failure this machine's code could not be told about by a
    /// `Result`: a [`Node::post`] that had to finish in a task, a delayed send.
    ///
    /// Such failures are also counted ([`crate::NodeStats::failed_sends`]) and logged.
    pub fn on_error<F: Fn(&Node, &Error) + Send + Sync + 'static>(mut self, f: F) -> Self {
        self.on_error = Some(Arc::new(f));
        self
    }

    /// Registers the machine and binds it to every transport of the session.
    pub async fn build(self) -> Result<Node> {
        let s = self.session;
        if s.is_closed() {
            return Err(Error::SessionClosed);
        }
        let entry = MachineEntry {
            id: self.id,
            machine_type: self.machine_type,
            host_id: s.host_id.clone(),
            process_id: s.process_id.clone(),
            context: self.context.map(|c| c.0),
            version: self.version,
            accepts: self.accepts,
            metadata: {
                let mut m = s.metadata.clone();
                m.extend(self.metadata);
                m
            },
        };
        let peers = if s.auto_link_same_type {
            s.registry.discover(&entry.machine_type).await?
        } else {
            Vec::new()
        };
        let entry = s.registry.register(entry).await?;
        let inner = Arc::new(NodeInner {
            entry,
            session: s.clone(),
            handler: self.handler,
            mailbox_cfg: self.mailbox,
            mailbox: OnceLock::new(),
            balance: self.balance,
            on_error: self.on_error,
            pending: Mutex::new(Default::default()),
            routes: Mutex::new(Default::default()),
            types: Mutex::new(Default::default()),
            subscriptions: Mutex::new(Vec::new()),
            rng: Mutex::new(fastrand::Rng::new()),
            handled: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed_sends: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        let node = Node(inner);
        for t in s.router.transports() {
            if let Err(e) = t.bind(&node.0.entry, Inbox(node.clone())).await {
                for t in s.router.transports() {
                    let _ = t.unbind(node.id()).await;
                }
                node.shut();
                let _ = s.registry.deregister(node.id()).await;
                return Err(e);
            }
        }
        for p in peers {
            s.link(node.id(), &p.id);
        }
        lock(&s.nodes).insert(node.id().clone(), Arc::downgrade(&node.0));
        Ok(node)
    }
}
