//! Switchyard `memory` transport: same-process delivery into each machine's mailbox.
//!
//! A send queues the envelope in the target's bounded mailbox (capacity and
//! [`switchyard_core::FullPolicy`] from its `MailboxConfig`), drained by one task
//! that runs the handler, so a machine handles one event at a time, in FIFO order
//! per sender → receiver pair, a higher priority first. Payloads are handed over as
//! they are, never serialized. The mailbox task starts on the first event, so a
//! machine only ever reached by direct calls costs no task.
//!
//! Topics (with `*`/`#` patterns and content filters) and consumer groups are
//! matched in memory; a publish reaches each machine once, and a machine's
//! matching subscriptions are computed once per topic until subscriptions change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use rustc_hash::FxHashMap;
use switchyard_core::{
    Address, Capabilities, DeliveryGuarantee, Envelope, Error, Filter, Inbox, Link, Location,
    MachineEntry, MachineId, MessageOrdering, Offer, Outgoing, PubSub, Reach, Result, Subscription,
    SubscriptionId, TopicPattern, Transport, TransportHealth,
};

/// Name shown in `Envelope::carried_by`.
pub const NAME: &str = "memory";

/// Topics whose receivers are kept precomputed; past it the cache starts over.
const TOPIC_CACHE: usize = 1024;

struct Sub {
    id: u64,
    topic: Option<TopicPattern>,
    group: Option<Arc<str>>,
    filter: Option<Filter>,
    inbox: Inbox,
}

/// One machine's share of a publish: its inbox and the filters of its matching subscriptions
/// (`None` among them: one subscription takes everything).
struct Receiver {
    inbox: Inbox,
    filters: Vec<Option<Filter>>,
}

impl Receiver {
    fn wants(&self, env: &Envelope) -> bool {
        self.filters
            .iter()
            .any(|f| f.as_ref().is_none_or(|f| f(env)))
    }
}

/// The receivers of one topic, for the subscription generation they were computed in.
type CachedReceivers = (u64, Arc<[Receiver]>);

struct Fabric {
    machines: RwLock<FxHashMap<MachineId, Inbox>>,
    subs: RwLock<Vec<Arc<Sub>>>,
    /// Moves on every subscribe and unsubscribe, so cached receiver lists stay fresh.
    subs_generation: AtomicU64,
    topics: Mutex<FxHashMap<Arc<str>, CachedReceivers>>,
    group_next: Mutex<HashMap<Arc<str>, usize>>,
    next_sub: AtomicU64,
    closed: AtomicBool,
    delivered: AtomicU64,
    dropped: AtomicU64,
}

/// The same-process transport of one session.
pub struct MemoryTransport {
    caps: Capabilities,
    fabric: Arc<Fabric>,
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryTransport {
    /// A memory transport; mailbox sizes come from each machine's `MailboxConfig`.
    pub fn new() -> MemoryTransport {
        MemoryTransport {
            caps: Capabilities {
                locations: vec![Location::SameThread, Location::SameProcess],
                ordering: MessageOrdering::PerSenderReceiver,
                delivery: DeliveryGuarantee::AtMostOnce,
                max_message_size: None,
                serializes: false,
                topics: true,
                groups: true,
                request: true,
                mailboxes: true,
                priority: true,
            },
            fabric: Arc::new(Fabric {
                machines: RwLock::new(FxHashMap::default()),
                subs: RwLock::new(Vec::new()),
                subs_generation: AtomicU64::new(0),
                topics: Mutex::new(FxHashMap::default()),
                group_next: Mutex::new(HashMap::new()),
                next_sub: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                delivered: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.fabric.closed.load(Ordering::Acquire) {
            return Err(Error::Closed(NAME));
        }
        Ok(())
    }
}

impl Fabric {
    /// The machines subscribed to `topic`, each once, from the cache while subscriptions are unchanged.
    fn receivers(&self, topic: &Arc<str>) -> Arc<[Receiver]> {
        let generation = self.subs_generation.load(Ordering::Acquire);
        if let Some((g, r)) = lock(&self.topics).get(topic)
            && *g == generation
        {
            return r.clone();
        }
        let parts: Vec<&str> = topic.split('.').collect();
        let mut out: Vec<Receiver> = Vec::new();
        for s in read(&self.subs).iter() {
            if s.group.is_some() || !s.topic.as_ref().is_some_and(|p| p.matches_segments(&parts)) {
                continue;
            }
            match out.iter_mut().find(|r| r.inbox.id() == s.inbox.id()) {
                Some(r) => r.filters.push(s.filter.clone()),
                None => out.push(Receiver {
                    inbox: s.inbox.clone(),
                    filters: vec![s.filter.clone()],
                }),
            }
        }
        let r: Arc<[Receiver]> = out.into();
        let mut cache = lock(&self.topics);
        if cache.len() >= TOPIC_CACHE {
            cache.clear();
        }
        cache.insert(topic.clone(), (generation, r.clone()));
        r
    }

    /// The next member of `group` whose filter takes `env`, round-robin.
    fn group_member(&self, group: &str, env: &Envelope) -> Option<Inbox> {
        let members: Vec<Inbox> = read(&self.subs)
            .iter()
            .filter(|s| s.group.as_deref() == Some(group))
            .filter(|s| s.filter.as_ref().is_none_or(|f| f(env)))
            .map(|s| s.inbox.clone())
            .collect();
        if members.is_empty() {
            return None;
        }
        let mut next = lock(&self.group_next);
        let i = next.entry(group.into()).or_insert(0);
        let m = members[*i % members.len()].clone();
        *i = i.wrapping_add(1);
        Some(m)
    }

    fn changed(&self) {
        self.subs_generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// Queues `env` in `inbox`'s mailbox, waiting for room under the `Wait` policy; `false`
/// when the machine is gone.
async fn deliver(inbox: &Inbox, env: Envelope) -> bool {
    match inbox.offer(env) {
        Offer::Taken => {
            inbox.notify();
            true
        }
        Offer::Full(env) => inbox.queue(env).await.is_ok(),
        Offer::Refused(..) => false,
    }
}

/// A link to one machine's mailbox.
struct MemoryLink {
    inbox: Inbox,
    fabric: Arc<Fabric>,
}

#[async_trait]
impl Link for MemoryLink {
    fn try_send(&self, out: &mut dyn Outgoing) -> Result<()> {
        if self.fabric.closed.load(Ordering::Acquire) {
            return Err(Error::Closed(NAME));
        }
        if self.inbox.is_closed() {
            return Err(Error::TargetGone(self.inbox.id().clone()));
        }
        let mut queued = false;
        let r = loop {
            let Some(letter) = out.pop_letter(NAME, self.inbox.mailbox().letters()) else {
                break Ok(());
            };
            match self.inbox.offer(letter) {
                Offer::Taken => queued = true,
                Offer::Full(back) => {
                    out.push_front(back.into_envelope(self.inbox.id()));
                    break Ok(());
                }
                Offer::Refused(e, back) => {
                    out.push_front(back.into_envelope(self.inbox.id()));
                    break Err(e);
                }
            }
        };
        if queued {
            self.inbox.notify();
        }
        r
    }

    async fn send(&self, out: &mut dyn Outgoing) -> Result<()> {
        loop {
            self.try_send(out)?;
            if out.is_empty() {
                return Ok(());
            }
            self.inbox.room().await;
        }
    }

    fn is_open(&self) -> bool {
        !self.inbox.is_closed() && !self.fabric.closed.load(Ordering::Acquire)
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn bind(&self, entry: &MachineEntry, inbox: Inbox) -> Result<()> {
        self.check_open()?;
        let mut m = write(&self.fabric.machines);
        if m.contains_key(&entry.id) {
            return Err(Error::DuplicateId(entry.id.clone()));
        }
        m.insert(entry.id.clone(), inbox);
        Ok(())
    }

    async fn unbind(&self, id: &MachineId) -> Result<()> {
        write(&self.fabric.machines).remove(id);
        let mut subs = write(&self.fabric.subs);
        let before = subs.len();
        subs.retain(|s| s.inbox.id() != id);
        if subs.len() != before {
            self.fabric.changed();
        }
        Ok(())
    }

    async fn link(&self, to: &MachineEntry) -> Result<Arc<dyn Link>> {
        self.check_open()?;
        let inbox = read(&self.fabric.machines)
            .get(&to.id)
            .cloned()
            .ok_or_else(|| Error::TargetGone(to.id.clone()))?;
        if inbox.is_closed() {
            return Err(Error::TargetGone(to.id.clone()));
        }
        Ok(Arc::new(MemoryLink {
            inbox,
            fabric: self.fabric.clone(),
        }))
    }

    fn pubsub(&self) -> Option<&dyn PubSub> {
        Some(self)
    }

    fn health(&self) -> TransportHealth {
        let closed = self.fabric.closed.load(Ordering::Acquire);
        TransportHealth {
            healthy: !closed,
            detail: format!(
                "{} machines, {} subscriptions{}",
                read(&self.fabric.machines).len(),
                read(&self.fabric.subs).len(),
                if closed { ", closed" } else { "" }
            ),
            // Sends are counted by the machines that handle them (NodeStats::handled): a
            // shared counter bumped per send would cost more than the rest of the send.
            delivered: self.fabric.delivered.load(Ordering::Relaxed),
            dropped: self.fabric.dropped.load(Ordering::Relaxed),
        }
    }

    fn close(&self) {
        self.fabric.closed.store(true, Ordering::Release);
        write(&self.fabric.machines).clear();
        write(&self.fabric.subs).clear();
        lock(&self.fabric.topics).clear();
        self.fabric.changed();
    }
}

#[async_trait]
impl PubSub for MemoryTransport {
    async fn publish(&self, from: &MachineEntry, mut env: Envelope, reach: Reach) -> Result<usize> {
        self.check_open()?;
        env.carried_by = Some(NAME);
        let mut n = 0;
        match &env.target {
            Address::Topic(topic) => {
                let receivers = self.fabric.receivers(topic);
                // Every machine here is in the publisher's process: when the span covers the
                // whole process there is nothing to check per receiver.
                let whole =
                    reach.covers(Location::SameThread) && reach.covers(Location::SameProcess);
                for r in receivers.iter() {
                    if !whole && !reach.covers(Location::between(from, r.inbox.entry())) {
                        continue;
                    }
                    if !r.wants(&env) {
                        continue;
                    }
                    // A receiver that left meanwhile is skipped; the others still get theirs.
                    if deliver(&r.inbox, env.clone()).await {
                        n += 1;
                    }
                }
            }
            Address::Group(g) => {
                if let Some(inbox) = self.fabric.group_member(g, &env)
                    && deliver(&inbox, env.clone()).await
                {
                    n += 1;
                }
            }
            other => {
                return Err(Error::InvalidPattern {
                    pattern: other.to_string(),
                    reason: "publish takes a topic or a group address",
                });
            }
        }
        self.fabric.delivered.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    async fn subscribe(&self, sub: Subscription) -> Result<SubscriptionId> {
        self.check_open()?;
        if !read(&self.fabric.machines).contains_key(sub.inbox.id()) {
            return Err(Error::TargetGone(sub.inbox.id().clone()));
        }
        let id = self.fabric.next_sub.fetch_add(1, Ordering::Relaxed);
        write(&self.fabric.subs).push(Arc::new(Sub {
            id,
            topic: sub.topic,
            group: sub.group,
            filter: sub.filter,
            inbox: sub.inbox,
        }));
        self.fabric.changed();
        Ok(SubscriptionId(id))
    }

    async fn unsubscribe(&self, id: SubscriptionId) -> Result<()> {
        write(&self.fabric.subs).retain(|s| s.id != id.0);
        self.fabric.changed();
        Ok(())
    }
}
