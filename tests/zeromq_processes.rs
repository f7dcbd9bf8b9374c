//! The zeromq transport between real processes, each with a host id of its own.
//!
//! Each test re-executes this test binary with `--exact zmq_child` and an
//! environment variable naming the child's role; `zmq_child` does nothing unless
//! that variable is set. All processes share one registry, a private bus daemon's
//! (which spans one host); none has the ipc transport, and each has a host id of
//! its own, so every exchange between them is `Remote` and carried by zeromq.
//! Children report progress as lines on stdout, which the parent awaits; they are
//! killed when their handle drops.
#![cfg(all(feature = "zeromq", feature = "ipc", unix))]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use switchyard::ipc::{Daemon, DaemonConfig, DaemonHandle, IpcBus, IpcConfig, unique_socket_path};
use switchyard::zeromq::{ZmqConfig, ZmqTransport};
use switchyard::{Envelope, Error, Location, Node, Session};
use tokio::sync::mpsc;

#[path = "support/child.rs"]
mod child;
use child::{Child, say, stdin_lines};

const ROLE: &str = "SWITCHYARD_ZMQ_ROLE";
const SOCKET: &str = "SWITCHYARD_ZMQ_SOCKET";
const WAIT: Duration = Duration::from_secs(30);

// ---------- parent side ----------

/// Starts this binary's `zmq_child` as `role`, with the registry at `socket`.
fn spawn(role: &str, socket: &Path, env: &[(&str, &str)]) -> Child {
    let socket = socket.to_string_lossy().into_owned();
    let mut all = vec![(ROLE, role), (SOCKET, socket.as_str())];
    all.extend_from_slice(env);
    Child::spawn("zmq_child", &all)
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

struct Registry {
    _daemon: DaemonHandle,
    socket: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A private bus daemon: the registry every process of a test shares.
fn registry(tag: &str) -> Registry {
    let socket = unique_socket_path(&std::env::temp_dir(), tag);
    let d = Daemon::start(DaemonConfig::new(&socket)).expect("the daemon starts");
    Registry { _daemon: d, socket }
}

/// A session on `host` whose only way to other processes is zeromq.
fn session(socket: &Path, host: &str, cfg: ZmqConfig) -> (Session, IpcBus, Arc<ZmqTransport>) {
    let bus = IpcBus::connect(IpcConfig::new(socket)).expect("the registry client starts");
    let zmq = ZmqTransport::new(cfg).expect("zeromq binds on loopback");
    let registry = bus.registry();
    let s = switchyard::builder()
        .zeromq(&zmq)
        .session(|s| s.registry(registry).host_id(host.to_string()))
        .build()
        .expect("a session builds");
    (s, bus, zmq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_between_two_processes() {
    let reg = registry("zpp");
    let mut pong = spawn("pong", &reg.socket, &[("ID", "pong-1")]);
    pong.expect("READY").await;
    let (s, _bus, _zmq) = session(&reg.socket, "host-ping", ZmqConfig::default());
    let ping = s.machine("ping", "PingService").build().await.unwrap();
    let (_, loc) = ping.locate(&"pong-1".into()).await.unwrap();
    assert_eq!(
        loc,
        Location::Remote,
        "another host id: the selector computes Remote"
    );
    for i in 0..20u32 {
        let r = ping.request("pong-1", "PING", i, WAIT).await.unwrap();
        assert_eq!((r.name(), r.data::<u32>().unwrap()), ("PONG", i));
        assert_eq!(r.carried_by, Some("zeromq"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_events_arrive_in_order() {
    const N: u64 = 100_000;
    let reg = registry("zseq");
    let mut sink = spawn("sink", &reg.socket, &[("ID", "sink"), ("N", "100000")]);
    sink.expect("READY").await;
    let (s, _bus, zmq) = session(&reg.socket, "host-src", ZmqConfig::default());
    let src = s.machine("source", "Source").build().await.unwrap();
    let to_sink = src.sender("sink").await.unwrap();
    let mut most_in_flight = 0;
    // Half one by one, half in batches: both paths keep the order.
    for i in 0..N / 2 {
        to_sink.send("SEQ", i).await.unwrap();
        most_in_flight = most_in_flight.max(zmq.in_flight());
    }
    let mut next = N / 2;
    while next < N {
        let end = (next + 1000).min(N);
        src.send_batch("sink", (next..end).map(|i| ("SEQ", i)))
            .await
            .unwrap();
        most_in_flight = most_in_flight.max(zmq.in_flight());
        next = end;
    }
    assert_eq!(
        sink.expect("RECEIVED").await,
        "100000 in-order",
        "every event, in the order sent"
    );
    let window = ZmqConfig::default().window as u64;
    assert!(
        most_in_flight <= window + 64 * 1024,
        "unacknowledged bytes stay within the window: {most_in_flight}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_sub_with_wildcards_between_processes() {
    let reg = registry("zps");
    let (s, _bus, _zmq) = session(&reg.socket, "host-pub", ZmqConfig::default());
    let p = s.machine("publisher", "Pub").build().await.unwrap();
    // Subscribed after the publisher exists: the subscribe returns once the publisher's
    // PUB has the prefixes and the publisher knows the patterns.
    let mut sub = spawn("subscriber", &reg.socket, &[]);
    sub.expect("READY").await;
    // one: orders.*   many: orders.#   eu: *.*.eu   (SUB prefixes "orders.", "orders", "")
    for (topic, n) in [
        ("orders", 1),
        ("orders.new", 2),
        ("orders.new.eu", 2),
        ("orders.new.us", 1),
        // Passes the PUB's prefix filter of `many` ("orders"), dropped by the local match.
        ("ordersx.new", 0),
        ("other.new.eu", 1),
        ("other", 0),
    ] {
        assert_eq!(
            p.publish(topic, "T", topic.to_string()).await.unwrap(),
            n,
            "machines that got {topic}"
        );
    }
    p.emit("orders.late", "T", "orders.late".to_string())
        .await
        .unwrap();
    assert_eq!(
        p.publish("orders.last", "T", "orders.last".to_string())
            .await
            .unwrap(),
        2
    );
    sub.tell("REPORT");
    assert_eq!(
        sub.expect("GOT one:").await,
        "orders.new,orders.late,orders.last"
    );
    assert_eq!(
        sub.expect("GOT many:").await,
        "orders,orders.new,orders.new.eu,orders.new.us,orders.late,orders.last"
    );
    assert_eq!(sub.expect("GOT eu:").await, "orders.new.eu,other.new.eu");
}

/// The sender streams to a peer that is killed mid-stream: sends fail within the bound
/// (the connection drops), never hang, and unacknowledged bytes never exceed the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_mid_stream_fails_the_sender_within_the_bound() {
    let reg = registry("zkill");
    let mut sink = spawn("sink", &reg.socket, &[("ID", "victim"), ("N", "0")]);
    sink.expect("READY").await;
    let cfg = ZmqConfig::default()
        .peer_timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_millis(500));
    let window = cfg.window as u64;
    let bound = cfg.peer_timeout + cfg.connect_timeout;
    let (s, _bus, zmq) = session(&reg.socket, "host-src", cfg);
    let src = s.machine("source", "Source").build().await.unwrap();
    let payload = vec![7u8; 1000];
    for i in 0..2_000u32 {
        src.send("victim", "DATA", (i, payload.clone()))
            .await
            .unwrap();
    }
    sink.expect("GOT 1000").await;
    sink.kill();
    let killed = tokio::time::Instant::now();
    let mut most_in_flight = 0;
    let err = tokio::time::timeout(bound * 4, async {
        loop {
            match src.send("victim", "DATA", (0u32, payload.clone())).await {
                Ok(()) => most_in_flight = most_in_flight.max(zmq.in_flight()),
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the sender gets an error instead of hanging");
    assert!(
        matches!(err, Error::TargetGone(_) | Error::UnknownTarget(_)),
        "{err}"
    );
    assert!(most_in_flight <= window + 2048, "{most_in_flight}");
    eprintln!("error after {:?}: {err}", killed.elapsed());
}

/// A peer that stops reading (SIGSTOP: its socket stays open, nothing is acknowledged):
/// the sender waits once the window is full, fails after `peer_timeout`, and its
/// unacknowledged bytes stay within the window the whole time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_peer_fails_the_sender_after_the_timeout_with_bounded_memory() {
    let reg = registry("zstop");
    let mut sink = spawn("sink", &reg.socket, &[("ID", "stuck"), ("N", "0")]);
    sink.expect("READY").await;
    let cfg = ZmqConfig::default()
        .peer_timeout(Duration::from_millis(800))
        .window(256 * 1024);
    let window = cfg.window as u64;
    let bound = cfg.peer_timeout;
    let (s, _bus, zmq) = session(&reg.socket, "host-src", cfg);
    let src = s.machine("source", "Source").build().await.unwrap();
    let to = src.sender("stuck").await.unwrap();
    to.send("DATA", (0u32, vec![0u8; 10])).await.unwrap();
    sink.expect("GOT 1").await;
    signal(sink.pid(), "STOP");
    let payload = vec![7u8; 4096];
    let mut sent = 0u64;
    let mut most_in_flight = 0;
    let err = tokio::time::timeout(bound * 10, async {
        loop {
            match to.send("DATA", (1u32, payload.clone())).await {
                Ok(()) => {
                    sent += 1;
                    most_in_flight = most_in_flight.max(zmq.in_flight());
                }
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the sender gets an error instead of waiting forever");
    assert!(matches!(err, Error::TargetGone(_)), "{err}");
    assert!(
        most_in_flight <= window + 8192,
        "unacknowledged bytes within the window: {most_in_flight}"
    );
    // The kernel buffers take some before the window fills, but far less than unbounded.
    assert!(sent < 10_000, "the sender was held back ({sent} sends)");
    signal(sink.pid(), "CONT");
}

/// A peer process that comes back at the same endpoint is reached again: the dead
/// connection is replaced on the next send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_comes_back_is_reached_again() {
    let reg = registry("zback");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let router = format!("tcp://127.0.0.1:{port}");
    let env = [("ID", "pong-b"), ("ROUTER", router.as_str())];
    let mut pong = spawn("pong", &reg.socket, &env);
    pong.expect("READY").await;
    let cfg = ZmqConfig::default().connect_timeout(Duration::from_millis(500));
    let (s, _bus, _zmq) = session(&reg.socket, "host-ping", cfg);
    let ping = s.machine("ping", "PingService").build().await.unwrap();
    let to = ping.sender("pong-b").await.unwrap();
    let r = to.message("PING", 1u32).request(WAIT).await.unwrap();
    assert_eq!(r.data::<u32>().unwrap(), 1);
    pong.kill();
    // Gone: the registry drops it once its daemon connection closes, the link once TCP does.
    let err = tokio::time::timeout(WAIT, async {
        loop {
            match to
                .message("PING", 2u32)
                .request(Duration::from_millis(200))
                .await
            {
                Err(e @ (Error::TargetGone(_) | Error::UnknownTarget(_))) => return e,
                _ => continue,
            }
        }
    })
    .await
    .expect("the dead peer is noticed");
    eprintln!("while down: {err}");
    let mut pong = spawn("pong", &reg.socket, &env);
    pong.expect("READY").await;
    let r = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(r) = to
                .message("PING", 3u32)
                .request(Duration::from_millis(500))
                .await
            {
                return r;
            }
        }
    })
    .await
    .expect("the peer is reached again once it is back");
    assert_eq!((r.name(), r.data::<u32>().unwrap()), ("PONG", 3));
    assert_eq!(r.carried_by, Some("zeromq"));
}

// ---------- child side ----------

#[test]
fn zmq_child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let socket = PathBuf::from(std::env::var(SOCKET).expect("the socket path"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(child_main(&role, socket));
}

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_default()
}

async fn child_main(role: &str, socket: PathBuf) {
    let mut cfg = ZmqConfig::default();
    let router = env("ROUTER");
    if !router.is_empty() {
        cfg = cfg.bind(router, "tcp://127.0.0.1:0");
    }
    let host = format!("host-{role}-{}", std::process::id());
    let (s, _bus, _zmq) = session(&socket, &host, cfg);
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
                if n > 0 {
                    if ev.data::<u64>().ok() != Some(got) {
                        in_order = false;
                    }
                } else if got + 1 == 1 || (got + 1).is_multiple_of(1000) {
                    say(&format!("GOT {}", got + 1));
                }
                got += 1;
                if n > 0 && got == n {
                    let order = if in_order { "in-order" } else { "out-of-order" };
                    say(&format!("RECEIVED {got} {order}"));
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
                        assert_eq!(ev.carried_by, Some("zeromq"));
                        let _ = tx.send((id.to_string(), ev.data::<String>().unwrap_or_default()));
                    })
                    .build()
                    .await
                    .expect("subscriber builds");
                subs.push(node.subscribe(pattern).await.expect("subscribes"));
                nodes.push(node);
            }
            say("READY");
            while let Some(line) = input.recv().await {
                if line == "REPORT" {
                    let mut got: std::collections::BTreeMap<String, Vec<String>> =
                        Default::default();
                    while let Ok((id, t)) = rx.try_recv() {
                        got.entry(id).or_default().push(t);
                    }
                    for id in ["one", "many", "eu"] {
                        let v = got.get(id).cloned().unwrap_or_default();
                        say(&format!("GOT {id}: {}", v.join(",")));
                    }
                }
            }
        }
        other => panic!("unknown role {other}"),
    }
}
