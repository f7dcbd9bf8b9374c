//! Switchyard `ipc` transport: machines in different processes of one host, over local sockets.
//!
//! Built on the `interprocess` crate (unix domain sockets on Linux/macOS, named
//! pipes on Windows) with tokio. Frames are length-prefixed MessagePack
//! (docs/PROTOCOL.md). Two modes share one client:
//!
//! - **bus** ([`Mode::Bus`]): every event goes through the bus daemon
//!   ([`daemon`], `switchyard bus`), which keeps the host's registry and routes
//!   sends, topics and groups between its clients;
//! - **peer-to-peer** ([`Mode::PeerToPeer`]): each process listens on its own
//!   socket; the daemon only tells where a machine lives, then processes
//!   connect to each other directly and reuse the connection. Topic and group
//!   publishes are still fanned out by the daemon, which owns subscriptions
//!   host-wide.
//!
//! ```no_run
//! # async fn demo() -> switchyard_core::Result<()> {
//! use std::sync::Arc;
//! use switchyard_ipc::{IpcBus, IpcConfig};
//! let bus = IpcBus::connect(IpcConfig::new(switchyard_ipc::default_socket_path()))?;
//! let transport = bus.transport();
//! let registry = bus.registry();
//! # let _ = (transport, registry); Ok(()) }
//! ```
//!
//! [`IpcBus::transport`] is the [`Transport`] to add to a session's selector and
//! [`IpcBus::registry`] the [`Registry`] that makes discovery span processes;
//! the facade's `switchyard::builder().ipc(&bus)` does both.
//!
//! Performance: `cargo run --release --example ipc_bench` measures both modes
//! between two real processes beside a raw unix socket carrying frames of the
//! same size ([`bench_support`] holds the raw baseline, for `switchyard bench` too).

use std::any::Any;
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use switchyard_core::{
    Address, Capabilities, DeliveryGuarantee, Envelope, Error, Inbox, Link, Location, MachineEntry,
    MachineId, MessageOrdering, Outgoing, PubSub, Reach, Registry, RegistryEvent, Result,
    Subscription, SubscriptionId, Transport, TransportHealth,
};
use tokio::sync::broadcast;

#[cfg(unix)]
pub mod bench_support;
mod client;
pub mod codec;
mod conn;
pub mod daemon;
pub mod error;
pub mod frame;
mod p2p;

pub use client::IpcStats;
pub use daemon::{Daemon, DaemonConfig, DaemonHandle, WhenFull};
pub use error::IpcError;
pub use frame::DaemonHealth;

use client::Client;
use frame::RequestMsg;
use p2p::P2p;

/// Name shown in `Envelope::carried_by`.
pub const NAME: &str = "ipc";

/// Registry metadata key holding the socket of the process that owns a machine (peer-to-peer mode).
pub const ENDPOINT_KEY: &str = "switchyard.ipc.endpoint";

/// How events travel between processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Through the bus daemon.
    Bus,
    /// Directly between processes; `listen` is this process's socket (default: a fresh path beside the daemon's).
    PeerToPeer {
        /// This process's socket path.
        listen: Option<PathBuf>,
    },
}

/// Settings of an ipc client (transport + registry).
#[derive(Clone)]
pub struct IpcConfig {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// Name sent in `HELLO`, for the daemon's logs.
    pub client_id: String,
    /// Auth token sent in `HELLO`, when the daemon requires one.
    pub token: Option<String>,
    /// Bus or peer-to-peer.
    pub mode: Mode,
    /// Largest frame sent or accepted, default 16 MiB.
    pub max_frame: usize,
    /// Bytes queued per connection before senders wait (policy `Wait`), default 1 MiB: enough
    /// to keep the socket busy, small enough that a saturated queue adds little latency.
    pub outbox_limit: usize,
    /// How long a registry request (and the first connection) may take.
    pub request_timeout: Duration,
    /// Heartbeat TTL of machines registered through this client; `None` uses the daemon's default (10 s).
    pub ttl: Option<Duration>,
    /// First reconnect delay; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Accept peers of any uid on this process's peer-to-peer socket.
    ///
    /// Windows has no peer uid check (named pipes carry no `SO_PEERCRED`), so this changes nothing there.
    pub allow_any_uid: bool,
    keep_alive: Vec<Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for IpcConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpcConfig")
            .field("socket", &self.socket)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl IpcConfig {
    /// Bus mode against the daemon at `socket`, with defaults.
    pub fn new(socket: impl Into<PathBuf>) -> IpcConfig {
        IpcConfig {
            socket: socket.into(),
            client_id: format!("pid-{}", std::process::id()),
            token: None,
            mode: Mode::Bus,
            max_frame: frame::DEFAULT_MAX_FRAME,
            outbox_limit: 1024 * 1024,
            request_timeout: Duration::from_secs(10),
            ttl: None,
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_secs(2),
            allow_any_uid: false,
            keep_alive: Vec::new(),
        }
    }
    /// Peer-to-peer mode with a fresh socket for this process.
    pub fn peer_to_peer(mut self) -> Self {
        self.mode = Mode::PeerToPeer { listen: None };
        self
    }
    /// Sets the client id.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = id.into();
        self
    }
    /// Sets the heartbeat TTL of machines registered through this client.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
    /// Keeps `value` (e.g. an embedded [`DaemonHandle`]) alive as long as the client.
    pub fn keep_alive(mut self, value: Arc<dyn Any + Send + Sync>) -> Self {
        self.keep_alive.push(value);
        self
    }
}

/// The daemon's default socket: `$XDG_RUNTIME_DIR/switchyard/bus.sock`, else `<temp>/switchyard-<user>/bus.sock`.
#[cfg(not(windows))]
pub fn default_socket_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("switchyard").join("bus.sock");
    }
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_else(|_| "user".into());
    std::env::temp_dir()
        .join(format!("switchyard-{user}"))
        .join("bus.sock")
}

/// The daemon's default socket on Windows: the named pipe `\\.\pipe\switchyard-<user>-bus`.
///
/// Pipe names are host-wide, so the user name keeps users apart; the pipe gets
/// the default security descriptor of the user who creates it (see [`daemon`]).
#[cfg(windows)]
pub fn default_socket_path() -> PathBuf {
    let user = std::env::var("USERNAME")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "user".into());
    let user = user.replace(['\\', '/', ':'], "_");
    PathBuf::from(format!("{}switchyard-{user}-bus", daemon::PIPE_PREFIX))
}

/// A socket path in `dir` that no other call returns (pid, time and a random salt).
pub fn unique_socket_path(dir: &Path, prefix: &str) -> PathBuf {
    let salt =
        RandomState::new().hash_one((std::process::id(), switchyard_core::envelope::now_micros()));
    dir.join(format!(
        "{prefix}-{}-{:012x}.sock",
        std::process::id(),
        salt & 0xffff_ffff_ffff
    ))
}

/// A connection to the bus daemon, shared by the transport and the registry it hands out.
#[derive(Clone)]
pub struct IpcBus {
    client: Arc<Client>,
    p2p: Option<Arc<P2p>>,
}

impl std::fmt::Debug for IpcBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpcBus")
            .field("socket", &self.client.cfg.socket)
            .field("p2p", &self.p2p.as_ref().map(|p| p.path.clone()))
            .finish()
    }
}

impl IpcBus {
    /// Starts connecting (in the background, with backoff); in peer-to-peer mode binds this process's socket.
    ///
    /// Must run inside a tokio runtime. Registry calls wait up to
    /// `request_timeout` for the first connection.
    pub fn connect(cfg: IpcConfig) -> Result<IpcBus> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(error::transport_err(
                "IpcBus::connect must be called inside a tokio runtime",
            ));
        }
        let listen = match &cfg.mode {
            Mode::Bus => None,
            Mode::PeerToPeer { listen } => Some(listen.clone().unwrap_or_else(|| {
                let dir = cfg
                    .socket
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(std::env::temp_dir);
                unique_socket_path(&dir, "peer")
            })),
        };
        let client = Client::start(cfg.clone());
        let p2p = match listen {
            Some(path) => match P2p::start(path, &cfg, client.local.clone()) {
                Ok(p) => Some(p),
                Err(e) => {
                    client.close();
                    return Err(e.into());
                }
            },
            None => None,
        };
        Ok(IpcBus { client, p2p })
    }

    /// The transport to add to a session (`switchyard::builder().transport(bus.transport())`).
    pub fn transport(&self) -> Arc<IpcTransport> {
        Arc::new(IpcTransport {
            bus: self.clone(),
            caps: Capabilities {
                locations: vec![Location::SameMachine],
                ordering: MessageOrdering::PerSenderReceiver,
                delivery: DeliveryGuarantee::AtMostOnce,
                max_message_size: Some(self.client.cfg.max_frame),
                serializes: true,
                topics: true,
                groups: true,
                request: true,
                mailboxes: false,
                priority: true,
            },
        })
    }

    /// The registry backed by the daemon (`.session(|s| s.registry(bus.registry()))`).
    pub fn registry(&self) -> Arc<BusRegistry> {
        Arc::new(BusRegistry { bus: self.clone() })
    }

    /// Waits until the connection to the daemon is up (or `timeout` passes).
    pub async fn wait_connected(&self, timeout: Duration) -> Result<()> {
        if self.client.wait_connected(timeout).await {
            Ok(())
        } else {
            Err(error::transport_err(format!(
                "no connection to the bus daemon at {} within {timeout:?}: is `switchyard bus` running?",
                self.client.cfg.socket.display()
            )))
        }
    }

    /// Whether the connection to the daemon is up now.
    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    /// What the daemon connection refused, lost, replayed or could not decode so far.
    pub fn stats(&self) -> IpcStats {
        self.client.stats()
    }

    /// The daemon's health report.
    pub async fn daemon_health(&self) -> Result<DaemonHealth> {
        let r = self
            .client
            .request(
                RequestMsg {
                    op: "health".into(),
                    ..RequestMsg::default()
                },
                None,
            )
            .await?;
        Ok(r.health.unwrap_or_default())
    }

    /// This process's peer-to-peer socket, in that mode.
    pub fn endpoint(&self) -> Option<&Path> {
        self.p2p.as_ref().map(|p| p.path.as_path())
    }

    /// Closes the connection, the peer listener and every peer connection.
    pub fn close(&self) {
        if let Some(p) = &self.p2p {
            p.close();
        }
        self.client.close();
    }
}

/// The ipc [`Transport`]; see the crate docs.
pub struct IpcTransport {
    bus: IpcBus,
    caps: Capabilities,
}

impl IpcTransport {
    fn client(&self) -> &Arc<Client> {
        &self.bus.client
    }

    fn check_open(&self) -> Result<()> {
        if self.client().closed.load(Ordering::Acquire) {
            return Err(Error::Closed(NAME));
        }
        Ok(())
    }
}

/// Where an ipc link writes: the daemon connection (which a reconnect replaces), or a
/// peer process's own socket.
enum Via {
    Bus(Arc<Client>),
    Peer(Arc<conn::Outbox>),
}

/// A link to one machine in another process.
struct IpcLink {
    via: Via,
    to: MachineId,
    closed: Arc<Client>,
}

impl IpcLink {
    fn outbox(&self) -> Result<Arc<conn::Outbox>> {
        match &self.via {
            Via::Bus(c) => c.conn_now(),
            Via::Peer(o) => Ok(o.clone()),
        }
    }

    /// A connection failure of a peer link means the target's process is gone.
    fn map_err(&self, e: Error) -> Error {
        match (&self.via, e) {
            (_, e @ Error::TooLarge { .. }) => e,
            (Via::Peer(_), _) if self.closed.closed.load(Ordering::Acquire) => Error::Closed(NAME),
            (Via::Peer(_), _) => Error::TargetGone(self.to.clone()),
            (Via::Bus(_), e) => e,
        }
    }
}

#[async_trait]
impl Link for IpcLink {
    fn try_send(&self, out: &mut dyn Outgoing) -> Result<()> {
        if self.closed.closed.load(Ordering::Acquire) {
            return Err(Error::Closed(NAME));
        }
        match &self.via {
            Via::Bus(c) => match client::read(&c.conn).as_ref() {
                Some(o) => o.try_push_out(self.to.as_str(), out),
                None => Err(c.conn_now().err().unwrap_or(Error::Closed(NAME))),
            },
            Via::Peer(o) => o
                .try_push_out(self.to.as_str(), out)
                .map_err(|e| self.map_err(e)),
        }
    }

    async fn send(&self, out: &mut dyn Outgoing) -> Result<()> {
        if self.closed.closed.load(Ordering::Acquire) {
            return Err(Error::Closed(NAME));
        }
        let o = self.outbox()?;
        o.push_batch(self.to.as_str(), out)
            .await
            .map_err(|e| self.map_err(e))
    }

    fn is_open(&self) -> bool {
        match &self.via {
            Via::Bus(c) => !c.closed.load(Ordering::Acquire),
            Via::Peer(o) => !o.is_closed(),
        }
    }
}

#[async_trait]
impl Transport for IpcTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn bind(&self, entry: &MachineEntry, inbox: Inbox) -> Result<()> {
        self.check_open()?;
        self.client().local.bind(&entry.id, inbox)
    }

    async fn unbind(&self, id: &MachineId) -> Result<()> {
        self.client().local.unbind(id);
        Ok(())
    }

    async fn link(&self, to: &MachineEntry) -> Result<Arc<dyn Link>> {
        self.check_open()?;
        let via = match &self.bus.p2p {
            Some(p) => match p.connect(self.client(), to).await? {
                Some(o) => Via::Peer(o),
                // No endpoint (a bus-mode or foreign client): the daemon routes it.
                None => Via::Bus(self.client().clone()),
            },
            None => Via::Bus(self.client().clone()),
        };
        Ok(Arc::new(IpcLink {
            via,
            to: to.id.clone(),
            closed: self.client().clone(),
        }))
    }

    fn pubsub(&self) -> Option<&dyn PubSub> {
        Some(self)
    }

    fn health(&self) -> TransportHealth {
        let c = self.client();
        let connected = c.is_connected();
        TransportHealth {
            healthy: connected && !c.closed.load(Ordering::Acquire),
            detail: format!(
                "{} to the bus daemon at {}{}; {} undeliverable sends reported, {} lost with the daemon",
                if connected {
                    "connected"
                } else {
                    "not connected"
                },
                c.cfg.socket.display(),
                match &self.bus.p2p {
                    Some(p) => format!(", peer-to-peer on {}", p.path.display()),
                    None => String::new(),
                },
                c.nacks.load(Ordering::Relaxed),
                c.lost.load(Ordering::Relaxed)
            ),
            delivered: c.local.delivered.load(Ordering::Relaxed),
            dropped: c.local.dropped.load(Ordering::Relaxed)
                + c.nacks.load(Ordering::Relaxed)
                + c.lost.load(Ordering::Relaxed),
        }
    }

    fn close(&self) {
        self.bus.close();
    }
}

/// Whether a span of subscriber locations includes the publisher's own process.
fn covers_own_process(reach: Reach) -> bool {
    reach.covers(Location::SameThread) || reach.covers(Location::SameProcess)
}

#[async_trait]
impl PubSub for IpcTransport {
    async fn publish(&self, _from: &MachineEntry, env: Envelope, reach: Reach) -> Result<usize> {
        self.check_open()?;
        match &env.target {
            Address::Topic(t) => {
                let t = t.clone();
                let local = if covers_own_process(reach) {
                    self.client().local.deliver_topic(&t, &env).await
                } else {
                    0
                };
                let remote = if reach.covers(Location::SameMachine) {
                    self.client()
                        .publish(frame::kind::PUBLISH, &t, &env)
                        .await?
                } else {
                    0
                };
                Ok(local + remote)
            }
            Address::Group(g) => {
                let g = g.clone();
                self.client().publish(frame::kind::GROUP, &g, &env).await
            }
            other => Err(Error::InvalidPattern {
                pattern: other.to_string(),
                reason: "publish takes a topic or a group address",
            }),
        }
    }

    async fn emit(&self, from: &MachineEntry, env: Envelope, reach: Reach) -> Result<()> {
        self.check_open()?;
        let Address::Topic(t) = &env.target else {
            return self.publish(from, env, reach).await.map(drop);
        };
        if covers_own_process(reach) {
            self.client().local.deliver_topic(t, &env).await;
        }
        if reach.covers(Location::SameMachine) {
            self.client().emit(t, &env).await?;
        }
        Ok(())
    }

    async fn subscribe(&self, sub: Subscription) -> Result<SubscriptionId> {
        self.check_open()?;
        let Subscription {
            topic,
            group,
            filter,
            inbox,
        } = sub;
        let local = &self.client().local;
        let id = local.add_sub(topic.clone(), group.clone(), filter, inbox.id().clone());
        let req = client::sub_request(id, topic.as_ref(), group.as_deref());
        if let Err(e) = self.client().request(req, None).await {
            local.remove_sub(id);
            return Err(e);
        }
        Ok(SubscriptionId(id))
    }

    async fn unsubscribe(&self, id: SubscriptionId) -> Result<()> {
        self.client().local.remove_sub(id.0);
        if self.client().closed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.client()
            .request(
                RequestMsg {
                    op: "unsubscribe".into(),
                    sub: Some(id.0),
                    ..RequestMsg::default()
                },
                None,
            )
            .await
            .map(|_| ())
    }
}

/// A [`Registry`] kept by the bus daemon: discovery spans every process of the host.
pub struct BusRegistry {
    bus: IpcBus,
}

impl BusRegistry {
    fn client(&self) -> &Client {
        &self.bus.client
    }

    fn by_id(op: &str, id: &MachineId) -> RequestMsg {
        RequestMsg {
            op: op.into(),
            id: Some(id.to_string()),
            ..RequestMsg::default()
        }
    }
}

#[async_trait]
impl Registry for BusRegistry {
    async fn register(&self, mut entry: MachineEntry) -> Result<MachineEntry> {
        if let Some(p) = &self.bus.p2p {
            entry
                .metadata
                .insert(ENDPOINT_KEY.into(), p.path.display().to_string());
        }
        let ttl_ms = self.client().cfg.ttl.map(|t| t.as_millis() as u64);
        let id = entry.id.clone();
        let r = self
            .client()
            .request(
                RequestMsg {
                    op: "register".into(),
                    entry: Some(entry),
                    ttl_ms,
                    ..RequestMsg::default()
                },
                Some(id.as_str()),
            )
            .await?;
        let entry = r
            .entry
            .ok_or_else(|| error::transport_err("the daemon's register reply has no entry"))?;
        self.client().remember(&entry, ttl_ms);
        self.client().generation.fetch_add(1, Ordering::AcqRel);
        Ok(entry)
    }

    async fn deregister(&self, id: &MachineId) -> Result<()> {
        self.client().forget(id);
        self.client()
            .request(Self::by_id("deregister", id), Some(id.as_str()))
            .await?;
        self.client().generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    async fn get(&self, id: &MachineId) -> Result<Option<MachineEntry>> {
        Ok(self
            .client()
            .request(Self::by_id("get", id), Some(id.as_str()))
            .await?
            .entry)
    }

    async fn discover(&self, machine_type: &str) -> Result<Vec<MachineEntry>> {
        let r = self
            .client()
            .request(
                RequestMsg {
                    op: "discover".into(),
                    machine_type: Some(machine_type.into()),
                    ..RequestMsg::default()
                },
                Some(machine_type),
            )
            .await?;
        Ok(r.entries.unwrap_or_default())
    }

    async fn discover_pattern(&self, pattern: &str) -> Result<Vec<MachineEntry>> {
        let r = self
            .client()
            .request(
                RequestMsg {
                    op: "discover_pattern".into(),
                    pattern: Some(pattern.into()),
                    ..RequestMsg::default()
                },
                Some(pattern),
            )
            .await?;
        Ok(r.entries.unwrap_or_default())
    }

    async fn types(&self) -> Result<Vec<String>> {
        let r = self
            .client()
            .request(
                RequestMsg {
                    op: "types".into(),
                    ..RequestMsg::default()
                },
                None,
            )
            .await?;
        Ok(r.types.unwrap_or_default())
    }

    async fn heartbeat(&self, id: &MachineId) -> Result<()> {
        self.client()
            .request(Self::by_id("heartbeat", id), Some(id.as_str()))
            .await
            .map(|_| ())
    }

    async fn is_healthy(&self, id: &MachineId) -> Result<bool> {
        let r = self
            .client()
            .request(Self::by_id("is_healthy", id), Some(id.as_str()))
            .await?;
        Ok(r.healthy.unwrap_or(false))
    }

    fn watch(&self) -> broadcast::Receiver<RegistryEvent> {
        self.client().events.subscribe()
    }

    fn generation(&self) -> u64 {
        self.client().generation.load(Ordering::Acquire)
    }

    fn on_change(&self, hook: switchyard_core::ChangeHook) {
        self.client().hooks.add(hook);
    }
}
