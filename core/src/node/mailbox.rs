//! A machine's mailbox: a bounded queue drained by one task that runs the handler.
//!
//! Started on first use, so a machine that is only ever reached by direct calls
//! runs no task. Events of priority 0 go through a lock-free ring; higher
//! priorities wait in a small locked list, checked first, so an urgent event
//! overtakes everything queued below it while each priority stays FIFO.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use crossbeam_queue::ArrayQueue;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use crate::envelope::{Envelope, Headers};
use crate::error::{Error, Result};
use crate::letter::{Done, Letter, LetterData, LetterPool};
use crate::node::inbox::{FullPolicy, MailboxConfig};
use crate::node::{Node, NodeInner};
use crate::session::lock;

/// Events the mailbox task handles before yielding to the scheduler.
const BATCH: usize = 128;

/// What [`Mailbox::push_quiet`] did with a letter.
pub(crate) enum Push {
    /// In the queue, or dropped by the mailbox's policy (and counted).
    Queued,
    /// The mailbox is full and its policy is `Wait`.
    Full(Letter),
    /// Refused: the mailbox is closed, or full with policy `Fail`.
    Refused(Error, Letter),
}

/// What a mailbox slot holds: a shared envelope, or a letter's fields in a reused box.
pub(crate) enum Queued {
    Envelope(Envelope),
    Boxed(Box<LetterData>),
    Tracked(Envelope, Done),
}

impl Queued {
    fn headers(&self) -> &Headers {
        match self {
            Queued::Envelope(e) | Queued::Tracked(e, _) => &e.headers,
            Queued::Boxed(d) => &d.headers,
        }
    }
}

/// Events of priority above 0, highest first, FIFO within each priority.
#[derive(Default)]
struct Urgent {
    /// (priority, events), sorted by priority, highest first.
    levels: Vec<(u8, VecDeque<Queued>)>,
}

impl Urgent {
    fn push(&mut self, env: Queued) {
        let p = env.headers().priority;
        match self.levels.binary_search_by(|(q, _)| p.cmp(q)) {
            Ok(i) => self.levels[i].1.push_back(env),
            Err(i) => self.levels.insert(i, (p, VecDeque::from([env]))),
        }
    }
    fn pop(&mut self) -> Option<Queued> {
        let (_, q) = self.levels.first_mut()?;
        let env = q.pop_front();
        if q.is_empty() {
            self.levels.remove(0);
        }
        env
    }
    /// Drops the oldest event of the lowest priority.
    fn pop_lowest(&mut self) -> Option<Queued> {
        let (_, q) = self.levels.last_mut()?;
        let env = q.pop_front();
        if q.is_empty() {
            self.levels.pop();
        }
        env
    }
}

/// A machine's bounded mailbox; see the module docs.
pub struct Mailbox {
    normal: ArrayQueue<Queued>,
    pool: LetterPool,
    urgent: Mutex<Urgent>,
    urgent_len: AtomicUsize,
    capacity: usize,
    policy: FullPolicy,
    consumer_sleeping: AtomicBool,
    consumer: AtomicWaker,
    waiting_senders: AtomicUsize,
    not_full: Notify,
    closed: AtomicBool,
    started: AtomicBool,
    dropped: AtomicU64,
}

impl Mailbox {
    pub(crate) fn new(cfg: MailboxConfig) -> Mailbox {
        let capacity = cfg.capacity.max(1);
        Mailbox {
            normal: ArrayQueue::new(capacity),
            pool: LetterPool::new(capacity),
            urgent: Mutex::new(Urgent::default()),
            urgent_len: AtomicUsize::new(0),
            capacity,
            policy: cfg.policy,
            consumer_sleeping: AtomicBool::new(false),
            consumer: AtomicWaker::new(),
            waiting_senders: AtomicUsize::new(0),
            not_full: Notify::new(),
            closed: AtomicBool::new(false),
            started: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        }
    }

    /// Events queued now.
    pub fn len(&self) -> usize {
        self.normal.len() + self.urgent_len.load(Ordering::Acquire)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the mailbox was closed (its machine left).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Events dropped by the full policy so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Starts the draining task the first time anything is queued.
    pub(crate) fn ensure_started(self: &Arc<Self>, node: &Arc<NodeInner>) {
        if !self.started.load(Ordering::Acquire) && !self.started.swap(true, Ordering::AcqRel) {
            let node = Node::from_inner(node.clone());
            let rt = node.0.session.runtime.clone();
            rt.spawn(self.clone().run(node));
        }
    }

    pub(crate) fn wake(&self) {
        fence(Ordering::SeqCst);
        if self.consumer_sleeping.swap(false, Ordering::SeqCst) {
            self.consumer.wake();
        }
    }

    fn count_drop(&self, node: &NodeInner) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        node.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// The allocations this mailbox's letters reuse (see [`crate::Outgoing::pop_letter`]).
    pub fn letters(&self) -> &LetterPool {
        &self.pool
    }

    fn queued(&self, letter: Letter) -> Queued {
        match letter {
            Letter::Envelope(e) => Queued::Envelope(e),
            Letter::Data(d) => Queued::Boxed(d),
            Letter::Tracked(e, done) => Queued::Tracked(e, done),
        }
    }

    fn letter(&self, q: Queued) -> Letter {
        match q {
            Queued::Envelope(e) => Letter::Envelope(e),
            Queued::Boxed(b) => Letter::Data(b),
            Queued::Tracked(e, done) => Letter::Tracked(e, done),
        }
    }

    /// Queues without waiting and without waking the consumer (a batch wakes it once).
    pub(crate) fn push_quiet(&self, node: &NodeInner, letter: Letter) -> Push {
        if self.closed.load(Ordering::Acquire) {
            return Push::Refused(Error::TargetGone(node.entry.id.clone()), letter);
        }
        let q = self.queued(letter);
        if q.headers().priority > 0 {
            return self.push_urgent(node, q);
        }
        match self.policy {
            FullPolicy::Wait => match self.normal.push(q) {
                Ok(()) => Push::Queued,
                Err(q) => Push::Full(self.letter(q)),
            },
            FullPolicy::DropNewest => {
                if self.normal.push(q).is_err() {
                    self.count_drop(node);
                }
                Push::Queued
            }
            FullPolicy::DropOldest => {
                if self.normal.force_push(q).is_some() {
                    self.count_drop(node);
                }
                Push::Queued
            }
            FullPolicy::Fail => match self.normal.push(q) {
                Ok(()) => Push::Queued,
                Err(q) => Push::Refused(Error::MailboxFull(node.entry.id.clone()), self.letter(q)),
            },
        }
    }

    fn push_urgent(&self, node: &NodeInner, q: Queued) -> Push {
        let mut urgent = lock(&self.urgent);
        if self.urgent_len.load(Ordering::Acquire) >= self.capacity {
            match self.policy {
                FullPolicy::Wait => return Push::Full(self.letter(q)),
                FullPolicy::Fail => {
                    return Push::Refused(
                        Error::MailboxFull(node.entry.id.clone()),
                        self.letter(q),
                    );
                }
                FullPolicy::DropNewest => {
                    self.count_drop(node);
                    return Push::Queued;
                }
                FullPolicy::DropOldest => {
                    if urgent.pop_lowest().is_some() {
                        self.urgent_len.fetch_sub(1, Ordering::AcqRel);
                        self.count_drop(node);
                    }
                }
            }
        }
        urgent.push(q);
        self.urgent_len.fetch_add(1, Ordering::AcqRel);
        Push::Queued
    }

    /// Queues without waiting; gives the envelope back only for `Wait` on a full mailbox.
    pub(crate) fn try_push(
        &self,
        node: &NodeInner,
        env: Envelope,
    ) -> std::result::Result<Result<()>, Envelope> {
        match self.push_quiet(node, Letter::Envelope(env)) {
            Push::Queued => {
                self.wake();
                Ok(Ok(()))
            }
            Push::Full(letter) => {
                self.wake();
                Err(letter.into_envelope(&node.entry.id))
            }
            Push::Refused(e, _) => Ok(Err(e)),
        }
    }

    /// Returns once the queue may have room (or the mailbox closed): the consumer wakes
    /// senders that registered here once half the queue is free.
    pub(crate) async fn room(&self) {
        let notified = self.not_full.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        self.waiting_senders.fetch_add(1, Ordering::SeqCst);
        let full = self.normal.is_full() || self.urgent_len.load(Ordering::SeqCst) >= self.capacity;
        if full && !self.closed.load(Ordering::Acquire) {
            self.wake();
            notified.await;
        }
        self.waiting_senders.fetch_sub(1, Ordering::SeqCst);
    }

    /// Queues, waiting for room while the mailbox is full and its policy is `Wait`.
    pub(crate) async fn push(&self, node: &NodeInner, mut env: Envelope) -> Result<()> {
        loop {
            match self.try_push(node, env) {
                Ok(r) => return r,
                Err(back) => env = back,
            }
            self.room().await;
        }
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.consumer_sleeping.store(false, Ordering::SeqCst);
        self.consumer.wake();
        self.not_full.notify_waiters();
        // Queued events die with the mailbox; dropping them now releases their payloads.
        while self.normal.pop().is_some() {}
        let mut urgent = lock(&self.urgent);
        urgent.levels.clear();
        self.urgent_len.store(0, Ordering::Release);
    }

    fn pop(&self) -> Option<Queued> {
        if self.urgent_len.load(Ordering::Acquire) > 0 {
            let mut urgent = lock(&self.urgent);
            if let Some(env) = urgent.pop() {
                self.urgent_len.fetch_sub(1, Ordering::AcqRel);
                return Some(env);
            }
        }
        self.normal.pop()
    }

    async fn run(self: Arc<Self>, node: Node) {
        let sync = node.inbox().is_sync();
        loop {
            let mut n = 0;
            while let Some(env) = self.pop() {
                // Waiting senders are woken once half the queue is free, not on every pop: a
                // saturated stream then costs one wake-up per half queue instead of one per event.
                if self.waiting_senders.load(Ordering::SeqCst) > 0
                    && self.normal.len() <= self.capacity / 2
                {
                    self.not_full.notify_waiters();
                }
                match env {
                    Queued::Envelope(env) if sync => {
                        let _ = node.inbox().run_sync(env);
                    }
                    Queued::Envelope(env) => node.inbox().run(env).await,
                    Queued::Tracked(env, done) => {
                        node.inbox().run(env).await;
                        let _ = done.0.send(());
                    }
                    Queued::Boxed(b) => {
                        if node.inbox().takes_refs() {
                            node.inbox().run_letter(&b);
                            self.pool.recycle(b);
                        } else {
                            let env = self.pool.take(b).into_envelope(&node.0.entry.id);
                            if sync {
                                let _ = node.inbox().run_sync(env);
                            } else {
                                node.inbox().run(env).await;
                            }
                        }
                    }
                }
                n += 1;
                if n % BATCH == 0 {
                    tokio::task::yield_now().await;
                }
                if self.closed.load(Ordering::Acquire) {
                    return;
                }
            }
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            if self.waiting_senders.load(Ordering::SeqCst) > 0 {
                self.not_full.notify_waiters();
            }
            self.consumer_sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if !self.is_empty() || self.closed.load(Ordering::Acquire) {
                self.consumer_sleeping.store(false, Ordering::SeqCst);
                continue;
            }
            poll_fn(|cx| {
                self.consumer.register(cx.waker());
                if self.consumer_sleeping.load(Ordering::SeqCst)
                    && !self.closed.load(Ordering::Acquire)
                {
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
        }
    }
}
