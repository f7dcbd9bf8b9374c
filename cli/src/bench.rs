//! `switchyard bench`: every enabled transport beside the raw library underneath it, in one run.
//!
//! Each transport is a [`provider::Provider`]: its workloads run once on the
//! raw library and once through Switchyard, alternating, in the same process,
//! with the same message size and queue bounds (docs: BENCHMARKING.md). The
//! table gives each figure's ratio to its raw baseline.

/// `println!` that turns a closed stdout (`| head`) into an error line instead of a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)
            .map_err(|e| format!("cannot write to stdout: {e}"))?
    }};
}
pub(crate) use say;

mod direct;
pub(crate) mod helper;
// The raw baseline is a unix socket pair; elsewhere ipc (named pipes) is not measured yet.
#[cfg(unix)]
mod ipc;
mod measure;
mod memory;
mod ours;
mod provider;
#[cfg(feature = "rabbitmq")]
mod rabbitmq;
#[cfg(feature = "redis")]
mod redis;
mod report;
mod svg;
mod zmq;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::CliResult;
use measure::RunConfig;
use provider::{Provider, Side, Workload};
use report::{Conditions, Row, Stats};

/// Every transport name `--transports` accepts: the ones measured here and the ones planned.
const KNOWN: [&str; 8] = [
    "direct",
    "memory",
    "ipc",
    "ipc-p2p",
    "zeromq",
    "rabbitmq",
    "rabbitmq-durable",
    "redis",
];

/// Largest `--size` accepted: every queue holds up to 1024 messages of it, per consumer.
const MAX_SIZE: usize = 1 << 20;

/// Options of `switchyard bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Transports to measure, comma-separated: direct, memory, ipc, ipc-p2p, zeromq, and rabbitmq, redis when built with their features (default: all of them).
    #[arg(long, value_delimiter = ',', value_name = "NAMES", value_parser = parse_transport)]
    transports: Vec<String>,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64, value_name = "BYTES", value_parser = parse_size)]
    size: usize,
    /// Measurement window of each run, after its warm-up (e.g. 2s, 500ms) [default: 1s, --quick: 200ms].
    #[arg(long, value_name = "TIME", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// A short run for CI and a first look: short windows, one round.
    #[arg(long)]
    quick: bool,
    /// Raw/ours alternations per workload; throughput is their median [default: 3, --quick: 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=50))]
    rounds: Option<u32>,
    /// Subscribers in the fan-out workload.
    #[arg(long, default_value_t = 4, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    fanout: u32,
    /// Workers in the any-of-type workload.
    #[arg(long, default_value_t = 4, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
    /// Offer this many messages per second (per producer) instead of full speed; one-way
    /// latency then counts from each message's scheduled send time. Ping-pong stays closed-loop.
    #[arg(long, value_name = "MSGS_PER_SEC", value_parser = parse_rate)]
    rate: Option<f64>,
    /// Internal: serve the remote ponger of the ipc ping-pong, on the bus daemon at this socket.
    #[arg(long, hide = true, value_name = "SOCKET")]
    serve_ponger: Option<PathBuf>,
    /// Internal: with --serve-ponger, in peer-to-peer mode.
    #[arg(long, hide = true)]
    p2p: bool,
    /// Internal: serve the raw echo of the ipc ping-pong baseline on a unix socket at this path.
    #[arg(long, hide = true, value_name = "PATH")]
    serve_raw_echo: Option<PathBuf>,
    /// Also write the results as JSON, one object per (transport, workload).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Also draw throughput and latency per transport as an SVG bar chart.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

fn parse_transport(s: &str) -> Result<String, String> {
    let s = s.trim();
    if KNOWN.contains(&s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "unknown transport; known transports: {}",
            KNOWN.join(", ")
        ))
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of messages per second"))?;
    if !(1.0..=1e8).contains(&r) {
        return Err("between 1 and 100000000 messages per second".into());
    }
    Ok(r)
}

fn parse_size(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of bytes"))?;
    if n > MAX_SIZE {
        return Err(format!("at most {MAX_SIZE} bytes"));
    }
    Ok(n)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.strip_suffix("ms") {
        Some(n) => (n, 1e-3),
        None => (s.strip_suffix('s').unwrap_or(s), 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 2s, 500ms)"))?;
    let secs = v * unit;
    if !(0.01..=600.0).contains(&secs) {
        return Err("a duration between 10ms and 600s".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Every transport this binary can measure, in report order.
fn providers() -> Vec<Box<dyn Provider>> {
    #[allow(unused_mut)]
    let mut all: Vec<Box<dyn Provider>> = vec![Box::new(direct::Direct), Box::new(memory::Memory)];
    #[cfg(unix)]
    {
        all.push(Box::new(ipc::Ipc { p2p: false }));
        all.push(Box::new(ipc::Ipc { p2p: true }));
    }
    all.push(Box::new(zmq::Zeromq));
    #[cfg(feature = "rabbitmq")]
    {
        all.push(Box::new(rabbitmq::Rabbit { durable: false }));
        all.push(Box::new(rabbitmq::Rabbit { durable: true }));
    }
    #[cfg(feature = "redis")]
    all.push(Box::new(redis::Redis));
    all
}

/// The chosen providers, and the names asked for that this build does not have.
type Selection = (Vec<Box<dyn Provider>>, Vec<String>);

/// The providers named on the command line (all by default; clap has checked the names).
fn select(all: Vec<Box<dyn Provider>>, names: &[String]) -> Selection {
    if names.is_empty() {
        return (all, Vec::new());
    }
    let mut wanted: Vec<&String> = Vec::new();
    for n in names {
        if !wanted.contains(&n) {
            wanted.push(n);
        }
    }
    let mut not_built = Vec::new();
    let mut chosen = Vec::new();
    let mut pool: Vec<Option<Box<dyn Provider>>> = all.into_iter().map(Some).collect();
    for n in wanted {
        // `rabbitmq` names the transport in both of its modes.
        let also = if n == "rabbitmq" {
            Some("rabbitmq-durable")
        } else {
            None
        };
        match pool
            .iter_mut()
            .find(|p| p.as_ref().is_some_and(|p| p.name() == n.as_str()))
        {
            Some(slot) => chosen.extend(slot.take()),
            None => not_built.push(n.clone()),
        }
        if let Some(slot) = also.and_then(|a| {
            pool.iter_mut()
                .find(|p| p.as_ref().is_some_and(|p| p.name() == a))
        }) {
            chosen.extend(slot.take());
        }
    }
    (chosen, not_built)
}

/// Runs `switchyard bench` (or, with a hidden `--serve-*` option, one of its helper processes).
pub async fn run(args: BenchArgs) -> CliResult {
    #[cfg(unix)]
    {
        if let Some(socket) = &args.serve_ponger {
            return ipc::serve_ponger(socket, args.p2p).await;
        }
        if let Some(path) = &args.serve_raw_echo {
            return ipc::serve_raw_echo(path, args.size).await;
        }
    }
    let duration = args.duration.unwrap_or(if args.quick {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    });
    let warmup = (duration / 4).clamp(Duration::from_millis(50), Duration::from_millis(500));
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }) as usize;
    let cfg = RunConfig::new(
        args.size,
        warmup,
        duration,
        args.fanout as usize,
        args.workers as usize,
    )
    .with_rate(args.rate);
    let (selected, not_built) = select(providers(), &args.transports);
    for n in not_built {
        say!("{n}: skipped: this build has no `{n}` transport yet");
    }
    let mut ready = Vec::new();
    for p in selected {
        match p.check().await {
            Ok(()) => ready.push(p),
            Err(why) => say!("{}: skipped: {why}", p.name()),
        }
    }
    if ready.is_empty() {
        return Err("no transport to measure".into());
    }

    let conditions = Conditions::here(&cfg, rounds);
    say!("{}", conditions.describe());

    let mut plan = Vec::new();
    let mut notes = Vec::new();
    for p in &ready {
        for w in Workload::ALL {
            match p.supports(w) {
                Ok(()) => plan.push((p.as_ref(), w)),
                Err(why) => notes.push(format!("{} {w}: n/a: {why}", p.name())),
            }
        }
    }

    let bar = progress_bar((plan.len() * rounds * 2) as u64);
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for (p, w) in plan {
        match measure_pair(p, w, &cfg, rounds, &bar).await {
            Ok(row) => rows.push(row),
            Err(e) => {
                let line = format!("{} {w}: failed: {e}", p.name());
                // A hidden bar drops its println, and the line must not be lost with it.
                if bar.is_hidden() {
                    say!("{line}");
                } else {
                    bar.println(&line);
                }
                failures.push(line);
            }
        }
    }
    bar.finish_and_clear();

    report::print_table(&rows, &notes, cfg.rate)?;
    if let Some(path) = &args.json {
        report::write_json(path, &rows)?;
        say!("wrote {}", path.display());
    }
    if let Some(path) = &args.svg {
        report::write_svg(path, &rows, &conditions)?;
        say!("wrote {}", path.display());
    }
    match failures.len() {
        0 => Ok(()),
        1 => Err(failures.remove(0).into()),
        n => Err(format!("{n} runs failed (see above)").into()),
    }
}

/// Runs one workload on raw and ours, alternating which goes first each round.
async fn measure_pair(
    p: &dyn Provider,
    w: Workload,
    cfg: &RunConfig,
    rounds: usize,
    bar: &ProgressBar,
) -> Result<Row, String> {
    let mut raw = Vec::with_capacity(rounds);
    let mut ours = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Side::Raw, Side::Ours]
        } else {
            [Side::Ours, Side::Raw]
        };
        for side in order {
            bar.set_message(format!(
                "{} {w} ({side}, round {}/{rounds})",
                p.name(),
                round + 1
            ));
            let sample = p
                .run(side, w, cfg)
                .await
                .map_err(|e| format!("{side}: {e}"))?;
            match side {
                Side::Raw => raw.push(sample),
                Side::Ours => ours.push(sample),
            }
            bar.inc(1);
        }
    }
    Ok(Row::new(
        p.name(),
        p.baseline(),
        w,
        cfg,
        Stats::combine(&ours),
        Stats::combine(&raw),
    ))
}

/// A progress bar on stderr while stdout is a terminal; hidden otherwise (pipes, files, CI).
fn progress_bar(len: u64) -> ProgressBar {
    if !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed}]") {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse_or_say_why_not() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("forever").is_err());
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_size("64"), Ok(64));
        assert!(parse_size("-1").is_err());
        assert!(parse_size(&(MAX_SIZE + 1).to_string()).is_err());
    }

    #[test]
    fn transports_are_picked_by_name_in_the_order_given() {
        let names = vec![
            "memory".to_string(),
            "direct".into(),
            "redis".into(),
            "memory".into(),
        ];
        let (chosen, not_built) = select(providers(), &names);
        let chosen: Vec<&str> = chosen.iter().map(|p| p.name()).collect();
        if cfg!(feature = "redis") {
            assert_eq!(chosen, ["memory", "direct", "redis"]);
            assert!(not_built.is_empty());
        } else {
            assert_eq!(chosen, ["memory", "direct"]);
            assert_eq!(not_built, ["redis"]);
        }
        assert!(parse_transport("carrier-pigeon").is_err());
    }
}
