//! Sending to one machine: `Node::send`/`post`, declared [`Sender`]s that resolve once,
//! the per-message [`Message`] builder, batches, self and delayed sends.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::address::{Address, MachineId};
use crate::batch::ValueBatch;
use crate::envelope::{Envelope, Headers, coarse_now_micros};
use crate::error::Result;
use crate::name::Name;
use crate::node::Node;
use crate::node::route::{Later, Route};
use crate::session::lock;

/// Headers of a new event: stamped now, everything else unset.
pub(crate) fn fresh_headers() -> Headers {
    Headers {
        sent_at_us: coarse_now_micros(),
        ..Headers::default()
    }
}

impl Node {
    /// Sends an event to one machine.
    ///
    /// `Ok` means a transport took the event: delivered in process, or queued on a
    /// connection (see docs/SEMANTICS.md for what each transport promises after that).
    pub async fn send<P: Serialize + Send + Sync + 'static>(
        &self,
        to: impl Into<MachineId>,
        event: impl Into<Name>,
        payload: P,
    ) -> Result<()> {
        self.send_with(&to.into(), event.into(), payload, fresh_headers())
            .await
    }

    pub(crate) async fn send_with<P: Serialize + Send + Sync + 'static>(
        &self,
        to: &MachineId,
        event: Name,
        payload: P,
        headers: Headers,
    ) -> Result<()> {
        self.send_addressed(to, None, event, payload, headers).await
    }

    /// Sends to machine `to` an event addressed to `address` (default: `to` itself; a
    /// type-addressed send says which type it was sent to).
    pub(crate) async fn send_addressed<P: Serialize + Send + Sync + 'static>(
        &self,
        to: &MachineId,
        address: Option<&Address>,
        event: Name,
        payload: P,
        headers: Headers,
    ) -> Result<()> {
        match self.send_fast(to, address, event, payload, headers)? {
            Later::Done => Ok(()),
            later => Box::pin(self.send_rest(to, later)).await,
        }
    }

    /// The part of a send that must not wait: checks, the cached route, the link's fast path.
    #[inline]
    fn send_fast<P: Serialize + Send + Sync + 'static>(
        &self,
        to: &MachineId,
        address: Option<&Address>,
        event: Name,
        payload: P,
        headers: Headers,
    ) -> Result<Later> {
        self.check_open()?;
        self.check_link(to)?;
        let route = self.cached_route(to);
        self.send_now(to, route.as_ref(), address, event, payload, headers)
    }

    /// Sends without awaiting, for synchronous handlers.
    ///
    /// When the route is cached and its link takes the event at once (direct; memory
    /// with room; ipc with room in its connection buffer) this returns that result, and
    /// order with earlier posts is kept. When the route must be resolved and the registry
    /// answers at once (an in-process registry), an unknown target is this call's error.
    /// Otherwise the send finishes on a task, may overtake or be overtaken by later
    /// posts, and a failure goes to the machine's [`crate::MachineBuilder::on_error`] hook
    /// (and is counted in [`crate::NodeStats::failed_sends`]).
    pub fn post<P: Serialize + Send + Sync + 'static>(
        &self,
        to: impl Into<MachineId>,
        event: impl Into<Name>,
        payload: P,
    ) -> Result<()> {
        self.post_with(to.into(), event.into(), payload, fresh_headers())
    }

    pub(crate) fn post_with<P: Serialize + Send + Sync + 'static>(
        &self,
        to: MachineId,
        event: Name,
        payload: P,
        headers: Headers,
    ) -> Result<()> {
        match self.send_fast(&to, None, event, payload, headers)? {
            Later::Done => Ok(()),
            later => self.finish_post(to, later),
        }
    }

    /// Starts an event with per-message options (priority, time to live) to one machine.
    ///
    /// ```no_run
    /// # async fn f(node: switchyard_core::Node) -> switchyard_core::Result<()> {
    /// use std::time::Duration;
    /// node.message("worker", "URGENT", 42u32)
    ///     .priority(9)
    ///     .ttl(Duration::from_secs(5))
    ///     .send()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn message<P: Serialize + Send + Sync + 'static>(
        &self,
        to: impl Into<MachineId>,
        event: impl Into<Name>,
        payload: P,
    ) -> Message<'_, P> {
        Message {
            node: self,
            to: To::Machine(to.into()),
            event: event.into(),
            payload,
            headers: Headers::default(),
        }
    }

    /// Resolves `to` once and returns a sender whose sends skip every lookup.
    ///
    /// The sender follows the target: when it leaves or moves, the next send resolves it
    /// again (and fails with [`Error::UnknownTarget`](crate::Error::UnknownTarget) once it is gone).
    pub async fn sender(&self, to: impl Into<MachineId>) -> Result<Sender> {
        let to = to.into();
        self.check_open()?;
        self.check_link(&to)?;
        let route = self.route_to(&to).await?;
        Ok(Sender {
            node: self.clone(),
            to,
            first: route,
            replaced: AtomicBool::new(false),
            current: Mutex::new(None),
        })
    }

    /// Sends several events to one machine, in order, as one batch where the transport can.
    ///
    /// The route is looked up once and a transport that supports batches takes
    /// them in one go (ipc encodes them under one lock and wakes its writer once).
    /// Delivery and ordering are those of the same events sent one by one with
    /// [`Node::send`]. On error the events before the failing one have been sent and
    /// the rest have not; the returned count says how many were sent when it succeeds.
    pub async fn send_batch<E, P, I>(&self, to: impl Into<MachineId>, events: I) -> Result<usize>
    where
        E: Into<Name> + AsRef<str> + Send,
        P: Serialize + Send + Sync + 'static,
        I: IntoIterator<Item = (E, P)>,
    {
        let to = to.into();
        self.check_open()?;
        self.check_link(&to)?;
        let items: VecDeque<(E, P)> = events.into_iter().collect();
        let n = items.len();
        if n == 0 {
            return Ok(0);
        }
        let route = self.route_to(&to).await?;
        let mut batch = ValueBatch::new(
            self.id().clone(),
            Address::Machine(to.clone()),
            coarse_now_micros(),
            self.0.session.next_ids(n as u64),
            items,
        );
        self.send_along(&to, route, &mut batch).await?;
        Ok(n)
    }

    /// Sends an event to this machine itself.
    pub async fn send_self<P: Serialize + Send + Sync + 'static>(
        &self,
        event: impl Into<Name>,
        payload: P,
    ) -> Result<()> {
        self.send(self.id().clone(), event, payload).await
    }

    /// Sends after `delay`; fails now if the target is unknown. Cancelled when the session
    /// shuts down. A failure when the time comes goes to the machine's
    /// [`crate::MachineBuilder::on_error`] hook (and [`crate::NodeStats::failed_sends`]).
    pub async fn send_delayed<P: Serialize + Send + Sync + 'static>(
        &self,
        to: impl Into<MachineId>,
        event: impl Into<Name>,
        payload: P,
        delay: Duration,
    ) -> Result<Delayed> {
        let to = to.into();
        self.check_open()?;
        self.check_link(&to)?;
        self.route_to(&to).await?;
        let event = event.into();
        let node = self.clone();
        let mut shutdown = self.0.session.shutdown.subscribe();
        let task = self.0.session.runtime.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {
                    if let Err(e) = node.send_with(&to, event, payload, fresh_headers()).await {
                        node.report_failure("delayed send", &to, &e);
                    }
                }
                _ = async { shutdown.wait_for(|closed| *closed).await.map(|_| ()) } => {}
            }
        });
        Ok(Delayed(task.abort_handle()))
    }
}

/// A delayed send in flight; [`Delayed::cancel`] stops it.
pub struct Delayed(tokio::task::AbortHandle);

impl Delayed {
    /// Cancels the send if it has not happened yet.
    pub fn cancel(&self) {
        self.0.abort();
    }
}

/// A declared sender to one machine: resolved once, then every send goes straight to
/// the link, with no registry lookup, no map lookup and no shared lock.
///
/// It follows its target: when the target leaves, moves or its link closes, the next
/// send resolves it again; a send to a target that is gone is
/// [`Error::UnknownTarget`](crate::Error::UnknownTarget). Made by [`Node::sender`].
pub struct Sender {
    node: Node,
    to: MachineId,
    first: Arc<Route>,
    /// Set once the first route was replaced; from then on `current` holds the route.
    replaced: AtomicBool,
    current: Mutex<Option<Arc<Route>>>,
}

impl Clone for Sender {
    fn clone(&self) -> Sender {
        let current = lock(&self.current).clone();
        Sender {
            node: self.node.clone(),
            to: self.to.clone(),
            first: current.clone().unwrap_or_else(|| self.first.clone()),
            replaced: AtomicBool::new(false),
            current: Mutex::new(None),
        }
    }
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("from", self.node.id())
            .field("to", &self.to)
            .finish()
    }
}

impl Sender {
    /// The target.
    pub fn target(&self) -> &MachineId {
        &self.to
    }

    /// The machine sending.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The route in use now.
    pub fn route(&self) -> Arc<Route> {
        if self.replaced.load(Ordering::Acquire)
            && let Some(r) = lock(&self.current).clone()
        {
            return r;
        }
        self.first.clone()
    }

    fn adopt(&self, r: &Arc<Route>) {
        let mut cur = lock(&self.current);
        *cur = Some(r.clone());
        self.replaced.store(true, Ordering::Release);
    }

    /// Sends an event to the target.
    pub async fn send<P: Serialize + Send + Sync + 'static>(
        &self,
        event: impl Into<Name>,
        payload: P,
    ) -> Result<()> {
        self.send_with(event.into(), payload, fresh_headers()).await
    }

    async fn send_with<P: Serialize + Send + Sync + 'static>(
        &self,
        event: Name,
        payload: P,
        headers: Headers,
    ) -> Result<()> {
        match self.send_fast(event, payload, headers)? {
            Later::Done => Ok(()),
            later => Box::pin(self.send_slow(later)).await,
        }
    }

    /// The part of a send that must not wait, straight on the declared route.
    #[inline]
    fn send_fast<P: Serialize + Send + Sync + 'static>(
        &self,
        event: Name,
        payload: P,
        headers: Headers,
    ) -> Result<Later> {
        self.node.check_open()?;
        self.node.check_link(&self.to)?;
        if !self.replaced.load(Ordering::Acquire) && !self.first.is_stale() {
            return self
                .node
                .send_now(&self.to, Some(&self.first), None, event, payload, headers);
        }
        let current = lock(&self.current).clone();
        let route = current.filter(|r| !r.is_stale());
        self.node
            .send_now(&self.to, route.as_ref(), None, event, payload, headers)
    }

    /// Finishes a send the async way, and follows the route the node found.
    async fn send_slow(&self, later: Later) -> Result<()> {
        let r = self.node.send_rest(&self.to, later).await;
        self.follow();
        r
    }

    /// Adopts the node's current route to the target, if it is a new one.
    fn follow(&self) {
        if let Some(now) = self.node.cached_route(&self.to) {
            let current = if self.replaced.load(Ordering::Acquire) {
                lock(&self.current).clone()
            } else {
                Some(self.first.clone())
            };
            if !current.is_some_and(|c| Arc::ptr_eq(&c, &now)) {
                self.adopt(&now);
            }
        }
    }

    /// Sends without awaiting, for synchronous handlers; see [`Node::post`].
    pub fn post<P: Serialize + Send + Sync + 'static>(
        &self,
        event: impl Into<Name>,
        payload: P,
    ) -> Result<()> {
        self.post_with(event.into(), payload, fresh_headers())
    }

    fn post_with<P: Serialize + Send + Sync + 'static>(
        &self,
        event: Name,
        payload: P,
        headers: Headers,
    ) -> Result<()> {
        let r = match self.send_fast(event, payload, headers)? {
            Later::Done => return Ok(()),
            later => self.node.finish_post(self.to.clone(), later),
        };
        self.follow();
        r
    }

    /// Starts an event with per-message options to the target; see [`Node::message`].
    pub fn message<P: Serialize + Send + Sync + 'static>(
        &self,
        event: impl Into<Name>,
        payload: P,
    ) -> Message<'_, P> {
        Message {
            node: &self.node,
            to: To::Sender(self),
            event: event.into(),
            payload,
            headers: Headers::default(),
        }
    }
}

enum To<'a> {
    Machine(MachineId),
    Sender(&'a Sender),
}

/// One event with per-message options, from [`Node::message`] or [`Sender::message`].
///
/// The envelope is built from the target given here, so its address always names the
/// machine it is sent to.
#[must_use = "a message does nothing until it is sent: call .send(), .post() or .request()"]
pub struct Message<'a, P> {
    node: &'a Node,
    to: To<'a>,
    event: Name,
    payload: P,
    headers: Headers,
}

impl<P: Serialize + Send + Sync + 'static> Message<'_, P> {
    /// Priority, 0 (default) to 255: where there is a mailbox, a higher-priority event
    /// overtakes queued lower-priority ones (see docs/SEMANTICS.md per transport).
    pub fn priority(mut self, priority: u8) -> Self {
        self.headers.priority = priority;
        self
    }

    /// Drops the event undelivered if it is still on its way `ttl` from now.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.headers.expires_at_us =
            Some(coarse_now_micros().saturating_add(ttl.as_micros() as u64));
        self
    }

    /// Drops the event undelivered if it is still on its way at `at_us` (microseconds
    /// since the Unix epoch).
    pub fn expires_at_us(mut self, at_us: u64) -> Self {
        self.headers.expires_at_us = Some(at_us);
        self
    }

    fn stamped(mut self) -> Self {
        self.headers.sent_at_us = coarse_now_micros();
        self
    }

    /// Sends it; see [`Node::send`].
    pub async fn send(self) -> Result<()> {
        let m = self.stamped();
        match m.to {
            To::Machine(to) => m.node.send_with(&to, m.event, m.payload, m.headers).await,
            To::Sender(s) => s.send_with(m.event, m.payload, m.headers).await,
        }
    }

    /// Sends it without awaiting; see [`Node::post`].
    pub fn post(self) -> Result<()> {
        let m = self.stamped();
        match m.to {
            To::Machine(to) => m.node.post_with(to, m.event, m.payload, m.headers),
            To::Sender(s) => s.post_with(m.event, m.payload, m.headers),
        }
    }

    /// Sends it as a request and waits for the reply or [`Error::Timeout`](crate::Error::Timeout); see
    /// [`Node::request`].
    pub async fn request(self, timeout: Duration) -> Result<Envelope> {
        let m = self.stamped();
        let node = m.node;
        let (cid, rx) = node.pending_request();
        let mut headers = m.headers;
        headers.correlation_id = Some(cid);
        headers.reply_to = Some(node.id().clone());
        match m.to {
            To::Machine(to) => {
                let send = node.send_with(&to, m.event, m.payload, headers);
                node.await_reply(cid, rx, send, to.clone(), timeout).await
            }
            To::Sender(s) => {
                let send = s.send_with(m.event, m.payload, headers);
                node.await_reply(cid, rx, send, s.to.clone(), timeout).await
            }
        }
    }
}
