//! The conformance suite: one behaviour suite written against the Node API and
//! the `Transport` capabilities, instantiated once per transport with
//! [`conformance_suite!`]. A transport that lacks a capability must fail with
//! the documented error, which the suite checks instead of skipping.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard::{
    Balance, Builder, ContextId, Envelope, Error, FullPolicy, Location, MachineBuilder, MachineId,
    Node, RegistryEvent, Session, SubscribeOptions,
};
use tokio::sync::mpsc;

/// How long a test waits for an event before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

#[path = "../support/wait.rs"]
mod wait;
pub use wait::until;

/// Where a session of a world runs: what a fixture's `configure` gets.
pub struct Host<'a> {
    /// Unique per world: a fixture keys what the sessions of one world share by it (a
    /// daemon socket, a broker namespace).
    pub namespace: &'a str,
    /// 0 for the world's first session; 1, 2, ... for the machines of a multi-host world.
    pub index: usize,
    /// The host id of this session (multi-host worlds give each machine its own).
    pub host_id: &'a str,
    /// In a multi-host world, the registry of the world's first session, for a fixture
    /// whose sessions share a registry object (an in-process one; a registry client a
    /// fixture can share). `None` for the first session itself.
    pub first_registry: Option<&'a Arc<dyn switchyard::Registry>>,
}

/// Builds one session of a world.
type Configure = Arc<dyn Fn(Builder, &Host<'_>) -> Builder + Send + Sync>;

/// How to build sessions and place machines so that one transport carries the traffic.
#[derive(Clone)]
pub struct Fixture {
    /// The transport that must carry every message (`Envelope::carried_by`).
    pub transport: &'static str,
    /// The location the selector must compute between two machines of one world.
    pub location: Location,
    configure: Configure,
    same_context: bool,
    /// Every machine runs in a session of its own, with a host id of its own, the sessions
    /// sharing one registry: the selector computes `Remote` itself.
    multi_host: bool,
    /// What `publish` returns for its part (see [`Fixture::with_counts`]).
    counts: Counts,
}

/// What a transport's `publish` returns (docs/SEMANTICS.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counts {
    /// The machines that got it, after their content filters.
    Exact,
    /// 1 when the broker routed it to at least one subscriber, 0 when none matched
    /// (a broker does not report how many machines got a message).
    Routed,
}

impl Fixture {
    /// A fixture for a transport under test: `configure` builds each session of a world.
    /// With `multi_host`, each machine gets its own session (own host id), and `configure`
    /// makes the sessions of a world share one registry (see [`Host`]), so every pair of
    /// machines is `Remote`.
    pub fn new(
        transport: &'static str,
        location: Location,
        multi_host: bool,
        configure: impl Fn(Builder, &Host<'_>) -> Builder + Send + Sync + 'static,
    ) -> Fixture {
        Fixture {
            transport,
            location,
            configure: Arc::new(configure),
            same_context: false,
            multi_host,
            counts: Counts::Exact,
        }
    }

    /// Says what the transport's `publish` returns.
    pub fn with_counts(mut self, counts: Counts) -> Fixture {
        self.counts = counts;
        self
    }

    /// Other hosts through RabbitMQ: each machine in a session of its own (own host id, own
    /// connection), the sessions sharing the first one's registry and one broker namespace
    /// per world. The broker comes from `SWITCHYARD_AMQP_URL` (default: the local one).
    #[cfg(feature = "rabbitmq")]
    pub fn rabbitmq() -> Fixture {
        use switchyard::rabbitmq::{RabbitConfig, RabbitTransport};
        Fixture::new("rabbitmq", Location::Remote, true, |b, host| {
            let cfg = RabbitConfig::from_env().namespace(format!("sy-conf-{}", host.namespace));
            let t = RabbitTransport::start(cfg).expect("the rabbitmq transport starts");
            let b = b
                .selector(|s| s.prefer(Location::Remote, ["rabbitmq"]))
                .rabbitmq(&t)
                .session(|s| s.heartbeat_interval(Some(Duration::from_millis(250))));
            match host.first_registry {
                Some(r) => {
                    let r = r.clone();
                    b.session(move |s| s.registry(r))
                }
                None => b,
            }
        })
        .with_counts(Counts::Routed)
    }

    /// Other hosts through Redis: each machine in a session of its own (own host id, own
    /// transport), the sessions sharing one registry and one namespace per world. The server
    /// comes from `SWITCHYARD_REDIS_URL` (default: the local one).
    #[cfg(feature = "redis")]
    pub fn redis() -> Fixture {
        use switchyard::redis::{RedisTransport, RedisTransportConfig};
        Fixture::new("redis", Location::Remote, true, |b, host| {
            let cfg =
                RedisTransportConfig::from_env().namespace(format!("sy-conf-{}", host.namespace));
            let t = RedisTransport::start(cfg).expect("the redis transport starts");
            let b = b
                .selector(|s| s.prefer(Location::Remote, ["redis"]))
                .redis(&t)
                .session(|s| s.heartbeat_interval(Some(Duration::from_millis(250))));
            redis_registry(b, host)
        })
        .with_counts(Counts::Routed)
    }

    /// Same-thread: only the direct transport, every machine in one context.
    pub fn direct() -> Fixture {
        Fixture {
            same_context: true,
            ..Fixture::new("direct", Location::SameThread, false, |b, _| {
                b.selector(|s| s.without(["memory"]))
            })
        }
    }

    /// Same-process: only the memory transport, no shared context.
    pub fn memory() -> Fixture {
        Fixture::new("memory", Location::SameProcess, false, |b, _| {
            b.selector(|s| s.without(["direct"]))
        })
    }

    /// Same host through the bus daemon: a private daemon per world on its own temp socket,
    /// only the ipc transport, and every target forced to `SameMachine`.
    #[cfg(feature = "ipc")]
    pub fn ipc_bus() -> Fixture {
        Self::ipc(false)
    }

    /// Same host peer-to-peer: like [`Fixture::ipc_bus`], but events go straight to the
    /// session's own socket; the daemon only locates machines (and fans out topics).
    #[cfg(feature = "ipc")]
    pub fn ipc_p2p() -> Fixture {
        Self::ipc(true)
    }

    #[cfg(feature = "ipc")]
    fn ipc(p2p: bool) -> Fixture {
        use switchyard::ipc::{Daemon, DaemonConfig, IpcBus, IpcConfig, unique_socket_path};
        Fixture::new("ipc", Location::SameMachine, false, move |b, _| {
            let socket = unique_socket_path(&std::env::temp_dir(), "sy-conf");
            let daemon =
                Daemon::start(DaemonConfig::new(&socket)).expect("a private bus daemon starts");
            let mut cfg = IpcConfig::new(&socket)
                .ttl(Duration::from_secs(1))
                .keep_alive(Arc::new(daemon));
            if p2p {
                cfg = cfg.peer_to_peer();
            }
            let bus = IpcBus::connect(cfg).expect("the ipc client starts");
            b.selector(|s| {
                s.without(["direct", "memory"])
                    .force_location_all(Location::SameMachine)
            })
            .ipc(&bus)
            .session(|s| s.heartbeat_interval(Some(Duration::from_millis(250))))
        })
    }

    /// A multi-host world on one bus daemon: each machine in a session of its own with a
    /// host id of its own, all registered in the daemon, and the selector configured to
    /// reach `Remote` through ipc. It checks the multi-host harness the remote transports
    /// use (nothing is forced: the selector computes `Remote`).
    #[cfg(feature = "ipc")]
    pub fn ipc_hosts() -> Fixture {
        use switchyard::ipc::{Daemon, DaemonConfig, IpcBus, IpcConfig};
        Fixture::new("ipc", Location::Remote, true, |b, host| {
            let socket = std::env::temp_dir().join(format!("sy-hosts-{}.sock", host.namespace));
            let mut cfg = IpcConfig::new(&socket).ttl(Duration::from_secs(1));
            if host.index == 0 {
                let daemon =
                    Daemon::start(DaemonConfig::new(&socket)).expect("a private bus daemon starts");
                cfg = cfg.keep_alive(Arc::new(daemon));
            }
            let bus = IpcBus::connect(cfg).expect("the ipc client starts");
            b.selector(|s| s.prefer(Location::Remote, ["ipc"]))
                .ipc(&bus)
                .session(|s| s.heartbeat_interval(Some(Duration::from_millis(250))))
        })
    }

    /// Every machine on a host of its own, each session with its own zeromq transport
    /// (ROUTER and PUB on loopback ports), all sharing the first session's in-process
    /// registry: the selector computes `Remote` and picks zeromq with nothing forced.
    #[cfg(feature = "zeromq")]
    pub fn zeromq() -> Fixture {
        use switchyard::zeromq::{ZmqConfig, ZmqTransport};
        Fixture::new("zeromq", Location::Remote, true, |b, host| {
            let zmq = ZmqTransport::new(ZmqConfig::default()).expect("zeromq binds on loopback");
            let b = b
                .zeromq(&zmq)
                .session(|s| s.heartbeat_interval(Some(Duration::from_millis(250))));
            match host.first_registry {
                Some(r) => {
                    let r = r.clone();
                    b.session(|s| s.registry(r))
                }
                None => b,
            }
        })
    }

    /// A world with default session settings.
    pub fn world(&self) -> World {
        self.world_with(|b| b)
    }

    /// A world whose sessions are adjusted by `f` (after the fixture's own settings).
    pub fn world_with(&self, f: impl Fn(Builder) -> Builder + Send + Sync + 'static) -> World {
        let namespace = format!("{}-{:x}", std::process::id(), fastrand_u64());
        let adjust: Arc<dyn Fn(Builder) -> Builder + Send + Sync> = Arc::new(f);
        let host = Host {
            namespace: &namespace,
            index: 0,
            host_id: "host-0",
            first_registry: None,
        };
        let mut b = adjust((self.configure)(switchyard::builder(), &host));
        if self.multi_host {
            b = b.session(|s| s.host_id(format!("{namespace}-host-0")));
        }
        let session = b.build().expect("session builds inside a runtime");
        let ctx = self.same_context.then(|| session.context());
        World {
            fx: self.clone(),
            session,
            ctx,
            namespace,
            adjust,
            hosts: std::sync::Mutex::new(Vec::new()),
        }
    }
}

/// The registry the sessions of a redis world share: a `RedisRegistry` in a namespace of
/// the world's own, made by its first host and shared by the others, so the selector of
/// each session finds the others' machines in Redis and computes `Remote` itself.
#[cfg(feature = "redis")]
fn redis_registry(b: Builder, host: &Host<'_>) -> Builder {
    use switchyard::redis::{RedisConfig, RedisRegistry};
    let registry: Arc<dyn switchyard::Registry> = match host.first_registry {
        Some(r) => r.clone(),
        None => {
            let cfg = RedisConfig::from_env().namespace(format!("sy-conf-{}", host.namespace));
            // The fixture hook is synchronous; the multi-thread test runtime can block here.
            let reg = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(
                    RedisRegistry::builder(cfg)
                        .ttl(Duration::from_secs(1))
                        .remove_after(Duration::from_secs(60))
                        .connect(),
                )
            })
            .expect("the redis registry connects");
            Arc::new(reg)
        }
    };
    b.session(move |s| s.registry(registry))
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// The sessions of one test and where its machines go.
pub struct World {
    /// The fixture that made it.
    pub fx: Fixture,
    /// The world's first session (in a multi-host world: the registry's owner; machines
    /// run in sessions of their own).
    pub session: Session,
    ctx: Option<ContextId>,
    namespace: String,
    adjust: Arc<dyn Fn(Builder) -> Builder + Send + Sync>,
    hosts: std::sync::Mutex<Vec<Session>>,
}

impl World {
    /// Starts a machine placed as the fixture requires.
    pub fn machine(&self, id: &str, machine_type: &str) -> MachineBuilder {
        if self.fx.multi_host {
            let mut hosts = self.hosts.lock().unwrap();
            let index = hosts.len() + 1;
            let host_id = format!("{}-host-{index}", self.namespace);
            let host = Host {
                namespace: &self.namespace,
                index,
                host_id: &host_id,
                first_registry: Some(self.session.registry()),
            };
            let session = (self.adjust)((self.fx.configure)(switchyard::builder(), &host))
                .session(|s| s.host_id(host_id.clone()))
                .build()
                .expect("a host session builds");
            let b = session.machine(id, machine_type);
            hosts.push(session);
            return b;
        }
        let b = self.session.machine(id, machine_type);
        match self.ctx {
            Some(c) => b.context(c),
            None => b,
        }
    }

    /// Whether every machine runs on a host of its own.
    pub fn multi_host(&self) -> bool {
        self.fx.multi_host
    }

    /// What `publish` returns when `n` machines got it (see [`Counts`]).
    pub fn published(&self, n: usize) -> usize {
        match self.fx.counts {
            Counts::Exact => n,
            Counts::Routed => n.min(1),
        }
    }

    /// Shuts every session of the world down.
    pub fn shutdown(self) {
        let World { session, hosts, .. } = self;
        drop(hosts);
        drop(session);
    }

    /// The capabilities of the transport under test.
    pub fn caps(&self) -> switchyard::transport::Capabilities {
        self.session
            .router()
            .transports()
            .iter()
            .find(|t| t.name() == self.fx.transport)
            .expect("the fixture's transport is configured")
            .capabilities()
            .clone()
    }

    /// A machine whose `on_error` hook reports into the returned channel.
    pub async fn hooked(
        &self,
        id: &str,
        machine_type: &str,
    ) -> (Node, mpsc::UnboundedReceiver<Error>) {
        let (tx, rx) = mpsc::unbounded_channel::<Error>();
        let node = self
            .machine(id, machine_type)
            .on_error(move |_, e| {
                let _ = tx.send(e.clone());
            })
            .build()
            .await
            .expect("machine builds");
        (node, rx)
    }

    /// A machine that records what it receives.
    pub async fn recorder(&self, id: &str, machine_type: &str) -> (Node, Recorder) {
        let (rec, h) = Recorder::new();
        let node = self
            .machine(id, machine_type)
            .handler(h)
            .build()
            .await
            .expect("machine builds");
        (node, rec)
    }

    /// A machine that answers `PING` with `PONG` (as a reply) and records everything.
    pub async fn ponger(&self, id: &str, machine_type: &str) -> (Node, Recorder) {
        let (tx, rx) = mpsc::unbounded_channel();
        let node = self
            .machine(id, machine_type)
            .handler(move |node, ev| {
                if ev.name() == "PING" {
                    node.post_reply(&ev, "PONG", ev.payload.read::<u32>().unwrap_or(0))
                        .expect("reply accepted");
                }
                let _ = tx.send(ev);
            })
            .build()
            .await
            .expect("machine builds");
        (node, Recorder { rx })
    }
}

/// Receives what a recording machine got.
pub struct Recorder {
    rx: mpsc::UnboundedReceiver<Envelope>,
}

impl Recorder {
    /// A recorder and the handler that feeds it.
    pub fn new() -> (Recorder, impl Fn(&Node, Envelope) + Send + Sync + 'static) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Recorder { rx }, move |_: &Node, ev: Envelope| {
            let _ = tx.send(ev);
        })
    }

    /// The next event; fails the test after [`WAIT`].
    pub async fn next(&mut self) -> Envelope {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("an event arrives in time")
            .expect("the machine is alive")
    }

    /// The next `n` events.
    pub async fn take(&mut self, n: usize) -> Vec<Envelope> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.next().await);
        }
        v
    }

    /// Whatever has arrived already, without waiting.
    pub fn drain_now(&mut self) -> Vec<Envelope> {
        let mut v = Vec::new();
        while let Ok(e) = self.rx.try_recv() {
            v.push(e);
        }
        v
    }
}

/// Runs each behaviour of the suite as its own test for one fixture.
#[macro_export]
macro_rules! conformance_suite {
    ($fixture:expr) => {
        $crate::conformance_suite!(@all ($crate::conformance::always); $fixture);
    };
    // `$ready()` is false when a server the tests need is missing: it says why (and fails
    // under CI), and the tests return without running.
    ($fixture:expr, skip_unless = $ready:path) => {
        $crate::conformance_suite!(@all ($ready); $fixture);
    };
    (@all ($ready:expr); $fixture:expr) => {
        $crate::conformance_suite!(@tests ($ready); $fixture;
            connect_establishes_bidirectional_link, disconnect_stops_communication,
            multiple_independent_connections, send_delivers_to_target, broadcast_delivers_to_all_connected,
            payload_preserved, send_to_unregistered_is_error, strict_missing_link_is_error,
            duplicate_registration_is_error, symmetric_ping_pong, simultaneous_messages_no_deadlock,
            session_isolation, session_cleanup_on_drop, register_and_discover_by_type,
            auto_connect_same_type, discover_by_pattern, any_of_type_spreads_load, random_of_type_spreads_load,
            type_based_ping_pong, list_machine_types, health_turns_unhealthy_without_heartbeats,
            mesh_of_ten_all_to_all, request_reply, request_timeout, delayed_send_not_before_delay, self_send,
            group_delivers_to_exactly_one_member, topic_wildcards_and_content_filter, emit_delivers_like_publish,
            semantics_full_mailbox,
            expired_event_is_dropped_and_counted, handler_panic_does_not_kill_machine,
            fifo_per_sender_receiver, send_batch_delivers_in_order, rejoined_id_gets_the_new_events,
            borrowed_handler_sees_every_kind_of_event,
            reentrant_bounce_runs_to_completion, semantics_priority,
            declared_sender_follows_a_target_that_moved, declared_sender_to_a_target_that_left,
            each_machine_gets_a_publish_once, declared_publisher_publishes,
            multi_target_sends_try_every_target, semantics_ordering, semantics_delivery,
            semantics_unknown_target, semantics_dead_target, semantics_largest_message,
            request_from_an_async_handler_gets_its_reply,
            request_timeout_holds_while_the_target_works, post_failures_reach_the_caller,
            delayed_send_failure_reaches_the_hook);
    };
    (@tests ($ready:expr); $fixture:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                if !($ready)() {
                    return;
                }
                $crate::conformance::$name($fixture).await;
            }
        )*
    };
}

/// The readiness check of a suite that needs no server.
pub fn always() -> bool {
    true
}

fn assert_carried(w: &World, ev: &Envelope) {
    assert_eq!(
        ev.carried_by,
        Some(w.fx.transport),
        "event {} carried by the wrong transport",
        ev.name()
    );
}

fn strict(fx: &Fixture) -> World {
    fx.world_with(|b| b.session(|s| s.strict_links(true)))
}

pub async fn connect_establishes_bidirectional_link(fx: Fixture) {
    let w = strict(&fx);
    let (a, mut ra) = w.recorder("a", "T").await;
    let (b, mut rb) = w.recorder("b", "T").await;
    a.connect("b");
    if w.multi_host() {
        // Links belong to the session that makes them: across hosts each side connects.
        assert!(!b.is_connected(a.id()));
        b.connect("a");
    }
    assert!(a.is_connected(b.id()) && b.is_connected(a.id()));
    a.send("b", "HELLO", 1u32).await.unwrap();
    b.send("a", "HELLO", 2u32).await.unwrap();
    let eb = rb.next().await;
    let ea = ra.next().await;
    assert_eq!((eb.source.as_str(), eb.data::<u32>().unwrap()), ("a", 1));
    assert_eq!((ea.source.as_str(), ea.data::<u32>().unwrap()), ("b", 2));
    assert_carried(&w, &ea);
}

pub async fn disconnect_stops_communication(fx: Fixture) {
    let w = strict(&fx);
    let (a, _ra) = w.recorder("a", "T").await;
    let (b, mut rb) = w.recorder("b", "T").await;
    a.connect("b");
    if w.multi_host() {
        b.connect("a");
    }
    a.send("b", "BEFORE", ()).await.unwrap();
    assert_eq!(rb.next().await.name(), "BEFORE");
    assert!(b.disconnect("a"));
    if w.multi_host() {
        assert!(a.disconnect("b"));
    }
    assert!(matches!(
        a.send("b", "AFTER", ()).await,
        Err(Error::NotLinked { .. })
    ));
    assert!(matches!(
        b.send("a", "AFTER", ()).await,
        Err(Error::NotLinked { .. })
    ));
    assert!(!a.disconnect("b"), "the link is already gone");
}

pub async fn multiple_independent_connections(fx: Fixture) {
    let w = strict(&fx);
    let (a, _) = w.recorder("a", "T").await;
    let (_b, mut rb) = w.recorder("b", "T").await;
    let (c, _) = w.recorder("c", "T").await;
    let (_d, mut rd) = w.recorder("d", "T").await;
    a.connect("b");
    c.connect("d");
    a.send("b", "AB", ()).await.unwrap();
    c.send("d", "CD", ()).await.unwrap();
    assert_eq!(rb.next().await.source.as_str(), "a");
    assert_eq!(rd.next().await.source.as_str(), "c");
    assert!(matches!(
        a.send("d", "X", ()).await,
        Err(Error::NotLinked { .. })
    ));
    assert!(matches!(
        c.send("b", "X", ()).await,
        Err(Error::NotLinked { .. })
    ));
    assert_eq!(a.connections(), vec![MachineId::from("b")]);
}

pub async fn send_delivers_to_target(fx: Fixture) {
    let w = fx.world();
    let (a, _) = w.recorder("a", "T").await;
    let (b, mut rb) = w.recorder("b", "T").await;
    let (_c, mut rc) = w.recorder("c", "T").await;
    a.send("b", "GO", "payload".to_string()).await.unwrap();
    a.send("c", "MARK", ()).await.unwrap();
    let ev = rb.next().await;
    assert_eq!(ev.name(), "GO");
    assert_eq!(ev.data::<String>().unwrap(), "payload");
    assert_eq!(ev.source, *a.id());
    assert_eq!(ev.target.machine(), Some(b.id()));
    assert_carried(&w, &ev);
    assert_eq!(rc.next().await.name(), "MARK", "c gets only its own event");
    let (_, loc) = a.locate(b.id()).await.unwrap();
    assert_eq!(loc, w.fx.location);
}

pub async fn broadcast_delivers_to_all_connected(fx: Fixture) {
    let w = fx.world();
    let (a, _) = w.recorder("a", "T").await;
    let mut recs = Vec::new();
    for id in ["b", "c", "d"] {
        let (_n, r) = w.recorder(id, "T").await;
        a.connect(id);
        recs.push((_n, r));
    }
    let (_e, mut re) = w.recorder("e", "T").await;
    assert_eq!(a.broadcast("NEWS", 7u32).await.unwrap(), 3);
    for (_, r) in &mut recs {
        let ev = r.next().await;
        assert_eq!((ev.name(), ev.data::<u32>().unwrap()), ("NEWS", 7));
    }
    a.send("e", "MARK", ()).await.unwrap();
    assert_eq!(
        re.next().await.name(),
        "MARK",
        "an unlinked machine gets no broadcast"
    );
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Inner {
    tags: Vec<String>,
    score: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Nested {
    id: u64,
    name: String,
    inner: Inner,
    map: BTreeMap<String, i32>,
    #[serde(with = "serde_bytes")]
    blob: Vec<u8>,
}

pub async fn payload_preserved(fx: Fixture) {
    let w = fx.world();
    let (a, _) = w.recorder("a", "T").await;
    let (_b, mut rb) = w.recorder("b", "T").await;
    let nested = Nested {
        id: u64::MAX,
        name: "ünïcødé ✓ 漢字 🚂".into(),
        inner: Inner {
            tags: vec!["x".into(), String::new()],
            score: Some(-1.5),
        },
        map: [("k".to_string(), -3)].into_iter().collect(),
        blob: (0..=255).collect(),
    };
    a.send("b", "NESTED", nested.clone()).await.unwrap();
    a.send(
        "b",
        "BINARY",
        serde_bytes::ByteBuf::from(vec![0u8, 1, 2, 255]),
    )
    .await
    .unwrap();
    a.send("b", "UNICODE", "こんにちは 🌍".to_string())
        .await
        .unwrap();
    a.send("b", "EMPTY", ()).await.unwrap();
    let evs = rb.take(4).await;
    assert_eq!(evs[0].data::<Nested>().unwrap(), nested);
    assert_eq!(
        evs[0].payload.read::<Nested>().unwrap(),
        nested,
        "the MessagePack form reads back the same"
    );
    assert_eq!(
        evs[1].data::<serde_bytes::ByteBuf>().unwrap().into_vec(),
        vec![0u8, 1, 2, 255]
    );
    assert_eq!(evs[2].data::<String>().unwrap(), "こんにちは 🌍");
    evs[3].data::<()>().unwrap();
    assert_eq!(evs[3].data::<Option<u32>>().unwrap(), None);
    assert!(
        matches!(evs[2].data::<u64>(), Err(Error::PayloadType { .. })),
        "a type mismatch is a typed error"
    );
}

pub async fn send_to_unregistered_is_error(fx: Fixture) {
    let w = fx.world();
    let (a, _) = w.recorder("a", "T").await;
    assert!(
        matches!(a.send("ghost", "X", ()).await, Err(Error::UnknownTarget(id)) if id.as_str() == "ghost")
    );
    let (b, _) = w.recorder("b", "T").await;
    b.close().await.unwrap();
    assert!(
        matches!(a.send("b", "X", ()).await, Err(Error::UnknownTarget(_))),
        "a closed machine is gone"
    );
}

pub async fn strict_missing_link_is_error(fx: Fixture) {
    let w = strict(&fx);
    let (a, _) = w.recorder("a", "T").await;
    let (_b, _) = w.recorder("b", "T").await;
    let err = a.send("b", "X", ()).await.unwrap_err();
    assert!(matches!(err, Error::NotLinked { .. }));
    assert!(
        err.to_string().contains("connect"),
        "the message says what to do: {err}"
    );
}

pub async fn duplicate_registration_is_error(fx: Fixture) {
    let w = fx.world();
    let (_a, _) = w.recorder("a", "T").await;
    let dup = w.machine("a", "Other").build().await;
    assert!(matches!(dup, Err(Error::DuplicateId(id)) if id.as_str() == "a"));
}

pub async fn symmetric_ping_pong(fx: Fixture) {
    let w = fx.world();
    let (a, mut ra) = w.ponger("a", "Peer").await;
    let (b, mut rb) = w.ponger("b", "Peer").await;
    for i in 0..3u32 {
        a.send("b", "PING", i).await.unwrap();
        b.send("a", "PING", i).await.unwrap();
    }
    let count = |evs: &[Envelope], name: &str| evs.iter().filter(|e| e.name() == name).count();
    // Each side gets the other's 3 PINGs and the 3 PONGs answering its own.
    let ea = ra.take(6).await;
    let eb = rb.take(6).await;
    assert_eq!((count(&ea, "PING"), count(&ea, "PONG")), (3, 3));
    assert_eq!((count(&eb, "PING"), count(&eb, "PONG")), (3, 3));
    assert!(
        ea.iter()
            .chain(&eb)
            .all(|e| e.carried_by == Some(w.fx.transport))
    );
    a.send("b", "MARK", ()).await.unwrap();
    b.send("a", "MARK", ()).await.unwrap();
    assert_eq!(
        ra.next().await.name(),
        "MARK",
        "exactly 6 events each, nothing more"
    );
    assert_eq!(rb.next().await.name(), "MARK");
}

pub async fn simultaneous_messages_no_deadlock(fx: Fixture) {
    let w = fx.world();
    let (a, mut ra) = w.ponger("a", "Peer").await;
    let (b, mut rb) = w.ponger("b", "Peer").await;
    const N: usize = 300;
    let (a2, b2) = (a.clone(), b.clone());
    let t1 = tokio::spawn(async move {
        for i in 0..N as u32 {
            a2.send("b", "PING", i).await.unwrap();
        }
    });
    let t2 = tokio::spawn(async move {
        for i in 0..N as u32 {
            b2.send("a", "PING", i).await.unwrap();
        }
    });
    tokio::time::timeout(WAIT, async {
        t1.await.unwrap();
        t2.await.unwrap()
    })
    .await
    .expect("no deadlock");
    // Each side gets N PINGs and N PONGs (replies to plain events are plain events).
    let ea = ra.take(2 * N).await;
    let eb = rb.take(2 * N).await;
    for evs in [&ea, &eb] {
        assert_eq!(evs.iter().filter(|e| e.name() == "PING").count(), N);
        assert_eq!(evs.iter().filter(|e| e.name() == "PONG").count(), N);
    }
}

pub async fn session_isolation(fx: Fixture) {
    let w1 = fx.world();
    let w2 = fx.world();
    let (a1, _) = w1.recorder("a", "T").await;
    let (_a2, _) = w2.recorder("a", "T").await;
    let (_only2, _) = w2.recorder("only-in-2", "Hidden").await;
    assert!(matches!(
        a1.send("only-in-2", "X", ()).await,
        Err(Error::UnknownTarget(_))
    ));
    assert!(a1.discover("Hidden").await.unwrap().is_empty());
    assert_eq!(
        w1.session.registry().types().await.unwrap(),
        vec!["T".to_string()]
    );
}

struct DropSignal(Option<tokio::sync::oneshot::Sender<()>>);
impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn session_cleanup_on_drop(fx: Fixture) {
    let w = fx.world();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let guard = DropSignal(Some(tx));
    let b = w
        .machine("b", "T")
        .handler(move |_, _| {
            let _ = &guard;
        })
        .build()
        .await
        .unwrap();
    let (a, _) = w.recorder("a", "T").await;
    a.send("b", "X", ()).await.unwrap();
    w.shutdown();
    assert!(matches!(
        a.send("b", "X", ()).await,
        Err(Error::SessionClosed)
    ));
    drop(b);
    tokio::time::timeout(WAIT, rx)
        .await
        .expect("the handler is released once the session is dropped")
        .unwrap();
}

pub async fn register_and_discover_by_type(fx: Fixture) {
    let w = fx.world();
    let ping = w
        .machine("", "PingService")
        .version("1.2.0")
        .accepts(["PONG"])
        .metadata("zone", "a")
        .build()
        .await
        .unwrap();
    let id = ping.id().as_str();
    let parts: Vec<&str> = id.rsplitn(3, '-').collect();
    assert_eq!(
        parts.len(),
        3,
        "generated id {id} is {{type}}-{{n}}-{{8 hex}}"
    );
    assert_eq!(parts[2], "PingService");
    assert!(parts[0].len() == 8 && parts[0].chars().all(|c| c.is_ascii_hexdigit()));
    let (_p1, _) = w.recorder("pong-1", "PongService").await;
    let (_p2, _) = w.recorder("pong-2", "PongService").await;
    let found = ping.discover("PongService").await.unwrap();
    let ids: Vec<_> = found.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, vec!["pong-1", "pong-2"]);
    let me = &ping.discover("PingService").await.unwrap()[0];
    assert_eq!(me.version.as_deref(), Some("1.2.0"));
    assert_eq!(me.accepts, vec!["PONG".to_string()]);
    assert_eq!(me.metadata.get("zone").map(String::as_str), Some("a"));
    assert!(ping.discover("Nope").await.unwrap().is_empty());
}

pub async fn auto_connect_same_type(fx: Fixture) {
    let w = fx.world_with(|b| b.session(|s| s.strict_links(true).auto_link_same_type(true)));
    let (_w1, mut r1) = w.recorder("w1", "Worker").await;
    let (_w2, mut r2) = w.recorder("w2", "Worker").await;
    let (w3, mut r3) = w.recorder("w3", "Worker").await;
    let (o, _) = w.recorder("other", "Other").await;
    // The newcomer is linked to those already there (in its own session, across hosts).
    assert_eq!(
        w3.connections(),
        vec![MachineId::from("w1"), MachineId::from("w2")]
    );
    assert_eq!(w3.broadcast_to_same_type("HI", ()).await.unwrap(), 2);
    assert_eq!(r1.next().await.name(), "HI");
    assert_eq!(r2.next().await.name(), "HI");
    assert!(matches!(
        o.send("w1", "X", ()).await,
        Err(Error::NotLinked { .. })
    ));
    let found = o.discover_and_connect("Worker").await.unwrap();
    assert_eq!(found.len(), 3);
    o.send("w3", "NOW", ()).await.unwrap();
    assert_eq!(r3.next().await.name(), "NOW");
    let _ = w3;
}

pub async fn discover_by_pattern(fx: Fixture) {
    let w = fx.world();
    for (id, t) in [
        ("1", "Service_1"),
        ("2", "service_Alpha_2"),
        ("3", "MyService_1"),
        ("4", "a.b"),
        ("5", "axb"),
        ("6", "Svc_Alpha_X"),
    ] {
        w.machine(id, t).build().await.unwrap();
    }
    let reg = w.session.registry();
    let types = |v: Vec<switchyard::MachineEntry>| {
        let mut t: Vec<String> = v.into_iter().map(|e| e.machine_type.to_string()).collect();
        t.sort();
        t
    };
    assert_eq!(
        types(reg.discover_pattern("Service_*").await.unwrap()),
        vec!["Service_1", "service_Alpha_2"]
    );
    assert_eq!(
        types(reg.discover_pattern("*_Alpha_*").await.unwrap()),
        vec!["Svc_Alpha_X", "service_Alpha_2"]
    );
    assert_eq!(
        types(reg.discover_pattern("a.b").await.unwrap()),
        vec!["a.b"]
    );
    assert_eq!(
        types(reg.discover_pattern("a?b").await.unwrap()),
        vec!["a.b", "axb"]
    );
    assert_eq!(
        types(reg.discover_pattern("SERVICE_?").await.unwrap()),
        vec!["Service_1"]
    );
    assert!(matches!(
        reg.discover_pattern("").await,
        Err(Error::InvalidPattern { .. })
    ));
}

async fn spread(fx: Fixture, balance: Balance) {
    let w = fx.world();
    let mut recs = Vec::new();
    for i in 0..4 {
        let (n, r) = w.recorder(&format!("w{i}"), "Worker").await;
        recs.push((n, r));
    }
    let sender = w
        .machine("boss", "Worker")
        .balance(balance)
        .build()
        .await
        .unwrap();
    let mut counts: HashMap<MachineId, usize> = HashMap::new();
    for i in 0..1000u32 {
        let to = sender
            .send_to_any_of_type("Worker", "JOB", i)
            .await
            .unwrap();
        assert_ne!(&to, sender.id(), "never to itself");
        *counts.entry(to).or_default() += 1;
    }
    let mut received = 0;
    for (n, r) in &mut recs {
        let got = counts.get(n.id()).copied().unwrap_or(0);
        let evs = r.take(got).await;
        received += evs.len();
        assert!(got > 0, "{} got none of 1000", n.id());
        assert!(got < 1000, "{} got all", n.id());
        assert!(evs.iter().all(|e| e.name() == "JOB"));
    }
    assert_eq!(received, 1000);
    if balance == Balance::RoundRobin {
        assert!(
            counts.values().all(|c| *c == 250),
            "round robin is even: {counts:?}"
        );
    }
}

pub async fn any_of_type_spreads_load(fx: Fixture) {
    spread(fx, Balance::RoundRobin).await;
}

pub async fn random_of_type_spreads_load(fx: Fixture) {
    spread(fx, Balance::Random).await;
}

pub async fn type_based_ping_pong(fx: Fixture) {
    let w = fx.world();
    let (_pong, mut rpong) = w.ponger("", "PongService").await;
    let ping = w.machine("", "PingService").build().await.unwrap();
    assert!(matches!(
        ping.send_to_any_of_type("Missing", "PING", 1u32).await,
        Err(Error::NoMachineOfType(_))
    ));
    let pongs = ping.discover("PongService").await.unwrap();
    assert_eq!(pongs.len(), 1);
    for i in 0..5u32 {
        let reply = ping
            .request(pongs[0].id.clone(), "PING", i, WAIT)
            .await
            .unwrap();
        assert_eq!((reply.name(), reply.data::<u32>().unwrap()), ("PONG", i));
    }
    let to = ping
        .send_to_any_of_type("PongService", "PING", 9u32)
        .await
        .unwrap();
    assert_eq!(to, pongs[0].id);
    assert_eq!(
        rpong
            .take(6)
            .await
            .iter()
            .filter(|e| e.name() == "PING")
            .count(),
        6
    );
}

pub async fn list_machine_types(fx: Fixture) {
    let w = fx.world();
    for (id, t) in [("a", "Zeta"), ("b", "Alpha"), ("c", "Alpha"), ("d", "Mid")] {
        w.machine(id, t).build().await.unwrap();
    }
    assert_eq!(
        w.session.registry().types().await.unwrap(),
        vec!["Alpha", "Mid", "Zeta"]
    );
}

pub async fn health_turns_unhealthy_without_heartbeats(fx: Fixture) {
    let w = fx.world_with(|b| {
        b.session(|s| {
            s.health_ttl(Duration::from_millis(200))
                .heartbeat_interval(None)
        })
    });
    let reg = w.session.registry().clone();
    let mut watch = reg.watch();
    let (a, _) = w.recorder("a", "T").await;
    a.heartbeat().await.unwrap();
    assert!(reg.is_healthy(a.id()).await.unwrap());
    let ev = tokio::time::timeout(WAIT, async {
        loop {
            match watch.recv().await.unwrap() {
                e @ RegistryEvent::HealthChanged { .. } => break e,
                _ => continue,
            }
        }
    })
    .await
    .expect("health changes once heartbeats stop");
    assert_eq!(
        ev,
        RegistryEvent::HealthChanged {
            id: a.id().clone(),
            healthy: false
        }
    );
    assert!(!reg.is_healthy(a.id()).await.unwrap());
    a.heartbeat().await.unwrap();
    assert!(reg.is_healthy(a.id()).await.unwrap());
    loop {
        if let RegistryEvent::HealthChanged { healthy, .. } = watch.recv().await.unwrap() {
            assert!(healthy, "a heartbeat revives the machine");
            break;
        }
    }
}

pub async fn mesh_of_ten_all_to_all(fx: Fixture) {
    let w = fx.world();
    let mut nodes = Vec::new();
    for i in 0..10 {
        nodes.push(w.recorder(&format!("m{i}"), "Mesh").await);
    }
    for (n, _) in &nodes {
        for (m, _) in &nodes {
            if n.id() != m.id() {
                n.send(m.id().clone(), "HELLO", n.id().as_str().to_string())
                    .await
                    .unwrap();
            }
        }
    }
    let mut total = 0;
    for (n, r) in &mut nodes {
        let evs = r.take(9).await;
        let from: HashSet<String> = evs.iter().map(|e| e.data::<String>().unwrap()).collect();
        assert_eq!(from.len(), 9, "{} hears each other machine once", n.id());
        assert!(!from.contains(n.id().as_str()));
        total += evs.len();
        assert!(r.drain_now().is_empty());
    }
    assert_eq!(total, 90);
}

pub async fn request_reply(fx: Fixture) {
    let w = fx.world();
    let _server = w
        .machine("calc", "Calc")
        .handler(|node, ev| {
            let (a, b): (i64, i64) = ev.data().unwrap();
            node.post_reply(&ev, "SUM", a + b).unwrap();
        })
        .build()
        .await
        .unwrap();
    let client = w.machine("client", "Client").build().await.unwrap();
    for i in 0..20i64 {
        let r = client
            .request("calc", "ADD", (i, 100i64), WAIT)
            .await
            .unwrap();
        assert_eq!(r.data::<i64>().unwrap(), i + 100);
        assert_carried(&w, &r);
    }
    let (c2, c1) = tokio::join!(
        client.request("calc", "ADD", (1i64, 1i64), WAIT),
        client.request("calc", "ADD", (2i64, 2i64), WAIT)
    );
    assert_eq!(
        (
            c2.unwrap().data::<i64>().unwrap(),
            c1.unwrap().data::<i64>().unwrap()
        ),
        (2, 4)
    );
}

pub async fn request_timeout(fx: Fixture) {
    let w = fx.world();
    let (_silent, mut rs) = w.recorder("silent", "Silent").await;
    let client = w.machine("client", "Client").build().await.unwrap();
    let err = client
        .request("silent", "ASK", (), Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert_eq!(
        rs.next().await.name(),
        "ASK",
        "the request itself was delivered"
    );
    assert!(matches!(
        client.request("ghost", "ASK", (), WAIT).await,
        Err(Error::UnknownTarget(_))
    ));
}

pub async fn delayed_send_not_before_delay(fx: Fixture) {
    let w = fx.world();
    let (a, _) = w.recorder("a", "T").await;
    let (_b, mut rb) = w.recorder("b", "T").await;
    let delay = Duration::from_millis(80);
    let start = tokio::time::Instant::now();
    a.send_delayed("b", "LATER", 1u8, delay).await.unwrap();
    let cancelled = a.send_delayed("b", "CANCELLED", 2u8, delay).await.unwrap();
    cancelled.cancel();
    a.send("b", "NOW", 0u8).await.unwrap();
    assert_eq!(rb.next().await.name(), "NOW");
    let ev = rb.next().await;
    assert_eq!(ev.name(), "LATER");
    assert!(
        start.elapsed() >= delay,
        "arrived after {:?}, before its delay",
        start.elapsed()
    );
    a.send("b", "MARK", ()).await.unwrap();
    assert_eq!(
        rb.next().await.name(),
        "MARK",
        "the cancelled send never arrives"
    );
    assert!(matches!(
        a.send_delayed("ghost", "X", (), delay).await,
        Err(Error::UnknownTarget(_))
    ));
}

pub async fn self_send(fx: Fixture) {
    let w = fx.world();
    let (a, mut ra) = w.recorder("a", "T").await;
    a.send_self("TICK", 3u8).await.unwrap();
    let ev = ra.next().await;
    assert_eq!(
        (ev.name(), ev.source.as_str(), ev.data::<u8>().unwrap()),
        ("TICK", "a", 3)
    );
}

pub async fn group_delivers_to_exactly_one_member(fx: Fixture) {
    let w = fx.world();
    let (p, _) = w.recorder("producer", "P").await;
    if !w.caps().groups {
        assert!(matches!(
            p.join_group("g").await,
            Err(Error::NotSupported { .. })
        ));
        return;
    }
    let mut members = Vec::new();
    for i in 0..3 {
        let (n, r) = w.recorder(&format!("c{i}"), "C").await;
        n.join_group("workers").await.unwrap();
        members.push((n, r));
    }
    let (outsider, mut ro) = w.recorder("outsider", "C").await;
    outsider.join_group("others").await.unwrap();
    for i in 0..30u32 {
        assert_eq!(p.publish_to_group("workers", "JOB", i).await.unwrap(), 1);
    }
    let mut seen = Vec::new();
    for (_, r) in &mut members {
        let evs = r.take(10).await;
        assert_carried(&w, &evs[0]);
        seen.extend(evs.iter().map(|e| e.data::<u32>().unwrap()));
    }
    seen.sort();
    assert_eq!(
        seen,
        (0..30).collect::<Vec<_>>(),
        "each message reached exactly one member"
    );
    p.publish_to_group("others", "MARK", 0u32).await.unwrap();
    assert_eq!(ro.next().await.name(), "MARK");
    assert_eq!(p.publish_to_group("nobody", "X", ()).await.unwrap(), 0);
}

pub async fn topic_wildcards_and_content_filter(fx: Fixture) {
    let w = fx.world();
    let (p, _) = w.recorder("pub", "P").await;
    if !w.caps().topics {
        assert!(matches!(
            p.subscribe("a.*").await,
            Err(Error::NotSupported { .. })
        ));
        assert!(matches!(
            p.publish("a.b", "X", ()).await,
            Err(Error::NotSupported { .. })
        ));
        return;
    }
    let (one, mut r_one) = w.recorder("one", "S").await;
    let (many, mut r_many) = w.recorder("many", "S").await;
    let (filt, mut r_filt) = w.recorder("filtered", "S").await;
    one.subscribe("orders.*").await.unwrap();
    many.subscribe("orders.#").await.unwrap();
    let big_only: switchyard::transport::Filter =
        Arc::new(|e: &Envelope| e.data::<u32>().is_ok_and(|v| v >= 100));
    filt.subscribe_with(
        "orders.#",
        SubscribeOptions {
            group: None,
            filter: Some(big_only),
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        one.subscribe("orders..x").await,
        Err(Error::InvalidPattern { .. })
    ));
    assert!(matches!(
        p.publish("orders.*", "X", ()).await,
        Err(Error::InvalidPattern { .. })
    ));
    assert_eq!(
        p.publish("orders", "O0", 1u32).await.unwrap(),
        w.published(1)
    );
    assert_eq!(
        p.publish("orders.new", "O1", 5u32).await.unwrap(),
        w.published(2)
    );
    assert_eq!(
        p.publish("orders.new.eu", "O2", 500u32).await.unwrap(),
        w.published(2)
    );
    assert_eq!(p.publish("other.new", "O3", 500u32).await.unwrap(), 0);
    assert_eq!(r_one.next().await.name(), "O1");
    let names: Vec<String> = r_many
        .take(3)
        .await
        .iter()
        .map(|e| e.name().to_string())
        .collect();
    assert_eq!(names, ["O0", "O1", "O2"]);
    let ev = r_filt.next().await;
    assert_eq!(ev.name(), "O2");
    assert!(matches!(&ev.target, switchyard::Address::Topic(t) if &**t == "orders.new.eu"));
    assert_carried(&w, &ev);
}

/// `emit` delivers what `publish` would, in the publisher's order, only without the count.
pub async fn emit_delivers_like_publish(fx: Fixture) {
    let w = fx.world();
    let (p, _) = w.recorder("pub", "P").await;
    if !w.caps().topics {
        assert!(matches!(
            p.emit("a.b", "X", ()).await,
            Err(Error::NotSupported { .. })
        ));
        return;
    }
    let (s, mut rs) = w.recorder("sub", "S").await;
    s.subscribe("ticks.#").await.unwrap();
    assert!(matches!(
        p.emit("ticks.*", "X", ()).await,
        Err(Error::InvalidPattern { .. })
    ));
    const N: u32 = 500;
    for i in 0..N {
        p.emit("ticks.a", "TICK", i).await.unwrap();
    }
    // Nobody listens here: it must not show up among the ticks below.
    p.emit("other", "NOPE", 0u32).await.unwrap();
    // A publish after the emits arrives after them.
    assert_eq!(
        p.publish("ticks.b", "LAST", N).await.unwrap(),
        w.published(1)
    );
    for (i, ev) in rs.take(N as usize + 1).await.iter().enumerate() {
        assert_eq!(ev.data::<u32>().unwrap(), i as u32, "emit order");
        assert_carried(&w, ev);
    }
}

pub async fn semantics_full_mailbox(fx: Fixture) {
    for policy in [
        FullPolicy::Wait,
        FullPolicy::DropNewest,
        FullPolicy::DropOldest,
        FullPolicy::Fail,
    ] {
        full_mailbox(fx.clone(), policy, false).await;
        full_mailbox(fx.clone(), policy, true).await;
    }
}

/// One policy, with events 1..=3 sent one by one or as one `send_batch`: the same outcome.
///
/// An async handler's events wait in its mailbox on every transport. In process the sender
/// meets the policy (it waits, or gets `MailboxFull`); across processes the receiving side
/// applies it (its reader waits; a refused event is dropped there and counted).
async fn full_mailbox(fx: Fixture, policy: FullPolicy, batch: bool) {
    let w = fx.world();
    let in_process = !w.caps().serializes;
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (tx, mut got) = mpsc::unbounded_channel::<u32>();
    let g = gate.clone();
    let slow = w
        .machine("slow", "Slow")
        .mailbox(2, policy)
        .handler_async(move |_, ev| {
            let (g, started_tx, tx) = (g.clone(), started_tx.clone(), tx.clone());
            async move {
                let v: u32 = ev.data().unwrap();
                if v == 0 {
                    let _ = started_tx.send(());
                    g.acquire().await.unwrap().forget();
                }
                let _ = tx.send(v);
            }
        })
        .build()
        .await
        .unwrap();
    let p = w.machine("p", "P").build().await.unwrap();
    let rest = async {
        if batch {
            p.send_batch("slow", (1..4u32).map(|v| ("E", v)))
                .await
                .map(drop)
        } else {
            for v in 1..4u32 {
                p.send("slow", "E", v).await?;
            }
            Ok(())
        }
    };
    p.send("slow", "E", 0u32).await.unwrap();
    tokio::time::timeout(WAIT, started.recv()).await.unwrap();
    // The handler holds event 0; the mailbox has room for 1 and 2, not for 3. Across
    // processes event 3 has reached the receiver once it was dropped there (a machine
    // elsewhere is no barrier: it may be reached by another path, and answer first).
    let third_arrived = || {
        until("event 3 reaches the full mailbox", || {
            slow.stats().dropped == 1
        })
    };
    let expected: Vec<u32> = match policy {
        FullPolicy::Wait => {
            use futures_util::FutureExt;
            let mut rest = Box::pin(rest);
            if in_process {
                assert!(
                    (&mut rest).now_or_never().is_none(),
                    "Wait: the sender waits while the mailbox is full"
                );
            }
            gate.add_permits(1);
            tokio::time::timeout(WAIT, rest).await.unwrap().unwrap();
            vec![0, 1, 2, 3]
        }
        FullPolicy::DropNewest => {
            rest.await.unwrap();
            third_arrived().await;
            gate.add_permits(1);
            vec![0, 1, 2]
        }
        FullPolicy::DropOldest => {
            rest.await.unwrap();
            third_arrived().await;
            gate.add_permits(1);
            vec![0, 2, 3]
        }
        FullPolicy::Fail => {
            let r = rest.await;
            if in_process {
                assert!(matches!(r, Err(Error::MailboxFull(_))), "{r:?}");
            } else {
                r.unwrap();
                third_arrived().await;
            }
            gate.add_permits(1);
            vec![0, 1, 2]
        }
    };
    let mut seen = Vec::new();
    for _ in 0..expected.len() {
        seen.push(
            tokio::time::timeout(WAIT, got.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    p.send("slow", "E", 99u32).await.unwrap();
    assert_eq!(
        got.recv().await,
        Some(99),
        "{policy:?}: nothing else was queued"
    );
    assert_eq!(seen, expected, "{policy:?}");
    let dropped = match policy {
        FullPolicy::DropNewest | FullPolicy::DropOldest => 1,
        FullPolicy::Fail if !in_process => 1,
        _ => 0,
    };
    assert_eq!(
        slow.stats().dropped,
        dropped,
        "{policy:?} counts what it drops"
    );
}

pub async fn expired_event_is_dropped_and_counted(fx: Fixture) {
    let w = fx.world();
    let (a, _) = w.recorder("a", "T").await;
    let (b, mut rb) = w.recorder("b", "T").await;
    a.message(b.id(), "STALE", ())
        .expires_at_us(1)
        .send()
        .await
        .unwrap();
    a.message(b.id(), "FRESH", ())
        .ttl(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    assert_eq!(
        rb.next().await.name(),
        "FRESH",
        "the expired event is never delivered"
    );
    assert_eq!(b.stats().expired, 1);
}

pub async fn handler_panic_does_not_kill_machine(fx: Fixture) {
    let w = fx.world();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _b = w
        .machine("b", "T")
        .handler(move |_, ev| {
            if ev.name() == "BOOM" {
                panic!("handler failure under test");
            }
            let _ = tx.send(ev.name().to_string());
        })
        .build()
        .await
        .unwrap();
    let (a, _) = w.recorder("a", "T").await;
    a.send("b", "BOOM", ()).await.unwrap();
    a.send("b", "AFTER", ()).await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap(),
        "AFTER"
    );
}

pub async fn fifo_per_sender_receiver(fx: Fixture) {
    let w = fx.world();
    let (a, _) = w.recorder("a", "T").await;
    let (c, _) = w.recorder("c", "T").await;
    let (_b, mut rb) = w.recorder("b", "T").await;
    const N: u32 = 2_000;
    let (a2, c2) = (a.clone(), c.clone());
    let t1 = tokio::spawn(async move {
        for i in 0..N {
            a2.send("b", "SEQ", i).await.unwrap();
        }
    });
    let t2 = tokio::spawn(async move {
        for i in 0..N {
            c2.send("b", "SEQ", i).await.unwrap();
        }
    });
    t1.await.unwrap();
    t2.await.unwrap();
    let mut next: HashMap<MachineId, u32> = HashMap::new();
    for ev in rb.take(2 * N as usize).await {
        let expected = next.entry(ev.source.clone()).or_default();
        assert_eq!(
            ev.data::<u32>().unwrap(),
            *expected,
            "events from {} arrive in order",
            ev.source
        );
        *expected += 1;
    }
    assert_eq!(next.values().copied().collect::<Vec<_>>(), vec![N, N]);
}

/// A batch arrives whole and in order, as the same events sent one by one would;
/// an empty batch sends nothing; a batch to an unknown machine is an error.
pub async fn send_batch_delivers_in_order(fx: Fixture) {
    let w = fx.world();
    let (a, _) = w.recorder("a", "T").await;
    let (_b, mut rb) = w.recorder("b", "T").await;
    const N: u32 = 1_000;
    let sent = a.send_batch("b", (0..N).map(|i| ("SEQ", i))).await.unwrap();
    assert_eq!(sent, N as usize);
    a.send("b", "AFTER", N).await.unwrap();
    let empty: Vec<(&str, u32)> = Vec::new();
    assert_eq!(a.send_batch("b", empty).await.unwrap(), 0);
    for (i, ev) in rb.take(N as usize + 1).await.iter().enumerate() {
        assert_eq!(ev.data::<u32>().unwrap(), i as u32, "batch order");
        assert_eq!(ev.source.as_str(), "a");
        assert_carried(&w, ev);
    }
    let err = a.send_batch("nobody", [("X", 1u8)]).await.unwrap_err();
    assert!(matches!(err, Error::UnknownTarget(_)), "{err}");
}

/// What a borrowed handler saw of one event, copied out.
#[derive(Debug)]
struct Seen {
    id: u64,
    source: String,
    event: String,
    u32_data: Option<u32>,
    nested: Option<Nested>,
    carried_by: Option<&'static str>,
}

/// A `handler_ref` machine gets what a `handler` machine would: plain sends and batches
/// (read in place where the transport can), expiring events, requests it answers, and
/// replies to its own requests, with ids, sources, names, payloads and the carrier intact.
pub async fn borrowed_handler_sees_every_kind_of_event(fx: Fixture) {
    let w = fx.world();
    let (tx, mut rx) = mpsc::unbounded_channel::<Seen>();
    let b = w
        .machine("b", "T")
        .handler_ref(move |node, ev| {
            if ev.name() == "ASK" {
                let req = ev
                    .to_envelope(switchyard::Address::Machine(node.id().clone()))
                    .expect("owned copy");
                node.post_reply(&req, "ANSWER", ev.data::<u32>().expect("u32") + 1)
                    .expect("reply accepted");
            }
            let _ = tx.send(Seen {
                id: ev.id,
                source: ev.source.to_string(),
                event: ev.event.to_string(),
                u32_data: ev.data::<u32>().ok(),
                nested: ev.payload.read::<Nested>().ok(),
                carried_by: ev.carried_by,
            });
        })
        .build()
        .await
        .unwrap();
    let (a, _) = w.recorder("a", "T").await;
    let nested = Nested {
        id: 7,
        name: "n".into(),
        inner: Inner {
            tags: vec!["x".into()],
            score: Some(0.5),
        },
        map: BTreeMap::from([("k".to_string(), 1)]),
        blob: vec![0, 255, 7],
    };
    a.send(b.id(), "ONE", 1u32).await.unwrap();
    a.send("b", "NESTED", nested.clone()).await.unwrap();
    a.send_batch("b", (10..110u32).map(|i| ("SEQ", i)))
        .await
        .unwrap();
    a.message(b.id(), "STALE", ())
        .expires_at_us(1)
        .send()
        .await
        .unwrap();
    a.message(b.id(), "FRESH", 5u32)
        .ttl(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    let answer = a.request("b", "ASK", 41u32, WAIT).await.unwrap();
    assert_eq!(answer.data::<u32>().unwrap(), 42);

    let mut got = Vec::new();
    while got.len() < 104 {
        got.push(rx.recv().await.expect("b is alive"));
    }
    for s in &got {
        assert_eq!(s.source, "a");
        assert_eq!(s.carried_by, Some(w.fx.transport), "{} carried by", s.event);
    }
    assert_eq!((got[0].event.as_str(), got[0].u32_data), ("ONE", Some(1)));
    assert_eq!(got[1].event, "NESTED");
    assert_eq!(
        got[1].nested.as_ref(),
        Some(&nested),
        "a struct payload reads back"
    );
    let seq: Vec<u32> = got[2..102].iter().map(|s| s.u32_data.unwrap()).collect();
    assert_eq!(seq, (10..110).collect::<Vec<_>>(), "the batch, in order");
    assert!(got[2..102].iter().all(|s| s.event == "SEQ"));
    let ids: HashSet<u64> = got.iter().map(|s| s.id).collect();
    assert_eq!(ids.len(), got.len(), "every event keeps its own id");
    assert_eq!(
        (got[102].event.as_str(), got[102].u32_data),
        ("FRESH", Some(5)),
        "the expired event is dropped, the fresh one delivered"
    );
    assert_eq!(
        (got[103].event.as_str(), got[103].u32_data),
        ("ASK", Some(41))
    );
    assert_eq!(b.stats().expired, 1);

    // Topic deliveries reach a borrowed handler too.
    if w.caps().topics {
        b.subscribe("ticks.#").await.unwrap();
        assert_eq!(
            a.publish("ticks.a", "TICK", 3u32).await.unwrap(),
            w.published(1)
        );
        let s = rx.recv().await.expect("b is alive");
        assert_eq!((s.event.as_str(), s.u32_data), ("TICK", Some(3)));
        assert_eq!(s.carried_by, Some(w.fx.transport));
    }

    // A borrowed handler's own requests still complete with their replies.
    let (_calc, _) = w.ponger("calc", "Calc").await;
    let pong = b.request("calc", "PING", 9u32, WAIT).await.unwrap();
    assert_eq!((pong.name(), pong.data::<u32>().unwrap()), ("PONG", 9));
    assert!(
        tokio::time::timeout(Duration::from_millis(50), rx.recv())
            .await
            .is_err(),
        "the reply completed the request instead of reaching the handler"
    );
}

/// A machine closed and built again under the same id gets what is sent after it came
/// back; nothing more reaches the closed one (no transport may keep a stale handle).
pub async fn rejoined_id_gets_the_new_events(fx: Fixture) {
    let w = fx.world();
    let (a, _) = w.recorder("a", "T").await;
    let (b1, mut r1) = w.recorder("b", "T").await;
    a.send("b", "ONE", 1u32).await.unwrap();
    assert_eq!(r1.next().await.name(), "ONE");
    b1.close().await.unwrap();
    let (_b2, mut r2) = w.recorder("b", "T").await;
    for i in 0..10u32 {
        a.send("b", "TWO", i).await.unwrap();
    }
    for i in 0..10u32 {
        let ev = r2.next().await;
        assert_eq!((ev.name(), ev.data::<u32>().unwrap()), ("TWO", i));
        assert_carried(&w, &ev);
    }
    assert!(
        r1.rx.try_recv().is_err(),
        "the closed machine got nothing more"
    );
}

/// Two machines bounce a counter from inside their handlers 10,000 times: a
/// transport that recursed would overflow the stack, one that deadlocked would time out.
pub async fn reentrant_bounce_runs_to_completion(fx: Fixture) {
    let w = fx.world();
    // Across hosts each bounce is a broker or network round trip: fewer still show it.
    let last: u32 = if w.multi_host() { 1_000 } else { 10_000 };
    let (done_tx, mut done) = mpsc::unbounded_channel::<u32>();
    for (me, other) in [("a", "b"), ("b", "a")] {
        let done_tx = done_tx.clone();
        w.machine(me, "Bouncer")
            .handler(move |node, ev| {
                let n: u32 = ev.data().unwrap();
                if n >= last {
                    let _ = done_tx.send(n);
                } else {
                    node.post(other, "BOUNCE", n + 1).unwrap();
                }
            })
            .build()
            .await
            .unwrap();
    }
    let starter = w.machine("starter", "S").build().await.unwrap();
    starter.send("a", "BOUNCE", 0u32).await.unwrap();
    let n = tokio::time::timeout(WAIT, done.recv())
        .await
        .expect("the bounce completes")
        .unwrap();
    assert_eq!(n, last);
}

/// A gated async handler holds event 0 while normal and urgent events queue behind it:
/// where the transport honours priority, the most urgent go first, each priority in FIFO
/// order; elsewhere everything stays in sending order.
pub async fn semantics_priority(fx: Fixture) {
    let w = fx.world();
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (tx, mut got) = mpsc::unbounded_channel::<String>();
    let g = gate.clone();
    let slow = w
        .machine("slow", "Slow")
        .handler_async(move |_, ev| {
            let (g, started_tx, tx) = (g.clone(), started_tx.clone(), tx.clone());
            async move {
                if ev.name() == "FIRST" {
                    let _ = started_tx.send(());
                    g.acquire().await.unwrap().forget();
                }
                let _ = tx.send(ev.name().to_string());
            }
        })
        .build()
        .await
        .unwrap();
    let p = w.machine("p", "P").build().await.unwrap();
    p.send("slow", "FIRST", ()).await.unwrap();
    tokio::time::timeout(WAIT, started.recv()).await.unwrap();
    let to_slow = p.sender("slow").await.unwrap();
    to_slow.send("N1", ()).await.unwrap();
    to_slow.message("H1", ()).priority(5).send().await.unwrap();
    to_slow.send("N2", ()).await.unwrap();
    p.message("slow", "U1", ())
        .priority(9)
        .send()
        .await
        .unwrap();
    to_slow.message("H2", ()).priority(5).send().await.unwrap();
    p.message("slow", "N3", ())
        .priority(0)
        .send()
        .await
        .unwrap();
    // Everything sent so far is queued at the receiver (behind FIRST) before the gate opens.
    until("six events queued behind FIRST", || {
        slow.stats().queued == 6
    })
    .await;
    gate.add_permits(1);
    let mut seen = Vec::new();
    for _ in 0..7 {
        seen.push(
            tokio::time::timeout(WAIT, got.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let expected: &[&str] = if w.caps().priority {
        &["FIRST", "U1", "H1", "H2", "N1", "N2", "N3"]
    } else {
        &["FIRST", "N1", "H1", "N2", "U1", "H2", "N3"]
    };
    assert_eq!(seen, expected);
}

/// A declared sender keeps reaching its target after the target left and joined again
/// (here or elsewhere), and never the machine that left.
pub async fn declared_sender_follows_a_target_that_moved(fx: Fixture) {
    let w = fx.world();
    let (a, _) = w.recorder("a", "T").await;
    let (b1, mut r1) = w.recorder("b", "T").await;
    let to_b = a.sender("b").await.unwrap();
    to_b.send("ONE", 1u32).await.unwrap();
    assert_eq!(r1.next().await.name(), "ONE");
    b1.close().await.unwrap();
    let (_b2, mut r2) = w.recorder("b", "T").await;
    for i in 0..10u32 {
        to_b.send("TWO", i).await.unwrap();
    }
    to_b.post("THREE", 10u32).unwrap();
    for i in 0..=10u32 {
        let ev = r2.next().await;
        assert_eq!(ev.data::<u32>().unwrap(), i);
        assert_carried(&w, &ev);
    }
    assert!(
        r1.rx.try_recv().is_err(),
        "the machine that left got nothing more"
    );
    assert_eq!(to_b.target().as_str(), "b");
}

/// A send through a declared sender whose target left is an error, not a silent loss.
///
/// `post` says so itself when the registry answers at once (in process); when the
/// registry needs a round trip (the bus daemon's) the post finishes on a task and the
/// failure reaches the machine's `on_error` hook instead.
pub async fn declared_sender_to_a_target_that_left(fx: Fixture) {
    let w = fx.world();
    let (a, mut errors) = w.hooked("a", "T").await;
    let (b, mut rb) = w.recorder("b", "T").await;
    let to_b = a.sender("b").await.unwrap();
    to_b.send("ONE", ()).await.unwrap();
    rb.next().await;
    b.close().await.unwrap();
    if w.multi_host() {
        // Across hosts the sender learns of the leave from the registry: once its registry
        // answers that `b` is gone, its routes to `b` are stale too.
        assert!(matches!(
            a.locate(&MachineId::from("b")).await,
            Err(Error::UnknownTarget(_))
        ));
    }
    let err = to_b.send("TWO", ()).await.unwrap_err();
    assert!(
        matches!(err, Error::UnknownTarget(ref id) if id.as_str() == "b"),
        "{err}"
    );
    let (err, later) = match to_b.post("THREE", ()) {
        Err(e) => (e, 0),
        Ok(()) => {
            let e = tokio::time::timeout(WAIT, errors.recv())
                .await
                .expect("the failed post reaches the hook")
                .unwrap();
            (e, 1)
        }
    };
    assert!(matches!(err, Error::UnknownTarget(_)), "{err}");
    assert_eq!(a.stats().failed_sends, later, "counted when reported later");
    assert!(matches!(
        a.sender("b").await.unwrap_err(),
        Error::UnknownTarget(_)
    ));
}

/// A machine whose subscriptions match a topic twice gets each publish once, and the
/// count is what was delivered (after content filters).
pub async fn each_machine_gets_a_publish_once(fx: Fixture) {
    let w = fx.world();
    let (p, _) = w.recorder("p", "P").await;
    let (twice, mut rt) = w.recorder("twice", "S").await;
    let (filtered, mut rf) = w.recorder("filtered", "S").await;
    if !w.caps().topics {
        assert!(matches!(
            twice.subscribe("a.*").await,
            Err(Error::NotSupported { .. })
        ));
        return;
    }
    twice.subscribe("a.*").await.unwrap();
    twice.subscribe("a.#").await.unwrap();
    let never: switchyard::transport::Filter = Arc::new(|_| false);
    let always: switchyard::transport::Filter = Arc::new(|_| true);
    filtered
        .subscribe_with(
            "a.#",
            SubscribeOptions {
                group: None,
                filter: Some(never.clone()),
            },
        )
        .await
        .unwrap();
    filtered
        .subscribe_with(
            "#",
            SubscribeOptions {
                group: None,
                filter: Some(always),
            },
        )
        .await
        .unwrap();
    // Only `never` matches here: `filtered` does not get it.
    let lonely = w.machine("lonely", "S").build().await.unwrap();
    lonely
        .subscribe_with(
            "a.b",
            SubscribeOptions {
                group: None,
                filter: Some(never),
            },
        )
        .await
        .unwrap();
    for i in 0..3u32 {
        assert_eq!(
            p.publish("a.b", "E", i).await.unwrap(),
            w.published(2),
            "publish {i}"
        );
    }
    for i in 0..3u32 {
        let e = rt.next().await;
        assert_eq!((e.name(), e.data::<u32>().unwrap()), ("E", i));
        assert_carried(&w, &e);
        assert_eq!(rf.next().await.data::<u32>().unwrap(), i);
    }
    // A copy would have arrived before a later publish on the same path.
    assert_eq!(p.publish("a.end", "END", ()).await.unwrap(), w.published(2));
    assert_eq!(rt.next().await.name(), "END", "no second copy");
    assert_eq!(rf.next().await.name(), "END", "no second copy");
}

/// A declared publisher checks its topic once and publishes like `publish` and `emit`.
pub async fn declared_publisher_publishes(fx: Fixture) {
    let w = fx.world();
    let (p, _) = w.recorder("p", "P").await;
    let (s, mut rs) = w.recorder("s", "S").await;
    if !w.caps().topics {
        assert!(matches!(
            p.publisher("news.x"),
            Err(Error::NotSupported { .. })
        ));
        return;
    }
    assert!(matches!(
        p.publisher("news.*"),
        Err(Error::InvalidPattern { .. })
    ));
    s.subscribe("news.#").await.unwrap();
    let news = p.publisher("news.x").unwrap();
    assert_eq!(news.topic(), "news.x");
    assert_eq!(news.publish("N", 1u32).await.unwrap(), w.published(1));
    news.emit("N", 2u32).await.unwrap();
    for i in 1..=2u32 {
        let e = rs.next().await;
        assert_eq!(e.data::<u32>().unwrap(), i);
        assert_eq!(e.target, switchyard::Address::Topic("news.x".into()));
    }
}

/// Every multi-target send tries every target: one that fails does not stop the others,
/// and the error names each one that failed.
pub async fn multi_target_sends_try_every_target(fx: Fixture) {
    let w = strict(&fx);
    let (a, _) = w.recorder("a", "T").await;
    let (_b, mut rb) = w.recorder("b", "T").await;
    let (_c, mut rc) = w.recorder("c", "T").await;
    a.connect("b");
    a.connect("ghost");
    a.connect("c");
    match a.broadcast("NEWS", 7u32).await {
        Err(Error::Partial { delivered, failed }) => {
            assert_eq!(delivered, 2);
            assert_eq!(failed.len(), 1);
            assert_eq!(failed[0].0.as_str(), "ghost");
            assert!(
                matches!(failed[0].1, Error::UnknownTarget(_)),
                "{}",
                failed[0].1
            );
        }
        other => panic!("expected a partial delivery, got {other:?}"),
    }
    assert_eq!(rb.next().await.data::<u32>().unwrap(), 7);
    assert_eq!(
        rc.next().await.data::<u32>().unwrap(),
        7,
        "the send after the failure went out"
    );
}

/// Two sessions on one host (two "processes"), each with the in-process transports and
/// ipc on one daemon: a publish reaches the subscriber beside the publisher through memory
/// and the one in the other session through ipc, each exactly once, also when a machine's
/// subscriptions overlap; the count covers both.
#[cfg(feature = "ipc")]
pub async fn publish_reaches_near_and_far_subscribers_once(p2p: bool) {
    use switchyard::ipc::{Daemon, DaemonConfig, IpcBus, IpcConfig, unique_socket_path};
    let socket = unique_socket_path(&std::env::temp_dir(), "sy-mixed");
    let _daemon = Daemon::start(DaemonConfig::new(&socket)).expect("a private bus daemon starts");
    let session = || {
        let mut cfg = IpcConfig::new(&socket);
        if p2p {
            cfg = cfg.peer_to_peer();
        }
        let bus = IpcBus::connect(cfg).expect("the ipc client starts");
        switchyard::builder()
            .ipc(&bus)
            .build()
            .expect("session builds")
    };
    let (here, there) = (session(), session());
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, &'static str)>();
    let recorder = |s: &Session, id: &'static str| {
        let tx = tx.clone();
        s.machine(id, "Sub").handler(move |_, ev| {
            let _ = tx.send((id.to_string(), ev.carried_by.unwrap_or("?")));
        })
    };
    let near = recorder(&here, "near").build().await.unwrap();
    let far = recorder(&there, "far").build().await.unwrap();
    near.subscribe("news.#").await.unwrap();
    far.subscribe("news.#").await.unwrap();
    far.subscribe("news.*").await.unwrap();
    let p = here.machine("pub", "Pub").build().await.unwrap();
    for i in 0..5 {
        assert_eq!(
            p.publish("news.x", "N", i as u32).await.unwrap(),
            2,
            "publish {i}"
        );
    }
    p.emit("news.x", "N", 5u32).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..12 {
        got.push(
            tokio::time::timeout(WAIT, rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    got.sort();
    let mut expected: Vec<(String, &'static str)> = Vec::new();
    for _ in 0..6 {
        expected.push(("far".into(), "ipc"));
        expected.push(("near".into(), "memory"));
    }
    expected.sort();
    assert_eq!(
        got, expected,
        "each subscriber once per publish, from the nearest transport"
    );
    // A copy would come before a later publish on the same path.
    assert_eq!(p.publish("news.end", "END", 0u32).await.unwrap(), 2);
    for _ in 0..2 {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
    }
    assert!(rx.try_recv().is_err(), "no second copy");
}

/// SEMANTICS.md, "ordering": FIFO per sender → receiver, under load: four senders on a
/// multi-thread runtime, each sending 25,000 numbered events to one machine at once (in
/// the direct fixture, all in one single-threaded context).
pub async fn semantics_ordering(fx: Fixture) {
    const SENDERS: usize = 4;
    const N: u32 = 25_000;
    let w = fx.world();
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, u32)>();
    let _sink = w
        .machine("sink", "Sink")
        .handler_ref(move |_, ev| {
            let _ = tx.send((ev.source.to_string(), ev.data::<u32>().unwrap_or(u32::MAX)));
        })
        .build()
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let node = w.machine(&format!("s{s}"), "S").build().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let to = node.sender("sink").await.unwrap();
            for i in 0..N {
                if i % 2 == 0 {
                    to.send("SEQ", i).await.unwrap();
                } else {
                    node.send("sink", "SEQ", i).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut next: HashMap<String, u32> = HashMap::new();
    for _ in 0..SENDERS * N as usize {
        let (from, i) = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        let expected = next.entry(from.clone()).or_default();
        assert_eq!(i, *expected, "events from {from} arrive in order");
        *expected += 1;
    }
    assert_eq!(next.len(), SENDERS);
    assert!(next.values().all(|n| *n == N));
}

/// SEMANTICS.md, "delivery": in normal operation each event is delivered exactly once
/// (the at-most-once promise only gives way to a policy drop, a dead peer or a lost
/// connection, which the other rows cover); batches and posts included.
pub async fn semantics_delivery(fx: Fixture) {
    let w = fx.world();
    let (a, _) = w.recorder("a", "T").await;
    let (b, mut rb) = w.recorder("b", "T").await;
    for i in 0..100u32 {
        a.send("b", "ONE", i).await.unwrap();
    }
    a.send_batch("b", (100..200u32).map(|i| ("BATCH", i)))
        .await
        .unwrap();
    let mut ids = HashSet::new();
    let got = rb.take(200).await;
    for (i, ev) in got.iter().enumerate() {
        assert_eq!(ev.data::<u32>().unwrap(), i as u32);
        assert!(ids.insert(ev.id), "no duplicate");
    }
    a.send("b", "END", ()).await.unwrap();
    assert_eq!(
        rb.next().await.name(),
        "END",
        "nothing more than what was sent"
    );
    assert_eq!(b.stats().dropped, 0);
}

/// SEMANTICS.md, "unknown target": every way of sending to a machine that is not
/// registered is `UnknownTarget`.
pub async fn semantics_unknown_target(fx: Fixture) {
    let w = fx.world();
    let (a, mut errors) = w.hooked("a", "T").await;
    let unknown =
        |r: Result<(), Error>| matches!(r, Err(Error::UnknownTarget(id)) if id.as_str() == "ghost");
    assert!(unknown(a.send("ghost", "X", ()).await));
    assert!(unknown(a.send_batch("ghost", [("X", 1u8)]).await.map(drop)));
    assert!(unknown(
        a.message("ghost", "X", ()).priority(3).send().await
    ));
    assert!(unknown(a.sender("ghost").await.map(drop)));
    assert!(unknown(a.request("ghost", "X", (), WAIT).await.map(drop)));
    assert!(unknown(
        a.send_delayed("ghost", "X", (), WAIT).await.map(drop)
    ));
    match a.post("ghost", "X", ()) {
        Err(e) => assert!(matches!(e, Error::UnknownTarget(_)), "{e}"),
        Ok(()) => {
            let e = tokio::time::timeout(WAIT, errors.recv())
                .await
                .unwrap()
                .unwrap();
            assert!(matches!(e, Error::UnknownTarget(_)), "{e}");
        }
    }
    assert!(matches!(
        a.send_to_any_of_type("Nobody", "X", ()).await,
        Err(Error::NoMachineOfType(_))
    ));
}

/// SEMANTICS.md, "dead target": a machine that left is `UnknownTarget` to every sender,
/// including one whose route was cached, and a machine registered but bound to no
/// transport here is `TargetGone` in process (across processes its connection drops it).
pub async fn semantics_dead_target(fx: Fixture) {
    let w = fx.world();
    let (a, _) = w.recorder("a", "T").await;
    let (b, mut rb) = w.recorder("b", "T").await;
    a.send("b", "X", ()).await.unwrap();
    rb.next().await;
    b.close().await.unwrap();
    if w.multi_host() {
        assert!(matches!(
            a.locate(&MachineId::from("b")).await,
            Err(Error::UnknownTarget(_))
        ));
    }
    assert!(matches!(
        a.send("b", "X", ()).await,
        Err(Error::UnknownTarget(_))
    ));
    if w.multi_host() {
        return;
    }
    // Registered by hand, bound to no transport.
    let mut entry = a.entry().clone();
    entry.id = "phantom".into();
    w.session.registry().register(entry).await.unwrap();
    let r = a.send("phantom", "X", ()).await;
    if w.caps().serializes {
        // The daemon routes it to this session's connection, which has no such machine:
        // the event is dropped there and counted.
        r.unwrap();
    } else {
        assert!(matches!(r, Err(Error::TargetGone(_))), "{r:?}");
    }
}

/// SEMANTICS.md, "largest message": where envelopes are encoded, one over the limit is
/// `TooLarge` at the sender, alone or in a batch (which stops there, in order: the events
/// before it went, it and those after did not); in process there is no limit.
pub async fn semantics_largest_message(fx: Fixture) {
    let w = fx.world();
    let (a, _) = w.recorder("a", "T").await;
    let (_b, mut rb) = w.recorder("b", "T").await;
    match w.caps().max_message_size {
        Some(limit) => {
            let big = serde_bytes::ByteBuf::from(vec![7u8; limit + 1]);
            let r = a.send("b", "BIG", big.clone()).await;
            assert!(matches!(r, Err(Error::TooLarge { .. })), "{r:?}");
            let small = serde_bytes::ByteBuf::from(vec![1u8; 1]);
            let r = a
                .send_batch(
                    "b",
                    [
                        ("S1", small.clone()),
                        ("S2", small.clone()),
                        ("BIG", big),
                        ("S3", small.clone()),
                    ],
                )
                .await;
            assert!(matches!(r, Err(Error::TooLarge { .. })), "{r:?}");
            assert_eq!(rb.next().await.name(), "S1");
            assert_eq!(rb.next().await.name(), "S2");
            a.send("b", "AFTER", ()).await.unwrap();
            assert_eq!(
                rb.next().await.name(),
                "AFTER",
                "nothing after the big one went"
            );
        }
        None => {
            let big = serde_bytes::ByteBuf::from(vec![7u8; 20 << 20]);
            a.send("b", "BIG", big).await.unwrap();
            let ev = rb.next().await;
            assert_eq!(ev.name(), "BIG");
            assert_eq!(
                ev.payload
                    .get_ref::<serde_bytes::ByteBuf>()
                    .map(|b| b.len()),
                Some(20 << 20)
            );
        }
    }
}

/// An async handler started by an event from `pong` asks `pong` and continues with the
/// answer: the reply completes its request even though it comes the way the event came.
pub async fn request_from_an_async_handler_gets_its_reply(fx: Fixture) {
    let w = fx.world();
    let (_pong, _) = w.ponger("pong", "Pong").await;
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<u32, Error>>();
    let _asker = w
        .machine("asker", "Asker")
        .handler_async(move |n, ev| {
            let tx = tx.clone();
            async move {
                if ev.name() == "GO" {
                    let r = n
                        .request("pong", "PING", 7u32, WAIT)
                        .await
                        .and_then(|reply| reply.data::<u32>());
                    let _ = tx.send(r);
                }
            }
        })
        .build()
        .await
        .unwrap();
    let (kick, _) = w.recorder("kick", "Kick").await;
    for _ in 0..3 {
        kick.send("asker", "GO", ()).await.unwrap();
        let r = tokio::time::timeout(WAIT + WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.unwrap(), 7);
    }
}

/// A request's timeout holds while the target is still working on it.
pub async fn request_timeout_holds_while_the_target_works(fx: Fixture) {
    let w = fx.world();
    let _slow = w
        .machine("slow", "Slow")
        .handler_async(|n, ev| async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            let _ = n.reply(&ev, "LATE", ()).await;
        })
        .build()
        .await
        .unwrap();
    let (a, _) = w.recorder("a", "T").await;
    let r = a
        .request("slow", "ASK", (), Duration::from_millis(100))
        .await;
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
}

/// Where a post's failure is knowable it is the caller's `Err`; where the post had to
/// finish on a task, the failure reaches the machine's `on_error` hook and is counted.
pub async fn post_failures_reach_the_caller(fx: Fixture) {
    let w = fx.world();
    let (a, mut errors) = w.hooked("a", "T").await;
    let (_b, mut rb) = w.recorder("b", "T").await;
    a.post("b", "OK", ()).unwrap();
    assert_eq!(rb.next().await.name(), "OK");
    let mut hooked = 0;
    for _ in 0..3 {
        match a.post("nobody", "X", ()) {
            Err(e) => assert!(matches!(e, Error::UnknownTarget(_)), "{e}"),
            Ok(()) => {
                let e = tokio::time::timeout(WAIT, errors.recv())
                    .await
                    .unwrap()
                    .unwrap();
                assert!(matches!(e, Error::UnknownTarget(_)), "{e}");
                hooked += 1;
            }
        }
    }
    assert_eq!(a.stats().failed_sends, hooked);
}

/// A delayed send whose target is gone when its time comes reports it to the hook.
pub async fn delayed_send_failure_reaches_the_hook(fx: Fixture) {
    let w = fx.world();
    let (a, mut errors) = w.hooked("a", "T").await;
    let (b, _) = w.recorder("b", "T").await;
    a.send_delayed("b", "LATER", (), Duration::from_millis(200))
        .await
        .unwrap();
    b.close().await.unwrap();
    let e = tokio::time::timeout(WAIT, errors.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(e, Error::UnknownTarget(_) | Error::TargetGone(_)),
        "{e}"
    );
    assert_eq!(a.stats().failed_sends, 1);
}
