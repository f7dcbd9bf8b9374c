//! The conformance suite over zeromq between sessions with distinct host ids sharing one
//! registry: the selector computes `Remote` itself and routes it to zeromq.
#![cfg(feature = "zeromq")]
mod conformance;
conformance_suite!(conformance::Fixture::zeromq());

use std::sync::Arc;
use std::time::Duration;

use switchyard::transport::{LocalRegistry, Transport};
use switchyard::zeromq::{ZmqConfig, ZmqTransport};
use switchyard::{Error, Location, Registry};

/// A peer whose sockets are gone while its registry entry stays (the registry cannot tell):
/// the sender learns it from the connection and fails with `TargetGone` within the bound,
/// instead of queuing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_sockets_closed_fails_sends_within_the_bound() {
    let registry: Arc<dyn Registry> = Arc::new(LocalRegistry::new(Duration::from_secs(60)));
    let cfg = ZmqConfig::default()
        .peer_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(300));
    let bound = cfg.peer_timeout + cfg.connect_timeout;
    let host = |name: &str, zmq: &Arc<ZmqTransport>| {
        let r = registry.clone();
        switchyard::builder()
            .zeromq(zmq)
            .session(|s| s.registry(r).host_id(name.to_string()))
            .build()
            .unwrap()
    };
    let (za, zb) = (
        ZmqTransport::new(cfg.clone()).unwrap(),
        ZmqTransport::new(cfg).unwrap(),
    );
    let (sa, sb) = (host("host-a", &za), host("host-b", &zb));
    let a = sa.machine("a", "T").build().await.unwrap();
    let _b = sb
        .machine("b", "T")
        .handler(|_, _| {})
        .build()
        .await
        .unwrap();
    let (_, loc) = a.locate(&"b".into()).await.unwrap();
    assert_eq!(loc, Location::Remote);
    let to_b = a.sender("b").await.unwrap();
    to_b.send("X", 1u32).await.unwrap();
    // The process "dies": its sockets close, its registry entry stays.
    zb.close();
    let err = tokio::time::timeout(bound * 4, async {
        loop {
            if let Err(e) = to_b.send("X", 2u32).await {
                return e;
            }
        }
    })
    .await
    .expect("an error, not a hang");
    assert!(
        matches!(err, Error::TargetGone(ref id) if id.as_str() == "b"),
        "{err}"
    );
    assert!(
        registry.get(&"b".into()).await.unwrap().is_some(),
        "the registry still lists b: the transport found out by itself"
    );
    assert_eq!(
        za.in_flight(),
        0,
        "nothing is left waiting for the dead peer"
    );
}

/// Two sessions on hosts of their own sharing a registry, each with its own zeromq settings.
async fn two_hosts(
    a: ZmqConfig,
    b: ZmqConfig,
) -> (
    switchyard::Session,
    switchyard::Session,
    Arc<ZmqTransport>,
    Arc<ZmqTransport>,
) {
    let registry: Arc<dyn Registry> = Arc::new(LocalRegistry::new(Duration::from_secs(60)));
    let host = |name: &str, zmq: &Arc<ZmqTransport>| {
        let r = registry.clone();
        switchyard::builder()
            .zeromq(zmq)
            .session(|s| s.registry(r).host_id(name.to_string()))
            .build()
            .unwrap()
    };
    let (za, zb) = (ZmqTransport::new(a).unwrap(), ZmqTransport::new(b).unwrap());
    (host("host-a", &za), host("host-b", &zb), za, zb)
}

/// The largest message: a bigger envelope is `TooLarge` at the sender (not retryable, the
/// events after it still go); a receiver with a smaller limit drops it, counts it and
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_size_limit_are_refused_at_both_ends() {
    let small = ZmqConfig {
        max_message_size: 4096,
        ..ZmqConfig::default()
    };
    let (sa, sb, _za, zb) = two_hosts(small.clone(), ZmqConfig::default()).await;
    let (tx, mut got) = tokio::sync::mpsc::unbounded_channel::<u32>();
    let _b = sb
        .machine("b", "T")
        .handler(move |_, ev| {
            let _ = tx.send(ev.data::<(u32, serde_bytes::ByteBuf)>().unwrap().0);
        })
        .build()
        .await
        .unwrap();
    let a = sa.machine("a", "T").build().await.unwrap();
    let big = serde_bytes::ByteBuf::from(vec![1u8; 8192]);
    let err = a.send("b", "BIG", (1u32, big.clone())).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                transport: "zeromq",
                limit: 4096,
                ..
            }
        ),
        "{err}"
    );
    assert!(!err.is_retryable());
    a.send("b", "SMALL", (2u32, serde_bytes::ByteBuf::new()))
        .await
        .unwrap();
    assert_eq!(got.recv().await, Some(2));

    // Now the receiver has the small limit: it drops the big one and serves on.
    let (sc, sd, _zc, zd) = two_hosts(ZmqConfig::default(), small).await;
    let (tx, mut got) = tokio::sync::mpsc::unbounded_channel::<u32>();
    let _d = sd
        .machine("d", "T")
        .handler(move |_, ev| {
            let _ = tx.send(ev.data::<(u32, serde_bytes::ByteBuf)>().unwrap().0);
        })
        .build()
        .await
        .unwrap();
    let c = sc.machine("c", "T").build().await.unwrap();
    c.send("d", "BIG", (3u32, big)).await.unwrap();
    c.send("d", "SMALL", (4u32, serde_bytes::ByteBuf::new()))
        .await
        .unwrap();
    assert_eq!(got.recv().await, Some(4), "the big one never arrives");
    assert_eq!(
        zd.health().dropped,
        1,
        "the receiver counted the dropped one"
    );
    drop((zb, sb, sa));
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Bind and advertised addresses are separate: peers are told the advertised endpoints
/// (here a host name for the bound loopback address), read them from the registry entry
/// and reach the machine through them. Binding every interface without saying what to
/// advertise is a configuration error that says what to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_reach_a_machine_through_its_advertised_endpoints() {
    let (rp, pp) = (free_port(), free_port());
    let advertised = ZmqConfig::default()
        .bind(
            format!("tcp://127.0.0.1:{rp}"),
            format!("tcp://127.0.0.1:{pp}"),
        )
        .advertise(
            format!("tcp://localhost:{rp}"),
            format!("tcp://localhost:{pp}"),
        );
    let (sa, sb, _za, zb) = two_hosts(ZmqConfig::default(), advertised).await;
    assert_eq!(zb.router_endpoint(), format!("tcp://localhost:{rp}"));
    let (tx, mut got) = tokio::sync::mpsc::unbounded_channel::<String>();
    let b = sb
        .machine("b", "T")
        .handler(move |_, ev| {
            let _ = tx.send(ev.name().to_string());
        })
        .build()
        .await
        .unwrap();
    let _sub = b.subscribe("news.#").await.unwrap();
    let a = sa.machine("a", "T").build().await.unwrap();
    let (entry, loc) = a.locate(&"b".into()).await.unwrap();
    assert_eq!(loc, Location::Remote);
    assert_eq!(
        entry.metadata.get(switchyard::zeromq::ROUTER_KEY),
        Some(&format!("tcp://localhost:{rp}")),
        "the registry entry carries the advertised endpoint"
    );
    a.send("b", "DIRECT", ()).await.unwrap();
    assert_eq!(got.recv().await.as_deref(), Some("DIRECT"));
    assert_eq!(a.publish("news.x", "NEWS", ()).await.unwrap(), 1);
    assert_eq!(got.recv().await.as_deref(), Some("NEWS"));

    let err = ZmqTransport::new(ZmqConfig::default().bind("tcp://0.0.0.0:0", "tcp://127.0.0.1:0"))
        .unwrap_err();
    assert!(
        matches!(&err, Error::Config(m) if m.contains("advertise")),
        "{err}"
    );
}

/// `ipc://` endpoints (unix sockets) work where the crate supports them: a machine bound
/// on ipc endpoints is reached by its peers through them, sends and topics alike.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipc_endpoints_carry_sends_and_topics() {
    let dir = std::env::temp_dir();
    let tag = format!("{}-{:x}", std::process::id(), fastrand_like());
    let (r, p) = (
        dir.join(format!("sy-zmq-{tag}-r.sock")),
        dir.join(format!("sy-zmq-{tag}-p.sock")),
    );
    let on_ipc = ZmqConfig::default().bind(
        format!("ipc://{}", r.display()),
        format!("ipc://{}", p.display()),
    );
    let (sa, sb, _za, zb) = two_hosts(ZmqConfig::default(), on_ipc).await;
    assert!(zb.router_endpoint().starts_with("ipc://"));
    let (tx, mut got) = tokio::sync::mpsc::unbounded_channel::<String>();
    let b = sb
        .machine("b", "T")
        .handler(move |_, ev| {
            let _ = tx.send(ev.name().to_string());
        })
        .build()
        .await
        .unwrap();
    let _sub = b.subscribe("news.*").await.unwrap();
    let a = sa.machine("a", "T").build().await.unwrap();
    a.send("b", "OVER_IPC", ()).await.unwrap();
    assert_eq!(got.recv().await.as_deref(), Some("OVER_IPC"));
    assert_eq!(a.publish("news.x", "NEWS", ()).await.unwrap(), 1);
    assert_eq!(got.recv().await.as_deref(), Some("NEWS"));
    drop((sa, sb));
    let _ = std::fs::remove_file(r);
    let _ = std::fs::remove_file(p);
}

fn fastrand_like() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// By configuration zeromq also carries sends and topics between processes of one host
/// (`same_machine`): two sessions with the same host id, no ipc, the selector computes
/// `SameMachine` and picks zeromq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_machine_by_configuration() {
    let registry: Arc<dyn Registry> = Arc::new(LocalRegistry::new(Duration::from_secs(60)));
    let session = |zmq: &Arc<ZmqTransport>| {
        let r = registry.clone();
        switchyard::builder()
            .zeromq(zmq)
            .session(|s| s.registry(r).host_id("one-host"))
            .build()
            .unwrap()
    };
    let cfg = ZmqConfig::default().same_machine(true);
    let (za, zb) = (
        ZmqTransport::new(cfg.clone()).unwrap(),
        ZmqTransport::new(cfg).unwrap(),
    );
    assert!(za.capabilities().reaches(Location::SameMachine));
    let (sa, sb) = (session(&za), session(&zb));
    let (tx, mut got) = tokio::sync::mpsc::unbounded_channel::<(String, &'static str)>();
    let b = sb
        .machine("b", "T")
        .handler(move |_, ev| {
            let _ = tx.send((ev.name().to_string(), ev.carried_by.unwrap_or("?")));
        })
        .build()
        .await
        .unwrap();
    let _sub = b.subscribe("local.#").await.unwrap();
    let a = sa.machine("a", "T").build().await.unwrap();
    let (_, loc) = a.locate(&"b".into()).await.unwrap();
    assert_eq!(loc, Location::SameMachine);
    a.send("b", "HI", ()).await.unwrap();
    assert_eq!(got.recv().await, Some(("HI".to_string(), "zeromq")));
    assert_eq!(a.publish("local.x", "TOPIC", ()).await.unwrap(), 1);
    assert_eq!(got.recv().await, Some(("TOPIC".to_string(), "zeromq")));
    // Without it, the same host is not zeromq's: nothing reaches SameMachine.
    assert!(
        !ZmqTransport::new(ZmqConfig::default())
            .unwrap()
            .capabilities()
            .reaches(Location::SameMachine)
    );
}
