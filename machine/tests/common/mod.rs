//! Helpers shared by the Node-bound tests.

#![allow(dead_code)]

use std::time::Duration;

use switchyard::{Envelope, Node, Session};
use switchyard_machine::StateChange;
use tokio::sync::mpsc;

/// How long a test waits for something before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A session whose only transport is `direct` (every machine must share one context).
pub fn direct_session() -> Session {
    switchyard::builder()
        .selector(|s| s.without(["memory"]))
        .build()
        .expect("session builds")
}

/// A session whose only transport is `memory`.
pub fn memory_session() -> Session {
    switchyard::builder()
        .selector(|s| s.without(["direct"]))
        .build()
        .expect("session builds")
}

/// Published state changes seen by an observer node.
pub struct Observer {
    pub node: Node,
    rx: mpsc::UnboundedReceiver<(String, StateChange)>,
}

impl Observer {
    /// An observer machine subscribed to `pattern` (e.g. `state.light.#`).
    pub async fn new(session: &Session, id: &str, pattern: &str) -> Observer {
        let (tx, rx) = mpsc::unbounded_channel();
        let node = session
            .machine(id, "Observer")
            .handler(move |_n: &Node, env: Envelope| {
                let change: StateChange = env.data().expect("a StateChange");
                assert_eq!(
                    env.name(),
                    format!("state.{}.{}", change.machine, change.state)
                );
                let _ = tx.send((env.name().to_owned(), change));
            })
            .build()
            .await
            .expect("observer builds");
        node.subscribe(pattern).await.expect("subscribe");
        Observer { node, rx }
    }

    /// The next published change; fails the test after [`WAIT`].
    pub async fn next(&mut self) -> (String, StateChange) {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("a state change within the wait")
            .expect("observer alive")
    }

    /// Waits for a topic, returning the topics seen before it (inclusive).
    pub async fn until(&mut self, topic: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let (t, _) = self.next().await;
            seen.push(t.clone());
            if t == topic {
                return seen;
            }
        }
    }
}

/// Awaits `fut`, failing the test after [`WAIT`].
pub async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .expect("finished within the wait")
}
