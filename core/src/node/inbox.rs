//! The receiving side of a machine: its handler, its mailbox, and [`Inbox`], what
//! transports deliver to.
//!
//! Every delivery path keeps three rules, whichever transport calls it:
//! - a reply completes its pending request at once, never queueing behind the
//!   handler (so an async handler can await a request whose reply comes back the
//!   way the event that started it came);
//! - an event whose expiry has passed is dropped and counted;
//! - a synchronous handler may run on the delivering task, an async one always
//!   runs on the machine's mailbox task, so a transport never awaits a handler.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use crate::address::MachineId;
use crate::envelope::{Envelope, EventRef, coarse_now_micros};
use crate::error::{Error, Result};
use crate::letter::{Letter, LetterData};
use crate::node::mailbox::{Mailbox, Push};
use crate::node::{Node, NodeInner};
use crate::registry::MachineEntry;
use crate::session::lock;

/// What a full mailbox does with one more message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FullPolicy {
    /// The sender waits until there is room (backpressure).
    #[default]
    Wait,
    /// The new message is dropped (and counted).
    DropNewest,
    /// The oldest queued message is dropped (and counted) to make room.
    DropOldest,
    /// The send fails with [`Error::MailboxFull`].
    Fail,
}

/// A machine's mailbox bound and policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MailboxConfig {
    /// Most messages queued at once (per priority class: priority 0, and above 0).
    pub capacity: usize,
    /// What happens when it is full.
    pub policy: FullPolicy,
}

impl Default for MailboxConfig {
    fn default() -> Self {
        MailboxConfig {
            capacity: 1024,
            policy: FullPolicy::Wait,
        }
    }
}

type SyncFn = dyn Fn(&Node, Envelope) + Send + Sync;
type RefFn = dyn Fn(&Node, EventRef<'_>) + Send + Sync;
type AsyncFn = dyn Fn(Node, Envelope) -> BoxFuture<'static, ()> + Send + Sync;

/// A machine's event handler: synchronous (runs inline where the transport allows) or async.
#[derive(Clone)]
pub enum Handler {
    /// Runs to completion without awaiting; send from it with [`Node::post`].
    Sync(Arc<SyncFn>),
    /// May await; sends with [`Node::send`]. Runs on the machine's mailbox task.
    Async(Arc<AsyncFn>),
    /// Runs to completion on an event borrowed from where it arrived (no copy where the
    /// transport can avoid one); see [`crate::MachineBuilder::handler_ref`].
    Ref(Arc<RefFn>),
}

impl Handler {
    /// A synchronous handler.
    pub fn sync<F: Fn(&Node, Envelope) + Send + Sync + 'static>(f: F) -> Handler {
        Handler::Sync(Arc::new(f))
    }
    /// A synchronous handler on borrowed events.
    pub fn borrowed<F: Fn(&Node, EventRef<'_>) + Send + Sync + 'static>(f: F) -> Handler {
        Handler::Ref(Arc::new(f))
    }
    /// An async handler.
    pub fn async_fn<F, Fut>(f: F) -> Handler
    where
        F: Fn(Node, Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Handler::Async(Arc::new(move |n, e| Box::pin(f(n, e))))
    }
}

/// Completes once a delivered event's handler has run or the event was dropped; see
/// [`Inbox::deliver_tracked`].
pub struct Handled(Option<tokio::sync::oneshot::Receiver<()>>);

impl std::future::Future for Handled {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        match &mut self.0 {
            None => std::task::Poll::Ready(()),
            // A dropped sender means the event was dropped (policy, or the machine left).
            Some(rx) => std::pin::Pin::new(rx).poll(cx).map(|_| ()),
        }
    }
}

/// What [`Inbox::offer`] did with an event.
pub enum Offer {
    /// Taken: queued, completed a request, or dropped by the full policy (and counted).
    Taken,
    /// The mailbox is full and its policy is `Wait`: here is the event back; await [`Inbox::room`].
    Full(Letter),
    /// Refused (the machine left, or its mailbox is full with policy `Fail`): here is the event back.
    Refused(Error, Letter),
}

impl std::fmt::Debug for Offer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Offer::Taken => f.write_str("Taken"),
            Offer::Full(_) => f.write_str("Full(..)"),
            Offer::Refused(e, _) => write!(f, "Refused({e}, ..)"),
        }
    }
}

/// The receiving side of a machine, handed to transports by [`crate::Transport::bind`].
#[derive(Clone)]
pub struct Inbox(pub(crate) Node);

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Inbox({})", self.0.0.entry.id)
    }
}

impl Inbox {
    fn inner(&self) -> &Arc<NodeInner> {
        &self.0.0
    }

    /// The machine's id.
    pub fn id(&self) -> &MachineId {
        &self.inner().entry.id
    }
    /// The machine's registry entry.
    pub fn entry(&self) -> &MachineEntry {
        &self.inner().entry
    }
    /// The machine's mailbox bound and policy.
    pub fn mailbox_config(&self) -> MailboxConfig {
        self.inner().mailbox_cfg
    }
    /// Whether the handler is synchronous (it may run on the delivering task).
    pub fn is_sync(&self) -> bool {
        !matches!(self.inner().handler, Some(Handler::Async(_)))
    }
    /// Whether the handler takes borrowed events, so a transport may call [`Inbox::deliver_ref`].
    pub fn takes_refs(&self) -> bool {
        matches!(self.inner().handler, Some(Handler::Ref(_)))
    }
    /// Whether the machine has left (closed, or its session shut down).
    pub fn is_closed(&self) -> bool {
        self.inner().closed.load(Ordering::Acquire)
    }
    /// Counts a message the transport dropped for this machine.
    pub fn count_dropped(&self) {
        self.inner().dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// The machine's mailbox, started on first use.
    pub fn mailbox(&self) -> &Arc<Mailbox> {
        self.inner().mailbox()
    }

    /// Completes the pending request `env` answers, if it is a reply; otherwise gives it back.
    ///
    /// A late reply (its request timed out) is dropped and counted.
    pub fn complete_reply(&self, env: Envelope) -> Option<Envelope> {
        if !env.headers.is_reply {
            return Some(env);
        }
        let node = self.inner();
        let waiter = env
            .headers
            .correlation_id
            .and_then(|c| lock(&node.pending).remove(&c));
        match waiter {
            Some(tx) => {
                let _ = tx.send(env);
            }
            None => {
                node.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        None
    }

    /// Runs a borrowed handler on `ev` without building an envelope; `false` (nothing done)
    /// when the handler is of another kind or `ev` is a reply or has an expiry, which need
    /// the envelope path.
    pub fn deliver_ref(&self, ev: EventRef<'_>) -> bool {
        match &self.inner().handler {
            Some(Handler::Ref(h)) if !ev.headers.is_reply && ev.headers.expires_at_us.is_none() => {
                run_ref(&self.0, h, ev);
                true
            }
            _ => false,
        }
    }

    /// Queues `env` in the machine's mailbox, whatever its handler (what a transport that
    /// keeps one event at a time per machine does): replies complete at once, full-policy
    /// drops are counted. Does not wake the mailbox task; call [`Inbox::notify`] after a run.
    pub fn offer(&self, letter: impl Into<Letter>) -> Offer {
        let letter = match letter.into() {
            Letter::Envelope(env) => match self.complete_reply(env) {
                Some(env) => Letter::Envelope(env),
                None => return Offer::Taken,
            },
            Letter::Data(d) if d.headers.is_reply => {
                match self.complete_reply((*d).into_envelope(self.id())) {
                    Some(env) => Letter::Envelope(env),
                    None => return Offer::Taken,
                }
            }
            Letter::Tracked(env, done) => match self.complete_reply(env) {
                Some(env) => Letter::Tracked(env, done),
                None => return Offer::Taken,
            },
            letter => letter,
        };
        let node = self.inner();
        let mb = node.mailbox();
        mb.ensure_started(node);
        match mb.push_quiet(node, letter) {
            Push::Queued => Offer::Taken,
            Push::Full(letter) => Offer::Full(letter),
            Push::Refused(e, letter) => Offer::Refused(e, letter),
        }
    }

    /// Wakes the mailbox task after events were queued with [`Inbox::offer`].
    pub fn notify(&self) {
        if let Some(mb) = self.inner().mailbox.get() {
            mb.wake();
        }
    }

    /// Returns once the mailbox may have room again (or the machine left).
    pub async fn room(&self) {
        let mb = self.inner().mailbox();
        mb.wake();
        mb.room().await;
    }

    /// Queues `env` in the mailbox, waiting for room while it is full and the policy is `Wait`.
    pub async fn queue(&self, letter: impl Into<Letter>) -> Result<()> {
        let mut letter = letter.into();
        loop {
            match self.offer(letter) {
                Offer::Taken => {
                    self.notify();
                    return Ok(());
                }
                Offer::Full(back) => letter = back,
                Offer::Refused(e, _) => return Err(e),
            }
            self.room().await;
        }
    }

    /// Delivers without waiting: a reply completes its request; a synchronous handler
    /// runs here; an async handler's event goes to the mailbox. Gives the event back when
    /// the mailbox is full and its policy is `Wait` (await [`Inbox::deliver`] then).
    pub fn deliver_sync(&self, env: Envelope) -> std::result::Result<Result<()>, Envelope> {
        let Some(env) = self.complete_reply(env) else {
            return Ok(Ok(()));
        };
        if self.is_sync() {
            let _ = self.run_sync(env);
            return Ok(Ok(()));
        }
        let node = self.inner();
        let mb = node.mailbox();
        mb.ensure_started(node);
        mb.try_push(node, env)
    }

    /// Delivers, waiting for mailbox room for an async handler (never for the handler itself).
    pub async fn deliver(&self, env: Envelope) -> Result<()> {
        match self.deliver_sync(env) {
            Ok(r) => r,
            Err(env) => {
                let node = self.inner();
                node.mailbox().push(node, env).await
            }
        }
    }

    /// Delivers (waiting for mailbox room as [`Inbox::deliver`] does) and returns a
    /// [`Handled`] future that completes once the handler has run (an async one on the
    /// machine's mailbox task) or the event was dropped (expired, a full-mailbox policy,
    /// the machine left).
    ///
    /// A transport that acknowledges messages to a broker acknowledges when it completes.
    /// It must keep reading meanwhile (await the futures elsewhere): a handler may be
    /// waiting for a reply that comes the same way, and replies complete their request
    /// only once read.
    pub async fn deliver_tracked(&self, env: Envelope) -> Result<Handled> {
        let Some(env) = self.complete_reply(env) else {
            return Ok(Handled(None));
        };
        if self.is_sync() {
            let _ = self.run_sync(env);
            return Ok(Handled(None));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut letter = Letter::Tracked(env, crate::letter::Done(tx));
        loop {
            match self.offer(letter) {
                Offer::Taken => {
                    self.notify();
                    return Ok(Handled(Some(rx)));
                }
                Offer::Full(back) => letter = back,
                Offer::Refused(e, _) => return Err(e),
            }
            self.room().await;
        }
    }

    /// Whether `env` should reach the handler: drops (and counts) an expired event.
    fn fresh(&self, env: &Envelope) -> bool {
        if env.headers.expires_at_us.is_some() && env.is_expired_at(coarse_now_micros()) {
            self.inner().expired.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(machine = %self.id(), event = %env.event, "dropped expired event");
            return false;
        }
        true
    }

    /// Runs a synchronous handler on an event (expiry checked); an async handler is not run.
    pub(crate) fn run_sync(&self, env: Envelope) -> std::result::Result<(), Envelope> {
        if !self.fresh(&env) {
            return Ok(());
        }
        match &self.inner().handler {
            Some(Handler::Sync(h)) => run_owned(&self.0, h, env),
            Some(Handler::Ref(h)) => run_ref(&self.0, h, EventRef::of(&env)),
            Some(Handler::Async(_)) => return Err(env),
            None => self.count_dropped(),
        }
        Ok(())
    }

    /// Lends a letter's fields to a borrowed handler as they are (expiry checked).
    pub(crate) fn run_letter(&self, d: &LetterData) {
        if let Some(Handler::Ref(h)) = &self.inner().handler {
            if let Some(at) = d.headers.expires_at_us
                && coarse_now_micros() > at
            {
                self.inner().expired.fetch_add(1, Ordering::Relaxed);
                return;
            }
            run_ref(&self.0, h, d.as_event());
        }
    }

    /// Runs the handler on an event, awaiting an async one (expiry checked).
    pub(crate) async fn run(&self, env: Envelope) {
        let env = match self.run_sync(env) {
            Ok(()) => return,
            Err(env) => env,
        };
        if let Some(Handler::Async(h)) = &self.inner().handler {
            let fut = h(self.0.clone(), env);
            handled(&self.0, AssertUnwindSafe(fut).catch_unwind().await.is_ok());
        }
    }
}

fn run_owned(node: &Node, h: &Arc<SyncFn>, env: Envelope) {
    handled(
        node,
        std::panic::catch_unwind(AssertUnwindSafe(|| h(node, env))).is_ok(),
    );
}

fn run_ref(node: &Node, h: &Arc<RefFn>, ev: EventRef<'_>) {
    handled(
        node,
        std::panic::catch_unwind(AssertUnwindSafe(|| h(node, ev))).is_ok(),
    );
}

fn handled(node: &Node, ok: bool) {
    if ok {
        node.0.handled.fetch_add(1, Ordering::Relaxed);
    } else {
        node.0.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::error!(machine = %node.0.entry.id, "event handler panicked; the machine keeps running");
    }
}
