//! The conformance suite over the same-thread `direct` transport.
mod conformance;
conformance_suite!(conformance::Fixture::direct());

/// SEMANTICS.md, direct / full mailbox: the run-to-completion queue is bounded; a
/// re-entrant send past its bound is `Error::QueueFull` to the handler that made it, and
/// what was queued before still runs, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_to_completion_queue_is_bounded() {
    use std::sync::{Arc, Mutex};
    use switchyard::Error;
    let s = switchyard::builder()
        .selector(|sel| {
            sel.without(["direct", "memory"]).transport(Arc::new(
                switchyard::direct::DirectTransport::with_capacity(4),
            ))
        })
        .build()
        .unwrap();
    let ctx = s.context();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let results = Arc::new(Mutex::new(Vec::new()));
    let (seen2, results2) = (seen.clone(), results.clone());
    let _b = s
        .machine("b", "T")
        .context(ctx)
        .handler(move |node, ev| {
            let n: u32 = ev.data().unwrap();
            seen2.lock().unwrap().push(n);
            if n == 0 {
                // Re-entrant: b is running, so these wait on the context's queue (bound 4).
                for i in 1..=6u32 {
                    results2.lock().unwrap().push(node.post("b", "E", i));
                }
            }
        })
        .build()
        .await
        .unwrap();
    let a = s.machine("a", "T").context(ctx).build().await.unwrap();
    a.send("b", "E", 0u32).await.unwrap();
    let results = results.lock().unwrap();
    assert!(results[..4].iter().all(|r| r.is_ok()), "{results:?}");
    assert!(
        results[4..]
            .iter()
            .all(|r| matches!(r, Err(Error::QueueFull { capacity: 4, .. }))),
        "{results:?}"
    );
    assert_eq!(*seen.lock().unwrap(), vec![0, 1, 2, 3, 4]);
}
