//! Switchyard `direct` transport: same-thread delivery by calling the target's handler.
//!
//! No serialization, no channel: a send runs the target's handler on the
//! sender's task. Re-entrant sends (A's handler sends to B, whose handler sends
//! back to A) neither recurse nor deadlock: each single-threaded context has a
//! run-to-completion queue; a send made while that context is already running a
//! handler is queued and run by the outermost call when the handler returns.
//! The queue is bounded ([`DEFAULT_QUEUE_CAPACITY`]); past it a send fails with
//! `Error::QueueFull`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use switchyard_core::{
    Capabilities, DeliveryGuarantee, Envelope, Error, Inbox, Location, MachineEntry, MachineId,
    MessageOrdering, Result, TargetHandle, Transport, TransportHealth, TrySend,
};

/// Name shown in `Envelope::carried_by`.
pub const NAME: &str = "direct";

/// Most events one context may have queued by re-entrant sends.
pub const DEFAULT_QUEUE_CAPACITY: usize = 65_536;

struct RunQueue {
    draining: AtomicBool,
    queued: AtomicUsize,
    items: Mutex<VecDeque<(Inbox, Envelope)>>,
}

struct Target {
    inbox: Inbox,
    queue: Arc<RunQueue>,
    bound: AtomicBool,
}

struct State {
    targets: RwLock<HashMap<MachineId, Arc<Target>>>,
    contexts: Mutex<HashMap<Option<u64>, Arc<RunQueue>>>,
    capacity: usize,
    closed: AtomicBool,
    delivered: AtomicU64,
}

/// The same-thread transport of one session.
pub struct DirectTransport {
    caps: Capabilities,
    state: Arc<State>,
}

impl Default for DirectTransport {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DirectTransport {
    /// A direct transport with the default run-queue bound.
    pub fn new() -> DirectTransport {
        Self::with_capacity(DEFAULT_QUEUE_CAPACITY)
    }

    /// A direct transport whose run queues hold at most `capacity` events.
    pub fn with_capacity(capacity: usize) -> DirectTransport {
        DirectTransport {
            caps: Capabilities {
                locations: vec![Location::SameThread],
                ordering: MessageOrdering::PerSenderReceiver,
                delivery: DeliveryGuarantee::AtMostOnce,
                max_message_size: None,
                serializes: false,
                topics: false,
                groups: false,
                request: true,
                mailboxes: false,
            },
            state: Arc::new(State {
                targets: RwLock::new(HashMap::new()),
                contexts: Mutex::new(HashMap::new()),
                capacity: capacity.max(1),
                closed: AtomicBool::new(false),
                delivered: AtomicU64::new(0),
            }),
        }
    }

    fn target(&self, to: &MachineId) -> Result<Arc<Target>> {
        if self.state.closed.load(Ordering::Acquire) {
            return Err(Error::Closed(NAME));
        }
        self.state
            .targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(to)
            .cloned()
            .ok_or_else(|| Error::TargetGone(to.clone()))
    }

    fn enqueue(&self, q: &RunQueue, inbox: Inbox, env: Envelope) -> Result<()> {
        let mut items = lock(&q.items);
        if items.len() >= self.state.capacity {
            return Err(Error::QueueFull {
                what: "direct run-to-completion queue",
                capacity: self.state.capacity,
            });
        }
        items.push_back((inbox, env));
        q.queued.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl DirectTransport {
    /// If a drain already runs in the target's context (a re-entrant or concurrent send), queues
    /// the envelope for it and says whether the caller must take the drain over (it ended meanwhile).
    /// Otherwise the caller now owns the drain and gets the envelope back.
    fn queue_behind_drain(
        &self,
        t: &Target,
        env: Envelope,
    ) -> std::result::Result<(Result<()>, bool), Envelope> {
        let q = &t.queue;
        if !q.draining.swap(true, Ordering::SeqCst) {
            return Err(env);
        }
        let r = self.enqueue(q, t.inbox.clone(), env);
        let take_over = r.is_ok()
            && !q.draining.load(Ordering::SeqCst)
            && !q.draining.swap(true, Ordering::SeqCst);
        Ok((r, take_over))
    }

    fn try_deliver(&self, t: &Target, mut env: Envelope) -> TrySend {
        env.carried_by = Some(NAME);
        let q = &t.queue;
        let env = match self.queue_behind_drain(t, env) {
            Ok((r, take_over)) => {
                if take_over {
                    drain_sync(&self.state, q);
                }
                return TrySend::Done(r);
            }
            Err(env) => env,
        };
        match t.inbox.deliver_sync(env) {
            Ok(()) => {
                self.state.delivered.fetch_add(1, Ordering::Relaxed);
                drain_sync(&self.state, q);
                TrySend::Done(Ok(()))
            }
            Err(env) => {
                // Async handler: give up the drain and let `send` await it.
                if release(q) {
                    drain_sync(&self.state, q);
                }
                TrySend::Pending(env)
            }
        }
    }
}

fn pop(q: &RunQueue) -> Option<(Inbox, Envelope)> {
    if q.queued.load(Ordering::SeqCst) == 0 {
        return None;
    }
    let item = lock(&q.items).pop_front();
    if item.is_some() {
        q.queued.fetch_sub(1, Ordering::SeqCst);
    }
    item
}

/// Whether the caller may keep draining after finding the queue empty (someone may have queued meanwhile).
fn release(q: &RunQueue) -> bool {
    q.draining.store(false, Ordering::SeqCst);
    q.queued.load(Ordering::SeqCst) > 0 && !q.draining.swap(true, Ordering::SeqCst)
}

/// Drains synchronously; an async handler met on the way moves the rest of the drain to a task.
fn drain_sync(state: &Arc<State>, q: &Arc<RunQueue>) {
    loop {
        match pop(q) {
            Some((inbox, env)) => match inbox.deliver_sync(env) {
                Ok(()) => {
                    state.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Err(env) => {
                    let (state, q) = (state.clone(), q.clone());
                    tokio::spawn(async move {
                        inbox.deliver(env).await;
                        state.delivered.fetch_add(1, Ordering::Relaxed);
                        drain_async(&state, &q).await;
                    });
                    return;
                }
            },
            None => {
                if !release(q) {
                    return;
                }
            }
        }
    }
}

async fn drain_async(state: &Arc<State>, q: &Arc<RunQueue>) {
    loop {
        match pop(q) {
            Some((inbox, env)) => {
                if let Err(env) = inbox.deliver_sync(env) {
                    inbox.deliver(env).await;
                }
                state.delivered.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                if !release(q) {
                    return;
                }
            }
        }
    }
}

#[async_trait]
impl Transport for DirectTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn bind(&self, entry: &MachineEntry, inbox: Inbox) -> Result<()> {
        if self.state.closed.load(Ordering::Acquire) {
            return Err(Error::Closed(NAME));
        }
        let queue = lock(&self.state.contexts)
            .entry(entry.context)
            .or_insert_with(|| {
                Arc::new(RunQueue {
                    draining: AtomicBool::new(false),
                    queued: AtomicUsize::new(0),
                    items: Mutex::new(VecDeque::new()),
                })
            })
            .clone();
        let mut targets = self
            .state
            .targets
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if targets.contains_key(&entry.id) {
            return Err(Error::DuplicateId(entry.id.clone()));
        }
        targets.insert(
            entry.id.clone(),
            Arc::new(Target {
                inbox,
                queue,
                bound: AtomicBool::new(true),
            }),
        );
        Ok(())
    }

    async fn unbind(&self, id: &MachineId) -> Result<()> {
        let removed = self
            .state
            .targets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(t) = removed {
            t.bound.store(false, Ordering::Release);
        }
        Ok(())
    }

    fn try_send(&self, to: &MachineId, env: Envelope) -> TrySend {
        match self.target(to) {
            Ok(t) => self.try_deliver(&t, env),
            Err(e @ Error::Closed(_)) => TrySend::Retry(e, env),
            Err(e) => TrySend::Done(Err(e)),
        }
    }

    fn resolve(&self, to: &MachineId) -> Option<TargetHandle> {
        self.target(to).ok().map(|t| t as TargetHandle)
    }

    fn try_send_resolved(&self, handle: &TargetHandle, to: &MachineId, env: Envelope) -> TrySend {
        match handle.downcast_ref::<Target>() {
            Some(t)
                if t.bound.load(Ordering::Acquire)
                    && !self.state.closed.load(Ordering::Acquire) =>
            {
                self.try_deliver(t, env)
            }
            _ => self.try_send(to, env),
        }
    }

    async fn send(&self, to: &MachineId, mut env: Envelope) -> Result<()> {
        let t = self.target(to)?;
        env.carried_by = Some(NAME);
        let q = &t.queue;
        let env = match self.queue_behind_drain(&t, env) {
            Ok((r, take_over)) => {
                if take_over {
                    drain_async(&self.state, q).await;
                }
                return r;
            }
            Err(env) => env,
        };
        t.inbox.deliver(env).await;
        self.state.delivered.fetch_add(1, Ordering::Relaxed);
        drain_async(&self.state, q).await;
        Ok(())
    }

    fn health(&self) -> TransportHealth {
        let closed = self.state.closed.load(Ordering::Acquire);
        TransportHealth {
            healthy: !closed,
            detail: if closed { "closed".into() } else { "ok".into() },
            delivered: self.state.delivered.load(Ordering::Relaxed),
            dropped: 0,
        }
    }

    fn close(&self) {
        self.state.closed.store(true, Ordering::Release);
        self.state
            .targets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for q in lock(&self.state.contexts).drain().map(|(_, q)| q) {
            lock(&q.items).clear();
        }
    }
}
