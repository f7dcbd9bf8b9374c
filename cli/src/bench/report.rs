//! The results: one row per (transport, workload), printed as a table, written as JSON or drawn as SVG.

use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::measure::{RunConfig, Sample};
use super::provider::Workload;

/// The conditions a run was made under, printed above the table.
pub struct Conditions {
    /// Payload bytes.
    pub size: usize,
    /// Measurement window of each run.
    pub window_ms: u128,
    /// Warm-up before it.
    pub warmup_ms: u128,
    /// Raw/ours alternations.
    pub rounds: usize,
    /// CPUs the process may use.
    pub cpus: usize,
    /// Whether this is an optimized build.
    pub release: bool,
    /// Subscribers and workers.
    pub fanout: usize,
    /// Workers in any-of-type.
    pub workers: usize,
    /// Offered rate per producer; `None` is full speed.
    pub rate: Option<f64>,
}

impl Conditions {
    /// The conditions of this process and configuration.
    pub fn here(cfg: &RunConfig, rounds: usize) -> Conditions {
        Conditions {
            size: cfg.size,
            window_ms: cfg.duration.as_millis(),
            warmup_ms: cfg.warmup.as_millis(),
            rounds,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            release: !cfg!(debug_assertions),
            fanout: cfg.fanout,
            workers: cfg.workers,
            rate: cfg.rate,
        }
    }

    /// One line for the top of the report.
    pub fn describe(&self) -> String {
        format!(
            "switchyard bench: {} B payloads, {}, {} ms window after {} ms warm-up, {} round(s) alternating raw/ours, fan-out {}, workers {}, {} CPUs, {}",
            self.size,
            match self.rate {
                Some(r) => format!("producers offer {}/s", si(r)),
                None => "full speed".to_string(),
            },
            self.window_ms,
            self.warmup_ms,
            self.rounds,
            self.fanout,
            self.workers,
            self.cpus,
            if self.release {
                "release build"
            } else {
                "debug build (figures not representative: build with --release)"
            }
        )
    }
}

/// One side's figures over all rounds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Median over rounds of messages received per second (round trips for ping-pong).
    pub msgs_per_sec: f64,
    /// Latency percentiles in µs over every round's samples.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Largest, µs.
    pub max_us: f64,
    /// Messages sent but not received, over all rounds.
    pub lost: u64,
}

impl Stats {
    /// Combines the rounds of one side: median throughput, merged latency histogram, summed losses.
    pub fn combine(samples: &[Sample]) -> Stats {
        let mut rates: Vec<f64> = samples.iter().map(|s| s.msgs_per_sec).collect();
        rates.sort_by(f64::total_cmp);
        let msgs_per_sec = match rates.len() {
            0 => 0.0,
            n if n % 2 == 1 => rates[n / 2],
            n => (rates[n / 2 - 1] + rates[n / 2]) / 2.0,
        };
        let mut hist: Option<Histogram<u64>> = None;
        for s in samples {
            match &mut hist {
                Some(h) => {
                    let _ = h.add(&s.hist);
                }
                None => hist = Some(s.hist.clone()),
            }
        }
        let us = |q: f64| {
            hist.as_ref()
                .filter(|h| !h.is_empty())
                .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
        };
        Stats {
            msgs_per_sec,
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: hist
                .as_ref()
                .filter(|h| !h.is_empty())
                .map_or(0.0, |h| h.max() as f64 / 1000.0),
            lost: samples.iter().map(|s| s.lost).sum(),
        }
    }
}

/// One (transport, workload) result, as written to JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Transport name.
    pub transport: &'static str,
    /// Workload name.
    pub workload: &'static str,
    /// Payload bytes.
    pub size: usize,
    /// Messages received per second through Switchyard (round trips per second for ping-pong).
    pub msgs_per_sec: f64,
    /// Latency p50, µs: round trip for ping-pong, one-way from the intended send time otherwise.
    pub p50_us: f64,
    /// Latency p99, µs.
    pub p99_us: f64,
    /// Latency p99.9, µs.
    pub p999_us: f64,
    /// Largest latency seen, µs.
    pub max_us: f64,
    /// Messages sent through Switchyard and never received.
    pub lost: u64,
    /// The same on the raw baseline.
    pub raw_msgs_per_sec: f64,
    /// Raw latency p50, µs.
    pub raw_p50_us: f64,
    /// Raw latency p99, µs.
    pub raw_p99_us: f64,
    /// Raw latency p99.9, µs.
    pub raw_p999_us: f64,
    /// Messages lost on the raw baseline.
    pub raw_lost: u64,
    /// Throughput ratio, ours / raw (1.0 = as fast as raw).
    pub ratio: f64,
    /// p50 latency ratio, ours / raw (1.0 = as quick as raw); 0 when raw has no samples.
    pub p50_ratio: f64,
    /// What the raw baseline is.
    pub baseline: &'static str,
    /// What `msgs_per_sec` counts.
    pub unit: &'static str,
    /// Messages per second the producer offered (`--rate`); `null` for full speed.
    pub rate: Option<f64>,
}

impl Row {
    /// A row from both sides' figures.
    pub fn new(
        transport: &'static str,
        baseline: &'static str,
        w: Workload,
        cfg: &RunConfig,
        ours: Stats,
        raw: Stats,
    ) -> Row {
        let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        Row {
            transport,
            workload: w.name(),
            size: cfg.size,
            msgs_per_sec: ours.msgs_per_sec,
            p50_us: ours.p50_us,
            p99_us: ours.p99_us,
            p999_us: ours.p999_us,
            max_us: ours.max_us,
            lost: ours.lost,
            raw_msgs_per_sec: raw.msgs_per_sec,
            raw_p50_us: raw.p50_us,
            raw_p99_us: raw.p99_us,
            raw_p999_us: raw.p999_us,
            raw_lost: raw.lost,
            ratio: div(ours.msgs_per_sec, raw.msgs_per_sec),
            p50_ratio: div(ours.p50_us, raw.p50_us),
            baseline,
            unit: if w == Workload::PingPong {
                "round trips"
            } else {
                "messages received"
            },
            rate: if w == Workload::PingPong {
                None
            } else {
                cfg.rate
            },
        }
    }
}

/// `12.3M`, `456K`, `789`.
pub fn si(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}K", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn us(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The report table (also the README's format).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "| {:<9} | {:<11} | {:>10} | {:>10} | {:>6} | {:>20} | {:>20} | {:>6} | {:>4} |\n",
        "transport",
        "workload",
        "msg/s",
        "raw msg/s",
        "ratio",
        "p50/p99/p99.9 µs",
        "raw p50/p99/p99.9",
        "p50 ×",
        "lost"
    ));
    out.push_str(&format!(
        "|{:-<11}|{:-<13}|{:->12}|{:->12}|{:->8}|{:->22}|{:->22}|{:->8}|{:->6}|\n",
        "", "", ":", ":", ":", ":", ":", ":", ":"
    ));
    for r in rows {
        out.push_str(&format!(
            "| {:<9} | {:<11} | {:>10} | {:>10} | {:>6.2} | {:>20} | {:>20} | {:>6.2} | {:>4} |\n",
            r.transport,
            r.workload,
            si(r.msgs_per_sec),
            si(r.raw_msgs_per_sec),
            r.ratio,
            format!("{}/{}/{}", us(r.p50_us), us(r.p99_us), us(r.p999_us)),
            format!(
                "{}/{}/{}",
                us(r.raw_p50_us),
                us(r.raw_p99_us),
                us(r.raw_p999_us)
            ),
            r.p50_ratio,
            r.lost + r.raw_lost,
        ));
    }
    out
}

/// Prints the table, the baselines and the workloads a transport does not offer.
pub fn print_table(rows: &[Row], notes: &[String], rate: Option<f64>) -> Result<(), String> {
    say!();
    say!("{}", table(rows).trim_end());
    say!();
    let mut seen = Vec::new();
    for r in rows {
        if !seen.contains(&r.transport) {
            seen.push(r.transport);
            say!("raw baseline of {}: {}", r.transport, r.baseline);
        }
    }
    for n in notes {
        say!("{n}");
    }
    say!(
        "ratio = ours / raw throughput (higher is better); p50 × = ours / raw p50 latency (lower is better)."
    );
    let load = match rate {
        Some(r) => format!("with producers offering {}/s", si(r)),
        None => "at full load, so mostly queueing".to_string(),
    };
    say!(
        "ping-pong msg/s counts round trips and its latency is the round trip; other latencies are one-way, from the intended send time, {load}."
    );
    Ok(())
}

/// Writes the rows as a JSON array.
pub fn write_json(path: &Path, rows: &[Row]) -> Result<(), String> {
    let text = serde_json::to_string_pretty(rows)
        .map_err(|e| format!("cannot encode the results as JSON: {e}"))?;
    std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Draws throughput and p50 latency per (transport, workload), ours beside raw, on log scales.
pub fn write_svg(path: &Path, rows: &[Row], cond: &Conditions) -> Result<(), String> {
    super::svg::draw(path, rows, cond).map_err(|e| format!("cannot draw {}: {e}", path.display()))
}
