//! Nodes (what a machine holds to talk), their inboxes and handlers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::address::{Address, MachineId};
use crate::batch::{OutgoingRef, ValueBatch};
use crate::envelope::{Envelope, EventRef, coarse_now_micros};
use crate::error::{Error, Result};
use crate::location::Location;
use crate::payload::{Payload, PayloadRef};
use crate::registry::MachineEntry;
use crate::session::{ContextId, Route, SessionInner, lock};
use crate::topic::{TopicPattern, validate_topic};
use crate::transport::{Filter, Subscription, SubscriptionId, Transport};

/// What a full mailbox does with one more message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FullPolicy {
    /// The sender waits until there is room (backpressure).
    #[default]
    Wait,
    /// The new message is dropped (and counted).
    DropNewest,
    /// The oldest queued message is dropped (and counted) to make room.
    DropOldest,
    /// The send fails with [`Error::MailboxFull`].
    Fail,
}

/// A machine's mailbox bound and policy, used by queueing transports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MailboxConfig {
    /// Most messages queued at once.
    pub capacity: usize,
    /// What happens when it is full.
    pub policy: FullPolicy,
}

impl Default for MailboxConfig {
    fn default() -> Self {
        MailboxConfig {
            capacity: 1024,
            policy: FullPolicy::Wait,
        }
    }
}

/// How `send_to_any_of_type` picks an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Balance {
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// A random instance each time.
    Random,
}

type SyncFn = dyn Fn(&Node, Envelope) + Send + Sync;
type RefFn = dyn Fn(&Node, EventRef<'_>) + Send + Sync;
type AsyncFn = dyn Fn(Node, Envelope) -> BoxFuture<'static, ()> + Send + Sync;

/// A machine's event handler: synchronous (runs inline where the transport allows) or async.
#[derive(Clone)]
pub enum Handler {
    /// Runs to completion without awaiting; send from it with [`Node::post`].
    Sync(Arc<SyncFn>),
    /// May await; sends with [`Node::send`].
    Async(Arc<AsyncFn>),
    /// Runs to completion on an event borrowed from where it arrived (no copy where the
    /// transport can avoid one); see [`MachineBuilder::handler_ref`].
    Ref(Arc<RefFn>),
}

/// Counters of one machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Events given to the handler.
    pub handled: u64,
    /// Events dropped because their expiry had passed.
    pub expired: u64,
    /// Events dropped for other reasons (no handler, late reply, handler panic).
    pub dropped: u64,
}

pub(crate) struct NodeInner {
    entry: MachineEntry,
    session: Arc<SessionInner>,
    handler: Option<Handler>,
    mailbox: MailboxConfig,
    balance: Balance,
    pending: Mutex<HashMap<u64, oneshot::Sender<Envelope>>>,
    routes: Mutex<RouteCache>,
    types: Mutex<HashMap<Arc<str>, TypeCache>>,
    subscriptions: Mutex<Vec<(Arc<dyn Transport>, SubscriptionId)>>,
    rng: Mutex<fastrand::Rng>,
    handled: AtomicU64,
    expired: AtomicU64,
    dropped: AtomicU64,
    closed: AtomicBool,
}

/// Routes resolved for the registry generation they were made in; a new generation empties it.
#[derive(Default)]
struct RouteCache {
    generation: u64,
    map: rustc_hash::FxHashMap<MachineId, Arc<Route>>,
    /// The last route looked up: a stream of sends to one machine skips the hashing.
    last: Option<(MachineId, Arc<Route>)>,
}

impl RouteCache {
    fn current(&mut self, generation: u64) -> &mut rustc_hash::FxHashMap<MachineId, Arc<Route>> {
        if self.generation != generation {
            // Every entry is stale; dropping them also releases handles to machines that left.
            self.map.clear();
            self.last = None;
            self.generation = generation;
        }
        &mut self.map
    }
}

struct TypeCache {
    generation: u64,
    name: Arc<str>,
    peers: Arc<[MachineId]>,
    next: usize,
}

/// The receiving side of a machine, handed to transports by [`Transport::bind`].
#[derive(Clone)]
pub struct Inbox(Node);

impl fmt::Debug for Inbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Inbox({})", self.0.0.entry.id)
    }
}

impl Inbox {
    /// The machine's id.
    pub fn id(&self) -> &MachineId {
        &self.0.0.entry.id
    }
    /// The machine's registry entry.
    pub fn entry(&self) -> &MachineEntry {
        &self.0.0.entry
    }
    /// The machine's mailbox bound and policy.
    pub fn mailbox(&self) -> MailboxConfig {
        self.0.0.mailbox
    }
    /// Whether the handler is synchronous, so [`Inbox::deliver_sync`] can run it inline.
    pub fn is_sync(&self) -> bool {
        !matches!(self.0.0.handler, Some(Handler::Async(_)))
    }
    /// Counts a message the transport dropped for this machine (e.g. full mailbox).
    pub fn count_dropped(&self) {
        self.0.0.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the handler takes borrowed events, so a transport may call [`Inbox::deliver_ref`].
    pub fn takes_refs(&self) -> bool {
        matches!(self.0.0.handler, Some(Handler::Ref(_)))
    }

    /// Runs a borrowed handler on `ev` without building an envelope; `false` (nothing done)
    /// when the handler is of another kind or `ev` is a reply or has an expiry, which need
    /// the envelope path ([`Inbox::deliver_sync`]).
    pub fn deliver_ref(&self, ev: EventRef<'_>) -> bool {
        match &self.0.0.handler {
            Some(Handler::Ref(h)) if !ev.headers.is_reply && ev.headers.expires_at_us.is_none() => {
                run_ref(&self.0, h, ev);
                true
            }
            _ => false,
        }
    }

    /// Delivers without awaiting if the handler is synchronous; otherwise gives the envelope back.
    pub fn deliver_sync(&self, env: Envelope) -> std::result::Result<(), Envelope> {
        match &self.0.0.handler {
            Some(Handler::Async(_)) => Err(env),
            Some(Handler::Sync(h)) => {
                if let Some(env) = self.0.0.accept(env) {
                    run_sync(&self.0, h, env);
                }
                Ok(())
            }
            Some(Handler::Ref(h)) => {
                if let Some(env) = self.0.0.accept(env) {
                    run_ref(&self.0, h, EventRef::of(&env));
                }
                Ok(())
            }
            None => {
                if self.0.0.accept(env).is_some() {
                    self.count_dropped();
                }
                Ok(())
            }
        }
    }

    /// Delivers, awaiting an async handler.
    pub async fn deliver(&self, env: Envelope) {
        let Some(env) = self.0.0.accept(env) else {
            return;
        };
        match &self.0.0.handler {
            Some(Handler::Sync(h)) => run_sync(&self.0, h, env),
            Some(Handler::Ref(h)) => run_ref(&self.0, h, EventRef::of(&env)),
            Some(Handler::Async(h)) => {
                let fut = h(self.0.clone(), env);
                if AssertUnwindSafe(fut).catch_unwind().await.is_err() {
                    self.0.0.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(machine = %self.0.0.entry.id, "event handler panicked; the machine keeps running");
                } else {
                    self.0.0.handled.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => self.count_dropped(),
        }
    }
}

impl NodeInner {
    /// Drops expired events and routes replies to their pending request; returns what the handler should see.
    fn accept(&self, env: Envelope) -> Option<Envelope> {
        if env.headers.expires_at_us.is_some() && env.is_expired_at(coarse_now_micros()) {
            self.expired.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(machine = %self.entry.id, event = %env.event, "dropped expired event");
            return None;
        }
        if env.headers.is_reply {
            let waiter = env
                .headers
                .correlation_id
                .and_then(|c| lock(&self.pending).remove(&c));
            match waiter {
                Some(tx) => {
                    let _ = tx.send(env);
                }
                None => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            return None;
        }
        Some(env)
    }
}

fn run_sync(node: &Node, h: &Arc<SyncFn>, env: Envelope) {
    handled(
        node,
        std::panic::catch_unwind(AssertUnwindSafe(|| h(node, env))).is_ok(),
    );
}

fn run_ref(node: &Node, h: &Arc<RefFn>, ev: EventRef<'_>) {
    handled(
        node,
        std::panic::catch_unwind(AssertUnwindSafe(|| h(node, ev))).is_ok(),
    );
}

fn handled(node: &Node, ok: bool) {
    if ok {
        node.0.handled.fetch_add(1, Ordering::Relaxed);
    } else {
        node.0.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::error!(machine = %node.0.entry.id, "event handler panicked; the machine keeps running");
    }
}

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
    /// Mailbox bound and full policy for queueing transports.
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
        self.handler = Some(Handler::Sync(Arc::new(f)));
        self
    }
    /// A synchronous handler on borrowed events: the fastest way to receive.
    ///
    /// Where the transport reads frames (ipc) the event is handed over straight from
    /// its read buffer, with no allocation and no copy of the payload; elsewhere it
    /// borrows the envelope. Replies to [`Node::request`] still complete their
    /// request as usual. Use [`EventRef::to_envelope`] to keep an event.
    pub fn handler_ref<F: Fn(&Node, EventRef<'_>) + Send + Sync + 'static>(mut self, f: F) -> Self {
        self.handler = Some(Handler::Ref(Arc::new(f)));
        self
    }
    /// An async handler.
    pub fn handler_async<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Node, Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handler = Some(Handler::Async(Arc::new(move |n, e| Box::pin(f(n, e)))));
        self
    }
    /// A prepared handler.
    pub fn with_handler(mut self, h: Handler) -> Self {
        self.handler = Some(h);
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
            metadata: self.metadata,
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
            mailbox: self.mailbox,
            balance: self.balance,
            pending: Mutex::new(HashMap::new()),
            routes: Mutex::new(RouteCache::default()),
            types: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(Vec::new()),
            rng: Mutex::new(fastrand::Rng::new()),
            handled: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        for t in s.router.transports() {
            if let Err(e) = t.bind(&inner.entry, Inbox(Node(inner.clone()))).await {
                for t in s.router.transports() {
                    let _ = t.unbind(&inner.entry.id).await;
                }
                let _ = s.registry.deregister(&inner.entry.id).await;
                return Err(e);
            }
        }
        for p in peers {
            s.link(&inner.entry.id, &p.id);
        }
        lock(&s.nodes).insert(inner.entry.id.clone(), Arc::downgrade(&inner));
        Ok(Node(inner))
    }
}

/// Options for [`Node::subscribe_with`].
#[derive(Clone, Default)]
pub struct SubscribeOptions {
    /// Consumer group: each message reaches one member of the group.
    pub group: Option<Arc<str>>,
    /// Content filter run before delivery.
    pub filter: Option<Filter>,
}

/// A live subscription; [`SubscriptionHandle::unsubscribe`] ends it (closing the machine does too).
pub struct SubscriptionHandle {
    node: Node,
    ids: Vec<(Arc<dyn Transport>, SubscriptionId)>,
}

impl SubscriptionHandle {
    /// Ends the subscription on every transport.
    pub async fn unsubscribe(self) -> Result<()> {
        {
            let mut subs = lock(&self.node.0.subscriptions);
            subs.retain(|(t, id)| {
                !self
                    .ids
                    .iter()
                    .any(|(t2, id2)| Arc::ptr_eq(t, t2) && id == id2)
            });
        }
        for (t, id) in self.ids {
            t.unsubscribe(id).await?;
        }
        Ok(())
    }
}

/// A delayed send in flight; [`Delayed::cancel`] stops it.
pub struct Delayed(tokio::task::AbortHandle);

impl Delayed {
    /// Cancels the send if it has not happened yet.
    pub fn cancel(&self) {
        self.0.abort();
    }
}

/// What a machine holds to talk: cheap to clone, usable from any task.
#[derive(Clone)]
pub struct Node(Arc<NodeInner>);

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Node({})", self.0.entry.id)
    }
}

impl Node {
    pub(crate) fn from_inner(inner: Arc<NodeInner>) -> Node {
        Node(inner)
    }

    /// Forgets cached routes and type lists (they may hold other machines alive).
    pub(crate) fn forget_routes(&self) {
        {
            let mut routes = lock(&self.0.routes);
            routes.map.clear();
            routes.last = None;
        }
        lock(&self.0.types).clear();
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
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.0.closed.load(Ordering::Acquire) || self.0.session.is_closed() {
            return Err(Error::SessionClosed);
        }
        Ok(())
    }

    /// A new envelope from this machine.
    pub fn envelope<P: Serialize + Send + Sync + 'static>(
        &self,
        to: Address,
        event: impl Into<Arc<str>>,
        payload: P,
    ) -> Envelope {
        Envelope::new(
            self.0.session.next_id(),
            self.0.entry.id.clone(),
            to,
            event.into(),
            Payload::new(payload),
        )
    }

    fn check_link(&self, to: &MachineId) -> Result<()> {
        let s = &self.0.session;
        if s.strict && to != self.id() && !s.is_linked(self.id(), to) {
            return Err(Error::NotLinked {
                from: self.id().clone(),
                to: to.clone(),
            });
        }
        Ok(())
    }

    fn cached_route(&self, to: &MachineId) -> Option<Arc<Route>> {
        let generation = self.0.session.registry.generation();
        let mut cache = lock(&self.0.routes);
        cache.current(generation);
        if let Some((id, route)) = &cache.last
            && id == to
        {
            return Some(route.clone());
        }
        let route = cache.map.get(to).cloned()?;
        cache.last = Some((to.clone(), route.clone()));
        Some(route)
    }

    /// The route to a machine (location and transports), cached until the registry changes.
    pub async fn route_to(&self, to: &MachineId) -> Result<Arc<Route>> {
        if let Some(r) = self.cached_route(to) {
            return Ok(r);
        }
        let s = &self.0.session;
        let generation = s.registry.generation();
        let entry = s
            .registry
            .get(to)
            .await?
            .ok_or_else(|| Error::UnknownTarget(to.clone()))?;
        let route = Arc::new(s.router.route(&self.0.entry, &entry)?.resolved(to));
        let mut cache = lock(&self.0.routes);
        let routes = cache.current(generation);
        if routes.len() >= 4096 {
            routes.clear();
        }
        routes.insert(to.clone(), route.clone());
        Ok(route)
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

    /// Sends an event to one machine.
    pub async fn send<P: Serialize + Send + Sync + 'static>(
        &self,
        to: impl Into<MachineId>,
        event: impl AsRef<str> + Into<Arc<str>>,
        payload: P,
    ) -> Result<()> {
        let to = to.into();
        let env = match self.try_send_value(&to, event, payload) {
            Ok(r) => return r,
            Err(env) => env,
        };
        let route = self.route_to(&to).await?;
        route.send(&to, env).await.map(|_| ())
    }

    /// [`Node::try_send_now`] for a value: when the route is cached and its first transport
    /// takes a borrowed event at once (ipc encodes it in place) no envelope is built at all.
    /// `Err` gives the envelope back for the async path.
    fn try_send_value<P: Serialize + Send + Sync + 'static>(
        &self,
        to: &MachineId,
        event: impl AsRef<str> + Into<Arc<str>>,
        payload: P,
    ) -> std::result::Result<Result<()>, Envelope> {
        if let Err(e) = self.check_open().and_then(|()| self.check_link(to)) {
            return Ok(Err(e));
        }
        let id = self.0.session.next_id();
        let headers = crate::envelope::Headers {
            sent_at_us: coarse_now_micros(),
            ..Default::default()
        };
        let route = self.cached_route(to);
        if let Some(route) = &route
            && let Some(target) = route.target()
        {
            let ev = OutgoingRef {
                id,
                source: self.id(),
                target,
                event: event.as_ref(),
                payload: PayloadRef::of(&payload),
                headers: &headers,
            };
            if route.try_send_ref(to, &ev) {
                return Ok(Ok(()));
            }
        }
        let env = Envelope::with_headers(
            id,
            self.id().clone(),
            Address::Machine(to.clone()),
            event.into(),
            Payload::new(payload),
            headers,
        );
        match route {
            Some(route) => route.try_send(to, env).map(|r| r.map(drop)),
            None => Err(env),
        }
    }

    /// Sends several events to one machine, in order, as one batch where the transport can.
    ///
    /// The route is looked up once and a transport that supports batches takes
    /// them in one go (ipc encodes them under one lock and wakes its writer once),
    /// which is what a producer of many small events wants. Delivery and ordering
    /// are those of the same events sent one by one with [`Node::send`]. On error
    /// the events before the failing one have been sent and the rest have not;
    /// the returned count says how many were sent when it succeeds.
    pub async fn send_batch<E, P, I>(&self, to: impl Into<MachineId>, events: I) -> Result<usize>
    where
        E: AsRef<str> + Into<Arc<str>> + Send,
        P: Serialize + Send + Sync + 'static,
        I: IntoIterator<Item = (E, P)>,
    {
        let to = to.into();
        self.check_open()?;
        self.check_link(&to)?;
        let items: VecDeque<(E, P)> = events.into_iter().collect();
        let n = items.len();
        if n == 0 {
            return Ok(0);
        }
        let route = self.route_to(&to).await?;
        let mut batch = ValueBatch::new(
            self.id().clone(),
            Address::Machine(to.clone()),
            coarse_now_micros(),
            self.0.session.next_ids(n as u64),
            items,
        );
        route.send_batch(&to, &mut batch).await?;
        Ok(n)
    }

    /// Sends a prepared envelope to one machine; returns the name of the transport that took it.
    pub async fn send_envelope(&self, to: &MachineId, env: Envelope) -> Result<&'static str> {
        // The common case (cached route, transport takes it at once) never builds the async state below.
        let env = match self.try_send_now(to, env) {
            Ok(r) => return r,
            Err(env) => env,
        };
        let route = self.route_to(to).await?;
        route.send(to, env).await
    }

    /// Sends without awaiting when the route is cached and its transport can take the envelope now.
    fn try_send_now(
        &self,
        to: &MachineId,
        env: Envelope,
    ) -> std::result::Result<Result<&'static str>, Envelope> {
        if let Err(e) = self.check_open().and_then(|()| self.check_link(to)) {
            return Ok(Err(e));
        }
        match self.cached_route(to) {
            Some(route) => route.try_send(to, env),
            None => Err(env),
        }
    }

    /// Sends without awaiting, for synchronous handlers.
    ///
    /// When the route is cached and its first transport takes the message at once
    /// (direct, memory with room) this returns that result. Otherwise the send
    /// finishes in a spawned task and a failure is logged with tracing, so such
    /// a message may overtake or be overtaken by later posts.
    pub fn post<P: Serialize + Send + Sync + 'static>(
        &self,
        to: impl Into<MachineId>,
        event: impl AsRef<str> + Into<Arc<str>>,
        payload: P,
    ) -> Result<()> {
        let to = to.into();
        let env = match self.try_send_value(&to, event, payload) {
            Ok(r) => return r,
            Err(env) => env,
        };
        self.post_later(to, env);
        Ok(())
    }

    /// [`Node::post`] for a prepared envelope.
    pub fn post_envelope(&self, to: MachineId, env: Envelope) -> Result<()> {
        let env = match self.try_send_now(&to, env) {
            Ok(r) => return r.map(|_| ()),
            Err(env) => env,
        };
        self.post_later(to, env);
        Ok(())
    }

    /// Finishes a post in a spawned task, logging a failure.
    fn post_later(&self, to: MachineId, env: Envelope) {
        let node = self.clone();
        tokio::spawn(async move {
            if let Err(e) = node.send_envelope(&to, env).await {
                tracing::warn!(from = %node.id(), to = %to, error = %e, "posted send failed");
            }
        });
    }

    /// Sends an event to this machine itself.
    pub async fn send_self<P: Serialize + Send + Sync + 'static>(
        &self,
        event: impl Into<Arc<str>>,
        payload: P,
    ) -> Result<()> {
        self.send(self.id().clone(), event.into(), payload).await
    }

    /// Sends after `delay`; fails now if the target is unknown. Cancelled when the session shuts down.
    pub async fn send_delayed<P: Serialize + Send + Sync + 'static>(
        &self,
        to: impl Into<MachineId>,
        event: impl Into<Arc<str>>,
        payload: P,
        delay: Duration,
    ) -> Result<Delayed> {
        let to = to.into();
        self.check_open()?;
        self.check_link(&to)?;
        self.route_to(&to).await?;
        let env = self.envelope(Address::Machine(to.clone()), event, payload);
        let node = self.clone();
        let mut shutdown = self.0.session.shutdown.subscribe();
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {
                    if let Err(e) = node.send_envelope(&to, env).await {
                        tracing::warn!(from = %node.id(), to = %to, error = %e, "delayed send failed");
                    }
                }
                _ = async { shutdown.wait_for(|closed| *closed).await.map(|_| ()) } => {}
            }
        });
        Ok(Delayed(task.abort_handle()))
    }

    /// The other machines of a type, cached until the registry changes.
    async fn peers_of_type(&self, machine_type: &str) -> Result<(Arc<str>, Arc<[MachineId]>)> {
        let s = &self.0.session;
        let generation = s.registry.generation();
        if let Some(c) = lock(&self.0.types).get(machine_type)
            && c.generation == generation
        {
            return Ok((c.name.clone(), c.peers.clone()));
        }
        let peers: Arc<[MachineId]> = s
            .registry
            .discover(machine_type)
            .await?
            .into_iter()
            .map(|e| e.id)
            .filter(|id| id != self.id())
            .collect();
        let name: Arc<str> = machine_type.into();
        lock(&self.0.types).insert(
            name.clone(),
            TypeCache {
                generation,
                name: name.clone(),
                peers: peers.clone(),
                next: 0,
            },
        );
        Ok((name, peers))
    }

    /// The next instance of a type for `send_to_any_of_type`, from a cached list when it is current.
    async fn pick_of_type(&self, machine_type: &str) -> Result<(Arc<str>, MachineId)> {
        let generation = self.0.session.registry.generation();
        if self.0.balance == Balance::RoundRobin
            && let Some(c) = lock(&self.0.types).get_mut(machine_type)
            && c.generation == generation
            && !c.peers.is_empty()
        {
            let i = c.next % c.peers.len();
            c.next = c.next.wrapping_add(1);
            return Ok((c.name.clone(), c.peers[i].clone()));
        }
        let (name, peers) = self.peers_of_type(machine_type).await?;
        if peers.is_empty() {
            return Err(Error::NoMachineOfType(name));
        }
        let i = match self.0.balance {
            Balance::Random => lock(&self.0.rng).usize(..peers.len()),
            Balance::RoundRobin => {
                let mut types = lock(&self.0.types);
                match types.get_mut(machine_type) {
                    Some(c) => {
                        let i = c.next % peers.len();
                        c.next = c.next.wrapping_add(1);
                        i
                    }
                    None => 0,
                }
            }
        };
        Ok((name, peers[i].clone()))
    }

    /// Sends to exactly one other machine of a type (round-robin, or random); returns its id.
    pub async fn send_to_any_of_type<P: Serialize + Send + Sync + 'static>(
        &self,
        machine_type: &str,
        event: impl Into<Arc<str>>,
        payload: P,
    ) -> Result<MachineId> {
        let (name, to) = self.pick_of_type(machine_type).await?;
        let env = self.envelope(Address::AnyOfType(name), event, payload);
        self.send_envelope(&to, env).await?;
        Ok(to)
    }

    async fn send_each(
        &self,
        ids: &[MachineId],
        target: Address,
        event: Arc<str>,
        payload: Payload,
    ) -> Result<usize> {
        let mut first_err = None;
        let mut n = 0;
        for id in ids {
            let env = Envelope::new(
                self.0.session.next_id(),
                self.id().clone(),
                target.clone(),
                event.clone(),
                payload.clone(),
            );
            match self.send_envelope(id, env).await {
                Ok(_) => n += 1,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    /// Sends to every other machine of a type; returns how many got it (the first error if any failed).
    pub async fn send_to_all_of_type<P: Serialize + Send + Sync + 'static>(
        &self,
        machine_type: &str,
        event: impl Into<Arc<str>>,
        payload: P,
    ) -> Result<usize> {
        let (_, peers) = self.peers_of_type(machine_type).await?;
        self.send_each(
            &peers,
            Address::AllOfType(machine_type.into()),
            event.into(),
            Payload::new(payload),
        )
        .await
    }

    /// Sends to every other machine of this machine's type.
    pub async fn broadcast_to_same_type<P: Serialize + Send + Sync + 'static>(
        &self,
        event: impl Into<Arc<str>>,
        payload: P,
    ) -> Result<usize> {
        let t = self.0.entry.machine_type.clone();
        self.send_to_all_of_type(&t, event, payload).await
    }

    /// Sends to every machine linked to this one.
    pub async fn broadcast<P: Serialize + Send + Sync + 'static>(
        &self,
        event: impl Into<Arc<str>>,
        payload: P,
    ) -> Result<usize> {
        let peers = self.0.session.linked_peers(self.id());
        let ids: Vec<MachineId> = peers;
        let mut n = 0;
        let event = event.into();
        let payload = Payload::new(payload);
        for id in &ids {
            n += self
                .send_each(
                    std::slice::from_ref(id),
                    Address::Machine(id.clone()),
                    event.clone(),
                    payload.clone(),
                )
                .await?;
        }
        Ok(n)
    }

    /// Publishes to a topic; returns how many subscribers got it.
    pub async fn publish<P: Serialize + Send + Sync + 'static>(
        &self,
        topic: &str,
        event: impl Into<Arc<str>>,
        payload: P,
    ) -> Result<usize> {
        validate_topic(topic)?;
        let env = self.envelope(Address::Topic(topic.into()), event, payload);
        self.publish_envelope(env).await
    }

    /// Publishes to a topic without waiting to learn how many subscribers got it.
    ///
    /// Delivery, ordering and filters are those of [`Node::publish`]; only the
    /// count is not returned. For a stream of events this is the call to use: a
    /// transport that must ask another process for the count (ipc asks the bus
    /// daemon) then pipelines the publishes instead of waiting for each answer.
    pub async fn emit<P: Serialize + Send + Sync + 'static>(
        &self,
        topic: &str,
        event: impl Into<Arc<str>>,
        payload: P,
    ) -> Result<()> {
        validate_topic(topic)?;
        self.check_open()?;
        let env = self.envelope(Address::Topic(topic.into()), event, payload);
        for t in self.pubsub_transports()? {
            t.emit(env.clone()).await?;
        }
        Ok(())
    }

    /// Sends to exactly one member of a consumer group; returns how many got it (0 or 1 per transport).
    pub async fn publish_to_group<P: Serialize + Send + Sync + 'static>(
        &self,
        group: &str,
        event: impl Into<Arc<str>>,
        payload: P,
    ) -> Result<usize> {
        let env = self.envelope(Address::Group(group.into()), event, payload);
        self.publish_envelope(env).await
    }

    async fn publish_envelope(&self, env: Envelope) -> Result<usize> {
        self.check_open()?;
        if matches!(env.target, Address::Group(_)) {
            // One transport owns each group so that exactly one member receives.
            return match self.group_transport() {
                Some(t) => t.publish(env).await,
                None => Err(Error::NotSupported {
                    transport: "session",
                    capability: "groups (no transport with consumer groups is enabled)",
                }),
            };
        }
        let mut n = 0;
        for t in self.pubsub_transports()? {
            n += t.publish(env.clone()).await?;
        }
        Ok(n)
    }

    /// The transports that carry topics, or the error saying there are none.
    fn pubsub_transports(&self) -> Result<&[Arc<dyn Transport>]> {
        let transports = self.0.session.router.pubsub();
        if transports.is_empty() {
            return Err(Error::NotSupported {
                transport: "session",
                capability: "topics (no transport with pub/sub is enabled)",
            });
        }
        Ok(transports)
    }

    /// The widest-reaching transport with groups (the last one in the router's pub/sub order).
    fn group_transport(&self) -> Option<&Arc<dyn Transport>> {
        self.0
            .session
            .router
            .pubsub()
            .iter()
            .rev()
            .find(|t| t.capabilities().groups)
    }

    /// Subscribes this machine to topics matching `pattern` (`*` one segment, `#` zero or more).
    pub async fn subscribe(&self, pattern: &str) -> Result<SubscriptionHandle> {
        self.subscribe_with(pattern, SubscribeOptions::default())
            .await
    }

    /// Subscribes with a consumer group and/or a content filter.
    pub async fn subscribe_with(
        &self,
        pattern: &str,
        opts: SubscribeOptions,
    ) -> Result<SubscriptionHandle> {
        let topic = TopicPattern::parse(pattern)?;
        self.add_subscription(Some(topic), opts).await
    }

    /// Joins a consumer group for [`Node::publish_to_group`].
    pub async fn join_group(&self, group: &str) -> Result<SubscriptionHandle> {
        if group.is_empty() {
            return Err(Error::InvalidName {
                name: String::new(),
                reason: "a group name must not be empty",
            });
        }
        self.add_subscription(
            None,
            SubscribeOptions {
                group: Some(group.into()),
                filter: None,
            },
        )
        .await
    }

    async fn add_subscription(
        &self,
        topic: Option<TopicPattern>,
        opts: SubscribeOptions,
    ) -> Result<SubscriptionHandle> {
        self.check_open()?;
        let transports = self.0.session.router.pubsub();
        if transports.is_empty() {
            return Err(Error::NotSupported {
                transport: "session",
                capability: "topics (no transport with pub/sub is enabled)",
            });
        }
        // Topic subscriptions go to every pub/sub transport (each covers its own reach);
        // group memberships go to the one transport that owns groups, so that
        // each message reaches exactly one member across all of them.
        let chosen: Vec<Arc<dyn Transport>> = if opts.group.is_some() {
            match self.group_transport() {
                Some(t) => vec![t.clone()],
                None => {
                    return Err(Error::NotSupported {
                        transport: "session",
                        capability: "groups (no transport with consumer groups is enabled)",
                    });
                }
            }
        } else {
            transports.to_vec()
        };
        let mut ids = Vec::new();
        for t in &chosen {
            let sub = Subscription {
                topic: topic.clone(),
                group: opts.group.clone(),
                filter: opts.filter.clone(),
                inbox: Inbox(self.clone()),
            };
            let id = t.subscribe(sub).await?;
            ids.push((t.clone(), id));
        }
        lock(&self.0.subscriptions).extend(ids.iter().cloned());
        Ok(SubscriptionHandle {
            node: self.clone(),
            ids,
        })
    }

    /// Sends a request and waits for the reply (see [`Node::reply`]) or [`Error::Timeout`].
    pub async fn request<P: Serialize + Send + Sync + 'static>(
        &self,
        to: impl Into<MachineId>,
        event: impl Into<Arc<str>>,
        payload: P,
        timeout: Duration,
    ) -> Result<Envelope> {
        let to = to.into();
        let mut env = self.envelope(Address::Machine(to.clone()), event, payload);
        let cid = env.id;
        env.headers.correlation_id = Some(cid);
        env.headers.reply_to = Some(self.id().clone());
        let (tx, rx) = oneshot::channel();
        lock(&self.0.pending).insert(cid, tx);
        if let Err(e) = self.send_envelope(&to, env).await {
            lock(&self.0.pending).remove(&cid);
            return Err(e);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(Error::SessionClosed),
            Err(_) => {
                lock(&self.0.pending).remove(&cid);
                Err(Error::Timeout {
                    target: to,
                    timeout,
                })
            }
        }
    }

    fn reply_envelope<P: Serialize + Send + Sync + 'static>(
        &self,
        request: &Envelope,
        event: impl Into<Arc<str>>,
        payload: P,
    ) -> (MachineId, Envelope) {
        let to = request
            .headers
            .reply_to
            .clone()
            .unwrap_or_else(|| request.source.clone());
        let mut env = self.envelope(Address::Machine(to.clone()), event, payload);
        env.headers.correlation_id = request.headers.correlation_id;
        env.headers.is_reply = request.headers.correlation_id.is_some();
        (to, env)
    }

    /// Answers a request; a plain event (no correlation id) gets an ordinary event back.
    pub async fn reply<P: Serialize + Send + Sync + 'static>(
        &self,
        request: &Envelope,
        event: impl Into<Arc<str>>,
        payload: P,
    ) -> Result<()> {
        let (to, env) = self.reply_envelope(request, event, payload);
        self.send_envelope(&to, env).await.map(|_| ())
    }

    /// [`Node::reply`] without awaiting, for synchronous handlers (see [`Node::post`]).
    pub fn post_reply<P: Serialize + Send + Sync + 'static>(
        &self,
        request: &Envelope,
        event: impl Into<Arc<str>>,
        payload: P,
    ) -> Result<()> {
        let (to, env) = self.reply_envelope(request, event, payload);
        self.post_envelope(to, env)
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
    pub async fn close(&self) -> Result<()> {
        if self.0.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let s = &self.0.session;
        let subs: Vec<_> = lock(&self.0.subscriptions).drain(..).collect();
        for (t, id) in subs {
            let _ = t.unsubscribe(id).await;
        }
        for t in s.router.transports() {
            let _ = t.unbind(self.id()).await;
        }
        s.unlink_all(self.id());
        lock(&s.nodes).remove(self.id());
        lock(&self.0.pending).clear();
        s.registry.deregister(self.id()).await
    }
}
