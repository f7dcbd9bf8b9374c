//! Durable mode across a broker restart, and a killed consumer's unacknowledged events.
//!
//! These tests restart the shared broker's application (`rabbitmqctl stop_app` /
//! `start_app`), which every connection to it notices: they live in a test binary of
//! their own and run one after the other (cargo runs test binaries one at a time).
#![cfg(feature = "rabbitmq")]

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard::rabbitmq::{Mode, RabbitConfig, RabbitTransport, ready_for_tests};
use switchyard::transport::Transport;
use switchyard::{Location, Registry, Session};
use tokio::sync::Notify;

/// One test at a time in this binary: they restart the broker.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rabbitmqctl(args: &[&str]) -> bool {
    Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn can_restart() -> bool {
    if rabbitmqctl(&["status", "-q"]) {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI needs rabbitmqctl to restart the broker"
    );
    eprintln!("skipped: rabbitmqctl cannot control the broker here");
    false
}

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

fn durable(ns: &str) -> RabbitConfig {
    RabbitConfig::from_env()
        .namespace(ns)
        .mode(Mode::Durable)
        .outage_wait(Duration::from_secs(60))
}

/// 10,000 events in durable mode with the broker restarted in the middle: every one is
/// delivered at least once, none is lost; duplicates are counted and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_mode_loses_nothing_across_a_broker_restart() {
    if !ready_for_tests() || !can_restart() {
        return;
    }
    let _serial = SERIAL.lock().await;
    const N: u32 = 10_000;
    let ns = format!("sy-durable-{}", std::process::id());
    let t1 = RabbitTransport::connect(durable(&ns)).await.unwrap();
    let t2 = RabbitTransport::connect(durable(&ns)).await.unwrap();
    let h1 = host(&t1, "one", None);
    let h2 = host(&t2, "two", Some(h1.registry().clone()));
    let counts: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let all = Arc::new(Notify::new());
    let (c, a) = (counts.clone(), all.clone());
    let _m = h1
        .machine("sink", "Sink")
        .handler(move |_, ev| {
            let v: u32 = ev.data().unwrap();
            let mut c = c.lock().unwrap();
            *c.entry(v).or_default() += 1;
            if c.len() == N as usize {
                a.notify_one();
            }
        })
        .build()
        .await
        .unwrap();
    let s = h2.machine("source", "Source").build().await.unwrap();
    let to_sink = s.sender("sink").await.unwrap();
    for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
        if chunk[0] == N / 2 {
            assert!(rabbitmqctl(&["stop_app"]), "the broker stops");
            // Sends wait for the broker (outage_wait); start it again from another thread.
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_secs(1));
                assert!(rabbitmqctl(&["start_app"]), "the broker starts again");
            });
        }
        s.send_batch("sink", chunk.iter().map(|v| ("N", *v)))
            .await
            .expect("sends go through, waiting out the restart");
    }
    let _ = to_sink;
    tokio::time::timeout(Duration::from_secs(120), all.notified())
        .await
        .unwrap_or_else(|_| {
            let c = counts.lock().unwrap();
            panic!("only {} of {N} distinct events arrived", c.len())
        });
    let c = counts.lock().unwrap();
    let duplicates: u32 = c.values().map(|n| n - 1).sum();
    assert_eq!(c.len(), N as usize, "every event arrived");
    eprintln!("durable restart: {N} events, all delivered, {duplicates} duplicates");
    println!("durable restart: {N} events, all delivered, {duplicates} duplicates");
}

/// A consumer killed before acknowledging: the group's unacknowledged events go to
/// another member. The first member's handler does not return (it stands for a process
/// that hangs and is killed), then its connection goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_killed_consumers_unacked_events_go_to_another_member() {
    if !ready_for_tests() || !can_restart() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let ns = format!("sy-killed-{}", std::process::id());
    let cfg = |ns: &str| RabbitConfig::from_env().namespace(ns).prefetch(10);
    let t1 = RabbitTransport::connect(cfg(&ns)).await.unwrap();
    let h1 = host(&t1, "one", None);
    let stuck = Arc::new(Notify::new());
    let st = stuck.clone();
    // A synchronous handler runs on the consumer's task and is acknowledged after it
    // returns: this one hangs until the end of the test, holding the events unacknowledged.
    let (release, hang) = std::sync::mpsc::channel::<()>();
    let hang = Mutex::new(hang);
    let victim = h1
        .machine("victim", "Worker")
        .handler(move |_, _| {
            st.notify_one();
            let _ = hang.lock().unwrap().recv_timeout(Duration::from_secs(60));
        })
        .build()
        .await
        .unwrap();
    victim.join_group("jobs").await.unwrap();
    let t2 = RabbitTransport::connect(cfg(&ns)).await.unwrap();
    let h2 = host(&t2, "two", Some(h1.registry().clone()));
    let p = h2.machine("producer", "P").build().await.unwrap();
    // Only the victim is a member: it takes the events (up to its prefetch) and hangs.
    for i in 0..5u32 {
        assert_eq!(p.publish_to_group("jobs", "JOB", i).await.unwrap(), 1);
    }
    tokio::time::timeout(Duration::from_secs(10), stuck.notified())
        .await
        .unwrap();
    let got: Arc<Mutex<Vec<u32>>> = Arc::default();
    let done = Arc::new(Notify::new());
    let (g, d) = (got.clone(), done.clone());
    let t3 = RabbitTransport::connect(cfg(&ns)).await.unwrap();
    let h3 = host(&t3, "three", Some(h1.registry().clone()));
    let heir = h3
        .machine("heir", "Worker")
        .handler(move |_, ev| {
            let mut g = g.lock().unwrap();
            g.push(ev.data().unwrap());
            if g.len() == 5 {
                d.notify_one();
            }
        })
        .build()
        .await
        .unwrap();
    heir.join_group("jobs").await.unwrap();
    // Kill the victim's consumer the way a dying process does: its connection goes away
    // without acknowledging anything.
    t1.close();
    drop(h1);
    tokio::time::timeout(Duration::from_secs(20), done.notified())
        .await
        .unwrap_or_else(|_| panic!("the heir got {:?}", got.lock().unwrap()));
    let mut g = got.lock().unwrap().clone();
    g.sort();
    assert_eq!(
        g,
        vec![0, 1, 2, 3, 4],
        "every unacknowledged event was redelivered"
    );
    let _ = release.send(());
}
