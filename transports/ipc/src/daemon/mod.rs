//! The bus daemon: the host's machine registry and the router between its clients.
//!
//! Start it in-process with [`Daemon::start`] (tests, embedded deployments) or as
//! `switchyard bus` (which calls [`run_until_signal`]). It listens on a local
//! socket created with mode 0600 (0660 with a group), checks each peer's uid,
//! and serves the protocol of docs/PROTOCOL.md. A client that breaks the
//! protocol gets an `ERROR` frame and is dropped; the others keep being served.
//!
//! On Windows the socket is a named pipe (see [`DaemonConfig::socket`]). Named
//! pipes have no file mode: the pipe gets the default security descriptor
//! Windows gives a pipe created by this user (full control for that user,
//! SYSTEM and Administrators; read-only for Everyone, which cannot connect a
//! read-write client). There is no `SO_PEERCRED` there, so the peer uid check is
//! skipped, and [`DaemonConfig::group`] is refused with [`IpcError::Unsupported`].

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use interprocess::local_socket::tokio::{Listener, Stream};
use interprocess::local_socket::traits::tokio::Listener as _;
use interprocess::local_socket::traits::tokio::Stream as _;
use rustc_hash::FxHashMap;
use switchyard_core::{
    Error, MachineEntry, MachineId, TopicPattern, envelope::now_micros, glob_matches,
};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

mod endpoint;
mod link;

use crate::codec::{Checked, TargetKind, ViewReader, check_envelope};
use crate::conn::{AckSink, Budget, FrameReader, Offer, Outbox, read_one, write_now};
use crate::error::IpcError;
use crate::frame::{
    self, Body, DaemonHealth, ErrorMsg, EventMsg, HEADER_LEN, Hello, NO_REPLY, NackMsg,
    PROTOCOL_VERSION, ReplyMsg, RequestMsg, Welcome, kind, nack,
};
#[cfg(windows)]
pub(crate) use endpoint::PIPE_PREFIX;
pub(crate) use endpoint::{bind_listener, check_peer, connect, owner_uid};
pub(crate) use link::peek_envelope_id;
use link::{Link, RouteCache, answer_count};

/// How the daemon listens and whom it accepts.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Socket path (a file on unix; the pipe name on Windows).
    ///
    /// On Windows a path starting with `\\.\pipe\` is the pipe itself; any other
    /// path names the pipe `\\.\pipe\` + the path with `\`, `/` and `:`
    /// replaced by `_` (`C:\Temp\bus.sock` is `\\.\pipe\C__Temp_bus.sock`), and
    /// no file or directory is created.
    pub socket: PathBuf,
    /// Largest frame accepted (length field), default 16 MiB.
    pub max_frame: usize,
    /// Group allowed to connect: the socket becomes mode 0660 owned by that gid, and peers of that gid pass the uid check.
    ///
    /// Unix only: on Windows [`Daemon::start`] returns [`IpcError::Unsupported`] when it is set.
    pub group: Option<u32>,
    /// Skip the peer uid check (SO_PEERCRED).
    ///
    /// Windows has no such check (it is always skipped there), so this changes nothing on Windows.
    pub allow_any_uid: bool,
    /// Shared secret clients must present in `HELLO`.
    pub token: Option<String>,
    /// Heartbeat TTL of machines registered without one.
    pub default_ttl: Duration,
    /// Bytes queued per client connection (its receive queue in the daemon); past it the
    /// target's [`WhenFull`] policy applies, and a subscriber's deliveries are dropped.
    pub outbox_limit: usize,
    /// What a send to a machine whose queue is full gets, unless the machine chose at `register`.
    pub when_full: WhenFull,
    /// A connection whose queue refuses deliveries and does not drain below half for this
    /// long is disconnected (`ERROR slow_consumer`), like Redis's client output buffer limit.
    pub slow_timeout: Duration,
    /// Daemon-wide bytes for queued frames and large frames being read; past it new large
    /// frames are refused (`NACK over_budget`) and queues count as full.
    pub memory_budget: usize,
    /// How long `HELLO` may take after connecting.
    pub hello_timeout: Duration,
    /// A frame must arrive whole within this long of its first byte, or the client is dropped (`ERROR timeout`).
    pub frame_timeout: Duration,
    /// A client that sends nothing for this long is dropped (`ERROR timeout`); `None`: never.
    /// Announced in `WELCOME`; the Rust client pings at a third of it.
    pub idle_timeout: Option<Duration>,
    /// How long shutdown waits for queued frames to be written.
    pub drain_timeout: Duration,
}

/// What a send to a machine gets when the machine's queue in the daemon is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WhenFull {
    /// The sender gets `NACK full` for that event; its other traffic flows on.
    #[default]
    Nack,
    /// The oldest queued events for that connection are dropped (counted) to make room.
    DropOldest,
}

impl WhenFull {
    /// Parses the protocol name (`nack`, `drop_oldest`).
    pub fn parse(s: &str) -> Option<WhenFull> {
        match s {
            "nack" => Some(WhenFull::Nack),
            "drop_oldest" => Some(WhenFull::DropOldest),
            _ => None,
        }
    }
}

impl DaemonConfig {
    /// Defaults for a socket path: 16 MiB frames, own uid only, TTL 10 s, 8 MiB per-client
    /// queue (policy `nack`), slow subscribers cut after 10 s, a 256 MiB memory budget,
    /// 5 s for `HELLO`, 30 s per frame, no idle timeout.
    pub fn new(socket: impl Into<PathBuf>) -> DaemonConfig {
        DaemonConfig {
            socket: socket.into(),
            max_frame: frame::DEFAULT_MAX_FRAME,
            group: None,
            allow_any_uid: false,
            token: None,
            default_ttl: Duration::from_secs(10),
            outbox_limit: 8 * 1024 * 1024,
            when_full: WhenFull::Nack,
            slow_timeout: Duration::from_secs(10),
            memory_budget: 256 * 1024 * 1024,
            hello_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(30),
            idle_timeout: None,
            drain_timeout: Duration::from_secs(5),
        }
    }
}

struct ConnInfo {
    outbox: Arc<Outbox>,
    watch: bool,
    /// The largest frame the client accepts.
    max_frame: usize,
    /// What the sweeper watches, and how it stops the connection's reader.
    watchdog: Arc<Watchdog>,
    kicked: bool,
}

/// One connection as the sweeper sees it: timers without a timer per read (a timer set and
/// cancelled on every read costs the hot path), checked every 100 ms instead.
struct Watchdog {
    /// Milliseconds on the daemon's clock (see `Shared::ms`): when the incomplete frame at
    /// the front began (0: none), and when bytes last arrived.
    partial_since: AtomicU64,
    last_read: AtomicU64,
    kick: Notify,
    why: Mutex<Option<IpcError>>,
}

struct MRec {
    entry: MachineEntry,
    conn: u64,
    seq: u64,
    last_heartbeat: Instant,
    ttl: Duration,
    healthy: bool,
    when_full: WhenFull,
}

struct SubRec {
    conn: u64,
    sub: u64,
    topic: Option<TopicPattern>,
    group: Option<Arc<str>>,
}

/// A counted publish waiting for its subscribers' connections to say how many machines got it.
struct PendingCount {
    publisher: Arc<Outbox>,
    req: u64,
    waiting: Vec<u64>,
    sum: u64,
}

/// How long a counted publish waits for the subscribers' counts before answering with
/// what it has (a connection that does not answer counts 0).
const COUNT_WAIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct State {
    conns: HashMap<u64, ConnInfo>,
    counts: HashMap<u64, PendingCount>,
    next_count: u64,
    machines: HashMap<MachineId, MRec>,
    per_type: HashMap<Arc<str>, u64>,
    seq: u64,
    subs: Vec<SubRec>,
    group_next: HashMap<Arc<str>, usize>,
}

struct Shared {
    cfg: DaemonConfig,
    /// Itself, for tasks that must not keep the daemon alive.
    me: std::sync::Weak<Shared>,
    st: Mutex<State>,
    generation: AtomicU64,
    next_conn: AtomicU64,
    routed: AtomicU64,
    dropped: AtomicU64,
    rejected: AtomicU64,
    last_activity: AtomicU64,
    nacked_full: AtomicU64,
    dropped_oldest: AtomicU64,
    dropped_slow: AtomicU64,
    slow_disconnects: AtomicU64,
    over_budget: AtomicU64,
    fd_exhausted: AtomicU64,
    budget: Arc<Budget>,
    /// The daemon's clock for the watchdogs.
    started: Instant,
    hasher: RandomState,
    server_id: String,
    own_uid: Option<u32>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // State is plain maps; a panic elsewhere leaves it usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Namespace of [`Daemon::start`].
pub struct Daemon;

/// A running daemon; dropping it stops it (prefer [`DaemonHandle::shutdown`], which drains).
pub struct DaemonHandle {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for DaemonHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonHandle")
            .field("socket", &self.shared.cfg.socket)
            .finish()
    }
}

impl Daemon {
    /// Binds the socket and starts serving; must run inside a tokio runtime.
    pub fn start(cfg: DaemonConfig) -> Result<DaemonHandle, IpcError> {
        #[cfg(not(unix))]
        if let Some(g) = cfg.group {
            return Err(IpcError::Unsupported(format!(
                "--group {g} (DaemonConfig::group) works on unix only: a Windows named pipe has no group mode and gets the default security descriptor of the user who starts the daemon, so run the daemon and its clients as the same user and leave --group unset"
            )));
        }
        let mode = if cfg.group.is_some() { 0o660 } else { 0o600 };
        let listener = bind_listener(&cfg.socket, mode)?;
        #[cfg(unix)]
        if let Some(g) = cfg.group {
            std::os::unix::fs::chown(&cfg.socket, None, Some(g))
                .map_err(|e| IpcError::io(cfg.socket.display().to_string(), e))?;
        }
        let own_uid = if cfg.allow_any_uid {
            None
        } else {
            owner_uid(&cfg.socket)
        };
        let shared = Arc::new_cyclic(|me| Shared {
            me: me.clone(),
            // Unique per start: clients tell a restarted daemon from the one they lost.
            server_id: format!(
                "switchyard-bus-{}-{:08x}",
                std::process::id(),
                RandomState::new().hash_one(now_micros()) as u32
            ),
            st: Mutex::new(State::default()),
            generation: AtomicU64::new(0),
            next_conn: AtomicU64::new(1),
            routed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            last_activity: AtomicU64::new(0),
            nacked_full: AtomicU64::new(0),
            dropped_oldest: AtomicU64::new(0),
            dropped_slow: AtomicU64::new(0),
            slow_disconnects: AtomicU64::new(0),
            over_budget: AtomicU64::new(0),
            fd_exhausted: AtomicU64::new(0),
            budget: Budget::new(cfg.memory_budget),
            started: Instant::now(),
            hasher: RandomState::new(),
            own_uid,
            cfg,
        });
        let (stop, stop_rx) = watch::channel(false);
        tracing::info!(socket = %shared.cfg.socket.display(), "bus daemon listening");
        let accept = tokio::spawn(accept_loop(shared.clone(), listener, stop_rx));
        Ok(DaemonHandle {
            shared,
            stop,
            accept: Some(accept),
        })
    }
}

impl DaemonHandle {
    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.shared.cfg.socket
    }

    /// Connections, machines, routed and dropped counts, last activity.
    pub fn health(&self) -> DaemonHealth {
        self.shared.health()
    }

    /// Stops accepting, lets every connection write what is queued, and removes the socket file.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send_replace(true);
        if let Some(t) = self.accept.take() {
            let _ = t.await;
        }
    }
}

impl Drop for DaemonHandle {
    fn drop(&mut self) {
        let _ = self.stop.send_replace(true);
        if let Some(t) = self.accept.take() {
            t.abort();
            // The listener drops with the task; remove the file ourselves in case it has not yet.
            // (A named pipe has no file: it goes away with its last handle.)
            #[cfg(unix)]
            let _ = std::fs::remove_file(&self.shared.cfg.socket);
        }
    }
}

/// Runs a daemon until SIGINT or SIGTERM (Ctrl-C on Windows), then drains and removes the socket.
pub async fn run_until_signal(cfg: DaemonConfig) -> Result<(), IpcError> {
    let handle = Daemon::start(cfg)?;
    wait_for_signal().await;
    tracing::info!("signal received: draining and stopping");
    handle.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut i), Ok(mut t)) => {
                tokio::select! {
                    _ = i.recv() => {}
                    _ = t.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `errno` values of "too many open files" (process, system); the same on Linux and macOS.
#[cfg(unix)]
const FD_ERRORS: [i32; 2] = [24, 23];

/// Whether an accept error means the process or the system is out of file descriptors.
fn out_of_fds(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    {
        e.raw_os_error().is_some_and(|c| FD_ERRORS.contains(&c))
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

/// A file descriptor kept in reserve: freed to accept (and refuse) a client when the process runs out.
fn spare_fd() -> Option<std::fs::File> {
    #[cfg(unix)]
    {
        std::fs::File::open("/dev/null").ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: Listener, stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    let sweeper = tokio::spawn(sweep_loop(Arc::downgrade(&shared)));
    let mut stop_wait = stop.clone();
    let mut spare = spare_fd();
    // Accept errors back off (5 ms doubling to 1 s) and are logged once per episode.
    let mut backoff = Duration::ZERO;
    let mut failures = 0u64;
    let mut refuse_one = false;
    loop {
        if !backoff.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop_wait.wait_for(|s| *s) => break,
            }
        }
        tokio::select! {
            r = listener.accept() => match r {
                Ok(stream) => {
                    if failures > 0 {
                        tracing::info!(failed_accepts = failures, "accepting clients again");
                        failures = 0;
                    }
                    backoff = Duration::ZERO;
                    if spare.is_none() {
                        spare = spare_fd();
                    }
                    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                    conns.spawn(serve(shared.clone(), stream, id, stop.clone()));
                }
                Err(e) => {
                    let fds = out_of_fds(&e);
                    if failures == 0 {
                        if fds {
                            tracing::warn!(error = %e, open_connections = conns.len(), "out of file descriptors: refusing new clients until some close (raise `ulimit -n`); logged once per episode");
                        } else {
                            tracing::warn!(error = %e, "accept failed; backing off (logged once per episode)");
                        }
                    }
                    failures += 1;
                    if fds {
                        shared.fd_exhausted.fetch_add(1, Ordering::Relaxed);
                        refuse_one = true;
                    }
                    backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                }
            },
            _ = stop_wait.wait_for(|s| *s) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
        if std::mem::take(&mut refuse_one) {
            // Free the reserve descriptor to take the waiting client and tell it why,
            // instead of leaving it hanging in the backlog.
            if spare.take().is_some()
                && let Ok(Ok(stream)) =
                    tokio::time::timeout(Duration::from_millis(50), listener.accept()).await
            {
                let busy = error_frame(&IpcError::Busy(
                    "the bus daemon is out of file descriptors; retry later".into(),
                ));
                let _ = tokio::time::timeout(Duration::from_millis(50), write_now(&stream, &busy))
                    .await;
            }
            spare = spare_fd();
        }
    }
    // Stop accepting first (dropping the listener removes the socket file), then drain.
    drop(listener);
    #[cfg(unix)]
    let _ = std::fs::remove_file(&shared.cfg.socket);
    sweeper.abort();
    let deadline = shared.cfg.drain_timeout + Duration::from_millis(500);
    let _ = tokio::time::timeout(deadline, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
    tracing::info!("bus daemon stopped");
}

async fn sweep_loop(shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(s) = shared.upgrade() else { break };
        let now = Instant::now();
        let mut st = lock(&s.st);
        let mut changed = Vec::new();
        for r in st.machines.values_mut() {
            let healthy = now.duration_since(r.last_heartbeat) <= r.ttl;
            if healthy != r.healthy {
                r.healthy = healthy;
                changed.push((r.entry.id.to_string(), healthy));
            }
        }
        for (id, healthy) in changed {
            s.notify(
                &st,
                &EventMsg {
                    event: "health".into(),
                    entry: None,
                    id: Some(id),
                    healthy: Some(healthy),
                },
            );
        }
        // Slow consumers (a queue that refused deliveries and stayed over half full too long,
        // or was not read at all), half frames and idle connections.
        let ms = s.ms();
        let frame_ms = s.cfg.frame_timeout.as_millis() as u64;
        let idle_ms = s.cfg.idle_timeout.map(|d| d.as_millis() as u64);
        for (id, c) in st.conns.iter_mut() {
            if c.kicked {
                continue;
            }
            let w = &c.watchdog;
            let partial = w.partial_since.load(Ordering::Relaxed);
            let last = w.last_read.load(Ordering::Relaxed);
            let why = if partial != 0 && ms.saturating_sub(partial) > frame_ms {
                Some(IpcError::Timeout(format!(
                    "a frame did not arrive whole within {:?} of its first byte",
                    s.cfg.frame_timeout
                )))
            } else if idle_ms.is_some_and(|i| ms.saturating_sub(last) > i) {
                Some(IpcError::Timeout(format!(
                    "nothing received for {:?} (send a `ping` request to stay connected)",
                    s.cfg.idle_timeout.unwrap_or_default()
                )))
            } else if c.outbox.full_for().is_some_and(|d| d >= s.cfg.slow_timeout) {
                s.slow_disconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    conn = id,
                    queued = c.outbox.queued(),
                    "disconnecting a slow consumer: its queue stayed full, or unread, for {:?}",
                    s.cfg.slow_timeout
                );
                Some(IpcError::SlowConsumer(format!(
                    "this connection's queue in the daemon stayed full (or was not read) for {:?}: read faster, or subscribe to less",
                    s.cfg.slow_timeout
                )))
            } else {
                None
            };
            if let Some(e) = why {
                c.kicked = true;
                *lock(&w.why) = Some(e);
                w.kick.notify_one();
            }
        }
    }
}

impl Shared {
    /// Milliseconds since the daemon started, plus one (so 0 can mean "not set").
    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    fn ms_at(&self, t: std::time::Instant) -> u64 {
        t.saturating_duration_since(self.started.into_std())
            .as_millis() as u64
            + 1
    }

    fn health(&self) -> DaemonHealth {
        let st = lock(&self.st);
        DaemonHealth {
            connections: st.conns.len() as u64,
            machines: st.machines.len() as u64,
            routed: self.routed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            last_activity_us: self.last_activity.load(Ordering::Relaxed),
            nacked_full: self.nacked_full.load(Ordering::Relaxed),
            dropped_oldest: self.dropped_oldest.load(Ordering::Relaxed)
                + st.conns
                    .values()
                    .map(|c| c.outbox.dropped_oldest())
                    .sum::<u64>(),
            dropped_slow: self.dropped_slow.load(Ordering::Relaxed),
            slow_disconnects: self.slow_disconnects.load(Ordering::Relaxed),
            over_budget: self.over_budget.load(Ordering::Relaxed),
            budget_used: self.budget.used() as u64,
            budget_limit: self.budget.limit() as u64,
            fd_exhausted: self.fd_exhausted.load(Ordering::Relaxed),
        }
    }

    /// Pushes a registry event to every watching connection (called with the state locked, so events stay ordered).
    /// Adds one connection's answer to a counted publish; answers the publisher once all did.
    fn counted(&self, id: u64, conn: u64, n: u64) {
        let done = {
            let mut st = lock(&self.st);
            let Some(p) = st.counts.get_mut(&id) else {
                return;
            };
            let before = p.waiting.len();
            p.waiting.retain(|c| *c != conn);
            if p.waiting.len() == before {
                return;
            }
            p.sum += n;
            if p.waiting.is_empty() {
                st.counts.remove(&id)
            } else {
                None
            }
        };
        if let Some(p) = done {
            answer_count(&p.publisher, p.req, p.sum);
        }
    }

    /// Answers a counted publish with what came in, when some connection did not answer.
    fn count_timed_out(&self, id: u64) {
        let p = lock(&self.st).counts.remove(&id);
        if let Some(p) = p {
            tracing::warn!(
                missing = p.waiting.len(),
                "a counted publish got no count from {} connection(s) in time; answering with the others",
                p.waiting.len()
            );
            answer_count(&p.publisher, p.req, p.sum);
        }
    }

    fn notify(&self, st: &State, ev: &EventMsg) {
        let Ok(bytes) = frame::msg_frame(kind::EVENT, ev) else {
            return;
        };
        for c in st.conns.values().filter(|c| c.watch) {
            let _ = c.outbox.push_force(&bytes);
        }
    }

    fn request(&self, conn: u64, req: RequestMsg) -> ReplyMsg {
        let id = req.req;
        match self.request_inner(conn, req) {
            Ok(r) => r,
            Err(e) => ReplyMsg::err(id, &e),
        }
    }

    /// A machine `conn` did not register: it may not deregister it, heartbeat it or send as it.
    fn not_owner(req: u64, id: &MachineId) -> ReplyMsg {
        ReplyMsg {
            req,
            ok: false,
            code: Some(nack::NOT_OWNER.into()),
            message: Some(format!(
                "machine `{id}` was registered by another connection: a connection may only deregister, heartbeat or send as the machines it registered"
            )),
            ..ReplyMsg::default()
        }
    }

    /// Forgets the per-type id counter of a type with no machine left.
    fn forget_type(st: &mut State, machine_type: &str) {
        if !st
            .machines
            .values()
            .any(|m| *m.entry.machine_type == *machine_type)
        {
            st.per_type.remove(machine_type);
        }
    }

    fn request_inner(&self, conn: u64, req: RequestMsg) -> Result<ReplyMsg, Error> {
        let r = req.req;
        let need_id = |id: Option<String>| -> Result<MachineId, Error> {
            id.map(MachineId::from).ok_or_else(|| Error::InvalidName {
                name: String::new(),
                reason: "this operation needs `id`",
            })
        };
        let mut st = lock(&self.st);
        match req.op.as_str() {
            "register" => {
                let Some(mut entry) = req.entry else {
                    return Err(Error::InvalidName {
                        name: String::new(),
                        reason: "register needs `entry`",
                    });
                };
                if entry.machine_type.trim().is_empty() {
                    return Err(Error::InvalidName {
                        name: entry.machine_type.to_string(),
                        reason: "a machine type must not be empty",
                    });
                }
                let when_full = match req.when_full.as_deref() {
                    None => self.cfg.when_full,
                    Some(w) => WhenFull::parse(w).ok_or(Error::InvalidName {
                        name: w.to_string(),
                        reason: "when_full is `nack` or `drop_oldest`",
                    })?,
                };
                if !entry.id.as_str().is_empty() && st.machines.contains_key(&entry.id) {
                    return Err(Error::DuplicateId(entry.id));
                }
                let n = {
                    let c = st.per_type.entry(entry.machine_type.clone()).or_insert(0);
                    *c += 1;
                    *c
                };
                if entry.id.as_str().is_empty() {
                    let mut salt = 0u64;
                    loop {
                        let rnd = self.hasher.hash_one((n, salt, now_micros())) as u32;
                        let id =
                            MachineId::from(format!("{}-{}-{:08x}", entry.machine_type, n, rnd));
                        if !st.machines.contains_key(&id) {
                            entry.id = id;
                            break;
                        }
                        salt += 1;
                    }
                } else if st.machines.contains_key(&entry.id) {
                    return Err(Error::DuplicateId(entry.id));
                }
                st.seq += 1;
                let seq = st.seq;
                let ttl = req
                    .ttl_ms
                    .map(Duration::from_millis)
                    .unwrap_or(self.cfg.default_ttl);
                st.machines.insert(
                    entry.id.clone(),
                    MRec {
                        entry: entry.clone(),
                        conn,
                        seq,
                        last_heartbeat: Instant::now(),
                        ttl,
                        healthy: true,
                        when_full,
                    },
                );
                self.generation.fetch_add(1, Ordering::AcqRel);
                tracing::debug!(machine = %entry.id, conn, "registered");
                self.notify(
                    &st,
                    &EventMsg {
                        event: "joined".into(),
                        entry: Some(entry.clone()),
                        id: None,
                        healthy: None,
                    },
                );
                Ok(ReplyMsg {
                    entry: Some(entry),
                    ..ReplyMsg::ok(r)
                })
            }
            "deregister" => {
                let id = need_id(req.id)?;
                match st.machines.get(&id) {
                    None => return Err(Error::UnknownTarget(id)),
                    Some(m) if m.conn != conn => return Ok(Self::not_owner(r, &id)),
                    Some(_) => {}
                }
                if let Some(m) = st.machines.remove(&id) {
                    Self::forget_type(&mut st, &m.entry.machine_type);
                }
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.notify(&st, &left(&id));
                Ok(ReplyMsg::ok(r))
            }
            "ping" => Ok(ReplyMsg::ok(r)),
            "heartbeat" => {
                let id = need_id(req.id)?;
                let rec = st
                    .machines
                    .get_mut(&id)
                    .ok_or_else(|| Error::UnknownTarget(id.clone()))?;
                if rec.conn != conn {
                    return Ok(Self::not_owner(r, &id));
                }
                rec.last_heartbeat = Instant::now();
                let revived = !std::mem::replace(&mut rec.healthy, true);
                if revived {
                    self.notify(
                        &st,
                        &EventMsg {
                            event: "health".into(),
                            entry: None,
                            id: Some(id.to_string()),
                            healthy: Some(true),
                        },
                    );
                }
                Ok(ReplyMsg::ok(r))
            }
            "get" => {
                let id = need_id(req.id)?;
                Ok(ReplyMsg {
                    entry: st.machines.get(&id).map(|m| m.entry.clone()),
                    ..ReplyMsg::ok(r)
                })
            }
            "is_healthy" => {
                let id = need_id(req.id)?;
                let rec = st
                    .machines
                    .get(&id)
                    .ok_or_else(|| Error::UnknownTarget(id.clone()))?;
                Ok(ReplyMsg {
                    healthy: Some(Instant::now().duration_since(rec.last_heartbeat) <= rec.ttl),
                    ..ReplyMsg::ok(r)
                })
            }
            "discover" | "discover_pattern" => {
                let by_type = req.op == "discover";
                let key = if by_type {
                    req.machine_type.unwrap_or_default()
                } else {
                    req.pattern.unwrap_or_default()
                };
                if !by_type && key.is_empty() {
                    return Err(Error::InvalidPattern {
                        pattern: String::new(),
                        reason: "a discovery pattern must not be empty (use `*` for every type)",
                    });
                }
                let mut found: Vec<(u64, MachineEntry)> = st
                    .machines
                    .values()
                    .filter(|m| {
                        if by_type {
                            *m.entry.machine_type == *key
                        } else {
                            glob_matches(&key, &m.entry.machine_type)
                        }
                    })
                    .map(|m| (m.seq, m.entry.clone()))
                    .collect();
                found.sort_by_key(|(s, _)| *s);
                Ok(ReplyMsg {
                    entries: Some(found.into_iter().map(|(_, e)| e).collect()),
                    ..ReplyMsg::ok(r)
                })
            }
            "types" => {
                let set: BTreeSet<String> = st
                    .machines
                    .values()
                    .map(|m| m.entry.machine_type.to_string())
                    .collect();
                Ok(ReplyMsg {
                    types: Some(set.into_iter().collect()),
                    ..ReplyMsg::ok(r)
                })
            }
            "health" => {
                drop(st);
                Ok(ReplyMsg {
                    health: Some(self.health()),
                    ..ReplyMsg::ok(r)
                })
            }
            "subscribe" => {
                let sub = req.sub.ok_or(Error::InvalidName {
                    name: String::new(),
                    reason: "subscribe needs `sub`",
                })?;
                let topic = match req.pattern {
                    Some(p) => Some(TopicPattern::parse(&p)?),
                    None => None,
                };
                let group: Option<Arc<str>> = req.group.map(Into::into);
                if topic.is_none() && group.is_none() {
                    return Err(Error::InvalidPattern {
                        pattern: String::new(),
                        reason: "subscribe needs `pattern`, `group` or both",
                    });
                }
                if group.as_deref().is_some_and(str::is_empty) {
                    return Err(Error::InvalidName {
                        name: String::new(),
                        reason: "a group name must not be empty",
                    });
                }
                st.subs.retain(|s| !(s.conn == conn && s.sub == sub));
                st.subs.push(SubRec {
                    conn,
                    sub,
                    topic,
                    group,
                });
                Ok(ReplyMsg::ok(r))
            }
            "unsubscribe" => {
                let sub = req.sub.unwrap_or_default();
                st.subs.retain(|s| !(s.conn == conn && s.sub == sub));
                Self::forget_groups(&mut st);
                Ok(ReplyMsg::ok(r))
            }
            other => Err(Error::InvalidName {
                name: other.to_string(),
                reason: "unknown op (see docs/PROTOCOL.md for the list)",
            }),
        }
    }

    /// Forgets the round-robin position of groups with no member left.
    fn forget_groups(st: &mut State) {
        let State {
            subs, group_next, ..
        } = st;
        group_next.retain(|g, _| subs.iter().any(|s| s.group.as_ref() == Some(g)));
    }

    /// Removes a closed connection with its machines and subscriptions.
    fn drop_conn(&self, conn: u64) {
        let mut st = lock(&self.st);
        if let Some(c) = st.conns.remove(&conn) {
            self.dropped_oldest
                .fetch_add(c.outbox.dropped_oldest(), Ordering::Relaxed);
        }
        st.subs.retain(|s| s.conn != conn);
        let mut done = Vec::new();
        st.counts.retain(|_, p| {
            p.waiting.retain(|c| *c != conn);
            if p.waiting.is_empty() {
                done.push((p.publisher.clone(), p.req, p.sum));
                false
            } else {
                true
            }
        });
        for (publisher, req, sum) in done {
            answer_count(&publisher, req, sum);
        }
        let gone: Vec<MachineId> = st
            .machines
            .iter()
            .filter(|(_, m)| m.conn == conn)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            if let Some(m) = st.machines.remove(id) {
                Self::forget_type(&mut st, &m.entry.machine_type);
            }
        }
        Self::forget_groups(&mut st);
        if !gone.is_empty() {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        for id in &gone {
            tracing::debug!(machine = %id, conn, "deregistered: its connection closed");
            self.notify(&st, &left(id));
        }
    }
}

fn left(id: &MachineId) -> EventMsg {
    EventMsg {
        event: "left".into(),
        entry: None,
        id: Some(id.to_string()),
        healthy: None,
    }
}

fn error_frame(e: &IpcError) -> Vec<u8> {
    frame::msg_frame(
        kind::ERROR,
        &ErrorMsg {
            code: e.code().into(),
            message: e.to_string(),
        },
    )
    .unwrap_or_default()
}

async fn serve(shared: Arc<Shared>, stream: Stream, conn: u64, stop: watch::Receiver<bool>) {
    let stream = Arc::new(stream);
    let mut rd = FrameReader::with_budget(shared.cfg.max_frame, shared.budget.clone());
    let hello = match handshake(&shared, &stream, &mut rd).await {
        Ok(h) => h,
        Err(e) => {
            shared.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(conn, error = %e, "client rejected during handshake");
            let _ = write_now(&stream, &error_frame(&e)).await;
            return;
        }
    };
    // Frames to this client are bounded by what it said it accepts.
    let max_frame = hello
        .max_frame
        .map_or(shared.cfg.max_frame, |m| {
            usize::try_from(m).unwrap_or(usize::MAX)
        })
        .clamp(
            frame::HEADER_LEN,
            shared.cfg.max_frame.max(frame::HEADER_LEN),
        );
    let outbox = Outbox::start_routed(
        stream.clone(),
        shared.cfg.outbox_limit,
        max_frame,
        format!("client {} (#{conn})", hello.client_id),
        shared.budget.clone(),
    );
    let sink = hello
        .acks
        .then(|| AckSink::new(&outbox, shared.cfg.outbox_limit / 32));
    let watchdog = Arc::new(Watchdog {
        partial_since: AtomicU64::new(0),
        last_read: AtomicU64::new(shared.ms()),
        kick: Notify::new(),
        why: Mutex::new(None),
    });
    lock(&shared.st).conns.insert(
        conn,
        ConnInfo {
            outbox: outbox.clone(),
            watch: hello.watch,
            max_frame,
            watchdog: watchdog.clone(),
            kicked: false,
        },
    );
    tracing::info!(conn, client = %hello.client_id, "client connected");
    let mut link = Link {
        shared: &shared,
        conn,
        me: &outbox,
        sink,
        cache: RouteCache {
            generation: u64::MAX,
            by_id: FxHashMap::default(),
            owned: FxHashMap::default(),
        },
        view: ViewReader::default(),
        last_source: Vec::new(),
    };
    let result = link.read_loop(&stream, &mut rd, stop, &watchdog).await;
    drop(link);
    shared.drop_conn(conn);
    match result {
        Ok(()) => {
            outbox.drain(shared.cfg.drain_timeout).await;
            tracing::info!(conn, client = %hello.client_id, "client disconnected");
        }
        Err(e) => {
            shared.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(conn, client = %hello.client_id, error = %e, "client dropped");
            // Tell the client why, after whatever was queued for it.
            let _ = outbox.push_force(&error_frame(&e));
            outbox.drain(Duration::from_millis(500)).await;
        }
    }
    outbox.close("connection finished");
}

async fn handshake(
    shared: &Shared,
    stream: &Stream,
    rd: &mut FrameReader,
) -> Result<Hello, IpcError> {
    check_peer(stream, shared.own_uid, shared.cfg.group)?;
    let welcome = Welcome {
        protocol: PROTOCOL_VERSION,
        server_id: shared.server_id.clone(),
        max_frame: shared.cfg.max_frame as u64,
        idle_timeout_ms: shared.cfg.idle_timeout.map(|d| d.as_millis() as u64),
        frame_timeout_ms: Some(shared.cfg.frame_timeout.as_millis() as u64),
        queue_limit: Some(shared.cfg.outbox_limit as u64),
    };
    handshake_server(
        stream,
        rd,
        shared.cfg.token.as_deref(),
        welcome,
        shared.cfg.hello_timeout,
    )
    .await
}

/// Compares two secrets in time that depends on their lengths only, not on where they differ.
pub(crate) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    // Keep the optimiser from turning the loop into an early exit.
    std::hint::black_box(diff) == 0
}

/// Server half of the handshake: reads `HELLO`, checks version and token, answers `welcome`.
///
/// Frames the client pipelined after `HELLO` stay in `rd`, to be read next.
pub(crate) async fn handshake_server(
    stream: &Stream,
    rd: &mut FrameReader,
    token: Option<&str>,
    welcome: Welcome,
    deadline: Duration,
) -> Result<Hello, IpcError> {
    let (k, body) = read_one(rd, stream, deadline).await?;
    if k != kind::HELLO {
        return Err(IpcError::Handshake(format!(
            "the first frame must be HELLO (0x01), got 0x{k:02x}"
        )));
    }
    let hello: Hello = frame::decode_msg(&body)?;
    if hello.protocol != PROTOCOL_VERSION {
        return Err(IpcError::Handshake(format!(
            "protocol version {} is not supported; this side speaks {PROTOCOL_VERSION}",
            hello.protocol
        )));
    }
    if let Some(t) = token
        && !same_secret(
            hello.token.as_deref().unwrap_or("").as_bytes(),
            t.as_bytes(),
        )
    {
        return Err(IpcError::Handshake(
            "missing or wrong auth token: pass the daemon's token in HELLO".into(),
        ));
    }
    let welcome = frame::msg_frame(kind::WELCOME, &welcome)
        .map_err(|e| IpcError::Malformed(e.to_string()))?;
    write_now(stream, &welcome).await?;
    Ok(hello)
}

/// An `ERROR` frame for a typed error.
pub(crate) fn error_frame_for(e: &IpcError) -> Vec<u8> {
    error_frame(e)
}

#[cfg(test)]
mod tests {
    use super::endpoint::{PIPE_PREFIX, pipe_name};

    #[test]
    fn windows_pipe_names() {
        // A named pipe path is used as is (any case of the prefix).
        assert_eq!(pipe_name(r"\\.\pipe\switchyard-ann-bus"), None);
        assert_eq!(pipe_name(r"\\.\PIPE\x"), None);
        // Anything else becomes a pipe name of its own, without separators.
        assert_eq!(
            pipe_name(r"C:\Temp\bus.sock").as_deref(),
            Some("C__Temp_bus.sock")
        );
        assert_eq!(
            pipe_name("/run/user/1000/bus.sock").as_deref(),
            Some("_run_user_1000_bus.sock")
        );
        assert_eq!(pipe_name("bus").as_deref(), Some("bus"));
        // The bare prefix names no pipe.
        assert_eq!(pipe_name(PIPE_PREFIX).as_deref(), Some("__._pipe_"));
    }
}
