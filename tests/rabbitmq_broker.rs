//! RabbitMQ transport against the real broker, beyond the conformance suite: startup
//! errors, a foreign malformed message, the wildcard translation, a dropped connection.
#![cfg(feature = "rabbitmq")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use switchyard::rabbitmq::{RabbitConfig, RabbitTransport, names, ready_for_tests};
use switchyard::{Error, Location, Registry, Session, TopicPattern};
use tokio::sync::mpsc;

#[path = "support/wait.rs"]
mod wait;
use wait::until;

const WAIT: Duration = Duration::from_secs(10);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{:x}", std::process::id(), fastrand_u64())
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

/// A session on its own "host" sharing `registry`, reaching other hosts through `t`.
fn host(t: &RabbitTransport, name: &str, registry: Option<Arc<dyn Registry>>) -> Session {
    let host = format!("{}-{name}", t.namespace());
    let mut b = switchyard::builder()
        .selector(|s| s.prefer(Location::Remote, ["rabbitmq"]))
        .rabbitmq(t)
        .session(|s| s.host_id(host));
    if let Some(r) = registry {
        b = b.session(move |s| s.registry(r));
    }
    b.build().expect("session builds")
}

async fn transport(ns: &str, f: impl FnOnce(RabbitConfig) -> RabbitConfig) -> RabbitTransport {
    RabbitTransport::connect(f(RabbitConfig::from_env().namespace(ns)))
        .await
        .expect("connects to the broker")
}

#[tokio::test]
async fn a_malformed_url_is_a_config_error() {
    for url in ["http://127.0.0.1:5672", "amqp://host:notaport/", ""] {
        let err = RabbitTransport::connect(RabbitConfig::new(url))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{url}: {err}");
        assert!(err.to_string().contains("amqp://"), "says the form: {err}");
    }
    // Without feature `rabbitmq-tls`, connecting over TLS says TLS is not built in; with
    // it, nothing listens there (tests/rabbitmq_tls.rs has the real TLS test). Either way
    // the message shows no password.
    let err = RabbitTransport::connect(
        RabbitConfig::new("amqps://guest:secret@127.0.0.1:1/")
            .connect_timeout(std::time::Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    if cfg!(feature = "rabbitmq-tls") {
        assert!(err.to_string().contains("cannot reach"), "{err}");
    } else {
        assert!(err.to_string().contains("TLS"), "{err}");
    }
    assert!(
        !err.to_string().contains("secret"),
        "no password in messages: {err}"
    );
}

#[tokio::test]
async fn a_broker_that_is_down_is_an_error_within_the_timeout() {
    // Port 1 on loopback: nothing listens there.
    let cfg = RabbitConfig::new("amqp://guest:guest@127.0.0.1:1/%2f")
        .connect_timeout(Duration::from_secs(3));
    let start = Instant::now();
    let err = RabbitTransport::connect(cfg).await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "bounded: {:?}",
        start.elapsed()
    );
    assert!(
        matches!(
            err,
            Error::Transport {
                retryable: true,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("cannot reach") && msg.contains("start the broker"),
        "{msg}"
    );
    assert!(!msg.contains(":guest@"), "no password in messages: {msg}");

    // Started in the background instead, a bind waits `outage_wait` and then says why.
    let t = RabbitTransport::start(
        RabbitConfig::new("amqp://guest:guest@127.0.0.1:1/%2f")
            .outage_wait(Duration::from_millis(300))
            .connect_timeout(Duration::from_millis(200)),
    )
    .unwrap();
    let s = host(&t, "down", None);
    let start = Instant::now();
    let err = s.machine("m", "T").build().await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(
        err.to_string().contains("not connected to RabbitMQ"),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_credentials_are_an_error_that_says_so() {
    if !ready_for_tests() {
        return;
    }
    let mut cfg = RabbitConfig::from_env();
    cfg.url = cfg.url.replacen("guest:guest@", "guest:wrong-password@", 1);
    if !cfg.url.contains("wrong-password") {
        eprintln!("skipped: SWITCHYARD_AMQP_URL does not use guest:guest");
        return;
    }
    let start = Instant::now();
    let err = RabbitTransport::connect(cfg).await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
    assert!(
        matches!(
            err,
            Error::Transport {
                retryable: false,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("credentials") || msg.contains("user"), "{msg}");
    assert!(
        !msg.contains("wrong-password"),
        "no password in messages: {msg}"
    );
}

/// A foreign message that is not an envelope, on a machine's queue: rejected without
/// requeue (dead-lettered here, a DLX being configured), counted, and the machine goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_is_dead_lettered_and_the_consumer_goes_on() {
    if !ready_for_tests() {
        return;
    }
    let ns = unique("sy-bad");
    let dlx = format!("{ns}.dlx");
    // The dead-letter exchange and a queue to look at, declared with raw lapin.
    let raw = Connection::connect(
        &RabbitConfig::from_env().url,
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = raw.create_channel().await.unwrap();
    ch.exchange_declare(
        dlx.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let dead = format!("{ns}.dead");
    ch.queue_declare(
        dead.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        dead.as_str().into(),
        dlx.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let t1 = transport(&ns, |c| c.dead_letter_exchange(dlx.clone())).await;
    let t2 = transport(&ns, |c| c.dead_letter_exchange(dlx.clone())).await;
    let h1 = host(&t1, "one", None);
    let h2 = host(&t2, "two", Some(h1.registry().clone()));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let m = h1
        .machine("m", "T")
        .handler(move |_, ev| {
            let _ = tx.send(ev.name().to_string());
        })
        .build()
        .await
        .unwrap();
    let sender = h2.machine("s", "T").build().await.unwrap();

    let garbage = b"\xc1 this is not MessagePack".to_vec();
    ch.basic_publish(
        format!("{ns}.machines").as_str().into(),
        "m".into(),
        BasicPublishOptions::default(),
        &garbage,
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    sender.send("m", "AFTER", ()).await.unwrap();
    let got = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got, "AFTER",
        "the consumer went on after the malformed message"
    );
    // The garbage and AFTER came over two connections: the broker may queue them in either
    // order, so the count is awaited rather than read once.
    until("the malformed message is counted", || m.stats().dropped > 0).await;
    assert_eq!(
        m.stats().dropped,
        1,
        "the malformed message is counted once"
    );
    let mut dead_letters = ch
        .basic_consume(
            dead.as_str().into(),
            "dead-letter-check".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let dead_letter = tokio::time::timeout(WAIT, dead_letters.next())
        .await
        .expect("the malformed message is dead-lettered")
        .expect("the consumer is open")
        .unwrap();
    assert_eq!(dead_letter.data, garbage);
    let _ = raw.close(200, "done".into()).await;
}

/// The broker routes each topic to exactly the patterns `TopicPattern::matches` accepts:
/// the translation of our wildcards into AMQP binding keys keeps their meaning.
#[tokio::test]
async fn wildcards_route_on_the_broker_as_they_match_here() {
    if !ready_for_tests() {
        return;
    }
    let ns = unique("sy-wild");
    let raw = Connection::connect(
        &RabbitConfig::from_env().url,
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = raw.create_channel().await.unwrap();
    let ex = format!("{ns}.topics");
    ch.exchange_declare(
        ex.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let patterns = [
        "a", "a.b", "a.*", "a.#", "#", "*", "*.b", "*.b.#", "a.#.z", "#.z", "a.*.c", "*.*",
    ];
    let topics = [
        "a", "b", "a.b", "a.c", "a.b.c", "x.b", "b", "a.z", "a.b.c.z", "z", "q.b.r.s", "a.x.c",
    ];
    let mut queues = Vec::new();
    for (i, p) in patterns.iter().enumerate() {
        let q = format!("{ns}.q{i}");
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        let key = names::binding_key(&TopicPattern::parse(p).unwrap()).unwrap();
        ch.queue_bind(
            q.as_str().into(),
            ex.as_str().into(),
            key,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        queues.push(q);
    }
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for t in topics {
        ch.basic_publish(
            ex.as_str().into(),
            names::topic_key(t).unwrap(),
            BasicPublishOptions::default(),
            t.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    // Every publish was confirmed, and the broker confirms a routed message once every queue
    // it goes to has it: what each queue holds now is all it will get.
    for (p, q) in patterns.iter().zip(&queues) {
        let pat = TopicPattern::parse(p).unwrap();
        let expected: Vec<&str> = topics.iter().copied().filter(|t| pat.matches(t)).collect();
        let mut got = Vec::new();
        while let Some(m) = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            got.push(String::from_utf8(m.delivery.data.clone()).unwrap());
        }
        assert_eq!(got, expected, "pattern {p}");
        assert!(
            ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
                .is_none(),
            "pattern {p}: nothing else"
        );
    }
    let _ = raw.close(200, "done".into()).await;
}

/// A connection the broker drops is restored: the supervisor reconnects, declares the
/// machine's queue again and consumes; sends made meanwhile wait and then go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_restored_and_sends_resume() {
    if !ready_for_tests() {
        return;
    }
    if std::process::Command::new("rabbitmqctl")
        .arg("--help")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI needs rabbitmqctl to drop a connection"
        );
        eprintln!("skipped: rabbitmqctl is not installed");
        return;
    }
    let ns = unique("sy-drop");
    let t1 = transport(&ns, |c| c).await;
    let t2 = transport(&ns, |c| c).await;
    let h1 = host(&t1, "one", None);
    let h2 = host(&t2, "two", Some(h1.registry().clone()));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _m = h1
        .machine("m", "T")
        .handler(move |_, ev| {
            let _ = tx.send(ev.data::<u32>().unwrap());
        })
        .build()
        .await
        .unwrap();
    let s = h2.machine("s", "T").build().await.unwrap();
    s.send("m", "N", 0u32).await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, rx.recv()).await.unwrap(),
        Some(0)
    );
    // Close the receiver's connection (only ours: it is named after the namespace).
    close_connections_named(&format!("switchyard {ns}"));
    for i in 1..=20u32 {
        s.send("m", "N", i).await.unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 20 {
        let v = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("events arrive after the reconnection")
            .unwrap();
        seen.insert(v);
    }
    assert_eq!(seen, (1..=20).collect());
    assert!(t1.is_connected() && t2.is_connected());
}

/// Closes this namespace's connections through `rabbitmqctl` (by their client-given name).
fn close_connections_named(name: &str) {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "--no-table-headers",
            "-q",
        ])
        .output()
        .expect("rabbitmqctl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text.lines() {
        let mut parts = line.splitn(2, '\t');
        let (Some(pid), Some(props)) = (parts.next(), parts.next()) else {
            continue;
        };
        // The client properties hold `{"connection_name","switchyard ns"}`.
        if props.contains(&format!("{{\"connection_name\",\"{name}\"}}")) {
            let ok = std::process::Command::new("rabbitmqctl")
                .args(["close_connection", pid.trim(), "test: connection dropped"])
                .output()
                .expect("rabbitmqctl runs")
                .status
                .success();
            closed += usize::from(ok);
        }
    }
    assert!(closed >= 1, "found our connections in: {text}");
}
