//! Switchyard RabbitMQ transport: machines on other hosts through a broker, at-least-once.
//!
//! Built on `lapin`. One [`RabbitTransport`] per session holds one connection:
//!
//! - **Topology** (declared at start and again after every reconnection; names in
//!   [`names`]): a direct exchange for machine-addressed events with one queue
//!   per machine (routing key: machine id), a topic exchange for publishes with one queue
//!   per session bound to its subscriptions' patterns, and a direct exchange for consumer
//!   groups with one queue per group shared by its members. Everything is prefixed by the
//!   namespace.
//! - **Delivery**: publisher confirms on every publish (a send returns once the broker has
//!   the event); `mandatory` publishes, so an event no queue takes comes back as an error
//!   instead of vanishing; manual acknowledgements, sent once [`Inbox::deliver`] returned
//!   (a synchronous handler has run; an async handler's event is in its mailbox, see
//!   docs/SEMANTICS.md); prefetch bounds what a consumer holds unacknowledged.
//! - **Modes**: [`Mode::Fast`] (transient) and [`Mode::Durable`] (durable exchanges and
//!   queues, persistent messages).
//! - **Connection loss**: a supervisor reconnects with backoff, declares everything again
//!   and resumes consuming; sends wait up to [`RabbitConfig::outage_wait`] meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use switchyard_core::{
    Capabilities, DeliveryGuarantee, Error, Filter, Inbox, Link, Location, MachineEntry, MachineId,
    MessageOrdering, PubSub, Result, SubscriptionId, TopicPattern, Transport, TransportHealth,
};
use tokio::sync::watch;

mod config;
mod conn;
mod consumer;
mod link;
pub mod names;
mod supervisor;
mod topics;
mod wire;

pub use config::{DEFAULT_URL, Mode, RabbitConfig, URL_ENV};

use conn::Live;
use consumer::{Target, consume};
use link::RabbitLink;
use names::Names;
use supervisor::supervise;

/// The transport's name: `carried_by` of everything it delivers.
pub const NAME: &str = "rabbitmq";

/// Registry metadata key: the namespace a machine's session consumes in. A sender reaches
/// the machine over RabbitMQ only when it uses the same namespace.
pub const META_NAMESPACE: &str = "rabbitmq.namespace";

/// The RabbitMQ transport of one session; cheap to clone (one connection behind it).
#[derive(Clone)]
pub struct RabbitTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RabbitTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitTransport")
            .field("url", &self.shared.cfg.redacted_url())
            .field("namespace", &self.shared.cfg.namespace)
            .field("mode", &self.shared.cfg.mode)
            .finish()
    }
}

struct Bound {
    inbox: Inbox,
    /// The channel its consumer runs on, and the connection it belongs to.
    channel: Option<(u64, Channel)>,
}

struct TopicSub {
    pattern: TopicPattern,
    filter: Option<Filter>,
    inbox: Inbox,
}

struct GroupSub {
    group: Arc<str>,
    topic: Option<TopicPattern>,
    filter: Option<Filter>,
    inbox: Inbox,
    channel: Option<(u64, Channel)>,
}

#[derive(Default)]
struct Subs {
    topics: HashMap<SubscriptionId, Arc<TopicSub>>,
    /// Binding keys of the session queue, with how many subscriptions use each.
    keys: HashMap<String, usize>,
    /// The session queue's consumer channel.
    channel: Option<(u64, Channel)>,
    groups: HashMap<SubscriptionId, GroupSub>,
}

struct Shared {
    cfg: RabbitConfig,
    names: Names,
    caps: Capabilities,
    /// Unique per transport instance: names the session queue.
    tag: String,
    state: watch::Sender<Option<Arc<Live>>>,
    closed: AtomicBool,
    /// Dropped with the transport: tells the supervisor to stop.
    stop: watch::Sender<bool>,
    /// Held while topology changes (bind, subscribe, restore after a reconnection).
    topo: tokio::sync::Mutex<()>,
    machines: Mutex<HashMap<MachineId, Bound>>,
    subs: Mutex<Subs>,
    next_sub: AtomicU64,
    generation: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    last_error: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RabbitTransport {
    /// Connects to the broker of `cfg` (within `cfg.connect_timeout`), declares the
    /// exchanges and starts the supervisor; a bad URL, refused credentials or an
    /// unreachable broker is an error saying which. Must run inside a tokio runtime.
    pub async fn connect(cfg: RabbitConfig) -> Result<RabbitTransport> {
        let shared = Shared::new(cfg)?;
        let live = conn::connect(&shared.cfg, &shared.names, 1).await?;
        shared.generation.store(1, Ordering::Release);
        let t = RabbitTransport { shared };
        t.spawn_supervisor(Some(Arc::new(live)));
        Ok(t)
    }

    /// Starts without waiting for the broker: the connection is made in the background
    /// (retried with backoff), and binds and sends wait up to `cfg.outage_wait` for it. A
    /// malformed URL is an error at once. Must run inside a tokio runtime.
    pub fn start(cfg: RabbitConfig) -> Result<RabbitTransport> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config(
                "RabbitTransport::start must run inside a tokio runtime".into(),
            ));
        }
        let shared = Shared::new(cfg)?;
        let t = RabbitTransport { shared };
        t.spawn_supervisor(None);
        Ok(t)
    }

    /// Waits until the transport is connected (or `timeout` passed: the last connection
    /// error, or a timeout error).
    pub async fn ready(&self, timeout: Duration) -> Result<()> {
        self.shared
            .wait_live(tokio::time::Instant::now() + timeout)
            .await
            .map(drop)
    }

    /// The namespace (prefix of every exchange and queue name).
    pub fn namespace(&self) -> &str {
        &self.shared.cfg.namespace
    }

    /// The settings.
    pub fn config(&self) -> &RabbitConfig {
        &self.shared.cfg
    }

    /// The queue a machine with this id consumes from (for tools and tests).
    pub fn machine_queue(&self, id: &str) -> Result<String> {
        Ok(self.shared.names.machine_queue(id)?.to_string())
    }

    /// Whether a connection is up now.
    pub fn is_connected(&self) -> bool {
        self.shared.current().is_some_and(|l| l.is_up())
    }

    fn spawn_supervisor(&self, first: Option<Arc<Live>>) {
        let weak = Arc::downgrade(&self.shared);
        let stop = self.shared.stop.subscribe();
        tokio::spawn(supervise(weak, stop, first));
    }
}

/// Whether a broker answers at the address of `cfg`'s URL (a TCP connection within
/// `timeout`; nothing is sent). For tools and tests that run only when a broker is there.
pub fn broker_answers(cfg: &RabbitConfig, timeout: Duration) -> bool {
    use std::net::ToSocketAddrs;
    let Ok(uri) = conn::parse_url(cfg) else {
        return false;
    };
    let addr = format!("{}:{}", uri.authority.host, uri.authority.port);
    let Ok(addrs) = addr.to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| std::net::TcpStream::connect_timeout(&a, timeout).is_ok())
}

/// For test suites: `true` when the broker of `SWITCHYARD_AMQP_URL` (default: the local one)
/// answers. When it does not, prints why and returns `false` (the caller skips), except
/// under `CI=true`, where a missing broker is a failure: it panics.
pub fn ready_for_tests() -> bool {
    let cfg = RabbitConfig::from_env();
    if broker_answers(&cfg, Duration::from_secs(2)) {
        return true;
    }
    let why = format!(
        "RabbitMQ does not answer at {} (set SWITCHYARD_AMQP_URL, or start it: ./scripts/test \
         starts a local broker)",
        cfg.redacted_url()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI needs the broker: {why}");
    }
    eprintln!("skipped: {why}");
    false
}

impl Shared {
    fn new(cfg: RabbitConfig) -> Result<Arc<Shared>> {
        conn::parse_url(&cfg)?;
        let names = Names::new(&cfg.namespace)?;
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
        let tag = format!("{}-{:016x}", std::process::id(), fastrand::u64(..));
        Ok(Arc::new(Shared {
            cfg,
            names,
            caps,
            tag,
            state: watch::channel(None).0,
            closed: AtomicBool::new(false),
            stop: watch::channel(false).0,
            topo: tokio::sync::Mutex::new(()),
            machines: Mutex::new(HashMap::new()),
            subs: Mutex::new(Subs::default()),
            next_sub: AtomicU64::new(1),
            generation: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }))
    }

    fn current(&self) -> Option<Arc<Live>> {
        self.state.borrow().clone()
    }

    fn closed_error(&self) -> Error {
        Error::Closed(NAME)
    }

    /// The live connection, waiting for it until `deadline` while it is being restored.
    async fn wait_live(&self, deadline: tokio::time::Instant) -> Result<Arc<Live>> {
        let mut rx = self.state.subscribe();
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(self.closed_error());
            }
            if let Some(l) = rx.borrow_and_update().clone()
                && l.is_up()
            {
                return Ok(l);
            }
            // A connection that went down without the supervisor noticing yet is
            // re-checked now and then.
            let wake = (tokio::time::Instant::now() + Duration::from_millis(50)).min(deadline);
            match tokio::time::timeout_at(wake, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(self.closed_error()),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    let last = lock(&self.last_error).clone();
                    return Err(Error::Transport {
                        transport: NAME,
                        reason: format!(
                            "not connected to RabbitMQ at {} (reconnecting; waited {:?}){}",
                            self.cfg.redacted_url(),
                            self.cfg.outage_wait,
                            last.map(|e| format!("; last error: {e}"))
                                .unwrap_or_default()
                        ),
                        retryable: true,
                    });
                }
                Err(_) => {}
            }
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.cfg.outage_wait
    }

    fn queue_args(&self, machine_queue: bool) -> FieldTable {
        let mut t = FieldTable::default();
        if self.cfg.max_priority > 0 {
            t.insert(
                "x-max-priority".into(),
                AMQPValue::ShortShortUInt(self.cfg.max_priority),
            );
        }
        if let Some(dlx) = &self.cfg.dead_letter_exchange
            && let Ok(dlx) = ShortString::try_new(dlx.clone())
        {
            t.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(dlx.as_str().into()),
            );
        }
        if machine_queue && self.cfg.mode == Mode::Fast {
            let ms = self.cfg.queue_expiry.as_millis().clamp(1, u32::MAX as u128) as u32;
            t.insert("x-expires".into(), AMQPValue::LongUInt(ms));
        }
        t
    }

    fn durable(&self) -> bool {
        self.cfg.mode == Mode::Durable
    }

    /// Declares a machine's queue and starts its consumer on a channel of its own.
    async fn start_machine(
        self: &Arc<Self>,
        live: &Live,
        id: &MachineId,
        inbox: Inbox,
    ) -> Result<(u64, Channel)> {
        let queue = self.names.machine_queue(id.as_str())?;
        let ch = live
            .conn
            .create_channel()
            .await
            .map_err(|e| conn::op_error("open a channel", &e))?;
        ch.basic_qos(self.cfg.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| conn::op_error("set the prefetch", &e))?;
        let opts = QueueDeclareOptions {
            durable: self.durable(),
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(queue.clone(), opts, self.queue_args(true))
            .await
            .map_err(|e| conn::declare_error(&self.cfg, queue.as_str(), &e))?;
        ch.queue_bind(
            queue.clone(),
            self.names.machines.clone(),
            names::short(id.as_str().to_string(), "machine")?,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| conn::declare_error(&self.cfg, queue.as_str(), &e))?;
        let consumer = ch
            .basic_consume(
                queue.clone(),
                names::short(format!("{}-{}", self.tag, id), "machine")?,
                BasicConsumeOptions {
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| Error::Transport {
                transport: NAME,
                reason: format!(
                    "could not consume `{queue}`: {e}; is machine `{id}` bound by another process \
                     of namespace `{}`?",
                    self.cfg.namespace
                ),
                retryable: false,
            })?;
        tokio::spawn(consume(
            consumer,
            Arc::downgrade(self),
            Target::Machine(inbox),
        ));
        Ok((live.generation, ch))
    }

    /// Declares the session queue (once per connection) and returns its channel.
    async fn session_channel(self: &Arc<Self>, live: &Live) -> Result<Channel> {
        if let Some((g, ch)) = &lock(&self.subs).channel
            && *g == live.generation
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let queue = self.names.session_queue(&self.tag)?;
        let ch = live
            .conn
            .create_channel()
            .await
            .map_err(|e| conn::op_error("open a channel", &e))?;
        ch.basic_qos(self.cfg.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| conn::op_error("set the prefetch", &e))?;
        ch.queue_declare(
            queue.clone(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| conn::declare_error(&self.cfg, queue.as_str(), &e))?;
        let consumer = ch
            .basic_consume(
                queue,
                names::short(format!("{}-topics", self.tag), "namespace")?,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| conn::op_error("consume the session queue", &e))?;
        tokio::spawn(consume(consumer, Arc::downgrade(self), Target::Topics));
        lock(&self.subs).channel = Some((live.generation, ch.clone()));
        Ok(ch)
    }

    async fn bind_key(&self, ch: &Channel, key: &str) -> Result<()> {
        let queue = self.names.session_queue(&self.tag)?;
        ch.queue_bind(
            queue,
            self.names.topics.clone(),
            names::short(key.to_string(), "topic")?,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| conn::op_error("bind a topic pattern", &e))
    }

    /// Declares a group's queue, binds it, and starts a member's consumer.
    async fn start_group(
        self: &Arc<Self>,
        live: &Live,
        group: &str,
        topic: Option<&TopicPattern>,
        filter: Option<Filter>,
        inbox: Inbox,
    ) -> Result<(u64, Channel)> {
        let queue = self.names.group_queue(group)?;
        let ch = live
            .conn
            .create_channel()
            .await
            .map_err(|e| conn::op_error("open a channel", &e))?;
        ch.basic_qos(self.cfg.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| conn::op_error("set the prefetch", &e))?;
        let opts = QueueDeclareOptions {
            durable: self.durable(),
            auto_delete: !self.durable(),
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(queue.clone(), opts, self.queue_args(false))
            .await
            .map_err(|e| conn::declare_error(&self.cfg, queue.as_str(), &e))?;
        ch.queue_bind(
            queue.clone(),
            self.names.groups.clone(),
            names::short(group.to_string(), "group")?,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| conn::declare_error(&self.cfg, queue.as_str(), &e))?;
        if let Some(t) = topic {
            ch.queue_bind(
                queue.clone(),
                self.names.topics.clone(),
                names::binding_key(t)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| conn::declare_error(&self.cfg, queue.as_str(), &e))?;
        }
        let consumer = ch
            .basic_consume(
                queue,
                names::short(format!("{}-g-{}", self.tag, fastrand::u64(..)), "group")?,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| conn::op_error("consume a group queue", &e))?;
        tokio::spawn(consume(
            consumer,
            Arc::downgrade(self),
            Target::Group(inbox, filter),
        ));
        Ok((live.generation, ch))
    }

    /// Declares everything again on a new connection and resumes every consumer.
    async fn restore(self: &Arc<Self>, live: &Live) -> Result<()> {
        let machines: Vec<(MachineId, Inbox)> = lock(&self.machines)
            .iter()
            .map(|(id, b)| (id.clone(), b.inbox.clone()))
            .collect();
        for (id, inbox) in machines {
            let ch = self.start_machine(live, &id, inbox).await?;
            if let Some(b) = lock(&self.machines).get_mut(&id) {
                b.channel = Some(ch);
            }
        }
        let keys: Vec<String> = lock(&self.subs).keys.keys().cloned().collect();
        if !keys.is_empty() {
            let ch = self.session_channel(live).await?;
            for k in keys {
                self.bind_key(&ch, &k).await?;
            }
        }
        let groups: Vec<GroupSpec> = lock(&self.subs)
            .groups
            .iter()
            .map(|(id, g)| {
                (
                    *id,
                    g.group.clone(),
                    g.topic.clone(),
                    g.filter.clone(),
                    g.inbox.clone(),
                )
            })
            .collect();
        for (id, group, topic, filter, inbox) in groups {
            let ch = self
                .start_group(live, &group, topic.as_ref(), filter, inbox)
                .await?;
            if let Some(g) = lock(&self.subs).groups.get_mut(&id) {
                g.channel = Some(ch);
            }
        }
        Ok(())
    }

    /// Publishes one body and waits for the broker's confirm: `Ok(true)` routed to a
    /// queue, `Ok(false)` returned as unroutable.
    async fn publish_confirmed(
        &self,
        exchange: &ShortString,
        key: ShortString,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<bool> {
        let deadline = self.deadline();
        loop {
            let live = self.wait_live(deadline).await?;
            let r = live
                .publish
                .basic_publish(
                    exchange.clone(),
                    key.clone(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    props.clone(),
                )
                .await;
            let confirm = match r {
                Ok(c) => c.await,
                Err(e) => Err(e),
            };
            match confirm {
                Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => return Ok(true),
                Ok(Confirmation::Ack(Some(_))) | Ok(Confirmation::Nack(Some(_))) => {
                    return Ok(false);
                }
                Ok(Confirmation::Nack(None)) => return Err(nacked()),
                Err(e) => {
                    // The connection went away under the publish: publish again once it is
                    // back (the broker may already have it: at least once).
                    tracing::debug!(error = %e, "publish failed; waiting for the connection");
                    lock(&self.last_error).replace(e.to_string());
                    if tokio::time::Instant::now() >= deadline {
                        return Err(conn::op_error("publish", &e));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

fn nacked() -> Error {
    Error::Transport {
        transport: NAME,
        reason: "RabbitMQ refused to take the message (negative confirm): it could not store it; \
                 check the broker's disk and memory alarms"
            .into(),
        retryable: false,
    }
}

/// A group membership to restore: its id, group, topic, filter and inbox.
type GroupSpec = (
    SubscriptionId,
    Arc<str>,
    Option<TopicPattern>,
    Option<Filter>,
    Inbox,
);

#[async_trait]
impl Transport for RabbitTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> &Capabilities {
        &self.shared.caps
    }

    async fn bind(&self, entry: &MachineEntry, inbox: Inbox) -> Result<()> {
        let sh = &self.shared;
        // Checked before anything is declared, so an over-long id fails cleanly.
        sh.names.machine_queue(entry.id.as_str())?;
        let deadline = sh.deadline();
        let live = sh.wait_live(deadline).await?;
        let _topo = sh.topo.lock().await;
        let ch = sh.start_machine(&live, &entry.id, inbox.clone()).await?;
        lock(&sh.machines).insert(
            entry.id.clone(),
            Bound {
                inbox,
                channel: Some(ch),
            },
        );
        Ok(())
    }

    async fn unbind(&self, id: &MachineId) -> Result<()> {
        let sh = &self.shared;
        let _topo = sh.topo.lock().await;
        let Some(b) = lock(&sh.machines).remove(id) else {
            return Ok(());
        };
        if let Some((_, ch)) = b.channel {
            if sh.cfg.mode == Mode::Fast
                && ch.status().connected()
                && let Ok(q) = sh.names.machine_queue(id.as_str())
            {
                // The machine left: what is still queued for it goes with it.
                let _ = ch.queue_delete(q, QueueDeleteOptions::default()).await;
            }
            let _ = ch.close(200, "unbound".into()).await;
        }
        Ok(())
    }

    async fn link(&self, to: &MachineEntry) -> Result<Arc<dyn Link>> {
        let sh = &self.shared;
        if sh.closed.load(Ordering::Acquire) {
            return Err(sh.closed_error());
        }
        match to.metadata.get(META_NAMESPACE) {
            Some(ns) if ns == &sh.cfg.namespace => {}
            other => {
                return Err(Error::Transport {
                    transport: NAME,
                    reason: format!(
                        "machine `{}` is not reachable over RabbitMQ namespace `{}` (it advertises {}): \
                         give its session the rabbitmq transport with the same namespace",
                        to.id,
                        sh.cfg.namespace,
                        other.map_or("none".to_string(), |n| format!("`{n}`"))
                    ),
                    retryable: true,
                });
            }
        }
        Ok(Arc::new(RabbitLink {
            shared: sh.clone(),
            to: to.id.clone(),
            key: names::short(to.id.as_str().to_string(), "machine")?,
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
                format!("connected to {}", sh.cfg.redacted_url())
            } else {
                format!(
                    "not connected to {}{}",
                    sh.cfg.redacted_url(),
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
        lock(&sh.machines).clear();
        {
            let mut subs = lock(&sh.subs);
            subs.topics.clear();
            subs.groups.clear();
        }
        if let Some(live) = sh.state.send_replace(None)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = live.conn.close(200, "session closed".into()).await;
            });
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
