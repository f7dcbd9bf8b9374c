//! The `ipc` transport (same host, other process) beside a raw unix socket with the same framing.
//!
//! Ours runs on a bus daemon started in-process on a fresh socket; raw is tokio
//! unix sockets carrying the same frames (`len: u32 BE`, `kind: u8`, body) with
//! the same `BenchMsg` MessagePack-encoded and decoded at each end, padded to
//! the byte size of our `SEND` frame for that message.
//!
//! Ping-pong crosses a real process boundary on both sides: the ponger (ours)
//! or the echo (raw) is this binary started again as a helper, so each round
//! trip pays the wake-ups of two processes. The throughput workloads keep both
//! ends in this process, where the window and the counters are: two sessions
//! (each its own process instance, so `SameMachine`) with their own
//! connections to the daemon, against unix socket pairs.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::future::BoxFuture;
use switchyard::ipc::frame::{self, kind};
use switchyard::ipc::{Daemon, DaemonConfig, DaemonHandle, IpcBus, IpcConfig};
use switchyard::{Address, Envelope, MachineId, Payload};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

use super::helper::{Helper, READY, until_parent_leaves};
use super::measure::{BenchError, BenchMsg, BenchResult, Probe, RunConfig, Sample};
use super::ours::{self, Deployment, finish};
use super::provider::{Provider, Side, Workload};

/// Bytes the raw writer gathers before one `write`; the transport's writer also drains its queue into one write.
const RAW_BATCH: usize = 64 * 1024;

/// The ipc transport, through the bus daemon or peer-to-peer.
pub struct Ipc {
    /// Peer-to-peer mode (sends go straight to the other process; the daemon only resolves).
    pub p2p: bool,
}

fn temp_socket(prefix: &str) -> PathBuf {
    switchyard::ipc::unique_socket_path(&std::env::temp_dir(), prefix)
}

fn start_daemon() -> Result<DaemonHandle, String> {
    let socket = temp_socket("switchyard-bench");
    Daemon::start(DaemonConfig::new(&socket))
        .map_err(|e| format!("cannot start a bus daemon on {}: {e}", socket.display()))
}

/// The two sessions of an ipc run, and what keeps them connected.
struct IpcRun {
    dep: Deployment,
    buses: [IpcBus; 2],
    daemon: DaemonHandle,
}

impl IpcRun {
    async fn start(p2p: bool) -> BenchResult<IpcRun> {
        let daemon = start_daemon()?;
        let config = |id: &str| {
            let c = IpcConfig::new(daemon.socket()).client_id(id);
            if p2p { c.peer_to_peer() } else { c }
        };
        let a = IpcBus::connect(config("bench-senders"))?;
        let b = IpcBus::connect(config("bench-receivers"))?;
        let dep = Deployment {
            senders: ipc_session(&a)?,
            receivers: Some(ipc_session(&b)?),
            context: None,
        };
        Ok(IpcRun {
            dep,
            buses: [a, b],
            daemon,
        })
    }

    async fn stop(self) {
        self.dep.senders.shutdown();
        if let Some(r) = &self.dep.receivers {
            r.shutdown();
        }
        for b in &self.buses {
            b.close();
        }
        self.daemon.shutdown().await;
    }
}

impl Provider for Ipc {
    fn name(&self) -> &'static str {
        if self.p2p { "ipc-p2p" } else { "ipc" }
    }
    fn baseline(&self) -> &'static str {
        "tokio unix socket, same length-prefixed frames, padded to our frame size"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async {
            let d = start_daemon()?;
            d.shutdown().await;
            Ok(())
        })
    }
    fn supports(&self, _w: Workload) -> Result<(), &'static str> {
        Ok(())
    }
    fn run<'a>(
        &'a self,
        side: Side,
        w: Workload,
        cfg: &'a RunConfig,
    ) -> BoxFuture<'a, BenchResult<Sample>> {
        Box::pin(async move {
            match side {
                Side::Ours => {
                    if w == Workload::PingPong {
                        return pingpong_two_processes(self.p2p, cfg).await;
                    }
                    let run = IpcRun::start(self.p2p).await?;
                    let r = match w {
                        Workload::OneWay => ours::oneway(&run.dep, cfg, true).await,
                        Workload::OneWaySend => ours::oneway(&run.dep, cfg, false).await,
                        Workload::PingPong => ours::pingpong(&run.dep, cfg).await,
                        Workload::FanOut => ours::fanout(&run.dep, cfg).await,
                        Workload::AnyOfType => ours::any_of_type(&run.dep, cfg).await,
                    };
                    run.stop().await;
                    r
                }
                Side::Raw => match w {
                    Workload::OneWay | Workload::OneWaySend => raw_sockets(cfg, 1, false).await,
                    Workload::FanOut => raw_sockets(cfg, cfg.fanout.max(1), true).await,
                    Workload::AnyOfType => raw_sockets(cfg, cfg.workers.max(1), false).await,
                    Workload::PingPong => raw_pingpong(cfg).await,
                },
            }
        })
    }
}

/// How raw frames are made: the message, then padding up to the size of our `SEND` frame.
///
/// Raw and ours then move the same bytes per message, so the ratio measures what
/// Switchyard does per message (envelope, routing, registry), not a byte-count gap.
#[derive(Clone, Copy)]
struct RawCodec {
    frame_len: usize,
}

impl RawCodec {
    /// Frames as long as the ipc `SEND` frame that carries `cfg`'s message from `source` to `sink`.
    fn like_ours(cfg: &RunConfig) -> RawCodec {
        let env = Envelope::new(
            u64::MAX >> 8,
            "source".into(),
            Address::Machine("sink".into()),
            "E".into(),
            Payload::new(cfg.msg_at(u64::MAX >> 8, u64::MAX >> 8)),
        );
        let mut buf = Vec::new();
        let frame_len = match frame::write_send(&mut buf, usize::MAX, "sink", &env) {
            Ok(()) => buf.len(),
            Err(_) => 0,
        };
        RawCodec { frame_len }
    }

    /// Appends one frame: `len`, `kind`, `msg_len: u32 BE`, the MessagePack message, padding.
    fn encode(self, buf: &mut Vec<u8>, msg: &BenchMsg) -> BenchResult<()> {
        let start = buf.len();
        frame::write_frame(buf, kind::SEND, usize::MAX, |b| {
            let at = b.len();
            b.extend_from_slice(&[0; 4]);
            rmp_serde::encode::write_named(b, msg)
                .map_err(|e| switchyard::Error::Encode(e.to_string()))?;
            let msg_len = (b.len() - at - 4) as u32;
            b[at..at + 4].copy_from_slice(&msg_len.to_be_bytes());
            if b.len() - start < self.frame_len {
                b.resize(start + self.frame_len, 0);
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Decodes a frame body (after the kind byte).
    fn decode(body: &[u8]) -> BenchResult<BenchMsg> {
        let len_bytes: [u8; 4] = body
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or("a raw frame is too short")?;
        let msg_len = u32::from_be_bytes(len_bytes) as usize;
        let msg = body
            .get(4..4 + msg_len)
            .ok_or("a raw frame is shorter than its message")?;
        Ok(rmp_serde::from_slice(msg).map_err(|e| format!("a raw frame does not decode: {e}"))?)
    }
}

/// Reads frames and hands each decoded message to `on_msg`, until the peer closes.
async fn read_frames(
    mut rd: OwnedReadHalf,
    mut on_msg: impl FnMut(BenchMsg) + Send,
) -> BenchResult<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(RAW_BATCH * 2);
    let mut start = 0usize;
    let mut chunk = vec![0u8; RAW_BATCH];
    loop {
        // Decode every whole frame already read, then read more.
        while buf.len() - start >= frame::HEADER_LEN {
            let len_bytes: [u8; 4] = buf[start..start + 4]
                .try_into()
                .map_err(|_| "short frame header")?;
            let len = u32::from_be_bytes(len_bytes) as usize;
            if len == 0 {
                return Err("a raw frame has length 0".into());
            }
            if buf.len() - start < 4 + len {
                break;
            }
            let body = &buf[start + frame::HEADER_LEN..start + 4 + len];
            let msg = RawCodec::decode(body)?;
            start += 4 + len;
            on_msg(msg);
        }
        buf.drain(..start);
        start = 0;
        let n = rd.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One producer, `n` socket pairs; every message goes to all (`fan_out`) or to one in turn.
async fn raw_sockets(cfg: &RunConfig, n: usize, fan_out: bool) -> BenchResult<Sample> {
    let probe = Probe::new(n, cfg)?;
    let codec = RawCodec::like_ours(cfg);
    let mut writers: Vec<(OwnedWriteHalf, Vec<u8>)> = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n);
    for i in 0..n {
        let (a, b) = UnixStream::pair()?;
        let (_, wr) = a.into_split();
        let (rd, _) = b.into_split();
        writers.push((wr, Vec::with_capacity(RAW_BATCH * 2)));
        let p = probe.clone();
        readers.push(tokio::spawn(read_frames(rd, move |m| p.received(i, &m))));
    }
    let clock = probe.start_clock();
    let p = probe.clone();
    let producer = tokio::spawn(async move {
        let mut seq = 0u64;
        let mut next = 0usize;
        let mut frame_buf = Vec::with_capacity(64);
        let start = p.cfg().now_ns();
        // At an offered rate nothing else is coming right away, so each frame is written at once.
        let batch = if p.cfg().rate.is_some() { 1 } else { RAW_BATCH };
        while !p.stopped() {
            let msg = p.cfg().next_msg(seq, start).await;
            frame_buf.clear();
            codec.encode(&mut frame_buf, &msg)?;
            let targets = if fan_out {
                0..writers.len()
            } else {
                next..next + 1
            };
            for (wr, buf) in &mut writers[targets] {
                buf.extend_from_slice(&frame_buf);
                if buf.len() >= batch {
                    wr.write_all(buf).await?;
                    buf.clear();
                }
            }
            next = (next + 1) % writers.len();
            seq += 1;
        }
        for (wr, buf) in &mut writers {
            wr.write_all(buf).await?;
            wr.shutdown().await?;
        }
        Ok::<u64, BenchError>(seq)
    });
    let per_message = if fan_out { n as u64 } else { 1 };
    let r = finish(&probe, clock, producer, per_message).await;
    for rd in readers {
        match rd.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(format!("a raw reader failed: {e}").into()),
        }
    }
    r
}

/// Answers every frame read from `stream` with the same message in a new frame, until the peer closes.
async fn echo_frames(stream: UnixStream, codec: RawCodec) -> BenchResult<()> {
    let (rd, mut wr) = stream.into_split();
    // Buffered, so a whole frame costs one read, as the transport's frame reader does.
    let mut rd = BufReader::new(rd);
    let mut body = Vec::new();
    let mut out = Vec::new();
    loop {
        match read_frame(&mut rd, &mut body).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let m = RawCodec::decode(body.get(1..).unwrap_or_default())?;
        out.clear();
        codec.encode(&mut out, &m)?;
        wr.write_all(&out).await?;
    }
}

/// Reads one frame into `body` (kind byte first).
async fn read_frame(rd: &mut BufReader<OwnedReadHalf>, body: &mut Vec<u8>) -> std::io::Result<()> {
    let mut header = [0u8; 4];
    rd.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 || len > frame::DEFAULT_MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a raw frame of {len} bytes"),
        ));
    }
    body.resize(len, 0);
    rd.read_exact(body).await.map(|_| ())
}

/// Raw round trips to an echo in another process: this binary as `bench --serve-raw-echo`.
async fn raw_pingpong(cfg: &RunConfig) -> BenchResult<Sample> {
    let path = temp_socket("switchyard-bench-raw");
    let size = cfg.size.to_string();
    let mut helper = Helper::start(
        "raw echo process",
        [
            OsStr::new("bench"),
            OsStr::new("--serve-raw-echo"),
            path.as_os_str(),
            OsStr::new("--size"),
            OsStr::new(&size),
        ],
    )
    .await?;
    let r = match UnixStream::connect(&path).await {
        Ok(stream) => raw_pinger(stream, cfg).await,
        Err(e) => Err(format!("cannot connect to the raw echo at {}: {e}", path.display()).into()),
    };
    helper.stop().await;
    let _ = std::fs::remove_file(&path);
    r
}

/// Closed-loop pings over `stream`; each carries its intended send time (when the previous answer came in).
async fn raw_pinger(stream: UnixStream, cfg: &RunConfig) -> BenchResult<Sample> {
    let probe = Probe::new(1, cfg)?;
    let codec = RawCodec::like_ours(cfg);
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let clock = probe.start_clock();
    let p = probe.clone();
    let pinger = tokio::spawn(async move {
        let cfg = p.cfg();
        let mut out = Vec::with_capacity(64);
        let mut body = Vec::new();
        let mut seq = 0u64;
        let mut intended = cfg.now_ns();
        while !p.stopped() {
            out.clear();
            codec.encode(&mut out, &cfg.msg_at(seq, intended))?;
            wr.write_all(&out).await?;
            read_frame(&mut rd, &mut body).await?;
            let back = RawCodec::decode(body.get(1..).unwrap_or_default())?;
            intended = cfg.now_ns();
            p.round_trip(0, intended.saturating_sub(back.stamp_ns));
            seq += 1;
        }
        wr.shutdown().await?;
        Ok::<u64, BenchError>(0)
    });
    finish(&probe, clock, pinger, 0).await
}

/// Our round trips to a ponger in another process: this binary as `bench --serve-ponger`.
async fn pingpong_two_processes(p2p: bool, cfg: &RunConfig) -> BenchResult<Sample> {
    let daemon = start_daemon()?;
    let socket = daemon.socket().to_path_buf();
    let mut config = IpcConfig::new(&socket).client_id("bench-pinger");
    if p2p {
        config = config.peer_to_peer();
    }
    let bus = IpcBus::connect(config)?;
    let dep = Deployment {
        senders: ipc_session(&bus)?,
        receivers: None,
        context: None,
    };
    let mut args = vec![
        OsStr::new("bench"),
        OsStr::new("--serve-ponger"),
        socket.as_os_str(),
    ];
    if p2p {
        args.push(OsStr::new("--p2p"));
    }
    let r = match Helper::start("remote ponger", args).await {
        Ok(mut helper) => {
            let r = ours::pingpong_with(&dep, cfg, MachineId::from("ponger"), None).await;
            helper.stop().await;
            r
        }
        Err(e) => Err(e),
    };
    dep.senders.shutdown();
    bus.close();
    daemon.shutdown().await;
    r
}

/// A session whose only transport is ipc on `bus`.
fn ipc_session(bus: &IpcBus) -> switchyard::Result<switchyard::Session> {
    switchyard::builder()
        .ipc(bus)
        .selector(|s| s.without(["direct", "memory"]))
        .build()
}

/// In the helper process: the ponger, on the bus daemon at `socket`, until the parent leaves.
pub async fn serve_ponger(socket: &Path, p2p: bool) -> BenchResult<()> {
    let mut config = IpcConfig::new(socket).client_id("bench-ponger");
    if p2p {
        config = config.peer_to_peer();
    }
    let bus = IpcBus::connect(config)?;
    let session = ipc_session(&bus)?;
    let _ponger = session
        .machine("ponger", "Ponger")
        .handler(ours::ponger())
        .build()
        .await?;
    say!("{READY}");
    until_parent_leaves().await;
    session.shutdown();
    bus.close();
    Ok(())
}

/// In the helper process: a raw echo on a unix socket at `path`, until the parent leaves.
pub async fn serve_raw_echo(path: &Path, size: usize) -> BenchResult<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let cfg = RunConfig::new(size, Duration::ZERO, Duration::ZERO, 1, 1);
    let codec = RawCodec::like_ours(&cfg);
    say!("{READY}");
    let served = tokio::select! {
        r = async {
            let (stream, _) = listener.accept().await?;
            echo_frames(stream, codec).await
        } => r,
        () = until_parent_leaves() => Ok(()),
    };
    let _ = std::fs::remove_file(path);
    served
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn raw_frames_are_as_long_as_ours_and_decode_back() {
        let cfg = RunConfig::new(64, Duration::ZERO, Duration::ZERO, 1, 1);
        let codec = RawCodec::like_ours(&cfg);
        assert!(
            codec.frame_len > 64 + frame::HEADER_LEN,
            "{}",
            codec.frame_len
        );
        let mut buf = Vec::new();
        codec.encode(&mut buf, &cfg.msg_at(7, 42)).expect("encodes");
        assert_eq!(buf.len(), codec.frame_len);
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        assert_eq!(len + 4, buf.len());
        let back = RawCodec::decode(&buf[frame::HEADER_LEN..]).expect("decodes");
        assert_eq!((back.seq, back.stamp_ns, back.data.len()), (7, 42, 64));
    }

    #[test]
    fn a_truncated_raw_frame_is_an_error() {
        assert!(RawCodec::decode(&[0, 0]).is_err());
        assert!(RawCodec::decode(&[0, 0, 0, 9, 0x80]).is_err());
    }
}
