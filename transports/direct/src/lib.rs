//! Switchyard `direct` transport: same-thread delivery by calling the target's handler.
//!
//! No serialization, no channel: a send runs the target's synchronous handler on
//! the sender's task. A borrowed handler (`handler_ref`) gets the sender's value
//! itself, without an envelope being built. Re-entrant sends (A's handler sends to
//! B, whose handler sends back to A) neither recurse nor deadlock: each
//! single-threaded context has a run-to-completion queue; a send made while that
//! context is already running a handler is queued and run by the call that runs
//! the context when the handler returns. Events queued that way keep their order
//! per sender, also when senders on several threads share a context. The queue is
//! bounded ([`DEFAULT_QUEUE_CAPACITY`]); past it a send fails with
//! `Error::QueueFull`. An event of higher priority queued there overtakes those of
//! lower priority.
//!
//! An async handler cannot run inline: its events go to the machine's mailbox and
//! run on its task, so a sender never waits for an async handler (and a request's
//! timeout holds while the target works).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use switchyard_core::{
    Capabilities, DeliveryGuarantee, Envelope, Error, EventRef, Inbox, Link, Location,
    MachineEntry, MachineId, MessageOrdering, Offer, Outgoing, Result, Transport, TransportHealth,
};

/// Name shown in `Envelope::carried_by`.
pub const NAME: &str = "direct";

/// Most events one context may have queued by re-entrant sends.
pub const DEFAULT_QUEUE_CAPACITY: usize = 65_536;

/// One single-threaded context's run-to-completion queue.
struct RunQueue {
    /// Held by whoever runs the context's handlers now.
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
                priority: true,
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
}

/// A link to one machine of this transport.
struct DirectLink {
    target: Arc<Target>,
    state: Arc<State>,
}

impl DirectLink {
    fn check(&self) -> Result<()> {
        if self.state.closed.load(Ordering::Acquire) {
            return Err(Error::Closed(NAME));
        }
        if !self.target.bound.load(Ordering::Acquire) || self.target.inbox.is_closed() {
            return Err(Error::TargetGone(self.target.inbox.id().clone()));
        }
        Ok(())
    }

    fn enqueue(&self, env: Envelope) -> std::result::Result<(), (Error, Envelope)> {
        let q = &self.target.queue;
        let mut items = lock(&q.items);
        if items.len() >= self.state.capacity {
            return Err((
                Error::QueueFull {
                    what: "direct run-to-completion queue",
                    capacity: self.state.capacity,
                },
                env,
            ));
        }
        // An urgent event overtakes the queued events of lower priority (FIFO within one).
        let p = env.headers.priority;
        let at = if p == 0 {
            items.len()
        } else {
            items
                .iter()
                .rposition(|(_, e)| e.headers.priority >= p)
                .map_or(0, |i| i + 1)
        };
        items.insert(at, (self.target.inbox.clone(), env));
        q.queued.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Runs or queues the front event of `out` for a synchronous handler.
    fn run_one(&self, out: &mut dyn Outgoing) -> Result<()> {
        let t = &self.target;
        let q = &t.queue;
        if q.draining.swap(true, Ordering::SeqCst) {
            // The context is running a handler (a re-entrant send, or another thread):
            // queue behind it; whoever runs the context runs this too.
            let Some(env) = out.pop_by(NAME) else {
                return Ok(());
            };
            let Some(env) = t.inbox.complete_reply(env) else {
                return Ok(());
            };
            if let Err((e, env)) = self.enqueue(env) {
                out.push_front(env);
                return Err(e);
            }
            // The runner may have finished between our check and our push: take over.
            if !q.draining.load(Ordering::SeqCst) && !q.draining.swap(true, Ordering::SeqCst) {
                drain(&self.state, q);
            }
            return Ok(());
        }
        // We run the context now. Events queued before ours go first (FIFO per sender
        // even when a sender on another thread queued just before the last runner left).
        if q.queued.load(Ordering::SeqCst) > 0 {
            if let Some(env) = out.pop_by(NAME)
                && let Some(env) = t.inbox.complete_reply(env)
                && let Err((e, env)) = self.enqueue(env)
            {
                out.push_front(env);
                drain(&self.state, q);
                return Err(e);
            }
            drain(&self.state, q);
            return Ok(());
        }
        let handed = match out.front() {
            Some(ev) if t.inbox.takes_refs() => t.inbox.deliver_ref(EventRef {
                id: ev.id,
                source: ev.source.as_str(),
                event: ev.event,
                payload: ev.payload,
                headers: ev.headers,
                carried_by: Some(NAME),
            }),
            _ => false,
        };
        if handed {
            out.advance();
        } else if let Some(env) = out.pop_by(NAME) {
            // A synchronous handler never gives the event back.
            let _ = t.inbox.deliver_sync(env);
        }
        drain(&self.state, q);
        Ok(())
    }
}

#[async_trait]
impl Link for DirectLink {
    fn try_send(&self, out: &mut dyn Outgoing) -> Result<()> {
        self.check()?;
        if !self.target.inbox.is_sync() {
            // An async handler runs on the machine's own task: queue in its mailbox.
            let mut queued = false;
            let r = loop {
                let Some(letter) = out.pop_letter(NAME, self.target.inbox.mailbox().letters())
                else {
                    break Ok(());
                };
                let inbox = &self.target.inbox;
                match inbox.offer(letter) {
                    Offer::Taken => queued = true,
                    Offer::Full(back) => {
                        out.push_front(back.into_envelope(inbox.id()));
                        break Ok(());
                    }
                    Offer::Refused(e, back) => {
                        out.push_front(back.into_envelope(inbox.id()));
                        break Err(e);
                    }
                }
            };
            if queued {
                self.target.inbox.notify();
            }
            return r;
        }
        while !out.is_empty() {
            self.run_one(out)?;
        }
        Ok(())
    }

    async fn send(&self, out: &mut dyn Outgoing) -> Result<()> {
        loop {
            self.try_send(out)?;
            if out.is_empty() {
                return Ok(());
            }
            self.target.inbox.room().await;
        }
    }

    fn is_open(&self) -> bool {
        self.target.bound.load(Ordering::Acquire)
            && !self.target.inbox.is_closed()
            && !self.state.closed.load(Ordering::Acquire)
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

/// Whether the caller may keep running after finding the queue empty (someone may have queued meanwhile).
fn release(q: &RunQueue) -> bool {
    q.draining.store(false, Ordering::SeqCst);
    q.queued.load(Ordering::SeqCst) > 0 && !q.draining.swap(true, Ordering::SeqCst)
}

/// Runs the queued events of a context until it is empty, then gives the context up.
fn drain(state: &State, q: &RunQueue) {
    loop {
        match pop(q) {
            Some((inbox, env)) => {
                match inbox.deliver_sync(env) {
                    Ok(_) => {}
                    // An async handler whose mailbox is full: the event waits for room on a task.
                    Err(env) => {
                        tokio::spawn(async move {
                            let _ = inbox.deliver(env).await;
                        });
                    }
                }
                // Only events that waited in a run queue are counted: a count per direct
                // call would cost as much as the call (NodeStats::handled counts them all).
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

    async fn link(&self, to: &MachineEntry) -> Result<Arc<dyn Link>> {
        if self.state.closed.load(Ordering::Acquire) {
            return Err(Error::Closed(NAME));
        }
        let target = self
            .state
            .targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&to.id)
            .cloned()
            .ok_or_else(|| Error::TargetGone(to.id.clone()))?;
        if target.inbox.is_closed() {
            return Err(Error::TargetGone(to.id.clone()));
        }
        Ok(Arc::new(DirectLink {
            target,
            state: self.state.clone(),
        }))
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
        let targets: Vec<_> = self
            .state
            .targets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for (_, t) in targets {
            t.bound.store(false, Ordering::Release);
        }
        for q in lock(&self.state.contexts).drain().map(|(_, q)| q) {
            lock(&q.items).clear();
        }
    }
}
