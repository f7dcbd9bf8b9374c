//! Topics and groups: local subscriptions, counted publishes, markers, group members.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use bytes::Bytes;
use switchyard_core::{
    Address, Envelope, Error, Filter, Inbox, Location, MachineEntry, PubSub, Reach, Result,
    Subscription, SubscriptionId, TopicPattern,
};
use tokio::sync::oneshot;
use zeromq::ZmqMessage;
use zeromq::prelude::*;

use crate::codec::{self, Meta, kind};
use crate::peers::{Peer, byte_loc, loc_byte, location_of, peer_location};
use crate::{NAME, Shared, ZmqTransport, fast, literal_prefix, lock, transport_err};

pub(crate) struct LocalSub {
    pub(crate) topic: Option<TopicPattern>,
    pub(crate) group: Option<Arc<str>>,
    pub(crate) filter: Option<Filter>,
    pub(crate) inbox: Inbox,
}

#[derive(Default)]
pub(crate) struct LocalSubs {
    pub(crate) next: u64,
    pub(crate) version: u64,
    pub(crate) map: BTreeMap<u64, LocalSub>,
    /// SUB prefixes in use, with how many subscriptions use each.
    pub(crate) prefixes: HashMap<String, usize>,
}

/// A counted publish waiting for the processes that should answer.
pub(crate) struct CountWait {
    pub(crate) waiting: HashSet<Arc<str>>,
    pub(crate) total: usize,
    pub(crate) done: Option<oneshot::Sender<()>>,
}

/// Subscribers waiting for a marker to come back through each peer's PUB.
pub(crate) struct MarkerWait {
    pub(crate) waiting: HashSet<Arc<str>>,
    pub(crate) arrived: Arc<tokio::sync::Notify>,
}

/// What the SUB socket's task is asked to do.
pub(crate) enum SubCmd {
    Connect(String, oneshot::Sender<std::result::Result<(), String>>),
    Subscribe(String, oneshot::Sender<()>),
    Unsubscribe(String, oneshot::Sender<()>),
}

/// A group member's process (id, ROUTER endpoint); `None` in a member list is this process.
pub(crate) type Member = (Arc<str>, String);

impl Shared {
    /// A marker came back through `process`'s PUB.
    pub(crate) fn marker_arrived(&self, marker: &str, process: &str) {
        if let Some(w) = lock(&self.markers).get_mut(marker)
            && w.waiting.remove(process)
        {
            w.arrived.notify_waiters();
        }
    }

    /// A counted topic message's subscriber process answered.
    pub(crate) fn count_arrived(&self, id: u64, process: &str, delivered: u64) {
        let mut counts = lock(&self.counts);
        let Some(w) = counts.get_mut(&id) else { return };
        if w.waiting.remove(process) {
            w.total += delivered as usize;
            if w.waiting.is_empty()
                && let Some(d) = w.done.take()
            {
                let _ = d.send(());
            }
        }
    }

    /// Publishes `marker` on the PUB socket (`[marker, process]`).
    pub(crate) async fn publish_marker(&self, marker: &[u8]) {
        let Some(me) = self.me() else { return };
        let mut msg = ZmqMessage::from(Bytes::copy_from_slice(marker));
        msg.push_back(Bytes::copy_from_slice(me.1.as_bytes()));
        if let Some(p) = self.publisher.lock().await.as_mut() {
            let _ = p.send(msg).await;
        }
    }

    /// Delivers a topic envelope once to each local machine with a matching plain
    /// subscription whose location relative to the publisher `reach` covers.
    pub(crate) async fn deliver_topic(
        &self,
        topic: &str,
        mut env: Envelope,
        publisher: (&str, &str, Option<u64>),
        reach: Reach,
    ) -> usize {
        let parts: Vec<&str> = topic.split('.').collect();
        // Few machines per process subscribe to one topic: a list, checked by scanning.
        let targets: Vec<Inbox> = {
            let subs = lock(&self.subs);
            let mut v: Vec<Inbox> = Vec::new();
            for s in subs.map.values() {
                if s.group.is_some()
                    || !s.topic.as_ref().is_some_and(|p| p.matches_segments(&parts))
                {
                    continue;
                }
                let loc = location_of(publisher.0, publisher.1, publisher.2, s.inbox.entry());
                if !reach.covers(loc) || v.iter().any(|i| i.id() == s.inbox.id()) {
                    continue;
                }
                if let Some(f) = &s.filter
                    && !f(&env)
                {
                    continue;
                }
                v.push(s.inbox.clone());
            }
            v
        };
        if targets.is_empty() {
            return 0;
        }
        if env.carried_by != Some(NAME) {
            env.carried_by = Some(NAME);
        }
        let plain = !env.headers.is_reply && env.headers.expires_at_us.is_none();
        let mut n = 0;
        for inbox in targets {
            if plain && inbox.takes_refs() && inbox.deliver_ref(switchyard_core::EventRef::of(&env))
            {
                n += 1;
                continue;
            }
            match inbox.deliver(env.clone()).await {
                Ok(()) => n += 1,
                Err(_) => inbox.count_dropped(),
            }
        }
        self.delivered.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Delivers a group message to local subscription `sub`; whether it took it.
    pub(crate) async fn deliver_group(&self, sub: u64, env: Envelope) -> bool {
        let inbox = {
            let subs = lock(&self.subs);
            match subs.map.get(&sub) {
                Some(s) if s.group.is_some() => {
                    if let Some(f) = &s.filter
                        && !f(&env)
                    {
                        return false;
                    }
                    s.inbox.clone()
                }
                _ => return false,
            }
        };
        if inbox.is_closed() {
            return false;
        }
        let mut env = env;
        env.carried_by = Some(NAME);
        let ok = inbox.deliver(env).await.is_ok();
        if ok {
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    pub(crate) async fn publish_topic(
        self: &Arc<Self>,
        from: &MachineEntry,
        env: Envelope,
        reach: Reach,
        counted: bool,
    ) -> Result<usize> {
        let Address::Topic(topic) = &env.target else {
            return Err(Error::InvalidPattern {
                pattern: env.target.to_string(),
                reason: "publish takes a topic or a group address",
            });
        };
        let topic = topic.clone();
        if topic.as_bytes().first() == Some(&codec::CONTROL_PREFIX) {
            return Err(Error::InvalidPattern {
                pattern: topic.to_string(),
                reason: "topics starting with a NUL byte are reserved by the zeromq transport",
            });
        }
        self.wait_ready().await?;
        self.catch_up().await;
        let me = self
            .me()
            .cloned()
            .unwrap_or_else(|| (from.host_id.clone(), from.process_id.clone()));
        let mut n = 0;
        if reach.covers(Location::SameThread) || reach.covers(Location::SameProcess) {
            n += self
                .deliver_topic(
                    &topic,
                    env.clone(),
                    (&from.host_id, &from.process_id, from.context),
                    reach,
                )
                .await;
        }
        if reach.farthest < Location::SameMachine {
            return Ok(n);
        }
        let mut bytes = Vec::with_capacity(128);
        codec::write_envelope(&mut bytes, &env)?;
        if bytes.len() > self.cfg.max_message_size {
            return Err(Error::TooLarge {
                transport: NAME,
                size: bytes.len(),
                limit: self.cfg.max_message_size,
            });
        }
        let expected: HashSet<Arc<str>> = if counted {
            let parts: Vec<&str> = topic.split('.').collect();
            self.peers_mut()
                .iter()
                .filter(|(p, peer)| {
                    reach.covers(peer_location(&me, &peer.host, p))
                        && peer.subs.iter().any(|s| {
                            s.group.is_none()
                                && s.pattern
                                    .as_ref()
                                    .is_some_and(|t| t.matches_segments(&parts))
                        })
                })
                .map(|(p, _)| p.clone())
                .collect()
        } else {
            HashSet::new()
        };
        let mut waiter = None;
        let count_id = if expected.is_empty() {
            None
        } else {
            let id = self.next_count.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            lock(&self.counts).insert(
                id,
                CountWait {
                    waiting: expected,
                    total: 0,
                    done: Some(tx),
                },
            );
            waiter = Some(rx);
            Some(id)
        };
        let mut meta = Vec::with_capacity(48 + me.0.len() + me.1.len());
        fast::write_meta(
            &mut meta,
            &me.1,
            &me.0,
            count_id,
            loc_byte(reach.nearest),
            loc_byte(reach.farthest),
        );
        let meta = Bytes::from(meta);
        let mut msg = ZmqMessage::from(Bytes::copy_from_slice(topic.as_bytes()));
        msg.push_back(meta);
        msg.push_back(Bytes::from(bytes));
        {
            let mut p = self.publisher.lock().await;
            let Some(p) = p.as_mut() else {
                return Err(Error::Closed(NAME));
            };
            if let Err(e) = p.send(msg).await {
                if let Some(id) = count_id {
                    lock(&self.counts).remove(&id);
                }
                return Err(transport_err(format!("PUB send failed: {e}"), false));
            }
        }
        if let (Some(id), Some(rx)) = (count_id, waiter) {
            let _ = tokio::time::timeout(self.cfg.peer_timeout, rx).await;
            if let Some(w) = lock(&self.counts).remove(&id) {
                if !w.waiting.is_empty() {
                    tracing::debug!(
                        missing = w.waiting.len(),
                        "zeromq: subscriber processes did not count a publish in time (counted as 0)"
                    );
                }
                n += w.total;
            }
        }
        Ok(n)
    }

    pub(crate) async fn publish_group(
        self: &Arc<Self>,
        group: &Arc<str>,
        env: Envelope,
    ) -> Result<usize> {
        self.wait_ready().await?;
        self.catch_up().await;
        // Members in a stable order: this process's, then each peer's by process id.
        let mut members: Vec<(Option<Member>, u64)> = lock(&self.subs)
            .map
            .iter()
            .filter(|(_, s)| s.group.as_ref() == Some(group))
            .map(|(id, _)| (None, *id))
            .collect();
        {
            let peers = self.peers_mut();
            let mut ps: Vec<(&Arc<str>, &Peer)> = peers.iter().collect();
            ps.sort_by(|a, b| a.0.cmp(b.0));
            for (p, peer) in ps {
                for s in &peer.subs {
                    if s.group.as_ref() == Some(group) && s.pattern.is_none() {
                        members.push((Some((p.clone(), peer.router.clone())), s.sub));
                    }
                }
            }
        }
        if members.is_empty() {
            return Ok(0);
        }
        let start = {
            let mut next = lock(&self.group_next);
            let i = next.entry(group.clone()).or_insert(0);
            let v = *i;
            *i = i.wrapping_add(1);
            v
        };
        let mut bytes = None;
        for k in 0..members.len() {
            let (whose, sub) = &members[(start + k) % members.len()];
            match whose {
                None => {
                    if self.deliver_group(*sub, env.clone()).await {
                        return Ok(1);
                    }
                }
                Some((process, router)) => {
                    let b = match &bytes {
                        Some(b) => Bytes::clone(b),
                        None => {
                            let mut v = Vec::with_capacity(128);
                            codec::write_envelope(&mut v, &env)?;
                            if v.len() > self.cfg.max_message_size {
                                return Err(Error::TooLarge {
                                    transport: NAME,
                                    size: v.len(),
                                    limit: self.cfg.max_message_size,
                                });
                            }
                            let b = Bytes::from(v);
                            bytes = Some(b.clone());
                            b
                        }
                    };
                    let r = match self.conn(router).await {
                        Ok(c) => {
                            c.request(
                                kind::GROUP,
                                vec![codec::u64_frame(*sub), b],
                                self.cfg.peer_timeout,
                            )
                            .await
                        }
                        Err(d) => Err(d),
                    };
                    match r {
                        Ok(reply) if reply.count == Some(1) => return Ok(1),
                        Ok(_) => {}
                        Err(d) => {
                            tracing::debug!(peer = %process, reason = %d.0, "zeromq: a group member's process is unreachable");
                        }
                    }
                }
            }
        }
        Ok(0)
    }
}

#[async_trait]
impl PubSub for ZmqTransport {
    async fn publish(&self, from: &MachineEntry, env: Envelope, reach: Reach) -> Result<usize> {
        self.shared.check_open()?;
        match &env.target {
            Address::Topic(_) => self.shared.publish_topic(from, env, reach, true).await,
            Address::Group(g) => {
                let g = g.clone();
                self.shared.publish_group(&g, env).await
            }
            other => Err(Error::InvalidPattern {
                pattern: other.to_string(),
                reason: "publish takes a topic or a group address",
            }),
        }
    }

    async fn emit(&self, from: &MachineEntry, env: Envelope, reach: Reach) -> Result<()> {
        self.shared.check_open()?;
        match &env.target {
            Address::Topic(_) => self
                .shared
                .publish_topic(from, env, reach, false)
                .await
                .map(drop),
            _ => self.publish(from, env, reach).await.map(drop),
        }
    }

    async fn subscribe(&self, sub: Subscription) -> Result<SubscriptionId> {
        let s = &self.shared;
        s.check_open()?;
        s.wait_ready().await?;
        let Subscription {
            topic,
            group,
            filter,
            inbox,
        } = sub;
        let _ = s.me.set((
            inbox.entry().host_id.clone(),
            inbox.entry().process_id.clone(),
        ));
        let prefix = topic
            .as_ref()
            .filter(|_| group.is_none())
            .map(|t| literal_prefix(t.as_str()));
        let (id, new_prefix) = {
            let mut subs = lock(&s.subs);
            subs.next += 1;
            subs.version += 1;
            let id = subs.next;
            subs.map.insert(
                id,
                LocalSub {
                    topic,
                    group,
                    filter,
                    inbox,
                },
            );
            let new_prefix = match &prefix {
                Some(p) => {
                    let n = subs.prefixes.entry(p.clone()).or_insert(0);
                    *n += 1;
                    *n == 1
                }
                None => false,
            };
            (id, new_prefix)
        };
        let is_topic = prefix.is_some();
        if new_prefix && let Some(p) = prefix {
            s.sub_command(|d| SubCmd::Subscribe(p, d)).await?;
        }
        // Peers that joined since the registry was last read are introduced, then every peer
        // learns the subscription (and, for a topic, its PUB gets the prefix).
        s.catch_up().await;
        let all: Vec<Arc<str>> = s.peers_mut().keys().cloned().collect();
        s.sync_peers(all, is_topic).await;
        Ok(SubscriptionId(id))
    }

    async fn unsubscribe(&self, id: SubscriptionId) -> Result<()> {
        let s = &self.shared;
        let removed = {
            let mut subs = lock(&s.subs);
            let Some(sub) = subs.map.remove(&id.0) else {
                return Ok(());
            };
            subs.version += 1;
            let prefix = sub
                .topic
                .as_ref()
                .filter(|_| sub.group.is_none())
                .map(|t| literal_prefix(t.as_str()));
            match prefix {
                Some(p) => {
                    let last = match subs.prefixes.get_mut(&p) {
                        Some(n) => {
                            *n -= 1;
                            *n == 0
                        }
                        None => false,
                    };
                    if last {
                        subs.prefixes.remove(&p);
                        Some(p)
                    } else {
                        None
                    }
                }
                None => None,
            }
        };
        if s.is_closed() {
            return Ok(());
        }
        if let Some(p) = removed {
            let _ = s.sub_command(|d| SubCmd::Unsubscribe(p, d)).await;
        }
        let all: Vec<Arc<str>> = s.peers_mut().keys().cloned().collect();
        s.sync_peers(all, false).await;
        Ok(())
    }
}

/// The span a topic message's meta says to cover.
pub(crate) fn meta_reach(m: &Meta) -> Reach {
    Reach::new(byte_loc(m.near), byte_loc(m.far))
}

/// The publisher's identity in a topic message's meta.
pub(crate) fn meta_publisher(m: &Meta) -> (&str, &str) {
    (&m.host, &m.process)
}
