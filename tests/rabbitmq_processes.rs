//! The rabbitmq transport between real OS processes, each with a host id of its own.
//!
//! Each test re-executes this test binary with `--exact rabbit_child` and an environment
//! variable naming the child's role; `rabbit_child` does nothing unless that variable is
//! set. The processes share a private bus daemon's registry (which spans one host) and a
//! broker namespace of the test's own; none has the ipc transport, and each has a host id
//! of its own, so the selector computes `Remote` and everything between them is carried
//! by RabbitMQ. Children report progress as lines on stdout, which the parent awaits;
//! they are killed when their handle drops.
#![cfg(all(feature = "rabbitmq", feature = "ipc", unix))]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use switchyard::ipc::{Daemon, DaemonConfig, DaemonHandle, IpcBus, IpcConfig, unique_socket_path};
use switchyard::rabbitmq::{RabbitConfig, RabbitTransport, ready_for_tests};
use switchyard::{Envelope, Location, Node, Session};
use tokio::sync::mpsc;

#[path = "support/child.rs"]
mod child;
use child::{Child, say, stdin_lines};

const ROLE: &str = "SWITCHYARD_RABBIT_ROLE";
const SOCKET: &str = "SWITCHYARD_RABBIT_SOCKET";
const NAMESPACE: &str = "SWITCHYARD_RABBIT_NS";
const WAIT: Duration = Duration::from_secs(60);

// ---------- parent side ----------

/// Starts this binary's `rabbit_child` as `role`, in world `w`.
fn spawn(role: &str, w: &World, env: &[(&str, &str)]) -> Child {
    let socket = w.socket.to_string_lossy().into_owned();
    let mut all = vec![
        (ROLE, role),
        (SOCKET, socket.as_str()),
        (NAMESPACE, w.namespace.as_str()),
    ];
    all.extend_from_slice(env);
    Child::spawn("rabbit_child", &all)
}

/// What the processes of one test share: a private bus daemon (the registry) and a
/// broker namespace.
struct World {
    _daemon: DaemonHandle,
    socket: PathBuf,
    namespace: String,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn world(tag: &str) -> World {
    let socket = unique_socket_path(&std::env::temp_dir(), tag);
    let d = Daemon::start(DaemonConfig::new(&socket)).expect("the daemon starts");
    let namespace = format!(
        "sy-proc-{tag}-{}-{:x}",
        std::process::id(),
        std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), Instant::now())
    );
    World {
        _daemon: d,
        socket,
        namespace,
    }
}

/// A session on `host` whose only way to other processes is RabbitMQ.
async fn session(socket: &Path, namespace: &str, host: &str) -> (Session, IpcBus, RabbitTransport) {
    let bus = IpcBus::connect(IpcConfig::new(socket)).expect("the registry client starts");
    let t = RabbitTransport::connect(RabbitConfig::from_env().namespace(namespace))
        .await
        .expect("connects to the broker");
    let registry = bus.registry();
    let s = switchyard::builder()
        .selector(|s| s.prefer(Location::Remote, ["rabbitmq"]))
        .rabbitmq(&t)
        .session(|s| s.registry(registry).host_id(host.to_string()))
        .build()
        .expect("a session builds");
    (s, bus, t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_between_two_processes() {
    if !ready_for_tests() {
        return;
    }
    let w = world("rpp");
    let mut pong = spawn("pong", &w, &[("ID", "pong-1")]);
    pong.expect("READY").await;
    let (s, _bus, _t) = session(&w.socket, &w.namespace, "host-ping").await;
    let ping = s.machine("ping", "PingService").build().await.unwrap();
    let (_, loc) = ping.locate(&"pong-1".into()).await.unwrap();
    assert_eq!(
        loc,
        Location::Remote,
        "another host id: the selector computes Remote"
    );
    for i in 0..50u32 {
        let r = ping.request("pong-1", "PING", i, WAIT).await.unwrap();
        assert_eq!((r.name(), r.data::<u32>().unwrap()), ("PONG", i));
        assert_eq!(r.carried_by, Some("rabbitmq"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_events_arrive_in_order() {
    if !ready_for_tests() {
        return;
    }
    const N: u64 = 100_000;
    let w = world("rseq");
    let mut sink = spawn("sink", &w, &[("ID", "sink"), ("N", "100000")]);
    sink.expect("READY").await;
    let (s, _bus, _t) = session(&w.socket, &w.namespace, "host-src").await;
    let src = s.machine("source", "Source").build().await.unwrap();
    let to_sink = src.sender("sink").await.unwrap();
    // Half one by one, half in batches: both paths keep the order.
    for i in 0..N / 2 {
        to_sink.send("SEQ", i).await.unwrap();
    }
    let mut next = N / 2;
    while next < N {
        let end = (next + 1000).min(N);
        src.send_batch("sink", (next..end).map(|i| ("SEQ", i)))
            .await
            .unwrap();
        next = end;
    }
    assert_eq!(
        sink.expect("RECEIVED").await,
        "100000 in-order",
        "every event, in the order sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_sub_with_wildcards_between_processes() {
    if !ready_for_tests() {
        return;
    }
    let w = world("rps");
    let (s, _bus, _t) = session(&w.socket, &w.namespace, "host-pub").await;
    let p = s.machine("publisher", "Pub").build().await.unwrap();
    let mut sub = spawn("subscriber", &w, &[]);
    sub.expect("READY").await;
    let topics = [
        "orders",
        "orders.new",
        "orders.new.eu",
        "orders.new.us",
        "ordersx.new",
        "other.new.eu",
        "other",
    ];
    for topic in topics {
        p.publish(topic, "T", topic.to_string()).await.unwrap();
    }
    // Published after the others on the same channel: once every subscriber has it, it
    // has the ones before it too (the broker keeps a publisher's order per queue).
    p.publish("orders.last.eu", "T", "orders.last.eu".to_string())
        .await
        .unwrap();
    sub.expect("HAVE orders.last.eu").await;
    sub.tell("REPORT");
    assert_eq!(sub.expect("GOT one:").await, "orders.new");
    assert_eq!(
        sub.expect("GOT many:").await,
        "orders,orders.new,orders.new.eu,orders.new.us,orders.last.eu"
    );
    assert_eq!(
        sub.expect("GOT eu:").await,
        "orders.new.eu,other.new.eu,orders.last.eu"
    );
}

/// Two instances of one type, one per process: any-of-type sends from a third machine
/// reach both, each event exactly one of them, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_of_type_spreads_across_both_processes() {
    if !ready_for_tests() {
        return;
    }
    const N: u64 = 2_000;
    let w = world("rany");
    let mut far = spawn("worker", &w, &[("ID", "worker-far")]);
    far.expect("READY").await;
    let (s, _bus, _t) = session(&w.socket, &w.namespace, "host-near").await;
    let (tx, mut rx) = mpsc::unbounded_channel::<u64>();
    let _near = s
        .machine("worker-near", "Worker")
        .handler(move |_: &Node, ev: Envelope| {
            let _ = tx.send(ev.data::<u64>().unwrap_or(u64::MAX));
        })
        .build()
        .await
        .unwrap();
    let src = s.machine("dispatcher", "Dispatcher").build().await.unwrap();
    let mut picked: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..N {
        let id = src.send_to_any_of_type("Worker", "JOB", i).await.unwrap();
        *picked.entry(id.to_string()).or_default() += 1;
    }
    assert_eq!(picked.len(), 2, "both instances were picked: {picked:?}");
    let far_count = picked["worker-far"];
    let near_count = picked["worker-near"];
    assert!(far_count > 0 && near_count > 0, "{picked:?}");
    far.tell(&format!("EXPECT {far_count}"));
    assert_eq!(far.expect("JOBS").await, format!("{far_count} distinct"));
    let seen = Arc::new(AtomicU64::new(0));
    tokio::time::timeout(WAIT, async {
        while seen.load(Ordering::Relaxed) < near_count {
            rx.recv().await.expect("the near worker lives");
            seen.fetch_add(1, Ordering::Relaxed);
        }
    })
    .await
    .expect("the near worker got its share");
}

// ---------- child side ----------

#[test]
fn rabbit_child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let socket = PathBuf::from(std::env::var(SOCKET).expect("the socket path"));
    let namespace = std::env::var(NAMESPACE).expect("the namespace");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(child_main(&role, socket, namespace));
}

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_default()
}

async fn child_main(role: &str, socket: PathBuf, namespace: String) {
    let host = format!("host-{role}-{}", std::process::id());
    let (s, _bus, _t) = session(&socket, &namespace, &host).await;
    let mut input = stdin_lines();
    match role {
        "pong" => {
            let _pong = s
                .machine(env("ID"), "PongService")
                .handler(|node: &Node, ev: Envelope| {
                    if ev.name() == "PING" {
                        let n: u32 = ev.data().unwrap_or(0);
                        let _ = node.post_reply(&ev, "PONG", n);
                    }
                })
                .build()
                .await
                .expect("pong builds");
            say("READY");
            while input.recv().await.is_some() {}
        }
        "sink" => {
            let n: u64 = env("N").parse().unwrap_or(0);
            let (tx, mut rx) = mpsc::unbounded_channel::<Envelope>();
            let _sink = s
                .machine(env("ID"), "Sink")
                .handler(move |_: &Node, ev: Envelope| {
                    let _ = tx.send(ev);
                })
                .build()
                .await
                .expect("sink builds");
            say("READY");
            let mut got = 0u64;
            let mut in_order = true;
            while let Some(ev) = rx.recv().await {
                if ev.data::<u64>().ok() != Some(got) {
                    in_order = false;
                }
                got += 1;
                if got == n {
                    let order = if in_order { "in-order" } else { "out-of-order" };
                    say(&format!("RECEIVED {got} {order}"));
                }
            }
        }
        "worker" => {
            let (tx, mut rx) = mpsc::unbounded_channel::<u64>();
            let _worker = s
                .machine(env("ID"), "Worker")
                .handler(move |_: &Node, ev: Envelope| {
                    assert_eq!(ev.carried_by, Some("rabbitmq"));
                    let _ = tx.send(ev.data::<u64>().unwrap_or(u64::MAX));
                })
                .build()
                .await
                .expect("worker builds");
            say("READY");
            let mut jobs = std::collections::BTreeSet::new();
            let mut expect = None;
            loop {
                tokio::select! {
                    Some(j) = rx.recv() => { jobs.insert(j); }
                    line = input.recv() => match line {
                        Some(l) => expect = l.strip_prefix("EXPECT ").and_then(|n| n.parse::<usize>().ok()),
                        None => return,
                    },
                }
                if expect.is_some_and(|n| jobs.len() >= n) {
                    say(&format!("JOBS {} distinct", jobs.len()));
                    expect = None;
                }
            }
        }
        "subscriber" => {
            let (tx, mut rx) = mpsc::unbounded_channel::<(String, String)>();
            let mut nodes = Vec::new();
            let mut subs = Vec::new();
            for (id, pattern) in [("one", "orders.*"), ("many", "orders.#"), ("eu", "*.*.eu")] {
                let tx = tx.clone();
                let node = s
                    .machine(id, "Sub")
                    .handler(move |_: &Node, ev: Envelope| {
                        assert_eq!(ev.carried_by, Some("rabbitmq"));
                        let _ = tx.send((id.to_string(), ev.data::<String>().unwrap_or_default()));
                    })
                    .build()
                    .await
                    .expect("subscriber builds");
                subs.push(node.subscribe(pattern).await.expect("subscribes"));
                nodes.push(node);
            }
            say("READY");
            let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut last = 0;
            loop {
                tokio::select! {
                    Some((id, t)) = rx.recv() => {
                        if t == "orders.last.eu" {
                            last += 1;
                            if last == 2 {
                                say("HAVE orders.last.eu");
                            }
                        }
                        got.entry(id).or_default().push(t);
                    }
                    line = input.recv() => match line.as_deref() {
                        Some("REPORT") => {
                            for id in ["one", "many", "eu"] {
                                let v = got.get(id).cloned().unwrap_or_default();
                                say(&format!("GOT {id}: {}", v.join(",")));
                            }
                        }
                        Some(_) => {}
                        None => return,
                    },
                }
            }
        }
        other => panic!("unknown role {other}"),
    }
}
