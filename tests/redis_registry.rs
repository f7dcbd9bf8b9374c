//! `RedisRegistry` against a real Redis server: the same answers as `LocalRegistry` on the
//! same entries, heartbeats and health, watching another process's changes, namespaces,
//! sessions on two hosts, a killed process, lost connections, and sends that cost no
//! round trip once routed.
//!
//! Run: `cargo test --features redis --test redis_registry` (Redis from
//! `SWITCHYARD_REDIS_URL`, default `redis://127.0.0.1:6379/`).

#![cfg(feature = "redis")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use switchyard::redis::{RedisConfig, RedisRegistry, ready_for_tests};
use switchyard::{Error, Location, MachineEntry, MachineId, Registry, RegistryEvent};
// The facade does not re-export it: sessions make their own.
use switchyard_core::LocalRegistry;
use tokio::sync::broadcast;

/// How long a test waits for an event before it fails.
const WAIT: Duration = Duration::from_secs(10);

/// Set in the child process of [`killed_process_is_reported_unhealthy_then_gone`].
const CHILD_ENV: &str = "SY_REDIS_REGISTRY_CHILD_NS";

fn unique_ns(what: &str) -> String {
    format!(
        "sy-test-reg-{what}-{}-{:08x}",
        std::process::id(),
        fastrand_u32()
    )
}

fn fastrand_u32() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now()) as u32
}

fn cfg(ns: &str) -> RedisConfig {
    RedisConfig::from_env().namespace(ns)
}

async fn registry(ns: &str) -> RedisRegistry {
    RedisRegistry::connect(cfg(ns))
        .await
        .expect("the redis registry connects")
}

/// A plain connection for what the test itself does to the server.
async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(RedisConfig::from_env().url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Deletes every key of a namespace.
async fn purge(ns: &str) {
    let mut c = raw().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:*"))
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut c).await;
    }
}

fn entry(id: &str, t: &str) -> MachineEntry {
    MachineEntry {
        id: MachineId::from(id),
        machine_type: t.into(),
        host_id: "host-a".into(),
        process_id: "proc-1".into(),
        context: None,
        version: None,
        accepts: Vec::new(),
        metadata: BTreeMap::new(),
    }
}

/// Waits for the first event `pick` accepts.
async fn next_matching<T>(
    rx: &mut broadcast::Receiver<RegistryEvent>,
    what: &str,
    mut pick: impl FnMut(&RegistryEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    if let Some(v) = pick(&ev) {
                        return v;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => panic!("watch closed"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
}

/// Makes an error comparable across registries: its kind.
fn kind(r: Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(Error::DuplicateId(id)) => format!("duplicate {id}"),
        Err(Error::UnknownTarget(id)) => format!("unknown {id}"),
        Err(Error::InvalidName { name, .. }) => format!("invalid name {name:?}"),
        Err(Error::InvalidPattern { pattern, .. }) => format!("invalid pattern {pattern:?}"),
        Err(e) => format!("other {e}"),
    }
}

/// Generated ids end in 8 random hex digits: compare them without.
fn without_random(id: &str) -> String {
    match id.rsplit_once('-') {
        Some((head, tail)) if tail.len() == 8 && tail.chars().all(|c| c.is_ascii_hexdigit()) => {
            format!("{head}-########")
        }
        _ => id.to_string(),
    }
}

fn normalized(v: Vec<MachineEntry>) -> Vec<MachineEntry> {
    v.into_iter()
        .map(|mut e| {
            e.id = MachineId::from(without_random(e.id.as_str()));
            e
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_answers_as_local_registry_side_by_side() {
    if !ready_for_tests() {
        return;
    }
    let ns = unique_ns("side");
    let redis = registry(&ns).await;
    let local = LocalRegistry::new(Duration::from_secs(10));
    let regs: [&dyn Registry; 2] = [&local, &redis];

    let mut rich = entry("rich", "PingService");
    rich.context = Some(7);
    rich.version = Some(String::new());
    rich.accepts = vec!["PONG".into(), "with \"quotes\" and / slash".into()];
    rich.metadata.insert("zone".into(), "eu-1".into());
    rich.metadata
        .insert("sy.zmq.router".into(), "tcp://10.0.0.2:5555".into());
    rich.metadata.insert("unicode".into(), "größe ✓".into());
    let mut entries = vec![rich];
    for (id, t) in [
        ("1", "Service_1"),
        ("2", "service_Alpha_2"),
        ("", "MyService_1"),
        ("4", "a.b"),
        ("5", "axb"),
        ("6", "Svc_Alpha_X"),
        ("", "Svc_Alpha_X"),
        ("x:y", "a[1]"),
        ("", "PingService"),
        ("7", "Service_1"),
    ] {
        entries.push(entry(id, t));
    }

    let mut results: Vec<Vec<String>> = vec![Vec::new(), Vec::new()];
    for (i, reg) in regs.iter().enumerate() {
        let out = &mut results[i];
        for e in &entries {
            out.push(kind(
                reg.register(e.clone())
                    .await
                    .map(|e| without_random(e.id.as_str())),
            ));
        }
        out.push(kind(reg.register(entry("1", "Other")).await));
        out.push(kind(reg.register(entry("z", " ")).await));
        out.push(kind(reg.deregister(&MachineId::from("nope")).await));
        out.push(kind(reg.discover_pattern("").await));
        out.push(kind(reg.is_healthy(&MachineId::from("nope")).await));
        out.push(kind(reg.heartbeat(&MachineId::from("nope")).await));
        // Leave and join again: the machine goes to the end of the order.
        out.push(kind(reg.deregister(&MachineId::from("1")).await));
        out.push(kind(
            reg.register(entry("1", "Service_1")).await.map(|e| e.id),
        ));
        out.push(kind(reg.deregister(&MachineId::from("5")).await));
        out.push(format!("{:?}", reg.types().await.unwrap()));
        for t in [
            "PingService",
            "Service_1",
            "service_1",
            "Svc_Alpha_X",
            "a[1]",
            "axb",
            "Nope",
        ] {
            out.push(format!(
                "{t}: {:?}",
                normalized(reg.discover(t).await.unwrap())
            ));
        }
        for p in [
            "*",
            "Service_*",
            "*_Alpha_*",
            "a.b",
            "a?b",
            "SERVICE_?",
            "a[1]",
            "*service*",
            "nothing*",
        ] {
            out.push(format!(
                "{p}: {:?}",
                normalized(reg.discover_pattern(p).await.unwrap())
            ));
        }
        for id in ["rich", "1", "5", "x:y", "nope"] {
            out.push(format!(
                "get {id}: {:?}",
                reg.get(&MachineId::from(id)).await.unwrap()
            ));
        }
        out.push(kind(reg.is_healthy(&MachineId::from("rich")).await));
    }
    for (l, r) in results[0].iter().zip(&results[1]) {
        assert_eq!(
            l, r,
            "LocalRegistry (left) and RedisRegistry (right) differ"
        );
    }
    assert_eq!(results[0].len(), results[1].len());
    // The checks above did check something.
    assert!(results[1].iter().any(|l| l.contains("sy.zmq.router")));
    assert!(
        results[1]
            .iter()
            .any(|l| l.starts_with("ok \"MyService_1-1-########\""))
    );
    purge(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_machines_healthy_and_their_absence_is_reported() {
    if !ready_for_tests() {
        return;
    }
    let ns = unique_ns("health");
    let a = RedisRegistry::builder(cfg(&ns))
        .ttl(Duration::from_millis(200))
        .remove_after(Duration::from_secs(30))
        .connect()
        .await
        .unwrap();
    // Another process of the deployment, which sweeps nothing itself.
    let b = RedisRegistry::builder(cfg(&ns))
        .sweep_interval(None)
        .connect()
        .await
        .unwrap();
    let mut wa = a.watch();
    let mut wb = b.watch();
    let id = a.register(entry("m", "T")).await.unwrap().id;
    a.heartbeat(&id).await.unwrap();
    assert!(a.is_healthy(&id).await.unwrap());
    assert!(b.is_healthy(&id).await.unwrap());
    // Housekeeping: a namespace nobody keeps alive expires (2 × TTL + grace).
    let mut c = raw().await;
    for key in ["m:m", "machines", "type:T", "types", "gen"] {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(format!("{}{key}", a.key_prefix()))
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(pttl > 0 && pttl <= 30_400, "{key} expires in {pttl} ms");
    }
    for w in [&mut wa, &mut wb] {
        let healthy = next_matching(w, "unhealthy report", |ev| match ev {
            RegistryEvent::HealthChanged { id: i, healthy } if *i == id => Some(*healthy),
            _ => None,
        })
        .await;
        assert!(!healthy);
    }
    assert!(!a.is_healthy(&id).await.unwrap());
    assert!(!b.is_healthy(&id).await.unwrap());
    // Still registered: unhealthy is not gone.
    assert!(b.get(&id).await.unwrap().is_some());
    b.heartbeat(&id).await.unwrap();
    assert!(a.is_healthy(&id).await.unwrap());
    for w in [&mut wa, &mut wb] {
        let healthy = next_matching(w, "healthy report", |ev| match ev {
            RegistryEvent::HealthChanged { id: i, healthy } if *i == id => Some(*healthy),
            _ => None,
        })
        .await;
        assert!(healthy, "a heartbeat revives the machine");
    }
    purge(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_swept_while_cut_off_registers_again_with_its_next_heartbeat() {
    if !ready_for_tests() {
        return;
    }
    let ns = unique_ns("again");
    let reg = RedisRegistry::builder(cfg(&ns))
        .ttl(Duration::from_millis(100))
        .remove_after(Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let watcher = registry(&ns).await;
    let mut w = watcher.watch();
    let mut e = entry("phoenix", "Bird");
    e.metadata.insert("k".into(), "v".into());
    let e = reg.register(e).await.unwrap();
    // No heartbeats (as when this process cannot reach Redis): unhealthy, then removed.
    next_matching(&mut w, "the leave", |ev| match ev {
        RegistryEvent::Left(id) if *id == e.id => Some(()),
        _ => None,
    })
    .await;
    assert!(watcher.get(&e.id).await.unwrap().is_none());
    reg.heartbeat(&e.id).await.unwrap();
    let back = next_matching(&mut w, "the join again", |ev| match ev {
        RegistryEvent::Joined(j) if j.id == e.id => Some(j.clone()),
        _ => None,
    })
    .await;
    assert_eq!(back, e, "the same entry comes back");
    assert!(watcher.is_healthy(&e.id).await.unwrap());
    // A machine deregistered on purpose does not come back.
    let mut wr = reg.watch();
    watcher.deregister(&e.id).await.unwrap();
    next_matching(&mut wr, "the leave", |ev| match ev {
        RegistryEvent::Left(id) if *id == e.id => Some(()),
        _ => None,
    })
    .await;
    assert!(matches!(
        reg.heartbeat(&e.id).await,
        Err(Error::UnknownTarget(_))
    ));
    purge(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_sees_joins_and_leaves_and_its_generation_moves() {
    if !ready_for_tests() {
        return;
    }
    let ns = unique_ns("watch");
    let a = registry(&ns).await;
    let b = registry(&ns).await;
    let hooked = Arc::new(AtomicU64::new(0));
    let h = hooked.clone();
    b.on_change(Arc::new(move |ev: &RegistryEvent| {
        if matches!(ev, RegistryEvent::Joined(_) | RegistryEvent::Left(_)) {
            h.fetch_add(1, Ordering::SeqCst);
        }
        true
    }));
    let mut wb = b.watch();
    let (ga, gb) = (a.generation(), b.generation());
    let mut e = entry("", "Worker");
    e.version = Some("2.1".into());
    e.metadata.insert("k".into(), "v".into());
    let joined = a.register(e).await.unwrap();
    assert!(a.generation() > ga, "the registering process moves at once");
    let seen = next_matching(&mut wb, "join", |ev| match ev {
        RegistryEvent::Joined(e) => Some(e.clone()),
        _ => None,
    })
    .await;
    assert_eq!(seen, joined, "the watcher gets the whole entry");
    let g1 = b.generation();
    assert!(g1 > gb);
    a.deregister(&joined.id).await.unwrap();
    let left = next_matching(&mut wb, "leave", |ev| match ev {
        RegistryEvent::Left(id) => Some(id.clone()),
        _ => None,
    })
    .await;
    assert_eq!(left, joined.id);
    assert!(b.generation() > g1);
    assert_eq!(hooked.load(Ordering::SeqCst), 2, "hooks hear both changes");
    assert!(b.get(&joined.id).await.unwrap().is_none());
    purge(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_reports_changes_in_the_same_order_its_own_at_once() {
    if !ready_for_tests() {
        return;
    }
    const N: usize = 20;
    let ns = unique_ns("order");
    let a = Arc::new(registry(&ns).await);
    let b = Arc::new(registry(&ns).await);
    let (mut wa, mut wb) = (a.watch(), b.watch());
    // Its own change is reported before the call returns, as with LocalRegistry.
    let e = a.register(entry("first", "T")).await.unwrap();
    assert_eq!(wa.try_recv().ok(), Some(RegistryEvent::Joined(e)));
    let churn = |reg: Arc<RedisRegistry>, tag: &'static str| {
        tokio::spawn(async move {
            for i in 0..N {
                let id = reg
                    .register(entry(&format!("{tag}{i}"), "T"))
                    .await
                    .unwrap()
                    .id;
                reg.deregister(&id).await.unwrap();
            }
        })
    };
    let (ta, tb) = (churn(a.clone(), "a"), churn(b.clone(), "b"));
    ta.await.unwrap();
    tb.await.unwrap();
    let mut seqs = Vec::new();
    for w in [&mut wa, &mut wb] {
        let mut v = Vec::new();
        while v.len() < 4 * N {
            let ev = next_matching(w, "a change", |ev| match ev {
                RegistryEvent::Joined(e) if e.id.as_str() != "first" => Some(format!("+{}", e.id)),
                RegistryEvent::Left(id) => Some(format!("-{id}")),
                _ => None,
            })
            .await;
            v.push(ev);
        }
        seqs.push(v);
    }
    assert_eq!(seqs[0], seqs[1], "both processes saw the same order");
    purge(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_do_not_see_each_other() {
    if !ready_for_tests() {
        return;
    }
    let (ns1, ns2) = (unique_ns("iso1"), unique_ns("iso2"));
    let one = registry(&ns1).await;
    let two = registry(&ns2).await;
    let two_watcher = registry(&ns2).await;
    let mut w = two_watcher.watch();
    one.register(entry("shared-id", "T")).await.unwrap();
    assert!(
        two.get(&MachineId::from("shared-id"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(two.discover("T").await.unwrap().is_empty());
    assert!(two.discover_pattern("*").await.unwrap().is_empty());
    assert!(two.types().await.unwrap().is_empty());
    // The same id is free in the other namespace.
    two.register(entry("shared-id", "U")).await.unwrap();
    // Published after the first namespace's join, so it would come second if that one
    // had crossed over.
    let first = next_matching(&mut w, "join", |ev| match ev {
        RegistryEvent::Joined(e) => Some(e.clone()),
        _ => None,
    })
    .await;
    assert_eq!(&*first.machine_type, "U");
    assert_eq!(one.types().await.unwrap(), vec!["T".to_string()]);
    purge(&ns1).await;
    purge(&ns2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_two_hosts_find_each_other_as_remote() {
    if !ready_for_tests() {
        return;
    }
    let ns = unique_ns("hosts");
    let shared: Arc<dyn Registry> = Arc::new(registry(&ns).await);
    let x = switchyard::builder()
        .session(|s| s.registry(shared.clone()).host_id("host-x"))
        .build()
        .unwrap();
    let y = switchyard::builder()
        .session(|s| s.registry(shared.clone()).host_id("host-y"))
        .build()
        .unwrap();
    let on_y = y.machine("svc-on-y", "Svc").build().await.unwrap();
    let on_x = x.machine("client-on-x", "Client").build().await.unwrap();
    let found = on_x.discover("Svc").await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(&*found[0].host_id, "host-y");
    let (e, location) = on_x.locate(on_y.id()).await.unwrap();
    assert_eq!(e.id, *on_y.id());
    assert_eq!(location, Location::Remote);
    // And from a registry in another process of the deployment.
    let other = registry(&ns).await;
    let seen = other.get(on_y.id()).await.unwrap().unwrap();
    assert_eq!(&*seen.host_id, "host-y");
    assert_eq!(&*seen.process_id, y.process_id());
    drop((on_x, on_y, x, y));
    purge(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_finds_a_machine_registered_through_another_registry_as_remote() {
    if !ready_for_tests() {
        return;
    }
    let ns = unique_ns("hosts2");
    // As two processes on two hosts would: a registry (and connections) each.
    let reg_x: Arc<dyn Registry> = Arc::new(registry(&ns).await);
    let reg_y: Arc<dyn Registry> = Arc::new(registry(&ns).await);
    let x = switchyard::builder()
        .session(|s| s.registry(reg_x).host_id("host-x"))
        .build()
        .unwrap();
    let y = switchyard::builder()
        .session(|s| s.registry(reg_y).host_id("host-y"))
        .build()
        .unwrap();
    let on_x = x.machine("", "Client").build().await.unwrap();
    let on_y = y.machine("", "Svc").build().await.unwrap();
    let found = on_x.discover_pattern("sv?").await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, *on_y.id());
    let (_, location) = on_x.locate(on_y.id()).await.unwrap();
    assert_eq!(location, Location::Remote);
    drop((on_x, on_y, x, y));
    purge(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_sends_do_no_redis_round_trip() {
    if !ready_for_tests() {
        return;
    }
    const N: u64 = 1000;
    let ns = unique_ns("rtt");
    // No sweeper and no heartbeats: every remaining command would come from the sends.
    let reg = Arc::new(
        RedisRegistry::builder(cfg(&ns))
            .sweep_interval(None)
            .connect()
            .await
            .unwrap(),
    );
    let session = switchyard::builder()
        .session(|s| s.registry(reg.clone()).heartbeat_interval(None))
        .build()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _b = session
        .machine("b", "Sink")
        .handler(move |_, ev| {
            let _ = tx.send(ev.data::<u64>().unwrap_or(u64::MAX));
        })
        .build()
        .await
        .unwrap();
    let a = session.machine("a", "Source").build().await.unwrap();
    a.send("b", "E", 0u64).await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, rx.recv()).await.unwrap(),
        Some(0)
    );
    let before = reg.round_trips();
    for i in 1..=N {
        a.send("b", "E", i).await.unwrap();
    }
    for i in 1..=N {
        assert_eq!(
            tokio::time::timeout(WAIT, rx.recv()).await.unwrap(),
            Some(i)
        );
    }
    let after = reg.round_trips();
    println!("redis round trips for {N} routed sends: {}", after - before);
    assert_eq!(after, before, "a routed send asks Redis nothing");
    // The counter does count: a lookup is one round trip.
    a.locate(&MachineId::from("b")).await.unwrap();
    assert_eq!(reg.round_trips(), after + 1);
    drop((a, session));
    purge(&ns).await;
}

/// The child process of [`killed_process_is_reported_unhealthy_then_gone`]: registers a
/// machine with a short TTL, heartbeats it, and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process_role() {
    let Ok(ns) = std::env::var(CHILD_ENV) else {
        return;
    };
    let reg = RedisRegistry::builder(cfg(&ns))
        .ttl(Duration::from_millis(500))
        .remove_after(Duration::from_millis(500))
        .sweep_interval(None)
        .connect()
        .await
        .unwrap();
    let id = reg.register(entry("victim", "Doomed")).await.unwrap().id;
    println!("SY-READY");
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let _ = reg.heartbeat(&id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_process_is_reported_unhealthy_then_gone() {
    if !ready_for_tests() || std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let ns = unique_ns("kill");
    let watcher = RedisRegistry::builder(cfg(&ns))
        .ttl(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let mut w = watcher.watch();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process_role",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &ns)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // A thread of its own (not the runtime's blocking pool, which a failing test would
    // wait for at shutdown).
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let ready = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("SY-READY"));
        let _ = tx.send(ready);
    });
    let ready = tokio::time::timeout(WAIT, rx).await;
    if !matches!(ready, Ok(Ok(true))) {
        let _ = child.kill();
        panic!("the child did not register its machine");
    }
    let id = MachineId::from("victim");
    next_matching(&mut w, "the child's join", |ev| match ev {
        RegistryEvent::Joined(e) if e.id == id => Some(()),
        _ => None,
    })
    .await;
    assert!(watcher.is_healthy(&id).await.unwrap());
    child.kill().unwrap(); // SIGKILL: no deregistration, no goodbye
    let _ = child.wait();
    // TTL 500 ms + sweep interval 125 ms: WAIT is the margin.
    let healthy = next_matching(&mut w, "the unhealthy report", |ev| match ev {
        RegistryEvent::HealthChanged { id: i, healthy } if *i == id => Some(*healthy),
        _ => None,
    })
    .await;
    assert!(!healthy);
    next_matching(&mut w, "the leave", |ev| match ev {
        RegistryEvent::Left(i) if *i == id => Some(()),
        _ => None,
    })
    .await;
    assert!(watcher.get(&id).await.unwrap().is_none());
    assert!(watcher.discover("Doomed").await.unwrap().is_empty());
    assert!(watcher.types().await.unwrap().is_empty());
    assert!(matches!(
        watcher.is_healthy(&id).await,
        Err(Error::UnknownTarget(_))
    ));
    purge(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_recovers_after_the_connections_are_killed() {
    if !ready_for_tests() {
        return;
    }
    let ns = unique_ns("reconnect");
    // A user of its own, so that killing its connections touches no one else's, and so
    // that AUTH from the URL is exercised.
    let user = format!("sy-test-reg-{:08x}", fastrand_u32());
    let pass = format!("pw-{:08x}", fastrand_u32());
    let mut admin = raw().await;
    let _: () = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                &user,
                "on",
                &format!(">{pass}"),
                "~*",
                "&*",
                "+@all",
            ][..],
        )
        .query_async(&mut admin)
        .await
        .unwrap();
    let base = RedisConfig::from_env().url;
    let authed = base.replacen("redis://", &format!("redis://{user}:{pass}@"), 1);
    let reg = RedisRegistry::connect(cfg(&ns).url(authed)).await.unwrap();
    let other = registry(&ns).await;
    let mut w = reg.watch();
    let g = reg.generation();
    let killed: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "USER", &user][..])
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(
        killed >= 2,
        "the command and event connections were killed ({killed})"
    );
    next_matching(&mut w, "Resync", |ev| {
        matches!(ev, RegistryEvent::Resync).then_some(())
    })
    .await;
    assert!(reg.reconnections() >= 1);
    assert!(reg.generation() > g, "route caches learn to look again");
    // Later events still arrive, and commands work again.
    let e = other.register(entry("after", "T")).await.unwrap();
    let seen = next_matching(&mut w, "join after the loss", |ev| match ev {
        RegistryEvent::Joined(e) => Some(e.clone()),
        _ => None,
    })
    .await;
    assert_eq!(seen, e);
    assert_eq!(reg.discover("T").await.unwrap(), vec![e]);
    drop(reg);
    let _: Result<(), _> = redis::cmd("ACL")
        .arg(&["DELUSER", &user][..])
        .query_async(&mut admin)
        .await;
    purge(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_and_urls_are_clear_errors() {
    if !ready_for_tests() {
        return;
    }
    let base = RedisConfig::from_env().url;
    let url = base.replacen("redis://", "redis://nobody-here:sekrit@", 1);
    let err = RedisRegistry::connect(cfg("sy-test-reg-auth").url(url))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("***"), "{err}");
    assert!(!err.contains("sekrit"), "the password never shows: {err}");
    assert!(err.contains("password"), "says what to check: {err}");
    #[cfg(not(feature = "redis-tls"))]
    {
        let err = RedisRegistry::connect(cfg("x").url("rediss://h:1/"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Config(_)),
            "TLS is not built in: {err}"
        );
    }
    let err = RedisRegistry::connect(cfg("x").url("nonsense"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    let err = RedisRegistry::connect(cfg(" ")).await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
}
