//! The ipc transport beside a raw unix socket with the same framing, between two real processes.
//!
//! Run: `cargo run --release --example ipc_bench` (options: `-- --events N --pings N --rounds N`;
//! `--only raw|p2p|p2p-batch|bus|bus-batch` runs just that one-way measure, for profiling).
//!
//! The program re-executes itself for the receiving side (sink or echo) and for
//! the bus daemon, so every figure crosses a process boundary as in production.
//! Each round measures, one after the other with the same frame size:
//! - one-way throughput (events received per second at the sink, from the end of a warm-up of
//!   the first tenth to the last event):
//!   raw tokio unix socket through a 64 KiB `BufWriter`, ipc peer-to-peer, ipc through the daemon,
//!   each with one `send` per event (through a declared `Sender`) and with `send_batch` of as many events as fill the raw
//!   source's 64 KiB buffer (348 with the default frame);
//! - closed-loop ping-pong round trips (request/reply for ipc), p50/p99/p99.9 from an HDR histogram.
//!
//! Ratios are ours / raw within the same round. `BENCH_OUTBOX_KIB` overrides the ipc outbox bound,
//! `BENCH_VERBOSE` prints the sender's rate beside the sink's.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_bytes::ByteBuf;
use switchyard::ipc::bench_support::{self as raw, Latency};
use switchyard::ipc::{IpcBus, IpcConfig, unique_socket_path};
use switchyard::{Envelope, EventRef, MachineId, Node, Session};

const ROLE: &str = "SWITCHYARD_BENCH_ROLE";
const PAYLOAD: usize = 64;
static PAYLOAD_BYTES: [u8; PAYLOAD] = [0xa5; PAYLOAD];
/// Bytes the raw source buffers per write; a batched row sends this much per `send_batch` call.
const RAW_BUFFER: usize = 64 * 1024;
const TIMEOUT: Duration = Duration::from_secs(120);

type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> AnyResult<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match std::env::var(ROLE) {
        Ok(role) => rt.block_on(child(&role)),
        Err(_) => rt.block_on(parent()),
    }
}

fn var(k: &str) -> String {
    std::env::var(k).unwrap_or_default()
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

// ---------- receiving side (child processes) ----------

async fn child(role: &str) -> AnyResult<()> {
    let sock = PathBuf::from(var("SOCK"));
    let n: u64 = var("N").parse().unwrap_or(0);
    match role {
        "raw-sink" => {
            let l = raw::raw_listen(&sock)?;
            say("READY");
            let d = raw::raw_sink(l, n).await?;
            say(&format!("RESULT {}", d.as_nanos()));
        }
        "raw-echo" => {
            let l = raw::raw_listen(&sock)?;
            say("READY");
            raw::raw_echo(l).await?;
        }
        "daemon" => {
            let _d = switchyard::ipc::Daemon::start(switchyard::ipc::DaemonConfig::new(&sock))?;
            say("READY");
            wait_stdin_eof().await;
        }
        "ipc-sink" | "ipc-echo" => {
            let (session, _bus) = ipc_session(&sock, var("MODE") == "p2p")?;
            let id = var("ID");
            if role == "ipc-sink" {
                let (tx, rx) = tokio::sync::oneshot::channel::<Duration>();
                let tx = Mutex::new(Some(tx));
                let first = std::sync::OnceLock::<Instant>::new();
                let count = AtomicU64::new(0);
                let warm = raw::warm_up(n);
                let _sink = session
                    .machine(id.as_str(), "Sink")
                    // A borrowed handler: events come straight from the read buffer.
                    .handler_ref(move |_: &Node, ev: EventRef<'_>| {
                        // Counts only well-formed events (like the raw sink counts whole frames).
                        if ev
                            .payload
                            .as_msgpack()
                            .is_none_or(|p| p.len() != PAYLOAD + 2)
                        {
                            return;
                        }
                        // One connection delivers every event in order: no read-modify-write needed.
                        let c = count.load(Ordering::Relaxed) + 1;
                        count.store(c, Ordering::Relaxed);
                        if c >= warm {
                            first.get_or_init(Instant::now);
                        }
                        if c == n
                            && let Some(&t0) = first.get()
                            && let Some(tx) = tx.lock().unwrap_or_else(|p| p.into_inner()).take()
                        {
                            let _ = tx.send(t0.elapsed());
                        }
                    })
                    .build()
                    .await?;
                say("READY");
                let d = rx.await?;
                say(&format!("RESULT {}", d.as_nanos()));
            } else {
                let _echo = session
                    .machine(id.as_str(), "Echo")
                    .handler(|node: &Node, ev: Envelope| {
                        // Echo the payload bytes as they came, like the raw echo does.
                        let _ = node.post_reply(&ev, "PONG", ev.payload.clone());
                    })
                    .build()
                    .await?;
                say("READY");
            }
            wait_stdin_eof().await;
        }
        other => return Err(format!("unknown role {other}").into()),
    }
    Ok(())
}

async fn wait_stdin_eof() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while std::io::stdin()
            .read_line(&mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            line.clear();
        }
    })
    .await;
}

fn ipc_session(daemon: &Path, p2p: bool) -> AnyResult<(Session, IpcBus)> {
    let mut cfg = IpcConfig::new(daemon);
    if let Some(kib) = std::env::var("BENCH_OUTBOX_KIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        cfg.outbox_limit = kib * 1024;
    }
    let bus = IpcBus::connect(if p2p { cfg.peer_to_peer() } else { cfg })?;
    let s = switchyard::builder().ipc(&bus).build()?;
    Ok((s, bus))
}

// ---------- sending side (this process) ----------

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Proc {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Proc {
    fn start(role: &str, sock: &Path, env: &[(&str, String)]) -> AnyResult<Proc> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.env(ROLE, role)
            .env("SOCK", sock)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let p = Proc { child, lines };
        p.expect("READY")?;
        Ok(p)
    }

    fn expect(&self, prefix: &str) -> AnyResult<String> {
        loop {
            let l = self.lines.recv_timeout(TIMEOUT)?;
            if let Some(rest) = l.strip_prefix(prefix) {
                return Ok(rest.trim().to_string());
            }
        }
    }

    fn result_duration(&self) -> AnyResult<Duration> {
        Ok(Duration::from_nanos(self.expect("RESULT")?.parse()?))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Closing stdin asks the child to exit (so profilers such as callgrind can write
        // their output); one that does not within a second is killed.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Events per second over a one-way run of `n`, after its warm-up.
fn rate(n: u64, d: Duration) -> f64 {
    (n - raw::warm_up(n)) as f64 / d.as_secs_f64().max(1e-9)
}

async fn ipc_throughput(
    tag: &str,
    daemon: &Path,
    sender: &Node,
    p2p: bool,
    n: u64,
    batch: usize,
) -> AnyResult<f64> {
    let id = format!("sink-{tag}");
    let mode = if p2p { "p2p" } else { "bus" };
    let sink = Proc::start(
        "ipc-sink",
        daemon,
        &[
            ("ID", id.clone()),
            ("MODE", mode.into()),
            ("N", n.to_string()),
        ],
    )?;
    // The same constant bytes every time, as the raw source writes one constant frame.
    let payload = serde_bytes::Bytes::new(&PAYLOAD_BYTES);
    let to = MachineId::from(id.as_str());
    let t = Instant::now();
    if batch > 1 {
        let mut left = n;
        while left > 0 {
            let k = left.min(batch as u64);
            sender
                .send_batch(to.clone(), (0..k).map(|_| ("EVENT", payload)))
                .await?;
            left -= k;
        }
    } else {
        // A declared sender: resolved once, then each send goes straight to the connection.
        let declared = sender.sender(to.clone()).await?;
        for _ in 0..n {
            declared.send("EVENT", payload).await?;
        }
    }
    let sent = t.elapsed();
    let got = sink.result_duration()?;
    if std::env::var_os("BENCH_VERBOSE").is_some() {
        println!(
            "  ({tag}: sender {:.0} ev/s, sink {:.0} ev/s)",
            n as f64 / sent.as_secs_f64().max(1e-9),
            rate(n, got)
        );
    }
    Ok(rate(n, got))
}

async fn ipc_pingpong(
    tag: &str,
    daemon: &Path,
    sender: &Node,
    p2p: bool,
    n: u64,
) -> AnyResult<Latency> {
    let id = format!("echo-{tag}");
    let mode = if p2p { "p2p" } else { "bus" };
    let _echo = Proc::start(
        "ipc-echo",
        daemon,
        &[("ID", id.clone()), ("MODE", mode.into())],
    )?;
    let payload = ByteBuf::from(vec![0xa5u8; PAYLOAD]);
    // Warm the route and the connection first.
    for _ in 0..100 {
        sender
            .request(id.as_str(), "PING", payload.clone(), TIMEOUT)
            .await?;
    }
    let mut h = raw::histogram();
    for _ in 0..n {
        let t = Instant::now();
        sender
            .request(id.as_str(), "PING", payload.clone(), TIMEOUT)
            .await?;
        h.saturating_record(t.elapsed().as_nanos() as u64);
    }
    Ok(raw::latency(&h))
}

fn lat(l: &Latency) -> String {
    format!(
        "p50 {:>6.1} us  p99 {:>6.1} us  p99.9 {:>7.1} us  max {:>8.1} us",
        l.p50_us, l.p99_us, l.p999_us, l.max_us
    )
}

async fn parent() -> AnyResult<()> {
    let events = arg("--events", 3_000_000);
    let pings = arg("--pings", 20_000);
    let rounds = arg("--rounds", 2);
    let only = {
        let args: Vec<String> = std::env::args().collect();
        args.iter()
            .position(|a| a == "--only")
            .and_then(|i| args.get(i + 1).cloned())
    };
    let frame = raw::ipc_frame_len(PAYLOAD, "source", "sink-0-p2p", "EVENT");
    // As many events per `send_batch` as the raw source buffers per write.
    let batch = (RAW_BUFFER / frame).max(1);
    // Every socket of the run lives here, so killed children leave nothing behind.
    let guard =
        TempDir(unique_socket_path(&std::env::temp_dir(), "switchyard-bench").with_extension("d"));
    std::fs::create_dir_all(&guard.0)?;
    let dir = guard.0.clone();
    let daemon_sock = unique_socket_path(&dir, "bench-bus");
    let _daemon = Proc::start("daemon", &daemon_sock, &[])?;
    let (_p2p_s, _p2p_bus, p2p_src) = {
        let (s, b) = ipc_session(&daemon_sock, true)?;
        let n = s.machine("source-p2p", "Source").build().await?;
        (s, b, n)
    };
    let (_bus_s, _bus_bus, bus_src) = {
        let (s, b) = ipc_session(&daemon_sock, false)?;
        let n = s.machine("source-bus", "Source").build().await?;
        (s, b, n)
    };
    println!(
        "ipc vs raw unix socket; {PAYLOAD}-byte payload, {frame}-byte frames (raw uses the same), \
         {events} events, {pings} round trips, {} cores, {} build",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let mut ratios: Vec<(String, Vec<f64>)> = [
        "one-way p2p, send".to_string(),
        format!("one-way p2p, send_batch of {batch}"),
        "one-way bus, send".to_string(),
        format!("one-way bus, send_batch of {batch}"),
        "ping-pong p2p p50".to_string(),
        "ping-pong bus p50".to_string(),
    ]
    .into_iter()
    .map(|r| (r, Vec::new()))
    .collect();
    for round in 0..rounds {
        // (label, p2p?, events per send call)
        let one_way = |only: &str| match only {
            "p2p" => Some(("p2p", true, 1)),
            "p2p-batch" => Some(("p2pb", true, batch)),
            "bus" => Some(("bus", false, 1)),
            "bus-batch" => Some(("busb", false, batch)),
            _ => None,
        };
        let run = |tag: &'static str, p2p: bool, batch: usize| {
            let src = if p2p { &p2p_src } else { &bus_src };
            let tag = format!("{round}-{tag}");
            let sock = daemon_sock.clone();
            async move { ipc_throughput(&tag, &sock, src, p2p, events, batch).await }
        };
        if let Some(only) = only.as_deref() {
            // A single one-way run, for profiling one side at a time.
            let tp = if only == "raw" {
                let raw_sock = unique_socket_path(&dir, "bench-raw");
                let sink = Proc::start("raw-sink", &raw_sock, &[("N", events.to_string())])?;
                raw::raw_source(&raw_sock, events, frame).await?;
                rate(events, sink.result_duration()?)
            } else {
                let Some((tag, p2p, batch)) = one_way(only) else {
                    return Err("--only takes raw, p2p, p2p-batch, bus or bus-batch".into());
                };
                run(tag, p2p, batch).await?
            };
            println!("round {round}: one-way ipc {only} {tp:>12.0} ev/s");
            continue;
        }
        let raw_sock = unique_socket_path(&dir, "bench-raw");
        let sink = Proc::start("raw-sink", &raw_sock, &[("N", events.to_string())])?;
        raw::raw_source(&raw_sock, events, frame).await?;
        let raw_tp = rate(events, sink.result_duration()?);
        drop(sink);
        let p2p_tp = run("p2p", true, 1).await?;
        let p2p_batch_tp = run("p2pb", true, batch).await?;
        let bus_tp = run("bus", false, 1).await?;
        let bus_batch_tp = run("busb", false, batch).await?;

        let raw_sock = unique_socket_path(&dir, "bench-raw");
        let echo = Proc::start("raw-echo", &raw_sock, &[])?;
        let raw_pp = raw::raw_ping(&raw_sock, pings, frame).await?;
        drop(echo);
        let p2p_pp =
            ipc_pingpong(&format!("{round}-p2p"), &daemon_sock, &p2p_src, true, pings).await?;
        let bus_pp = ipc_pingpong(
            &format!("{round}-bus"),
            &daemon_sock,
            &bus_src,
            false,
            pings,
        )
        .await?;

        println!("round {round}");
        println!("  one-way   raw        {:>12.0} ev/s", raw_tp);
        println!(
            "  one-way   ipc p2p    {:>12.0} ev/s  ratio {:.3}",
            p2p_tp,
            p2p_tp / raw_tp
        );
        println!(
            "  one-way   ipc p2p    {:>12.0} ev/s  ratio {:.3}  (send_batch of {batch}, one 64 KiB buffer like raw)",
            p2p_batch_tp,
            p2p_batch_tp / raw_tp
        );
        println!(
            "  one-way   ipc bus    {:>12.0} ev/s  ratio {:.3}  (routed by the daemon)",
            bus_tp,
            bus_tp / raw_tp
        );
        println!(
            "  one-way   ipc bus    {:>12.0} ev/s  ratio {:.3}  (routed by the daemon, send_batch of {batch})",
            bus_batch_tp,
            bus_batch_tp / raw_tp
        );
        println!("  ping-pong raw        {}", lat(&raw_pp));
        println!(
            "  ping-pong ipc p2p    {}  p50 ratio {:.2}",
            lat(&p2p_pp),
            p2p_pp.p50_us / raw_pp.p50_us
        );
        println!(
            "  ping-pong ipc bus    {}  p50 ratio {:.2}  (two daemon hops per round trip)",
            lat(&bus_pp),
            bus_pp.p50_us / raw_pp.p50_us
        );
        for (row, v) in ratios.iter_mut().zip([
            p2p_tp / raw_tp,
            p2p_batch_tp / raw_tp,
            bus_tp / raw_tp,
            bus_batch_tp / raw_tp,
            p2p_pp.p50_us / raw_pp.p50_us,
            bus_pp.p50_us / raw_pp.p50_us,
        ]) {
            row.1.push(v);
        }
    }
    if rounds > 1 && only.is_none() {
        // The raw figure alone moves by a third from run to run here: judge the median.
        println!("median ratio to raw over {rounds} rounds (min..max):");
        for (row, mut v) in ratios {
            v.sort_by(f64::total_cmp);
            println!(
                "  {row:<40} {:.2}  ({:.2}..{:.2})",
                v[v.len() / 2],
                v[0],
                v[v.len() - 1]
            );
        }
    }
    Ok(())
}
