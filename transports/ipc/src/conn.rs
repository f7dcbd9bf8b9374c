//! One local-socket connection: a coalescing outbox drained by one writer task, and a frame reader.
//!
//! Producers append encoded frames to the outbox buffer under a short lock; the
//! writer task swaps the whole buffer out and writes it with one `write_all`, so
//! a burst of messages costs one syscall. When the connection is quiet (the
//! writer is parked and the last direct write is older than `direct_gap`) the
//! producer writes the frame itself without waking the writer: a lone
//! request/reply then costs no thread hop. So does a producer that queued at
//! least `DIRECT_MIN` bytes while the writer was parked (a big `send_batch`):
//! it writes what the socket takes, like a buffered writer, and only wakes the
//! writer for what is left.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use interprocess::local_socket::tokio::Stream;
use switchyard_core::{Error, Result};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::error::IpcError;
use crate::frame::{self, FrameRef};

/// How long after a direct write the next one is coalesced by the writer instead.
const DIRECT_GAP: Duration = Duration::from_micros(25);
/// Queued bytes a producer writes itself when the writer is parked, instead of waking it.
const DIRECT_MIN: usize = 32 * 1024;
/// How long a send waits for its target's window before going past it.
const WINDOW_PATIENCE: Duration = Duration::from_secs(2);
/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;
/// A new connection's read buffer; it grows to `READ_CHUNK` once reads fill it.
const READ_START: usize = 4 * 1024;
/// Frames up to this size are read without asking the daemon's memory budget.
pub(crate) const SMALL_FRAME: usize = 64 * 1024;
/// Bytes of a refused frame's body kept to name it in the answer (target, request id, envelope id).
const REFUSED_HEAD: usize = 256;

/// The daemon-wide memory budget: bytes queued for clients plus large frames being read.
pub(crate) struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub(crate) fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Takes `n` bytes unless that would pass the limit.
    pub(crate) fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.limit)
            })
            .is_ok()
    }

    /// Takes `n` bytes even past the limit (small control frames must not deadlock).
    pub(crate) fn force(&self, n: usize) {
        self.used.fetch_add(n, Ordering::AcqRel);
    }

    /// Gives `n` bytes back.
    pub(crate) fn give(&self, n: usize) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Bytes in use now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The configured limit.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }
}

/// Where the daemon reports what happened to a sending connection's frames (`ACK` frames):
/// publishes and group messages handled, and bytes of sends per target written or refused
/// (the sender's per-target window).
/// Publishes settled, and send bytes settled per target, not yet written in an `ACK`.
type Pending = (u64, Vec<(Arc<str>, u64)>);

pub(crate) struct AckSink {
    pending: Mutex<Pending>,
    to: Weak<Outbox>,
    /// Send credits are written once this many bytes are due (or the queue closes, or the
    /// sender's own reader has handled a batch): a quarter of a sender's window.
    threshold: u64,
}

/// A send credit owed to a sender: its sink, the target, the bytes.
pub(crate) type Due = (Arc<AckSink>, Arc<str>, u64);

impl AckSink {
    /// A sink that acknowledges on `to`, writing send credits in steps of `threshold` bytes.
    pub(crate) fn new(to: &Arc<Outbox>, threshold: usize) -> Arc<AckSink> {
        Arc::new(AckSink {
            pending: Mutex::new((0, Vec::new())),
            to: Arc::downgrade(to),
            threshold: threshold.max(1) as u64,
        })
    }

    /// Settles `n` publishes or group messages (written with the next `ACK`).
    pub(crate) fn credit(&self, n: u64) {
        lock(&self.pending).0 += n;
    }

    /// Settles `bytes` of sends to `target` (written to it, dropped or refused).
    pub(crate) fn credit_send(&self, target: &Arc<str>, bytes: u64) {
        self.add_send(target, bytes);
    }

    /// Adds a send credit; whether enough is due to write an `ACK` now.
    fn add_send(&self, target: &Arc<str>, bytes: u64) -> bool {
        let mut p = lock(&self.pending);
        let due = match p
            .1
            .iter_mut()
            .find(|(t, _)| Arc::ptr_eq(t, target) || **t == **target)
        {
            Some((_, b)) => {
                *b += bytes;
                *b
            }
            None => {
                p.1.push((target.clone(), bytes));
                bytes
            }
        };
        due >= self.threshold
    }

    /// Writes an `ACK` if publishes or group messages were settled since the last one (the
    /// sender's reader calls this after each batch; send credits wait for their threshold).
    pub(crate) fn flush_publishes(&self) {
        if lock(&self.pending).0 > 0 {
            self.flush();
        }
    }

    /// Writes one `ACK` with everything credited since the last one (nothing when nothing is due).
    pub(crate) fn flush(&self) {
        let (n, sends) = std::mem::take(&mut *lock(&self.pending));
        if (n > 0 || !sends.is_empty())
            && let Some(o) = self.to.upgrade()
        {
            let _ = o.push_force(&frame::ack_frame(n, &sends));
        }
    }
}

/// One data push into a daemon outbox: what to credit once it is written, and whether it may be dropped.
struct Seg {
    /// Absolute stream position just after the push.
    end: u64,
    len: usize,
    frames: u64,
    /// The sender to credit, and the target, for sends from a client that wants `ACK`s.
    sink: Option<(Arc<AckSink>, Arc<str>)>,
}

/// What a daemon outbox keeps beside the bytes: budget, credits, drops, how long it has been full.
struct Ledger {
    budget: Arc<Budget>,
    /// Bytes taken from the budget: queued plus in flight.
    held: usize,
    /// Of those, bytes of data pushes not yet written (what the queue bound applies to;
    /// control frames such as replies and `NACK`s never make the queue full).
    data: usize,
    /// Absolute stream positions: bytes pushed, bytes written.
    pushed: u64,
    written: u64,
    segs: VecDeque<Seg>,
    /// Data frames dropped (oldest first) to make room.
    dropped: u64,
    full_since: Option<Instant>,
    /// The last write that made progress, or when the queue went from empty to not empty.
    last_write: Instant,
}

impl Ledger {
    /// Records `n` bytes written; moves the credits now due to `due`.
    fn wrote(&mut self, n: usize, limit: usize, due: &mut Vec<Due>) {
        if n > 0 {
            self.last_write = Instant::now();
        }
        self.written += n as u64;
        let give = n.min(self.held);
        self.held -= give;
        self.budget.give(give);
        while let Some(s) = self.segs.front() {
            if s.end > self.written {
                break;
            }
            if let Some(s) = self.segs.pop_front() {
                self.data = self.data.saturating_sub(s.len);
                if let Some((k, t)) = s.sink {
                    due.push((k, t, s.len as u64));
                }
            }
        }
        if self.data < limit / 2 && self.held.saturating_sub(self.data) < (2 * limit).max(1 << 20) {
            self.full_since = None;
        }
    }

    /// Everything still queued is settled (the connection is gone); the budget is given back.
    fn settle_all(&mut self, due: &mut Vec<Due>) {
        for s in self.segs.drain(..) {
            if let Some((k, t)) = s.sink {
                due.push((k, t, s.len as u64));
            }
        }
        self.budget.give(std::mem::take(&mut self.held));
        self.data = 0;
    }
}

/// What a push closure did about counting (see [`Outbox::try_push_enc`]).
enum Pushed {
    /// Nothing: count by reading the frames back.
    Untracked,
    /// Counted them itself.
    Tracked,
    /// A window was spent: it took its frames back.
    Refused,
}

/// How [`Outbox::offer`] answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Queued.
    Queued,
    /// The queue (or the daemon's memory budget) is full.
    Full,
    /// The connection is closed.
    Closed,
}

/// `SEND` frames per source machine, then per target machine.
pub(crate) type Pairs = rustc_hash::FxHashMap<Box<str>, rustc_hash::FxHashMap<Box<str>, u64>>;

/// What a client's connection to the daemon counts as frames are pushed: publishes and group
/// messages, sends per (source, target), and sends in flight per target (the window).
///
/// A stream repeats its last pair and target, so lookups start there: a push costs one parse
/// of its frame's head and two short comparisons.
#[derive(Default)]
struct Tracker {
    acked: u64,
    pairs: Vec<(Box<str>, Box<str>, u64)>,
    pair_at: rustc_hash::FxHashMap<Box<str>, rustc_hash::FxHashMap<Box<str>, usize>>,
    last_pair: usize,
    window: Option<usize>,
    inflight: Vec<(Box<str>, usize)>,
    target_at: rustc_hash::FxHashMap<Box<str>, usize>,
    last_target: usize,
    /// Targets with bytes in flight: they share the window (below).
    active: usize,
}

/// Smallest share of the window a target gets, however many share it.
const MIN_WINDOW: usize = 64 * 1024;

impl Tracker {
    fn pair(&mut self, source: &str, to: &str) -> &mut u64 {
        let i = match self.pairs.get(self.last_pair) {
            Some((s, t, _))
                if crate::codec::same(s.as_bytes(), source.as_bytes())
                    && crate::codec::same(t.as_bytes(), to.as_bytes()) =>
            {
                self.last_pair
            }
            _ => match self.pair_at.get(source).and_then(|m| m.get(to)) {
                Some(i) => *i,
                None => {
                    self.pairs.push((source.into(), to.into(), 0));
                    let i = self.pairs.len() - 1;
                    self.pair_at
                        .entry(source.into())
                        .or_default()
                        .insert(to.into(), i);
                    i
                }
            },
        };
        self.last_pair = i;
        &mut self.pairs[i].2
    }

    fn target(&mut self, to: &str) -> &mut usize {
        let i = self.target_index(to);
        &mut self.inflight[i].1
    }

    /// Where `to`'s bytes in flight are counted (the last target is checked first).
    fn target_index(&mut self, to: &str) -> usize {
        let i = match self.inflight.get(self.last_target) {
            Some((t, _)) if crate::codec::same(t.as_bytes(), to.as_bytes()) => self.last_target,
            _ => match self.target_at.get(to) {
                Some(i) => *i,
                None => {
                    self.inflight.push((to.into(), 0));
                    let i = self.inflight.len() - 1;
                    self.target_at.insert(to.into(), i);
                    i
                }
            },
        };
        self.last_target = i;
        i
    }

    /// Counts one `SEND` of `total` bytes from `source` to `to`; with `check`, refuses it
    /// (counting nothing) when the target's window is spent.
    #[inline]
    fn one(&mut self, to: &str, source: &str, total: usize, check: bool) -> bool {
        if let Some(limit) = self.window {
            let limit = self.share(limit);
            let i = self.target_index(to);
            let n = self.inflight[i].1;
            if check && n > limit / 2 && n + total > limit {
                return false;
            }
            self.add_inflight_at(i, total);
        }
        *self.pair(source, to) += 1;
        true
    }

    /// The window of one target: the whole window shared by the targets with bytes in
    /// flight. Several target machines may live in one receiving process, behind one queue
    /// of the daemon; sharing keeps a single sender's total below that queue's bound
    /// instead of one window per machine overfilling it (and getting `NACK full`).
    fn share(&self, limit: usize) -> usize {
        (limit / self.active.max(1)).max(MIN_WINDOW.min(limit))
    }

    fn add_inflight(&mut self, to: &str, bytes: usize) {
        let i = self.target_index(to);
        self.add_inflight_at(i, bytes);
    }

    fn add_inflight_at(&mut self, i: usize, bytes: usize) {
        let n = &mut self.inflight[i].1;
        if *n == 0 && bytes > 0 {
            self.active += 1;
        }
        *n += bytes;
    }

    fn settle(&mut self, to: &str, bytes: usize) {
        let n = self.target(to);
        let was_busy = *n > 0;
        *n = n.saturating_sub(bytes);
        if was_busy && *n == 0 {
            self.active = self.active.saturating_sub(1);
        }
    }

    /// Counts the frames of `new`; with `check`, first refuses (counting nothing) when a
    /// target's window is spent (always letting one push through when nothing is in flight).
    fn push(&mut self, new: &[u8], check: bool) -> bool {
        // One frame (nearly every push): one parse, no allocation.
        if new.len() >= frame::HEADER_LEN
            && 4 + u32::from_be_bytes([new[0], new[1], new[2], new[3]]) as usize == new.len()
        {
            let k = new[4];
            self.acked += u64::from(is_acked(k));
            if k != frame::kind::SEND {
                return true;
            }
            let Some((to, source)) = crate::codec::send_pair(&new[frame::HEADER_LEN..]) else {
                return true;
            };
            return self.one(to, source, new.len(), check);
        }
        let window = self.window.filter(|_| check);
        let mut ok = true;
        if let Some(limit) = window {
            // Bytes per target in this push (one target, almost always).
            let mut per: Vec<(&str, usize)> = Vec::new();
            walk(new, 0, |at, k, total| {
                if k == frame::kind::SEND
                    && let Some((to, _)) = new
                        .get(at + frame::HEADER_LEN..at + total)
                        .and_then(crate::codec::send_pair)
                {
                    match per.iter_mut().find(|(t, _)| *t == to) {
                        Some((_, b)) => *b += total,
                        None => per.push((to, total)),
                    }
                }
                true
            });
            // Only past half the window: the daemon acknowledges in steps of a quarter, so a
            // sender that waits always gets the credits that free it.
            let limit = self.share(limit);
            for (to, b) in per {
                let n = *self.target(to);
                if n > limit / 2 && n + b > limit {
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            return false;
        }
        let windowed = self.window.is_some();
        walk(new, 0, |at, k, total| {
            self.acked += u64::from(is_acked(k));
            if k == frame::kind::SEND
                && let Some((to, source)) = new
                    .get(at + frame::HEADER_LEN..at + total)
                    .and_then(crate::codec::send_pair)
            {
                *self.pair(source, to) += 1;
                if windowed {
                    self.add_inflight(to, total);
                }
            }
            true
        });
        true
    }

    /// Takes back the sends among whole frames of `buf` that were never written.
    fn unsend(&mut self, buf: &[u8]) {
        walk(buf, 0, |at, k, total| {
            if k == frame::kind::SEND
                && let Some((to, source)) = buf
                    .get(at + frame::HEADER_LEN..at + total)
                    .and_then(crate::codec::send_pair)
                && let Some(i) = self.pair_at.get(source).and_then(|m| m.get(to))
            {
                let n = &mut self.pairs[*i].2;
                *n = n.saturating_sub(1);
            }
            true
        });
    }

    /// Sends counted, per source then target.
    fn sent(&self) -> Pairs {
        let mut out = Pairs::default();
        for (s, t, n) in &self.pairs {
            if *n > 0 {
                out.entry(s.clone()).or_default().insert(t.clone(), *n);
            }
        }
        out
    }
}

/// Data frames kept when a connection was lost before they were written: sent again after a reconnect.
#[derive(Default)]
pub(crate) struct Unsent {
    /// Whole `SEND` frames (and `PUBLISH`/`GROUP` frames that wait for no reply), in order.
    pub(crate) replay: Vec<u8>,
    /// How many frames `replay` holds.
    pub(crate) replay_frames: u64,
    /// `PUBLISH` and `GROUP` frames pushed on this connection in all.
    pub(crate) data_pushed: u64,
    /// Of those, how many were never written (replayed or dropped).
    pub(crate) data_unsent: u64,
    /// Data frames never written that are not replayed (their callers got an error).
    pub(crate) dropped: u64,
    /// `SEND` frames written to the socket, per (source, target).
    pub(crate) sent: Pairs,
}

/// Credits what is due; writes an `ACK` to each sender with enough due (all of them with `force`).
fn credit_all(due: &mut Vec<Due>, force: bool) {
    if due.is_empty() {
        return;
    }
    let mut sinks: Vec<Arc<AckSink>> = Vec::new();
    for (k, t, b) in due.drain(..) {
        if (k.add_send(&t, b) || force) && !sinks.iter().any(|x| Arc::ptr_eq(x, &k)) {
            sinks.push(k);
        }
    }
    for k in sinks {
        k.flush();
    }
}

/// Whether a client → server frame kind carries an event (replayed after a reconnect).
fn is_data(k: u8) -> bool {
    matches!(
        k,
        frame::kind::SEND | frame::kind::PUBLISH | frame::kind::GROUP
    )
}

/// Whether a frame is settled by the daemon's `ACK`s (publishes and group messages).
fn is_acked(k: u8) -> bool {
    matches!(k, frame::kind::PUBLISH | frame::kind::GROUP)
}

/// Walks whole frames in `buf` from `at`: calls `f(start, kind, total)` for each; returns where it stopped.
fn walk(buf: &[u8], mut at: usize, mut f: impl FnMut(usize, u8, usize) -> bool) -> usize {
    while buf.len() >= at + frame::HEADER_LEN {
        let len = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        let total = 4 + len;
        if !f(at, buf[at + 4], total) {
            break;
        }
        at += total;
    }
    at
}

/// Publish and group frames among the whole frames of `buf`.
fn count_acked(buf: &[u8]) -> u64 {
    let mut n = 0;
    walk(buf, 0, |_, k, _| {
        n += u64::from(is_acked(k));
        true
    });
    n
}

enum Step {
    Stop,
    Park,
    /// Write the buffer taken; the number is its skew (bytes that end a frame begun earlier).
    Write(usize),
}

struct OutState {
    buf: Vec<u8>,
    /// Bytes at the start of `buf` that finish a frame a direct write began.
    skew: usize,
    /// Segments of the last `SEND` frames, reused while the next event repeats them.
    enc: crate::codec::SendEncoder,
    idle: bool,
    closed: Option<String>,
    draining: bool,
    /// Last write by a producer or the writer's last park: how quiet the connection is.
    last_direct: Option<Instant>,
    /// Daemon outboxes only.
    ledger: Option<Ledger>,
    /// Client connections to the daemon count what they push, to know what a lost daemon took,
    /// and keep their per-target windows.
    track: Option<Tracker>,
    /// What the writer had not written when its write failed, and where its first whole frame starts.
    failed: Option<(Vec<u8>, usize)>,
}

/// The sending side of a connection: a bounded byte buffer and its writer task.
pub(crate) struct Outbox {
    st: Mutex<OutState>,
    wake: Notify,
    space: Notify,
    finished: Notify,
    done: AtomicBool,
    /// Mirrors `closed || draining` so the send path can check it without the lock.
    shut: AtomicBool,
    limit: usize,
    max_frame: usize,
    stream: Arc<Stream>,
    label: Arc<str>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The buffer stays consistent even if a producer's encoder panicked; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Outbox {
    /// An outbox over `stream` holding at most `limit` queued bytes (plus one frame); spawns its writer.
    pub(crate) fn start(
        stream: Arc<Stream>,
        limit: usize,
        max_frame: usize,
        label: impl Into<Arc<str>>,
    ) -> Arc<Outbox> {
        Self::start_with(stream, limit, max_frame, label, None)
    }

    /// A daemon outbox: its bytes count against `budget`, and frames are queued with [`Outbox::offer`].
    pub(crate) fn start_routed(
        stream: Arc<Stream>,
        limit: usize,
        max_frame: usize,
        label: impl Into<Arc<str>>,
        budget: Arc<Budget>,
    ) -> Arc<Outbox> {
        let ledger = Ledger {
            budget,
            held: 0,
            data: 0,
            pushed: 0,
            written: 0,
            segs: VecDeque::new(),
            dropped: 0,
            full_since: None,
            last_write: Instant::now(),
        };
        Self::start_with(stream, limit, max_frame, label, Some(ledger))
    }

    fn start_with(
        stream: Arc<Stream>,
        limit: usize,
        max_frame: usize,
        label: impl Into<Arc<str>>,
        ledger: Option<Ledger>,
    ) -> Arc<Outbox> {
        let ob = Arc::new(Outbox {
            st: Mutex::new(OutState {
                buf: Vec::new(),
                skew: 0,
                enc: crate::codec::SendEncoder::default(),
                idle: true,
                closed: None,
                draining: false,
                last_direct: None,
                ledger,
                track: None,
                failed: None,
            }),
            wake: Notify::new(),
            space: Notify::new(),
            finished: Notify::new(),
            done: AtomicBool::new(false),
            shut: AtomicBool::new(false),
            limit,
            max_frame,
            stream,
            label: label.into(),
        });
        tokio::spawn(ob.clone().run_writer());
        ob
    }

    /// The largest frame this connection may carry.
    pub(crate) fn max_frame(&self) -> usize {
        self.max_frame
    }

    fn closed_err(&self, why: &str) -> Error {
        crate::error::transport_err(format!("connection to {} is closed: {why}", self.label))
    }

    /// Appends a frame written by `f` unless the buffer is over its bound; `Ok(false)` means full.
    pub(crate) fn try_push(
        &self,
        f: impl FnOnce(&mut Vec<u8>, usize) -> Result<()>,
    ) -> Result<bool> {
        self.try_push_enc(true, |b, _, max, _| f(b, max).map(|()| Pushed::Untracked))
    }

    /// [`Outbox::try_push`] with the connection's `SEND` encoder at hand; `Ok(false)` also when
    /// a target's window is spent (`window`: check it; the frames are taken back then).
    fn try_push_enc(
        &self,
        window: bool,
        f: impl FnOnce(
            &mut Vec<u8>,
            &mut crate::codec::SendEncoder,
            usize,
            Option<&mut Tracker>,
        ) -> Result<Pushed>,
    ) -> Result<bool> {
        let mut st = lock(&self.st);
        if let Some(why) = &st.closed {
            return Err(self.closed_err(why));
        }
        if st.draining {
            return Err(self.closed_err("shutting down"));
        }
        if st.buf.len() >= self.limit {
            return Ok(false);
        }
        let start = st.buf.len();
        let pushed = {
            let OutState {
                buf, enc, track, ..
            } = &mut *st;
            f(buf, enc, self.max_frame, track.as_mut())?
        };
        match pushed {
            Pushed::Refused => return Ok(false),
            Pushed::Tracked => {}
            Pushed::Untracked => {
                if !Self::track(&mut st, start, window) {
                    st.buf.truncate(start);
                    return Ok(false);
                }
            }
        }
        self.after_push(st, start == 0)?;
        Ok(true)
    }

    /// Room left in the window of target `to`: `None` without windows, unbounded when nothing is in flight.
    fn window_room(&self, to: &str) -> Option<usize> {
        let mut st = lock(&self.st);
        let t = st.track.as_mut()?;
        let limit = t.share(t.window?);
        Some(match *t.target(to) {
            n if n <= limit / 2 => (limit - n).max(1),
            n => limit.saturating_sub(n),
        })
    }

    /// The daemon settled `bytes` of sends to each target: room in their windows again.
    pub(crate) fn settle_window(&self, sends: &[(String, u64)]) {
        {
            let mut st = lock(&self.st);
            let Some(tr) = st.track.as_mut().filter(|t| t.window.is_some()) else {
                return;
            };
            for (t, b) in sends {
                tr.settle(t, usize::try_from(*b).unwrap_or(usize::MAX));
            }
        }
        self.space.notify_waiters();
    }

    /// Counts the frames appended from `start`, on a tracked connection; `false` (nothing
    /// counted) when `window` is asked for and a target's window is spent.
    fn track(st: &mut OutState, start: usize, window: bool) -> bool {
        let OutState { buf, track, .. } = st;
        match track {
            Some(t) => t.push(&buf[start..], window),
            None => true,
        }
    }

    /// Starts counting what is pushed (a client's connection to the daemon), and keeps at
    /// most `window` bytes of sends in flight per target when the daemon acknowledges them.
    pub(crate) fn start_tracking(&self, window: Option<usize>) {
        lock(&self.st).track = Some(Tracker {
            window,
            ..Tracker::default()
        });
    }

    /// After bytes were appended: writes them now if the connection is quiet, else wakes the writer.
    fn after_push(
        &self,
        mut st: std::sync::MutexGuard<'_, OutState>,
        was_empty: bool,
    ) -> Result<()> {
        if !st.idle {
            return Ok(());
        }
        let now = Instant::now();
        // Quiet: nothing written for a while, neither by us nor by the writer (which stamps
        // the time when it parks). A stream of sends is never quiet, so it is batched.
        let quiet = st
            .last_direct
            .is_none_or(|t| now.duration_since(t) >= DIRECT_GAP);
        // A producer that queued a big batch while the writer sleeps writes it itself, like
        // a buffered writer: the bytes are still in its cache and no thread is woken.
        if (was_empty && quiet) || st.buf.len() >= DIRECT_MIN {
            st.last_direct = Some(now);
            let mut due = Vec::new();
            match self.write_direct(&mut st, &mut due) {
                Err(e) => {
                    let why = e.to_string();
                    st.closed = Some(why.clone());
                    self.shut.store(true, Ordering::Release);
                    drop(st);
                    credit_all(&mut due, false);
                    self.wake.notify_one();
                    self.space.notify_waiters();
                    return Err(self.closed_err(&why));
                }
                Ok(()) if st.buf.is_empty() => {
                    drop(st);
                    credit_all(&mut due, false);
                    return Ok(());
                }
                Ok(()) => {}
            }
            st.idle = false;
            drop(st);
            credit_all(&mut due, false);
            self.wake.notify_one();
            return Ok(());
        }
        st.idle = false;
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// Writes what the socket takes now without blocking; leaves the rest in the buffer.
    fn write_direct(&self, st: &mut OutState, due: &mut Vec<Due>) -> std::io::Result<()> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut w: &Stream = &self.stream;
        let mut off = 0;
        let buf = &st.buf;
        let mut failed = None;
        while off < buf.len() {
            match Pin::new(&mut w).poll_write(&mut cx, &buf[off..]) {
                Poll::Ready(Ok(0)) => {
                    failed = Some(std::io::ErrorKind::WriteZero.into());
                    break;
                }
                Poll::Ready(Ok(n)) => off += n,
                Poll::Ready(Err(e)) => {
                    failed = Some(e);
                    break;
                }
                Poll::Pending => break,
            }
        }
        if off == buf.len() {
            st.buf.clear();
            st.skew = 0;
        } else if off > 0 {
            // Keep track of where the next whole frame starts (a lost connection replays from there).
            let next = walk(buf, st.skew, |at, _, _| at < off);
            st.skew = next.saturating_sub(off);
            st.buf.drain(..off);
        }
        if off > 0
            && let Some(l) = &mut st.ledger
        {
            l.wrote(off, self.limit, due);
        }
        // What was written is gone from the buffer even when the write then failed: a replay
        // must not send it twice.
        failed.map_or(Ok(()), Err)
    }

    /// Queues frames for a client of the daemon without waiting (daemon outboxes only).
    ///
    /// `frames` data frames in `bytes` are credited to `sink` once written. When the
    /// queue is full and `drop_oldest` is set, the oldest queued data frames make room.
    pub(crate) fn offer(
        &self,
        bytes: &[u8],
        frames: u64,
        sink: Option<(&Arc<AckSink>, &Arc<str>)>,
        drop_oldest: bool,
    ) -> Offer {
        let mut st = lock(&self.st);
        if st.closed.is_some() || st.draining {
            return Offer::Closed;
        }
        let mut due = Vec::new();
        let n = bytes.len();
        let Some(l) = &st.ledger else {
            return Offer::Closed;
        };
        if l.data > 0 && l.data + n > self.limit {
            if !drop_oldest {
                return Offer::Full;
            }
            let need = l.data + n - self.limit;
            self.drop_oldest(&mut st, need, &mut due);
        }
        let Some(l) = &mut st.ledger else {
            return Offer::Closed;
        };
        if (l.data > 0 && l.data + n > self.limit) || !l.budget.try_take(n) {
            drop(st);
            credit_all(&mut due, false);
            return Offer::Full;
        }
        if l.held == 0 {
            l.last_write = Instant::now();
        }
        l.held += n;
        l.data += n;
        l.pushed += n as u64;
        l.segs.push_back(Seg {
            end: l.pushed,
            len: n,
            frames,
            sink: sink.map(|(k, t)| (k.clone(), t.clone())),
        });
        let was_empty = st.buf.is_empty();
        st.buf.extend_from_slice(bytes);
        let r = self.after_push(st, was_empty);
        credit_all(&mut due, false);
        match r {
            Ok(()) => Offer::Queued,
            // The bytes were queued; the writer reports the failure by closing.
            Err(_) => Offer::Queued,
        }
    }

    /// Drops the oldest data frames not yet handed to the socket until `need` bytes are free.
    fn drop_oldest(&self, st: &mut OutState, need: usize, due: &mut Vec<Due>) {
        let OutState {
            buf, skew, ledger, ..
        } = st;
        let Some(l) = ledger else { return };
        // Pushes that lie wholly in `buf` (not in flight, not begun by a direct write).
        let buf_start = l.pushed - buf.len() as u64 + *skew as u64;
        let mut cut: Vec<(usize, usize)> = Vec::new();
        let mut freed = 0;
        let mut frames = 0;
        l.segs.retain(|s| {
            let start = s.end - s.len as u64;
            if freed >= need || start < buf_start {
                return true;
            }
            let at = (start - (l.pushed - buf.len() as u64)) as usize;
            cut.push((at, s.len));
            freed += s.len;
            frames += s.frames;
            if let Some((k, t)) = &s.sink {
                due.push((k.clone(), t.clone(), s.len as u64));
            }
            false
        });
        if cut.is_empty() {
            return;
        }
        let mut kept = Vec::with_capacity(buf.len() - freed);
        let mut from = 0;
        for (at, len) in &cut {
            kept.extend_from_slice(&buf[from..*at]);
            from = at + len;
        }
        kept.extend_from_slice(&buf[from..]);
        *buf = kept;
        // Later pushes moved up by the bytes cut before them.
        let base = l.pushed - (buf.len() + freed) as u64;
        for s in l.segs.iter_mut() {
            let start = s.end - s.len as u64;
            if start >= base {
                let before: usize = cut
                    .iter()
                    .filter(|(at, _)| (base + *at as u64) < start)
                    .map(|c| c.1)
                    .sum();
                s.end -= before as u64;
            }
        }
        l.pushed -= freed as u64;
        l.held -= freed;
        l.data = l.data.saturating_sub(freed);
        l.budget.give(freed);
        l.dropped += frames;
    }

    /// Marks that a delivery was refused because the queue is full (the slow-consumer clock starts).
    pub(crate) fn mark_full(&self) {
        if let Some(l) = &mut lock(&self.st).ledger {
            l.full_since.get_or_insert_with(Instant::now);
        }
    }

    /// How long the client has been too slow, if it is: deliveries refused without the queue
    /// draining below half, or events queued and not one byte written.
    pub(crate) fn full_for(&self) -> Option<Duration> {
        let st = lock(&self.st);
        let l = st.ledger.as_ref()?;
        let full = l.full_since.map(|t| t.elapsed());
        let stalled = (l.data > 0).then(|| l.last_write.elapsed());
        full.max(stalled)
    }

    /// Data frames dropped oldest-first to make room (daemon outboxes).
    pub(crate) fn dropped_oldest(&self) -> u64 {
        lock(&self.st).ledger.as_ref().map_or(0, |l| l.dropped)
    }

    /// Bytes queued or in flight (daemon outboxes).
    pub(crate) fn queued(&self) -> usize {
        lock(&self.st).ledger.as_ref().map_or(0, |l| l.held)
    }

    /// Appends an already-encoded frame, waiting while the buffer is full (policy `Wait`).
    pub(crate) async fn push_bytes(&self, frame: &[u8]) -> Result<()> {
        let push = |b: &mut Vec<u8>, _: usize| {
            b.extend_from_slice(frame);
            Ok(())
        };
        // Fast path without registering as a waiter.
        if self.try_push(push)? {
            return Ok(());
        }
        let mut window = true;
        let since = Instant::now();
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.try_push_enc(window, |b, _, _, _| {
                b.extend_from_slice(frame);
                Ok(Pushed::Untracked)
            })? {
                return Ok(());
            }
            // A window waits for credits that this process's reader must read; should the
            // reader itself be stuck (an async handler's full queue), go past the window
            // rather than wait for ever: the daemon's queue bound still applies.
            let left = WINDOW_PATIENCE.saturating_sub(since.elapsed());
            if tokio::time::timeout(left, notified).await.is_err() {
                window = false;
            }
        }
    }

    /// Appends a frame written by `f`, waiting while the buffer is full.
    pub(crate) async fn push_with(
        &self,
        f: impl Fn(&mut Vec<u8>, usize) -> Result<()>,
    ) -> Result<()> {
        if self.try_push(&f)? {
            return Ok(());
        }
        let mut tmp = Vec::new();
        f(&mut tmp, self.max_frame)?;
        self.push_bytes(&tmp).await
    }

    /// Appends events from the front of `envs` as SEND frames to `to`, encoded straight from
    /// the caller's values, waiting for room whenever the buffer reaches its bound; one lock
    /// and at most one writer wake-up per fill.
    ///
    /// On error (a frame over the size limit, a closed connection) the failing
    /// event and those after it stay in `envs`.
    pub(crate) async fn push_batch(
        &self,
        to: &str,
        envs: &mut dyn switchyard_core::Outgoing,
    ) -> Result<()> {
        while !envs.is_empty() {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut failed = None;
            let limit = self.limit;
            let mut room = self.window_room(to).unwrap_or(usize::MAX);
            if room == 0 {
                // As in `push_bytes`: past the window rather than wait for ever.
                if tokio::time::timeout(WINDOW_PATIENCE, notified.as_mut())
                    .await
                    .is_ok()
                {
                    continue;
                }
                room = usize::MAX;
            }
            let took = self.try_push_enc(false, |b, enc, max, mut tr| {
                let start = b.len();
                while b.len() < limit && b.len() - start < room {
                    let Some(ev) = envs.front() else { break };
                    let at = b.len();
                    if let Err(e) = enc.write(b, max, to, &ev) {
                        failed = Some(e);
                        break;
                    }
                    if let Some(t) = tr.as_deref_mut() {
                        t.one(to, ev.source.as_str(), b.len() - at, false);
                    }
                    envs.advance();
                }
                Ok(Pushed::Tracked)
            })?;
            if let Some(e) = failed {
                return Err(e);
            }
            if !took && !envs.is_empty() {
                notified.await;
            }
        }
        Ok(())
    }

    /// Appends events from the front of `envs` as SEND frames to `to` without waiting:
    /// stops when the buffer reaches its bound, leaving the rest in `envs`. On error (a
    /// frame over the size limit, a closed connection) the failing event and those after
    /// it stay in `envs`.
    pub(crate) fn try_push_out(
        &self,
        to: &str,
        envs: &mut dyn switchyard_core::Outgoing,
    ) -> Result<()> {
        let mut failed = None;
        let limit = self.limit;
        self.try_push_enc(true, |b, enc, max, mut tr| {
            let start = b.len();
            while b.len() < limit {
                let Some(ev) = envs.front() else { break };
                let at = b.len();
                if let Err(e) = enc.write(b, max, to, &ev) {
                    failed = Some(e);
                    break;
                }
                // A spent window takes this frame back; the event stays for the async path.
                if let Some(t) = tr.as_deref_mut()
                    && !t.one(to, ev.source.as_str(), b.len() - at, true)
                {
                    b.truncate(at);
                    break;
                }
                envs.advance();
            }
            Ok(if b.len() == start {
                Pushed::Refused
            } else {
                Pushed::Tracked
            })
        })?;
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Appends a small control frame even past the bound (control traffic must not deadlock on data).
    pub(crate) fn push_force(&self, frame: &[u8]) -> Result<()> {
        let mut st = lock(&self.st);
        if let Some(why) = &st.closed {
            return Err(self.closed_err(why));
        }
        if let Some(l) = &mut st.ledger {
            if l.held == 0 {
                l.last_write = Instant::now();
            }
            l.budget.force(frame.len());
            l.held += frame.len();
            l.pushed += frame.len() as u64;
            // A client that sends requests and never reads the replies is a slow consumer too.
            if l.held.saturating_sub(l.data) > (2 * self.limit).max(1 << 20) {
                l.full_since.get_or_insert_with(Instant::now);
            }
        }
        let was_empty = st.buf.is_empty();
        let start = st.buf.len();
        st.buf.extend_from_slice(frame);
        Self::track(&mut st, start, false);
        self.after_push(st, was_empty)
    }

    /// [`Outbox::push_force`] without counting the frame (the client's own loss reports).
    pub(crate) fn push_untracked(&self, frame: &[u8]) -> Result<()> {
        let mut st = lock(&self.st);
        if let Some(why) = &st.closed {
            return Err(self.closed_err(why));
        }
        let was_empty = st.buf.is_empty();
        st.buf.extend_from_slice(frame);
        self.after_push(st, was_empty)
    }

    /// Closes now; whatever is queued is discarded (and settled, on a daemon outbox).
    pub(crate) fn close(&self, why: &str) {
        let mut due = Vec::new();
        {
            let mut st = lock(&self.st);
            if st.closed.is_none() {
                st.closed = Some(why.to_string());
            }
            if let Some(l) = &mut st.ledger {
                l.settle_all(&mut due);
            }
            self.shut.store(true, Ordering::Release);
        }
        credit_all(&mut due, true);
        self.wake.notify_one();
        self.space.notify_waiters();
    }

    /// Refuses new frames, writes what is queued, then stops; returns once written (or `wait` elapsed).
    pub(crate) async fn drain(&self, wait: Duration) {
        let finished = self.finished.notified();
        tokio::pin!(finished);
        finished.as_mut().enable();
        {
            let mut st = lock(&self.st);
            st.draining = true;
            self.shut.store(true, Ordering::Release);
        }
        self.wake.notify_one();
        if !self.done.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(wait, finished).await;
        }
    }

    /// Whether the connection is closed (write error, close or drain).
    pub(crate) fn is_closed(&self) -> bool {
        self.shut.load(Ordering::Acquire)
    }

    /// Waits until the writer task has stopped (after [`Outbox::close`]), at most `wait`.
    pub(crate) async fn stopped(&self, wait: Duration) {
        let finished = self.finished.notified();
        tokio::pin!(finished);
        finished.as_mut().enable();
        if !self.done.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(wait, finished).await;
        }
    }

    /// After the connection was lost: the data frames it never wrote, to send again on the next one.
    ///
    /// A frame the socket took part of is not among them: it may have reached the peer.
    pub(crate) fn take_unsent(&self) -> Unsent {
        let mut st = lock(&self.st);
        let mut bytes = Vec::new();
        if let Some((rest, first)) = st.failed.take() {
            bytes.extend_from_slice(&rest[first..]);
        }
        let skew = std::mem::take(&mut st.skew);
        let buf = std::mem::take(&mut st.buf);
        bytes.extend_from_slice(buf.get(skew..).unwrap_or_default());
        let mut tracker = st.track.take().unwrap_or_default();
        drop(st);
        tracker.unsend(&bytes);
        let mut out = Unsent {
            data_pushed: tracker.acked,
            data_unsent: count_acked(&bytes),
            sent: tracker.sent(),
            ..Unsent::default()
        };
        walk(&bytes, 0, |at, k, total| {
            let Some(f) = bytes.get(at..at + total) else {
                return false;
            };
            if !is_data(k) {
                return true;
            }
            // A publish or group message whose caller waits for the count got an error instead.
            let waits = k != frame::kind::SEND
                && !frame::Body::array(&f[frame::HEADER_LEN..], 3)
                    .and_then(|mut b| b.uint())
                    .is_ok_and(|req| req == frame::NO_REPLY);
            if waits {
                out.dropped += 1;
            } else {
                out.replay.extend_from_slice(f);
                out.replay_frames += 1;
            }
            true
        });
        out
    }

    async fn run_writer(self: Arc<Self>) {
        let mut spare: Vec<u8> = Vec::new();
        let mut due = Vec::new();
        loop {
            let step = {
                let mut st = lock(&self.st);
                if st.closed.is_some() {
                    Step::Stop
                } else if st.buf.is_empty() {
                    if st.draining {
                        Step::Stop
                    } else {
                        st.idle = true;
                        st.last_direct = Some(Instant::now());
                        Step::Park
                    }
                } else {
                    std::mem::swap(&mut st.buf, &mut spare);
                    Step::Write(std::mem::take(&mut st.skew))
                }
            };
            let skew = match step {
                Step::Stop => break,
                Step::Park => {
                    self.wake.notified().await;
                    // Let a producer that just woke us add more before we take the batch.
                    tokio::task::yield_now().await;
                    continue;
                }
                Step::Write(skew) => skew,
            };
            self.space.notify_waiters();
            let mut w: &Stream = &self.stream;
            let mut off = 0;
            let mut failed = None;
            while off < spare.len() {
                match w.write(&spare[off..]).await {
                    Ok(0) => {
                        failed = Some(std::io::Error::from(std::io::ErrorKind::WriteZero));
                        break;
                    }
                    Ok(n) => off += n,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            {
                let mut st = lock(&self.st);
                if let Some(l) = &mut st.ledger {
                    l.wrote(off, self.limit, &mut due);
                }
                if failed.is_some() {
                    // Keep what was not written, from its first whole frame, for a replay.
                    let first = walk(&spare, skew, |at, _, _| at < off);
                    st.failed = Some((std::mem::take(&mut spare), first.max(off)));
                }
            }
            credit_all(&mut due, false);
            if let Some(e) = failed {
                tracing::debug!(peer = %self.label, error = %e, "write failed; closing the connection");
                self.close(&e.to_string());
                break;
            }
            spare.clear();
            // Keep the buffer for the next batch (regrowing it costs page faults and copies),
            // unless one huge frame inflated it well past the queue bound. A full queue ends
            // a little over the bound, and doubling puts its capacity just under twice it.
            if spare.capacity() > 2 * self.limit.max(4 * READ_CHUNK) {
                spare = Vec::new();
            }
        }
        self.done.store(true, Ordering::Release);
        self.finished.notify_waiters();
        self.space.notify_waiters();
    }
}

/// Reads frames from a stream: many per read, with the size limit checked on each header.
///
/// The buffer grows as bytes arrive, never to an announced length up front. With a
/// [`Budget`] (the daemon), a frame over [`SMALL_FRAME`] must first get its announced
/// size from the budget; when it cannot, the frame is read and thrown away, and
/// [`FrameReader::next_frame`] returns it as refused, with its first bytes, so the
/// daemon can name it in its answer.
pub(crate) struct FrameReader {
    buf: BytesMut,
    max: usize,
    budget: Option<Arc<Budget>>,
    /// Bytes of the budget held for the large frame at the front.
    reserved: usize,
    /// A refused frame being skipped: its kind, its first bytes, and how many bytes remain.
    discard: Option<(Vec<u8>, usize)>,
    /// A refused frame read to its end, waiting to be returned (its first bytes).
    refused: Option<Vec<u8>>,
    /// Since when the frame at the front has been incomplete (set by the read loop).
    partial_since: Option<Instant>,
    /// The last read filled the buffer: grow the next one.
    grow: bool,
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.give(self.reserved);
        }
    }
}

impl FrameReader {
    /// A reader accepting frames up to `max` bytes.
    pub(crate) fn new(max: usize) -> FrameReader {
        FrameReader {
            buf: BytesMut::new(),
            max,
            budget: None,
            reserved: 0,
            discard: None,
            refused: None,
            partial_since: None,
            grow: false,
        }
    }

    /// A reader whose large frames need room in `budget`.
    pub(crate) fn with_budget(max: usize, budget: Arc<Budget>) -> FrameReader {
        let mut r = FrameReader::new(max);
        r.budget = Some(budget);
        r
    }

    /// The next complete frame already buffered, if any.
    ///
    /// A frame refused for lack of budget comes back with `refused` set; its bytes
    /// ([`FrameReader::bytes`]) are then only the header and the first body bytes.
    pub(crate) fn next_frame(&mut self) -> std::result::Result<Option<FrameRef>, IpcError> {
        if let Some(head) = &self.refused {
            return Ok(Some(FrameRef {
                kind: head[4],
                total: head.len(),
                refused: true,
            }));
        }
        if self.discard.is_some() {
            return Ok(None);
        }
        match frame::peek_frame(&self.buf, self.max)? {
            Some(f) => Ok(Some(f)),
            None => {
                if self.buf.len() >= frame::HEADER_LEN {
                    let len =
                        u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                            as usize;
                    if len > SMALL_FRAME
                        && self.reserved == 0
                        && let Some(b) = &self.budget
                        && !b.try_take(len)
                    {
                        // Over the daemon's budget: skip the frame, keep its head to answer it.
                        let keep = self.buf.len().min(frame::HEADER_LEN + REFUSED_HEAD);
                        let head = self.buf[..keep].to_vec();
                        let remaining = 4 + len - self.buf.len();
                        self.buf.clear();
                        self.discard = Some((head, remaining));
                        self.shrink();
                        return Ok(None);
                    } else if len > SMALL_FRAME && self.reserved == 0 && self.budget.is_some() {
                        self.reserved = len;
                    }
                }
                Ok(None)
            }
        }
    }

    /// Whether a frame has begun and not yet arrived whole.
    pub(crate) fn has_partial(&self) -> bool {
        self.discard.is_some() || (!self.buf.is_empty() && self.refused.is_none())
    }

    /// When the incomplete frame at the front started (the read loop's deadline), stamped now if new.
    pub(crate) fn partial_since(&mut self) -> Option<Instant> {
        if self.has_partial() {
            Some(*self.partial_since.get_or_insert_with(Instant::now))
        } else {
            self.partial_since = None;
            None
        }
    }

    /// A frame was taken whole: its budget is given back and the next frame's clock restarts.
    fn taken(&mut self) {
        self.partial_since = None;
        if self.reserved > 0 {
            if let Some(b) = &self.budget {
                b.give(self.reserved);
            }
            self.reserved = 0;
        }
        if self.buf.is_empty() {
            self.shrink();
        }
    }

    /// Lets a big buffer go once it is empty, so an idle connection holds little memory.
    fn shrink(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 2 * READ_CHUNK {
            self.buf = BytesMut::new();
            self.grow = false;
        }
    }

    /// Hands each complete `SEND` body already buffered to `take` while it returns `true`,
    /// then drops those frames in one step; stops at the first frame of another kind or
    /// one `take` declines, which [`FrameReader::next_frame`] then returns. Errors in a
    /// frame header are left for `next_frame` to report.
    pub(crate) fn take_sends(&mut self, mut take: impl FnMut(&[u8]) -> bool) {
        if self.refused.is_some() || self.discard.is_some() {
            return;
        }
        let mut off = 0;
        while let Ok(Some(f)) = frame::peek_frame(&self.buf[off..], self.max) {
            if f.kind != frame::kind::SEND
                || !take(&self.buf[off + frame::HEADER_LEN..off + f.total])
            {
                break;
            }
            off += f.total;
        }
        if off > 0 {
            self.buf.advance(off);
            self.taken();
        }
    }

    /// The complete `SEND` frames at the front of the buffer that name the same target as the
    /// first, in this crate's layout: where the target lies in the buffer, how many bytes the
    /// run covers and how many frames it holds. `None` when the buffer does not start with one.
    pub(crate) fn send_run(&self) -> Option<(std::ops::Range<usize>, usize, u64)> {
        // A SEND frame at `at` whose target is a fixstr: where the target lies, and the frame's size.
        let to_of = |at: usize| -> Option<(std::ops::Range<usize>, usize)> {
            let f = frame::peek_frame(&self.buf[at..], self.max).ok()??;
            let body = &self.buf[at + frame::HEADER_LEN..at + f.total];
            let [0x92, m, rest @ ..] = body else {
                return None;
            };
            let n = usize::from(m & 0x1f);
            let to = at + frame::HEADER_LEN + 2;
            (f.kind == frame::kind::SEND && m & 0xe0 == 0xa0 && rest.len() >= n)
                .then_some((to..to + n, f.total))
        };
        if self.refused.is_some() || self.discard.is_some() {
            return None;
        }
        let (first, _) = to_of(0)?;
        let to = &self.buf[first.clone()];
        let (mut off, mut n) = (0, 0u64);
        while let Some((r, total)) = to_of(off) {
            if &self.buf[r] != to {
                break;
            }
            off += total;
            n += 1;
        }
        Some((first, off, n))
    }

    /// The first `len` buffered bytes.
    pub(crate) fn prefix(&self, len: usize) -> &[u8] {
        &self.buf[..len]
    }

    /// Drops the first `len` buffered bytes (whole frames).
    pub(crate) fn skip(&mut self, len: usize) {
        self.buf.advance(len);
        self.taken();
    }

    /// The bytes of a frame returned by [`FrameReader::next_frame`] (header included).
    pub(crate) fn bytes(&self, f: &FrameRef) -> &[u8] {
        match (&self.refused, f.refused) {
            (Some(head), true) => head,
            _ => &self.buf[..f.total],
        }
    }

    /// Drops a handled frame from the buffer.
    pub(crate) fn consume(&mut self, f: &FrameRef) {
        if f.refused {
            self.refused = None;
        } else {
            self.buf.advance(f.total);
        }
        self.taken();
    }

    /// Reads more bytes; `Ok(false)` at a clean end of stream, a typed error mid-frame.
    pub(crate) async fn fill(&mut self, stream: &Stream) -> std::result::Result<bool, IpcError> {
        let room = self.buf.capacity() - self.buf.len();
        if room < 1024 || (self.grow && room < READ_CHUNK / 4) {
            // Start small; grow when reads fill the buffer, and never past what the
            // frame at the front still needs plus one chunk.
            let want = if self.grow { READ_CHUNK } else { READ_START };
            let want = match self.discard {
                Some(_) => READ_CHUNK,
                None => want.max(self.buf.len().min(self.max)),
            };
            self.buf.reserve(want);
        }
        let before = self.buf.capacity() - self.buf.len();
        let mut r: &Stream = stream;
        let n = match r.read_buf(&mut self.buf).await {
            Ok(n) => n,
            // A peer that exits with unread data in its socket resets instead of closing; same thing.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                0
            }
            Err(e) => return Err(IpcError::io("peer", e)),
        };
        if n == 0 {
            if let Some((head, remaining)) = &self.discard {
                return Err(IpcError::Truncated {
                    have: head.len(),
                    want: head.len() + remaining,
                });
            }
            frame::check_eof(&self.buf)?;
            return Ok(false);
        }
        self.grow = n >= before;
        if let Some((head, remaining)) = &mut self.discard {
            let keep = (frame::HEADER_LEN + REFUSED_HEAD).saturating_sub(head.len());
            let take = self.buf.len().min(*remaining);
            head.extend_from_slice(&self.buf[..take.min(keep)]);
            self.buf.advance(take);
            *remaining -= take;
            if *remaining == 0 {
                let (head, _) = self.discard.take().unwrap_or_default();
                self.refused = Some(head);
            }
        }
        Ok(true)
    }
}

/// Writes one frame directly and reads frames until one arrives; used by handshakes before the outbox runs.
pub(crate) async fn write_now(stream: &Stream, bytes: &[u8]) -> std::result::Result<(), IpcError> {
    let mut w: &Stream = stream;
    w.write_all(bytes)
        .await
        .map_err(|e| IpcError::io("peer", e))
}

/// Reads exactly one frame (kind, body) with a deadline.
pub(crate) async fn read_one(
    rd: &mut FrameReader,
    stream: &Stream,
    deadline: Duration,
) -> std::result::Result<(u8, Vec<u8>), IpcError> {
    let fut = async {
        loop {
            if let Some(f) = rd.next_frame()? {
                let body = rd.bytes(&f)[frame::HEADER_LEN..].to_vec();
                let k = f.kind;
                rd.consume(&f);
                return Ok((k, body));
            }
            if !rd.fill(stream).await? {
                return Err(IpcError::Handshake(
                    "the peer closed the connection during the handshake".into(),
                ));
            }
        }
    };
    match tokio::time::timeout(deadline, fut).await {
        Ok(r) => r,
        Err(_) => Err(IpcError::Handshake(format!(
            "no handshake frame within {deadline:?}"
        ))),
    }
}
