//! The client side: one supervised connection to the bus daemon, shared by the transport and the registry.
//!
//! The supervisor connects with exponential backoff, re-registers the machines
//! and re-subscribes the subscriptions of this client after every reconnect,
//! and reads the daemon's frames on one task, delivering events to local
//! inboxes right there (synchronous handlers run inline; async handlers get a
//! bounded per-machine queue).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use interprocess::local_socket::tokio::Stream;
use rustc_hash::FxHashMap;
use switchyard_core::{
    Envelope, Error, EventRef, Filter, Inbox, MachineEntry, MachineId, PayloadRef, RegistryEvent,
    Result, TopicPattern,
};
use tokio::sync::{broadcast, oneshot, watch};

use crate::conn::{FrameReader, Outbox, Unsent, read_one, write_now};
use crate::error::{IpcError, transport_err};
use crate::frame::{
    self, Body, ErrorMsg, EventMsg, HEADER_LEN, Hello, NackMsg, PROTOCOL_VERSION, ReplyMsg,
    RequestMsg, Welcome, kind,
};
use crate::{IpcConfig, NAME};

pub(crate) fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
pub(crate) fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a local machine's events go.
#[derive(Clone)]
pub(crate) struct Target {
    inbox: Inbox,
}

struct LocalSub {
    id: u64,
    topic: Option<TopicPattern>,
    group: Option<Arc<str>>,
    filter: Option<Filter>,
    machine: MachineId,
}

/// Called with the id of every machine that left.
pub(crate) type LeftHook = Box<dyn Fn(&MachineId) + Send + Sync>;

/// Logs the first of a kind of event, then at most one summary a second (a flood stays one line a second).
#[derive(Default)]
pub(crate) struct Throttle {
    last: Mutex<Option<std::time::Instant>>,
    quiet: AtomicU64,
}

impl Throttle {
    /// Whether to log now; `Some(n)`: log, `n` more happened since the last line.
    pub(crate) fn tick(&self) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut last = lock(&self.last);
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            self.quiet.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.quiet.swap(0, Ordering::Relaxed))
    }
}

/// What this client's connection to the daemon lost, refused or sent again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IpcStats {
    /// Events the daemon answered with a `NACK` (unknown target, full queue, refused envelope, …).
    pub nacked: u64,
    /// Events written to a daemon that died (or whose connection broke) before it settled
    /// them: lost with the daemon. Counts sends, publishes and group messages.
    pub lost: u64,
    /// Events not yet written when the connection was lost, sent again after reconnecting.
    pub replayed: u64,
    /// Frames received that could not be decoded and were dropped (the connection stayed up).
    pub undecodable: u64,
    /// Sends written to a daemon that died, whose receivers have not yet reported how many of
    /// them they got; each settles into `lost` (or not) when its receiver reports, or after
    /// three request timeouts (then counted lost).
    pub in_doubt: u64,
}

/// Sends written through one lost daemon, not yet accounted for.
struct Settling {
    epoch: Arc<str>,
    /// Sends per (source, target) written and not refused.
    expect: crate::conn::Pairs,
    lost: u64,
}

/// One loss report owed: `received` sends from `source` reached `target` through daemon `epoch`.
#[derive(Clone)]
struct Report {
    epoch: Arc<str>,
    source: Box<str>,
    target: Box<str>,
    received: u64,
    /// Envelope id of the last attempt (to match its `NACK`).
    id: u64,
    first: std::time::Instant,
}

#[derive(Default)]
struct Reports {
    /// Sent, not refused (yet).
    sent: Vec<Report>,
    /// Refused (the source was not registered again yet): send again.
    retry: Vec<Report>,
    next_id: u64,
}

/// Report envelope ids count down from the top, far from the ids sessions use (a random
/// 24-bit base shifted left by 40, counting up).
const REPORT_ID: u64 = u64::MAX;

/// The machines and subscriptions of this process bound to the ipc transport.
pub(crate) struct Local {
    machines: RwLock<FxHashMap<MachineId, Target>>,
    subs: RwLock<Vec<LocalSub>>,
    next_sub: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) dropped: AtomicU64,
    /// Moves on every bind and unbind, so readers know when their cached target is stale.
    generation: AtomicU64,
}

/// What one connection's reader keeps between frames: the last strings and the last target.
#[derive(Default)]
pub(crate) struct Inbound {
    pub(crate) names: crate::codec::Interner,
    last: Option<(Arc<str>, u64, Target)>,
    /// Reads plain events in place for borrowed handlers.
    view: crate::codec::ViewReader,
    /// Delivered through borrowed views and not yet added to `Local::delivered`.
    delivered: u64,
    /// `SEND`s received per (source, target), for the loss reports after a daemon restart.
    pub(crate) received: Received,
}

/// `SEND`s received on one connection per (source, target): a run of one pair costs two comparisons.
#[derive(Default)]
pub(crate) struct Received {
    source: Vec<u8>,
    target: Vec<u8>,
    run: u64,
    all: crate::conn::Pairs,
}

impl Received {
    /// Counts one `SEND` from `source` to `target`.
    #[inline]
    pub(crate) fn count(&mut self, source: &[u8], target: &[u8]) {
        if self.run > 0
            && crate::codec::same(&self.source, source)
            && crate::codec::same(&self.target, target)
        {
            self.run += 1;
            return;
        }
        self.flush();
        self.source.clear();
        self.source.extend_from_slice(source);
        self.target.clear();
        self.target.extend_from_slice(target);
        self.run = 1;
    }

    fn flush(&mut self) {
        if self.run == 0 {
            return;
        }
        let (Ok(s), Ok(t)) = (
            std::str::from_utf8(&self.source),
            std::str::from_utf8(&self.target),
        ) else {
            self.run = 0;
            return;
        };
        *self
            .all
            .entry(s.into())
            .or_default()
            .entry(t.into())
            .or_insert(0) += std::mem::take(&mut self.run);
    }

    /// Everything counted, per source then target.
    pub(crate) fn take(&mut self) -> crate::conn::Pairs {
        self.flush();
        std::mem::take(&mut self.all)
    }
}

impl Inbound {
    /// Points the target cache at the machine named by `to` (UTF-8 checked here), without a
    /// map lookup while `to` repeats.
    fn refresh(&mut self, local: &Local, to: &[u8]) -> std::result::Result<(), IpcError> {
        Self::refresh_last(&mut self.last, local, to)
    }

    fn refresh_last(
        last: &mut Option<(Arc<str>, u64, Target)>,
        local: &Local,
        to: &[u8],
    ) -> std::result::Result<(), IpcError> {
        let generation = local.generation.load(Ordering::Acquire);
        let fresh = matches!(&*last, Some((name, g, _)) if *g == generation && crate::codec::same(name.as_bytes(), to));
        if !fresh {
            let name = std::str::from_utf8(to)
                .map_err(|e| IpcError::Malformed(format!("target machine id: {e}")))?;
            *last = local
                .target(name)
                .map(|t| (Arc::<str>::from(name), generation, t));
        }
        Ok(())
    }

    /// Hands the body of a `SEND` frame to a borrowed handler straight from the read buffer
    /// (no envelope, no copy) when it is a plain event in this crate's own layout for a
    /// machine bound here with such a handler; `false` (nothing done) otherwise, and the
    /// caller takes the general path, which also reports whatever is wrong with the frame.
    pub(crate) fn try_deliver_view(&mut self, local: &Local, body: &[u8]) -> bool {
        let Some(v) = self.view.read(body) else {
            return false;
        };
        // The transport's own events take the general path.
        if v.event.starts_with(frame::RESERVED_PREFIX) {
            return false;
        }
        if Self::refresh_last(&mut self.last, local, v.to).is_err() {
            return false;
        }
        let Some((_, _, t)) = &self.last else {
            return false;
        };
        if !t.inbox.takes_refs() {
            return false;
        }
        let ev = EventRef {
            id: v.id,
            source: v.source,
            event: v.event,
            payload: PayloadRef::Encoded(v.payload),
            headers: v.headers,
            carried_by: Some(NAME),
        };
        if t.inbox.deliver_ref(ev) {
            self.delivered += 1;
            self.received.count(v.source.as_bytes(), v.to);
            return true;
        }
        false
    }

    /// Adds the events [`Inbound::try_deliver_view`] delivered to the transport's counter.
    pub(crate) fn flush_counts(&mut self, local: &Local) {
        if self.delivered > 0 {
            local
                .delivered
                .fetch_add(std::mem::take(&mut self.delivered), Ordering::Relaxed);
        }
    }

    /// Delivers the envelope bytes of a `SEND` frame to the machine named by `to`; `Ok(false)`
    /// when it is not bound here.
    pub(crate) async fn deliver_bytes(
        &mut self,
        local: &Local,
        to: &[u8],
        bytes: &[u8],
    ) -> std::result::Result<bool, IpcError> {
        let env = crate::codec::decode_envelope_with(bytes, &mut self.names)
            .map_err(|e| IpcError::Malformed(format!("envelope: {e}")))?;
        self.deliver_to(local, to, env).await
    }

    /// Delivers to the machine named by `to`; `Ok(false)` when it is not bound here.
    pub(crate) async fn deliver_to(
        &mut self,
        local: &Local,
        to: &[u8],
        env: Envelope,
    ) -> std::result::Result<bool, IpcError> {
        self.refresh(local, to)?;
        match &self.last {
            Some((_, _, t)) => {
                local.deliver(t, env).await;
                Ok(true)
            }
            None => {
                local.dropped.fetch_add(1, Ordering::Relaxed);
                Ok(false)
            }
        }
    }
}

impl Local {
    fn new() -> Local {
        Local {
            machines: RwLock::new(FxHashMap::default()),
            subs: RwLock::new(Vec::new()),
            next_sub: AtomicU64::new(1),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }

    pub(crate) fn bind(&self, id: &MachineId, inbox: Inbox) -> Result<()> {
        let mut m = write(&self.machines);
        if m.contains_key(id) {
            return Err(Error::DuplicateId(id.clone()));
        }
        // Async handlers run on the machine's mailbox task, never on the reader.
        m.insert(id.clone(), Target { inbox });
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    pub(crate) fn unbind(&self, id: &MachineId) {
        write(&self.machines).remove(id);
        self.generation.fetch_add(1, Ordering::Release);
        write(&self.subs).retain(|s| &s.machine != id);
    }

    pub(crate) fn clear(&self) {
        write(&self.machines).clear();
        write(&self.subs).clear();
    }

    pub(crate) fn target(&self, id: &str) -> Option<Target> {
        read(&self.machines).get(id).cloned()
    }

    /// Marks an envelope as carried by ipc and counts it as delivered.
    fn stamp(&self, mut env: Envelope) -> Envelope {
        env.carried_by = Some(NAME);
        self.delivered.fetch_add(1, Ordering::Relaxed);
        env
    }

    /// Delivers to a bound machine: a synchronous handler runs right here (on the reader),
    /// an async one's event goes to its mailbox (the reader waits while that is full).
    pub(crate) async fn deliver(&self, t: &Target, env: Envelope) {
        let env = self.stamp(env);
        if let Err(e) = t.inbox.deliver(env).await {
            // The sender cannot be told here (its send returned when the frame was queued):
            // count it where the machine's stats show it.
            tracing::debug!(machine = %t.inbox.id(), error = %e, "event refused by the machine's mailbox");
            self.dropped.fetch_add(1, Ordering::Relaxed);
            t.inbox.count_dropped();
        }
    }

    /// Delivers a topic event once to each machine here with a matching plain subscription
    /// whose filter takes it; returns how many machines took it.
    pub(crate) async fn deliver_topic(&self, topic: &str, env: &Envelope) -> usize {
        let targets: Vec<Target> = {
            let subs = read(&self.subs);
            let mut machines: Vec<&MachineId> = subs
                .iter()
                .filter(|s| s.group.is_none())
                .filter(|s| s.topic.as_ref().is_some_and(|p| p.matches(topic)))
                .filter(|s| s.filter.as_ref().is_none_or(|f| f(env)))
                .map(|s| &s.machine)
                .collect();
            machines.sort();
            machines.dedup();
            machines
                .into_iter()
                .filter_map(|m| self.target(m.as_str()))
                .collect()
        };
        let n = targets.len();
        for t in &targets {
            self.deliver(t, env.clone()).await;
        }
        n
    }

    async fn deliver_group(&self, sub: u64, env: Envelope) {
        let t = {
            let subs = read(&self.subs);
            subs.iter()
                .find(|s| s.id == sub)
                .filter(|s| s.filter.as_ref().is_none_or(|f| f(&env)))
                .and_then(|s| self.target(s.machine.as_str()))
        };
        match t {
            Some(t) => self.deliver(&t, env).await,
            None => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn add_sub(
        &self,
        topic: Option<TopicPattern>,
        group: Option<Arc<str>>,
        filter: Option<Filter>,
        machine: MachineId,
    ) -> u64 {
        let id = self.next_sub.fetch_add(1, Ordering::Relaxed);
        write(&self.subs).push(LocalSub {
            id,
            topic,
            group,
            filter,
            machine,
        });
        id
    }

    pub(crate) fn remove_sub(&self, id: u64) {
        write(&self.subs).retain(|s| s.id != id);
    }

    fn sub_requests(&self) -> Vec<RequestMsg> {
        read(&self.subs)
            .iter()
            .map(|s| sub_request(s.id, s.topic.as_ref(), s.group.as_deref()))
            .collect()
    }
}

pub(crate) fn sub_request(
    id: u64,
    topic: Option<&TopicPattern>,
    group: Option<&str>,
) -> RequestMsg {
    RequestMsg {
        op: "subscribe".into(),
        sub: Some(id),
        pattern: topic.map(|t| t.as_str().to_string()),
        group: group.map(str::to_string),
        ..RequestMsg::default()
    }
}

/// The shared client state behind [`crate::IpcBus`].
pub(crate) struct Client {
    pub(crate) cfg: IpcConfig,
    pub(crate) conn: RwLock<Option<Arc<Outbox>>>,
    connected: watch::Sender<bool>,
    pending: Mutex<HashMap<u64, oneshot::Sender<ReplyMsg>>>,
    next_req: AtomicU64,
    pub(crate) local: Arc<Local>,
    registered: Mutex<Vec<(MachineEntry, Option<u64>)>>,
    pub(crate) events: broadcast::Sender<RegistryEvent>,
    /// Told of every registry event on the reader task, before any later frame is read.
    pub(crate) hooks: switchyard_core::ChangeHooks,
    pub(crate) generation: AtomicU64,
    pub(crate) closed: AtomicBool,
    stop: watch::Sender<bool>,
    pub(crate) nacks: AtomicU64,
    /// Events lost with the daemon, replayed after reconnecting, dropped as undecodable.
    pub(crate) lost: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) undecodable: AtomicU64,
    /// Data frames of the current connection the daemon has settled (`ACK`s).
    acked: AtomicU64,
    /// What the last lost connection had not written, to send first on the next one.
    replay: Mutex<Option<Unsent>>,
    /// The `server_id` of the daemon this client is (or was last) connected to.
    epoch: Mutex<Arc<str>>,
    /// `SEND`s refused by `NACK` on the current connection, per (source, target).
    pair_nacks: Mutex<crate::conn::Pairs>,
    /// Sends written to a lost daemon, per lost daemon, waiting for their receivers' reports.
    settling: Mutex<Vec<Settling>>,
    pub(crate) in_doubt: AtomicU64,
    /// Loss reports this client owes other machines (what it received through a lost daemon).
    reports: Mutex<Reports>,
    nack_log: Throttle,
    bad_log: Throttle,
    /// Called with the id of every machine that left (the p2p route cache listens).
    pub(crate) on_left: RwLock<Vec<LeftHook>>,
}

impl Client {
    pub(crate) fn start(cfg: IpcConfig) -> Arc<Client> {
        let client = Arc::new(Client {
            local: Arc::new(Local::new()),
            cfg,
            conn: RwLock::new(None),
            connected: watch::channel(false).0,
            pending: Mutex::new(HashMap::new()),
            next_req: AtomicU64::new(1),
            registered: Mutex::new(Vec::new()),
            events: broadcast::channel(1024).0,
            hooks: Default::default(),
            generation: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            stop: watch::channel(false).0,
            nacks: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            undecodable: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            replay: Mutex::new(None),
            epoch: Mutex::new(Arc::from("")),
            pair_nacks: Mutex::new(crate::conn::Pairs::default()),
            settling: Mutex::new(Vec::new()),
            in_doubt: AtomicU64::new(0),
            reports: Mutex::new(Reports::default()),
            nack_log: Throttle::default(),
            bad_log: Throttle::default(),
            on_left: RwLock::new(Vec::new()),
        });
        tokio::spawn(client.clone().supervise());
        client
    }

    pub(crate) fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    pub(crate) fn stats(&self) -> IpcStats {
        IpcStats {
            nacked: self.nacks.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            replayed: self.replayed.load(Ordering::Relaxed),
            undecodable: self.undecodable.load(Ordering::Relaxed),
            in_doubt: self.in_doubt.load(Ordering::Relaxed),
        }
    }

    pub(crate) async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.connected.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|c| *c)).await,
            Ok(Ok(_))
        )
    }

    pub(crate) fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self.stop.send_replace(true);
        if let Some(o) = write(&self.conn).take() {
            o.close("transport closed");
        }
        lock(&self.pending).clear();
        self.local.clear();
        write(&self.on_left).clear();
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn not_connected(&self) -> Error {
        if self.closed.load(Ordering::Acquire) {
            return Error::Closed(NAME);
        }
        transport_err(format!(
            "not connected to the bus daemon at {}: start it with `switchyard bus --socket {}` (the client reconnects by itself)",
            self.cfg.socket.display(),
            self.cfg.socket.display()
        ))
    }

    /// The current daemon connection, waiting up to the request timeout for one.
    pub(crate) async fn wait_conn(&self) -> Result<Arc<Outbox>> {
        if let Some(o) = read(&self.conn).clone() {
            return Ok(o);
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed(NAME));
        }
        let mut rx = self.connected.subscribe();
        let _ = tokio::time::timeout(self.cfg.request_timeout, rx.wait_for(|c| *c)).await;
        read(&self.conn).clone().ok_or_else(|| self.not_connected())
    }

    /// The current daemon connection without waiting.
    pub(crate) fn conn_now(&self) -> Result<Arc<Outbox>> {
        read(&self.conn).clone().ok_or_else(|| self.not_connected())
    }

    async fn call(
        &self,
        kind_byte: u8,
        body: impl FnOnce(&mut Vec<u8>, u64) -> Result<()>,
    ) -> Result<ReplyMsg> {
        let outbox = self.wait_conn().await?;
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(req, tx);
        let mut frame_bytes = Vec::with_capacity(128);
        let built = frame::write_frame(&mut frame_bytes, kind_byte, outbox.max_frame(), |b| {
            body(b, req)
        });
        if let Err(e) = built {
            lock(&self.pending).remove(&req);
            return Err(e);
        }
        if let Err(e) = outbox.push_bytes(&frame_bytes).await {
            lock(&self.pending).remove(&req);
            return Err(e);
        }
        match tokio::time::timeout(self.cfg.request_timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(transport_err(
                "the connection to the bus daemon was lost before it answered; retry once it reconnects",
            )),
            Err(_) => {
                lock(&self.pending).remove(&req);
                Err(transport_err(format!(
                    "the bus daemon did not answer within {:?}: is it overloaded or stopped?",
                    self.cfg.request_timeout
                )))
            }
        }
    }

    /// Sends a `REQUEST` and waits for its `REPLY`; a failed reply becomes a core error about `subject`.
    pub(crate) async fn request(&self, msg: RequestMsg, subject: Option<&str>) -> Result<ReplyMsg> {
        let r = self
            .call(kind::REQUEST, |b, req| {
                let mut m = msg;
                m.req = req;
                rmp_serde::encode::write_named(b, &m).map_err(|e| Error::Encode(e.to_string()))
            })
            .await?;
        if r.ok {
            Ok(r)
        } else {
            Err(r.into_error(subject))
        }
    }

    /// Publishes `[req, name, envelope]` as `PUBLISH` or `GROUP`; returns the daemon's count.
    pub(crate) async fn publish(&self, kind_byte: u8, name: &str, env: &Envelope) -> Result<usize> {
        let r = self
            .call(kind_byte, |b, req| {
                frame::write_array(b, 3)?;
                frame::write_uint(b, req)?;
                frame::write_str(b, name)?;
                frame::write_envelope(b, env)
            })
            .await
            .map_err(|e| payload_sized(e, env))?;
        if !r.ok {
            return Err(r.into_error(Some(name)));
        }
        Ok(r.count.unwrap_or(0) as usize)
    }

    /// Publishes to a topic through the daemon without asking for the count (`req` 0: no `REPLY`).
    pub(crate) async fn emit(&self, topic: &str, env: &Envelope) -> Result<()> {
        let outbox = self.conn_now()?;
        outbox
            .push_with(|b, max| {
                frame::write_frame(b, kind::PUBLISH, max, |w| {
                    frame::write_array(w, 3)?;
                    frame::write_uint(w, frame::NO_REPLY)?;
                    frame::write_str(w, topic)?;
                    frame::write_envelope(w, env)
                })
            })
            .await
            .map_err(|e| payload_sized(e, env))
    }

    pub(crate) fn remember(&self, entry: &MachineEntry, ttl_ms: Option<u64>) {
        let mut reg = lock(&self.registered);
        reg.retain(|(e, _)| e.id != entry.id);
        reg.push((entry.clone(), ttl_ms));
    }

    pub(crate) fn forget(&self, id: &MachineId) {
        lock(&self.registered).retain(|(e, _)| &e.id != id);
    }

    async fn supervise(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let mut backoff = self.cfg.backoff_min;
        let mut warned = false;
        loop {
            if self.closed.load(Ordering::Acquire) {
                break;
            }
            match self.connect_once().await {
                Ok((stream, rd, welcome)) => {
                    backoff = self.cfg.backoff_min;
                    warned = false;
                    self.run_connection(stream, rd, &welcome, &mut stop).await;
                    if self.closed.load(Ordering::Acquire) {
                        break;
                    }
                    tracing::warn!(socket = %self.cfg.socket.display(), "lost the bus daemon connection; reconnecting");
                }
                Err(e) => {
                    if !warned {
                        tracing::info!(socket = %self.cfg.socket.display(), error = %e, "bus daemon not reachable yet; retrying with backoff");
                        warned = true;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            backoff = (backoff * 2).min(self.cfg.backoff_max);
        }
    }

    async fn connect_once(
        &self,
    ) -> std::result::Result<(Arc<Stream>, FrameReader, Welcome), IpcError> {
        let stream = crate::daemon::connect(&self.cfg.socket)
            .await
            .map_err(|e| IpcError::io(self.cfg.socket.display().to_string(), e))?;
        let mut rd = FrameReader::new(self.cfg.max_frame);
        let w = handshake_client(&stream, &mut rd, &self.cfg, true, true).await?;
        Ok((Arc::new(stream), rd, w))
    }

    async fn run_connection(
        self: &Arc<Self>,
        stream: Arc<Stream>,
        mut rd: FrameReader,
        welcome: &Welcome,
        stop: &mut watch::Receiver<bool>,
    ) {
        // Frames are bounded by the smaller of the two limits: too large is refused here, at the sender.
        let max_frame = usize::try_from(welcome.max_frame)
            .unwrap_or(usize::MAX)
            .min(self.cfg.max_frame);
        let outbox = Outbox::start(
            stream.clone(),
            self.cfg.outbox_limit,
            max_frame,
            format!("bus daemon {}", self.cfg.socket.display()),
        );
        self.acked.store(0, Ordering::Release);
        *lock(&self.epoch) = Arc::from(welcome.server_id.as_str());
        lock(&self.pair_nacks).clear();
        // At most an eighth of the daemon's per-connection queue in flight, shared by the
        // targets with sends in flight (never less than 64 KiB each): a fast sender waits
        // for its receivers instead of filling a receiving process's queue and losing
        // events, and up to eight sending processes fit in one receiver's queue.
        outbox.start_tracking(
            welcome
                .queue_limit
                .map(|q| usize::try_from(q / 8).unwrap_or(usize::MAX).max(1)),
        );
        // Snapshot before publishing the connection, so registrations made on it are not repeated.
        let entries: Vec<(MachineEntry, Option<u64>)> = lock(&self.registered).clone();
        let subs = self.local.sub_requests();
        // Registrations first, then what the lost connection never wrote (the daemon handles a
        // connection's frames in order, so the replayed sends find their sources registered),
        // then new traffic.
        let waiting = self.queue_restore(&outbox, entries, subs);
        if let Some(u) = lock(&self.replay).take()
            && !u.replay.is_empty()
        {
            if outbox.push_force(&u.replay).is_ok() {
                self.replayed.fetch_add(u.replay_frames, Ordering::Relaxed);
                tracing::info!(
                    events = u.replay_frames,
                    "sending the events the lost connection had not written"
                );
            } else {
                self.count_lost(
                    u.replay_frames,
                    "they could not be queued on the new connection",
                );
            }
        }
        // What this client received through a lost daemon, told to each sender.
        self.send_reports(&outbox, true);
        *write(&self.conn) = Some(outbox.clone());
        self.bump();
        // Joins and leaves while we were away were not heard: whatever was cached from the
        // registry (routes, peer connections) is to be read again.
        self.announce(RegistryEvent::Resync);
        let _ = self.connected.send_replace(true);
        if !waiting.is_empty() {
            let me = self.clone();
            tokio::spawn(async move { me.restored(waiting).await });
        }
        let ping = welcome
            .idle_timeout_ms
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(ms / 3).max(Duration::from_millis(10)));
        let mut inbound = Inbound::default();
        let result = self
            .read_loop(&stream, &mut rd, stop, &outbox, ping, &mut inbound)
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "bus daemon connection failed");
        }
        let epoch = lock(&self.epoch).clone();
        self.owe_reports(&epoch, inbound.received.take());
        *write(&self.conn) = None;
        let _ = self.connected.send_replace(false);
        outbox.close("connection lost");
        lock(&self.pending).clear();
        outbox.stopped(Duration::from_secs(1)).await;
        let mut unsent = outbox.take_unsent();
        if !self.closed.load(Ordering::Acquire) {
            // Publishes and group messages written but not settled by an `ACK`: lost with the
            // daemon (it settles them as it handles them, so at most the last few were in fact
            // handled before it died).
            let written = unsent.data_pushed.saturating_sub(unsent.data_unsent);
            let lost = written.saturating_sub(self.acked.load(Ordering::Acquire));
            if lost > 0 {
                self.count_lost(
                    lost,
                    "publishes and group messages the bus daemon had not handled when the connection was lost",
                );
            }
            // Sends: their receivers say how many they got (reports after reconnecting).
            let mut expect = std::mem::take(&mut unsent.sent);
            for (s, per) in lock(&self.pair_nacks).drain() {
                if let Some(e) = expect.get_mut(&s) {
                    for (t, n) in per {
                        if let Some(x) = e.get_mut(&t) {
                            *x = x.saturating_sub(n);
                        }
                    }
                }
            }
            expect.retain(|_, per| {
                per.retain(|_, n| *n > 0);
                !per.is_empty()
            });
            let total: u64 = expect.values().flat_map(|p| p.values()).sum();
            if total > 0 {
                self.in_doubt.fetch_add(total, Ordering::Relaxed);
                tracing::info!(
                    sends = total,
                    "the bus daemon connection was lost: waiting for the receivers to report how many of the sends written to it they got"
                );
                lock(&self.settling).push(Settling {
                    epoch: epoch.clone(),
                    expect,
                    lost: 0,
                });
                let me = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(me.cfg.request_timeout * 3).await;
                    me.settle_epoch(&epoch, true);
                });
            }
            if unsent.replay_frames > 0 {
                *lock(&self.replay) = Some(unsent);
            }
        }
        // No generation bump here: cached peer-to-peer routes keep working while the
        // daemon is away; the reconnect bumps it, since anything may have changed.
    }

    /// Remembers the reports owed for what was received through daemon `epoch`.
    fn owe_reports(&self, epoch: &Arc<str>, received: crate::conn::Pairs) {
        if received.is_empty() || epoch.is_empty() {
            return;
        }
        let now = std::time::Instant::now();
        let mut r = lock(&self.reports);
        for (source, per) in received {
            for (target, n) in per {
                r.retry.push(Report {
                    epoch: epoch.clone(),
                    source: source.clone(),
                    target,
                    received: n,
                    id: 0,
                    first: now,
                });
            }
        }
    }

    /// Sends the reports due (all of them, or only those refused since), as `SEND`s from the
    /// receiving machine to the sending one; gives up on a report after three request timeouts.
    fn send_reports(&self, outbox: &Outbox, all: bool) {
        let give_up = self.cfg.request_timeout * 3;
        let due: Vec<Report> = {
            let mut r = lock(&self.reports);
            r.sent.retain(|x| x.first.elapsed() <= give_up);
            let mut due = std::mem::take(&mut r.retry);
            if all {
                due.append(&mut r.sent);
            }
            due
        };
        for mut rep in due {
            if rep.first.elapsed() > give_up {
                tracing::warn!(to = %rep.source, epoch = %rep.epoch, "gave up reporting received sends after a daemon restart: the sender counts them as lost");
                continue;
            }
            let id = {
                let mut r = lock(&self.reports);
                r.next_id += 1;
                REPORT_ID - r.next_id
            };
            rep.id = id;
            let env = Envelope::new(
                id,
                MachineId::from(&*rep.target),
                switchyard_core::Address::Machine(MachineId::from(&*rep.source)),
                frame::DELIVERED_EVENT.into(),
                switchyard_core::Payload::new(frame::Delivered {
                    epoch: rep.epoch.to_string(),
                    received: rep.received,
                }),
            );
            let mut f = Vec::new();
            if frame::write_send(&mut f, usize::MAX, &rep.source, &env).is_ok()
                && outbox.push_untracked(&f).is_ok()
            {
                lock(&self.reports).sent.push(rep);
            } else {
                lock(&self.reports).retry.push(rep);
            }
        }
    }

    /// A report was refused: send it again shortly. `true` when the NACK was for a report.
    fn report_refused(&self, to: &str, id: u64) -> bool {
        let mut r = lock(&self.reports);
        let Some(i) = r.sent.iter().position(|x| x.id == id && *x.source == *to) else {
            return false;
        };
        let rep = r.sent.swap_remove(i);
        r.retry.push(rep);
        true
    }

    /// A receiver reported what it got from one of our machines through a lost daemon.
    fn on_report(&self, env: &Envelope, to: &[u8]) {
        let Ok(d) = env.payload.read::<frame::Delivered>() else {
            tracing::debug!("ignoring an unreadable loss report");
            return;
        };
        let source = String::from_utf8_lossy(to);
        let target = env.source.as_str();
        let mut settled = None;
        {
            let mut st = lock(&self.settling);
            if let Some(s) = st.iter_mut().find(|s| *s.epoch == *d.epoch)
                && let Some(per) = s.expect.get_mut(&*source)
                && let Some(sent) = per.remove(target)
            {
                let lost = sent.saturating_sub(d.received);
                s.lost += lost;
                self.in_doubt.fetch_sub(sent, Ordering::Relaxed);
                self.lost.fetch_add(lost, Ordering::Relaxed);
                if per.is_empty() {
                    s.expect.remove(&*source);
                }
                if s.expect.is_empty() {
                    settled = Some(s.epoch.clone());
                }
            }
        }
        if let Some(epoch) = settled {
            self.settle_epoch(&epoch, false);
        }
    }

    /// Closes the books on a lost daemon: what is still unreported counts as lost when `timeout`.
    fn settle_epoch(&self, epoch: &str, timeout: bool) {
        let s = {
            let mut st = lock(&self.settling);
            let Some(i) = st.iter().position(|s| &*s.epoch == epoch) else {
                return;
            };
            if !timeout && !st[i].expect.is_empty() {
                return;
            }
            st.swap_remove(i)
        };
        let unreported: u64 = s.expect.values().flat_map(|p| p.values()).sum();
        if unreported > 0 {
            self.in_doubt.fetch_sub(unreported, Ordering::Relaxed);
            self.lost.fetch_add(unreported, Ordering::Relaxed);
        }
        let lost = s.lost + unreported;
        let total = self.lost.load(Ordering::Relaxed);
        if lost > 0 {
            tracing::warn!(
                events = lost,
                unreported,
                total_lost = total,
                "{lost} sends were lost with the bus daemon {epoch} (counted from their receivers' reports{})",
                if unreported > 0 {
                    "; receivers that did not report count as having got none"
                } else {
                    ""
                }
            );
        } else {
            tracing::info!("nothing sent was lost with the bus daemon {epoch}");
        }
    }

    fn count_lost(&self, n: u64, why: &str) {
        let total = self.lost.fetch_add(n, Ordering::Relaxed) + n;
        tracing::warn!(
            events = n,
            total_lost = total,
            "{n} events were lost with the bus daemon: {why}"
        );
    }

    /// Queues the requests that restore this client's machines and subscriptions on a new connection.
    fn queue_restore(
        &self,
        outbox: &Outbox,
        entries: Vec<(MachineEntry, Option<u64>)>,
        subs: Vec<RequestMsg>,
    ) -> Vec<(String, oneshot::Receiver<ReplyMsg>)> {
        let reqs = entries
            .into_iter()
            .map(|(entry, ttl_ms)| {
                let what = format!("re-register {}", entry.id);
                let msg = RequestMsg {
                    op: "register".into(),
                    entry: Some(entry),
                    ttl_ms,
                    ..RequestMsg::default()
                };
                (what, msg)
            })
            .chain(subs.into_iter().map(|m| ("re-subscribe".to_string(), m)));
        let mut waiting = Vec::new();
        for (what, mut msg) in reqs {
            let req = self.next_req.fetch_add(1, Ordering::Relaxed);
            msg.req = req;
            let Ok(bytes) = frame::msg_frame(kind::REQUEST, &msg) else {
                continue;
            };
            let (tx, rx) = oneshot::channel();
            lock(&self.pending).insert(req, tx);
            if outbox.push_force(&bytes).is_ok() {
                waiting.push((what, rx));
            } else {
                lock(&self.pending).remove(&req);
            }
        }
        waiting
    }

    /// Logs how the restoring requests went.
    async fn restored(&self, waiting: Vec<(String, oneshot::Receiver<ReplyMsg>)>) {
        for (what, rx) in waiting {
            match tokio::time::timeout(self.cfg.request_timeout, rx).await {
                Ok(Ok(r)) if r.ok => tracing::info!("{what}: done after reconnecting"),
                Ok(Ok(r)) => {
                    tracing::error!(
                        "could not {what} after reconnecting: {}",
                        r.into_error(None)
                    )
                }
                _ => tracing::error!("could not {what} after reconnecting: no answer"),
            }
        }
        self.bump();
    }

    async fn read_loop(
        &self,
        stream: &Stream,
        rd: &mut FrameReader,
        stop: &mut watch::Receiver<bool>,
        outbox: &Outbox,
        ping: Option<Duration>,
        inbound: &mut Inbound,
    ) -> std::result::Result<(), IpcError> {
        let mut next_ping = ping.map(|p| tokio::time::Instant::now() + p);
        let mut retry_at = None;
        loop {
            loop {
                rd.take_sends(|body| inbound.try_deliver_view(&self.local, body));
                inbound.flush_counts(&self.local);
                let Some(f) = rd.next_frame()? else { break };
                let body = &rd.bytes(&f)[HEADER_LEN..];
                if let Err(e) = self.handle(inbound, f.kind, body).await {
                    match e {
                        // A frame whose body cannot be read hurts only itself: the frame
                        // boundary is intact, so drop it and read on.
                        IpcError::Malformed(why) if is_event(f.kind) => {
                            self.undecodable(f.kind, &why)
                        }
                        e => return Err(e),
                    }
                }
                rd.consume(&f);
            }
            // A fixed deadline, so that steady traffic cannot keep postponing it.
            if retry_at.is_none() && !lock(&self.reports).retry.is_empty() {
                retry_at = Some(tokio::time::Instant::now() + Duration::from_millis(200));
            }
            tokio::select! {
                r = rd.fill(stream) => if !r? { return Ok(()) },
                _ = stop.wait_for(|s| *s) => return Ok(()),
                _ = sleep_until_opt(retry_at) => {
                    retry_at = None;
                    self.send_reports(outbox, false);
                }
                _ = sleep_until_opt(next_ping) => {
                    // Keeps a quiet connection alive past the daemon's idle timeout.
                    let req = RequestMsg { req: frame::NO_REPLY, op: "ping".into(), ..RequestMsg::default() };
                    if let Ok(f) = frame::msg_frame(kind::REQUEST, &req) {
                        let _ = outbox.push_force(&f);
                    }
                    next_ping = ping.map(|p| tokio::time::Instant::now() + p);
                }
            }
        }
    }

    /// Drops an event frame that could not be decoded, with a (throttled) error line.
    fn undecodable(&self, k: u8, why: &str) {
        self.undecodable.fetch_add(1, Ordering::Relaxed);
        self.local.dropped.fetch_add(1, Ordering::Relaxed);
        if let Some(more) = self.bad_log.tick() {
            tracing::error!(
                kind = k,
                more_since_last_line = more,
                "dropped an event frame from the bus daemon that could not be decoded ({why}); the connection stays up"
            );
        }
    }

    async fn handle(
        &self,
        inbound: &mut Inbound,
        k: u8,
        body: &[u8],
    ) -> std::result::Result<(), IpcError> {
        match k {
            kind::SEND => {
                let mut b = Body::array(body, 2)?;
                let to = b.raw_str()?;
                let env = crate::codec::decode_envelope_with(b.rest(), &mut inbound.names)
                    .map_err(|e| IpcError::Malformed(format!("envelope: {e}")))?;
                if env.event.starts_with(frame::RESERVED_PREFIX) {
                    if &*env.event == frame::DELIVERED_EVENT {
                        self.on_report(&env, to);
                    }
                    return Ok(());
                }
                inbound.received.count(env.source.as_str().as_bytes(), to);
                if !inbound.deliver_to(&self.local, to, env).await? {
                    tracing::debug!(
                        machine = %String::from_utf8_lossy(to),
                        "event for a machine no longer bound here; dropped"
                    );
                }
            }
            kind::TOPIC => {
                let mut b = Body::array(body, 2)?;
                let topic = b.str()?;
                let env = b.envelope_with(&mut inbound.names)?;
                self.local.deliver_topic(topic, &env).await;
            }
            kind::TOPIC_COUNTED => {
                let mut b = Body::array(body, 3)?;
                let topic = b.str()?;
                let id = b.uint()?;
                let env = b.envelope_with(&mut inbound.names)?;
                let n = self.local.deliver_topic(topic, &env).await;
                // The publisher waits for this answer: it goes out even past the buffer bound.
                if let Ok(o) = self.conn_now() {
                    let mut fr = Vec::with_capacity(24);
                    frame::write_frame(&mut fr, kind::TOPIC_COUNT, usize::MAX, |w| {
                        frame::write_array(w, 2)?;
                        frame::write_uint(w, id)?;
                        frame::write_uint(w, n as u64)
                    })
                    .map_err(|e| IpcError::Malformed(e.to_string()))?;
                    let _ = o.push_force(&fr);
                }
            }
            kind::GROUP_DELIVER => {
                let mut b = Body::array(body, 2)?;
                let sub = b.uint()?;
                let env = b.envelope_with(&mut inbound.names)?;
                self.local.deliver_group(sub, env).await;
            }
            kind::REPLY => {
                let r: ReplyMsg = frame::decode_msg(body)?;
                if let Some(tx) = lock(&self.pending).remove(&r.req) {
                    let _ = tx.send(r);
                }
            }
            kind::EVENT => {
                let ev: EventMsg = frame::decode_msg(body)?;
                self.on_event(ev);
            }
            kind::NACK => {
                let n: NackMsg = frame::decode_msg(body)?;
                if self.report_refused(&n.to, n.id) {
                    return Ok(());
                }
                self.nacks.fetch_add(1, Ordering::Relaxed);
                if let Some(src) = &n.source {
                    *lock(&self.pair_nacks)
                        .entry(src.as_str().into())
                        .or_default()
                        .entry(n.to.as_str().into())
                        .or_insert(0) += 1;
                }
                if let Some(more) = self.nack_log.tick() {
                    tracing::warn!(to = %n.to, envelope = n.id, code = %n.code, more_since_last_line = more, "the bus daemon could not deliver an event: {}", n.message);
                }
            }
            kind::ACK => {
                let a: frame::AckMsg = frame::decode_msg(body)?;
                self.acked.fetch_add(a.settled, Ordering::AcqRel);
                if !a.sends.is_empty()
                    && let Some(o) = read(&self.conn).as_ref()
                {
                    o.settle_window(&a.sends);
                }
            }
            kind::ERROR => {
                let e: ErrorMsg = frame::decode_msg(body)?;
                return Err(IpcError::Remote {
                    code: e.code,
                    message: e.message,
                });
            }
            other => return Err(IpcError::UnknownFrame(other)),
        }
        Ok(())
    }

    /// Tells the hooks (at once, on this task) and the watchers of a registry event.
    fn announce(&self, ev: RegistryEvent) {
        self.hooks.call(&ev);
        let _ = self.events.send(ev);
    }

    fn on_event(&self, ev: EventMsg) {
        match ev.event.as_str() {
            "joined" => {
                if let Some(e) = ev.entry {
                    self.bump();
                    self.announce(RegistryEvent::Joined(e));
                }
            }
            "left" => {
                if let Some(id) = ev.id {
                    let id = MachineId::from(id);
                    self.bump();
                    for f in read(&self.on_left).iter() {
                        f(&id);
                    }
                    self.announce(RegistryEvent::Left(id));
                }
            }
            "health" => {
                if let (Some(id), Some(healthy)) = (ev.id, ev.healthy) {
                    self.announce(RegistryEvent::HealthChanged {
                        id: id.into(),
                        healthy,
                    });
                }
            }
            other => tracing::debug!(event = other, "ignoring an unknown registry event"),
        }
    }
}

/// Whether a frame kind carries an event to deliver (a bad one is dropped, not fatal).
fn is_event(k: u8) -> bool {
    matches!(k, kind::SEND | kind::TOPIC | kind::GROUP_DELIVER)
}

/// A `TooLarge` from encoding `env` restated with its payload's size.
pub(crate) fn payload_sized(e: Error, env: &Envelope) -> Error {
    match e {
        Error::TooLarge { size, limit, .. } => {
            let payload = env.payload.to_msgpack().map_or(0, |p| p.len());
            // `size` and `limit` are the frame's here: the rest of the frame is overhead.
            frame::too_large(size, limit, payload)
        }
        e => e,
    }
}

/// Sleeps until `at`, or forever without one.
pub(crate) async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Client half of the handshake: `HELLO`, then `WELCOME` (or a typed `ERROR`).
pub(crate) async fn handshake_client(
    stream: &Stream,
    rd: &mut FrameReader,
    cfg: &IpcConfig,
    watch: bool,
    acks: bool,
) -> std::result::Result<Welcome, IpcError> {
    let hello = frame::msg_frame(
        kind::HELLO,
        &Hello {
            protocol: PROTOCOL_VERSION,
            client_id: cfg.client_id.clone(),
            token: cfg.token.clone(),
            watch,
            max_frame: Some(cfg.max_frame as u64),
            acks,
        },
    )
    .map_err(|e| IpcError::Malformed(e.to_string()))?;
    write_now(stream, &hello).await?;
    let (k, body) = read_one(rd, stream, cfg.request_timeout).await?;
    match k {
        kind::WELCOME => {
            let w: Welcome = frame::decode_msg(&body)?;
            if w.protocol != PROTOCOL_VERSION {
                return Err(IpcError::Handshake(format!(
                    "the server speaks protocol {}, this client {PROTOCOL_VERSION}",
                    w.protocol
                )));
            }
            Ok(w)
        }
        kind::ERROR => {
            let e: ErrorMsg = frame::decode_msg(&body)?;
            Err(IpcError::Remote {
                code: e.code,
                message: e.message,
            })
        }
        other => Err(IpcError::Handshake(format!(
            "expected WELCOME (0x02), got 0x{other:02x}"
        ))),
    }
}
