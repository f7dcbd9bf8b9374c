//! What every workload shares: the message, the measurement window, counters and latency histograms.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use switchyard::{Payload, PayloadRef};
use tokio::sync::oneshot;

/// Errors of a benchmark run, printed as one line.
pub type BenchError = Box<dyn std::error::Error + Send + Sync>;
/// Result of a benchmark step.
pub type BenchResult<T> = Result<T, BenchError>;

/// One message in every run, raw or ours: same fields, same payload size.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchMsg {
    /// Position in the producer's stream.
    pub seq: u64,
    /// Intended send time in ns since the run's base instant; 0 when this message is not sampled.
    pub stamp_ns: u64,
    /// `--size` bytes, shared rather than copied in process (as a user would share a buffer).
    pub data: Arc<ByteBuf>,
}

impl BenchMsg {
    /// Reads a message from a payload: by reference in process, decoded when it crossed a process.
    pub fn from_payload(p: &Payload) -> Option<BenchMsg> {
        match p.get_ref::<BenchMsg>() {
            Some(m) => Some(m.clone()),
            None => p.read::<BenchMsg>().ok(),
        }
    }
}

/// Every `SAMPLE_EVERY`-th message carries a timestamp, so reading the clock stays off most sends.
pub const SAMPLE_EVERY: u64 = 64;

/// The settings of one run, shared by the raw and our side.
#[derive(Clone)]
pub struct RunConfig {
    /// Payload bytes.
    pub size: usize,
    /// Time before the window opens.
    pub warmup: Duration,
    /// The measurement window.
    pub duration: Duration,
    /// Subscribers in the fan-out workload.
    pub fanout: usize,
    /// Workers in the any-of-type workload.
    pub workers: usize,
    /// Bound of every queue (mailboxes and raw channels alike).
    pub capacity: usize,
    /// Messages per second each producer offers; `None` sends as fast as the consumers take them.
    pub rate: Option<f64>,
    base: Instant,
    data: Arc<ByteBuf>,
}

impl RunConfig {
    /// A configuration with a payload of `size` bytes.
    pub fn new(
        size: usize,
        warmup: Duration,
        duration: Duration,
        fanout: usize,
        workers: usize,
    ) -> Self {
        RunConfig {
            size,
            warmup,
            duration,
            fanout,
            workers,
            capacity: switchyard::MailboxConfig::default().capacity,
            rate: None,
            base: Instant::now(),
            data: Arc::new(ByteBuf::from(vec![0xA5u8; size])),
        }
    }

    /// Offers `rate` messages per second instead of sending as fast as possible.
    pub fn with_rate(mut self, rate: Option<f64>) -> Self {
        self.rate = rate.filter(|r| *r > 0.0 && r.is_finite());
        self
    }

    /// The `seq`-th message of a producer that started at `start_ns`.
    ///
    /// At full speed it goes now (sampled ones stamped now). With a rate, it waits
    /// for its slot `start + seq / rate` and is stamped with that slot, not with the
    /// time it actually leaves: a stall delays every later message and all of that
    /// delay is counted (no coordinated omission).
    pub async fn next_msg(&self, seq: u64, start_ns: u64) -> BenchMsg {
        let Some(rate) = self.rate else {
            return self.msg(seq);
        };
        let intended = start_ns + (seq as f64 * 1e9 / rate) as u64;
        loop {
            let now = self.now_ns();
            if now >= intended {
                break;
            }
            let ahead = intended - now;
            if ahead > 2_000_000 {
                // Timers are coarse (about 1 ms): sleep most of a long gap, then poll.
                tokio::time::sleep(Duration::from_nanos(ahead - 1_000_000)).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
        self.msg_at(seq, intended)
    }

    /// Nanoseconds since the base instant, never 0.
    pub fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1
    }

    /// The `seq`-th message, stamped with its intended send time when it is sampled.
    pub fn msg(&self, seq: u64) -> BenchMsg {
        BenchMsg {
            seq,
            stamp_ns: if seq.is_multiple_of(SAMPLE_EVERY) {
                self.now_ns()
            } else {
                0
            },
            data: self.data.clone(),
        }
    }

    /// A message stamped with `stamp_ns`, for round trips.
    pub fn msg_at(&self, seq: u64, stamp_ns: u64) -> BenchMsg {
        BenchMsg {
            seq,
            stamp_ns,
            data: self.data.clone(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A histogram stays usable after a panic elsewhere; keep measuring.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const WARMING: u8 = 0;
const MEASURING: u8 = 1;
const STOPPED: u8 = 2;

/// Padded so consumers on different cores do not share a cache line.
#[repr(align(128))]
struct Slot {
    count: AtomicU64,
    hist: Mutex<Histogram<u64>>,
}

/// Counters and histograms of one run, one slot per consumer, plus the phase of the window.
pub struct Probe {
    slots: Box<[Slot]>,
    phase: AtomicU8,
    cfg: RunConfig,
}

/// 1 ns .. 60 s at 3 significant digits.
fn new_histogram() -> BenchResult<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3)
        .map_err(|e| format!("cannot create a latency histogram: {e}").into())
}

impl Probe {
    /// A probe for `consumers` consumers.
    pub fn new(consumers: usize, cfg: &RunConfig) -> BenchResult<Arc<Probe>> {
        let slots = (0..consumers.max(1))
            .map(|_| {
                Ok(Slot {
                    count: AtomicU64::new(0),
                    hist: Mutex::new(new_histogram()?),
                })
            })
            .collect::<BenchResult<Box<[Slot]>>>()?;
        Ok(Arc::new(Probe {
            slots,
            phase: AtomicU8::new(WARMING),
            cfg: cfg.clone(),
        }))
    }

    /// The run's settings.
    pub fn cfg(&self) -> &RunConfig {
        &self.cfg
    }

    /// Whether producers should stop.
    pub fn stopped(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == STOPPED
    }

    /// Consumer `i` received `msg`: count it and, if it is sampled, record its latency from the intended send time.
    pub fn received(&self, i: usize, msg: &BenchMsg) {
        let slot = &self.slots[i % self.slots.len()];
        slot.count.fetch_add(1, Ordering::Relaxed);
        if msg.stamp_ns != 0 {
            self.record_in(slot, self.cfg.now_ns().saturating_sub(msg.stamp_ns));
        }
    }

    /// Consumer `i` received a payload carrying a [`BenchMsg`].
    pub fn received_payload(&self, i: usize, p: PayloadRef<'_>) {
        match p.get_ref::<BenchMsg>() {
            Some(m) => self.received(i, m),
            None => match p.read::<BenchMsg>() {
                Ok(m) => self.received(i, &m),
                Err(e) => tracing::warn!(error = %e, "unreadable bench message"),
            },
        }
    }

    /// Counts one completed round trip of `ns` nanoseconds on slot `i`.
    pub fn round_trip(&self, i: usize, ns: u64) {
        let slot = &self.slots[i % self.slots.len()];
        slot.count.fetch_add(1, Ordering::Relaxed);
        self.record_in(slot, ns);
    }

    fn record_in(&self, slot: &Slot, ns: u64) {
        if self.phase.load(Ordering::Relaxed) == MEASURING {
            lock(&slot.hist).saturating_record(ns.max(1));
        }
    }

    /// Messages (or round trips) counted so far, over all consumers.
    pub fn total(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.count.load(Ordering::Relaxed))
            .sum()
    }

    /// The latency histograms of every consumer, merged.
    pub fn histogram(&self) -> Histogram<u64> {
        let mut all = Histogram::new_from(&*lock(&self.slots[0].hist));
        for s in self.slots.iter() {
            let _ = all.add(&*lock(&s.hist));
        }
        all
    }

    /// Starts the clock: warm-up, then the window; producers see [`Probe::stopped`] when it closes.
    ///
    /// The clock is an OS thread so that a producer that never yields (a same-thread
    /// transport runs its whole exchange inline) cannot delay the window's edges.
    pub fn start_clock(self: &Arc<Self>) -> Clock {
        let (tx, rx) = oneshot::channel();
        let probe = self.clone();
        let spawned = std::thread::Builder::new()
            .name("bench-clock".into())
            .spawn(move || {
                std::thread::sleep(probe.cfg.warmup);
                let c0 = probe.total();
                let t0 = Instant::now();
                probe.phase.store(MEASURING, Ordering::Relaxed);
                std::thread::sleep(probe.cfg.duration);
                probe.phase.store(STOPPED, Ordering::Relaxed);
                let c1 = probe.total();
                let _ = tx.send(Window {
                    received: c1.saturating_sub(c0),
                    elapsed: t0.elapsed(),
                });
            });
        Clock {
            rx,
            spawned: spawned.map(|_| ()).map_err(|e| e.to_string()),
        }
    }

    /// Stops producers now (used when a run fails).
    pub fn stop(&self) {
        self.phase.store(STOPPED, Ordering::Relaxed);
    }

    /// Waits until consumers counted `expected` messages or `limit` passed; returns how many are missing.
    pub async fn drain(&self, expected: u64, limit: Duration) -> u64 {
        let deadline = Instant::now() + limit;
        // Polling is fine here: this is the tail of a measurement, outside the window.
        while self.total() < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        expected.saturating_sub(self.total())
    }
}

/// What the window saw.
pub struct Window {
    /// Messages (or round trips) counted inside the window.
    pub received: u64,
    /// The window's real length.
    pub elapsed: Duration,
}

/// A running clock; [`Clock::finish`] waits for the window to close.
pub struct Clock {
    rx: oneshot::Receiver<Window>,
    spawned: Result<(), String>,
}

impl Clock {
    /// Waits for the window to close.
    pub async fn finish(self) -> BenchResult<Window> {
        if let Err(e) = self.spawned {
            return Err(format!("cannot start the bench clock thread: {e}").into());
        }
        self.rx
            .await
            .map_err(|_| "the bench clock thread stopped early".into())
    }
}

/// The outcome of one side (raw or ours) of one run.
pub struct Sample {
    /// Messages received per second at the consumers (round trips per second for ping-pong).
    pub msgs_per_sec: f64,
    /// Latency in ns: one-way from the intended send time, or the round trip.
    pub hist: Histogram<u64>,
    /// Messages sent but never received.
    pub lost: u64,
}

impl Sample {
    /// A sample from a closed window.
    pub fn new(w: &Window, probe: &Probe, lost: u64) -> Sample {
        let secs = w.elapsed.as_secs_f64().max(1e-9);
        Sample {
            msgs_per_sec: w.received as f64 / secs,
            hist: probe.histogram(),
            lost,
        }
    }
}

/// How long to wait for in-flight messages after the window closes before calling them lost.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);
