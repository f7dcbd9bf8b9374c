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
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::conn::{FrameReader, Outbox, read_one, write_now};
use crate::error::IpcError;
use crate::frame::{
    self, Body, DaemonHealth, ErrorMsg, EventMsg, HEADER_LEN, Hello, NO_REPLY, NackMsg,
    PROTOCOL_VERSION, ReplyMsg, RequestMsg, Welcome, kind,
};

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
    /// Bytes queued per client connection before the daemon waits for that client (policy `Wait`).
    pub outbox_limit: usize,
    /// How long shutdown waits for queued frames to be written.
    pub drain_timeout: Duration,
}

impl DaemonConfig {
    /// Defaults for a socket path: 16 MiB frames, own uid only, TTL 10 s, 8 MiB per-client queue.
    pub fn new(socket: impl Into<PathBuf>) -> DaemonConfig {
        DaemonConfig {
            socket: socket.into(),
            max_frame: frame::DEFAULT_MAX_FRAME,
            group: None,
            allow_any_uid: false,
            token: None,
            default_ttl: Duration::from_secs(10),
            outbox_limit: 8 * 1024 * 1024,
            drain_timeout: Duration::from_secs(5),
        }
    }
}

struct ConnInfo {
    outbox: Arc<Outbox>,
    watch: bool,
}

struct MRec {
    entry: MachineEntry,
    conn: u64,
    seq: u64,
    last_heartbeat: Instant,
    ttl: Duration,
    healthy: bool,
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

/// Makes the local socket name for a path (on Windows, a named pipe: see [`DaemonConfig::socket`]).
pub(crate) fn socket_name(path: &Path) -> std::io::Result<interprocess::local_socket::Name<'_>> {
    use interprocess::local_socket::{GenericFilePath, ToFsName};
    #[cfg(windows)]
    if let Some(pipe) = pipe_name(&path.to_string_lossy()) {
        use interprocess::local_socket::{GenericNamespaced, ToNsName};
        // GenericNamespaced prepends `\\.\pipe\`.
        return pipe
            .to_ns_name::<GenericNamespaced>()
            .map(|n| n.into_owned());
    }
    path.to_fs_name::<GenericFilePath>()
}

/// The prefix of a local named pipe's path on Windows.
#[cfg(any(windows, test))]
pub(crate) const PIPE_PREFIX: &str = r"\\.\pipe\";

/// Windows: `None` for a path that already is a named pipe (`\\.\pipe\NAME`, used as is),
/// else the pipe name (after `\\.\pipe\`) that stands for `path`: `\`, `/` and `:` become `_`.
#[cfg(any(windows, test))]
pub(crate) fn pipe_name(path: &str) -> Option<String> {
    let is_pipe = path.len() > PIPE_PREFIX.len()
        && path
            .get(..PIPE_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(PIPE_PREFIX));
    (!is_pipe).then(|| path.replace(['\\', '/', ':'], "_"))
}

/// Connects to a local socket path.
pub(crate) async fn connect(path: &Path) -> std::io::Result<Stream> {
    let name = socket_name(path)?;
    Stream::connect(name).await
}

/// Binds a listener at `path` with the given unix mode; refuses to displace a live listener.
///
/// On Windows `mode` is ignored (the pipe gets the default security descriptor of
/// the creating user) and nothing is created on disk; the pipe's first instance is
/// created with `FILE_FLAG_FIRST_PIPE_INSTANCE`, so a name another listener owns
/// is refused with [`IpcError::AlreadyRunning`].
pub(crate) fn bind_listener(path: &Path, mode: u32) -> Result<Listener, IpcError> {
    use interprocess::local_socket::ListenerOptions;
    #[cfg(unix)]
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(IpcError::AlreadyRunning(path.to_path_buf()));
        }
        // A socket file nobody listens on is left over from a crash: reclaim it.
        let _ = std::fs::remove_file(path);
    }
    #[cfg(unix)]
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| IpcError::io(dir.display().to_string(), e))?;
    }
    let name = socket_name(path).map_err(|e| IpcError::io(path.display().to_string(), e))?;
    let opts = ListenerOptions::new().name(name).reclaim_name(true);
    #[cfg(unix)]
    let opts = {
        use interprocess::os::unix::local_socket::ListenerOptionsExt;
        opts.mode(mode as _)
    };
    #[cfg(not(unix))]
    let _ = mode;
    let listener = opts.create_tokio().map_err(|e| {
        // ERROR_ACCESS_DENIED on the first pipe instance: the name is taken.
        #[cfg(windows)]
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            return IpcError::AlreadyRunning(path.to_path_buf());
        }
        IpcError::io(path.display().to_string(), e)
    })?;
    // The mode set before bind() is still masked by the umask (0660 became 0640); set it exactly.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| IpcError::io(path.display().to_string(), e))?;
    }
    Ok(listener)
}

/// The uid that owns `path` (the daemon's own uid right after it created the socket).
///
/// `None` on Windows, which turns the peer check off there.
pub(crate) fn owner_uid(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| m.uid())
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Checks a peer's credentials: same uid, or the configured group; `Ok` where the OS cannot tell.
///
/// Windows: always `Ok`. Named pipes carry no uid (`SO_PEERCRED`); who may
/// connect is decided by the pipe's default security descriptor.
pub(crate) fn check_peer(
    stream: &Stream,
    own_uid: Option<u32>,
    group: Option<u32>,
) -> Result<(), IpcError> {
    #[cfg(unix)]
    {
        use interprocess::local_socket::traits::StreamCommon;
        let Some(ours) = own_uid else { return Ok(()) };
        let creds = stream
            .peer_creds()
            .map_err(|e| IpcError::io("peer credentials", e))?;
        let Some(peer) = creds.euid() else {
            return Ok(());
        };
        let group_ok = group.is_some_and(|g| creds.egid().is_some_and(|pg| pg == g));
        if peer != ours && !group_ok {
            return Err(IpcError::PeerUid { peer, ours });
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        let _ = (stream, own_uid, group);
        Ok(())
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
            server_id: format!("switchyard-bus-{}", std::process::id()),
            cfg,
            me: me.clone(),
            st: Mutex::new(State::default()),
            generation: AtomicU64::new(0),
            next_conn: AtomicU64::new(1),
            routed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            last_activity: AtomicU64::new(0),
            hasher: RandomState::new(),
            own_uid,
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

async fn accept_loop(shared: Arc<Shared>, listener: Listener, stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    let sweeper = tokio::spawn(sweep_loop(Arc::downgrade(&shared)));
    let mut stop_wait = stop.clone();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok(stream) => {
                    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                    conns.spawn(serve(shared.clone(), stream, id, stop.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                }
            },
            _ = stop_wait.wait_for(|s| *s) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
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
    }
}

impl Shared {
    fn health(&self) -> DaemonHealth {
        let st = lock(&self.st);
        DaemonHealth {
            connections: st.conns.len() as u64,
            machines: st.machines.len() as u64,
            routed: self.routed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            last_activity_us: self.last_activity.load(Ordering::Relaxed),
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
                if st.machines.remove(&id).is_none() {
                    return Err(Error::UnknownTarget(id));
                }
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.notify(&st, &left(&id));
                Ok(ReplyMsg::ok(r))
            }
            "heartbeat" => {
                let id = need_id(req.id)?;
                let rec = st
                    .machines
                    .get_mut(&id)
                    .ok_or_else(|| Error::UnknownTarget(id.clone()))?;
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
                Ok(ReplyMsg::ok(r))
            }
            other => Err(Error::InvalidName {
                name: other.to_string(),
                reason: "unknown op (see docs/PROTOCOL.md for the list)",
            }),
        }
    }

    /// Removes a closed connection with its machines and subscriptions.
    fn drop_conn(&self, conn: u64) {
        let mut st = lock(&self.st);
        st.conns.remove(&conn);
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
            st.machines.remove(id);
        }
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
    let mut rd = FrameReader::new(shared.cfg.max_frame);
    let hello = match handshake(&shared, &stream, &mut rd).await {
        Ok(h) => h,
        Err(e) => {
            shared.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(conn, error = %e, "client rejected during handshake");
            let _ = write_now(&stream, &error_frame(&e)).await;
            return;
        }
    };
    let outbox = Outbox::start(
        stream.clone(),
        shared.cfg.outbox_limit,
        shared.cfg.max_frame,
        format!("client {} (#{conn})", hello.client_id),
    );
    lock(&shared.st).conns.insert(
        conn,
        ConnInfo {
            outbox: outbox.clone(),
            watch: hello.watch,
        },
    );
    tracing::info!(conn, client = %hello.client_id, "client connected");
    let result = read_loop(&shared, &stream, &mut rd, conn, &outbox, stop).await;
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
    handshake_server(
        stream,
        rd,
        shared.cfg.token.as_deref(),
        &shared.server_id,
        shared.cfg.max_frame,
    )
    .await
}

/// Server half of the handshake: reads `HELLO`, checks version and token, answers `WELCOME`.
pub(crate) async fn handshake_server(
    stream: &Stream,
    rd: &mut FrameReader,
    token: Option<&str>,
    server_id: &str,
    max_frame: usize,
) -> Result<Hello, IpcError> {
    let (k, body) = read_one(rd, stream, Duration::from_secs(5)).await?;
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
        && hello.token.as_deref() != Some(t)
    {
        return Err(IpcError::Handshake(
            "missing or wrong auth token: pass the daemon's token in HELLO".into(),
        ));
    }
    let welcome = frame::msg_frame(
        kind::WELCOME,
        &Welcome {
            protocol: PROTOCOL_VERSION,
            server_id: server_id.to_string(),
            max_frame: max_frame as u64,
        },
    )
    .map_err(|e| IpcError::Malformed(e.to_string()))?;
    write_now(stream, &welcome).await?;
    Ok(hello)
}

/// An `ERROR` frame for a typed error.
pub(crate) fn error_frame_for(e: &IpcError) -> Vec<u8> {
    error_frame(e)
}

struct RouteCache {
    generation: u64,
    by_id: FxHashMap<Box<str>, Arc<Outbox>>,
}

impl RouteCache {
    /// The connection of the machine `to`, cached until the registry changes.
    fn outbox(&mut self, shared: &Shared, to: &str) -> Option<Arc<Outbox>> {
        let generation = shared.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.by_id.clear();
            self.generation = generation;
        }
        if let Some(o) = self.by_id.get(to) {
            return Some(o.clone());
        }
        let st = lock(&shared.st);
        let o = st
            .machines
            .get(to)
            .and_then(|m| st.conns.get(&m.conn))
            .map(|c| c.outbox.clone());
        drop(st);
        if let Some(o) = &o {
            if self.by_id.len() > 4096 {
                self.by_id.clear();
            }
            self.by_id.insert(to.into(), o.clone());
        }
        o
    }
}

async fn read_loop(
    shared: &Shared,
    stream: &Stream,
    rd: &mut FrameReader,
    conn: u64,
    me: &Arc<Outbox>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), IpcError> {
    let mut cache = RouteCache {
        generation: u64::MAX,
        by_id: FxHashMap::default(),
    };
    loop {
        loop {
            // A run of sends to one machine is forwarded as one piece: one lookup, one push.
            if let Some((to_at, len, n)) = rd.send_run()
                && let Ok(to) = std::str::from_utf8(&rd.prefix(len)[to_at])
                && let Some(target) = cache.outbox(shared, to)
                && target.push_bytes(rd.prefix(len)).await.is_ok()
            {
                shared.routed.fetch_add(n, Ordering::Relaxed);
                rd.skip(len);
                continue;
            }
            // Anything else, and a run whose target is unknown or gone (each gets its nack).
            let Some(f) = rd.next_frame()? else { break };
            let bytes = rd.bytes(&f);
            handle_frame(shared, conn, me, f.kind, bytes, &mut cache).await?;
            rd.consume(&f);
        }
        shared.last_activity.store(now_micros(), Ordering::Relaxed);
        tokio::select! {
            r = rd.fill(stream) => if !r? { return Ok(()) },
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
    }
}

async fn handle_frame(
    shared: &Shared,
    conn: u64,
    me: &Arc<Outbox>,
    k: u8,
    bytes: &[u8],
    cache: &mut RouteCache,
) -> Result<(), IpcError> {
    let body = &bytes[HEADER_LEN..];
    match k {
        kind::SEND => {
            let mut b = Body::array(body, 2)?;
            let to = b.str()?;
            let target = cache.outbox(shared, to);
            let delivered = match target {
                Some(o) => o.push_bytes(bytes).await.is_ok(),
                None => false,
            };
            if delivered {
                shared.routed.fetch_add(1, Ordering::Relaxed);
            } else {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                let id = peek_envelope_id(b.rest());
                let nack = frame::msg_frame(
                    kind::NACK,
                    &NackMsg {
                        to: to.to_string(),
                        id,
                        code: "unknown_target".into(),
                        message: Error::UnknownTarget(to.into()).to_string(),
                    },
                )
                .map_err(|e| IpcError::Malformed(e.to_string()))?;
                let _ = me.push_bytes(&nack).await;
            }
            Ok(())
        }
        kind::PUBLISH => {
            let mut b = Body::array(body, 3)?;
            let req = b.uint()?;
            let topic = b.str()?;
            let env = b.rest();
            let targets = {
                let st = lock(&shared.st);
                let mut per_conn: HashMap<u64, Arc<Outbox>> = HashMap::new();
                for s in &st.subs {
                    if s.conn == conn || s.group.is_some() || per_conn.contains_key(&s.conn) {
                        continue;
                    }
                    if s.topic.as_ref().is_some_and(|p| p.matches(topic))
                        && let Some(c) = st.conns.get(&s.conn)
                    {
                        per_conn.insert(s.conn, c.outbox.clone());
                    }
                }
                per_conn
            };
            if targets.is_empty() {
                return reply_count(me, req, 0).await;
            }
            // A publisher that wants the count gets what the subscribers' connections say
            // they delivered (each machine once, after its content filters); one that does
            // not (`req` 0, `emit`) gets plain `TOPIC` frames and no answer.
            let counted = (req != NO_REPLY).then(|| {
                let mut st = lock(&shared.st);
                st.next_count += 1;
                let id = st.next_count;
                st.counts.insert(
                    id,
                    PendingCount {
                        publisher: me.clone(),
                        req,
                        waiting: targets.keys().copied().collect(),
                        sum: 0,
                    },
                );
                id
            });
            let mut fr = Vec::with_capacity(bytes.len() + 16);
            match counted {
                Some(id) => frame::write_frame(&mut fr, kind::TOPIC_COUNTED, usize::MAX, |w| {
                    frame::write_array(w, 3)?;
                    frame::write_str(w, topic)?;
                    frame::write_uint(w, id)?;
                    w.extend_from_slice(env);
                    Ok(())
                }),
                None => frame::write_frame(&mut fr, kind::TOPIC, usize::MAX, |w| {
                    frame::write_array(w, 2)?;
                    frame::write_str(w, topic)?;
                    w.extend_from_slice(env);
                    Ok(())
                }),
            }
            .map_err(|e| IpcError::Malformed(e.to_string()))?;
            for (c, o) in targets {
                if o.push_bytes(&fr).await.is_ok() {
                    shared.routed.fetch_add(1, Ordering::Relaxed);
                } else if let Some(id) = counted {
                    shared.counted(id, c, 0);
                }
            }
            if let Some(id) = counted {
                let weak = shared.me.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(COUNT_WAIT).await;
                    if let Some(shared) = weak.upgrade() {
                        shared.count_timed_out(id);
                    }
                });
            }
            Ok(())
        }
        kind::TOPIC_COUNT => {
            let mut b = Body::array(body, 2)?;
            let id = b.uint()?;
            let n = b.uint()?;
            shared.counted(id, conn, n);
            Ok(())
        }
        kind::GROUP => {
            let mut b = Body::array(body, 3)?;
            let req = b.uint()?;
            let group = b.str()?;
            let env = b.rest();
            let chosen = {
                let mut st = lock(&shared.st);
                let members: Vec<(u64, u64)> = st
                    .subs
                    .iter()
                    .filter(|s| s.topic.is_none() && s.group.as_deref() == Some(group))
                    .map(|s| (s.conn, s.sub))
                    .collect();
                if members.is_empty() {
                    None
                } else {
                    let i = st.group_next.entry(group.into()).or_insert(0);
                    let (c, sub) = members[*i % members.len()];
                    *i = i.wrapping_add(1);
                    st.conns.get(&c).map(|ci| (ci.outbox.clone(), sub))
                }
            };
            let mut count = 0;
            if chosen.is_none() {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
            if let Some((o, sub)) = chosen {
                let mut fr = Vec::with_capacity(bytes.len() + 8);
                frame::write_frame(&mut fr, kind::GROUP_DELIVER, usize::MAX, |w| {
                    frame::write_array(w, 2)?;
                    frame::write_uint(w, sub)?;
                    w.extend_from_slice(env);
                    Ok(())
                })
                .map_err(|e| IpcError::Malformed(e.to_string()))?;
                if o.push_bytes(&fr).await.is_ok() {
                    shared.routed.fetch_add(1, Ordering::Relaxed);
                    count = 1;
                }
            }
            reply_count(me, req, count).await
        }
        kind::REQUEST => {
            let req: RequestMsg = frame::decode_msg(body)?;
            let r = shared.request(conn, req);
            reply(me, &r).await
        }
        kind::HELLO => Err(IpcError::Malformed("HELLO after the handshake".into())),
        other => Err(IpcError::UnknownFrame(other)),
    }
}

async fn reply(me: &Outbox, r: &ReplyMsg) -> Result<(), IpcError> {
    let bytes = frame::msg_frame(kind::REPLY, r).map_err(|e| IpcError::Malformed(e.to_string()))?;
    // A client that stopped reading only stalls itself.
    let _ = me.push_bytes(&bytes).await;
    Ok(())
}

/// Answers a `PUBLISH` or `GROUP` with how many got it, unless its request id asks for no reply.
/// Answers a counted publish (a control frame: it never waits for room).
fn answer_count(publisher: &Outbox, req: u64, count: u64) {
    let r = ReplyMsg {
        count: Some(count),
        ..ReplyMsg::ok(req)
    };
    if let Ok(bytes) = frame::msg_frame(kind::REPLY, &r) {
        let _ = publisher.push_force(&bytes);
    }
}

async fn reply_count(me: &Outbox, req: u64, count: u64) -> Result<(), IpcError> {
    if req == NO_REPLY {
        return Ok(());
    }
    reply(
        me,
        &ReplyMsg {
            count: Some(count),
            ..ReplyMsg::ok(req)
        },
    )
    .await
}

/// The `id` field of an envelope map, for NACKs; 0 when it cannot be read.
pub(crate) fn peek_envelope_id(env: &[u8]) -> u64 {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: u64,
    }
    rmp_serde::from_slice::<IdOnly>(env)
        .map(|x| x.id)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::{PIPE_PREFIX, pipe_name};

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
