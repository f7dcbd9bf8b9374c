//! The link to one machine: publishes on the machines exchange, confirmed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation};
use switchyard_core::{Envelope, Error, Link, MachineId, Outgoing, Result};

/// A resolved way to one machine: its routing key on the machines exchange.
pub(crate) struct RabbitLink {
    pub(crate) shared: Arc<Shared>,
    pub(crate) to: MachineId,
    pub(crate) key: ShortString,
}

use crate::{NAME, Shared, lock, nacked, wire};

impl RabbitLink {
    pub(crate) fn props(&self, headers: &switchyard_core::Headers) -> BasicProperties {
        let sh = &self.shared;
        let reply = headers
            .reply_to
            .as_ref()
            .and_then(|m| sh.names.machine_queue(m.as_str()).ok());
        wire::properties(headers, sh.durable(), sh.cfg.max_priority, reply)
    }
}

/// Puts published-but-unconfirmed events back in front of `out`, in order.
pub(crate) fn give_back(out: &mut dyn Outgoing, bodies: Vec<Vec<u8>>) {
    for body in bodies.into_iter().rev() {
        if let Ok(env) = Envelope::decode(&body) {
            out.push_front(env);
        }
    }
}

#[async_trait]
impl Link for RabbitLink {
    async fn send(&self, out: &mut dyn Outgoing) -> Result<()> {
        let sh = &self.shared;
        let deadline = sh.deadline();
        let mut scratch = Vec::new();
        while !out.is_empty() {
            let live = sh.wait_live(deadline).await?;
            let mut inflight: VecDeque<(Vec<u8>, lapin::PublisherConfirm)> = VecDeque::new();
            let mut lost = false;
            let mut failed: Option<Error> = None;
            while inflight.len() < sh.cfg.confirm_window {
                let Some(ev) = out.front() else { break };
                let body = match ev.encode(&mut scratch) {
                    Ok(b) => b,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                };
                if body.len() > sh.cfg.max_message {
                    failed = Some(Error::TooLarge {
                        transport: NAME,
                        size: body.len(),
                        limit: sh.cfg.max_message,
                    });
                    break;
                }
                let props = self.props(ev.headers);
                let sent = {
                    let publish = live.publish.basic_publish(
                        sh.names.machines.clone(),
                        self.key.clone(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &body,
                        props,
                    );
                    let mut publish = std::pin::pin!(publish);
                    // lapin queues the frames on the first poll: from then on the event is on its
                    // way, so it leaves `out` before anything can cancel this future.
                    let first =
                        std::future::poll_fn(|cx| Poll::Ready(publish.as_mut().poll(cx))).await;
                    match first {
                        Poll::Ready(Err(e)) => Err(e),
                        Poll::Ready(Ok(c)) => {
                            out.advance();
                            Ok(c)
                        }
                        Poll::Pending => {
                            out.advance();
                            match publish.await {
                                Ok(c) => Ok(c),
                                Err(e) => {
                                    give_back(out, vec![body.clone()]);
                                    Err(e)
                                }
                            }
                        }
                    }
                };
                match sent {
                    Ok(c) => inflight.push_back((body, c)),
                    Err(e) => {
                        lock(&sh.last_error).replace(e.to_string());
                        lost = true;
                        break;
                    }
                }
            }
            while let Some((body, confirm)) = inflight.pop_front() {
                let err = match confirm.await {
                    Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => continue,
                    Ok(Confirmation::Ack(Some(_))) | Ok(Confirmation::Nack(Some(_))) => {
                        Some(Error::TargetGone(self.to.clone()))
                    }
                    Ok(Confirmation::Nack(None)) => Some(nacked()),
                    Err(e) => {
                        lock(&sh.last_error).replace(e.to_string());
                        None
                    }
                };
                let mut bodies = vec![body];
                bodies.extend(inflight.drain(..).map(|(b, _)| b));
                give_back(out, bodies);
                match err {
                    Some(e) => return Err(e),
                    None => {
                        lost = true;
                        break;
                    }
                }
            }
            if lost && !inflight.is_empty() {
                give_back(out, inflight.drain(..).map(|(b, _)| b).collect());
            }
            if let Some(e) = failed {
                return Err(e);
            }
            if lost {
                if tokio::time::Instant::now() >= deadline {
                    return Err(Error::Transport {
                        transport: NAME,
                        reason: format!(
                            "lost the connection to RabbitMQ at {} and it did not come back within {:?}",
                            sh.cfg.redacted_url(),
                            sh.cfg.outage_wait
                        ),
                        retryable: true,
                    });
                }
                // Publish again on the restored connection (the broker may have some: at least once).
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(())
    }

    fn is_open(&self) -> bool {
        !self.shared.closed.load(Ordering::Acquire)
    }
}
