//! The zeromq crate's PUB socket while subscribers keep changing their subscriptions.
//!
//! zeromq 0.7.0 walks its subscriber map with `begin_async`/`next_async` when it fans a
//! message out, and takes the same map's bucket locks with `get_sync` when a subscribe or
//! unsubscribe arrives. A task waiting for a bucket lock can be handed it while it is not
//! running; a worker thread that then blocks in `get_sync` on that bucket waits for a task
//! that may only run on that very thread. With every worker blocked the runtime stops (seen
//! in the conformance suite on 2 cores: both workers parked in `message_received`). The
//! workspace patches the crate (vendor/zeromq, see its PATCHES.md); this test runs the
//! pattern that stopped the runtime, on a runtime of its own, and fails if it does not end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use zeromq::prelude::*;
use zeromq::{PubSocket, SubSocket, ZmqMessage};

const SUBSCRIBERS: usize = 4;
const ROUNDS: usize = 20_000;

async fn churn() {
    let mut publisher = PubSocket::new();
    let endpoint = publisher
        .bind("tcp://127.0.0.1:0")
        .await
        .expect("PUB binds on loopback")
        .to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let pub_task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = publisher
                    .send(ZmqMessage::from(format!("t.{}", n % 7)))
                    .await;
                n += 1;
                if n.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            n
        })
    };
    let mut subs = Vec::new();
    for i in 0..SUBSCRIBERS {
        let endpoint = endpoint.clone();
        subs.push(tokio::spawn(async move {
            let mut s = SubSocket::new();
            s.connect(&endpoint).await.expect("SUB connects");
            for r in 0..ROUNDS {
                let prefix = format!("t.{}", (i + r) % 7);
                s.subscribe(&prefix).await.expect("subscribe");
                s.unsubscribe(&prefix).await.expect("unsubscribe");
            }
        }));
    }
    for s in subs {
        s.await.expect("a subscriber task ends");
    }
    stop.store(true, Ordering::Relaxed);
    let sent = pub_task.await.expect("the publisher ends");
    assert!(sent > 0, "the publisher ran");
}

#[test]
fn a_pub_socket_survives_subscribers_that_keep_changing() {
    let (done_tx, done) = mpsc::channel();
    // Threads that only spin: the workers get preempted while they hold a map lock, which
    // is what opened the window on a loaded 2-core machine.
    let spinning = Arc::new(AtomicBool::new(true));
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let spinning = spinning.clone();
            std::thread::spawn(move || {
                while spinning.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    // The runtime runs on a thread of its own: if its workers stop, this thread can still
    // tell (a tokio timeout could not fire with every worker blocked).
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        for _ in 0..5 {
            rt.block_on(churn());
        }
        let _ = done_tx.send(());
    });
    let finished = done.recv_timeout(Duration::from_secs(120));
    spinning.store(false, Ordering::Relaxed);
    for s in spinners {
        let _ = s.join();
    }
    finished.expect("PUB fan-out and subscription changes finish (the runtime did not stop)");
}
