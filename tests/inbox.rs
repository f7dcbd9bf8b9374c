//! What every transport can rely on when it delivers: `Inbox::deliver_tracked` completes only
//! once the handler has run, so a broker transport acknowledges after the handler returned.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use switchyard::transport::{
    Capabilities, DeliveryGuarantee, Inbox, Link, MessageOrdering, Outgoing, Transport,
    TransportHealth,
};
use switchyard::{Address, Envelope, Error, Location, MachineEntry, MachineId, Result};

/// Keeps the inboxes it is given, and links to nothing.
struct Keeper {
    caps: Capabilities,
    inboxes: Mutex<Vec<Inbox>>,
}

struct NoLink;

#[async_trait]
impl Link for NoLink {
    async fn send(&self, _: &mut dyn Outgoing) -> Result<()> {
        Err(Error::Closed("keeper"))
    }
}

#[async_trait]
impl Transport for Keeper {
    fn name(&self) -> &'static str {
        "keeper"
    }
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    async fn bind(&self, _: &MachineEntry, inbox: Inbox) -> Result<()> {
        self.inboxes.lock().unwrap().push(inbox);
        Ok(())
    }
    async fn unbind(&self, _: &MachineId) -> Result<()> {
        Ok(())
    }
    async fn link(&self, _: &MachineEntry) -> Result<Arc<dyn Link>> {
        Ok(Arc::new(NoLink))
    }
    fn health(&self) -> TransportHealth {
        TransportHealth::default()
    }
    fn close(&self) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_tracked_completes_once_an_async_handler_has_run() {
    let keeper = Arc::new(Keeper {
        caps: Capabilities {
            locations: vec![Location::Remote],
            ordering: MessageOrdering::PerSenderReceiver,
            delivery: DeliveryGuarantee::AtLeastOnce,
            max_message_size: None,
            serializes: true,
            topics: false,
            groups: false,
            request: true,
            mailboxes: false,
            priority: false,
        },
        inboxes: Mutex::new(Vec::new()),
    });
    let s = switchyard::builder()
        .transport(keeper.clone())
        .build()
        .unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (tx, mut ran) = tokio::sync::mpsc::unbounded_channel::<u32>();
    let g = gate.clone();
    s.machine("slow", "Slow")
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
    let inbox = keeper.inboxes.lock().unwrap()[0].clone();
    let env = |i: u32| {
        Envelope::new(
            i.into(),
            "remote".into(),
            Address::Machine("slow".into()),
            "E".into(),
            switchyard::Payload::new(i),
        )
    };
    let mut acked = Box::pin(inbox.deliver_tracked(env(1)).await.unwrap());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut acked)
            .await
            .is_err(),
        "not acknowledged while the handler waits"
    );
    gate.add_permits(1);
    tokio::time::timeout(Duration::from_secs(10), acked)
        .await
        .expect("acknowledged once the handler ran");
    assert_eq!(ran.recv().await, Some(1));
}
