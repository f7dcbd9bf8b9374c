//! Sessions: isolated universes of machines, with their own registry, fabric and transports.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use rustc_hash::FxHashMap;
use tokio::sync::watch;

use crate::address::MachineId;
use crate::error::{Error, Result};
use crate::location::Location;
use crate::node::{MachineBuilder, NodeInner};
use crate::registry::{LocalRegistry, MachineEntry, Registry, RegistryEvent};
use crate::transport::{Reach, Transport};

/// Where a send goes: the location of the target and the transports to try, in order.
#[derive(Clone)]
pub struct RoutePlan {
    /// The target's location as seen from the sender.
    pub location: Location,
    /// Transports to try; the next one is used only after a retryable failure.
    pub transports: Arc<[Arc<dyn Transport>]>,
}

impl fmt::Debug for RoutePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.transports.iter().map(|t| t.name()).collect();
        f.debug_struct("RoutePlan")
            .field("location", &self.location)
            .field("transports", &names)
            .finish()
    }
}

/// Picks the transports for a send; `switchyard-selector` provides the standard one.
pub trait Router: Send + Sync {
    /// The plan from `from` to `to`: the computed location and the transports to try, in order.
    fn route(&self, from: &MachineEntry, to: &MachineEntry) -> Result<RoutePlan>;
    /// The location of `to` as seen from `from`, overrides included, whether or not a transport reaches it.
    fn locate(&self, from: &MachineEntry, to: &MachineEntry) -> Location {
        Location::between(from, to)
    }
    /// The pub/sub transports a publish goes to, each with the span of subscriber
    /// locations it covers; spans do not overlap, so each subscriber gets a publish once.
    fn pubsub(&self) -> &[(Arc<dyn Transport>, Reach)];
    /// The transport that owns consumer groups (memberships and group publishes), if any.
    fn groups(&self) -> Option<&Arc<dyn Transport>>;
    /// Every transport of the session; machines are bound to each.
    fn transports(&self) -> &[Arc<dyn Transport>];
}

/// Routes waiting to hear that their target left or joined again.
#[derive(Default)]
pub(crate) struct RouteWatch {
    by_id: FxHashMap<MachineId, Vec<Weak<AtomicBool>>>,
    /// Registrations since the last sweep of dead entries.
    added: usize,
}

impl RouteWatch {
    fn add(&mut self, id: &MachineId, flag: &Arc<AtomicBool>) {
        self.added += 1;
        if self.added > 4096 {
            self.added = 0;
            self.by_id.retain(|_, v| {
                v.retain(|w| w.strong_count() > 0);
                !v.is_empty()
            });
        }
        self.by_id
            .entry(id.clone())
            .or_default()
            .push(Arc::downgrade(flag));
    }

    fn mark(&mut self, id: &MachineId) {
        if let Some(v) = self.by_id.remove(id) {
            for f in v.iter().filter_map(Weak::upgrade) {
                f.store(true, Ordering::Release);
            }
        }
    }

    fn mark_all(&mut self) {
        for (_, v) in self.by_id.drain() {
            for f in v.iter().filter_map(Weak::upgrade) {
                f.store(true, Ordering::Release);
            }
        }
    }
}

/// Identifies a single-threaded context; machines built in the same one are `SameThread` to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContextId(pub u64);

/// Configures and builds a [`Session`].
pub struct SessionBuilder {
    host_id: Option<Arc<str>>,
    registry: Option<Arc<dyn Registry>>,
    ttl: Duration,
    heartbeat: Option<Duration>,
    router: Option<Arc<dyn Router>>,
    strict: bool,
    auto_link_same_type: bool,
    metadata: std::collections::BTreeMap<String, String>,
}

impl Default for SessionBuilder {
    fn default() -> Self {
        SessionBuilder {
            host_id: None,
            registry: None,
            ttl: Duration::from_secs(10),
            heartbeat: Some(Duration::from_secs(3)),
            router: None,
            strict: false,
            auto_link_same_type: false,
            metadata: Default::default(),
        }
    }
}

impl SessionBuilder {
    /// A builder with defaults: local registry (TTL 10 s, heartbeats every 3 s), no strict links.
    pub fn new() -> SessionBuilder {
        SessionBuilder::default()
    }
    /// The router (normally `switchyard_selector::Selector`); required.
    pub fn router(mut self, router: Arc<dyn Router>) -> Self {
        self.router = Some(router);
        self
    }
    /// Uses a shared registry instead of a fresh in-process one.
    pub fn registry(mut self, registry: Arc<dyn Registry>) -> Self {
        self.registry = Some(registry);
        self
    }
    /// Overrides the host id (default: `/etc/machine-id`, else the host name).
    pub fn host_id(mut self, host: impl Into<Arc<str>>) -> Self {
        self.host_id = Some(host.into());
        self
    }
    /// Heartbeat TTL of the in-process registry.
    pub fn health_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }
    /// How often the session heartbeats its machines; `None` turns automatic heartbeats off.
    pub fn heartbeat_interval(mut self, every: Option<Duration>) -> Self {
        self.heartbeat = every;
        self
    }
    /// Strict links: a send across a missing link is [`Error::NotLinked`].
    pub fn strict_links(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }
    /// Links every new machine to the machines of its type already registered.
    pub fn auto_link_same_type(mut self, on: bool) -> Self {
        self.auto_link_same_type = on;
        self
    }
    /// One metadata entry every machine of the session registers with (a machine's own
    /// entry for the same key wins). Transports advertise how to reach this process this
    /// way: a sender on another host reads the endpoints from the registry entry.
    pub fn entry_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Builds the session; must run inside a tokio runtime.
    pub fn build(self) -> Result<Session> {
        let router = self.router.ok_or(Error::Transport {
            transport: "session",
            reason: "no router configured: build sessions with `switchyard::builder()`, which \
                     wires the selector and the enabled transports (or give one with \
                     `SessionBuilder::router`)"
                .into(),
            retryable: false,
        })?;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(Error::Transport {
                transport: "session",
                reason: "a session must be built inside a tokio runtime (e.g. in `#[tokio::main]`)"
                    .into(),
                retryable: false,
            });
        };
        let mut rng = fastrand::Rng::new();
        let (local, registry): (Option<Arc<LocalRegistry>>, Arc<dyn Registry>) = match self.registry
        {
            Some(r) => (None, r),
            None => {
                let l = Arc::new(LocalRegistry::new(self.ttl));
                (Some(l.clone()), l)
            }
        };
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(SessionInner {
            host_id: self.host_id.unwrap_or_else(default_host_id),
            process_id: format!("{}-{:016x}", std::process::id(), rng.u64(..)).into(),
            registry,
            router,
            nodes: Mutex::new(HashMap::new()),
            links: RwLock::new(HashSet::new()),
            strict: self.strict,
            auto_link_same_type: self.auto_link_same_type,
            metadata: self.metadata,
            next_id: AtomicU64::new((rng.u64(..) & 0xff_ffff) << 40),
            next_context: AtomicU64::new(1),
            shutdown,
            closed: AtomicBool::new(false),
            background: Mutex::new(Vec::new()),
            route_watch: Mutex::new(RouteWatch::default()),
            runtime,
        });
        watch_routes(&inner);
        let mut tasks = Vec::new();
        if let Some(local) = local {
            let every = (self.ttl / 4).max(Duration::from_millis(5));
            tasks.push(local.spawn_sweeper(every));
        }
        if let Some(every) = self.heartbeat {
            let weak = Arc::downgrade(&inner);
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let Some(s) = weak.upgrade() else { break };
                    for id in s.live_ids() {
                        let _ = s.registry.heartbeat(&id).await;
                    }
                }
            }));
        }
        *lock(&inner.background) = tasks;
        Ok(Session { inner })
    }
}

fn default_host_id() -> Arc<str> {
    std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string())
        .into()
}

/// Marks cached routes stale when their target leaves or joins again (it may have moved),
/// and every route when events were missed.
fn watch_routes(inner: &Arc<SessionInner>) {
    let weak = Arc::downgrade(inner);
    inner
        .registry
        .on_change(Arc::new(move |ev: &RegistryEvent| {
            let Some(s) = weak.upgrade() else {
                return false;
            };
            let mut w = lock(&s.route_watch);
            match ev {
                RegistryEvent::Left(id) => w.mark(id),
                RegistryEvent::Joined(e) => w.mark(&e.id),
                RegistryEvent::Resync => w.mark_all(),
                RegistryEvent::HealthChanged { .. } => {}
            }
            true
        }));
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded data stays consistent across a panicking user handler; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) struct SessionInner {
    pub(crate) host_id: Arc<str>,
    pub(crate) process_id: Arc<str>,
    pub(crate) registry: Arc<dyn Registry>,
    pub(crate) router: Arc<dyn Router>,
    pub(crate) nodes: Mutex<HashMap<MachineId, Weak<NodeInner>>>,
    links: RwLock<HashSet<(MachineId, MachineId)>>,
    pub(crate) strict: bool,
    pub(crate) auto_link_same_type: bool,
    /// Added to every machine's registry entry (endpoints transports advertise).
    pub(crate) metadata: std::collections::BTreeMap<String, String>,
    next_id: AtomicU64,
    next_context: AtomicU64,
    pub(crate) shutdown: watch::Sender<bool>,
    closed: AtomicBool,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    route_watch: Mutex<RouteWatch>,
    /// Where mailbox tasks, posts finished later and delayed sends run.
    pub(crate) runtime: tokio::runtime::Handle,
}

fn link_key(a: &MachineId, b: &MachineId) -> (MachineId, MachineId) {
    if a <= b {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    }
}

impl SessionInner {
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
    /// Reserves `n` consecutive ids; returns the first.
    pub(crate) fn next_ids(&self, n: u64) -> u64 {
        self.next_id.fetch_add(n, Ordering::Relaxed)
    }
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
    /// Marks the cached routes to `id` stale now (its machine here is leaving).
    pub(crate) fn invalidate_routes(&self, id: &MachineId) {
        lock(&self.route_watch).mark(id);
    }
    /// A flag the registry watcher sets when `id` leaves or joins again.
    pub(crate) fn watch_route(&self, id: &MachineId) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        lock(&self.route_watch).add(id, &flag);
        flag
    }
    fn live_ids(&self) -> Vec<MachineId> {
        lock(&self.nodes)
            .iter()
            .filter(|(_, w)| w.strong_count() > 0)
            .map(|(id, _)| id.clone())
            .collect()
    }
    pub(crate) fn link(&self, a: &MachineId, b: &MachineId) {
        self.links
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(link_key(a, b));
    }
    pub(crate) fn unlink(&self, a: &MachineId, b: &MachineId) -> bool {
        self.links
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&link_key(a, b))
    }
    pub(crate) fn unlink_all(&self, a: &MachineId) {
        self.links
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(x, y)| x != a && y != a);
    }
    pub(crate) fn is_linked(&self, a: &MachineId, b: &MachineId) -> bool {
        self.links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&link_key(a, b))
    }
    pub(crate) fn linked_peers(&self, a: &MachineId) -> Vec<MachineId> {
        let mut v: Vec<MachineId> = self
            .links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|(x, y)| {
                if x == a {
                    Some(y.clone())
                } else if y == a {
                    Some(x.clone())
                } else {
                    None
                }
            })
            .collect();
        v.sort();
        v
    }

    pub(crate) fn shutdown(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // send_replace: `send` leaves the value unchanged when no receiver is alive yet.
        self.shutdown.send_replace(true);
        for t in lock(&self.background).drain(..) {
            t.abort();
        }
        for t in self.router.transports() {
            t.close();
        }
        let nodes: Vec<_> = lock(&self.nodes)
            .drain()
            .filter_map(|(_, w)| w.upgrade())
            .collect();
        for n in nodes {
            crate::node::Node::from_inner(n).shut();
        }
        lock(&self.route_watch).mark_all();
        self.links
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// An isolated universe of machines: own registry, own in-process fabric, own transports.
///
/// No state is shared between sessions; dropping a session closes everything it opened.
pub struct Session {
    inner: Arc<SessionInner>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("host_id", &self.inner.host_id)
            .field("process_id", &self.inner.process_id)
            .finish()
    }
}

impl Session {
    /// Starts describing a machine; an empty id asks the registry to generate one.
    pub fn machine(
        &self,
        id: impl Into<MachineId>,
        machine_type: impl Into<Arc<str>>,
    ) -> MachineBuilder {
        MachineBuilder::new(self.inner.clone(), id.into(), machine_type.into())
    }

    /// A new single-threaded context: machines built in it reach each other `SameThread`.
    pub fn context(&self) -> ContextId {
        ContextId(self.inner.next_context.fetch_add(1, Ordering::Relaxed))
    }

    /// The session's registry.
    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.inner.registry
    }

    /// The session's router.
    pub fn router(&self) -> &Arc<dyn Router> {
        &self.inner.router
    }

    /// This session's host id.
    pub fn host_id(&self) -> &str {
        &self.inner.host_id
    }

    /// This session's process instance id.
    pub fn process_id(&self) -> &str {
        &self.inner.process_id
    }

    /// Links two machines in both directions.
    pub fn connect(&self, a: impl Into<MachineId>, b: impl Into<MachineId>) {
        self.inner.link(&a.into(), &b.into());
    }

    /// Removes the link between two machines; returns whether there was one.
    pub fn disconnect(&self, a: impl Into<MachineId>, b: impl Into<MachineId>) -> bool {
        self.inner.unlink(&a.into(), &b.into())
    }

    /// The live machine with this id in this session, if any.
    pub fn node(&self, id: &str) -> Option<crate::node::Node> {
        lock(&self.inner.nodes)
            .get(id)
            .and_then(Weak::upgrade)
            .map(crate::node::Node::from_inner)
    }

    /// Stops every machine and transport of the session (also done on drop).
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Whether the session has been shut down.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.inner.shutdown();
    }
}
