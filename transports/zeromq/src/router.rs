//! The ROUTER socket's task: every peer's DEALER sends here.
//!
//! Machine sends are delivered on this task (synchronous handlers run here, async
//! ones are queued in their mailbox), in the order each peer sent them. Bytes of
//! `SEND` messages are acknowledged per peer connection: at once after
//! [`ACK_BYTES`], else after `ack_delay`, and every quarter of `peer_timeout` while
//! a delivery waits for mailbox room (so a slow consumer is not taken for a dead one).

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use switchyard_core::{Address, Envelope, EventRef, Inbox, Name, Payload, PayloadRef};
use tokio::time::Instant;
use zeromq::prelude::*;
use zeromq::{RouterRecvHalf, RouterSendHalf, ZmqMessage};

use crate::codec::{self, Hello, Nack, Reply, Subs, kind};
use crate::{ACK_BYTES, NAME, Shared};

/// Bytes received from each peer connection (by its identity) and not acknowledged yet.
#[derive(Default)]
struct Acks {
    pending: rustc_hash::FxHashMap<Bytes, u64>,
    due: Option<Instant>,
}

pub(crate) async fn run(shared: Weak<Shared>, mut rx: RouterRecvHalf, mut tx: RouterSendHalf) {
    let mut acks = Acks::default();
    // One timer, re-armed when acknowledgements become due: not a new timer per message.
    let timer = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    loop {
        if acks.due != armed {
            if let Some(t) = acks.due {
                timer.as_mut().reset(t);
            }
            armed = acks.due;
        }
        tokio::select! {
            m = rx.recv() => {
                let Some(s) = shared.upgrade() else { return };
                // A stream that never lets this task wait would never see its abort: stop here.
                if s.is_closed() {
                    return;
                }
                match m {
                    Ok(msg) => {
                        handle(&s, msg, &mut tx, &mut acks).await;
                        // The socket's channels do not count towards tokio's budget: give
                        // the worker back now and then.
                        tokio::task::coop::consume_budget().await;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "zeromq ROUTER receive failed");
                        // Not a busy loop if the socket keeps failing.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            _ = &mut timer, if armed.is_some() => {
                flush(&mut tx, &mut acks).await;
            }
        }
    }
}

async fn flush(tx: &mut RouterSendHalf, acks: &mut Acks) {
    acks.due = None;
    for (id, n) in acks.pending.drain() {
        send_ack(tx, id, n).await;
    }
}

async fn send_ack(tx: &mut RouterSendHalf, identity: Bytes, n: u64) {
    let mut m = ZmqMessage::from(identity);
    m.push_back(Bytes::from_static(&[kind::ACK]));
    m.push_back(codec::u64_frame(n));
    let _ = tx.send(m).await;
}

async fn reply(tx: &mut RouterSendHalf, identity: Bytes, req: u64, r: &Reply) {
    let Ok(body) = codec::to_map(r) else { return };
    let mut m = ZmqMessage::from(identity);
    m.push_back(Bytes::from_static(&[kind::REPLY]));
    m.push_back(codec::u64_frame(req));
    m.push_back(body);
    let _ = tx.send(m).await;
}

fn ok() -> Reply {
    Reply {
        ok: true,
        ..Reply::default()
    }
}

fn refused(code: &str, message: impl Into<String>) -> Reply {
    Reply {
        ok: false,
        code: Some(code.into()),
        message: Some(message.into()),
        ..Reply::default()
    }
}

async fn nack(tx: &mut RouterSendHalf, identity: Bytes, n: Nack) {
    let Ok(body) = codec::to_map(&n) else { return };
    let mut m = ZmqMessage::from(identity);
    m.push_back(Bytes::from_static(&[kind::NACK]));
    m.push_back(body);
    let _ = tx.send(m).await;
}

async fn handle(s: &Arc<Shared>, msg: ZmqMessage, tx: &mut RouterSendHalf, acks: &mut Acks) {
    let frames = msg.into_vec();
    let (Some(identity), Some(k)) = (frames.first().cloned(), frames.get(1)) else {
        return;
    };
    let Some(&k) = k.first() else {
        s.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return;
    };
    let req = || frames.get(2).and_then(|f| codec::read_u64(f));
    match k {
        kind::SEND => on_send(s, identity, &frames, tx, acks).await,
        kind::HELLO => {
            let Some(req) = req() else { return };
            let hello = frames.get(3).map(|b| codec::from_map::<Hello>(b));
            let mut tx = tx.clone();
            let s = s.clone();
            // Answered once this process has synced its subscriptions to the newcomer, which
            // takes round trips through other sockets: not on this task.
            tokio::spawn(async move {
                let r = match hello {
                    Some(Ok(h)) if h.protocol == codec::PROTOCOL => {
                        s.learn_peer(
                            &h.process,
                            &h.host,
                            Some((&h.router, &h.pub_ep)),
                            h.version,
                            &h.subs,
                        );
                        s.sync_peers(vec![h.process.as_str().into()], true).await;
                        ok()
                    }
                    Some(Ok(h)) => refused(
                        "protocol",
                        format!("protocol {} is not {}", h.protocol, codec::PROTOCOL),
                    ),
                    _ => refused("malformed", "HELLO needs a map body"),
                };
                reply(&mut tx, identity, req, &r).await;
            });
        }
        kind::SUBS => {
            let Some(req) = req() else { return };
            let r = match frames.get(3).map(|b| codec::from_map::<Subs>(b)) {
                Some(Ok(m)) => {
                    s.learn_peer(
                        &m.process,
                        &m.host,
                        Some((&m.router, &m.pub_ep)),
                        m.version,
                        &m.subs,
                    );
                    if let Some(marker) = &m.marker {
                        s.publish_marker(marker.as_bytes()).await;
                    }
                    ok()
                }
                _ => refused("malformed", "SUBS needs a map body"),
            };
            reply(tx, identity, req, &r).await;
        }
        kind::MARK => {
            let Some(req) = req() else { return };
            let r = match frames.get(3) {
                Some(m) if m.first() == Some(&codec::CONTROL_PREFIX) => {
                    s.publish_marker(m).await;
                    ok()
                }
                _ => refused("malformed", "MARK needs a marker starting with a NUL byte"),
            };
            reply(tx, identity, req, &r).await;
        }
        kind::GROUP => {
            let Some(req) = req() else { return };
            let sub = frames.get(3).and_then(|f| codec::read_u64(f));
            let env = frames.get(4).map(|b| {
                if b.len() > s.cfg.max_message_size {
                    Err(switchyard_core::Error::TooLarge {
                        transport: NAME,
                        size: b.len(),
                        limit: s.cfg.max_message_size,
                    })
                } else {
                    codec::decode_envelope(b)
                }
            });
            let mut tx = tx.clone();
            let s = s.clone();
            // The publisher waits for the answer, so one publisher's group messages stay in
            // order; a full mailbox must not hold up every other peer's sends meanwhile.
            tokio::spawn(async move {
                let r = match (sub, env) {
                    (Some(sub), Some(Ok(env))) => {
                        let took = s.deliver_group(sub, env).await;
                        Reply {
                            ok: true,
                            count: Some(u64::from(took)),
                            ..Reply::default()
                        }
                    }
                    (_, Some(Err(e))) => refused("malformed", e.to_string()),
                    _ => refused("malformed", "GROUP needs [req, sub, envelope]"),
                };
                reply(&mut tx, identity, req, &r).await;
            });
        }
        kind::COUNT => {
            let id = frames.get(2).and_then(|f| codec::read_u64(f));
            let n = frames.get(3).and_then(|f| codec::read_u64(f));
            let process = frames.get(4).and_then(|f| std::str::from_utf8(f).ok());
            if let (Some(id), Some(n), Some(p)) = (id, n, process) {
                s.count_arrived(id, p, n);
            }
        }
        other => {
            tracing::debug!(
                kind = other,
                "zeromq: unknown message kind from a peer ignored"
            );
            s.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

async fn on_send(
    s: &Arc<Shared>,
    identity: Bytes,
    frames: &[Bytes],
    tx: &mut RouterSendHalf,
    acks: &mut Acks,
) {
    let size: u64 = frames[1..].iter().map(|f| f.len() as u64).sum();
    // Counted as received before delivery: the acknowledgement says the bytes left the
    // sender's window, not that a handler ran.
    let pending = acks.pending.entry(identity.clone()).or_insert(0);
    *pending += size;
    if *pending >= ACK_BYTES {
        let n = std::mem::take(pending);
        acks.pending.remove(&identity);
        send_ack(tx, identity.clone(), n).await;
    } else if acks.due.is_none() {
        acks.due = Some(Instant::now() + s.cfg.ack_delay);
    }
    let to = frames.get(2).and_then(|f| std::str::from_utf8(f).ok());
    let Some(to) = to else {
        s.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        nack(
            tx,
            identity,
            Nack {
                to: String::new(),
                id: 0,
                code: "malformed".into(),
                message: "SEND needs a UTF-8 machine id in its second frame".into(),
            },
        )
        .await;
        return;
    };
    let inbox = s.inbox(to);
    for b in frames.iter().skip(3) {
        if b.len() > s.cfg.max_message_size {
            s.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let n = Nack {
                to: to.to_string(),
                id: 0,
                code: "frame_too_large".into(),
                message: format!(
                    "an envelope of {} bytes is over this process's limit of {}",
                    b.len(),
                    s.cfg.max_message_size
                ),
            };
            nack(tx, identity.clone(), n).await;
            continue;
        }
        let Some(inbox) = &inbox else {
            s.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let id = crate::fast::read(b).map_or(0, |p| p.id);
            let n = Nack {
                to: to.to_string(),
                id,
                code: "unknown_target".into(),
                message: format!("no machine `{to}` is bound in this process"),
            };
            nack(tx, identity.clone(), n).await;
            continue;
        };
        // The common shape is read in place: a borrowed handler gets it without an
        // envelope, anyone else an envelope whose payload shares the frame's bytes.
        let fast = crate::fast::read(b).filter(|p| !p.topic && p.to == to);
        let mut env = match fast {
            Some(p) => {
                let plain = !p.headers.is_reply && p.headers.expires_at_us.is_none();
                if plain && inbox.takes_refs() {
                    let ev = EventRef {
                        id: p.id,
                        source: p.source,
                        event: p.event,
                        payload: PayloadRef::Encoded(&b[p.payload.clone()]),
                        headers: &p.headers,
                        carried_by: Some(NAME),
                    };
                    if inbox.deliver_ref(ev) {
                        s.delivered
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                }
                Envelope::with_headers(
                    p.id,
                    p.source.into(),
                    Address::Machine(p.to.into()),
                    Name::new(p.event),
                    Payload::from_msgpack(b.slice(p.payload)),
                    p.headers,
                )
            }
            None => match codec::decode_envelope(b) {
                Ok(e) => e,
                Err(e) => {
                    s.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let n = Nack {
                        to: to.to_string(),
                        id: 0,
                        code: "malformed".into(),
                        message: e.to_string(),
                    };
                    nack(tx, identity.clone(), n).await;
                    continue;
                }
            },
        };
        env.carried_by = Some(NAME);
        deliver(s, inbox, env, &identity, tx, acks).await;
    }
}

/// Delivers one event; while it waits for mailbox room, tells the sender every quarter
/// of `peer_timeout` that this process is alive (an `ACK` of what arrived so far).
async fn deliver(
    s: &Shared,
    inbox: &Inbox,
    env: Envelope,
    identity: &Bytes,
    tx: &mut RouterSendHalf,
    acks: &mut Acks,
) {
    let r = match inbox.deliver_sync(env) {
        Ok(r) => r,
        Err(env) => {
            let fut = inbox.deliver(env);
            tokio::pin!(fut);
            let period = (s.cfg.peer_timeout / 4).max(Duration::from_millis(10));
            let mut tick = tokio::time::interval_at(Instant::now() + period, period);
            loop {
                tokio::select! {
                    r = &mut fut => break r,
                    _ = tick.tick() => {
                        let n = acks.pending.remove(identity).unwrap_or(0);
                        send_ack(tx, identity.clone(), n).await;
                    }
                }
            }
        }
    };
    match r {
        Ok(()) => {
            s.delivered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Err(e) => {
            inbox.count_dropped();
            s.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(machine = %inbox.id(), error = %e, "zeromq: event refused by the machine");
        }
    }
}
