//! The Redis transport against the real server, beyond the conformance suite: the pattern
//! translation, connections killed mid-stream, a group member that dies before
//! acknowledging (a real child process), foreign malformed entries and messages, and clear
//! startup errors.
#![cfg(feature = "redis")]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use switchyard::redis::{RedisTransport, RedisTransportConfig, ready_for_tests};
use switchyard::{Envelope, Error, Location, Node, Registry, Session, TopicPattern};
use tokio::sync::mpsc;

#[path = "support/wait.rs"]
mod wait;
use wait::eventually;

const WAIT: Duration = Duration::from_secs(10);

fn unique(prefix: &str) -> String {
    use std::hash::{BuildHasher, RandomState};
    let r = RandomState::new().hash_one(Instant::now());
    format!("{prefix}-{}-{r:x}", std::process::id())
}

async fn transport(
    ns: &str,
    f: impl FnOnce(RedisTransportConfig) -> RedisTransportConfig,
) -> RedisTransport {
    RedisTransport::connect(f(RedisTransportConfig::from_env().namespace(ns)))
        .await
        .expect("connects to Redis")
}

/// A session on its own "host" sharing `registry`, reaching other hosts through `t`.
fn host(t: &RedisTransport, name: &str, registry: Option<Arc<dyn Registry>>) -> Session {
    let host = format!("{}-{name}", t.namespace());
    let mut b = switchyard::builder()
        .selector(|s| s.prefer(Location::Remote, ["redis"]))
        .redis(t)
        .session(|s| s.host_id(host));
    if let Some(r) = registry {
        b = b.session(move |s| s.registry(r));
    }
    b.build().expect("session builds")
}

/// A machine whose events arrive on the returned channel.
async fn recorder(s: &Session, id: &str) -> (Node, mpsc::UnboundedReceiver<Envelope>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let node = s
        .machine(id, "Rec")
        .handler(move |_, ev| {
            let _ = tx.send(ev);
        })
        .build()
        .await
        .expect("machine builds");
    (node, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Envelope>) -> Envelope {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("an event arrives in time")
        .expect("the machine is alive")
}

async fn raw() -> redis::aio::MultiplexedConnection {
    let url = switchyard::redis::RedisConfig::from_env().url;
    redis::Client::open(url)
        .expect("the URL parses")
        .get_multiplexed_async_connection()
        .await
        .expect("a raw connection")
}

/// Kills every connection whose name starts with `prefix`; returns how many.
async fn kill_connections(c: &mut redis::aio::MultiplexedConnection, prefix: &str) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(c)
        .await
        .unwrap();
    let mut killed = 0;
    for line in list.lines() {
        let field = |k: &str| {
            line.split(' ')
                .find_map(|f| f.strip_prefix(k).map(str::to_string))
        };
        if let (Some(id), Some(name)) = (field("id="), field("name="))
            && name.starts_with(prefix)
        {
            let n: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(&id)
                .query_async(c)
                .await
                .unwrap();
            killed += n as usize;
        }
    }
    killed
}

#[test]
fn patterns_translate_to_globs() {
    let g = |p: &str| switchyard::redis::topic_glob(&TopicPattern::parse(p).unwrap());
    assert_eq!(g("orders.*"), "orders.*");
    assert_eq!(g("orders.#"), "orders*");
    assert_eq!(g("#.eu"), "*eu");
    assert_eq!(g("a.#.z"), "a*z");
    assert_eq!(g("[a]?.x\\y.*"), "\\[a\\]\\?.x\\\\y.*");
}

const PATTERNS: &[&str] = &[
    "orders.*",
    "orders.#",
    "#",
    "#.eu",
    "a.#.z",
    "*.b.#",
    "[x].?",
    "f?o.#",
    "back\\slash.*",
];

const TOPICS: &[&str] = &[
    "orders",
    "orders.new",
    "orders.new.eu",
    "ordersX",
    "ordersX.eu",
    "x.eu",
    "eu",
    "a.z",
    "a.b.c.z",
    "a.zz",
    "q.b",
    "b",
    "[x].?",
    "x.y",
    "[x].y",
    "f?o",
    "f?o.1",
    "fxo.1",
    "back\\slash.1",
    "backslash.1",
];

/// Every topic a pattern matches reaches a subscriber of it through the Redis glob, once,
/// and nothing else does: checked on the server for every pattern against every topic,
/// including glob characters in topic names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_subscriptions_match_exactly_on_the_server() {
    if !ready_for_tests() {
        return;
    }
    let ns = unique("sy-pat");
    let tp = transport(&ns, |c| c).await;
    let ts = transport(&ns, |c| c).await;
    let publisher = host(&tp, "p", None);
    let subscribers = host(&ts, "s", Some(publisher.registry().clone()));
    let p = publisher.machine("pub", "P").build().await.unwrap();
    let mut rxs = Vec::new();
    for (i, pat) in PATTERNS.iter().enumerate() {
        let (n, rx) = recorder(&subscribers, &format!("sub{i}")).await;
        n.subscribe(pat).await.unwrap();
        // A second, overlapping subscription of the same machine: still one delivery each.
        n.subscribe("#").await.unwrap();
        rxs.push((n, rx));
    }
    for t in TOPICS {
        p.publish(t, "T", t.to_string()).await.unwrap();
    }
    p.publish("end", "END", ()).await.unwrap();
    for (i, (_, rx)) in rxs.iter_mut().enumerate() {
        let mut got = Vec::new();
        loop {
            let ev = next(rx).await;
            if ev.name() == "END" {
                break;
            }
            got.push(ev.data::<String>().unwrap());
        }
        // Subscribed to `#` too: every topic arrives, once each, in publishing order.
        assert_eq!(got, TOPICS, "machine {i}: each publish once");
    }
    // Now only the exact patterns, against the raw server: what Redis hands over for the
    // glob, filtered by the pattern, is exactly what the pattern matches.
    let mut c = raw().await;
    let (tx, mut pushes) = mpsc::unbounded_channel();
    let client = redis::Client::open(format!(
        "{}?protocol=resp3",
        switchyard::redis::RedisConfig::from_env()
            .url
            .trim_end_matches('/')
    ))
    .unwrap();
    let mut sub = client
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_push_sender(tx),
        )
        .await
        .unwrap();
    let prefix = format!("{}:t:", switchyard::redis::escape_glob(&ns));
    // Marks the end of each round, whatever the pattern.
    let end = format!("{ns}:t:end");
    sub.subscribe(&end).await.unwrap();
    for pat in PATTERNS {
        let glob = format!(
            "{prefix}{}",
            switchyard::redis::topic_glob(&TopicPattern::parse(pat).unwrap())
        );
        sub.psubscribe(&glob).await.unwrap();
        for t in TOPICS {
            let _: i64 = c.publish(format!("{ns}:t:{t}"), "x").await.unwrap();
        }
        let _: i64 = c.publish(&end, "x").await.unwrap();
        let mut through: BTreeSet<String> = BTreeSet::new();
        loop {
            let push = tokio::time::timeout(WAIT, pushes.recv())
                .await
                .unwrap()
                .unwrap();
            match push.kind {
                redis::PushKind::Message => break,
                redis::PushKind::PMessage => {
                    let channel: String = redis::from_redis_value(push.data[1].clone()).unwrap();
                    let topic = channel[ns.len() + 3..].to_string();
                    if topic != "end" {
                        through.insert(topic);
                    }
                }
                _ => {}
            }
        }
        let want: BTreeSet<String> = TOPICS
            .iter()
            .filter(|t| TopicPattern::parse(pat).unwrap().matches(t))
            .map(|t| t.to_string())
            .collect();
        assert!(
            want.is_subset(&through),
            "{pat}: the glob lets every matching topic through"
        );
        let exact: BTreeSet<String> = through
            .into_iter()
            .filter(|t| TopicPattern::parse(pat).unwrap().matches(t))
            .collect();
        assert_eq!(exact, want, "{pat}");
        sub.punsubscribe(&glob).await.unwrap();
    }
    drop(subscribers);
}

/// `CLIENT KILL` on every connection of both transports while 3,000 events stream from
/// one host to the other: the stream path loses nothing (duplicates allowed: at least
/// once), and topic publishes flow again once the subscriber is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_come_back_and_the_stream_path_loses_nothing() {
    if !ready_for_tests() {
        return;
    }
    const N: u32 = 3000;
    let ns = unique("sy-kill");
    let ta = transport(&ns, |c| c).await;
    let tb = transport(&ns, |c| c).await;
    let a = host(&ta, "a", None);
    let b = host(&tb, "b", Some(a.registry().clone()));
    let sender = a.machine("sender", "S").build().await.unwrap();
    let (rb, mut rx) = recorder(&b, "receiver").await;
    rb.subscribe("ticks.#").await.unwrap();
    let to_b = sender.sender("receiver").await.unwrap();
    let sending = tokio::spawn(async move {
        for i in 0..N {
            to_b.send("E", i).await.expect("sends wait out the outage");
        }
    });
    let mut c = raw().await;
    let mut seen: BTreeSet<u32> = BTreeSet::new();
    let mut total = 0usize;
    let mut killed = false;
    while seen.len() < N as usize {
        if seen.len() >= N as usize / 3 && !killed {
            let n = kill_connections(&mut c, &tb.connection_name_prefix()).await
                + kill_connections(&mut c, &ta.connection_name_prefix()).await;
            assert!(n >= 4, "killed the transports' connections ({n})");
            killed = true;
        }
        let ev = next(&mut rx).await;
        assert_eq!(ev.name(), "E");
        seen.insert(ev.data::<u32>().unwrap());
        total += 1;
    }
    sending.await.unwrap();
    assert!(killed);
    assert_eq!(seen.len(), N as usize, "every event arrived");
    assert!(total >= N as usize);
    // Pub/sub is at most once: a publish made before the subscription is restored is lost.
    // Publish until one arrives through the restored subscription (bounded).
    let until = Instant::now() + WAIT;
    let mut tick = 0u32;
    'ticks: loop {
        assert!(Instant::now() < until, "topic publishes flow again");
        sender.publish("ticks.a", "TICK", tick).await.unwrap();
        tick += 1;
        while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            if ev.name() == "TICK" {
                break 'ticks;
            }
        }
    }
    // And from then on, every publish arrives.
    for i in 0..100u32 {
        sender.publish("ticks.b", "TOCK", i).await.unwrap();
    }
    let mut tocks = 0u32;
    while tocks < 100 {
        let ev = next(&mut rx).await;
        if ev.name() == "TOCK" {
            assert_eq!(ev.data::<u32>().unwrap(), tocks);
            tocks += 1;
        }
    }
}

/// The child side of `a_dead_members_entries_go_to_another_member`: a member of group
/// `work` that exits the process on its first event, before acknowledging it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_member_that_dies() {
    let Ok(ns) = std::env::var("SY_REDIS_CHILD_NS") else {
        return; // only as the child of the test below
    };
    let t = transport(&ns, |c| c.claim_idle(Duration::from_millis(600))).await;
    let s = host(&t, "child", None);
    let n = s
        .machine("doomed", "W")
        .handler(|_, _| std::process::exit(3))
        .build()
        .await
        .unwrap();
    n.join_group("work").await.unwrap();
    println!("JOINED");
    // Lives until its first event ends the process (or the parent kills it).
    std::future::pending::<()>().await;
}

/// A group member (another process) dies holding entries it read and did not acknowledge,
/// and entries still on their way to it: once its membership expires, the other member
/// takes over its stream and gets every entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_members_entries_go_to_another_member() {
    if !ready_for_tests() {
        return;
    }
    let ns = unique("sy-dead");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_member_that_dies", "--nocapture"])
        .env("SY_REDIS_CHILD_NS", &ns)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the child starts");
    let t = transport(&ns, |c| c.claim_idle(Duration::from_millis(600))).await;
    let s = host(&t, "survivor", None);
    let (n, mut rx) = recorder(&s, "survivor").await;
    n.join_group("work").await.unwrap();
    let mut c = raw().await;
    let members = format!("{ns}:g:work:members");
    eventually("the child joins", || {
        let mut c = c.clone();
        let members = members.clone();
        async move { c.hlen::<_, usize>(&members).await.unwrap_or(0) == 2 }
    })
    .await;
    let p = s.machine("producer", "P").build().await.unwrap();
    for i in 0..20u32 {
        assert_eq!(p.publish_to_group("work", "JOB", i).await.unwrap(), 1);
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(3), "the child died in its handler");
    let mut got = BTreeSet::new();
    while got.len() < 20 {
        got.insert(next(&mut rx).await.data::<u32>().unwrap());
    }
    assert_eq!(got, (0..20).collect());
    // The dead member is gone from the group, and its stream with it (once the adoption
    // finished, right after delivering).
    let ours = t.group_member_streams("work");
    eventually("the dead member's stream is deleted", || {
        let mut c = c.clone();
        let (ns, ours) = (ns.clone(), ours.clone());
        async move {
            let streams: Vec<String> = c.keys(format!("{ns}:g:work:m:*")).await.unwrap();
            streams == ours
        }
    })
    .await;
    let left: usize = c.hlen(&members).await.unwrap();
    assert_eq!(left, 1);
}

/// Foreign entries on a machine's stream (not MessagePack, no envelope field) and a
/// foreign message on a topic channel are logged, counted, acknowledged and skipped; the
/// consumer goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_and_messages_are_skipped() {
    if !ready_for_tests() {
        return;
    }
    let ns = unique("sy-bad");
    let t = transport(&ns, |c| c).await;
    let s = host(&t, "h", None);
    let (n, mut rx) = recorder(&s, "m").await;
    n.subscribe("x.#").await.unwrap();
    let mut c = raw().await;
    let stream = t.inbox_stream("m");
    let _: String = c
        .xadd(&stream, "*", &[("e", &b"\xc1 not msgpack"[..])])
        .await
        .unwrap();
    let _: String = c.xadd(&stream, "*", &[("other", "field")]).await.unwrap();
    let _: i64 = c
        .publish(format!("{ns}:t:x.y"), &b"garbage"[..])
        .await
        .unwrap();
    let p = s.machine("p", "P").build().await.unwrap();
    p.send("m", "GOOD", 1u32).await.unwrap();
    assert_eq!(next(&mut rx).await.name(), "GOOD");
    p.publish("x.y", "PUB", 2u32).await.unwrap();
    assert_eq!(next(&mut rx).await.name(), "PUB");
    eventually("everything is acknowledged", || {
        let mut c = c.clone();
        let stream = stream.clone();
        async move {
            let v: redis::Value = redis::cmd("XPENDING")
                .arg(&stream)
                .arg(switchyard::redis::GROUP)
                .query_async(&mut c)
                .await
                .unwrap();
            matches!(v, redis::Value::Array(ref a) if a.first() == Some(&redis::Value::Int(0)))
        }
    })
    .await;
    use switchyard::transport::Transport;
    assert_eq!(t.health().dropped, 3, "two entries and one message dropped");
}

/// A send to a machine that is registered but bound nowhere does not vanish into a stream
/// nobody reads: it fails with `TargetGone`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_to_a_machine_bound_nowhere_is_target_gone() {
    if !ready_for_tests() {
        return;
    }
    let ns = unique("sy-gone");
    let ta = transport(&ns, |c| c).await;
    let a = host(&ta, "a", None);
    let sender = a.machine("sender", "S").build().await.unwrap();
    let mut entry = sender.entry().clone();
    entry.id = "phantom".into();
    entry.host_id = "elsewhere".into();
    a.registry().register(entry).await.unwrap();
    let r = sender.send("phantom", "X", ()).await;
    assert!(matches!(r, Err(Error::TargetGone(_))), "{r:?}");
    let mut c = raw().await;
    let exists: bool = c.exists(ta.inbox_stream("phantom")).await.unwrap();
    assert!(!exists, "no stream was made for it");
}

#[tokio::test]
async fn bad_urls_and_a_missing_server_are_clear_errors() {
    for url in ["http://127.0.0.1:6379", "redis://host:notaport/", ""] {
        let err = RedisTransport::connect(RedisTransportConfig::from_env().url(url))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{url}: {err}");
        assert!(err.to_string().contains("redis://"), "says the form: {err}");
    }
    let err = RedisTransport::connect(
        RedisTransportConfig::from_env().url("rediss://user:secret@127.0.0.1:6380/"),
    )
    .await
    .unwrap_err();
    if cfg!(feature = "redis-tls") {
        // TLS is built in: nothing listens there.
        assert!(err.to_string().contains("could not connect"), "{err}");
    } else {
        assert!(err.to_string().contains("TLS"), "{err}");
    }
    assert!(!err.to_string().contains("secret"), "no password: {err}");
    // Nothing listens on port 1.
    let err = RedisTransport::connect(
        RedisTransportConfig::from_env()
            .url("redis://:pw@127.0.0.1:1/")
            .outage_wait(Duration::from_millis(300)),
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("could not connect to Redis at redis://:***@127.0.0.1:1/"),
        "{msg}"
    );
    // Started without a server: a bind waits `outage_wait`, then says what is wrong.
    let t = RedisTransport::start(
        RedisTransportConfig::from_env()
            .url("redis://127.0.0.1:1/")
            .outage_wait(Duration::from_millis(300)),
    )
    .unwrap();
    let s = host(&t, "h", None);
    let err = s.machine("m", "M").build().await.unwrap_err();
    assert!(
        err.to_string()
            .contains("not connected to Redis at redis://127.0.0.1:1/"),
        "{err}"
    );
}

/// An async handler whose mailbox is full (policy `Wait`) holds back only its own stream:
/// the other machines of its session keep getting their events, and the held ones arrive,
/// in order, once the handler makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_does_not_stall_the_sessions_other_machines() {
    if !ready_for_tests() {
        return;
    }
    let ns = unique("sy-full");
    let ta = transport(&ns, |c| c).await;
    let tb = transport(&ns, |c| c).await;
    let a = host(&ta, "a", None);
    let b = host(&tb, "b", Some(a.registry().clone()));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (tx, mut got) = mpsc::unbounded_channel::<u32>();
    let g = gate.clone();
    let _slow = b
        .machine("slow", "Slow")
        .mailbox(1, switchyard::FullPolicy::Wait)
        .handler_async(move |_, ev| {
            let (g, tx) = (g.clone(), tx.clone());
            async move {
                g.acquire().await.unwrap().forget();
                let _ = tx.send(ev.data::<u32>().unwrap());
            }
        })
        .build()
        .await
        .unwrap();
    let (_fast, mut rf) = recorder(&b, "fast").await;
    let p = a.machine("p", "P").build().await.unwrap();
    // 0 is in the handler, 1 in the mailbox, 2.. wait on the stream side.
    for i in 0..6u32 {
        p.send("slow", "E", i).await.unwrap();
    }
    for i in 0..3u32 {
        p.send("fast", "F", i).await.unwrap();
        assert_eq!(next(&mut rf).await.data::<u32>().unwrap(), i);
    }
    gate.add_permits(100);
    for i in 0..6u32 {
        let v = tokio::time::timeout(WAIT, got.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v, i, "in order once room came");
    }
    // And the slow stream is read again afterwards.
    p.send("slow", "E", 6).await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, got.recv()).await.unwrap(),
        Some(6)
    );
}

/// A TCP proxy in front of the real server, which a test can take down and bring back on
/// the same port: an outage of the server as the transport sees it.
struct Proxy {
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn start(port: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("the proxy listens");
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:6379").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Proxy {
            port,
            task: Some(task),
        }
    }

    /// Closes every connection and stops listening (the JoinSet goes with the task).
    fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The server goes away: sends wait `outage_wait`, then fail with a clear, retryable error;
/// a send made during the outage completes once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_wait_out_an_outage_or_fail_clearly() {
    if !ready_for_tests() || std::env::var("SWITCHYARD_REDIS_URL").is_ok() {
        // The proxy forwards to the default local server only.
        return;
    }
    let ns = unique("sy-outage");
    let mut proxy = Proxy::start(0).await;
    let port = proxy.port;
    let ta = transport(&ns, |c| {
        c.url(format!("redis://127.0.0.1:{port}/"))
            .outage_wait(Duration::from_millis(1500))
    })
    .await;
    let tb = transport(&ns, |c| c).await;
    let a = host(&ta, "a", None);
    let b = host(&tb, "b", Some(a.registry().clone()));
    let sender = a.machine("sender", "S").build().await.unwrap();
    let (_r, mut rx) = recorder(&b, "receiver").await;
    sender.send("receiver", "BEFORE", 0u32).await.unwrap();
    assert_eq!(next(&mut rx).await.name(), "BEFORE");

    use switchyard::transport::Transport;
    proxy.down();
    eventually("the transport sees the outage", || {
        let healthy = ta.health().healthy;
        async move { !healthy }
    })
    .await;
    let started = Instant::now();
    let err = sender.send("receiver", "LOST", 1u32).await.unwrap_err();
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "it waited"
    );
    assert!(err.is_retryable(), "{err}");
    assert!(
        err.to_string().contains(&format!(
            "not connected to Redis at redis://127.0.0.1:{port}/"
        )),
        "{err}"
    );

    // During an outage shorter than `outage_wait`, the send waits and then goes through.
    let pending = tokio::spawn({
        let sender = sender.clone();
        async move { sender.send("receiver", "WAITED", 2u32).await }
    });
    let _proxy = Proxy::start(port).await;
    pending
        .await
        .unwrap()
        .expect("the send waited for the server");
    assert_eq!(next(&mut rx).await.name(), "WAITED");
}

/// An inbox stream lives while its session renews its lease, and is removed by Redis once
/// the session is gone without unbinding (its runtime dropped, as when a process dies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_sessions_inboxes_expire_with_their_lease() {
    if !ready_for_tests() {
        return;
    }
    let ns = unique("sy-lease");
    let lease = Duration::from_millis(600);
    let key = format!("{ns}:in:leased");
    // The "process": a runtime of its own, dropped without unbinding anything.
    let (ns2, key2) = (ns.clone(), key.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("a runtime");
        rt.block_on(async {
            let t = transport(&ns2, |c| c.inbox_lease(Some(lease))).await;
            let s = host(&t, "dying", None);
            let (_node, _rx) = recorder(&s, "leased").await;
            // Three leases pass: the session keeps renewing it.
            tokio::time::sleep(lease * 3).await;
            let mut c = raw().await;
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&key2)
                .query_async(&mut c)
                .await
                .unwrap();
            assert!(
                ttl > 0 && ttl <= lease.as_millis() as i64,
                "a bound inbox has a renewed lease: {ttl} ms"
            );
            std::mem::forget(s);
            std::mem::forget(t);
        });
        drop(rt);
    })
    .join()
    .expect("the dying session ran");
    let mut c = raw().await;
    eventually("the dead session's inbox to expire", || {
        let mut c = c.clone();
        let key = key.clone();
        async move { !c.exists::<_, bool>(&key).await.unwrap_or(true) }
    })
    .await;
    let _: () = c.del(&key).await.unwrap_or(());
}
