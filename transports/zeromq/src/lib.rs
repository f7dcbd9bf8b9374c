//! Switchyard `zeromq` transport: machines on other hosts, brokerless, over ZeroMQ.
//!
//! Built on the pure-Rust [`zeromq`] crate (ZMTP 3, so any libzmq peer can talk
//! to it; docs/PROTOCOL.md §12 has the frames). Each process (each session) has:
//!
//! - one **ROUTER** socket every peer sends to: machine sends, subscription
//!   announcements, group messages and counts arrive there;
//! - one **DEALER** per peer process, made on the first send to one of its
//!   machines and reused for all of them (one connection per pair, so events from
//!   one sender arrive in order);
//! - one **PUB** socket its topic publishes go out on, and one **SUB** socket
//!   connected to every peer's PUB.
//!
//! Both endpoints travel in every machine's registry entry
//! ([`ROUTER_KEY`], [`PUB_KEY`]), put there with `SessionBuilder::entry_metadata`
//! (the facade's `Builder::zeromq` does it). A sender on another host reads them
//! from the target's entry in [`Transport::link`]. Bind and advertised addresses
//! are separate settings ([`ZmqConfig::bind`], [`ZmqConfig::advertise`]) for
//! hosts behind NAT or in containers.
//!
//! **What is built on top of the sockets.**
//! - *Bounded memory and dead peers.* The crate has no high-water mark (it
//!   queues up to 100,000 messages per peer) and `send` returning means only
//!   "queued locally". A DEALER keeps at most [`ZmqConfig::window`] bytes
//!   unacknowledged (the receiving ROUTER answers `ACK`); a sender past it waits.
//!   Bytes unacknowledged for [`ZmqConfig::peer_timeout`], or a dropped
//!   connection, end the connection: sends fail with `Error::TargetGone` within
//!   that bound instead of queuing forever. Connections are made in the
//!   background (sends are taken, within the window, while one is being made);
//!   a peer that just failed is refused for [`ZmqConfig::connect_timeout`], then
//!   connected to again, so a peer that comes back is reached again.
//! - *Topics.* ZeroMQ filters by byte prefix; a `*`/`#` pattern is subscribed by
//!   its longest literal prefix ([`literal_prefix`]) and matched whole by the
//!   subscriber. Subscriptions are also announced to every peer process (`SUBS`),
//!   so a publisher knows who should answer a counted publish, and a subscribe
//!   returns only once every peer's PUB has the new prefix (a marker published
//!   back through it), so nothing published after `subscribe` returns is lost to
//!   the slow-joiner race.
//! - *Groups* ride on the announcements: a group publish picks one member
//!   round-robin among every member of every process and sends it to that
//!   process's ROUTER (`GROUP`), which answers whether the member took it.
//! - *`AllOfType` and any-of-type* sends are resolved by the node to machine
//!   sends (one per target) and travel as plain `SEND`s.
//!
//! ```no_run
//! # async fn demo() -> switchyard_core::Result<()> {
//! use switchyard_zeromq::{ZmqConfig, ZmqTransport};
//! let zmq = ZmqTransport::new(ZmqConfig::default())?;
//! println!("ROUTER {} PUB {}", zmq.router_endpoint(), zmq.pub_endpoint());
//! // switchyard::builder().zeromq(&zmq).build()? wires it into a session.
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use switchyard_core::{
    Address, Capabilities, DeliveryGuarantee, Envelope, Error, Filter, Inbox, Link, Location,
    MachineEntry, MachineId, MessageOrdering, Outgoing, PubSub, Reach, Registry, RegistryEvent,
    Result, Subscription, SubscriptionId, TopicPattern, Transport, TransportHealth,
};
use tokio::sync::{mpsc, oneshot, watch};
use zeromq::prelude::*;
use zeromq::{PubSocket, RouterSocket, SubSocket, ZmqMessage};

pub mod codec;
mod conn;
mod fast;
mod prefix;
mod router;
mod sub;

pub use prefix::literal_prefix;

use codec::{Hello, Meta, Nack, SubInfo, Subs, kind};
use conn::{Conn, Dead, TrySend};

/// Name shown in `Envelope::carried_by`.
pub const NAME: &str = "zeromq";
/// Registry metadata key: the process's ROUTER endpoint (where machine sends go).
pub const ROUTER_KEY: &str = "switchyard.zeromq.router";
/// Registry metadata key: the process's PUB endpoint (where its topic publishes come from).
pub const PUB_KEY: &str = "switchyard.zeromq.pub";

/// A receiver acknowledges at the latest after this many unacknowledged bytes of one sender.
pub(crate) const ACK_BYTES: u64 = 64 * 1024;
/// The smallest window: four acknowledgement steps, so a sender never waits for the timer.
const MIN_WINDOW: usize = 4 * ACK_BYTES as usize;
/// Most envelopes packed into one `SEND` message.
const BATCH_EVENTS: usize = 256;
/// Bytes after which a `SEND` message is closed and the next one started.
const BATCH_BYTES: usize = 64 * 1024;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // State guarded here stays consistent across a panicking handler; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn transport_err(reason: impl Into<String>, retryable: bool) -> Error {
    Error::Transport {
        transport: NAME,
        reason: reason.into(),
        retryable,
    }
}

/// Settings of a zeromq transport.
#[derive(Clone, Debug)]
pub struct ZmqConfig {
    /// Where the ROUTER binds: `tcp://HOST:PORT` (port 0 picks a free one) or `ipc:///path`.
    pub router_bind: String,
    /// Where the PUB binds.
    pub pub_bind: String,
    /// The ROUTER endpoint peers are told (default: the bound one, with its real port).
    pub router_advertise: Option<String>,
    /// The PUB endpoint peers are told.
    pub pub_advertise: Option<String>,
    /// Bytes of sends to one peer process that may be unacknowledged at once (default 1 MiB,
    /// at least 256 KiB); past it senders wait.
    pub window: usize,
    /// How long bytes may wait for an acknowledgement (and a request for its answer) before
    /// the peer counts as gone (default 5 s).
    pub peer_timeout: Duration,
    /// How long connecting to a peer may take (default 2 s).
    pub connect_timeout: Duration,
    /// Largest encoded envelope sent or accepted (default 16 MiB).
    pub max_message_size: usize,
    /// Also reach machines in other processes of this host (`Location::SameMachine`); by
    /// default only other hosts (`Remote`), the same host being ipc's.
    pub same_machine: bool,
    /// How long a receiver holds back an acknowledgement of fewer than 64 KiB (default 5 ms).
    pub ack_delay: Duration,
}

impl Default for ZmqConfig {
    fn default() -> Self {
        ZmqConfig {
            router_bind: "tcp://127.0.0.1:0".into(),
            pub_bind: "tcp://127.0.0.1:0".into(),
            router_advertise: None,
            pub_advertise: None,
            window: 1024 * 1024,
            peer_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            max_message_size: 16 * 1024 * 1024,
            same_machine: false,
            ack_delay: Duration::from_millis(5),
        }
    }
}

impl ZmqConfig {
    /// Binds the ROUTER and the PUB here (`tcp://0.0.0.0:5555`, `tcp://127.0.0.1:0`, `ipc:///run/x`).
    pub fn bind(mut self, router: impl Into<String>, publish: impl Into<String>) -> Self {
        self.router_bind = router.into();
        self.pub_bind = publish.into();
        self
    }
    /// Tells peers these endpoints instead of the bound ones (a host behind NAT, a container).
    pub fn advertise(mut self, router: impl Into<String>, publish: impl Into<String>) -> Self {
        self.router_advertise = Some(router.into());
        self.pub_advertise = Some(publish.into());
        self
    }
    /// Also carries sends between processes of one host.
    pub fn same_machine(mut self, on: bool) -> Self {
        self.same_machine = on;
        self
    }
    /// Sets the unacknowledged-bytes window per peer process.
    pub fn window(mut self, bytes: usize) -> Self {
        self.window = bytes;
        self
    }
    /// Sets how long a peer may stay silent with bytes outstanding.
    pub fn peer_timeout(mut self, t: Duration) -> Self {
        self.peer_timeout = t;
        self
    }
    /// Sets how long connecting may take.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }
}

/// A listener bound now (so its real address is known at once), handed to the crate later.
enum Bound {
    Tcp(std::net::TcpListener),
    #[cfg(unix)]
    Ipc(std::os::unix::net::UnixListener),
}

impl From<Bound> for zeromq::Listener {
    fn from(b: Bound) -> Self {
        match b {
            Bound::Tcp(l) => l.into(),
            #[cfg(unix)]
            Bound::Ipc(l) => l.into(),
        }
    }
}

/// Binds `endpoint`; returns the listener and the endpoint peers should use.
fn bind_now(endpoint: &str, advertise: Option<&str>) -> Result<(Bound, String)> {
    let bad = |why: String| Error::Config(format!("zeromq endpoint `{endpoint}`: {why}"));
    if let Some(addr) = endpoint.strip_prefix("tcp://") {
        let l = std::net::TcpListener::bind(addr).map_err(|e| {
            bad(format!(
                "cannot bind: {e}; pick a free port or another address"
            ))
        })?;
        l.set_nonblocking(true)
            .map_err(|e| bad(format!("cannot set non-blocking: {e}")))?;
        let local = l
            .local_addr()
            .map_err(|e| bad(format!("no local address: {e}")))?;
        let adv = match advertise {
            Some(a) => a.to_string(),
            None if local.ip().is_unspecified() => {
                return Err(bad(format!(
                    "bound to all interfaces ({local}), so peers need an address they can reach: \
                     set ZmqConfig::advertise (e.g. tcp://<this host's IP>:{})",
                    local.port()
                )));
            }
            None => format!("tcp://{local}"),
        };
        return Ok((Bound::Tcp(l), adv));
    }
    #[cfg(unix)]
    if let Some(path) = endpoint.strip_prefix("ipc://") {
        let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| {
            bad(format!(
                "cannot bind: {e}; remove a stale socket file or pick another path"
            ))
        })?;
        l.set_nonblocking(true)
            .map_err(|e| bad(format!("cannot set non-blocking: {e}")))?;
        return Ok((Bound::Ipc(l), advertise.unwrap_or(endpoint).to_string()));
    }
    Err(bad(
        "only tcp://HOST:PORT and ipc:///path endpoints are supported".into(),
    ))
}

/// A peer process as this one knows it.
struct Peer {
    host: Arc<str>,
    router: String,
    pub_ep: String,
    version: u64,
    subs: Vec<RemoteSub>,
    machines: HashSet<MachineId>,
    /// True once the introduction is over (the peer answered `HELLO`, or gave up): from
    /// then on it knows this process and its subscriptions reach this PUB.
    ready: watch::Receiver<bool>,
}

struct RemoteSub {
    sub: u64,
    pattern: Option<TopicPattern>,
    group: Option<Arc<str>>,
}

impl RemoteSub {
    fn of(s: &SubInfo) -> Option<RemoteSub> {
        let pattern = match &s.pattern {
            Some(p) => Some(TopicPattern::parse(p).ok()?),
            None => None,
        };
        Some(RemoteSub {
            sub: s.sub,
            pattern,
            group: s.group.as_deref().map(Arc::from),
        })
    }
}

struct LocalSub {
    topic: Option<TopicPattern>,
    group: Option<Arc<str>>,
    filter: Option<Filter>,
    inbox: Inbox,
}

#[derive(Default)]
struct LocalSubs {
    next: u64,
    version: u64,
    map: BTreeMap<u64, LocalSub>,
    /// SUB prefixes in use, with how many subscriptions use each.
    prefixes: HashMap<String, usize>,
}

/// A counted publish waiting for the processes that should answer.
struct CountWait {
    waiting: HashSet<Arc<str>>,
    total: usize,
    done: Option<oneshot::Sender<()>>,
}

/// Subscribers waiting for a marker to come back through each peer's PUB.
struct MarkerWait {
    waiting: HashSet<Arc<str>>,
    arrived: Arc<tokio::sync::Notify>,
}

/// What the SUB socket's task is asked to do.
pub(crate) enum SubCmd {
    Connect(String, oneshot::Sender<std::result::Result<(), String>>),
    Subscribe(String, oneshot::Sender<()>),
    Unsubscribe(String, oneshot::Sender<()>),
}

#[derive(Clone, Debug, PartialEq)]
enum Up {
    Starting,
    Ready,
    Failed(String),
}

type Slot = Arc<tokio::sync::Mutex<Option<Arc<Conn>>>>;

/// Everything the transport's tasks share.
pub(crate) struct Shared {
    cfg: ZmqConfig,
    router_ep: String,
    pub_ep: String,
    caps: Capabilities,
    closed: AtomicBool,
    up: watch::Receiver<Up>,
    attached: watch::Sender<bool>,
    me: OnceLock<(Arc<str>, Arc<str>)>,
    registry: OnceLock<Arc<dyn Registry>>,
    local: RwLock<rustc_hash::FxHashMap<MachineId, Inbox>>,
    conns: Mutex<HashMap<String, Slot>>,
    peers: Mutex<HashMap<Arc<str>, Peer>>,
    subs: Mutex<LocalSubs>,
    publisher: tokio::sync::Mutex<Option<PubSocket>>,
    sub_cmd: OnceLock<mpsc::UnboundedSender<SubCmd>>,
    counts: Mutex<HashMap<u64, CountWait>>,
    next_count: AtomicU64,
    markers: Mutex<HashMap<String, MarkerWait>>,
    group_next: Mutex<HashMap<Arc<str>, usize>>,
    delivered: AtomicU64,
    dropped: AtomicU64,
    /// The registry generation the peer table was last brought up to date with.
    seen_generation: AtomicU64,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// The zeromq [`Transport`] (and [`PubSub`]); see the crate docs. One per session.
pub struct ZmqTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ZmqTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZmqTransport")
            .field("router", &self.shared.router_ep)
            .field("pub", &self.shared.pub_ep)
            .finish()
    }
}

impl ZmqTransport {
    /// Binds the ROUTER and PUB endpoints now and starts the sockets in the background.
    ///
    /// Must run inside a tokio runtime. A bad or busy endpoint is [`Error::Config`].
    pub fn new(cfg: ZmqConfig) -> Result<Arc<ZmqTransport>> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config(
                "ZmqTransport::new must be called inside a tokio runtime".into(),
            ));
        }
        if cfg.window < MIN_WINDOW {
            return Err(Error::Config(format!(
                "zeromq window of {} bytes is below the minimum of {MIN_WINDOW}",
                cfg.window
            )));
        }
        let (router_l, router_ep) = bind_now(&cfg.router_bind, cfg.router_advertise.as_deref())?;
        let (pub_l, pub_ep) = bind_now(&cfg.pub_bind, cfg.pub_advertise.as_deref())?;
        let mut locations = vec![Location::Remote];
        if cfg.same_machine {
            locations.insert(0, Location::SameMachine);
        }
        let caps = Capabilities {
            locations,
            ordering: MessageOrdering::PerSenderReceiver,
            delivery: DeliveryGuarantee::AtMostOnce,
            max_message_size: Some(cfg.max_message_size),
            serializes: true,
            topics: true,
            groups: true,
            request: true,
            mailboxes: true,
            priority: true,
        };
        let (up_tx, up) = watch::channel(Up::Starting);
        let (attached, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            cfg,
            router_ep,
            pub_ep,
            caps,
            closed: AtomicBool::new(false),
            up,
            attached,
            me: OnceLock::new(),
            registry: OnceLock::new(),
            local: RwLock::new(Default::default()),
            conns: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            subs: Mutex::new(LocalSubs::default()),
            publisher: tokio::sync::Mutex::new(None),
            sub_cmd: OnceLock::new(),
            counts: Mutex::new(HashMap::new()),
            next_count: AtomicU64::new(1),
            markers: Mutex::new(HashMap::new()),
            group_next: Mutex::new(HashMap::new()),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            seen_generation: AtomicU64::new(u64::MAX),
            tasks: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let start = tokio::spawn(async move {
            let r = start(&s, router_l, pub_l).await;
            let _ = up_tx.send(match r {
                Ok(()) => Up::Ready,
                Err(e) => {
                    tracing::error!(error = %e, "the zeromq transport could not start");
                    Up::Failed(e)
                }
            });
        });
        lock(&shared.tasks).push(start);
        Ok(Arc::new(ZmqTransport { shared }))
    }

    /// The ROUTER endpoint peers are told (the [`ROUTER_KEY`] metadata value).
    pub fn router_endpoint(&self) -> &str {
        &self.shared.router_ep
    }

    /// The PUB endpoint peers are told (the [`PUB_KEY`] metadata value).
    pub fn pub_endpoint(&self) -> &str {
        &self.shared.pub_ep
    }

    /// The registry metadata every machine of the session must carry: `(key, value)` pairs for
    /// `SessionBuilder::entry_metadata`.
    pub fn entry_metadata(&self) -> [(&'static str, String); 2] {
        [
            (ROUTER_KEY, self.shared.router_ep.clone()),
            (PUB_KEY, self.shared.pub_ep.clone()),
        ]
    }

    /// Gives the transport its session's registry and identity, so it can find the peer
    /// processes whose topics it subscribes to (the facade's `Builder::zeromq` calls this
    /// once the session is built). Until it is called, topics reach only peers that
    /// introduced themselves.
    pub fn attach(&self, registry: Arc<dyn Registry>, host_id: &str, process_id: &str) {
        let s = &self.shared;
        let _ = s.me.set((host_id.into(), process_id.into()));
        if s.registry.set(registry.clone()).is_err() {
            return;
        }
        let weak = Arc::downgrade(s);
        let mut events = registry.watch();
        let task = tokio::spawn(async move {
            if let Some(s) = weak.upgrade() {
                if s.wait_up().await.is_ok() {
                    s.refresh_peers().await;
                }
                s.attached.send_replace(true);
            }
            loop {
                let ev = match events.recv().await {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        RegistryEvent::Resync
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let Some(s) = weak.upgrade() else { return };
                match ev {
                    RegistryEvent::Joined(e) => {
                        let s2 = s.clone();
                        tokio::spawn(async move { s2.introduce_entry(&e).await });
                    }
                    RegistryEvent::Left(id) => s.machine_left(&id),
                    RegistryEvent::Resync => {
                        tokio::spawn(async move { s.refresh_peers().await });
                    }
                    RegistryEvent::HealthChanged { .. } => {}
                }
            }
        });
        lock(&s.tasks).push(task);
    }

    /// Bytes sent to peer processes and not acknowledged yet, over every open connection
    /// (each stays within [`ZmqConfig::window`]).
    pub fn in_flight(&self) -> u64 {
        let s = &self.shared;
        let eps: Vec<String> = lock(&s.conns).keys().cloned().collect();
        eps.iter()
            .filter_map(|e| s.conn_now(e))
            .map(|c| c.in_flight())
            .sum()
    }

    /// Waits until the sockets are bound and listening (or fails with why they are not).
    pub async fn ready(&self) -> Result<()> {
        self.shared.wait_up().await
    }
}

impl Drop for ZmqTransport {
    fn drop(&mut self) {
        self.shared.close();
    }
}

async fn start(s: &Arc<Shared>, router_l: Bound, pub_l: Bound) -> std::result::Result<(), String> {
    let mut router = RouterSocket::new();
    router
        .bind_listener(router_l)
        .await
        .map_err(|e| format!("the ROUTER socket cannot listen: {e}"))?;
    let mut publisher = PubSocket::new();
    publisher
        .bind_listener(pub_l)
        .await
        .map_err(|e| format!("the PUB socket cannot listen: {e}"))?;
    *s.publisher.lock().await = Some(publisher);
    let mut opts = zeromq::SocketOptions::default();
    opts.connect_timeout(s.cfg.connect_timeout);
    let subscriber = SubSocket::with_options(opts);
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = s.sub_cmd.set(tx);
    let (rtx, rrx) = router.split();
    let r = tokio::spawn(router::run(Arc::downgrade(s), rrx, rtx));
    let t = tokio::spawn(sub::run(Arc::downgrade(s), subscriber, rx));
    let mut tasks = lock(&s.tasks);
    tasks.push(r);
    tasks.push(t);
    Ok(())
}

/// Where a subscriber is relative to a publisher.
fn location_of(host: &str, process: &str, context: Option<u64>, e: &MachineEntry) -> Location {
    if *e.host_id != *host {
        Location::Remote
    } else if *e.process_id != *process {
        Location::SameMachine
    } else if context.is_some() && context == e.context {
        Location::SameThread
    } else {
        Location::SameProcess
    }
}

fn peer_location(me: &(Arc<str>, Arc<str>), host: &str, process: &str) -> Location {
    if *me.0 != *host {
        Location::Remote
    } else if *me.1 != *process {
        Location::SameMachine
    } else {
        Location::SameProcess
    }
}

fn loc_byte(l: Location) -> u8 {
    l as u8
}

fn byte_loc(b: u8) -> Location {
    Location::ALL[usize::from(b.min(3))]
}

impl Shared {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            return Err(Error::Closed(NAME));
        }
        Ok(())
    }

    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
        let slots: Vec<Slot> = lock(&self.conns).drain().map(|(_, v)| v).collect();
        for slot in slots {
            if let Ok(g) = slot.try_lock()
                && let Some(c) = g.as_ref()
            {
                c.kill(Dead("the transport is closed".into()));
            }
        }
        for (_, w) in lock(&self.counts).drain() {
            if let Some(d) = w.done {
                let _ = d.send(());
            }
        }
        if let Ok(mut p) = self.publisher.try_lock() {
            p.take();
        }
        self.local
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    async fn wait_up(&self) -> Result<()> {
        let mut up = self.up.clone();
        let r = up
            .wait_for(|u| *u != Up::Starting)
            .await
            .map(|u| u.clone())
            .map_err(|_| Error::Closed(NAME))?;
        match r {
            Up::Failed(why) => Err(transport_err(why, false)),
            _ => Ok(()),
        }
    }

    /// Waits for the sockets and for the first round of introductions to the peers the
    /// registry listed (bounded: a dead peer cannot hold it up past the timeouts).
    async fn wait_ready(&self) -> Result<()> {
        self.wait_up().await?;
        if self.registry.get().is_some() {
            let mut rx = self.attached.subscribe();
            let bound = self.cfg.connect_timeout + self.cfg.peer_timeout * 2;
            let _ = tokio::time::timeout(bound, rx.wait_for(|a| *a)).await;
        }
        Ok(())
    }

    fn me(&self) -> Option<&(Arc<str>, Arc<str>)> {
        self.me.get()
    }

    fn inbox(&self, id: &str) -> Option<Inbox> {
        self.local
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// The connection to a peer's ROUTER, made on first use and again after it died.
    async fn conn(self: &Arc<Self>, endpoint: &str) -> std::result::Result<Arc<Conn>, Dead> {
        if self.is_closed() {
            return Err(Dead("the transport is closed".into()));
        }
        let slot = lock(&self.conns)
            .entry(endpoint.to_string())
            .or_default()
            .clone();
        let mut g = slot.lock().await;
        if let Some(c) = g.as_ref() {
            if !c.is_dead() {
                return Ok(c.clone());
            }
            // Just failed: say so rather than queue more for a peer that is not there; try
            // again once `connect_timeout` has passed.
            if c.died_within(self.cfg.connect_timeout) {
                return Err(c.why());
            }
        }
        let weak = Arc::downgrade(self);
        let on_nack: Arc<dyn Fn(&Nack) + Send + Sync> = Arc::new(move |n: &Nack| {
            if let Some(s) = weak.upgrade() {
                s.dropped.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(to = %n.to, id = n.id, code = %n.code, "zeromq peer refused an event: {}", n.message);
        });
        let c = Conn::start(
            endpoint,
            self.cfg.window as u64,
            self.cfg.peer_timeout,
            self.cfg.connect_timeout,
            on_nack,
        );
        *g = Some(c.clone());
        Ok(c)
    }

    /// The conn if it is alive now, without connecting.
    fn conn_now(&self, endpoint: &str) -> Option<Arc<Conn>> {
        let slot = lock(&self.conns).get(endpoint)?.clone();
        let g = slot.try_lock().ok()?;
        g.as_ref().filter(|c| !c.is_dead()).cloned()
    }

    fn sub_infos(&self) -> (u64, Vec<SubInfo>) {
        let subs = lock(&self.subs);
        let v = subs
            .map
            .iter()
            .map(|(id, s)| SubInfo {
                sub: *id,
                pattern: s.topic.as_ref().map(|t| t.as_str().to_string()),
                group: s.group.as_deref().map(str::to_string),
            })
            .collect();
        (subs.version, v)
    }

    async fn sub_command(&self, make: impl FnOnce(oneshot::Sender<()>) -> SubCmd) -> Result<()> {
        let tx = self.sub_cmd.get().ok_or(Error::Closed(NAME))?;
        let (done, rx) = oneshot::channel();
        tx.send(make(done)).map_err(|_| Error::Closed(NAME))?;
        rx.await.map_err(|_| Error::Closed(NAME))
    }

    async fn sub_connect(&self, endpoint: &str) -> std::result::Result<(), String> {
        let Some(tx) = self.sub_cmd.get() else {
            return Err("closed".into());
        };
        let (done, rx) = oneshot::channel();
        tx.send(SubCmd::Connect(endpoint.to_string(), done))
            .map_err(|_| "closed".to_string())?;
        rx.await.map_err(|_| "closed".to_string())?
    }

    /// Brings the peer table up to date when the registry changed since it last was, so a
    /// publish reaches every process whose machines were registered before it. One atomic
    /// load when nothing changed.
    async fn catch_up(self: &Arc<Self>) {
        let Some(reg) = self.registry.get() else {
            return;
        };
        if reg.generation() != self.seen_generation.load(Ordering::Acquire) {
            self.refresh_peers().await;
        }
    }

    /// Reads every machine of the registry and introduces this process to the unknown ones
    /// (waiting for introductions already under way).
    async fn refresh_peers(self: &Arc<Self>) {
        let Some(reg) = self.registry.get().cloned() else {
            return;
        };
        let generation = reg.generation();
        let entries = match reg.discover_pattern("*").await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "zeromq: cannot list the registry to find peers");
                return;
            }
        };
        let ids: Vec<(Arc<str>, MachineId)> = entries
            .iter()
            .map(|e| (e.process_id.clone(), e.id.clone()))
            .collect();
        let mut firsts: HashMap<Arc<str>, MachineEntry> = HashMap::new();
        for e in entries {
            firsts.entry(e.process_id.clone()).or_insert(e);
        }
        let intros = firsts.values().map(|e| self.introduce_entry(e));
        futures_util::future::join_all(intros).await;
        {
            // Every machine of each peer, so the peer is forgotten only when its last one leaves.
            let mut peers = self.peers_mut();
            for (process, id) in ids {
                if let Some(p) = peers.get_mut(&process) {
                    p.machines.insert(id);
                }
            }
        }
        self.seen_generation.store(generation, Ordering::Release);
    }

    fn peers_mut(&self) -> MutexGuard<'_, HashMap<Arc<str>, Peer>> {
        lock(&self.peers)
    }

    fn machine_left(&self, id: &MachineId) {
        let mut peers = self.peers_mut();
        let gone: Vec<Arc<str>> = peers
            .iter_mut()
            .filter_map(|(p, peer)| {
                (peer.machines.remove(id) && peer.machines.is_empty()).then(|| p.clone())
            })
            .collect();
        for p in gone {
            // A process without machines has no subscriptions; it introduces itself again
            // when a machine of it registers.
            peers.remove(&p);
        }
    }

    /// Learns of a peer process from one of its machines' entries; the first time, says
    /// `HELLO` (it then syncs its subscriptions to this process) and syncs this process's
    /// subscriptions to it.
    async fn introduce_entry(self: &Arc<Self>, e: &MachineEntry) {
        let Some(me) = self.me().cloned() else { return };
        if e.process_id == me.1 {
            return;
        }
        let (Some(router), Some(pub_ep)) = (e.metadata.get(ROUTER_KEY), e.metadata.get(PUB_KEY))
        else {
            return;
        };
        let (ready_tx, ready_rx) = watch::channel(false);
        let waiting = {
            let mut peers = self.peers_mut();
            match peers.get_mut(&e.process_id) {
                Some(p) => {
                    p.machines.insert(e.id.clone());
                    Some(p.ready.clone())
                }
                None => {
                    peers.insert(
                        e.process_id.clone(),
                        Peer {
                            host: e.host_id.clone(),
                            router: router.clone(),
                            pub_ep: pub_ep.clone(),
                            version: 0,
                            subs: Vec::new(),
                            machines: HashSet::from([e.id.clone()]),
                            ready: ready_rx,
                        },
                    );
                    None
                }
            }
        };
        if let Some(mut ready) = waiting {
            // Another task is introducing this peer: its introduction is ours too.
            let bound = self.cfg.connect_timeout + self.cfg.peer_timeout * 3;
            let _ = tokio::time::timeout(bound, ready.wait_for(|r| *r)).await;
            return;
        }
        let process = e.process_id.clone();
        let hello = async {
            let c = self.conn(router).await?;
            let (version, subs) = self.sub_infos();
            let body = codec::to_map(&Hello {
                protocol: codec::PROTOCOL,
                process: me.1.to_string(),
                host: me.0.to_string(),
                router: self.router_ep.clone(),
                pub_ep: self.pub_ep.clone(),
                version,
                subs,
            })
            .map_err(|e| Dead(e.to_string()))?;
            c.request(kind::HELLO, vec![body], self.cfg.peer_timeout)
                .await
        };
        let (said, ()) = tokio::join!(hello, self.sync_peers(vec![process.clone()], true));
        if let Err(d) = said {
            tracing::debug!(peer = %process, reason = %d.0, "zeromq: a peer did not answer HELLO");
            self.forget_peer(&process);
        }
        ready_tx.send_replace(true);
    }

    fn forget_peer(&self, process: &str) {
        self.peers_mut().remove(process);
    }

    /// A peer told this process who it is and what it subscribes (`HELLO` or `SUBS`).
    fn learn_peer(
        &self,
        process: &str,
        host: &str,
        endpoints: Option<(&str, &str)>,
        version: u64,
        subs: &[SubInfo],
    ) {
        let mut peers = self.peers_mut();
        let peer = match peers.get_mut(process) {
            Some(p) => p,
            None => {
                let Some((router, pub_ep)) = endpoints else {
                    return;
                };
                peers.entry(process.into()).or_insert(Peer {
                    host: host.into(),
                    router: router.to_string(),
                    pub_ep: pub_ep.to_string(),
                    version: 0,
                    subs: Vec::new(),
                    machines: HashSet::new(),
                    // It introduced itself: nothing to wait for.
                    ready: watch::channel(true).1,
                })
            }
        };
        if version >= peer.version {
            peer.version = version;
            peer.subs = subs.iter().filter_map(RemoteSub::of).collect();
        }
    }

    /// Makes sure each peer knows this process's subscriptions and, with `marker`, that each
    /// peer's PUB has every prefix this process subscribes (not needed when only a group
    /// membership or an unsubscribe changed).
    async fn sync_peers(self: &Arc<Self>, processes: Vec<Arc<str>>, marker: bool) {
        let targets: Vec<(Arc<str>, String, String)> = {
            let peers = self.peers_mut();
            processes
                .iter()
                .filter_map(|p| {
                    peers
                        .get(p)
                        .map(|peer| (p.clone(), peer.router.clone(), peer.pub_ep.clone()))
                })
                .collect()
        };
        if targets.is_empty() {
            return;
        }
        // Connected before the marker is subscribed: the prefixes then travel to each PUB
        // ahead of the marker on the same connection.
        let connects = targets.iter().map(|(p, _, pub_ep)| async move {
            if let Err(e) = self.sub_connect(pub_ep).await {
                tracing::debug!(peer = %p, error = %e, "zeromq: cannot subscribe to a peer's PUB");
            }
        });
        futures_util::future::join_all(connects).await;
        let (version, subs, has_topics) = {
            let (v, s) = self.sub_infos();
            let t = s.iter().any(|i| i.pattern.is_some());
            (v, s, t)
        };
        if subs.is_empty() && version == 0 {
            return;
        }
        let Some(me) = self.me().cloned() else { return };
        let marker = (marker && has_topics).then(|| format!("\0m{:016x}", fastrand::u64(..)));
        let arrived = Arc::new(tokio::sync::Notify::new());
        if let Some(m) = &marker {
            lock(&self.markers).insert(
                m.clone(),
                MarkerWait {
                    waiting: targets.iter().map(|t| t.0.clone()).collect(),
                    arrived: arrived.clone(),
                },
            );
            let mm = m.clone();
            let _ = self.sub_command(|d| SubCmd::Subscribe(mm, d)).await;
        }
        let one = |(process, router, _): (Arc<str>, String, String)| {
            let marker = marker.clone();
            let arrived = arrived.clone();
            let me = me.clone();
            let subs = subs.clone();
            async move {
                let c = match self.conn(&router).await {
                    Ok(c) => c,
                    Err(d) => {
                        tracing::debug!(peer = %process, reason = %d.0, "zeromq: cannot reach a peer to sync subscriptions");
                        return;
                    }
                };
                let body = match codec::to_map(&Subs {
                    process: me.1.to_string(),
                    host: me.0.to_string(),
                    router: self.router_ep.clone(),
                    pub_ep: self.pub_ep.clone(),
                    version,
                    subs,
                    marker: marker.clone(),
                }) {
                    Ok(b) => b,
                    Err(_) => return,
                };
                if let Err(d) = c
                    .request(kind::SUBS, vec![body], self.cfg.peer_timeout)
                    .await
                {
                    tracing::debug!(peer = %process, reason = %d.0, "zeromq: a peer did not take our subscriptions");
                    return;
                }
                let Some(m) = marker else { return };
                let deadline = tokio::time::Instant::now() + self.cfg.peer_timeout;
                loop {
                    let notified = arrived.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    let still = lock(&self.markers)
                        .get(&m)
                        .is_some_and(|w| w.waiting.contains(&process));
                    if !still {
                        return;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        tracing::warn!(peer = %process, "zeromq: a peer's PUB never echoed our subscription marker; its publishes may miss this process");
                        return;
                    }
                    if tokio::time::timeout(Duration::from_millis(50), notified)
                        .await
                        .is_err()
                    {
                        // Not through yet (the prefix travels on another connection than the
                        // request): ask for the marker again.
                        let _ = c
                            .request(
                                kind::MARK,
                                vec![Bytes::from(m.clone().into_bytes())],
                                self.cfg.peer_timeout,
                            )
                            .await;
                    }
                }
            }
        };
        futures_util::future::join_all(targets.into_iter().map(one)).await;
        if let Some(m) = marker {
            lock(&self.markers).remove(&m);
            let _ = self.sub_command(|d| SubCmd::Unsubscribe(m, d)).await;
        }
    }

    /// A marker came back through `process`'s PUB.
    pub(crate) fn marker_arrived(&self, marker: &str, process: &str) {
        if let Some(w) = lock(&self.markers).get_mut(marker)
            && w.waiting.remove(process)
        {
            w.arrived.notify_waiters();
        }
    }

    /// A counted topic message's subscriber process answered.
    pub(crate) fn count_arrived(&self, id: u64, process: &str, delivered: u64) {
        let mut counts = lock(&self.counts);
        let Some(w) = counts.get_mut(&id) else { return };
        if w.waiting.remove(process) {
            w.total += delivered as usize;
            if w.waiting.is_empty()
                && let Some(d) = w.done.take()
            {
                let _ = d.send(());
            }
        }
    }

    /// Publishes `marker` on the PUB socket (`[marker, process]`).
    pub(crate) async fn publish_marker(&self, marker: &[u8]) {
        let Some(me) = self.me() else { return };
        let mut msg = ZmqMessage::from(Bytes::copy_from_slice(marker));
        msg.push_back(Bytes::copy_from_slice(me.1.as_bytes()));
        if let Some(p) = self.publisher.lock().await.as_mut() {
            let _ = p.send(msg).await;
        }
    }

    /// Delivers a topic envelope once to each local machine with a matching plain
    /// subscription whose location relative to the publisher `reach` covers.
    pub(crate) async fn deliver_topic(
        &self,
        topic: &str,
        mut env: Envelope,
        publisher: (&str, &str, Option<u64>),
        reach: Reach,
    ) -> usize {
        let parts: Vec<&str> = topic.split('.').collect();
        // Few machines per process subscribe to one topic: a list, checked by scanning.
        let targets: Vec<Inbox> = {
            let subs = lock(&self.subs);
            let mut v: Vec<Inbox> = Vec::new();
            for s in subs.map.values() {
                if s.group.is_some()
                    || !s.topic.as_ref().is_some_and(|p| p.matches_segments(&parts))
                {
                    continue;
                }
                let loc = location_of(publisher.0, publisher.1, publisher.2, s.inbox.entry());
                if !reach.covers(loc) || v.iter().any(|i| i.id() == s.inbox.id()) {
                    continue;
                }
                if let Some(f) = &s.filter
                    && !f(&env)
                {
                    continue;
                }
                v.push(s.inbox.clone());
            }
            v
        };
        if targets.is_empty() {
            return 0;
        }
        if env.carried_by != Some(NAME) {
            env.carried_by = Some(NAME);
        }
        let plain = !env.headers.is_reply && env.headers.expires_at_us.is_none();
        let mut n = 0;
        for inbox in targets {
            if plain && inbox.takes_refs() && inbox.deliver_ref(switchyard_core::EventRef::of(&env))
            {
                n += 1;
                continue;
            }
            match inbox.deliver(env.clone()).await {
                Ok(()) => n += 1,
                Err(_) => inbox.count_dropped(),
            }
        }
        self.delivered.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Delivers a group message to local subscription `sub`; whether it took it.
    pub(crate) async fn deliver_group(&self, sub: u64, env: Envelope) -> bool {
        let inbox = {
            let subs = lock(&self.subs);
            match subs.map.get(&sub) {
                Some(s) if s.group.is_some() => {
                    if let Some(f) = &s.filter
                        && !f(&env)
                    {
                        return false;
                    }
                    s.inbox.clone()
                }
                _ => return false,
            }
        };
        if inbox.is_closed() {
            return false;
        }
        let mut env = env;
        env.carried_by = Some(NAME);
        let ok = inbox.deliver(env).await.is_ok();
        if ok {
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    async fn publish_topic(
        self: &Arc<Self>,
        from: &MachineEntry,
        env: Envelope,
        reach: Reach,
        counted: bool,
    ) -> Result<usize> {
        let Address::Topic(topic) = &env.target else {
            return Err(Error::InvalidPattern {
                pattern: env.target.to_string(),
                reason: "publish takes a topic or a group address",
            });
        };
        let topic = topic.clone();
        if topic.as_bytes().first() == Some(&codec::CONTROL_PREFIX) {
            return Err(Error::InvalidPattern {
                pattern: topic.to_string(),
                reason: "topics starting with a NUL byte are reserved by the zeromq transport",
            });
        }
        self.wait_ready().await?;
        self.catch_up().await;
        let me = self
            .me()
            .cloned()
            .unwrap_or_else(|| (from.host_id.clone(), from.process_id.clone()));
        let mut n = 0;
        if reach.covers(Location::SameThread) || reach.covers(Location::SameProcess) {
            n += self
                .deliver_topic(
                    &topic,
                    env.clone(),
                    (&from.host_id, &from.process_id, from.context),
                    reach,
                )
                .await;
        }
        if reach.farthest < Location::SameMachine {
            return Ok(n);
        }
        let mut bytes = Vec::with_capacity(128);
        codec::write_envelope(&mut bytes, &env)?;
        if bytes.len() > self.cfg.max_message_size {
            return Err(Error::TooLarge {
                transport: NAME,
                size: bytes.len(),
                limit: self.cfg.max_message_size,
            });
        }
        let expected: HashSet<Arc<str>> = if counted {
            let parts: Vec<&str> = topic.split('.').collect();
            self.peers_mut()
                .iter()
                .filter(|(p, peer)| {
                    reach.covers(peer_location(&me, &peer.host, p))
                        && peer.subs.iter().any(|s| {
                            s.group.is_none()
                                && s.pattern
                                    .as_ref()
                                    .is_some_and(|t| t.matches_segments(&parts))
                        })
                })
                .map(|(p, _)| p.clone())
                .collect()
        } else {
            HashSet::new()
        };
        let mut waiter = None;
        let count_id = if expected.is_empty() {
            None
        } else {
            let id = self.next_count.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            lock(&self.counts).insert(
                id,
                CountWait {
                    waiting: expected,
                    total: 0,
                    done: Some(tx),
                },
            );
            waiter = Some(rx);
            Some(id)
        };
        let mut meta = Vec::with_capacity(48 + me.0.len() + me.1.len());
        fast::write_meta(
            &mut meta,
            &me.1,
            &me.0,
            count_id,
            loc_byte(reach.nearest),
            loc_byte(reach.farthest),
        );
        let meta = Bytes::from(meta);
        let mut msg = ZmqMessage::from(Bytes::copy_from_slice(topic.as_bytes()));
        msg.push_back(meta);
        msg.push_back(Bytes::from(bytes));
        {
            let mut p = self.publisher.lock().await;
            let Some(p) = p.as_mut() else {
                return Err(Error::Closed(NAME));
            };
            if let Err(e) = p.send(msg).await {
                if let Some(id) = count_id {
                    lock(&self.counts).remove(&id);
                }
                return Err(transport_err(format!("PUB send failed: {e}"), false));
            }
        }
        if let (Some(id), Some(rx)) = (count_id, waiter) {
            let _ = tokio::time::timeout(self.cfg.peer_timeout, rx).await;
            if let Some(w) = lock(&self.counts).remove(&id) {
                if !w.waiting.is_empty() {
                    tracing::debug!(
                        missing = w.waiting.len(),
                        "zeromq: subscriber processes did not count a publish in time (counted as 0)"
                    );
                }
                n += w.total;
            }
        }
        Ok(n)
    }

    async fn publish_group(self: &Arc<Self>, group: &Arc<str>, env: Envelope) -> Result<usize> {
        self.wait_ready().await?;
        self.catch_up().await;
        // Members in a stable order: this process's, then each peer's by process id.
        let mut members: Vec<(Option<Member>, u64)> = lock(&self.subs)
            .map
            .iter()
            .filter(|(_, s)| s.group.as_ref() == Some(group))
            .map(|(id, _)| (None, *id))
            .collect();
        {
            let peers = self.peers_mut();
            let mut ps: Vec<(&Arc<str>, &Peer)> = peers.iter().collect();
            ps.sort_by(|a, b| a.0.cmp(b.0));
            for (p, peer) in ps {
                for s in &peer.subs {
                    if s.group.as_ref() == Some(group) && s.pattern.is_none() {
                        members.push((Some((p.clone(), peer.router.clone())), s.sub));
                    }
                }
            }
        }
        if members.is_empty() {
            return Ok(0);
        }
        let start = {
            let mut next = lock(&self.group_next);
            let i = next.entry(group.clone()).or_insert(0);
            let v = *i;
            *i = i.wrapping_add(1);
            v
        };
        let mut bytes = None;
        for k in 0..members.len() {
            let (whose, sub) = &members[(start + k) % members.len()];
            match whose {
                None => {
                    if self.deliver_group(*sub, env.clone()).await {
                        return Ok(1);
                    }
                }
                Some((process, router)) => {
                    let b = match &bytes {
                        Some(b) => Bytes::clone(b),
                        None => {
                            let mut v = Vec::with_capacity(128);
                            codec::write_envelope(&mut v, &env)?;
                            if v.len() > self.cfg.max_message_size {
                                return Err(Error::TooLarge {
                                    transport: NAME,
                                    size: v.len(),
                                    limit: self.cfg.max_message_size,
                                });
                            }
                            let b = Bytes::from(v);
                            bytes = Some(b.clone());
                            b
                        }
                    };
                    let r = match self.conn(router).await {
                        Ok(c) => {
                            c.request(
                                kind::GROUP,
                                vec![codec::u64_frame(*sub), b],
                                self.cfg.peer_timeout,
                            )
                            .await
                        }
                        Err(d) => Err(d),
                    };
                    match r {
                        Ok(reply) if reply.count == Some(1) => return Ok(1),
                        Ok(_) => {}
                        Err(d) => {
                            tracing::debug!(peer = %process, reason = %d.0, "zeromq: a group member's process is unreachable");
                        }
                    }
                }
            }
        }
        Ok(0)
    }
}

/// A group member's process (id, ROUTER endpoint); `None` in a member list is this process.
type Member = (Arc<str>, String);

/// A link to a machine in another process: its process's DEALER connection.
struct ZmqLink {
    shared: Weak<Shared>,
    conn: Arc<Conn>,
    to: MachineId,
    /// `to` as a frame, made once: each message shares it.
    to_frame: Bytes,
    max: usize,
}

impl ZmqLink {
    fn err(&self, d: Dead) -> Error {
        match self.shared.upgrade() {
            Some(s) if !s.is_closed() => {
                tracing::debug!(to = %self.to, reason = %d.0, "zeromq link failed");
                Error::TargetGone(self.to.clone())
            }
            _ => Error::Closed(NAME),
        }
    }

    /// Encodes events from the front of `out` (without taking them) into one `SEND`
    /// message; returns it, its size and how many events it holds.
    fn encode(&self, out: &dyn Outgoing) -> Result<Option<(ZmqMessage, u64, usize)>> {
        let Some(first) = out.front() else {
            return Ok(None);
        };
        let mut buf = Vec::with_capacity(192 + first.event.len() + first.source.as_str().len());
        codec::write_event(&mut buf, &first)?;
        if buf.len() > self.max {
            return Err(Error::TooLarge {
                transport: NAME,
                size: buf.len(),
                limit: self.max,
            });
        }
        let size = 1 + self.to_frame.len() as u64 + buf.len() as u64;
        // Built from a Vec: one allocation for the frame list.
        let frames = vec![
            Bytes::from_static(&[kind::SEND]),
            self.to_frame.clone(),
            Bytes::from(buf),
        ];
        match ZmqMessage::try_from(frames) {
            Ok(msg) => Ok(Some((msg, size, 1))),
            Err(_) => Ok(None),
        }
    }

    /// Like [`ZmqLink::encode`] for a run: up to [`BATCH_EVENTS`] events or [`BATCH_BYTES`].
    fn encode_run(
        &self,
        out: &mut dyn Outgoing,
    ) -> Result<Option<(ZmqMessage, u64, Vec<Envelope>)>> {
        // Events are taken as envelopes so a failed send can put them back in order.
        let mut msg = ZmqMessage::from(Bytes::from_static(&[kind::SEND]));
        let mut size = 1 + self.to_frame.len() as u64;
        msg.push_back(self.to_frame.clone());
        let mut taken = Vec::new();
        while taken.len() < BATCH_EVENTS && (size as usize) < BATCH_BYTES {
            let Some(ev) = out.front() else { break };
            let mut buf = Vec::with_capacity(128);
            codec::write_event(&mut buf, &ev)?;
            if buf.len() > self.max {
                if taken.is_empty() {
                    return Err(Error::TooLarge {
                        transport: NAME,
                        size: buf.len(),
                        limit: self.max,
                    });
                }
                break;
            }
            size += buf.len() as u64;
            msg.push_back(Bytes::from(buf));
            match out.pop_by(NAME) {
                Some(env) => taken.push(env),
                None => break,
            }
        }
        if taken.is_empty() {
            return Ok(None);
        }
        Ok(Some((msg, size, taken)))
    }
}

#[async_trait]
impl Link for ZmqLink {
    fn try_send(&self, out: &mut dyn Outgoing) -> Result<()> {
        if out.len() != 1 {
            // Batches go the waiting way, packed into few messages.
            return Ok(());
        }
        let Some((msg, size, _)) = self.encode(out)? else {
            return Ok(());
        };
        match self.conn.try_send(msg, size) {
            Ok(TrySend::Sent) => {
                out.advance();
                Ok(())
            }
            Ok(TrySend::Busy) => Ok(()),
            Err(d) => Err(self.err(d)),
        }
    }

    async fn send(&self, out: &mut dyn Outgoing) -> Result<()> {
        while !out.is_empty() {
            if self.conn.is_dead() {
                return Err(self.err(self.conn.why()));
            }
            if out.len() == 1 {
                let Some((msg, size, _)) = self.encode(out)? else {
                    return Ok(());
                };
                self.conn.send(msg, size).await.map_err(|d| self.err(d))?;
                out.advance();
                continue;
            }
            let Some((msg, size, taken)) = self.encode_run(out)? else {
                return Ok(());
            };
            if let Err(d) = self.conn.send(msg, size).await {
                for env in taken.into_iter().rev() {
                    out.push_front(env);
                }
                return Err(self.err(d));
            }
        }
        Ok(())
    }

    fn is_open(&self) -> bool {
        !self.conn.is_dead()
            && !self.conn.was_nacked(&self.to)
            && self.shared.upgrade().is_some_and(|s| !s.is_closed())
    }
}

/// A link to a machine of this very process (a forced location, or `same_machine` with one
/// process): handed to its inbox.
struct LocalLink {
    inbox: Inbox,
}

#[async_trait]
impl Link for LocalLink {
    async fn send(&self, out: &mut dyn Outgoing) -> Result<()> {
        while let Some(env) = out.pop_by(NAME) {
            self.inbox.deliver(env).await?;
        }
        Ok(())
    }
    fn is_open(&self) -> bool {
        !self.inbox.is_closed()
    }
}

#[async_trait]
impl Transport for ZmqTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> &Capabilities {
        &self.shared.caps
    }

    async fn bind(&self, entry: &MachineEntry, inbox: Inbox) -> Result<()> {
        self.shared.check_open()?;
        let _ = self
            .shared
            .me
            .set((entry.host_id.clone(), entry.process_id.clone()));
        self.shared
            .local
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(entry.id.clone(), inbox);
        Ok(())
    }

    async fn unbind(&self, id: &MachineId) -> Result<()> {
        self.shared
            .local
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }

    async fn link(&self, to: &MachineEntry) -> Result<Arc<dyn Link>> {
        let s = &self.shared;
        s.check_open()?;
        if s.me().is_some_and(|m| m.1 == to.process_id) {
            return match s.inbox(to.id.as_str()) {
                Some(inbox) => Ok(Arc::new(LocalLink { inbox })),
                None => Err(Error::TargetGone(to.id.clone())),
            };
        }
        let Some(router) = to.metadata.get(ROUTER_KEY) else {
            return Err(transport_err(
                format!(
                    "machine `{}` advertises no zeromq endpoint (its session has no zeromq transport)",
                    to.id
                ),
                true,
            ));
        };
        s.wait_up().await?;
        let conn = s.conn(router).await.map_err(|d| {
            tracing::debug!(to = %to.id, reason = %d.0, "zeromq: cannot reach a machine's process");
            Error::TargetGone(to.id.clone())
        })?;
        Ok(Arc::new(ZmqLink {
            shared: Arc::downgrade(s),
            conn,
            to: to.id.clone(),
            to_frame: Bytes::copy_from_slice(to.id.as_str().as_bytes()),
            max: s.cfg.max_message_size,
        }))
    }

    fn pubsub(&self) -> Option<&dyn PubSub> {
        Some(self)
    }

    fn health(&self) -> TransportHealth {
        let s = &self.shared;
        let up = matches!(*s.up.borrow(), Up::Ready);
        let conns: Vec<Arc<Conn>> = {
            let eps: Vec<String> = lock(&s.conns).keys().cloned().collect();
            eps.iter().filter_map(|e| s.conn_now(e)).collect()
        };
        let in_flight: u64 = conns.iter().map(|c| c.in_flight()).sum();
        TransportHealth {
            healthy: up && !s.is_closed(),
            detail: format!(
                "ROUTER {} PUB {}; {} peer processes known, {} connections open, {} bytes unacknowledged",
                s.router_ep,
                s.pub_ep,
                lock(&s.peers).len(),
                conns.len(),
                in_flight
            ),
            delivered: s.delivered.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
        }
    }

    fn close(&self) {
        self.shared.close();
    }
}

#[async_trait]
impl PubSub for ZmqTransport {
    async fn publish(&self, from: &MachineEntry, env: Envelope, reach: Reach) -> Result<usize> {
        self.shared.check_open()?;
        match &env.target {
            Address::Topic(_) => self.shared.publish_topic(from, env, reach, true).await,
            Address::Group(g) => {
                let g = g.clone();
                self.shared.publish_group(&g, env).await
            }
            other => Err(Error::InvalidPattern {
                pattern: other.to_string(),
                reason: "publish takes a topic or a group address",
            }),
        }
    }

    async fn emit(&self, from: &MachineEntry, env: Envelope, reach: Reach) -> Result<()> {
        self.shared.check_open()?;
        match &env.target {
            Address::Topic(_) => self
                .shared
                .publish_topic(from, env, reach, false)
                .await
                .map(drop),
            _ => self.publish(from, env, reach).await.map(drop),
        }
    }

    async fn subscribe(&self, sub: Subscription) -> Result<SubscriptionId> {
        let s = &self.shared;
        s.check_open()?;
        s.wait_ready().await?;
        let Subscription {
            topic,
            group,
            filter,
            inbox,
        } = sub;
        let _ = s.me.set((
            inbox.entry().host_id.clone(),
            inbox.entry().process_id.clone(),
        ));
        let prefix = topic
            .as_ref()
            .filter(|_| group.is_none())
            .map(|t| literal_prefix(t.as_str()));
        let (id, new_prefix) = {
            let mut subs = lock(&s.subs);
            subs.next += 1;
            subs.version += 1;
            let id = subs.next;
            subs.map.insert(
                id,
                LocalSub {
                    topic,
                    group,
                    filter,
                    inbox,
                },
            );
            let new_prefix = match &prefix {
                Some(p) => {
                    let n = subs.prefixes.entry(p.clone()).or_insert(0);
                    *n += 1;
                    *n == 1
                }
                None => false,
            };
            (id, new_prefix)
        };
        let is_topic = prefix.is_some();
        if new_prefix && let Some(p) = prefix {
            s.sub_command(|d| SubCmd::Subscribe(p, d)).await?;
        }
        // Peers that joined since the registry was last read are introduced, then every peer
        // learns the subscription (and, for a topic, its PUB gets the prefix).
        s.catch_up().await;
        let all: Vec<Arc<str>> = s.peers_mut().keys().cloned().collect();
        s.sync_peers(all, is_topic).await;
        Ok(SubscriptionId(id))
    }

    async fn unsubscribe(&self, id: SubscriptionId) -> Result<()> {
        let s = &self.shared;
        let removed = {
            let mut subs = lock(&s.subs);
            let Some(sub) = subs.map.remove(&id.0) else {
                return Ok(());
            };
            subs.version += 1;
            let prefix = sub
                .topic
                .as_ref()
                .filter(|_| sub.group.is_none())
                .map(|t| literal_prefix(t.as_str()));
            match prefix {
                Some(p) => {
                    let last = match subs.prefixes.get_mut(&p) {
                        Some(n) => {
                            *n -= 1;
                            *n == 0
                        }
                        None => false,
                    };
                    if last {
                        subs.prefixes.remove(&p);
                        Some(p)
                    } else {
                        None
                    }
                }
                None => None,
            }
        };
        if s.is_closed() {
            return Ok(());
        }
        if let Some(p) = removed {
            let _ = s.sub_command(|d| SubCmd::Unsubscribe(p, d)).await;
        }
        let all: Vec<Arc<str>> = s.peers_mut().keys().cloned().collect();
        s.sync_peers(all, false).await;
        Ok(())
    }
}

pub(crate) use loc_and_reach::{meta_publisher, meta_reach};

mod loc_and_reach {
    use super::*;

    /// The span a topic message's meta says to cover.
    pub(crate) fn meta_reach(m: &Meta) -> Reach {
        Reach::new(byte_loc(m.near), byte_loc(m.far))
    }

    /// The publisher's identity in a topic message's meta.
    pub(crate) fn meta_publisher(m: &Meta) -> (&str, &str) {
        (&m.host, &m.process)
    }
}
