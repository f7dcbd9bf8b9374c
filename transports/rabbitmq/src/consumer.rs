//! Consumers: decode each delivery, hand it to its machine, subscriber or group member,
//! and acknowledge once that returned.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use switchyard_core::{
    Address, Envelope, Error, Filter, Inbox, Location, MachineEntry, MachineId, Reach,
};

use crate::{Shared, TopicSub, lock, wire};

/// Where a consumer's deliveries go.
pub(crate) enum Target {
    /// One machine's queue.
    Machine(Inbox),
    /// The session queue: every topic subscription of the session.
    Topics,
    /// A group queue: one member.
    Group(Inbox, Option<Filter>),
}

/// Acks sent together: all deliveries up to the last one handled.
pub(crate) const ACK_BATCH: usize = 64;

/// Runs one consumer: decodes, delivers, then acknowledges (several at once when more are
/// waiting). Ends when the consumer is cancelled or its channel or connection closes;
/// what it had not acknowledged goes back to the queue.
pub(crate) async fn consume(mut consumer: Consumer, shared: Weak<Shared>, target: Target) {
    let mut last: Option<Delivery> = None;
    let mut unacked = 0usize;
    loop {
        let next = match consumer.next().now_or_never() {
            Some(n) => n,
            None => {
                if let Some(d) = last.take() {
                    ack_upto(&d).await;
                    unacked = 0;
                }
                consumer.next().await
            }
        };
        let d = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "RabbitMQ consumer ended");
                break;
            }
            None => break,
        };
        let Some(sh) = shared.upgrade() else { break };
        if sh.closed.load(Ordering::Acquire) {
            break;
        }
        let keep = match &target {
            Target::Machine(inbox) => deliver_one(&sh, &d, inbox, None).await,
            Target::Group(inbox, filter) => deliver_one(&sh, &d, inbox, filter.as_ref()).await,
            Target::Topics => deliver_topic(&sh, &d).await,
        };
        drop(sh);
        match keep {
            Handled::AckWhen(done) => {
                // An async handler runs on its machine's task: acknowledge this one alone once
                // it has run, and keep reading (it may wait for a reply that comes this way).
                // Earlier deliveries are acknowledged first, so a later batch never covers it.
                if let Some(d) = last.take() {
                    ack_upto(&d).await;
                    unacked = 0;
                }
                tokio::spawn(async move {
                    done.await;
                    let _ = d.acker.ack(BasicAckOptions { multiple: false }).await;
                });
                continue;
            }
            Handled::Ack => {
                last = Some(d);
                unacked += 1;
                if unacked >= ACK_BATCH
                    && let Some(d) = last.take()
                {
                    ack_upto(&d).await;
                    unacked = 0;
                }
            }
            Handled::Reject => {
                let _ = d.acker.reject(BasicRejectOptions { requeue: false }).await;
            }
            Handled::Requeue => {
                let _ = d
                    .acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await;
                break;
            }
        }
    }
    if let Some(d) = last.take() {
        ack_upto(&d).await;
    }
}

pub(crate) async fn ack_upto(d: &Delivery) {
    let _ = d.acker.ack(BasicAckOptions { multiple: true }).await;
}

pub(crate) enum Handled {
    /// Delivered (or dropped on purpose, counted): acknowledge.
    Ack,
    /// Queued for async handlers: acknowledge once they have run.
    AckWhen(BoxFuture<'static, ()>),
    /// Malformed: reject without requeue (dead-lettered when a DLX is configured).
    Reject,
    /// The machine is gone: give it back to the queue and stop consuming.
    Requeue,
}

pub(crate) fn decode_or_log(
    sh: &Shared,
    d: &Delivery,
    queue_of: &dyn std::fmt::Display,
) -> Option<Envelope> {
    match wire::decode(&d.data) {
        Ok(env) => Some(env),
        Err(e) => {
            sh.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                queue = %queue_of,
                bytes = d.data.len(),
                error = %e,
                "dropped a malformed message (not a Switchyard envelope); rejected without requeue"
            );
            None
        }
    }
}

pub(crate) async fn deliver_one(
    sh: &Shared,
    d: &Delivery,
    inbox: &Inbox,
    filter: Option<&Filter>,
) -> Handled {
    let Some(env) = decode_or_log(sh, d, inbox.id()) else {
        inbox.count_dropped();
        return Handled::Reject;
    };
    if let Some(f) = filter
        && !f(&env)
    {
        return Handled::Ack;
    }
    match inbox.deliver_tracked(env).await {
        Ok(done) => {
            sh.delivered.fetch_add(1, Ordering::Relaxed);
            if inbox.is_sync() {
                Handled::Ack
            } else {
                Handled::AckWhen(Box::pin(done))
            }
        }
        Err(Error::TargetGone(_)) | Err(Error::SessionClosed) => Handled::Requeue,
        Err(e) => {
            // Refused by the mailbox policy (`Fail`): dropped here, counted.
            tracing::debug!(machine = %inbox.id(), error = %e, "event refused by the mailbox");
            inbox.count_dropped();
            sh.dropped.fetch_add(1, Ordering::Relaxed);
            Handled::Ack
        }
    }
}

/// Where a subscriber is relative to the publisher (its context is not carried: same
/// process counts as `SameProcess`).
pub(crate) fn location_of(host: &[u8], process: &[u8], sub: &MachineEntry) -> Location {
    if sub.host_id.as_bytes() != host {
        Location::Remote
    } else if sub.process_id.as_bytes() != process {
        Location::SameMachine
    } else {
        Location::SameProcess
    }
}

pub(crate) fn location_from(n: u8) -> Location {
    Location::ALL[usize::from(n.min(3))]
}

pub(crate) async fn deliver_topic(sh: &Shared, d: &Delivery) -> Handled {
    let Some(env) = decode_or_log(sh, d, &"topics") else {
        return Handled::Reject;
    };
    let Address::Topic(topic) = &env.target else {
        sh.dropped.fetch_add(1, Ordering::Relaxed);
        return Handled::Ack;
    };
    let host = wire::header_str(&d.properties, wire::H_HOST).unwrap_or(b"");
    let process = wire::header_str(&d.properties, wire::H_PROC).unwrap_or(b"");
    let reach = wire::header_reach(&d.properties)
        .map(|(n, f)| Reach::new(location_from(n), location_from(f)))
        .unwrap_or(Reach::new(Location::Remote, Location::Remote));
    let subs: Vec<Arc<TopicSub>> = lock(&sh.subs).topics.values().cloned().collect();
    let parts: Vec<&str> = topic.split('.').collect();
    let mut done: HashSet<MachineId> = HashSet::new();
    let mut waiting: Vec<switchyard_core::Handled> = Vec::new();
    for s in subs {
        if done.contains(s.inbox.id())
            || !s.pattern.matches_segments(&parts)
            || !reach.covers(location_of(host, process, s.inbox.entry()))
        {
            continue;
        }
        if let Some(f) = &s.filter
            && !f(&env)
        {
            continue;
        }
        done.insert(s.inbox.id().clone());
        match s.inbox.deliver_tracked(env.clone()).await {
            Ok(h) => {
                sh.delivered.fetch_add(1, Ordering::Relaxed);
                if !s.inbox.is_sync() {
                    waiting.push(h);
                }
            }
            Err(_) => s.inbox.count_dropped(),
        }
    }
    if waiting.is_empty() {
        Handled::Ack
    } else {
        Handled::AckWhen(Box::pin(async move {
            for h in waiting {
                h.await;
            }
        }))
    }
}
