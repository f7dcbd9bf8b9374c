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

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;

enum Step {
    Stop,
    Park,
    Write,
}

struct OutState {
    buf: Vec<u8>,
    /// Segments of the last `SEND` frames, reused while the next event repeats them.
    enc: crate::codec::SendEncoder,
    idle: bool,
    closed: Option<String>,
    draining: bool,
    /// Last write by a producer or the writer's last park: how quiet the connection is.
    last_direct: Option<Instant>,
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
        let ob = Arc::new(Outbox {
            st: Mutex::new(OutState {
                buf: Vec::with_capacity(4096),
                enc: crate::codec::SendEncoder::default(),
                idle: true,
                closed: None,
                draining: false,
                last_direct: None,
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
        self.try_push_enc(|b, _, max| f(b, max))
    }

    /// [`Outbox::try_push`] with the connection's `SEND` encoder at hand.
    fn try_push_enc(
        &self,
        f: impl FnOnce(&mut Vec<u8>, &mut crate::codec::SendEncoder, usize) -> Result<()>,
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
        let was_empty = st.buf.is_empty();
        {
            let OutState { buf, enc, .. } = &mut *st;
            f(buf, enc, self.max_frame)?;
        }
        if st.idle {
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
                if let Err(e) = self.write_direct(&mut st.buf) {
                    let why = e.to_string();
                    st.closed = Some(why.clone());
                    self.shut.store(true, Ordering::Release);
                    drop(st);
                    self.wake.notify_one();
                    self.space.notify_waiters();
                    return Err(self.closed_err(&why));
                }
                if st.buf.is_empty() {
                    return Ok(true);
                }
            }
            st.idle = false;
            drop(st);
            self.wake.notify_one();
        }
        Ok(true)
    }

    /// Writes what the socket takes now without blocking; leaves the rest in `buf`.
    fn write_direct(&self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut w: &Stream = &self.stream;
        let mut off = 0;
        while off < buf.len() {
            match Pin::new(&mut w).poll_write(&mut cx, &buf[off..]) {
                Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => off += n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        buf.drain(..off);
        Ok(())
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
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.try_push(|b, _| {
                b.extend_from_slice(frame);
                Ok(())
            })? {
                return Ok(());
            }
            notified.await;
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
            let took = self.try_push_enc(|b, enc, max| {
                while b.len() < limit {
                    let Some(ev) = envs.front() else { break };
                    if let Err(e) = enc.write(b, max, to, &ev) {
                        failed = Some(e);
                        break;
                    }
                    envs.advance();
                }
                Ok(())
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
        self.try_push_enc(|b, enc, max| {
            while b.len() < limit {
                let Some(ev) = envs.front() else { break };
                if let Err(e) = enc.write(b, max, to, &ev) {
                    failed = Some(e);
                    break;
                }
                envs.advance();
            }
            Ok(())
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
        st.buf.extend_from_slice(frame);
        if st.idle {
            st.idle = false;
            drop(st);
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Closes now; whatever is queued is discarded.
    pub(crate) fn close(&self, why: &str) {
        {
            let mut st = lock(&self.st);
            if st.closed.is_none() {
                st.closed = Some(why.to_string());
            }
            self.shut.store(true, Ordering::Release);
        }
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

    async fn run_writer(self: Arc<Self>) {
        let mut spare: Vec<u8> = Vec::with_capacity(READ_CHUNK);
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
                    Step::Write
                }
            };
            match step {
                Step::Stop => break,
                Step::Park => {
                    self.wake.notified().await;
                    // Let a producer that just woke us add more before we take the batch.
                    tokio::task::yield_now().await;
                    continue;
                }
                Step::Write => {}
            }
            self.space.notify_waiters();
            let mut w: &Stream = &self.stream;
            if let Err(e) = w.write_all(&spare).await {
                tracing::debug!(peer = %self.label, error = %e, "write failed; closing the connection");
                self.close(&e.to_string());
                break;
            }
            spare.clear();
            // Keep the buffer for the next batch (regrowing it costs page faults and copies),
            // unless one huge frame inflated it well past the queue bound. A full queue ends
            // a little over the bound, and doubling puts its capacity just under twice it.
            if spare.capacity() > 2 * self.limit.max(4 * READ_CHUNK) {
                spare = Vec::with_capacity(READ_CHUNK);
            }
        }
        self.done.store(true, Ordering::Release);
        self.finished.notify_waiters();
        self.space.notify_waiters();
    }
}

/// Reads frames from a stream: many per read, with the size limit checked on each header.
pub(crate) struct FrameReader {
    buf: BytesMut,
    max: usize,
}

impl FrameReader {
    /// A reader accepting frames up to `max` bytes.
    pub(crate) fn new(max: usize) -> FrameReader {
        FrameReader {
            buf: BytesMut::with_capacity(READ_CHUNK),
            max,
        }
    }

    /// The next complete frame already buffered, if any.
    pub(crate) fn next_frame(&mut self) -> std::result::Result<Option<FrameRef>, IpcError> {
        match frame::peek_frame(&self.buf, self.max)? {
            Some(f) => Ok(Some(f)),
            None => {
                if self.buf.len() >= 4 {
                    let len =
                        u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                            as usize;
                    let want = 4 + len;
                    if self.buf.capacity() < want {
                        self.buf.reserve(want - self.buf.len());
                    }
                }
                Ok(None)
            }
        }
    }

    /// Hands each complete `SEND` body already buffered to `take` while it returns `true`,
    /// then drops those frames in one step; stops at the first frame of another kind or
    /// one `take` declines, which [`FrameReader::next_frame`] then returns. Errors in a
    /// frame header are left for `next_frame` to report.
    pub(crate) fn take_sends(&mut self, mut take: impl FnMut(&[u8]) -> bool) {
        let mut off = 0;
        while let Ok(Some(f)) = frame::peek_frame(&self.buf[off..], self.max) {
            if f.kind != frame::kind::SEND
                || !take(&self.buf[off + frame::HEADER_LEN..off + f.total])
            {
                break;
            }
            off += f.total;
        }
        self.buf.advance(off);
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
    }

    /// The bytes of a frame returned by [`FrameReader::next_frame`] (header included).
    pub(crate) fn bytes(&self, f: &FrameRef) -> &[u8] {
        &self.buf[..f.total]
    }

    /// Drops a handled frame from the buffer.
    pub(crate) fn consume(&mut self, f: &FrameRef) {
        self.buf.advance(f.total);
    }

    /// Reads more bytes; `Ok(false)` at a clean end of stream, a typed error mid-frame.
    pub(crate) async fn fill(&mut self, stream: &Stream) -> std::result::Result<bool, IpcError> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
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
            frame::check_eof(&self.buf)?;
            return Ok(false);
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
