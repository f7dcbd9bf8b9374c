//! The SUB socket's task: connected to every peer's PUB, it receives topic messages
//! (delivered here to the matching local subscribers) and subscription markers.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use switchyard_core::{Address, Envelope, Name, Payload};
use tokio::sync::mpsc;
use zeromq::prelude::*;
use zeromq::{SubSocket, ZmqMessage};

use crate::codec::{self, Meta, kind};
use crate::topics::{meta_publisher, meta_reach};
use crate::{NAME, Shared, SubCmd};

pub(crate) async fn run(
    shared: Weak<Shared>,
    mut sub: SubSocket,
    mut cmds: mpsc::UnboundedReceiver<SubCmd>,
) {
    let mut connected: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            c = cmds.recv() => match c {
                None => return,
                Some(SubCmd::Connect(ep, done)) => {
                    let r = if connected.contains(&ep) {
                        Ok(())
                    } else {
                        match sub.connect(&ep).await {
                            Ok(()) => {
                                connected.insert(ep);
                                Ok(())
                            }
                            Err(e) => Err(format!("cannot connect to {ep}: {e}")),
                        }
                    };
                    let _ = done.send(r);
                }
                Some(SubCmd::Subscribe(p, done)) => {
                    if let Err(e) = sub.subscribe(&p).await {
                        tracing::debug!(error = %e, "zeromq: SUB subscribe failed on a peer");
                    }
                    let _ = done.send(());
                }
                Some(SubCmd::Unsubscribe(p, done)) => {
                    if let Err(e) = sub.unsubscribe(&p).await {
                        tracing::debug!(error = %e, "zeromq: SUB unsubscribe failed on a peer");
                    }
                    let _ = done.send(());
                }
            },
            m = sub.recv() => {
                let Some(s) = shared.upgrade() else { return };
                if s.is_closed() {
                    return;
                }
                match m {
                    Ok(msg) => {
                        on_message(&s, msg).await;
                        tokio::task::coop::consume_budget().await;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "zeromq SUB receive failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
    }
}

async fn on_message(s: &Arc<Shared>, msg: ZmqMessage) {
    let frames = msg.into_vec();
    let Some(first) = frames.first() else { return };
    if first.first() == Some(&codec::CONTROL_PREFIX) {
        let marker = std::str::from_utf8(first).ok();
        let process = frames.get(1).and_then(|f| std::str::from_utf8(f).ok());
        if let (Some(m), Some(p)) = (marker, process) {
            s.marker_arrived(m, p);
        }
        return;
    }
    let drop_it = |why: &str| {
        s.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!("zeromq: topic message dropped: {why}");
    };
    let Ok(topic) = std::str::from_utf8(first) else {
        return drop_it("the topic is not UTF-8");
    };
    let meta = match frames.get(1) {
        Some(b) => match crate::fast::read_meta(b) {
            Some(m) => m,
            None => match codec::from_map::<Meta>(b) {
                Ok(m) => m,
                Err(_) => return drop_it("the meta map does not decode"),
            },
        },
        None => return drop_it("no meta map in the second frame"),
    };
    let Some(b) = frames.get(2) else {
        return drop_it("no envelope in the third frame");
    };
    if b.len() > s.cfg.max_message_size {
        return drop_it("the envelope is over the size limit");
    }
    // The writer's shape is read in place; the payload shares the frame's bytes.
    let env = match crate::fast::read(b).filter(|p| p.topic) {
        Some(p) => Envelope::with_headers(
            p.id,
            p.source.into(),
            Address::Topic(p.to.into()),
            Name::new(p.event),
            Payload::from_msgpack(b.slice(p.payload)),
            p.headers,
        ),
        None => match codec::decode_envelope(b) {
            Ok(e) => e,
            Err(_) => return drop_it("the envelope does not decode"),
        },
    };
    let (host, process) = meta_publisher(&meta);
    let n = s
        .deliver_topic(topic, env, (host, process, None), meta_reach(&meta))
        .await;
    let Some(id) = meta.count else { return };
    // The publisher waits for this answer; it goes back through its ROUTER.
    let router = s.peers_mut().get(process).map(|p| p.router.clone());
    let Some(router) = router else { return };
    let me = s.me().map(|m| m.1.clone());
    let Some(me) = me else { return };
    let s = s.clone();
    tokio::spawn(async move {
        let mut m = ZmqMessage::from(Bytes::from_static(&[kind::COUNT]));
        m.push_back(codec::u64_frame(id));
        m.push_back(codec::u64_frame(n as u64));
        m.push_back(Bytes::copy_from_slice(me.as_bytes()));
        match s.conn(&router).await {
            Ok(c) => {
                let _ = c.post(m).await;
            }
            Err(d) => {
                tracing::debug!(reason = %d.0, "zeromq: cannot send a COUNT to {NAME} publisher")
            }
        }
    });
}
