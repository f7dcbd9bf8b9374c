//! The conformance suite over the ipc transport through the bus daemon.
#![cfg(feature = "ipc")]
mod conformance;
conformance_suite!(conformance::Fixture::ipc_bus());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reaches_near_and_far_subscribers_once() {
    conformance::publish_reaches_near_and_far_subscribers_once(false).await;
}
