//! Waiting for a state that no event announces (a counter of the receiving side, a key that
//! expires, a server's answer): a bounded poll, for tests that have nothing else to await.
#![allow(dead_code)]

use std::time::Duration;

/// How long a condition may take before the test fails.
pub const LIMIT: Duration = Duration::from_secs(10);

/// Waits until `cond` holds; fails the test after [`LIMIT`], naming `what`.
pub async fn until(what: &str, cond: impl Fn() -> bool) {
    eventually(what, || std::future::ready(cond())).await
}

/// Waits until the asynchronous `cond` holds; fails the test after [`LIMIT`], naming `what`.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
