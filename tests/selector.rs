//! The selector: location → transports, fallback on retryable failures only, per-machine overrides.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use switchyard::transport::{
    Capabilities, DeliveryGuarantee, Inbox, Link, MessageOrdering, Outgoing, Transport,
    TransportHealth,
};
use switchyard::{Envelope, Error, Location, MachineEntry, MachineId, Node, Result};
use tokio::sync::mpsc;

/// A transport that reaches every location and fails every send, retryably or not.
struct Failing {
    retryable: bool,
    attempts: Arc<AtomicUsize>,
    caps: Capabilities,
}

impl Failing {
    fn new(retryable: bool) -> Arc<Failing> {
        Arc::new(Failing {
            retryable,
            attempts: Arc::new(AtomicUsize::new(0)),
            caps: Capabilities {
                locations: Location::ALL.to_vec(),
                ordering: MessageOrdering::Unordered,
                delivery: DeliveryGuarantee::AtMostOnce,
                max_message_size: None,
                serializes: false,
                topics: false,
                groups: false,
                request: false,
                mailboxes: false,
                priority: false,
            },
        })
    }
}

struct FailingLink {
    retryable: bool,
    attempts: Arc<AtomicUsize>,
}

#[async_trait]
impl Link for FailingLink {
    async fn send(&self, _out: &mut dyn Outgoing) -> Result<()> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        Err(Error::Transport {
            transport: "failing",
            reason: "link down (test)".into(),
            retryable: self.retryable,
        })
    }
}

#[async_trait]
impl Transport for Failing {
    fn name(&self) -> &'static str {
        "failing"
    }
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    async fn bind(&self, _: &MachineEntry, _: Inbox) -> Result<()> {
        Ok(())
    }
    async fn unbind(&self, _: &MachineId) -> Result<()> {
        Ok(())
    }
    async fn link(&self, _: &MachineEntry) -> Result<Arc<dyn Link>> {
        Ok(Arc::new(FailingLink {
            retryable: self.retryable,
            attempts: self.attempts.clone(),
        }))
    }
    fn health(&self) -> TransportHealth {
        TransportHealth::default()
    }
    fn close(&self) {}
}

async fn recorder(s: &switchyard::Session, id: &str) -> mpsc::UnboundedReceiver<Envelope> {
    let (tx, rx) = mpsc::unbounded_channel();
    s.machine(id, "T")
        .handler(move |_, ev| {
            let _ = tx.send(ev);
        })
        .build()
        .await
        .unwrap();
    rx
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Envelope>) -> Envelope {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap()
}

/// A session that tries `failing` before memory in process, with machines `a` (returned) and
/// `b` (its events in the receiver).
async fn failing_then_memory(
    failing: &Arc<Failing>,
) -> (switchyard::Session, Node, mpsc::UnboundedReceiver<Envelope>) {
    let s = switchyard::builder()
        .selector(|sel| {
            sel.transport(failing.clone())
                .prefer(Location::SameProcess, ["failing", "memory"])
        })
        .build()
        .unwrap();
    let rb = recorder(&s, "b").await;
    let a = s.machine("a", "T").build().await.unwrap();
    (s, a, rb)
}

#[tokio::test]
async fn falls_back_to_the_next_transport_on_a_retryable_failure() {
    let failing = Failing::new(true);
    let (_s, a, mut rb) = failing_then_memory(&failing).await;
    a.send("b", "X", 1u8).await.unwrap();
    assert_eq!(next(&mut rb).await.carried_by, Some("memory"));
    assert_eq!(
        failing.attempts.load(Ordering::SeqCst),
        1,
        "the preferred transport was tried first"
    );
}

#[tokio::test]
async fn a_permanent_failure_is_returned_not_masked() {
    let failing = Failing::new(false);
    let (_s, a, _rb) = failing_then_memory(&failing).await;
    let err = a.send("b", "X", 1u8).await.unwrap_err();
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
}

#[tokio::test]
async fn a_batch_falls_back_whole_and_in_order() {
    let failing = Failing::new(true);
    let (_s, a, mut rb) = failing_then_memory(&failing).await;
    a.send_batch("b", (0..5u8).map(|i| ("X", i))).await.unwrap();
    for i in 0..5u8 {
        let ev = next(&mut rb).await;
        assert_eq!(
            (ev.data::<u8>().unwrap(), ev.carried_by),
            (i, Some("memory"))
        );
    }
    assert_eq!(
        failing.attempts.load(Ordering::SeqCst),
        1,
        "the first failure moved the whole batch on"
    );
}

#[tokio::test]
async fn a_batch_stops_at_a_permanent_failure() {
    let failing = Failing::new(false);
    let (_s, a, mut rb) = failing_then_memory(&failing).await;
    let err = a
        .send_batch("b", (0..5u8).map(|i| ("X", i)))
        .await
        .unwrap_err();
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
    assert!(
        rb.try_recv().is_err(),
        "nothing went through another transport"
    );
}

#[tokio::test]
async fn per_machine_overrides_pick_the_transport_and_the_location() {
    let s = switchyard::builder()
        .selector(|sel| {
            sel.force_transports("pinned", ["memory"])
                .force_location("far", Location::Remote)
        })
        .build()
        .unwrap();
    let ctx = s.context();
    let a = s.machine("a", "T").context(ctx).build().await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    for id in ["near", "pinned"] {
        let tx = tx.clone();
        s.machine(id, "T")
            .context(ctx)
            .handler(move |_, ev| {
                let _ = tx.send(ev);
            })
            .build()
            .await
            .unwrap();
    }
    s.machine("far", "T").build().await.unwrap();
    a.send("near", "X", ()).await.unwrap();
    assert_eq!(
        next(&mut rx).await.carried_by,
        Some("direct"),
        "same context goes direct"
    );
    a.send("pinned", "X", ()).await.unwrap();
    assert_eq!(
        next(&mut rx).await.carried_by,
        Some("memory"),
        "the override wins over the location"
    );
    let (_, loc) = a.locate(&MachineId::from("far")).await.unwrap();
    assert_eq!(loc, Location::Remote);
    assert!(
        matches!(
            a.send("far", "X", ()).await,
            Err(Error::NoTransport {
                location: Location::Remote,
                ..
            })
        ),
        "no enabled transport reaches a remote machine"
    );
}

#[tokio::test]
async fn location_follows_host_process_and_context() {
    let s = switchyard::builder().build().unwrap();
    let ctx = s.context();
    let a = s.machine("a", "T").context(ctx).build().await.unwrap();
    let same_thread = s.machine("st", "T").context(ctx).build().await.unwrap();
    let other_ctx = s
        .machine("sp", "T")
        .context(s.context())
        .build()
        .await
        .unwrap();
    let mut other_process = a.entry().clone();
    other_process.process_id = "another-process".into();
    let mut other_host = a.entry().clone();
    other_host.host_id = "another-host".into();
    assert_eq!(
        Location::between(a.entry(), same_thread.entry()),
        Location::SameThread
    );
    assert_eq!(
        Location::between(a.entry(), other_ctx.entry()),
        Location::SameProcess
    );
    assert_eq!(
        Location::between(a.entry(), &other_process),
        Location::SameMachine
    );
    assert_eq!(Location::between(a.entry(), &other_host), Location::Remote);
}

#[tokio::test]
async fn removing_a_transport_by_configuration() {
    let s = switchyard::builder()
        .selector(|sel| sel.without(["direct"]))
        .build()
        .unwrap();
    let names: Vec<_> = s.router().transports().iter().map(|t| t.name()).collect();
    assert!(!names.contains(&"direct"));
    let ctx = s.context();
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.machine("b", "T")
        .context(ctx)
        .handler(move |_, ev| {
            let _ = tx.send(ev);
        })
        .build()
        .await
        .unwrap();
    let a = s.machine("a", "T").context(ctx).build().await.unwrap();
    a.send("b", "X", ()).await.unwrap();
    assert_eq!(
        next(&mut rx).await.carried_by,
        Some("memory"),
        "memory also reaches same-thread machines"
    );
}

#[tokio::test]
async fn a_preference_naming_an_unknown_transport_fails_the_build() {
    let err = switchyard::builder()
        .selector(|sel| sel.prefer(Location::SameProcess, ["memroy"]))
        .build()
        .expect_err("a misspelt transport name is an error");
    assert!(
        matches!(&err, Error::Config(m) if m.contains("memroy") && m.contains("memory")),
        "the error names the bad name and the configured ones: {err}"
    );
}

/// A transport that reaches every location and takes every event except those named
/// `BIG`, which are too large for it (a failure of one event, not of the transport).
struct Picky {
    caps: Capabilities,
    inboxes: std::sync::Mutex<std::collections::HashMap<MachineId, Inbox>>,
}

struct PickyLink(Inbox);

#[async_trait]
impl Link for PickyLink {
    async fn send(&self, out: &mut dyn Outgoing) -> Result<()> {
        while let Some(ev) = out.front() {
            if ev.event == "BIG" {
                return Err(Error::TooLarge {
                    transport: "picky",
                    size: 1 << 20,
                    limit: 1024,
                });
            }
            let env = out.pop_by("picky").expect("an event is there");
            self.0.deliver(env).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Transport for Picky {
    fn name(&self) -> &'static str {
        "picky"
    }
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    async fn bind(&self, e: &MachineEntry, inbox: Inbox) -> Result<()> {
        self.inboxes.lock().unwrap().insert(e.id.clone(), inbox);
        Ok(())
    }
    async fn unbind(&self, id: &MachineId) -> Result<()> {
        self.inboxes.lock().unwrap().remove(id);
        Ok(())
    }
    async fn link(&self, to: &MachineEntry) -> Result<Arc<dyn Link>> {
        let inbox = self.inboxes.lock().unwrap().get(&to.id).cloned();
        let inbox = inbox.ok_or_else(|| Error::TargetGone(to.id.clone()))?;
        Ok(Arc::new(PickyLink(inbox)))
    }
    fn health(&self) -> TransportHealth {
        TransportHealth::default()
    }
    fn close(&self) {}
}

/// One rule for single sends and batches: a failure of one event is the caller's (no
/// fallback, which would let it overtake the events before it), and a batch stops at it.
#[tokio::test]
async fn an_event_one_transport_cannot_carry_does_not_fall_back() {
    let mut caps = Failing::new(false).caps.clone();
    caps.ordering = MessageOrdering::PerSenderReceiver;
    let picky = Arc::new(Picky {
        caps,
        inboxes: Default::default(),
    });
    let s = switchyard::builder()
        .selector(|sel| {
            sel.transport(picky.clone())
                .prefer(Location::SameProcess, ["picky", "memory"])
        })
        .build()
        .unwrap();
    let mut rb = recorder(&s, "b").await;
    let a = s.machine("a", "T").build().await.unwrap();
    let err = a.send("b", "BIG", ()).await.unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    let err = a
        .send_batch("b", [("S1", 1u8), ("S2", 2), ("BIG", 3), ("S3", 4)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    for name in ["S1", "S2"] {
        let ev = next(&mut rb).await;
        assert_eq!((ev.name(), ev.carried_by), (name, Some("picky")));
    }
    a.send("b", "AFTER", ()).await.unwrap();
    let ev = next(&mut rb).await;
    assert_eq!(
        ev.name(),
        "AFTER",
        "neither BIG nor what came after it went another way"
    );
}
