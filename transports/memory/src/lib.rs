//! Switchyard `memory` transport: same-process delivery through bounded mailboxes.
//!
//! Each machine gets one bounded mailbox (capacity and [`FullPolicy`] from its
//! `MailboxConfig`) drained by one task that runs the handler, so a machine
//! handles one event at a time, in FIFO order per sender → receiver pair.
//! Payloads are handed over as they are, never serialized. Topics (with `*`/`#`
//! patterns and content filters) and consumer groups are matched in memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use crossbeam_queue::ArrayQueue;
use switchyard_core::{
    Address, Capabilities, DeliveryGuarantee, Envelope, Error, Filter, FullPolicy, Inbox, Location,
    MachineEntry, MachineId, MessageOrdering, Outgoing, Result, Subscription, SubscriptionId,
    TargetHandle, TopicPattern, Transport, TransportHealth, TrySend,
};
use tokio::sync::Notify;

/// Name shown in `Envelope::carried_by`.
pub const NAME: &str = "memory";

/// Events a mailbox task handles before yielding to the scheduler.
const BATCH: usize = 128;

struct Mailbox {
    queue: ArrayQueue<Envelope>,
    policy: FullPolicy,
    consumer_sleeping: AtomicBool,
    wake_consumer: Notify,
    waiting_senders: AtomicUsize,
    not_full: Notify,
    closed: AtomicBool,
    dropped: Arc<AtomicU64>,
    inbox: Inbox,
}

impl Mailbox {
    fn wake(&self) {
        fence(Ordering::SeqCst);
        if self.consumer_sleeping.swap(false, Ordering::SeqCst) {
            self.wake_consumer.notify_one();
        }
    }

    /// Pushes without waiting and without waking the consumer (a batch wakes it once).
    fn push_quiet(&self, env: Envelope) -> Push {
        if self.closed.load(Ordering::Acquire) {
            return Push::Refused(Error::TargetGone(self.inbox.id().clone()), env);
        }
        match self.policy {
            FullPolicy::Wait => match self.queue.push(env) {
                Ok(()) => Push::Queued,
                Err(env) => Push::Full(env),
            },
            FullPolicy::DropNewest => {
                if self.queue.push(env).is_err() {
                    self.count_drop();
                }
                Push::Queued
            }
            FullPolicy::DropOldest => {
                if self.queue.force_push(env).is_some() {
                    self.count_drop();
                }
                Push::Queued
            }
            FullPolicy::Fail => match self.queue.push(env) {
                Ok(()) => Push::Queued,
                Err(env) => Push::Refused(Error::MailboxFull(self.inbox.id().clone()), env),
            },
        }
    }

    /// Pushes without waiting; gives the envelope back only for `Wait` on a full mailbox.
    fn try_push(&self, env: Envelope) -> std::result::Result<Result<()>, Envelope> {
        match self.push_quiet(env) {
            Push::Queued => {
                self.wake();
                Ok(Ok(()))
            }
            Push::Full(env) => Err(env),
            Push::Refused(e @ Error::MailboxFull(_), _) => {
                self.wake();
                Ok(Err(e))
            }
            Push::Refused(e, _) => Ok(Err(e)),
        }
    }

    /// Pushes a batch in order, waking the consumer once per run of queued envelopes
    /// instead of once per envelope; on error the failing envelope and the rest stay in `envs`.
    async fn push_batch(&self, envs: &mut dyn Outgoing) -> Result<()> {
        let mut queued = false;
        while let Some(mut env) = envs.pop() {
            env.carried_by = Some(NAME);
            match self.push_quiet(env) {
                Push::Queued => queued = true,
                Push::Full(env) => {
                    // Let the consumer drain what is queued, wait for room, then try it again.
                    envs.push_front(env);
                    self.wake();
                    queued = false;
                    self.room().await;
                }
                Push::Refused(e, env) => {
                    if queued {
                        self.wake();
                    }
                    envs.push_front(env);
                    return Err(e);
                }
            }
        }
        if queued {
            self.wake();
        }
        Ok(())
    }

    fn count_drop(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        self.inbox.count_dropped();
    }

    /// Returns once the queue has room (or the mailbox closed): the consumer wakes senders
    /// that registered here whenever it takes an envelope.
    async fn room(&self) {
        let notified = self.not_full.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        self.waiting_senders.fetch_add(1, Ordering::SeqCst);
        if self.queue.is_full() && !self.closed.load(Ordering::Acquire) {
            notified.await;
        }
        self.waiting_senders.fetch_sub(1, Ordering::SeqCst);
    }

    async fn push(&self, env: Envelope) -> Result<()> {
        let mut env = match self.try_push(env) {
            Ok(r) => return r,
            Err(env) => env,
        };
        loop {
            let notified = self.not_full.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.waiting_senders.fetch_add(1, Ordering::SeqCst);
            let retry = self.try_push(env);
            match retry {
                Ok(r) => {
                    self.waiting_senders.fetch_sub(1, Ordering::SeqCst);
                    return r;
                }
                Err(e) => env = e,
            }
            notified.await;
            self.waiting_senders.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.consumer_sleeping.store(false, Ordering::SeqCst);
        self.wake_consumer.notify_one();
        self.not_full.notify_waiters();
    }

    async fn run(self: Arc<Self>, delivered: Arc<AtomicU64>) {
        let sync = self.inbox.is_sync();
        loop {
            let mut n = 0;
            while let Some(env) = self.queue.pop() {
                // Waiting senders are woken once half the queue is free, not on every pop: a
                // saturated stream then costs one wake-up per half queue instead of one per event.
                if self.waiting_senders.load(Ordering::SeqCst) > 0
                    && self.queue.len() <= self.queue.capacity() / 2
                {
                    self.not_full.notify_waiters();
                }
                if sync {
                    let _ = self.inbox.deliver_sync(env);
                } else {
                    self.inbox.deliver(env).await;
                }
                n += 1;
                if n % BATCH == 0 {
                    delivered.fetch_add(BATCH as u64, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
                if self.closed.load(Ordering::Acquire) {
                    return;
                }
            }
            delivered.fetch_add((n % BATCH) as u64, Ordering::Relaxed);
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            self.consumer_sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if !self.queue.is_empty() {
                self.consumer_sleeping.store(false, Ordering::SeqCst);
                continue;
            }
            self.wake_consumer.notified().await;
        }
    }
}

/// What [`Mailbox::push_quiet`] did with an envelope.
enum Push {
    /// In the queue (or dropped by the mailbox's policy, and counted).
    Queued,
    /// The mailbox is full and its policy is `Wait`.
    Full(Envelope),
    /// Refused: the mailbox is closed, or full with policy `Fail`.
    Refused(Error, Envelope),
}

fn push_now(mb: &Mailbox, mut env: Envelope) -> TrySend {
    env.carried_by = Some(NAME);
    match mb.try_push(env) {
        Ok(r) => TrySend::Done(r),
        Err(env) => TrySend::Pending(env),
    }
}

struct Sub {
    id: u64,
    topic: Option<TopicPattern>,
    group: Option<Arc<str>>,
    filter: Option<Filter>,
    mailbox: Arc<Mailbox>,
}

type Mailboxes = HashMap<MachineId, (Arc<Mailbox>, tokio::task::JoinHandle<()>)>;

struct Fabric {
    mailboxes: RwLock<Mailboxes>,
    subs: RwLock<Vec<Arc<Sub>>>,
    group_next: Mutex<HashMap<Arc<str>, usize>>,
    next_sub: AtomicU64,
    closed: AtomicBool,
    delivered: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

/// The same-process transport of one session.
pub struct MemoryTransport {
    caps: Capabilities,
    fabric: Fabric,
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
            },
            fabric: Fabric {
                mailboxes: RwLock::new(HashMap::new()),
                subs: RwLock::new(Vec::new()),
                group_next: Mutex::new(HashMap::new()),
                next_sub: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                delivered: Arc::new(AtomicU64::new(0)),
                dropped: Arc::new(AtomicU64::new(0)),
            },
        }
    }

    fn mailbox(&self, to: &MachineId) -> Result<Arc<Mailbox>> {
        if self.fabric.closed.load(Ordering::Acquire) {
            return Err(Error::Closed(NAME));
        }
        read(&self.fabric.mailboxes)
            .get(to)
            .map(|(m, _)| m.clone())
            .ok_or_else(|| Error::TargetGone(to.clone()))
    }

    /// Picks the receivers of a published envelope: every plain match, one member per matching group.
    fn receivers(&self, target: &Address, env: &Envelope) -> Vec<Arc<Mailbox>> {
        let parts: Vec<&str> = match target {
            Address::Topic(t) => t.split('.').collect(),
            _ => Vec::new(),
        };
        let subs = read(&self.fabric.subs);
        let mut out = Vec::new();
        let mut groups: Vec<(Arc<str>, Vec<Arc<Mailbox>>)> = Vec::new();
        for s in subs.iter() {
            let hit = match (target, &s.topic, &s.group) {
                (Address::Topic(_), Some(p), _) => p.matches_segments(&parts),
                (Address::Group(g), None, Some(sg)) => g == sg,
                _ => false,
            };
            if !hit || s.filter.as_ref().is_some_and(|f| !f(env)) {
                continue;
            }
            match &s.group {
                Some(g) => match groups.iter_mut().find(|(name, _)| name == g) {
                    Some((_, members)) => members.push(s.mailbox.clone()),
                    None => groups.push((g.clone(), vec![s.mailbox.clone()])),
                },
                None => out.push(s.mailbox.clone()),
            }
        }
        drop(subs);
        if !groups.is_empty() {
            let mut next = self
                .fabric
                .group_next
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (g, members) in groups {
                let i = next.entry(g).or_insert(0);
                out.push(members[*i % members.len()].clone());
                *i = i.wrapping_add(1);
            }
        }
        out
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
        if self.fabric.closed.load(Ordering::Acquire) {
            return Err(Error::Closed(NAME));
        }
        let cfg = inbox.mailbox();
        let mut boxes = write(&self.fabric.mailboxes);
        if boxes.contains_key(&entry.id) {
            return Err(Error::DuplicateId(entry.id.clone()));
        }
        let mb = Arc::new(Mailbox {
            queue: ArrayQueue::new(cfg.capacity.max(1)),
            policy: cfg.policy,
            consumer_sleeping: AtomicBool::new(false),
            wake_consumer: Notify::new(),
            waiting_senders: AtomicUsize::new(0),
            not_full: Notify::new(),
            closed: AtomicBool::new(false),
            dropped: self.fabric.dropped.clone(),
            inbox,
        });
        let task = tokio::spawn(mb.clone().run(self.fabric.delivered.clone()));
        boxes.insert(entry.id.clone(), (mb, task));
        Ok(())
    }

    async fn unbind(&self, id: &MachineId) -> Result<()> {
        if let Some((mb, task)) = write(&self.fabric.mailboxes).remove(id) {
            mb.close();
            task.abort();
        }
        write(&self.fabric.subs).retain(|s| s.mailbox.inbox.id() != id);
        Ok(())
    }

    fn try_send(&self, to: &MachineId, env: Envelope) -> TrySend {
        match self.mailbox(to) {
            Ok(mb) => push_now(&mb, env),
            Err(e @ Error::Closed(_)) => TrySend::Retry(e, env),
            Err(e) => TrySend::Done(Err(e)),
        }
    }

    fn resolve(&self, to: &MachineId) -> Option<TargetHandle> {
        self.mailbox(to).ok().map(|m| m as TargetHandle)
    }

    fn try_send_resolved(&self, handle: &TargetHandle, to: &MachineId, env: Envelope) -> TrySend {
        match handle.downcast_ref::<Mailbox>() {
            Some(mb) if !mb.closed.load(Ordering::Acquire) => push_now(mb, env),
            _ => self.try_send(to, env),
        }
    }

    async fn send(&self, to: &MachineId, mut env: Envelope) -> Result<()> {
        let mb = self.mailbox(to)?;
        env.carried_by = Some(NAME);
        mb.push(env).await
    }

    async fn send_batch(&self, to: &MachineId, envs: &mut dyn Outgoing) -> Result<()> {
        if envs.is_empty() {
            return Ok(());
        }
        self.mailbox(to)?.push_batch(envs).await
    }

    async fn publish(&self, mut env: Envelope) -> Result<usize> {
        if self.fabric.closed.load(Ordering::Acquire) {
            return Err(Error::Closed(NAME));
        }
        env.carried_by = Some(NAME);
        let target = env.target.clone();
        let receivers = self.receivers(&target, &env);
        let mut n = 0;
        for mb in receivers {
            // A receiver that left meanwhile is skipped; the others still get theirs.
            if mb.push(env.clone()).await.is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn subscribe(&self, sub: Subscription) -> Result<SubscriptionId> {
        let mailbox = self.mailbox(sub.inbox.id())?;
        let id = self.fabric.next_sub.fetch_add(1, Ordering::Relaxed);
        write(&self.fabric.subs).push(Arc::new(Sub {
            id,
            topic: sub.topic,
            group: sub.group,
            filter: sub.filter,
            mailbox,
        }));
        Ok(SubscriptionId(id))
    }

    async fn unsubscribe(&self, id: SubscriptionId) -> Result<()> {
        write(&self.fabric.subs).retain(|s| s.id != id.0);
        Ok(())
    }

    fn health(&self) -> TransportHealth {
        let closed = self.fabric.closed.load(Ordering::Acquire);
        TransportHealth {
            healthy: !closed,
            detail: format!(
                "{} mailboxes, {} subscriptions{}",
                read(&self.fabric.mailboxes).len(),
                read(&self.fabric.subs).len(),
                if closed { ", closed" } else { "" }
            ),
            delivered: self.fabric.delivered.load(Ordering::Relaxed),
            dropped: self.fabric.dropped.load(Ordering::Relaxed),
        }
    }

    fn close(&self) {
        self.fabric.closed.store(true, Ordering::Release);
        for (_, (mb, task)) in write(&self.fabric.mailboxes).drain() {
            mb.close();
            task.abort();
        }
        write(&self.fabric.subs).clear();
    }
}
