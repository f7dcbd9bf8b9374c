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
mod conn;
mod link;
mod read;
mod topics;

use conn::*;
use link::*;
use read::*;
use topics::*;

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
