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
