//! Two OS processes that know nothing of each other but the Redis URL (and a namespace):
//! each registers in a `RedisRegistry`, finds the other by type, and they ping-pong over
//! the Redis transport. Each has a host id of its own, so the selector computes `Remote`.
//!
//! The test re-executes this test binary with `--exact redis_child` and an environment
//! variable naming the child's role; `redis_child` does nothing unless it is set.
#![cfg(all(feature = "redis", unix))]

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::redis::{
    RedisConfig, RedisRegistry, RedisTransport, RedisTransportConfig, ready_for_tests,
};
use switchyard::{Envelope, Location, Node, Registry, Session};

#[path = "support/child.rs"]
mod child;
use child::{Child, say, stdin_lines};

const ROLE: &str = "SWITCHYARD_REDIS_ROLE";
const NAMESPACE: &str = "SWITCHYARD_REDIS_NS";
const WAIT: Duration = Duration::from_secs(30);

// ---------- parent side ----------

/// Starts this binary's `redis_child` as `role`, in `namespace`.
fn spawn(role: &str, namespace: &str, env: &[(&str, &str)]) -> Child {
    let mut all = vec![(ROLE, role), (NAMESPACE, namespace)];
    all.extend_from_slice(env);
    Child::spawn("redis_child", &all)
}

/// A session on `host` that knows only the Redis URL (from the environment) and the namespace.
async fn session(namespace: &str, host: &str) -> (Session, RedisTransport) {
    let cfg = RedisConfig::from_env().namespace(namespace);
    let registry: Arc<dyn Registry> = Arc::new(
        RedisRegistry::connect(cfg.clone())
            .await
            .expect("the registry connects"),
    );
    let t = RedisTransport::connect(RedisTransportConfig::new(cfg))
        .await
        .expect("the transport connects");
    let s = switchyard::builder()
        .selector(|s| s.prefer(Location::Remote, ["redis"]))
        .redis(&t)
        .session(|s| s.registry(registry).host_id(host.to_string()))
        .build()
        .expect("a session builds");
    (s, t)
}

fn namespace(tag: &str) -> String {
    format!(
        "sy-proc-{tag}-{}-{:x}",
        std::process::id(),
        std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), Instant::now())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_discover_each_other_by_type_and_ping_pong() {
    if !ready_for_tests() {
        return;
    }
    let ns = namespace("pp");
    let mut child = spawn("player", &ns, &[("ID", "far-player")]);
    child.expect("READY").await;
    let (s, _t) = session(&ns, "host-near").await;
    let near = s
        .machine("near-player", "Player")
        .handler(|node: &Node, ev: Envelope| {
            if ev.name() == "PING" {
                let _ = node.post_reply(&ev, "PONG", ev.data::<u32>().unwrap_or(0));
            }
        })
        .build()
        .await
        .unwrap();
    // Discovery by type: both players, whichever process registered them.
    let players: Vec<String> = near
        .discover("Player")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id.to_string())
        .collect();
    assert_eq!(players.len(), 2, "{players:?}");
    assert!(players.contains(&"far-player".to_string()), "{players:?}");
    let (entry, loc) = near.locate(&"far-player".into()).await.unwrap();
    assert_eq!(
        loc,
        Location::Remote,
        "another host id: the selector computes Remote"
    );
    assert_ne!(entry.process_id, near.entry().process_id);
    for i in 0..50u32 {
        let r = near.request("far-player", "PING", i, WAIT).await.unwrap();
        assert_eq!((r.name(), r.data::<u32>().unwrap()), ("PONG", i));
        assert_eq!(r.carried_by, Some("redis"));
    }
    // And the other way: the child finds this process's player by type and pings it.
    child.tell("PING-PEERS");
    assert_eq!(child.expect("PONGS").await, "50 from near-player");
}

// ---------- child side ----------

#[test]
fn redis_child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let namespace = std::env::var(NAMESPACE).expect("the namespace");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(child_main(&role, namespace));
}

async fn child_main(role: &str, namespace: String) {
    assert_eq!(role, "player");
    let host = format!("host-{role}-{}", std::process::id());
    let (s, _t) = session(&namespace, &host).await;
    let mut input = stdin_lines();
    let id = std::env::var("ID").unwrap_or_default();
    let me = s
        .machine(id.as_str(), "Player")
        .handler(|node: &Node, ev: Envelope| {
            if ev.name() == "PING" {
                let _ = node.post_reply(&ev, "PONG", ev.data::<u32>().unwrap_or(0));
            }
        })
        .build()
        .await
        .expect("the player builds");
    say("READY");
    while let Some(line) = input.recv().await {
        if line == "PING-PEERS" {
            let peers: Vec<_> = me
                .discover("Player")
                .await
                .expect("discovery")
                .into_iter()
                .filter(|e| e.id != *me.id())
                .collect();
            let Some(peer) = peers.first() else {
                say("PONGS 0 from nobody");
                continue;
            };
            let mut n = 0;
            for i in 0..50u32 {
                if let Ok(r) = me.request(peer.id.clone(), "PING", i, WAIT).await
                    && r.data::<u32>().ok() == Some(i)
                    && r.carried_by == Some("redis")
                {
                    n += 1;
                }
            }
            say(&format!("PONGS {n} from {}", peer.id));
        }
    }
}
