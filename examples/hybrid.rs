//! Two machines on the selector: one on the same thread as the sender, one elsewhere in the process.
//!
//! Run: `cargo run --example hybrid`

use std::time::Duration;

use switchyard::{Envelope, Node};

#[tokio::main]
async fn main() -> switchyard::Result<()> {
    let session = switchyard::builder().build()?;
    let ui_thread = session.context();

    let report = |who: &'static str| {
        move |node: &Node, ev: Envelope| {
            println!(
                "{who:<8} got {:<6} from {:<10} carried by {}",
                ev.name(),
                ev.source,
                ev.carried_by.unwrap_or("?")
            );
            if ev.headers.correlation_id.is_some() {
                let _ = node.post_reply(&ev, "ACK", ());
            }
        }
    };

    // Pinned to the same single-threaded context as the controller: SameThread.
    let display = session
        .machine("display", "Display")
        .context(ui_thread)
        .handler(report("display"))
        .build()
        .await?;
    // Not pinned: SameProcess.
    let worker = session
        .machine("worker", "Worker")
        .handler(report("worker"))
        .build()
        .await?;
    let controller = session
        .machine("controller", "Controller")
        .context(ui_thread)
        .build()
        .await?;

    for target in [display.id(), worker.id()] {
        let (_, location) = controller.locate(target).await?;
        let reply = controller
            .request(target.clone(), "UPDATE", 42u32, Duration::from_secs(1))
            .await?;
        println!(
            "controller -> {target:<8} location {location:?}, reply {} carried by {}",
            reply.name(),
            reply.carried_by.unwrap_or("?")
        );
    }
    Ok(())
}
