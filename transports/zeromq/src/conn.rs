//! One DEALER per peer process: sends with a byte window the peer acknowledges,
//! requests answered by the peer's ROUTER, and the death of the peer.
//!
//! The zeromq crate has no high-water mark and queues up to 100,000 messages per
//! peer, and `send` returning `Ok` only means "queued locally". So this side keeps
//! its own bound: at most `window` bytes of `SEND` messages are unacknowledged at
//! once (the peer's ROUTER answers `ACK [bytes]`); a sender past it waits. A peer
//! that acknowledges nothing for `peer_timeout` while bytes are outstanding, or
//! whose connection drops, makes the connection dead: every waiting and later
//! send fails at once, so nothing queues forever.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use switchyard_core::MachineId;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use zeromq::prelude::*;
use zeromq::{DealerSendHalf, DealerSocket, SocketEvent, SocketOptions, ZmqMessage};

use crate::codec::{self, Nack, Reply, kind};
use crate::lock;

/// Why a connection cannot carry anything any more.
#[derive(Clone, Debug)]
pub(crate) struct Dead(pub(crate) String);

type Waiter = oneshot::Sender<Result<Reply, Dead>>;

/// An outgoing connection to one peer process's ROUTER.
pub(crate) struct Conn {
    pub(crate) endpoint: String,
    tx: Arc<tokio::sync::Mutex<Sending>>,
    /// When it died (for [`Conn::died_within`]).
    died_at: Mutex<Option<Instant>>,
    window: u64,
    peer_timeout: Duration,
    in_flight: AtomicU64,
    /// Milliseconds since `born` of the last acknowledgement (or of the first byte after idle).
    progress_ms: AtomicU64,
    born: Instant,
    progress: Notify,
    dead: AtomicBool,
    why: Mutex<Option<Dead>>,
    pending: Mutex<HashMap<u64, Waiter>>,
    next_req: AtomicU64,
    nacks: AtomicU64,
    nacked: Mutex<HashSet<MachineId>>,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// What [`Conn::try_send`] did.
pub(crate) enum TrySend {
    /// Queued on the socket.
    Sent,
    /// The window is full or another send holds the socket: send it the waiting way.
    Busy,
}

/// The DEALER, or what waits for it while it connects.
enum Sending {
    /// Messages accepted before the connection was up, sent in order once it is.
    Connecting(VecDeque<ZmqMessage>),
    Ready(DealerSendHalf),
}

impl Sending {
    async fn send(&mut self, msg: ZmqMessage) -> zeromq::ZmqResult<()> {
        match self {
            Sending::Connecting(q) => {
                q.push_back(msg);
                Ok(())
            }
            Sending::Ready(tx) => tx.send(msg).await,
        }
    }
}

impl Conn {
    /// A connection to `endpoint`, made in the background: sends are accepted (within the
    /// window) at once and go out in order when it is up; if it cannot be made within
    /// `connect_timeout`, it dies and they are dropped. A caller that gives up (a request's
    /// timeout) therefore never abandons a connection half made, nor what it sent.
    pub(crate) fn start(
        endpoint: &str,
        window: u64,
        peer_timeout: Duration,
        connect_timeout: Duration,
        on_nack: Arc<dyn Fn(&Nack) + Send + Sync>,
    ) -> Arc<Conn> {
        let conn = Arc::new(Conn {
            endpoint: endpoint.to_string(),
            tx: Arc::new(tokio::sync::Mutex::new(
                Sending::Connecting(VecDeque::new()),
            )),
            died_at: Mutex::new(None),
            window,
            peer_timeout,
            in_flight: AtomicU64::new(0),
            progress_ms: AtomicU64::new(0),
            born: Instant::now(),
            progress: Notify::new(),
            dead: AtomicBool::new(false),
            why: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            next_req: AtomicU64::new(1),
            nacks: AtomicU64::new(0),
            nacked: Mutex::new(HashSet::new()),
            reader: Mutex::new(None),
        });
        let weak = Arc::downgrade(&conn);
        let task = tokio::spawn(async move {
            let Some(endpoint) = weak.upgrade().map(|c| c.endpoint.clone()) else {
                return;
            };
            let made = Self::connect(&endpoint, connect_timeout).await;
            let Some(c) = weak.upgrade() else { return };
            let (tx, rx, monitor) = match made {
                Ok(parts) => parts,
                Err(d) => {
                    c.kill(d);
                    // What waited for the connection dies with it.
                    if let Sending::Connecting(q) = &mut *c.tx.lock().await
                        && !q.is_empty()
                    {
                        tracing::warn!(endpoint = %c.endpoint, lost = q.len(), reason = %c.why().0, "zeromq: messages sent while connecting are lost");
                        q.clear();
                    }
                    return;
                }
            };
            {
                let mut g = c.tx.lock().await;
                let queued = match &mut *g {
                    Sending::Connecting(q) => std::mem::take(q),
                    Sending::Ready(_) => VecDeque::new(),
                };
                let mut tx = tx;
                for m in queued {
                    if let Err(e) = tx.send(m).await {
                        drop(g);
                        c.kill(Dead(format!("send to {endpoint} failed: {e}")));
                        return;
                    }
                }
                *g = Sending::Ready(tx);
            }
            drop(c);
            read_loop(weak, rx, monitor, on_nack).await;
        });
        *lock(&conn.reader) = Some(task);
        conn
    }

    /// Connects a DEALER to `endpoint` (waiting at most `connect_timeout`).
    async fn connect(
        endpoint: &str,
        connect_timeout: Duration,
    ) -> Result<
        (
            DealerSendHalf,
            zeromq::DealerRecvHalf,
            impl futures_util::Stream<Item = SocketEvent> + Unpin + use<>,
        ),
        Dead,
    > {
        let mut opts = SocketOptions::default();
        opts.connect_timeout(connect_timeout);
        let mut dealer = DealerSocket::with_options(opts);
        let monitor = dealer.monitor();
        // The crate's own timeout covers the handshake; ours also covers a peer that accepts
        // the TCP connection but never answers the ZMTP greeting.
        match tokio::time::timeout(connect_timeout, dealer.connect(endpoint)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Dead(format!("cannot connect to {endpoint}: {e}"))),
            Err(_) => {
                return Err(Dead(format!(
                    "no ZeroMQ handshake from {endpoint} within {connect_timeout:?}"
                )));
            }
        }
        let (tx, rx) = dealer.split();
        Ok((tx, rx, monitor))
    }

    /// Whether it died less than `d` ago (a peer that just failed is not tried again at once).
    pub(crate) fn died_within(&self, d: Duration) -> bool {
        lock(&self.died_at).is_some_and(|t| t.elapsed() < d)
    }

    /// Whether the connection can still carry messages.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Whether the peer said `to` is not there (a `NACK`).
    pub(crate) fn was_nacked(&self, to: &MachineId) -> bool {
        self.nacks.load(Ordering::Acquire) != 0 && lock(&self.nacked).contains(to)
    }

    /// Bytes sent and not acknowledged yet.
    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Why it died.
    pub(crate) fn why(&self) -> Dead {
        lock(&self.why)
            .clone()
            .unwrap_or_else(|| Dead("the connection is closed".into()))
    }

    pub(crate) fn kill(&self, why: Dead) {
        lock(&self.died_at).get_or_insert_with(Instant::now);
        {
            let mut w = lock(&self.why);
            if w.is_none() {
                tracing::debug!(endpoint = %self.endpoint, reason = %why.0, "zeromq peer connection dead");
                *w = Some(why.clone());
            }
        }
        self.dead.store(true, Ordering::Release);
        self.progress.notify_waiters();
        for (_, w) in lock(&self.pending).drain() {
            let _ = w.send(Err(why.clone()));
        }
        if let Some(t) = lock(&self.reader).take() {
            t.abort();
        }
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn charge(&self, size: u64) {
        if self.in_flight.fetch_add(size, Ordering::AcqRel) == 0 {
            // The silence before this byte was idleness, not a stuck peer.
            self.progress_ms.store(self.now_ms(), Ordering::Release);
        }
    }

    fn acked(&self, bytes: u64) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(bytes))
            });
        self.progress_ms.store(self.now_ms(), Ordering::Release);
        self.progress.notify_waiters();
    }

    fn fits(&self, size: u64) -> bool {
        let f = self.in_flight();
        f == 0 || f + size <= self.window
    }

    /// Kills the connection when bytes have waited for an acknowledgement longer than
    /// `peer_timeout`; returns whether it is dead.
    fn check_stalled(&self) -> bool {
        if self.is_dead() {
            return true;
        }
        if self.in_flight() == 0 {
            return false;
        }
        let since = self.now_ms() - self.progress_ms.load(Ordering::Acquire).min(self.now_ms());
        if Duration::from_millis(since) >= self.peer_timeout {
            self.kill(Dead(format!(
                "{} bytes sent to {} got no acknowledgement for {:?}: the peer process is stuck or gone",
                self.in_flight(),
                self.endpoint,
                self.peer_timeout
            )));
            return true;
        }
        false
    }

    /// Sends without waiting when the window has room and the socket is free.
    pub(crate) fn try_send(&self, msg: ZmqMessage, size: u64) -> Result<TrySend, Dead> {
        if self.is_dead() {
            return Err(self.why());
        }
        if !self.fits(size) {
            return Ok(TrySend::Busy);
        }
        let Ok(guard) = self.tx.clone().try_lock_owned() else {
            return Ok(TrySend::Busy);
        };
        self.charge(size);
        let mut guard = guard;
        if let Sending::Connecting(q) = &mut *guard {
            q.push_back(msg);
            return Ok(TrySend::Sent);
        }
        let mut fut: Pin<Box<dyn Future<Output = zeromq::ZmqResult<()>> + Send>> =
            Box::pin(async move {
                let mut g = guard;
                g.send(msg).await
            });
        match (&mut fut).now_or_never() {
            Some(Ok(())) => Ok(TrySend::Sent),
            Some(Err(e)) => {
                let d = Dead(format!("send to {} failed: {e}", self.endpoint));
                self.kill(d.clone());
                Err(d)
            }
            None => {
                // The crate's queue could not take it at once (the window keeps it far from
                // full, so this is rare): finish on a task; it holds the socket, so order stays.
                tokio::spawn(async move {
                    let _ = fut.await;
                });
                Ok(TrySend::Sent)
            }
        }
    }

    /// Sends, waiting while the window is full (at most `peer_timeout` without progress).
    pub(crate) async fn send(&self, msg: ZmqMessage, size: u64) -> Result<(), Dead> {
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_dead() {
                return Err(self.why());
            }
            if self.fits(size) {
                break;
            }
            let waited_ms =
                self.now_ms() - self.progress_ms.load(Ordering::Acquire).min(self.now_ms());
            let left = self
                .peer_timeout
                .saturating_sub(Duration::from_millis(waited_ms));
            if tokio::time::timeout(left, notified).await.is_err() && self.check_stalled() {
                return Err(self.why());
            }
        }
        self.charge(size);
        let r = self.tx.lock().await.send(msg).await;
        r.map_err(|e| {
            let d = Dead(format!("send to {} failed: {e}", self.endpoint));
            self.kill(d.clone());
            d
        })
    }

    /// Sends a request (`[kind, req, frames...]`) and waits for its `REPLY`.
    pub(crate) async fn request(
        &self,
        k: u8,
        frames: Vec<Bytes>,
        timeout: Duration,
    ) -> Result<Reply, Dead> {
        if self.is_dead() {
            return Err(self.why());
        }
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(req, tx);
        let mut msg = ZmqMessage::from(Bytes::copy_from_slice(&[k]));
        msg.push_back(codec::u64_frame(req));
        for f in frames {
            msg.push_back(f);
        }
        if let Err(e) = self.tx.lock().await.send(msg).await {
            lock(&self.pending).remove(&req);
            let d = Dead(format!("send to {} failed: {e}", self.endpoint));
            self.kill(d.clone());
            return Err(d);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.why()),
            Err(_) => {
                lock(&self.pending).remove(&req);
                Err(Dead(format!(
                    "{} did not answer within {timeout:?}",
                    self.endpoint
                )))
            }
        }
    }

    /// Sends a message that needs no answer and is not counted in the window.
    pub(crate) async fn post(&self, msg: ZmqMessage) -> Result<(), Dead> {
        if self.is_dead() {
            return Err(self.why());
        }
        let r = self.tx.lock().await.send(msg).await;
        r.map_err(|e| {
            let d = Dead(format!("send to {} failed: {e}", self.endpoint));
            self.kill(d.clone());
            d
        })
    }

    fn answer(&self, req: u64, reply: Reply) {
        if let Some(w) = lock(&self.pending).remove(&req) {
            let _ = w.send(Ok(reply));
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(t) = lock(&self.reader).take() {
            t.abort();
        }
    }
}

async fn read_loop<M: futures_util::Stream<Item = SocketEvent> + Unpin>(
    conn: Weak<Conn>,
    mut rx: zeromq::DealerRecvHalf,
    mut monitor: M,
    on_nack: Arc<dyn Fn(&Nack) + Send + Sync>,
) {
    let period = match conn.upgrade() {
        Some(c) => (c.peer_timeout / 4).max(Duration::from_millis(10)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = rx.recv() => {
                let Some(c) = conn.upgrade() else { return };
                if c.is_dead() {
                    return;
                }
                match m {
                    Ok(msg) => {
                        handle(&c, msg, &on_nack);
                        tokio::task::coop::consume_budget().await;
                    }
                    Err(e) => {
                        c.kill(Dead(format!("connection to {} failed: {e}", c.endpoint)));
                        return;
                    }
                }
            }
            ev = monitor.next() => {
                let Some(c) = conn.upgrade() else { return };
                match ev {
                    Some(SocketEvent::Disconnected(_)) | None => {
                        c.kill(Dead(format!("the connection to {} closed: the peer process is gone", c.endpoint)));
                        return;
                    }
                    Some(_) => {}
                }
            }
            _ = tick.tick() => {
                let Some(c) = conn.upgrade() else { return };
                if c.check_stalled() {
                    return;
                }
            }
        }
    }
}

fn handle(c: &Conn, msg: ZmqMessage, on_nack: &Arc<dyn Fn(&Nack) + Send + Sync>) {
    let k = msg.get(0).and_then(|f| f.first().copied());
    match k {
        Some(kind::ACK) => {
            if let Some(n) = msg.get(1).and_then(|f| codec::read_u64(f)) {
                c.acked(n);
            }
        }
        Some(kind::REPLY) => {
            let req = msg.get(1).and_then(|f| codec::read_u64(f));
            let body = msg.get(2).map(|f| codec::from_map::<Reply>(f));
            match (req, body) {
                (Some(req), Some(Ok(r))) => c.answer(req, r),
                (Some(req), _) => c.answer(
                    req,
                    Reply {
                        ok: false,
                        code: Some("malformed".into()),
                        message: Some("the peer's REPLY could not be read".into()),
                        ..Reply::default()
                    },
                ),
                _ => tracing::debug!(endpoint = %c.endpoint, "malformed REPLY ignored"),
            }
        }
        Some(kind::NACK) => {
            if let Some(Ok(n)) = msg.get(1).map(|f| codec::from_map::<Nack>(f)) {
                lock(&c.nacked).insert(MachineId::from(n.to.as_str()));
                c.nacks.fetch_add(1, Ordering::AcqRel);
                on_nack(&n);
            }
        }
        _ => tracing::debug!(endpoint = %c.endpoint, "unknown message from a ROUTER ignored"),
    }
}
