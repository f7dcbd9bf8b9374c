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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use async_trait::async_trait;
use bytes::Bytes;
use switchyard_core::{
    Capabilities, DeliveryGuarantee, Error, Inbox, Link, Location, MachineEntry, MachineId,
    MessageOrdering, PubSub, Registry, RegistryEvent, Result, Transport, TransportHealth,
};
use tokio::sync::{mpsc, watch};
use zeromq::prelude::*;
use zeromq::{PubSocket, RouterSocket, SubSocket};

pub mod codec;
mod config;
mod conn;
mod fast;
mod link;
mod peers;
mod prefix;
mod router;
mod sub;
mod topics;

pub use config::ZmqConfig;

use config::{Bound, bind_now};
use link::{LocalLink, ZmqLink};
use peers::Peer;
pub(crate) use topics::SubCmd;
use topics::{CountWait, LocalSubs, MarkerWait};

pub use prefix::literal_prefix;

use conn::{Conn, Dead};

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
