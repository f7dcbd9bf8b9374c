//! The registry on Redis, shared by every process that uses the same server and namespace.
//!
//! [`RedisRegistry`] implements the core [`Registry`] with the same results as the
//! in-process `LocalRegistry` on the same entries (ids, name checks, ordering, globs,
//! types), for many processes on many hosts:
//!
//! - one hash per machine, an index per type, a set of types, all changed by Lua scripts
//!   so that a reader never sees half a registration;
//! - liveness as a key with a TTL that [`Registry::heartbeat`] refreshes: a process that
//!   dies stops refreshing, a sweeper (one per registry, at most one sweep per interval
//!   in the whole namespace does the work) reports it unhealthy once, then removes it;
//! - a pub/sub channel of joins, leaves and health changes, numbered in the order the
//!   server made them; every process reports changes from it only (its own included,
//!   before the call that made one returns), so all report them in the same order. A
//!   task reads it, reconnects by itself and then reports [`RegistryEvent::Resync`].
//!
//! Sends do not look up the registry: sessions cache routes until a change marks them
//! stale ([`RedisRegistry::round_trips`] lets a test prove it).
//!
//! docs/PROTOCOL.md §14 gives the key layout and the message format.
//!
//! ```no_run
//! # async fn demo() -> switchyard_core::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use switchyard_redis::{RedisConfig, RedisRegistry};
//!
//! let registry = RedisRegistry::builder(RedisConfig::from_env().namespace("shop"))
//!     .ttl(Duration::from_secs(10))
//!     .connect()
//!     .await?;
//! let registry: Arc<dyn switchyard_core::Registry> = Arc::new(registry);
//! // SessionBuilder::registry(registry) makes sessions on many hosts see each other.
//! # Ok(())
//! # }
//! ```

mod codec;
mod scripts;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream};
use redis::{ErrorKind, FromRedisValue, RedisError, ServerErrorKind};
use switchyard_core::{
    ChangeHook, ChangeHooks, Error, MachineEntry, MachineId, Registry, RegistryEvent, Result,
    glob_matches,
};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::RedisConfig;
use codec::{Stored, WireEvent, entry_from_fields, entry_from_flat, in_order};

/// Name used in errors and logs.
const NAME: &str = "redis-registry";

/// How often the event subscription is pinged, so a silently dead connection is noticed.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// Longest wait between two attempts to restore the event subscription.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Configures and connects a [`RedisRegistry`].
#[derive(Clone, Debug)]
pub struct RedisRegistryBuilder {
    cfg: RedisConfig,
    ttl: Duration,
    remove_after: Option<Duration>,
    sweep_interval: Option<Option<Duration>>,
}

impl RedisRegistryBuilder {
    /// How long a machine stays healthy after each heartbeat (default 10 s, as the
    /// session's in-process registry).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long after it was reported unhealthy a machine is removed (default: one TTL).
    pub fn remove_after(mut self, grace: Duration) -> Self {
        self.remove_after = Some(grace);
        self
    }

    /// How often this registry looks for machines whose liveness key expired (default:
    /// a quarter of the TTL, at least 10 ms); `None` runs no sweeper here (another process
    /// of the namespace must run one, or call [`RedisRegistry::sweep`]).
    pub fn sweep_interval(mut self, every: Option<Duration>) -> Self {
        self.sweep_interval = Some(every);
        self
    }

    /// Connects, loads the scripts and subscribes to the event channel; must run inside a
    /// tokio runtime.
    pub async fn connect(self) -> Result<RedisRegistry> {
        RedisRegistry::connect_with(self).await
    }
}

/// A script and the SHA1 the server knows it by.
struct Lua {
    src: String,
    sha: String,
}

struct Scripts {
    register: Lua,
    deregister: Lua,
    heartbeat: Lua,
    sweep: Lua,
    fetch_types: Lua,
}

/// What the registry and its background tasks share.
struct Shared {
    client: redis::Client,
    conn: ConnectionManager,
    /// `{namespace}:reg:`, the start of every key.
    prefix: String,
    channel: String,
    url: String,
    /// Names this instance in the events it causes and in liveness keys (for operators).
    origin: String,
    ttl: Duration,
    grace: Duration,
    response_timeout: Duration,
    scripts: Scripts,
    events: broadcast::Sender<RegistryEvent>,
    hooks: ChangeHooks,
    generation: AtomicU64,
    round_trips: AtomicU64,
    reconnections: AtomicU64,
    /// The machines registered through this instance: a heartbeat for one that was
    /// swept away (the process was cut off longer than TTL + grace) registers it again.
    own: Mutex<HashMap<MachineId, MachineEntry>>,
    /// The last event reported and whether the subscription is up: a call that changed
    /// the registry returns once its own event was reported (or the subscription is down).
    seen: watch::Sender<Seen>,
}

/// How far the subscription got.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    /// Sequence number of the last event reported.
    seq: u64,
    /// Whether the subscription is up.
    live: bool,
}

/// The registry on Redis: many processes on many hosts discover each other's machines.
///
/// Cloning is not offered: share it as `Arc<dyn Registry>`. Dropping it stops its
/// background tasks (entries stay until deregistered or swept).
pub struct RedisRegistry {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("url", &self.shared.url)
            .field("prefix", &self.shared.prefix)
            .field("ttl", &self.shared.ttl)
            .finish()
    }
}

impl Drop for RedisRegistry {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn check_name(name: &str, what: &'static str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(Error::InvalidName {
            name: name.to_string(),
            reason: what,
        });
    }
    Ok(())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisRegistry {
    /// A builder for the server and namespace of `cfg`.
    pub fn builder(cfg: RedisConfig) -> RedisRegistryBuilder {
        RedisRegistryBuilder {
            cfg,
            ttl: Duration::from_secs(10),
            remove_after: None,
            sweep_interval: None,
        }
    }

    /// Connects with the defaults (TTL 10 s); see [`RedisRegistry::builder`].
    pub async fn connect(cfg: RedisConfig) -> Result<RedisRegistry> {
        Self::builder(cfg).connect().await
    }

    async fn connect_with(b: RedisRegistryBuilder) -> Result<RedisRegistry> {
        let cfg = b.cfg;
        let url = cfg.redacted_url();
        if cfg.namespace.trim().is_empty() {
            return Err(Error::Config(
                "the Redis namespace is empty: give every deployment a namespace of its own \
                 (RedisConfig::namespace)"
                    .into(),
            ));
        }
        if b.ttl.is_zero() {
            return Err(Error::Config(
                "the registry TTL is zero: machines would never be healthy; use a TTL longer \
                 than the heartbeat interval"
                    .into(),
            ));
        }
        let client = open_client(&cfg, &url)?;
        let mcfg = ConnectionManagerConfig::new()
            .set_response_timeout(Some(cfg.response_timeout))
            .set_connection_timeout(Some(cfg.response_timeout))
            .set_max_delay(MAX_BACKOFF)
            // Each reconnection tries this often; a command after a failed one starts
            // another, so a few are enough, and wrong credentials fail fast at connect.
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client.clone(), mcfg)
            .await
            .map_err(|e| connect_error(&url, &e))?;
        let mut scripts = Scripts {
            register: Lua::new(scripts::register()),
            deregister: Lua::new(scripts::deregister()),
            heartbeat: Lua::new(scripts::heartbeat()),
            sweep: Lua::new(scripts::sweep()),
            fetch_types: Lua::new(scripts::FETCH_TYPES.to_string()),
        };
        let mut pipe = redis::pipe();
        for s in scripts.all() {
            pipe.cmd("SCRIPT").arg("LOAD").arg(&s.src);
        }
        let shas: Vec<String> = pipe
            .query_async(&mut conn.clone())
            .await
            .map_err(|e| connect_error(&url, &e))?;
        for (s, sha) in scripts.all_mut().into_iter().zip(shas) {
            s.sha = sha;
        }
        let grace = b.remove_after.unwrap_or(b.ttl);
        let sweep_every = b
            .sweep_interval
            .unwrap_or(Some((b.ttl / 4).max(Duration::from_millis(10))));
        let shared = Arc::new(Shared {
            client,
            conn,
            prefix: format!("{}:reg:", cfg.namespace),
            channel: format!("{}:reg:events", cfg.namespace),
            url,
            origin: format!("{:016x}", fastrand::u64(..)),
            ttl: b.ttl,
            grace,
            response_timeout: cfg.response_timeout,
            scripts,
            events: broadcast::channel(1024).0,
            hooks: ChangeHooks::default(),
            generation: AtomicU64::new(0),
            round_trips: AtomicU64::new(1),
            reconnections: AtomicU64::new(0),
            own: Mutex::new(HashMap::new()),
            seen: watch::channel(Seen::default()).0,
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let mut tasks = vec![tokio::spawn(subscriber(shared.clone(), ready_tx))];
        let ready = match ready_rx.await {
            Ok(r) => r,
            Err(_) => Err(shared.fail("subscribe to the event channel", "the task ended")),
        };
        if let Err(e) = ready {
            for t in &tasks {
                t.abort();
            }
            return Err(e);
        }
        if let Some(every) = sweep_every {
            tasks.push(tokio::spawn(sweeper(shared.clone(), every)));
        }
        Ok(RedisRegistry { shared, tasks })
    }

    /// Commands and pipelines sent to Redis on the command connection so far (every
    /// registry call, heartbeat and sweep; not the keep-alive pings of the event
    /// subscription): lets a test prove a path does no round trip.
    pub fn round_trips(&self) -> u64 {
        self.shared.round_trips.load(Ordering::Relaxed)
    }

    /// How many times the event subscription was lost and restored.
    pub fn reconnections(&self) -> u64 {
        self.shared.reconnections.load(Ordering::Relaxed)
    }

    /// The heartbeat TTL of the machines this registry registers.
    pub fn ttl(&self) -> Duration {
        self.shared.ttl
    }

    /// The prefix of every key of this registry (`{namespace}:reg:`).
    pub fn key_prefix(&self) -> &str {
        &self.shared.prefix
    }

    /// Runs one sweep now (unless another process of the namespace swept within the
    /// sweep interval): reports machines whose liveness expired, removes those past
    /// their grace period. Returns the changes it made (watchers hear of them from the
    /// event channel, like every change).
    pub async fn sweep(&self) -> Result<Vec<RegistryEvent>> {
        self.shared.sweep(Duration::from_millis(1)).await
    }
}

impl Lua {
    fn new(src: String) -> Lua {
        Lua {
            src,
            sha: String::new(),
        }
    }
}

impl Scripts {
    fn all(&self) -> [&Lua; 5] {
        [
            &self.register,
            &self.deregister,
            &self.heartbeat,
            &self.sweep,
            &self.fetch_types,
        ]
    }
    fn all_mut(&mut self) -> [&mut Lua; 5] {
        [
            &mut self.register,
            &mut self.deregister,
            &mut self.heartbeat,
            &mut self.sweep,
            &mut self.fetch_types,
        ]
    }
}

/// A client for the URL of `cfg`: `redis://`, or `rediss://` with feature `tls` (server
/// certificate checked against the system roots, or the CA of `tls_ca_file`).
fn open_client(cfg: &RedisConfig, url: &str) -> Result<redis::Client> {
    let bad = |e: &dyn std::fmt::Display| {
        Error::Config(format!(
            "cannot use the Redis URL `{url}`: {e}; write it as \
             redis://[user:password@]host:port[/db] (or rediss:// for TLS)"
        ))
    };
    let tls = cfg.url.trim_start().starts_with("rediss://");
    if !tls {
        return redis::Client::open(cfg.url.as_str()).map_err(|e| bad(&e));
    }
    #[cfg(feature = "tls")]
    {
        let Some(path) = &cfg.tls_ca_file else {
            return redis::Client::open(cfg.url.as_str()).map_err(|e| bad(&e));
        };
        let pem = std::fs::read(path).map_err(|e| {
            Error::Config(format!(
                "cannot read the CA file {} for `{url}`: {e}; give the PEM file of the CA \
                 that signed the server's certificate",
                path.display()
            ))
        })?;
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        };
        redis::Client::build_with_tls(cfg.url.as_str(), certs).map_err(|e| bad(&e))
    }
    #[cfg(not(feature = "tls"))]
    {
        Err(Error::Config(format!(
            "`{url}` asks for TLS, which this build does not include: enable feature `tls` \
             of switchyard-redis (`redis-tls` of switchyard), or use a redis:// URL"
        )))
    }
}

fn connect_error(url: &str, e: &RedisError) -> Error {
    Error::Transport {
        transport: NAME,
        reason: format!(
            "cannot reach the Redis server at {url}: {e}; check that it runs there and that \
             the user and password in the URL are right (set {})",
            crate::config::URL_ENV
        ),
        retryable: true,
    }
}

impl Shared {
    fn fail(&self, op: &str, e: impl std::fmt::Display) -> Error {
        Error::Transport {
            transport: NAME,
            reason: format!(
                "{op} on the Redis server at {} failed: {e}; check that the server runs and \
                 answers (the registry reconnects by itself; retry)",
                self.url
            ),
            retryable: true,
        }
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}:{name}", self.prefix)
    }

    /// Sends one command or pipeline; an idempotent one is sent again once when the
    /// connection dropped (the manager reconnects in between).
    async fn raw<T>(
        &self,
        op: &str,
        idempotent: bool,
        send: impl Fn(ConnectionManager) -> BoxFuture<'static, redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        match send(self.conn.clone()).await {
            Err(e) if idempotent && (e.is_connection_dropped() || e.is_unrecoverable_error()) => {
                tracing::debug!(op, error = %e, "redis registry: connection lost; retrying once");
                self.round_trips.fetch_add(1, Ordering::Relaxed);
                send(self.conn.clone()).await
            }
            r => r,
        }
    }

    async fn query<T>(
        &self,
        op: &str,
        idempotent: bool,
        send: impl Fn(ConnectionManager) -> BoxFuture<'static, redis::RedisResult<T>>,
    ) -> Result<T> {
        self.raw(op, idempotent, send)
            .await
            .map_err(|e| self.fail(op, e))
    }

    /// Runs a script by its SHA1, sending its source when the server lost it (restart,
    /// SCRIPT FLUSH).
    async fn eval<T: FromRedisValue + Send + 'static>(
        &self,
        op: &str,
        idempotent: bool,
        script: &Lua,
        args: Vec<String>,
    ) -> Result<T> {
        let sha = script.sha.clone();
        let a = args.clone();
        let first = self
            .raw(op, idempotent, move |mut c| {
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(&sha).arg(0).arg(&a);
                Box::pin(async move { cmd.query_async::<T>(&mut c).await })
            })
            .await;
        match first {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                let src = script.src.clone();
                self.query(op, idempotent, move |mut c| {
                    let mut cmd = redis::cmd("EVAL");
                    cmd.arg(&src).arg(0).arg(&args);
                    Box::pin(async move { cmd.query_async::<T>(&mut c).await })
                })
                .await
            }
            r => r.map_err(|e| self.fail(op, e)),
        }
    }

    /// Reports a change: generation, hooks, then watchers. Only the subscription task
    /// calls it (one event after another), so every process reports the changes in the
    /// order the server made them, its own included.
    fn emit(&self, ev: RegistryEvent) {
        if !matches!(ev, RegistryEvent::HealthChanged { .. }) {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        self.hooks.call(&ev);
        let _ = self.events.send(ev);
    }

    /// Waits until the subscription reported event `seq` (this call's own change), so
    /// that hooks and watchers heard of it before the call returns, as with the
    /// in-process registry. Does not wait while the subscription is down: the `Resync`
    /// after it comes back stands for the event.
    async fn echo(&self, seq: u64) {
        let mut rx = self.seen.subscribe();
        let heard = rx.wait_for(|s| !s.live || s.seq >= seq);
        if tokio::time::timeout(self.response_timeout, heard)
            .await
            .is_err()
        {
            tracing::debug!(seq, "redis registry: own event not heard back in time");
        }
    }

    fn own(&self) -> std::sync::MutexGuard<'_, HashMap<MachineId, MachineEntry>> {
        // Only plain map updates happen under this lock; a panic elsewhere leaves it usable.
        self.own.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn register(&self, mut entry: MachineEntry) -> Result<MachineEntry> {
        check_name(&entry.machine_type, "a machine type must not be empty")?;
        let accepts =
            serde_json::to_string(&entry.accepts).map_err(|e| Error::Encode(e.to_string()))?;
        let metadata =
            serde_json::to_string(&entry.metadata).map_err(|e| Error::Encode(e.to_string()))?;
        let mut args = vec![
            self.prefix.clone(),
            entry.id.as_str().to_string(),
            entry.machine_type.to_string(),
            entry.host_id.to_string(),
            entry.process_id.to_string(),
            entry.context.map(|c| c.to_string()).unwrap_or_default(),
            if entry.version.is_some() { "1" } else { "0" }.to_string(),
            entry.version.clone().unwrap_or_default(),
            accepts,
            metadata,
            millis(self.ttl).to_string(),
            millis(self.grace).to_string(),
            self.origin.clone(),
        ];
        for _ in 0..4 {
            args.push(format!("{:08x}", fastrand::u32(..)));
        }
        let (status, id, _gen, seq): (String, String, i64, u64) = self
            .eval("register", false, &self.scripts.register, args)
            .await?;
        match status.as_str() {
            "ok" => {
                entry.id = MachineId::from(id);
                self.own().insert(entry.id.clone(), entry.clone());
                self.echo(seq).await;
                Ok(entry)
            }
            "dup" => Err(Error::DuplicateId(entry.id)),
            _ => Err(self.fail(
                "register",
                "four random ids in a row were taken (a broken random source?)",
            )),
        }
    }

    async fn sweep(&self, lock: Duration) -> Result<Vec<RegistryEvent>> {
        let args = vec![
            self.prefix.clone(),
            self.origin.clone(),
            millis(lock).to_string(),
        ];
        let flat: Vec<String> = self.eval("sweep", true, &self.scripts.sweep, args).await?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(kind), Some(id)) = (it.next(), it.next()) {
            let id = MachineId::from(id);
            out.push(if kind == "left" {
                RegistryEvent::Left(id)
            } else {
                RegistryEvent::HealthChanged { id, healthy: false }
            });
        }
        Ok(out)
    }

    async fn fetch_types(&self, types: Vec<String>) -> Result<Vec<MachineEntry>> {
        if types.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = Vec::with_capacity(types.len() + 1);
        args.push(self.prefix.clone());
        args.extend(types);
        let rows: Vec<Vec<String>> = self
            .eval("discover", true, &self.scripts.fetch_types, args)
            .await?;
        let stored: Vec<Stored> = rows
            .into_iter()
            .map(entry_from_flat)
            .collect::<Result<_>>()?;
        Ok(in_order(stored))
    }

    /// Reports a change published by another registry instance.
    fn on_message(&self, payload: &[u8]) {
        let Some(w) = WireEvent::parse(payload) else {
            tracing::warn!(channel = %self.channel, "redis registry: ignoring an event that is not JSON of the documented form");
            return;
        };
        if w.v > 1 {
            tracing::debug!(
                v = w.v,
                "redis registry: event of a newer format; reading the fields it shares with v1"
            );
        }
        let expired = w.reason.as_deref() == Some("expired");
        let seq = w.seq;
        let ev = match (w.kind.as_str(), w.id, w.healthy, w.entry) {
            ("joined", _, _, Some(fields)) => match entry_from_fields(fields) {
                Ok(s) => RegistryEvent::Joined(s.entry),
                Err(e) => {
                    tracing::warn!(error = %e, "redis registry: ignoring a join event");
                    return;
                }
            },
            ("left", Some(id), _, _) => {
                let id = MachineId::from(id);
                // A machine of ours that expired comes back with its next heartbeat, if
                // this process lives; one deregistered elsewhere does not.
                if !expired {
                    self.own().remove(&id);
                }
                RegistryEvent::Left(id)
            }
            ("health", Some(id), Some(healthy), _) => RegistryEvent::HealthChanged {
                id: MachineId::from(id),
                healthy,
            },
            (kind, ..) => {
                tracing::debug!(kind, "redis registry: ignoring an event it does not know");
                return;
            }
        };
        self.emit(ev);
        if let Some(seq) = seq {
            self.seen.send_modify(|s| s.seq = seq);
        }
    }

    async fn subscribe(&self) -> Result<(PubSubSink, PubSubStream)> {
        let attempt = async {
            let mut ps = self.client.get_async_pubsub().await?;
            ps.subscribe(&self.channel).await?;
            Ok::<_, RedisError>(ps.split())
        };
        match tokio::time::timeout(self.response_timeout, attempt).await {
            Ok(Ok(halves)) => Ok(halves),
            Ok(Err(e)) => Err(self.fail("subscribing to the event channel", e)),
            Err(_) => Err(self.fail(
                "subscribing to the event channel",
                format!("no answer within {:?}", self.response_timeout),
            )),
        }
    }

    /// Reads events until the subscription is lost.
    async fn pump(&self, mut sink: PubSubSink, mut stream: PubSubStream) {
        let mut tick = tokio::time::interval(KEEPALIVE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(m) => self.on_message(m.get_payload_bytes()),
                    None => return,
                },
                _ = tick.tick() => {
                    let ping = tokio::time::timeout(self.response_timeout, sink.ping::<redis::Value>());
                    if !matches!(ping.await, Ok(Ok(_))) {
                        return;
                    }
                }
            }
        }
    }
}

/// Keeps the event subscription up: subscribes, reads, and after a loss subscribes again
/// and reports [`RegistryEvent::Resync`] (events may have been missed meanwhile).
async fn subscriber(shared: Arc<Shared>, ready: oneshot::Sender<Result<()>>) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(20);
    loop {
        match shared.subscribe().await {
            Ok((sink, stream)) => {
                match ready.take() {
                    Some(tx) => {
                        let _ = tx.send(Ok(()));
                    }
                    None => {
                        shared.reconnections.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(url = %shared.url, "redis registry: event subscription restored");
                        shared.emit(RegistryEvent::Resync);
                    }
                }
                backoff = Duration::from_millis(20);
                shared.seen.send_modify(|s| s.live = true);
                shared.pump(sink, stream).await;
                shared.seen.send_modify(|s| s.live = false);
                tracing::warn!(url = %shared.url, "redis registry: event subscription lost; reconnecting");
            }
            Err(e) => {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(Err(e));
                    return;
                }
                tracing::debug!(error = %e, "redis registry: resubscribing failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Sweeps every `every` until aborted.
async fn sweeper(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = shared.sweep(every).await {
            tracing::debug!(error = %e, "redis registry: sweep failed; trying again next interval");
        }
    }
}

#[async_trait]
impl Registry for RedisRegistry {
    async fn register(&self, entry: MachineEntry) -> Result<MachineEntry> {
        self.shared.register(entry).await
    }

    async fn deregister(&self, id: &MachineId) -> Result<()> {
        let s = &self.shared;
        let args = vec![s.prefix.clone(), id.as_str().to_string(), s.origin.clone()];
        let (generation, seq): (i64, u64) = s
            .eval("deregister", true, &s.scripts.deregister, args)
            .await?;
        s.own().remove(id);
        if generation == 0 {
            return Err(Error::UnknownTarget(id.clone()));
        }
        s.echo(seq).await;
        Ok(())
    }

    async fn get(&self, id: &MachineId) -> Result<Option<MachineEntry>> {
        let key = self.shared.key("m", id.as_str());
        let fields: HashMap<String, String> = self
            .shared
            .query("get", true, move |mut c| {
                let mut cmd = redis::cmd("HGETALL");
                cmd.arg(&key);
                Box::pin(async move { cmd.query_async(&mut c).await })
            })
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        Ok(Some(entry_from_fields(fields)?.entry))
    }

    async fn discover(&self, machine_type: &str) -> Result<Vec<MachineEntry>> {
        self.shared
            .fetch_types(vec![machine_type.to_string()])
            .await
    }

    async fn discover_pattern(&self, pattern: &str) -> Result<Vec<MachineEntry>> {
        if pattern.is_empty() {
            return Err(Error::InvalidPattern {
                pattern: String::new(),
                reason: "a discovery pattern must not be empty (use `*` for every type)",
            });
        }
        // The glob runs here, with core's matcher, so results equal LocalRegistry's.
        let types: Vec<String> = self
            .types()
            .await?
            .into_iter()
            .filter(|t| glob_matches(pattern, t))
            .collect();
        self.shared.fetch_types(types).await
    }

    async fn types(&self) -> Result<Vec<String>> {
        let key = format!("{}types", self.shared.prefix);
        let mut types: Vec<String> = self
            .shared
            .query("types", true, move |mut c| {
                let mut cmd = redis::cmd("SMEMBERS");
                cmd.arg(&key);
                Box::pin(async move { cmd.query_async(&mut c).await })
            })
            .await?;
        types.sort();
        Ok(types)
    }

    async fn heartbeat(&self, id: &MachineId) -> Result<()> {
        let s = &self.shared;
        let args = vec![s.prefix.clone(), id.as_str().to_string(), s.origin.clone()];
        let (r, seq): (i64, u64) = s
            .eval("heartbeat", true, &s.scripts.heartbeat, args)
            .await?;
        match r {
            0 => {
                // Swept away while this process was cut off: register it again, it lives.
                let again = s.own().get(id).cloned();
                match again {
                    Some(entry) => {
                        tracing::info!(id = %id, "redis registry: machine was removed while its heartbeats did not arrive; registering it again");
                        s.register(entry).await.map(|_| ())
                    }
                    None => Err(Error::UnknownTarget(id.clone())),
                }
            }
            2 => {
                s.echo(seq).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn is_healthy(&self, id: &MachineId) -> Result<bool> {
        let entry = self.shared.key("m", id.as_str());
        let alive = self.shared.key("alive", id.as_str());
        let (exists, healthy): (bool, bool) = self
            .shared
            .query("is_healthy", true, move |mut c| {
                let mut p = redis::pipe();
                p.exists(&entry).exists(&alive);
                Box::pin(async move { p.query_async(&mut c).await })
            })
            .await?;
        if !exists {
            return Err(Error::UnknownTarget(id.clone()));
        }
        Ok(healthy)
    }

    fn watch(&self) -> broadcast::Receiver<RegistryEvent> {
        self.shared.events.subscribe()
    }

    fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    fn on_change(&self, hook: ChangeHook) {
        self.shared.hooks.add(hook);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_are_distinct() {
        let s = [
            scripts::register(),
            scripts::deregister(),
            scripts::heartbeat(),
            scripts::sweep(),
            scripts::FETCH_TYPES.to_string(),
        ];
        for (i, a) in s.iter().enumerate() {
            for b in &s[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
