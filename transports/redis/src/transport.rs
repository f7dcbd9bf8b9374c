//! The transport: machine inboxes and consumer groups on Redis Streams (at least once),
//! topics on Redis pub/sub (at most once). docs/PROTOCOL.md §15 gives the layout.
//!
//! One [`RedisTransport`] per session holds three connections, each named with
//! `CLIENT SETNAME {namespace}:{tag}:{role}` so an operator (or a test) can find them:
//!
//! - `cmd`: every short command (XADD, XACK, PUBLISH, XGROUP, ...), multiplexed and
//!   pipelined, with the configured response timeout;
//! - `read`: one blocking `XREADGROUP` over every stream the session consumes (its
//!   machines' inboxes and its group memberships), without a response timeout: a
//!   blocking read outlives any (redis-rs' default of 500 ms would fail it, and a
//!   blocked multiplexed connection would hold up every other command on it);
//! - `sub`: the pub/sub connection (RESP3 pushes) with one `PSUBSCRIBE` per distinct
//!   pattern of the session.
//!
//! Each is supervised: a lost connection is made again with backoff; the subscriber
//! subscribes again, the reader first reads what it had read but not acknowledged
//! (history from id `0`), then new entries. Sends wait up to `outage_wait` for the
//! connection meanwhile.
//!
//! Consumer groups are round-robin: each member reads a stream of its own, and a
//! server-side script picks the member of each publish (`GROUP_PUBLISH`); members
//! keep an expiry fresh, and a member that expired is taken over by another.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, IntoConnectionInfo, PushInfo, PushKind, RedisError, Value};
use switchyard_core::{
    Address, Capabilities, DeliveryGuarantee, Envelope, Error, Filter, Inbox, Link, Location,
    MachineEntry, MachineId, MessageOrdering, Outgoing, OutgoingRef, PubSub, Reach, Result,
    Subscription, SubscriptionId, TopicPattern, Transport, TransportHealth,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::names::{FIELD, GROUP, Names};
use crate::settings::RedisTransportConfig;
use crate::wire;

/// The transport's name: `carried_by` of everything it delivers.
pub const NAME: &str = "redis";

/// Registry metadata key: the namespace a machine's session reads its inbox in. A sender
/// reaches the machine over Redis only when it uses the same namespace.
pub const META_NAMESPACE: &str = "redis.namespace";

/// Events one pipelined XADD round trip carries at most.
const SEND_BATCH: usize = 256;
/// Bytes one pipelined round trip carries at most (besides a single larger event).
const SEND_BYTES: usize = 1 << 20;
/// Publishes the publisher task pipelines in one round trip at most.
const PUBLISH_BATCH: usize = 512;

type Conn = watch::Sender<Option<MultiplexedConnection>>;

/// The Redis transport of one session; cheap to clone.
#[derive(Clone)]
pub struct RedisTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("url", &self.shared.cfg.redis.redacted_url())
            .field("namespace", &self.shared.cfg.redis.namespace)
            .field("tag", &self.shared.tag)
            .finish()
    }
}

/// Chooses a live member of a group (round robin over the members sorted by name, with a
/// counter every publisher shares) and appends the event to its stream, in one atomic step.
/// `KEYS`: members hash, counter; `ARGV`: member stream prefix, MAXLEN, field, envelope.
/// Returns 1, or 0 when the group has no live member. Expiries are server time, so hosts'
/// clocks do not matter.
const GROUP_PUBLISH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local live = {}
for i = 1, #all, 2 do
  if (tonumber(all[i + 1]) or 0) > now then live[#live + 1] = all[i] end
end
if #live == 0 then return 0 end
table.sort(live)
local n = redis.call('INCR', KEYS[2])
for k = 0, #live - 1 do
  local m = live[((n + k) % #live) + 1]
  if redis.call('XADD', ARGV[1] .. m, 'NOMKSTREAM', 'MAXLEN', '~', ARGV[2], '*', ARGV[3], ARGV[4]) then
    return 1
  end
end
return 0
";

/// Refreshes one member's expiry and returns the members whose expiry passed (dead, or
/// left: their streams are adopted). `KEYS`: members hash; `ARGV`: member, time to live (ms).
const GROUP_HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now + tonumber(ARGV[2]))
local all = redis.call('HGETALL', KEYS[1])
local dead = {}
for i = 1, #all, 2 do
  if (tonumber(all[i + 1]) or 0) <= now then dead[#dead + 1] = all[i] end
end
return dead
";

/// One membership of a consumer group.
#[derive(Clone)]
struct Membership {
    group: Arc<str>,
    member: String,
    stream: String,
    inbox: Inbox,
}

#[derive(Default)]
struct ReadSet {
    /// Bumped on every change, so the reader knows its blocking read is stale.
    generation: u64,
    /// Streams read, with the inbox each feeds (a machine's, or a group member's).
    streams: BTreeMap<String, Inbox>,
    /// Streams not read for now: their machine's mailbox is full (policy `Wait`) and a task
    /// delivers what was read from them as room comes.
    parked: HashSet<String>,
}

struct TopicSub {
    pattern: TopicPattern,
    glob: String,
    filter: Option<Filter>,
    inbox: Inbox,
}

#[derive(Default)]
struct Topics {
    subs: HashMap<SubscriptionId, Arc<TopicSub>>,
    /// `subs` in subscription order, rebuilt on change: what each message is matched against.
    snapshot: Arc<Vec<Arc<TopicSub>>>,
    /// PSUBSCRIBE patterns of the session, with how many subscriptions use each.
    globs: HashMap<String, usize>,
    /// Group memberships.
    groups: HashMap<SubscriptionId, Membership>,
}

impl Topics {
    fn rebuild(&mut self) {
        let mut subs: Vec<(SubscriptionId, Arc<TopicSub>)> =
            self.subs.iter().map(|(k, v)| (*k, v.clone())).collect();
        subs.sort_by_key(|(k, _)| k.0);
        self.snapshot = Arc::new(subs.into_iter().map(|(_, v)| v).collect());
    }
}

struct PubReq {
    channel: String,
    body: Vec<u8>,
    reply: Option<oneshot::Sender<Result<i64>>>,
}

struct Shared {
    cfg: RedisTransportConfig,
    names: Names,
    caps: Capabilities,
    /// Unique per transport: the consumer name in every group, and part of connection names.
    tag: String,
    client: redis::Client,
    cmd: Conn,
    sub: Conn,
    /// Client id of the reader connection, for `CLIENT UNBLOCK`.
    reader_id: Mutex<Option<i64>>,
    /// The read-set generation the reader last started a read with.
    reader_seen: AtomicU64,
    reader_started: AtomicBool,
    sub_started: AtomicBool,
    read: Mutex<ReadSet>,
    read_changed: watch::Sender<u64>,
    topics: Mutex<Topics>,
    /// Held while the subscriber's pattern set is applied to a connection.
    sub_topo: tokio::sync::Mutex<()>,
    publisher: mpsc::Sender<PubReq>,
    closed: AtomicBool,
    stop: watch::Sender<bool>,
    next_sub: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// The last publisher header built: (host, process, nearest, farthest, bytes).
    header_cache: Mutex<Option<HeaderCache>>,
}

type HeaderCache = (Arc<str>, Arc<str>, u8, u8, Arc<[u8]>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A Redis failure as a Switchyard error.
fn op_error(what: &str, e: &RedisError) -> Error {
    Error::Transport {
        transport: NAME,
        reason: format!("Redis {what} failed: {e}"),
        retryable: !matches!(e.kind(), redis::ErrorKind::AuthenticationFailed),
    }
}

/// The client for `cfg`, speaking RESP3 (pushes for pub/sub and disconnect notices).
fn make_client(cfg: &RedisTransportConfig) -> Result<redis::Client> {
    let url = cfg.redis.url.trim();
    let info = url.into_connection_info().map_err(|e| {
        Error::Config(format!(
            "bad Redis URL `{}`: {e}; expected redis://[user:password@]host[:port][/db] or \
             rediss://... for TLS",
            cfg.redis.redacted_url()
        ))
    })?;
    let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
    #[cfg(not(feature = "tls"))]
    if tls {
        return Err(Error::Config(format!(
            "`{}` asks for TLS (rediss://), which this build does not include: enable feature \
             `tls` of switchyard-redis (`redis-tls` of switchyard), or use a redis:// URL",
            cfg.redis.redacted_url()
        )));
    }
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    let info = info.set_redis_settings(settings);
    let bad = |e: redis::RedisError| {
        Error::Config(format!("bad Redis URL `{}`: {e}", cfg.redis.redacted_url()))
    };
    #[cfg(feature = "tls")]
    if tls && let Some(path) = &cfg.redis.tls_ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            Error::Config(format!(
                "cannot read the CA file {} for `{}`: {e}; give the PEM file of the CA that \
                 signed the server's certificate",
                path.display(),
                cfg.redis.redacted_url()
            ))
        })?;
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        };
        return redis::Client::build_with_tls(info, certs).map_err(bad);
    }
    let _ = tls;
    redis::Client::open(info).map_err(bad)
}

impl RedisTransport {
    /// Connects to the server of `cfg` (one attempt within `cfg.connect_timeout`) and starts
    /// the supervisors; a bad URL, refused credentials or an unreachable server is an error
    /// saying which. Must run inside a tokio runtime.
    pub async fn connect(cfg: RedisTransportConfig) -> Result<RedisTransport> {
        let (shared, pub_rx) = RedisTransport::build(cfg)?;
        // One attempt first, so a wrong URL or a server that is not there is this call's
        // error, before anything runs in the background.
        open(&shared, "probe", Some(shared.cfg.connect_timeout), None).await?;
        let t = RedisTransport::spawn(shared, pub_rx);
        t.ready(t.shared.cfg.outage_wait).await?;
        Ok(t)
    }

    /// Starts without waiting for the server: connections are made in the background
    /// (retried with backoff), and binds and sends wait up to `cfg.outage_wait` for them. A
    /// malformed URL is an error at once. Must run inside a tokio runtime.
    pub fn start(cfg: RedisTransportConfig) -> Result<RedisTransport> {
        let (shared, pub_rx) = RedisTransport::build(cfg)?;
        Ok(RedisTransport::spawn(shared, pub_rx))
    }

    /// The shared state of a transport, nothing started yet.
    fn build(cfg: RedisTransportConfig) -> Result<(Arc<Shared>, mpsc::Receiver<PubReq>)> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config(
                "RedisTransport::start and ::connect must run inside a tokio runtime".into(),
            ));
        }
        let client = make_client(&cfg)?;
        let names = Names::new(&cfg.redis.namespace)?;
        let caps = Capabilities {
            locations: vec![Location::Remote],
            ordering: MessageOrdering::PerSenderReceiver,
            delivery: DeliveryGuarantee::AtLeastOnce,
            max_message_size: Some(cfg.max_message),
            serializes: true,
            topics: true,
            groups: true,
            request: true,
            mailboxes: true,
            priority: true,
        };
        let tag = format!("{}-{:012x}", std::process::id(), fastrand::u64(..) >> 16);
        let (publisher, pub_rx) = mpsc::channel(4096);
        let shared = Arc::new(Shared {
            cfg,
            names,
            caps,
            tag,
            client,
            cmd: watch::channel(None).0,
            sub: watch::channel(None).0,
            reader_id: Mutex::new(None),
            reader_seen: AtomicU64::new(0),
            reader_started: AtomicBool::new(false),
            sub_started: AtomicBool::new(false),
            read: Mutex::new(ReadSet::default()),
            read_changed: watch::channel(0).0,
            topics: Mutex::new(Topics::default()),
            sub_topo: tokio::sync::Mutex::new(()),
            publisher,
            closed: AtomicBool::new(false),
            stop: watch::channel(false).0,
            next_sub: AtomicU64::new(1),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_error: Mutex::new(None),
            header_cache: Mutex::new(None),
        });
        Ok((shared, pub_rx))
    }

    /// Starts the command connection's supervisor and the publisher.
    fn spawn(shared: Arc<Shared>, pub_rx: mpsc::Receiver<PubReq>) -> RedisTransport {
        let weak = Arc::downgrade(&shared);
        tokio::spawn(supervise(weak.clone(), Role::Cmd, shared.stop.subscribe()));
        tokio::spawn(publish_loop(weak, pub_rx, shared.stop.subscribe()));
        RedisTransport { shared }
    }

    /// Waits until the command connection is up (or `timeout` passed: the last connection
    /// error, or a timeout error).
    pub async fn ready(&self, timeout: Duration) -> Result<()> {
        self.shared
            .wait_conn(&self.shared.cmd, tokio::time::Instant::now() + timeout)
            .await
            .map(drop)
    }

    /// The namespace (prefix of every key and channel).
    pub fn namespace(&self) -> &str {
        &self.shared.cfg.redis.namespace
    }

    /// The settings.
    pub fn config(&self) -> &RedisTransportConfig {
        &self.shared.cfg
    }

    /// The prefix of the names (`CLIENT SETNAME`) of this transport's connections:
    /// `{namespace}:{tag}:`, followed by `cmd`, `read` or `sub`.
    pub fn connection_name_prefix(&self) -> String {
        format!("{}:{}:", self.shared.cfg.redis.namespace, self.shared.tag)
    }

    /// The inbox stream of a machine with this id (for tools and tests).
    pub fn inbox_stream(&self, id: &str) -> String {
        self.shared.names.inbox(id)
    }

    /// The streams this transport's members of a group read (for tools and tests).
    pub fn group_member_streams(&self, group: &str) -> Vec<String> {
        lock(&self.shared.topics)
            .groups
            .values()
            .filter(|m| &*m.group == group)
            .map(|m| m.stream.clone())
            .collect()
    }

    /// Whether the command connection is up now.
    pub fn is_connected(&self) -> bool {
        self.shared.cmd.borrow().is_some()
    }
}

/// Which supervised connection.
#[derive(Clone, Copy, Debug)]
enum Role {
    Cmd,
    Sub,
}

/// Opens one named connection.
async fn open(
    sh: &Shared,
    role: &str,
    response_timeout: Option<Duration>,
    push: Option<mpsc::UnboundedSender<PushInfo>>,
) -> Result<MultiplexedConnection> {
    let mut cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(sh.cfg.connect_timeout))
        .set_response_timeout(response_timeout);
    if let Some(tx) = push {
        cfg = cfg.set_push_sender(tx);
    }
    let url = sh.cfg.redis.redacted_url();
    let mut c = sh
        .client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .map_err(|e| {
            let why = match e.kind() {
                redis::ErrorKind::AuthenticationFailed => {
                    "the server refused the credentials: check the user and password in the URL"
                }
                _ if e.is_io_error() || e.is_timeout() => {
                    "the server does not answer: is it running, and is the host and port right?"
                }
                _ => "see the error",
            };
            Error::Transport {
                transport: NAME,
                reason: format!("could not connect to Redis at {url}: {e} ({why})"),
                retryable: !matches!(e.kind(), redis::ErrorKind::AuthenticationFailed),
            }
        })?;
    let name = format!("{}:{}:{role}", sh.cfg.redis.namespace, sh.tag);
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(&name)
        .exec_async(&mut c)
        .await
        .map_err(|e| op_error("CLIENT SETNAME", &e))?;
    Ok(c)
}

fn next_delay(prev: Duration, cfg: &RedisTransportConfig) -> Duration {
    if prev.is_zero() {
        cfg.backoff_min
    } else {
        (prev * 2).min(cfg.backoff_max)
    }
}

/// Keeps one connection up until the transport closes: connects with backoff, restores
/// what the role needs, publishes it, and waits for the disconnect notice.
async fn supervise(weak: Weak<Shared>, role: Role, mut stop: watch::Receiver<bool>) {
    let mut delay = Duration::ZERO;
    loop {
        if !delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
        }
        let Some(sh) = weak.upgrade() else { return };
        if sh.closed.load(Ordering::Acquire) {
            return;
        }
        let (tx, mut pushes) = mpsc::unbounded_channel();
        let (label, timeout) = match role {
            Role::Cmd => ("cmd", Some(sh.cfg.redis.response_timeout)),
            Role::Sub => ("sub", Some(sh.cfg.redis.response_timeout)),
        };
        let attempt = tokio::select! {
            r = open(&sh, label, timeout, Some(tx)) => r,
            _ = stop.changed() => return,
        };
        let mut conn = match attempt {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, role = label, "Redis connection attempt failed; retrying");
                lock(&sh.last_error).replace(e.to_string());
                delay = next_delay(delay, &sh.cfg);
                continue;
            }
        };
        let slot = match role {
            Role::Cmd => &sh.cmd,
            Role::Sub => {
                let _topo = sh.sub_topo.lock().await;
                let globs: Vec<String> = lock(&sh.topics).globs.keys().cloned().collect();
                let mut failed = None;
                for g in globs {
                    if let Err(e) = conn.psubscribe(&g).await {
                        failed = Some(e);
                        break;
                    }
                }
                if let Some(e) = failed {
                    tracing::warn!(error = %e, "could not subscribe again; reconnecting");
                    lock(&sh.last_error).replace(e.to_string());
                    delay = next_delay(delay, &sh.cfg);
                    continue;
                }
                sh.sub.send_replace(Some(conn.clone()));
                &sh.sub
            }
        };
        if matches!(role, Role::Cmd) {
            slot.send_replace(Some(conn.clone()));
        }
        // Seen from here on: a command that saw the connection fail marks the slot down.
        let mut slot_rx = slot.subscribe();
        slot_rx.borrow_and_update();
        let weak_sh = Arc::downgrade(&sh);
        drop(sh);
        // Until the connection drops: dispatch what it pushes.
        loop {
            let push = tokio::select! {
                p = pushes.recv() => p,
                r = slot_rx.changed() => {
                    if r.is_err() || slot_rx.borrow_and_update().is_none() {
                        break;
                    }
                    continue;
                }
                _ = stop.changed() => return,
            };
            let Some(push) = push else { break };
            match push.kind {
                PushKind::Disconnection => break,
                PushKind::PMessage => {
                    let Some(sh) = weak_sh.upgrade() else { return };
                    dispatch_topic(&sh, push.data).await;
                }
                _ => {}
            }
        }
        let Some(sh) = weak_sh.upgrade() else { return };
        tracing::warn!(role = label, "Redis connection lost; reconnecting");
        lock(&sh.last_error).replace(format!("the {label} connection was lost"));
        match role {
            Role::Cmd => sh.cmd.send_replace(None),
            Role::Sub => sh.sub.send_replace(None),
        };
        drop(conn);
        delay = sh.cfg.backoff_min;
    }
}

impl Shared {
    fn closed_error(&self) -> Error {
        Error::Closed(NAME)
    }

    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.cfg.outage_wait
    }

    /// The connection of `slot`, waiting for it until `deadline` while it is being restored.
    async fn wait_conn(
        &self,
        slot: &Conn,
        deadline: tokio::time::Instant,
    ) -> Result<MultiplexedConnection> {
        let mut rx = slot.subscribe();
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(self.closed_error());
            }
            if let Some(c) = rx.borrow_and_update().clone() {
                return Ok(c);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(self.closed_error()),
                Err(_) => {
                    let last = lock(&self.last_error).clone();
                    return Err(Error::Transport {
                        transport: NAME,
                        reason: format!(
                            "not connected to Redis at {} (reconnecting; waited {:?}){}",
                            self.cfg.redis.redacted_url(),
                            self.cfg.outage_wait,
                            last.map(|e| format!("; last error: {e}"))
                                .unwrap_or_default()
                        ),
                        retryable: true,
                    });
                }
            }
        }
    }

    /// Runs one command on the command connection, waiting out an outage (bounded) and
    /// trying again once the connection is back when it was lost under the command.
    async fn run<T: redis::FromRedisValue>(&self, what: &str, cmd: &redis::Cmd) -> Result<T> {
        self.try_run(cmd).await?.map_err(|e| op_error(what, &e))
    }

    /// Like [`Shared::run`], with the server's answer (or error) as it came: the outer
    /// error is the outage, the inner one what Redis said.
    async fn try_run<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<std::result::Result<T, RedisError>> {
        let deadline = self.deadline();
        loop {
            let mut c = self.wait_conn(&self.cmd, deadline).await?;
            match cmd.query_async::<T>(&mut c).await {
                Err(e) if e.is_unrecoverable_error() && tokio::time::Instant::now() < deadline => {
                    lock(&self.last_error).replace(e.to_string());
                    self.connection_lost(&self.cmd);
                }
                r => return Ok(r),
            }
        }
    }

    /// Marks `slot` down after a command saw its connection fail, so waiters wait for the
    /// supervisor's new connection instead of failing on the dead one again. (Should the
    /// supervisor have replaced it already, it makes one more: harmless.)
    fn connection_lost(&self, slot: &Conn) {
        slot.send_if_modified(|c| {
            if c.is_some() {
                *c = None;
                true
            } else {
                false
            }
        });
    }

    /// Creates the consumer group of a stream (and the stream), if missing.
    async fn ensure_group(&self, key: &str) -> Result<()> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(key)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM");
        match self.try_run::<Value>(&cmd).await? {
            Ok(_) => {}
            // The group is there already (the stream is being read, or was before).
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(op_error("XGROUP CREATE", &e)),
        }
        if let Some(lease) = self.cfg.inbox_lease {
            let mut cmd = redis::cmd("PEXPIRE");
            cmd.arg(key).arg(lease.as_millis().max(1) as u64);
            self.run::<Value>("PEXPIRE", &cmd).await?;
        }
        Ok(())
    }

    /// Renews the lease of every inbox stream this session reads, in one round trip.
    async fn renew_leases(&self) {
        let Some(lease) = self.cfg.inbox_lease else {
            return;
        };
        let keys: Vec<String> = lock(&self.read).streams.keys().cloned().collect();
        if keys.is_empty() {
            return;
        }
        let Ok(mut c) = self.wait_conn(&self.cmd, self.deadline()).await else {
            return;
        };
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.cmd("PEXPIRE")
                .arg(k)
                .arg(lease.as_millis().max(1) as u64)
                .ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut c).await {
            tracing::warn!(error = %e, "renewing the inbox leases failed; retried at the next round");
        }
    }

    fn add_stream(self: &Arc<Self>, key: String, inbox: Inbox) {
        let generation = {
            let mut rs = lock(&self.read);
            rs.streams.insert(key, inbox);
            rs.generation += 1;
            rs.generation
        };
        self.read_changed.send_replace(generation);
        self.ensure_reader();
        self.wake_reader(generation);
    }

    fn remove_stream(self: &Arc<Self>, key: &str) {
        let generation = {
            let mut rs = lock(&self.read);
            rs.streams.remove(key);
            rs.generation += 1;
            rs.generation
        };
        self.read_changed.send_replace(generation);
        self.wake_reader(generation);
    }

    fn ensure_reader(self: &Arc<Self>) {
        if !self.reader_started.swap(true, Ordering::AcqRel) {
            tokio::spawn(read_loop(Arc::downgrade(self), self.stop.subscribe()));
            tokio::spawn(reclaim_loop(Arc::downgrade(self), self.stop.subscribe()));
        }
    }

    fn ensure_subscriber(self: &Arc<Self>) {
        if !self.sub_started.swap(true, Ordering::AcqRel) {
            tokio::spawn(supervise(
                Arc::downgrade(self),
                Role::Sub,
                self.stop.subscribe(),
            ));
        }
    }

    /// Gets the reader out of a blocking read that started before the read set changed, so
    /// it reads the new set: `CLIENT UNBLOCK` until it reports the new generation (a read
    /// sent just before the unblock arrived would otherwise block on the old set).
    fn wake_reader(self: &Arc<Self>, generation: u64) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            for _ in 0..400 {
                let Some(sh) = weak.upgrade() else { return };
                if sh.closed.load(Ordering::Acquire)
                    || sh.reader_seen.load(Ordering::Acquire) >= generation
                {
                    return;
                }
                let id = *lock(&sh.reader_id);
                let conn = sh.cmd.borrow().clone();
                if let (Some(id), Some(mut c)) = (id, conn) {
                    let _ = redis::cmd("CLIENT")
                        .arg("UNBLOCK")
                        .arg(id)
                        .query_async::<Value>(&mut c)
                        .await;
                }
                drop(sh);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }

    /// Refreshes a membership's expiry; returns the group's expired members.
    async fn heartbeat(&self, group: &str, member: &str) -> Result<Vec<String>> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(GROUP_HEARTBEAT)
            .arg(1)
            .arg(self.names.group_members(group))
            .arg(member)
            .arg(self.cfg.claim_idle.as_millis().max(1) as u64);
        self.run("EVAL", &cmd).await
    }

    async fn ack(&self, key: &str, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let mut cmd = redis::cmd("XACK");
        cmd.arg(key).arg(GROUP).arg(ids);
        if let Err(e) = self.run::<Value>("XACK", &cmd).await {
            // Not acknowledged: the entries stay pending and are delivered again (at least once).
            tracing::warn!(stream = key, error = %e, "could not acknowledge entries");
        }
    }
}

/// One stream entry as read: its id and its envelope field (`None`: missing or deleted).
struct Entry {
    id: String,
    body: Option<Vec<u8>>,
    fields: usize,
}

fn value_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        _ => None,
    }
}

fn value_string(v: Value) -> Option<String> {
    value_bytes(v).and_then(|b| String::from_utf8(b).ok())
}

/// Entries of one stream: `[[id, [field, value, ...]], ...]`.
fn parse_entries(v: Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut parts) = item else {
            continue;
        };
        if parts.is_empty() {
            continue;
        }
        let fields_v = if parts.len() > 1 {
            parts.swap_remove(1)
        } else {
            Value::Nil
        };
        let Some(id) = value_string(parts.swap_remove(0)) else {
            continue;
        };
        let pairs: Vec<(Value, Value)> = match fields_v {
            Value::Array(flat) => {
                let mut it = flat.into_iter();
                let mut pairs = Vec::new();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    pairs.push((k, v));
                }
                pairs
            }
            Value::Map(m) => m,
            _ => Vec::new(),
        };
        let fields = pairs.len();
        let body = pairs
            .into_iter()
            .find(|(k, _)| {
                matches!(k, Value::BulkString(b) if b == FIELD.as_bytes())
                    || matches!(k, Value::SimpleString(s) if s == FIELD)
            })
            .and_then(|(_, v)| value_bytes(v));
        out.push(Entry { id, body, fields });
    }
    out
}

/// An `XREADGROUP` reply: per stream, its entries (RESP3 map or RESP2 array).
fn parse_read(v: Value) -> Vec<(String, Vec<Entry>)> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Map(m) => m,
        Value::Array(a) => a
            .into_iter()
            .filter_map(|kv| match kv {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let v = kv.swap_remove(1);
                    let k = kv.swap_remove(0);
                    Some((k, v))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(k, v)| Some((value_string(k)?, parse_entries(v))))
        .collect()
}

/// Reads every stream of the session through one blocking `XREADGROUP` on a connection of
/// its own, delivers, and acknowledges once handled; reconnects when the connection drops.
async fn read_loop(weak: Weak<Shared>, mut stop: watch::Receiver<bool>) {
    let mut delay = Duration::ZERO;
    // Handled entries to acknowledge with the next read; kept across a reconnection, so
    // the first read on the new connection does not hand them out again.
    let mut acks: Vec<(String, Vec<String>)> = Vec::new();
    loop {
        if !delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
        }
        let Some(sh) = weak.upgrade() else { return };
        if sh.closed.load(Ordering::Acquire) {
            return;
        }
        let mut conn = match open(&sh, "read", None, None).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "Redis reader connection failed; retrying");
                lock(&sh.last_error).replace(e.to_string());
                delay = next_delay(delay, &sh.cfg);
                continue;
            }
        };
        match redis::cmd("CLIENT")
            .arg("ID")
            .query_async::<i64>(&mut conn)
            .await
        {
            Ok(id) => *lock(&sh.reader_id) = Some(id),
            Err(e) => {
                lock(&sh.last_error).replace(e.to_string());
                delay = next_delay(delay, &sh.cfg);
                continue;
            }
        }
        let mut changed = sh.read_changed.subscribe();
        drop(sh);
        // Per stream: the id after which to read our own pending entries again, or `>` for
        // new ones. A fresh connection starts every stream at `0`: what was read but not
        // acknowledged before comes first, so nothing is lost.
        let mut cursors: HashMap<String, String> = HashMap::new();
        loop {
            let Some(sh) = weak.upgrade() else { return };
            if sh.closed.load(Ordering::Acquire) {
                return;
            }
            let (generation, all, streams) = {
                let rs = lock(&sh.read);
                let read: BTreeMap<String, Inbox> = rs
                    .streams
                    .iter()
                    .filter(|(k, _)| !rs.parked.contains(*k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let all: HashSet<String> = rs.streams.keys().cloned().collect();
                (rs.generation, all, read)
            };
            changed.borrow_and_update();
            sh.reader_seen.store(generation, Ordering::Release);
            // A parked stream keeps its cursor: it is read on from there once unparked.
            cursors.retain(|k, _| all.contains(k));
            if streams.is_empty() {
                drop(sh);
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    _ = stop.changed() => return,
                }
                continue;
            }
            for k in streams.keys() {
                cursors.entry(k.clone()).or_insert_with(|| "0".to_string());
            }
            let history = streams
                .keys()
                .any(|k| cursors.get(k).is_some_and(|c| c != ">"));
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(GROUP)
                .arg(&sh.tag)
                .arg("COUNT")
                .arg(sh.cfg.read_count.max(1));
            if !history {
                cmd.arg("BLOCK")
                    .arg(sh.cfg.block.as_millis().clamp(1, 3_600_000) as u64);
            }
            cmd.arg("STREAMS");
            for k in streams.keys() {
                cmd.arg(k);
            }
            for k in streams.keys() {
                cmd.arg(cursors.get(k).map_or("0", |c| c.as_str()));
            }
            drop(sh);
            // What the last read handled is acknowledged in the same round trip as the next
            // read (XACKs first): no extra round trip, and a lost connection only means
            // those entries are read again (at least once).
            let mut pipe = redis::pipe();
            for (key, ids) in &acks {
                pipe.cmd("XACK").arg(key).arg(GROUP).arg(ids).ignore();
            }
            pipe.add_command(cmd);
            let reply = tokio::select! {
                r = pipe.query_async::<Vec<Value>>(&mut conn) => {
                    r.map(|mut v| v.pop().unwrap_or(Value::Nil))
                }
                _ = stop.changed() => return,
            };
            let Some(sh) = weak.upgrade() else { return };
            if !reply.as_ref().is_err_and(|e| e.is_unrecoverable_error()) {
                // Sent: acknowledged (acknowledging again after a lost connection is harmless).
                acks.clear();
            }
            match reply {
                Ok(v) => {
                    let got = parse_read(v);
                    let mut seen: HashSet<String> = HashSet::new();
                    for (key, entries) in got {
                        seen.insert(key.clone());
                        if history && cursors.get(&key).is_some_and(|c| c != ">") {
                            match entries.last() {
                                Some(e) => {
                                    cursors.insert(key.clone(), e.id.clone());
                                }
                                None => {
                                    cursors.insert(key.clone(), ">".to_string());
                                }
                            }
                        }
                        if let Some(inbox) = streams.get(&key) {
                            let ids = handle_entries(&sh, &key, inbox, entries).await;
                            if !ids.is_empty() {
                                acks.push((key.clone(), ids));
                            }
                        }
                    }
                    if history {
                        // A stream in history mode that returned nothing has no more pending.
                        for (k, c) in cursors.iter_mut() {
                            if c != ">" && streams.contains_key(k) && !seen.contains(k) {
                                *c = ">".to_string();
                            }
                        }
                    }
                }
                Err(e) if e.is_unrecoverable_error() => {
                    tracing::warn!(error = %e, "Redis reader connection lost; reconnecting");
                    lock(&sh.last_error).replace(e.to_string());
                    delay = sh.cfg.backoff_min;
                    break;
                }
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        // A stream of the set was deleted (or never made): make it again,
                        // since this session still reads it.
                        for k in streams.keys() {
                            if let Err(e) = sh.ensure_group(k).await {
                                tracing::warn!(stream = %k, error = %e, "could not create the consumer group");
                            }
                        }
                    } else if !e.to_string().contains("UNBLOCKED") {
                        tracing::warn!(error = %e, "XREADGROUP failed");
                        lock(&sh.last_error).replace(e.to_string());
                        let pause = sh.cfg.backoff_min;
                        drop(sh);
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = stop.changed() => return,
                        }
                    }
                }
            }
        }
    }
}

/// Adopts the stream of a group member that expired (died, or left): delivers what it
/// read but did not acknowledge and what it never read to `inbox` (a member of the same
/// group here), then deletes the stream. Removing the member from the hash first makes one
/// adopter win when several see it expire.
async fn adopt(sh: &Arc<Shared>, group: &str, dead: &str, inbox: &Inbox) {
    let members = sh.names.group_members(group);
    let mut hdel = redis::cmd("HDEL");
    hdel.arg(&members).arg(dead);
    if !matches!(sh.run::<i64>("HDEL", &hdel).await, Ok(1)) {
        return;
    }
    let key = sh.names.member_stream(group, dead);
    let mut pending = redis::cmd("XPENDING");
    pending.arg(&key).arg(GROUP).arg("-").arg("+").arg(10_000);
    if let Ok(Value::Array(rows)) = sh.run::<Value>("XPENDING", &pending).await {
        let ids: Vec<String> = rows
            .into_iter()
            .filter_map(|row| match row {
                Value::Array(mut f) if !f.is_empty() => value_string(f.swap_remove(0)),
                _ => None,
            })
            .collect();
        if !ids.is_empty() {
            let mut claim = redis::cmd("XCLAIM");
            claim.arg(&key).arg(GROUP).arg(&sh.tag).arg(0).arg(&ids);
            if let Ok(v) = sh.run::<Value>("XCLAIM", &claim).await {
                let entries = parse_entries(v);
                tracing::info!(
                    group,
                    member = dead,
                    claimed = entries.len(),
                    "took over what a group member that left or died had not acknowledged"
                );
                let acks = handle_entries(sh, &key, inbox, entries).await;
                sh.ack(&key, &acks).await;
            }
        }
    }
    loop {
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(GROUP)
            .arg(&sh.tag)
            .arg("COUNT")
            .arg(sh.cfg.read_count.max(1))
            .arg("STREAMS")
            .arg(&key)
            .arg(">");
        let Ok(v) = sh.run::<Value>("XREADGROUP", &read).await else {
            break;
        };
        let entries: Vec<Entry> = parse_read(v).into_iter().flat_map(|(_, e)| e).collect();
        if entries.is_empty() {
            break;
        }
        let acks = handle_entries(sh, &key, inbox, entries).await;
        sh.ack(&key, &acks).await;
    }
    let mut del = redis::cmd("DEL");
    del.arg(&key);
    let _ = sh.run::<Value>("DEL", &del).await;
}

/// Takes, every `claim_idle / 2`, the entries other consumers of the session's streams
/// read but did not acknowledge within `claim_idle` (a member that died), and delivers them.
///
/// `XPENDING ... IDLE` then `XCLAIM` rather than `XAUTOCLAIM`: the latter would also take
/// this session's own entries whose (async) handler is still running, delivering them twice.
async fn reclaim_loop(weak: Weak<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let period = match weak.upgrade() {
            Some(sh) => {
                let lease = sh.cfg.inbox_lease.unwrap_or(Duration::MAX);
                (sh.cfg.claim_idle.min(lease) / 3).max(Duration::from_millis(50))
            }
            None => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
        let Some(sh) = weak.upgrade() else { return };
        if sh.closed.load(Ordering::Acquire) {
            return;
        }
        sh.renew_leases().await;
        let members: Vec<Membership> = lock(&sh.topics).groups.values().cloned().collect();
        for m in members {
            match sh.heartbeat(&m.group, &m.member).await {
                Ok(dead) => {
                    for d in dead {
                        adopt(&sh, &m.group, &d, &m.inbox).await;
                    }
                }
                Err(e) => tracing::warn!(group = %m.group, error = %e, "group heartbeat failed"),
            }
        }
        let streams = lock(&sh.read).streams.clone();
        let idle = sh.cfg.claim_idle.as_millis().max(1) as u64;
        for (key, inbox) in streams {
            let mut cmd = redis::cmd("XPENDING");
            cmd.arg(&key)
                .arg(GROUP)
                .arg("IDLE")
                .arg(idle)
                .arg("-")
                .arg("+")
                .arg(256);
            let Ok(Value::Array(rows)) = sh.run::<Value>("XPENDING", &cmd).await else {
                continue;
            };
            let ids: Vec<String> = rows
                .into_iter()
                .filter_map(|row| {
                    let Value::Array(mut f) = row else {
                        return None;
                    };
                    if f.len() < 2 {
                        return None;
                    }
                    let consumer = value_string(f.swap_remove(1))?;
                    let id = value_string(f.swap_remove(0))?;
                    (consumer != sh.tag).then_some(id)
                })
                .collect();
            if ids.is_empty() {
                continue;
            }
            let mut claim = redis::cmd("XCLAIM");
            claim.arg(&key).arg(GROUP).arg(&sh.tag).arg(idle).arg(&ids);
            match sh.run::<Value>("XCLAIM", &claim).await {
                Ok(v) => {
                    let entries = parse_entries(v);
                    tracing::info!(stream = %key, claimed = entries.len(), "claimed entries another consumer did not acknowledge");
                    let acks = handle_entries(&sh, &key, &inbox, entries).await;
                    sh.ack(&key, &acks).await;
                }
                Err(e) => tracing::warn!(stream = %key, error = %e, "XCLAIM failed"),
            }
        }
    }
}

/// What became of one delivered entry.
enum Outcome {
    /// Handled (or dropped on purpose, counted): acknowledge now.
    Ack,
    /// Queued for an async handler: acknowledge once it ran.
    AckWhen(switchyard_core::Handled),
    /// The machine is gone: leave it pending.
    Leave,
}

async fn deliver_entry(sh: &Shared, inbox: &Inbox, env: Envelope) -> Outcome {
    match inbox.deliver_tracked(env).await {
        Ok(done) => {
            sh.delivered.fetch_add(1, Ordering::Relaxed);
            if inbox.is_sync() {
                Outcome::Ack
            } else {
                Outcome::AckWhen(done)
            }
        }
        Err(Error::TargetGone(_)) | Err(Error::SessionClosed) => Outcome::Leave,
        Err(e) => {
            // Refused by the mailbox policy (`Fail`): dropped here, counted.
            tracing::debug!(machine = %inbox.id(), error = %e, "event refused by the mailbox");
            inbox.count_dropped();
            sh.dropped.fetch_add(1, Ordering::Relaxed);
            Outcome::Ack
        }
    }
}

/// The envelope of an entry; a malformed entry is logged and counted (`None`: acknowledge
/// and skip it).
fn decode_entry(sh: &Shared, key: &str, entry: &Entry) -> Option<Envelope> {
    match entry.body.as_deref().map(wire::decode) {
        Some(Ok(env)) => Some(env),
        other => {
            sh.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                stream = key,
                id = %entry.id,
                fields = entry.fields,
                error = %other.and_then(|r| r.err()).map_or_else(
                    || format!("no `{FIELD}` field (or the entry was deleted)"),
                    |e| e.to_string()
                ),
                "skipped a malformed entry (not a Switchyard envelope); acknowledged"
            );
            None
        }
    }
}

/// Records what became of entry `id`: acknowledge now (pushed to `acks`), after its async
/// handler ran (on a task), or never (the machine is gone).
fn settle(sh: &Arc<Shared>, key: &str, id: String, outcome: Outcome, acks: &mut Vec<String>) {
    match outcome {
        Outcome::Ack => acks.push(id),
        Outcome::Leave => {}
        Outcome::AckWhen(done) => {
            let weak = Arc::downgrade(sh);
            let key = key.to_string();
            tokio::spawn(async move {
                done.await;
                if let Some(sh) = weak.upgrade() {
                    sh.ack(&key, &[id]).await;
                }
            });
        }
    }
}

type Delivery = std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send>>;

/// Delivers the entries read from one stream. Returns the ids handled now, for the caller
/// to acknowledge; an async handler's entry is acknowledged after its handler ran, on a
/// task, so the reader keeps reading (the handler may wait for a reply that comes this way).
///
/// When an async handler's mailbox is full and its policy is `Wait`, the reader does not
/// wait with it (that would stall every other machine of the session): the stream is
/// parked, and a task delivers the rest of the batch as room comes, acknowledges it and
/// unparks the stream. Redis keeps what arrives meanwhile.
async fn handle_entries(
    sh: &Arc<Shared>,
    key: &str,
    inbox: &Inbox,
    entries: Vec<Entry>,
) -> Vec<String> {
    let mut acks = Vec::with_capacity(entries.len());
    let mut rest = entries.into_iter();
    while let Some(entry) = rest.next() {
        let Some(env) = decode_entry(sh, key, &entry) else {
            acks.push(entry.id);
            continue;
        };
        if inbox.is_sync() {
            // Runs the handler here; never waits for room.
            let outcome = deliver_entry(sh, inbox, env).await;
            settle(sh, key, entry.id, outcome, &mut acks);
            continue;
        }
        let (sh2, inbox2) = (sh.clone(), inbox.clone());
        let mut delivery: Delivery =
            Box::pin(async move { deliver_entry(&sh2, &inbox2, env).await });
        match futures_util::FutureExt::now_or_never(&mut delivery) {
            Some(outcome) => settle(sh, key, entry.id, outcome, &mut acks),
            None => {
                park(sh, key, inbox, (entry.id, delivery), rest.collect());
                break;
            }
        }
    }
    acks
}

/// Stops reading `key` while a task finishes `waiting` and delivers `rest` (see
/// [`handle_entries`]).
fn park(sh: &Arc<Shared>, key: &str, inbox: &Inbox, waiting: (String, Delivery), rest: Vec<Entry>) {
    lock(&sh.read).parked.insert(key.to_string());
    let (weak, key, inbox) = (Arc::downgrade(sh), key.to_string(), inbox.clone());
    tokio::spawn(async move {
        let (id, delivery) = waiting;
        let outcome = delivery.await;
        let Some(sh) = weak.upgrade() else { return };
        let mut acks = Vec::new();
        settle(&sh, &key, id, outcome, &mut acks);
        for entry in rest {
            match decode_entry(&sh, &key, &entry) {
                Some(env) => {
                    let outcome = deliver_entry(&sh, &inbox, env).await;
                    settle(&sh, &key, entry.id, outcome, &mut acks);
                }
                None => acks.push(entry.id),
            }
        }
        sh.ack(&key, &acks).await;
        let generation = {
            let mut rs = lock(&sh.read);
            rs.parked.remove(&key);
            rs.generation += 1;
            rs.generation
        };
        sh.read_changed.send_replace(generation);
        sh.wake_reader(generation);
    });
}

/// Where a subscriber is relative to the publisher.
fn location_of(host: &str, process: &str, sub: &MachineEntry) -> Location {
    if &*sub.host_id != host {
        Location::Remote
    } else if &*sub.process_id != process {
        Location::SameMachine
    } else {
        Location::SameProcess
    }
}

fn location_from(n: u8) -> Location {
    Location::ALL[usize::from(n.min(3))]
}

/// Delivers one pushed `pmessage` (`[pattern, channel, payload]`) to the session's
/// matching subscriptions.
///
/// Redis sends a message once per matching pattern of the connection, and a glob may match
/// more than the topic pattern it came from; so a machine gets the message only with the
/// smallest of its subscriptions' globs that matches exactly, which happens once.
async fn dispatch_topic(sh: &Shared, data: Vec<Value>) {
    let mut it = data.into_iter();
    let (Some(pattern), Some(channel), Some(payload)) = (
        it.next().and_then(value_bytes),
        it.next().and_then(value_bytes),
        it.next().and_then(value_bytes),
    ) else {
        return;
    };
    let Some(topic) = sh.names.topic_of(&channel) else {
        return;
    };
    let (header, env) = match wire::split_topic_message(&payload) {
        Ok(x) => x,
        Err(e) => {
            sh.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic, bytes = payload.len(), error = %e, "skipped a malformed topic message (not a Switchyard publish)");
            return;
        }
    };
    if !matches!(&env.target, Address::Topic(t) if &**t == topic) {
        sh.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(topic, target = %env.target, "skipped a topic message whose envelope names another target");
        return;
    }
    let reach = Reach::new(
        location_from(header.nearest),
        location_from(header.farthest),
    );
    let subs = lock(&sh.topics).snapshot.clone();
    let parts: Vec<&str> = topic.split('.').collect();
    let matching: Vec<&Arc<TopicSub>> = subs
        .iter()
        .filter(|s| s.pattern.matches_segments(&parts))
        .collect();
    // Who gets it with this message: per machine, its first subscription (in order) whose
    // glob is the smallest among its matching ones equal to the message's pattern, within
    // reach and passing its filter.
    let mut targets: Vec<&Arc<TopicSub>> = Vec::with_capacity(matching.len());
    for s in &matching {
        let id = s.inbox.id();
        if targets.iter().any(|t| t.inbox.id() == id) {
            continue;
        }
        let smallest = matching
            .iter()
            .filter(|o| o.inbox.id() == id)
            .map(|o| o.glob.as_str())
            .min()
            .unwrap_or(s.glob.as_str());
        if smallest.as_bytes() != &pattern[..] {
            continue;
        }
        if !reach.covers(location_of(&header.host, &header.process, s.inbox.entry())) {
            continue;
        }
        // A machine's filters: the first subscription whose filter takes it delivers.
        let Some(chosen) = matching
            .iter()
            .filter(|o| o.inbox.id() == id)
            .find(|o| o.filter.as_ref().is_none_or(|f| f(&env)))
        else {
            continue;
        };
        targets.push(chosen);
    }
    let last = targets.len().saturating_sub(1);
    let mut env = Some(env);
    for (i, s) in targets.into_iter().enumerate() {
        // The last one takes the envelope itself; the others a copy.
        let ev = if i == last { env.take() } else { env.clone() };
        let Some(ev) = ev else { break };
        match s.inbox.deliver(ev).await {
            Ok(()) => {
                sh.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => s.inbox.count_dropped(),
        }
    }
}

/// Sends queued publishes in order, pipelining whatever is waiting into one round trip.
async fn publish_loop(
    weak: Weak<Shared>,
    mut rx: mpsc::Receiver<PubReq>,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch: Vec<PubReq> = Vec::new();
    loop {
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = stop.changed() => return,
        };
        let Some(first) = first else { return };
        batch.push(first);
        while batch.len() < PUBLISH_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let Some(sh) = weak.upgrade() else { return };
        let result = match sh.wait_conn(&sh.cmd, sh.deadline()).await {
            Ok(mut c) => {
                let mut pipe = redis::pipe();
                for r in &batch {
                    pipe.cmd("PUBLISH").arg(&r.channel).arg(&r.body);
                }
                pipe.query_async::<Vec<i64>>(&mut c).await.map_err(|e| {
                    if e.is_unrecoverable_error() {
                        sh.connection_lost(&sh.cmd);
                    }
                    op_error("PUBLISH", &e)
                })
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(counts) => {
                for (r, n) in batch.drain(..).zip(counts) {
                    if let Some(tx) = r.reply {
                        let _ = tx.send(Ok(n));
                    }
                }
            }
            Err(e) => {
                let mut emitted = 0usize;
                for r in batch.drain(..) {
                    match r.reply {
                        Some(tx) => {
                            let _ = tx.send(Err(e.clone()));
                        }
                        None => emitted += 1,
                    }
                }
                if emitted > 0 {
                    sh.dropped.fetch_add(emitted as u64, Ordering::Relaxed);
                    tracing::warn!(error = %e, lost = emitted, "emitted topic messages were not published");
                }
            }
        }
    }
}

#[async_trait]
impl Transport for RedisTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> &Capabilities {
        &self.shared.caps
    }

    async fn bind(&self, entry: &MachineEntry, inbox: Inbox) -> Result<()> {
        let sh = &self.shared;
        if sh.closed.load(Ordering::Acquire) {
            return Err(sh.closed_error());
        }
        let key = sh.names.inbox(entry.id.as_str());
        sh.ensure_group(&key).await?;
        sh.add_stream(key, inbox);
        Ok(())
    }

    async fn unbind(&self, id: &MachineId) -> Result<()> {
        let sh = &self.shared;
        let key = sh.names.inbox(id.as_str());
        let was = lock(&sh.read).streams.contains_key(&key);
        if !was {
            return Ok(());
        }
        sh.remove_stream(&key);
        if !sh.closed.load(Ordering::Acquire) {
            // The machine left: what is still queued for it goes with it, and later sends
            // find no stream (`TargetGone`) instead of filling one nobody reads.
            let mut del = redis::cmd("DEL");
            del.arg(&key);
            sh.run::<Value>("DEL", &del).await?;
        }
        Ok(())
    }

    async fn link(&self, to: &MachineEntry) -> Result<Arc<dyn Link>> {
        let sh = &self.shared;
        if sh.closed.load(Ordering::Acquire) {
            return Err(sh.closed_error());
        }
        match to.metadata.get(META_NAMESPACE) {
            Some(ns) if ns == &sh.cfg.redis.namespace => {}
            other => {
                return Err(Error::Transport {
                    transport: NAME,
                    reason: format!(
                        "machine `{}` is not reachable over Redis namespace `{}` (it advertises {}): \
                         give its session the redis transport with the same namespace",
                        to.id,
                        sh.cfg.redis.namespace,
                        other.map_or("none".to_string(), |n| format!("`{n}`"))
                    ),
                    retryable: true,
                });
            }
        }
        Ok(Arc::new(RedisLink {
            shared: sh.clone(),
            to: to.id.clone(),
            key: sh.names.inbox(to.id.as_str()),
        }))
    }

    fn pubsub(&self) -> Option<&dyn PubSub> {
        Some(self)
    }

    fn health(&self) -> TransportHealth {
        let sh = &self.shared;
        let up = self.is_connected();
        TransportHealth {
            healthy: up && !sh.closed.load(Ordering::Acquire),
            detail: if up {
                format!("connected to {}", sh.cfg.redis.redacted_url())
            } else {
                format!(
                    "not connected to {}{}",
                    sh.cfg.redis.redacted_url(),
                    lock(&sh.last_error)
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )
            },
            delivered: sh.delivered.load(Ordering::Relaxed),
            dropped: sh.dropped.load(Ordering::Relaxed),
        }
    }

    fn close(&self) {
        let sh = &self.shared;
        if sh.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        sh.stop.send_replace(true);
        // The inboxes hold their machines (and through them the session): let them go.
        {
            let mut rs = lock(&sh.read);
            rs.streams.clear();
            rs.generation += 1;
        }
        let left: Vec<Membership> = {
            let mut t = lock(&sh.topics);
            t.subs.clear();
            t.snapshot = Arc::default();
            t.groups.drain().map(|(_, m)| m).collect()
        };
        // Memberships end now rather than when they expire: publishes go to the others at
        // once, and they adopt what this session's member streams still hold.
        if let (Some(mut c), false, Ok(rt)) = (
            sh.cmd.borrow().clone(),
            left.is_empty(),
            tokio::runtime::Handle::try_current(),
        ) {
            let names: Vec<(String, String)> = left
                .iter()
                .map(|m| (sh.names.group_members(&m.group), m.member.clone()))
                .collect();
            rt.spawn(async move {
                let mut pipe = redis::pipe();
                for (hash, member) in names {
                    pipe.cmd("HSET").arg(hash).arg(member).arg(0).ignore();
                }
                let _ = pipe.query_async::<Value>(&mut c).await;
            });
        }
        sh.cmd.send_replace(None);
        sh.sub.send_replace(None);
    }
}

/// A resolved way to one machine: its inbox stream.
struct RedisLink {
    shared: Arc<Shared>,
    to: MachineId,
    key: String,
}

/// Puts encoded-but-unsent events back in front of `out`, in order.
fn give_back(out: &mut dyn Outgoing, bodies: Vec<Vec<u8>>) {
    for body in bodies.into_iter().rev() {
        if let Ok(env) = Envelope::decode(&body) {
            out.push_front(env);
        }
    }
}

/// Appends encoded events to a stream in one pipelined round trip, waiting out an outage
/// (bounded) and sending again what a lost connection may not have taken (at least once).
/// On failure, gives back the error and the events not known to be in the stream.
async fn xadd_batch(
    sh: Arc<Shared>,
    to: MachineId,
    key: String,
    mut bodies: Vec<Vec<u8>>,
    deadline: tokio::time::Instant,
) -> std::result::Result<(), (Error, Vec<Vec<u8>>)> {
    let maxlen = sh.cfg.stream_maxlen.to_string();
    loop {
        let mut conn = match sh.wait_conn(&sh.cmd, deadline).await {
            Ok(c) => c,
            Err(e) => return Err((e, bodies)),
        };
        let mut pipe = redis::pipe();
        for b in &bodies {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("NOMKSTREAM")
                .arg("MAXLEN")
                .arg("~")
                .arg(&maxlen)
                .arg("*")
                .arg(FIELD)
                .arg(b);
        }
        match pipe.query_async::<Vec<Option<String>>>(&mut conn).await {
            Ok(ids) => {
                return match ids.iter().position(|id| id.is_none()) {
                    // No stream: the machine is bound nowhere (it left, or its session
                    // closed). What went before it is in; the rest is not.
                    Some(gone) => Err((Error::TargetGone(to), bodies.split_off(gone))),
                    None => Ok(()),
                };
            }
            Err(e) if e.is_unrecoverable_error() => {
                lock(&sh.last_error).replace(e.to_string());
                sh.connection_lost(&sh.cmd);
                if tokio::time::Instant::now() >= deadline {
                    let err = Error::Transport {
                        transport: NAME,
                        reason: format!(
                            "lost the connection to Redis at {} and it did not come back within {:?}",
                            sh.cfg.redis.redacted_url(),
                            sh.cfg.outage_wait
                        ),
                        retryable: true,
                    };
                    return Err((err, bodies));
                }
            }
            Err(e) => return Err((op_error("XADD", &e), bodies)),
        }
    }
}

#[async_trait]
impl Link for RedisLink {
    async fn send(&self, out: &mut dyn Outgoing) -> Result<()> {
        let sh = &self.shared;
        if sh.closed.load(Ordering::Acquire) {
            return Err(sh.closed_error());
        }
        let deadline = sh.deadline();
        let mut scratch = Vec::new();
        while !out.is_empty() {
            // Take a batch off the front, encoded; what fails to encode stops the batch.
            let mut bodies: Vec<Vec<u8>> = Vec::new();
            let mut bytes = 0usize;
            let mut failed = None;
            while bodies.len() < SEND_BATCH && (bodies.is_empty() || bytes < SEND_BYTES) {
                let Some(ev) = out.front() else { break };
                let body = match wire::encode(&ev, &mut scratch) {
                    Ok(b) => b,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                };
                if body.len() > sh.cfg.max_message {
                    failed = Some(Error::TooLarge {
                        transport: NAME,
                        size: body.len(),
                        limit: sh.cfg.max_message,
                    });
                    break;
                }
                bytes += body.len();
                out.advance();
                bodies.push(body);
            }
            if !bodies.is_empty() {
                // On a task of its own: once the events left `out` they must reach Redis even
                // if this future is dropped (a post polls it once), and a dropped redis-rs
                // request is never written.
                let task = tokio::spawn(xadd_batch(
                    sh.clone(),
                    self.to.clone(),
                    self.key.clone(),
                    bodies,
                    deadline,
                ));
                match task.await {
                    Ok(Ok(())) => {}
                    Ok(Err((e, unsent))) => {
                        give_back(out, unsent);
                        return Err(e);
                    }
                    Err(_) => return Err(sh.closed_error()),
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    }

    fn is_open(&self) -> bool {
        !self.shared.closed.load(Ordering::Acquire)
    }
}

impl RedisTransport {
    async fn add_group(&self, from: &MachineEntry, env: &Envelope, group: &str) -> Result<usize> {
        let _ = from;
        let sh = &self.shared;
        let body = env.encode()?;
        if body.len() > sh.cfg.max_message {
            return Err(Error::TooLarge {
                transport: NAME,
                size: body.len(),
                limit: sh.cfg.max_message,
            });
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(GROUP_PUBLISH)
            .arg(2)
            .arg(sh.names.group_members(group))
            .arg(sh.names.group_counter(group))
            .arg(sh.names.member_prefix(group))
            .arg(sh.cfg.stream_maxlen)
            .arg(FIELD)
            .arg(body);
        // On a task, so a dropped caller does not cancel a publish half-way.
        let sh = sh.clone();
        let n: i64 = tokio::spawn(async move { sh.run("EVAL", &cmd).await })
            .await
            .map_err(|_| self.shared.closed_error())??;
        Ok(usize::from(n > 0))
    }

    /// The channel message of a publish: the publisher header (cached: a session publishes
    /// from few machines and reaches) and the envelope, built in one buffer.
    fn topic_body(&self, from: &MachineEntry, env: &Envelope, reach: Reach) -> Result<Vec<u8>> {
        let sh = &self.shared;
        let (near, far) = (reach.nearest as u8, reach.farthest as u8);
        let header = {
            let mut cache = lock(&sh.header_cache);
            match &*cache {
                Some((h, p, n, f, bytes))
                    if h == &from.host_id && p == &from.process_id && *n == near && *f == far =>
                {
                    bytes.clone()
                }
                _ => {
                    let bytes: Arc<[u8]> = wire::topic_header(&wire::TopicHeader {
                        format: wire::TOPIC_FORMAT,
                        host: from.host_id.to_string(),
                        process: from.process_id.to_string(),
                        nearest: near,
                        farthest: far,
                    })?
                    .into();
                    *cache = Some((
                        from.host_id.clone(),
                        from.process_id.clone(),
                        near,
                        far,
                        bytes.clone(),
                    ));
                    bytes
                }
            }
        };
        let mut body = Vec::with_capacity(header.len() + 128);
        body.extend_from_slice(&header);
        wire::encode_into(&OutgoingRef::of(env), &mut Vec::new(), &mut body)?;
        let max = sh.cfg.max_message;
        if body.len() > max {
            return Err(Error::TooLarge {
                transport: NAME,
                size: body.len(),
                limit: max,
            });
        }
        Ok(body)
    }

    async fn queue_publish(&self, req: PubReq) -> Result<()> {
        let sh = &self.shared;
        if sh.closed.load(Ordering::Acquire) {
            return Err(sh.closed_error());
        }
        sh.publisher.send(req).await.map_err(|_| sh.closed_error())
    }
}

fn not_publishable(target: &Address) -> Error {
    Error::InvalidPattern {
        pattern: target.to_string(),
        reason: "publish takes a topic or a group address",
    }
}

#[async_trait]
impl PubSub for RedisTransport {
    async fn publish(&self, from: &MachineEntry, env: Envelope, reach: Reach) -> Result<usize> {
        let sh = &self.shared;
        match &env.target {
            Address::Topic(t) => {
                let channel = sh.names.channel(t);
                let body = self.topic_body(from, &env, reach)?;
                let (tx, rx) = oneshot::channel();
                self.queue_publish(PubReq {
                    channel,
                    body,
                    reply: Some(tx),
                })
                .await?;
                let n = rx.await.map_err(|_| sh.closed_error())??;
                // Redis counts receiving connections per matching pattern, not machines: say
                // whether anyone got it (docs/SEMANTICS.md).
                Ok(usize::from(n > 0))
            }
            Address::Group(g) => self.add_group(from, &env, g).await,
            other => Err(not_publishable(other)),
        }
    }

    async fn emit(&self, from: &MachineEntry, env: Envelope, reach: Reach) -> Result<()> {
        let sh = &self.shared;
        match &env.target {
            Address::Topic(t) => {
                let channel = sh.names.channel(t);
                let body = self.topic_body(from, &env, reach)?;
                self.queue_publish(PubReq {
                    channel,
                    body,
                    reply: None,
                })
                .await
            }
            Address::Group(g) => self.add_group(from, &env, g).await.map(drop),
            other => Err(not_publishable(other)),
        }
    }

    async fn subscribe(&self, sub: Subscription) -> Result<SubscriptionId> {
        let sh = &self.shared;
        if sh.closed.load(Ordering::Acquire) {
            return Err(sh.closed_error());
        }
        let id = SubscriptionId(sh.next_sub.fetch_add(1, Ordering::Relaxed));
        if let Some(group) = sub.group.clone() {
            if sub.topic.is_some() {
                return Err(Error::NotSupported {
                    transport: NAME,
                    capability: "topic subscriptions shared by a consumer group (join the group \
                                 and publish to it with publish_to_group instead)",
                });
            }
            let member = format!("{}-{}", sh.tag, id.0);
            let stream = sh.names.member_stream(&group, &member);
            sh.ensure_group(&stream).await?;
            sh.heartbeat(&group, &member).await?;
            lock(&sh.topics).groups.insert(
                id,
                Membership {
                    group,
                    member,
                    stream: stream.clone(),
                    inbox: sub.inbox.clone(),
                },
            );
            sh.add_stream(stream, sub.inbox);
            return Ok(id);
        }
        let Some(pattern) = sub.topic else {
            return Err(Error::InvalidPattern {
                pattern: String::new(),
                reason: "a subscription needs a topic pattern or a group",
            });
        };
        let glob = sh.names.channel_pattern(&pattern);
        let first = {
            let mut t = lock(&sh.topics);
            t.subs.insert(
                id,
                Arc::new(TopicSub {
                    pattern,
                    glob: glob.clone(),
                    filter: sub.filter,
                    inbox: sub.inbox,
                }),
            );
            t.rebuild();
            let n = t.globs.entry(glob.clone()).or_insert(0);
            *n += 1;
            *n == 1
        };
        sh.ensure_subscriber();
        if first {
            let deadline = sh.deadline();
            loop {
                let mut c = sh.wait_conn(&sh.sub, deadline).await?;
                let _topo = sh.sub_topo.lock().await;
                match c.psubscribe(&glob).await {
                    Ok(()) => break,
                    Err(e)
                        if e.is_unrecoverable_error() && tokio::time::Instant::now() < deadline =>
                    {
                        // The supervisor subscribes everything again on its new connection.
                        sh.connection_lost(&sh.sub);
                    }
                    Err(e) => return Err(op_error("PSUBSCRIBE", &e)),
                }
            }
        }
        Ok(id)
    }

    async fn unsubscribe(&self, id: SubscriptionId) -> Result<()> {
        let sh = &self.shared;
        let group = lock(&sh.topics).groups.remove(&id);
        if let Some(m) = group {
            sh.remove_stream(&m.stream);
            // Expired at once: no more publishes come its way, and a remaining member adopts
            // what its stream still holds.
            let mut cmd = redis::cmd("HSET");
            cmd.arg(sh.names.group_members(&m.group))
                .arg(&m.member)
                .arg(0);
            sh.run::<Value>("HSET", &cmd).await?;
            return Ok(());
        }
        let last_glob = {
            let mut t = lock(&sh.topics);
            let Some(s) = t.subs.remove(&id) else {
                return Ok(());
            };
            t.rebuild();
            match t.globs.get_mut(&s.glob) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    None
                }
                Some(_) => {
                    t.globs.remove(&s.glob);
                    Some(s.glob.clone())
                }
                None => None,
            }
        };
        if let Some(glob) = last_glob {
            let conn = sh.sub.borrow().clone();
            if let Some(mut c) = conn {
                let _topo = sh.sub_topo.lock().await;
                let _ = c.punsubscribe(&glob).await;
            }
        }
        Ok(())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[(&str, &str)]) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(
                fields
                    .iter()
                    .flat_map(|(k, v)| [bulk(k), bulk(v)])
                    .collect(),
            ),
        ])
    }

    #[test]
    fn read_replies_parse_in_resp3_and_resp2() {
        let entries = || {
            Value::Array(vec![
                entry("1-0", &[("e", "body")]),
                entry("2-0", &[("x", "y")]),
                Value::Array(vec![bulk("3-0"), Value::Nil]),
            ])
        };
        let resp3 = Value::Map(vec![(bulk("k"), entries())]);
        let resp2 = Value::Array(vec![Value::Array(vec![bulk("k"), entries()])]);
        for v in [resp3, resp2] {
            let got = parse_read(v);
            assert_eq!(got.len(), 1);
            let (key, e) = &got[0];
            assert_eq!(key, "k");
            let ids: Vec<&str> = e.iter().map(|e| e.id.as_str()).collect();
            assert_eq!(ids, ["1-0", "2-0", "3-0"]);
            assert_eq!(e[0].body.as_deref(), Some(&b"body"[..]));
            assert_eq!((e[1].body.is_none(), e[1].fields), (true, 1));
            assert_eq!((e[2].body.is_none(), e[2].fields), (true, 0));
        }
        assert!(parse_read(Value::Nil).is_empty());
        assert!(parse_entries(bulk("garbage")).is_empty());
    }

    #[test]
    fn locations_follow_host_and_process() {
        let mut e = MachineEntry {
            id: "m".into(),
            machine_type: "T".into(),
            host_id: "h".into(),
            process_id: "p".into(),
            context: None,
            version: None,
            accepts: Vec::new(),
            metadata: Default::default(),
        };
        assert_eq!(location_of("h", "p", &e), Location::SameProcess);
        assert_eq!(location_of("h", "q", &e), Location::SameMachine);
        e.host_id = "other".into();
        assert_eq!(location_of("h", "p", &e), Location::Remote);
        assert_eq!(location_from(9), Location::Remote);
    }
}
