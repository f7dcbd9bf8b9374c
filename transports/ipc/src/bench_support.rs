//! The raw baseline for ipc benchmarks: a plain tokio unix socket carrying the same frames.
//!
//! BENCHMARKING.md asks for every figure beside the raw library underneath, in
//! the same run. These workloads speak the ipc framing (`len: u32 BE`, `kind`,
//! body) over `tokio::net::UnixStream` with nothing else: no envelope, no
//! registry, no routing. The sink/echo halves run in one process and the
//! source/ping halves in another (see `examples/ipc_bench.rs`), or both in one
//! process for a quick look. [`ipc_frame_len`] gives the size of an ipc `SEND`
//! frame for a payload, so the raw run can use frames of exactly that size.

use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use switchyard_core::{Address, Envelope, Payload};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{UnixListener, UnixStream};

use crate::frame::{self, HEADER_LEN, kind};

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

/// A histogram for round trips from 1 ns to 60 s with 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    // Constant, valid bounds: this cannot fail.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid constant histogram bounds")
}

/// Summarises a histogram of nanoseconds.
pub fn latency(h: &Histogram<u64>) -> Latency {
    let us = |ns: u64| ns as f64 / 1000.0;
    Latency {
        p50_us: us(h.value_at_quantile(0.50)),
        p99_us: us(h.value_at_quantile(0.99)),
        p999_us: us(h.value_at_quantile(0.999)),
        max_us: us(h.max()),
    }
}

/// Bytes of the ipc `SEND` frame carrying a `payload_len`-byte binary payload from `source` to `target`.
pub fn ipc_frame_len(payload_len: usize, source: &str, target: &str, event: &str) -> usize {
    let env = Envelope::new(
        u64::MAX >> 8,
        source.into(),
        Address::Machine(target.into()),
        switchyard_core::Name::new(event),
        Payload::new(serde_bytes::ByteBuf::from(vec![0xa5u8; payload_len])),
    );
    let mut buf = Vec::new();
    match frame::write_send(&mut buf, usize::MAX, target, &env) {
        Ok(()) => buf.len(),
        Err(_) => HEADER_LEN + payload_len,
    }
}

fn raw_frame(total: usize) -> Vec<u8> {
    let total = total.max(HEADER_LEN + 1);
    let mut f = vec![0x5au8; total];
    f[..4].copy_from_slice(&((total - 4) as u32).to_be_bytes());
    f[4] = kind::SEND;
    f
}

/// Binds a raw listener at `path` (removing a stale file first).
pub fn raw_listen(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

/// Events of a one-way run that only warm up (the first tenth): the rate counts the rest.
pub fn warm_up(n: u64) -> u64 {
    n / 10
}

/// Reads frames until `n` arrived; returns the time from the end of the warm-up
/// ([`warm_up`]) to the last frame.
pub async fn raw_sink(listener: UnixListener, n: u64) -> std::io::Result<Duration> {
    let (mut s, _) = listener.accept().await?;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut have, mut count) = (0usize, 0u64);
    let mut start: Option<Instant> = None;
    let warm = warm_up(n);
    while count < n {
        let r = s.read(&mut buf[have..]).await?;
        if r == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        have += r;
        let mut off = 0;
        while have - off >= 4 {
            let len =
                u32::from_be_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
            if have - off < 4 + len {
                break;
            }
            off += 4 + len;
            count += 1;
        }
        if count >= warm {
            start.get_or_insert_with(Instant::now);
        }
        buf.copy_within(off..have, 0);
        have -= off;
    }
    Ok(start.map(|t| t.elapsed()).unwrap_or_default())
}

/// Connects to `path` and writes `n` frames of `frame_len` bytes through a 64 KiB buffer.
pub async fn raw_source(path: &Path, n: u64, frame_len: usize) -> std::io::Result<()> {
    let s = UnixStream::connect(path).await?;
    let mut w = BufWriter::with_capacity(64 * 1024, s);
    let f = raw_frame(frame_len);
    for _ in 0..n {
        w.write_all(&f).await?;
    }
    w.flush().await?;
    // Wait for the sink to close so the last bytes are not cut off by our exit.
    let mut s = w.into_inner();
    let mut sink = [0u8; 1];
    let _ = s.read(&mut sink).await;
    Ok(())
}

/// Echoes every frame back, one write per frame, until the peer closes.
pub async fn raw_echo(listener: UnixListener) -> std::io::Result<()> {
    let (mut s, _) = listener.accept().await?;
    let mut head = [0u8; 4];
    let mut body = Vec::new();
    loop {
        if s.read_exact(&mut head).await.is_err() {
            return Ok(());
        }
        let len = u32::from_be_bytes(head) as usize;
        body.resize(4 + len, 0);
        body[..4].copy_from_slice(&head);
        s.read_exact(&mut body[4..]).await?;
        s.write_all(&body).await?;
    }
}

/// Sends `n` frames of `frame_len` bytes one at a time, waiting for each echo; returns the round trips.
pub async fn raw_ping(path: &Path, n: u64, frame_len: usize) -> std::io::Result<Latency> {
    let mut s = UnixStream::connect(path).await?;
    let f = raw_frame(frame_len);
    let mut back = vec![0u8; f.len()];
    let mut h = histogram();
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&f).await?;
        s.read_exact(&mut back).await?;
        h.saturating_record(t.elapsed().as_nanos() as u64);
    }
    Ok(latency(&h))
}
