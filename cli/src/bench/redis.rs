//! The `redis` transport beside raw redis-rs on the same server, with the same strategy
//! and the same bytes.
//!
//! Ours runs two sessions with distinct host ids on one registry, so the selector computes
//! `Remote` and Redis carries everything.
//!
//! - one-way / one-way send (stream path): each send awaits its `XADD` (raw: `XADD` per
//!   message, awaited, on a multiplexed connection); the receiver reads with `XREADGROUP
//!   BLOCK` on a connection of its own and acknowledges each batch with one `XACK`, sent in
//!   the same round trip as the next read (both sides).
//! - ping-pong (stream path): round trips through two streams (raw: the same, with an
//!   echo task reading one stream and appending to the other); p50/p99 in the table.
//! - fan-out (pub/sub one-way): one publisher emitting on a topic, `--fanout` subscribers
//!   in the receiving session (one `PSUBSCRIBE` there, delivered to each). Raw: the same
//!   pipelining as ours (publishes queued to one task that sends whatever is waiting, up
//!   to 512, as one pipeline), one pattern subscription on a RESP3 connection, each
//!   message decoded `--fanout` times; the same bytes (publisher header + envelope).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use redis::{PushKind, Value};
use switchyard::redis::{RedisConfig, RedisTransport, RedisTransportConfig};
use switchyard::{Address, Envelope, Location, Name, Payload};
use tokio::sync::mpsc;

use super::measure::{BenchError, BenchMsg, BenchResult, Probe, RunConfig, Sample};
use super::ours::{self, Deployment, finish, produce};
use super::provider::{Provider, Side, Workload};

/// The Redis transport between two "hosts" of this process.
pub struct Redis;

/// Publishes the raw publisher pipelines at most, as ours does.
const PUBLISH_BATCH: usize = 512;
/// Entries read at once, as ours does.
const READ_COUNT: usize = 256;

fn unique() -> String {
    use std::hash::{BuildHasher, RandomState};
    let r = RandomState::new().hash_one(std::time::Instant::now());
    format!("{}-{r:x}", std::process::id())
}

impl Redis {
    async fn deployment(&self) -> BenchResult<Deployment> {
        let ns = format!("sy-bench-{}", unique());
        let session =
            |t: &RedisTransport, host: &str, reg: Option<Arc<dyn switchyard::Registry>>| {
                let mut b = switchyard::builder()
                    .selector(|s| s.prefer(Location::Remote, ["redis"]))
                    .redis(t)
                    .session(|s| s.heartbeat_interval(None).host_id(host.to_string()));
                if let Some(r) = reg {
                    b = b.session(move |s| s.registry(r));
                }
                b.build()
            };
        let a = RedisTransport::connect(RedisTransportConfig::from_env().namespace(&ns)).await?;
        let b = RedisTransport::connect(RedisTransportConfig::from_env().namespace(&ns)).await?;
        let senders = session(&a, "bench-host-a", None)?;
        let receivers = session(&b, "bench-host-b", Some(senders.registry().clone()))?;
        Ok(Deployment {
            senders,
            receivers: Some(receivers),
            context: None,
        })
    }
}

impl Provider for Redis {
    fn name(&self) -> &'static str {
        "redis"
    }
    fn baseline(&self) -> &'static str {
        "raw redis-rs, same server: XADD awaited per message, XREADGROUP with each batch's XACK pipelined \
         before the next read (streams); PUBLISH pipelined by one task as ours, PSUBSCRIBE on RESP3 (pub/sub); same bytes"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async {
            let cfg = RedisConfig::from_env();
            match RedisTransport::connect(
                RedisTransportConfig::new(cfg.clone()).outage_wait(Duration::from_secs(1)),
            )
            .await
            {
                Ok(t) => {
                    use switchyard::transport::Transport;
                    t.close();
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        })
    }
    fn supports(&self, w: Workload) -> Result<(), &'static str> {
        let _ = w;
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
                    let dep = self.deployment().await?;
                    let r = match w {
                        Workload::OneWay => ours::oneway(&dep, cfg, true).await,
                        Workload::OneWaySend => ours::oneway(&dep, cfg, false).await,
                        Workload::PingPong => ours::pingpong(&dep, cfg).await,
                        Workload::FanOut => ours::fanout(&dep, cfg).await,
                        Workload::AnyOfType => ours::any_of_type(&dep, cfg).await,
                    };
                    dep.senders.shutdown();
                    if let Some(r) = &dep.receivers {
                        r.shutdown();
                    }
                    r
                }
                Side::Raw => match w {
                    Workload::OneWay | Workload::OneWaySend => raw_oneway(cfg).await,
                    Workload::PingPong => raw_pingpong(cfg).await,
                    Workload::FanOut => raw_fanout(cfg, cfg.fanout.max(1)).await,
                    Workload::AnyOfType => raw_any_of_type(cfg, cfg.workers.max(1)).await,
                },
            }
        })
    }
}

/// The envelope our transport sends for `m` to `target`: the same bytes on both sides.
fn body(m: &BenchMsg, target: Address) -> BenchResult<Vec<u8>> {
    let env = Envelope::new(
        m.seq,
        "source".into(),
        target,
        Name::new("BENCH"),
        Payload::new(m.clone()),
    );
    Ok(env.encode()?)
}

fn read(body: &[u8]) -> Option<BenchMsg> {
    Envelope::decode(body).ok()?.payload.read::<BenchMsg>().ok()
}

async fn connect(resp3: bool) -> BenchResult<MultiplexedConnection> {
    Ok(client(resp3)?.get_multiplexed_async_connection().await?)
}

fn client(resp3: bool) -> BenchResult<redis::Client> {
    let url = RedisConfig::from_env().url;
    let url = if resp3 {
        format!("{}?protocol=resp3", url.trim_end_matches('/'))
    } else {
        url
    };
    Ok(redis::Client::open(url)?)
}

/// A connection without a response timeout, for blocking reads.
async fn blocking_connection() -> BenchResult<MultiplexedConnection> {
    let cfg = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    Ok(client(false)?
        .get_multiplexed_async_connection_with_config(&cfg)
        .await?)
}

/// Reads `stream` through a consumer group, handing each entry's envelope to `f`, and
/// acknowledges each batch with one XACK after it was handled.
async fn raw_reader(
    stream: String,
    mut f: impl FnMut(&[u8]) + Send + 'static,
) -> BenchResult<tokio::task::JoinHandle<()>> {
    let mut c = blocking_connection().await?;
    let _: Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut c)
        .await?;
    Ok(tokio::spawn(async move {
        // Acknowledged in the same round trip as the next read, as ours does.
        let mut ids: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut pipe = redis::pipe();
            if !ids.is_empty() {
                pipe.cmd("XACK").arg(&stream).arg("g").arg(&ids).ignore();
            }
            pipe.cmd("XREADGROUP")
                .arg("GROUP")
                .arg("g")
                .arg("c")
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(2000)
                .arg("STREAMS")
                .arg(&stream)
                .arg(">");
            let r: redis::RedisResult<Vec<Value>> = pipe.query_async(&mut c).await;
            let Ok(mut v) = r else { return };
            ids.clear();
            for (id, body) in entries(v.pop().unwrap_or(Value::Nil)) {
                f(&body);
                ids.push(id);
            }
        }
    }))
}

/// `(id, e field)` of every entry of an XREADGROUP reply (one stream).
fn entries(v: Value) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let streams = match v {
        Value::Array(a) => a,
        Value::Map(m) => m.into_iter().map(|(_, v)| v).collect(),
        _ => return out,
    };
    for s in streams {
        let list = match s {
            Value::Array(mut kv) if kv.len() == 2 && matches!(kv[1], Value::Array(_)) => {
                kv.swap_remove(1)
            }
            other => other,
        };
        let Value::Array(items) = list else { continue };
        for item in items {
            let Value::Array(mut parts) = item else {
                continue;
            };
            if parts.len() < 2 {
                continue;
            }
            let (Value::Array(fields), Value::BulkString(id)) =
                (parts.swap_remove(1), parts.swap_remove(0))
            else {
                continue;
            };
            let mut it = fields.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let (Value::BulkString(k), Value::BulkString(v)) = (k, v)
                    && k == b"e"
                {
                    out.push((id.clone(), v));
                }
            }
        }
    }
    out
}

async fn xadd(c: &mut MultiplexedConnection, stream: &str, body: &[u8]) -> BenchResult<()> {
    let id: Option<String> = redis::cmd("XADD")
        .arg(stream)
        .arg("NOMKSTREAM")
        .arg("MAXLEN")
        .arg("~")
        .arg(100_000)
        .arg("*")
        .arg("e")
        .arg(body)
        .query_async(c)
        .await?;
    id.map(drop).ok_or_else(|| "the raw stream is gone".into())
}

async fn raw_oneway(cfg: &RunConfig) -> BenchResult<Sample> {
    let stream = format!("sy-raw-{}", unique());
    let probe = Probe::new(1, cfg)?;
    let p = probe.clone();
    let reader = raw_reader(stream.clone(), move |b| {
        if let Some(m) = read(b) {
            p.received(0, &m);
        }
    })
    .await?;
    let mut c = connect(false).await?;
    let clock = probe.start_clock();
    let (mut pc, s) = (c.clone(), stream.clone());
    let producer = produce!(probe, |msg| {
        xadd(&mut pc, &s, &body(&msg, Address::Machine("sink".into()))?).await?
    });
    let r = finish(&probe, clock, producer, 1).await;
    reader.abort();
    let _: Value = redis::cmd("DEL").arg(&stream).query_async(&mut c).await?;
    r
}

/// One stream per worker, each read by its own consumer; the producer adds to them in turn
/// (ours: one inbox stream per worker machine, picked round-robin by `send_to_any_of_type`).
async fn raw_any_of_type(cfg: &RunConfig, n: usize) -> BenchResult<Sample> {
    let tag = unique();
    let streams: Vec<String> = (0..n).map(|i| format!("sy-raw-any-{tag}-{i}")).collect();
    let probe = Probe::new(n, cfg)?;
    let mut readers = Vec::with_capacity(n);
    for (i, stream) in streams.iter().enumerate() {
        let p = probe.clone();
        readers.push(
            raw_reader(stream.clone(), move |b| {
                if let Some(m) = read(b) {
                    p.received(i, &m);
                }
            })
            .await?,
        );
    }
    let mut c = connect(false).await?;
    let clock = probe.start_clock();
    let (mut pc, ss) = (c.clone(), streams.clone());
    let mut next = 0usize;
    let producer = produce!(probe, |msg| {
        let i = next;
        next = (next + 1) % ss.len();
        xadd(
            &mut pc,
            &ss[i],
            &body(&msg, Address::AnyOfType("BenchWorker".into()))?,
        )
        .await?
    });
    let r = finish(&probe, clock, producer, 1).await;
    for reader in readers {
        reader.abort();
    }
    for stream in &streams {
        let _: Value = redis::cmd("DEL").arg(stream).query_async(&mut c).await?;
    }
    r
}

async fn raw_pingpong(cfg: &RunConfig) -> BenchResult<Sample> {
    let tag = unique();
    let (ping_s, pong_s) = (format!("sy-raw-ping-{tag}"), format!("sy-raw-pong-{tag}"));
    // The ponger appends each ping's envelope to the pong stream.
    let (tx_ping, mut rx_ping) = mpsc::unbounded_channel::<Vec<u8>>();
    let ponger_feed = raw_reader(ping_s.clone(), move |b| {
        let _ = tx_ping.send(b.to_vec());
    })
    .await?;
    let (tx_pong, mut rx_pong) = mpsc::unbounded_channel::<Vec<u8>>();
    let pinger_feed = raw_reader(pong_s.clone(), move |b| {
        let _ = tx_pong.send(b.to_vec());
    })
    .await?;
    let mut c = connect(false).await?;
    let (mut pc, ps) = (c.clone(), pong_s.clone());
    let ponger = tokio::spawn(async move {
        while let Some(body) = rx_ping.recv().await {
            if xadd(&mut pc, &ps, &body).await.is_err() {
                break;
            }
        }
    });
    let probe = Probe::new(1, cfg)?;
    let clock = probe.start_clock();
    let p = probe.clone();
    let (mut ic, is) = (c.clone(), ping_s.clone());
    let pinger = tokio::spawn(async move {
        let cfg = p.cfg();
        let mut seq = 0u64;
        let mut intended = cfg.now_ns();
        while !p.stopped() {
            let b = body(
                &cfg.msg_at(seq, intended),
                Address::Machine("ponger".into()),
            )?;
            xadd(&mut ic, &is, &b).await?;
            let back = rx_pong.recv().await.ok_or("the raw ponger stopped")?;
            let m = read(&back).ok_or("a malformed pong")?;
            intended = cfg.now_ns();
            p.round_trip(0, intended.saturating_sub(m.stamp_ns));
            seq += 1;
        }
        Ok::<u64, BenchError>(0)
    });
    let r = finish(&probe, clock, pinger, 0).await;
    ponger.abort();
    ponger_feed.abort();
    pinger_feed.abort();
    let _: Value = redis::cmd("DEL")
        .arg(&ping_s)
        .arg(&pong_s)
        .query_async(&mut c)
        .await?;
    r
}

/// One publishing task pipelining whatever is queued (up to [`PUBLISH_BATCH`]), as ours.
fn raw_publisher(
    mut c: MultiplexedConnection,
) -> (mpsc::Sender<(String, Vec<u8>)>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<(String, Vec<u8>)>(4096);
    let task = tokio::spawn(async move {
        let mut batch = Vec::new();
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < PUBLISH_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let mut pipe = redis::pipe();
            for (ch, body) in batch.drain(..) {
                pipe.cmd("PUBLISH").arg(ch).arg(body);
            }
            if pipe.query_async::<Vec<i64>>(&mut c).await.is_err() {
                return;
            }
        }
    });
    (tx, task)
}

async fn raw_fanout(cfg: &RunConfig, n: usize) -> BenchResult<Sample> {
    let probe = Probe::new(n, cfg)?;
    let channel = format!("sy-raw-{}:t:bench.fanout", unique());
    let (push_tx, mut pushes) = mpsc::unbounded_channel();
    let mut sub = client(true)?
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_push_sender(push_tx),
        )
        .await?;
    // The same kind of subscription as ours: a pattern (here matching exactly the channel).
    sub.psubscribe(&channel).await?;
    let p = probe.clone();
    let consumer = tokio::spawn(async move {
        while let Some(push) = pushes.recv().await {
            if push.kind != PushKind::PMessage {
                continue;
            }
            let Some(Value::BulkString(payload)) = push.data.into_iter().nth(2) else {
                continue;
            };
            // Skip the publisher header as ours does, then decode for each subscriber.
            let mut cursor = std::io::Cursor::new(&payload[..]);
            let header: Result<(u8, String, String, u8, u8), _> =
                serde::Deserialize::deserialize(&mut rmp_serde::Deserializer::new(&mut cursor));
            if header.is_err() {
                continue;
            }
            let at = cursor.position() as usize;
            for i in 0..n {
                if let Some(m) = read(&payload[at..]) {
                    p.received(i, &m);
                }
            }
        }
    });
    let (tx, publisher) = raw_publisher(connect(false).await?);
    let header = rmp_serde::to_vec(&(1u8, "bench-host-a", "bench-process", 3u8, 3u8))?;
    let clock = probe.start_clock();
    let ch = channel.clone();
    let producer = produce!(probe, |msg| {
        let mut b = header.clone();
        b.extend_from_slice(&body(&msg, Address::Topic("bench.fanout".into()))?);
        tx.send((ch.clone(), b))
            .await
            .map_err(|_| "the raw publisher stopped")?
    });
    let r = finish(&probe, clock, producer, n as u64).await;
    consumer.abort();
    publisher.abort();
    drop(sub);
    r
}
