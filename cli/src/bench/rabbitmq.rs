//! The `rabbitmq` transport beside raw lapin on the same broker, with the same strategy:
//! every publish `mandatory` and awaited until the broker confirms it, manual acks sent
//! (several at once) after the message was handled, the same prefetch, the same body
//! (the envelope our transport would send, so both carry the same bytes). Fast mode
//! (transient) and durable mode (durable queue, persistent messages) are two providers.
//!
//! Ours runs two sessions with distinct host ids on one registry, so the selector
//! computes `Remote` and the broker carries everything. Fan-out: ours publishes to the
//! topic exchange and the receiving session hands each message to its N subscribers; raw
//! lapin publishes to a topic exchange bound to one queue whose consumer counts each
//! message N times. Any-of-type: ours picks one of N workers per send; raw lapin
//! publishes to one queue whose consumer hands messages to N buckets in turn.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use switchyard::rabbitmq::{Mode, RabbitConfig, RabbitTransport, broker_answers};
use switchyard::{Address, Envelope, Location, Name, Payload};

use super::measure::{BenchMsg, BenchResult, Probe, RunConfig, Sample};
use super::ours::{self, Deployment, finish};
use super::provider::{Provider, Side, Workload};

/// The prefetch both sides use.
const PREFETCH: u16 = 256;

/// RabbitMQ in one mode.
pub struct Rabbit {
    /// Durable queues and persistent messages.
    pub durable: bool,
}

impl Rabbit {
    fn mode(&self) -> Mode {
        if self.durable {
            Mode::Durable
        } else {
            Mode::Fast
        }
    }

    fn config(&self, ns: &str) -> RabbitConfig {
        RabbitConfig::from_env()
            .namespace(ns)
            .mode(self.mode())
            .prefetch(PREFETCH)
    }

    async fn deployment(&self) -> BenchResult<Deployment> {
        let ns = format!("sy-bench-{}-{:x}", std::process::id(), fastrand_u64());
        let session =
            |t: &RabbitTransport, host: &str, reg: Option<Arc<dyn switchyard::Registry>>| {
                let mut b = switchyard::builder()
                    .selector(|s| s.prefer(Location::Remote, ["rabbitmq"]))
                    .rabbitmq(t)
                    .session(|s| s.heartbeat_interval(None).host_id(host.to_string()));
                if let Some(r) = reg {
                    b = b.session(move |s| s.registry(r));
                }
                b.build()
            };
        let a = RabbitTransport::connect(self.config(&ns)).await?;
        let b = RabbitTransport::connect(self.config(&ns)).await?;
        let senders = session(&a, "bench-host-a", None)?;
        let receivers = session(&b, "bench-host-b", Some(senders.registry().clone()))?;
        Ok(Deployment {
            senders,
            receivers: Some(receivers),
            context: None,
        })
    }
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::Instant::now())
}

impl Provider for Rabbit {
    fn name(&self) -> &'static str {
        if self.durable {
            "rabbitmq-durable"
        } else {
            "rabbitmq"
        }
    }
    fn baseline(&self) -> &'static str {
        "raw lapin, same broker: mandatory publishes awaited for their confirm, batched manual acks, same prefetch and body"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async {
            let cfg = RabbitConfig::from_env();
            if broker_answers(&cfg, Duration::from_secs(1)) {
                Ok(())
            } else {
                Err(format!("no RabbitMQ answers at {}", cfg.redacted_url()))
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
                    Workload::OneWay | Workload::OneWaySend => {
                        raw_oneway(self.durable, cfg, 1).await
                    }
                    Workload::AnyOfType => raw_oneway(self.durable, cfg, cfg.workers.max(1)).await,
                    Workload::FanOut => raw_fanout(self.durable, cfg, cfg.fanout.max(1)).await,
                    Workload::PingPong => raw_pingpong(self.durable, cfg).await,
                },
            }
        })
    }
}

/// The body our transport sends for `m`: the same bytes on both sides.
fn body(m: &BenchMsg) -> BenchResult<Vec<u8>> {
    let env = Envelope::new(
        m.seq,
        "source".into(),
        Address::Machine("sink".into()),
        Name::new("BENCH"),
        Payload::new(m.clone()),
    );
    Ok(env.encode()?)
}

fn read(body: &[u8]) -> Option<BenchMsg> {
    Envelope::decode(body).ok()?.payload.read::<BenchMsg>().ok()
}

struct RawSide {
    conn: Connection,
    publish: Channel,
    consume: Channel,
}

async fn raw_connect(durable: bool, queues: &[&str]) -> BenchResult<RawSide> {
    let url = RabbitConfig::from_env().url;
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .map_err(|e| format!("raw lapin cannot connect: {e}"))?;
    let publish = conn.create_channel().await.map_err(|e| e.to_string())?;
    publish
        .confirm_select(Default::default())
        .await
        .map_err(|e| e.to_string())?;
    let consume = conn.create_channel().await.map_err(|e| e.to_string())?;
    consume
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    for q in queues {
        consume
            .queue_declare(
                (*q).into(),
                QueueDeclareOptions {
                    durable,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(RawSide {
        conn,
        publish,
        consume,
    })
}

fn props(durable: bool) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/msgpack".into())
        .with_delivery_mode(if durable { 2 } else { 1 })
}

async fn publish_confirmed(
    ch: &Channel,
    queue: &str,
    body: &[u8],
    durable: bool,
) -> BenchResult<()> {
    publish_to(ch, "", queue, body, durable).await
}

async fn publish_to(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    durable: bool,
) -> BenchResult<()> {
    let c = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            props(durable),
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    if c.take_message().is_some() {
        return Err("raw publish returned unroutable".into());
    }
    Ok(())
}

/// Consumes `queue`, calling `f` on each message, acking (several at once) after it.
fn raw_consumer(
    ch: Channel,
    queue: String,
    mut f: impl FnMut(&[u8]) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut consumer) = ch
            .basic_consume(
                queue.as_str().into(),
                "raw-bench".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        else {
            return;
        };
        let mut last = None;
        let mut unacked = 0;
        loop {
            use futures_util::FutureExt;
            let next = match consumer.next().now_or_never() {
                Some(n) => n,
                None => {
                    if let Some(d) = last.take() {
                        ack(&d).await;
                        unacked = 0;
                    }
                    consumer.next().await
                }
            };
            let Some(Ok(d)) = next else { break };
            f(&d.data);
            last = Some(d);
            unacked += 1;
            if unacked >= 64
                && let Some(d) = last.take()
            {
                ack(&d).await;
                unacked = 0;
            }
        }
    })
}

async fn ack(d: &lapin::message::Delivery) {
    let _ = d.acker.ack(BasicAckOptions { multiple: true }).await;
}

/// One queue; its consumer hands messages to `buckets` receivers in turn.
async fn raw_oneway(durable: bool, cfg: &RunConfig, buckets: usize) -> BenchResult<Sample> {
    let q = format!("sy-raw-{}-{:x}", std::process::id(), fastrand_u64());
    let side = raw_connect(durable, &[&q]).await?;
    let probe = Probe::new(buckets, cfg)?;
    let p = probe.clone();
    let mut next = 0;
    let consumer = raw_consumer(side.consume.clone(), q.clone(), move |b| {
        if let Some(m) = read(b) {
            p.received(next, &m);
            next = (next + 1) % buckets;
        }
    });
    let clock = probe.start_clock();
    let (ch, queue) = (side.publish.clone(), q.clone());
    let producer = super::ours::produce!(probe, |msg| {
        publish_confirmed(&ch, &queue, &body(&msg)?, durable).await?
    });
    let r = finish(&probe, clock, producer, 1).await;
    let _ = side
        .consume
        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = side.conn.close(200, "done".into()).await;
    consumer.abort();
    r
}

/// A topic exchange bound to one queue; its consumer counts each message for `n` subscribers.
async fn raw_fanout(durable: bool, cfg: &RunConfig, n: usize) -> BenchResult<Sample> {
    let tag = format!("{}-{:x}", std::process::id(), fastrand_u64());
    let (ex, q) = (format!("sy-raw-topics-{tag}"), format!("sy-raw-fan-{tag}"));
    let side = raw_connect(durable, &[&q]).await?;
    side.consume
        .exchange_declare(
            ex.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    side.consume
        .queue_bind(
            q.as_str().into(),
            ex.as_str().into(),
            "bench.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let probe = Probe::new(n, cfg)?;
    let p = probe.clone();
    let consumer = raw_consumer(side.consume.clone(), q.clone(), move |b| {
        if let Some(m) = read(b) {
            for i in 0..n {
                p.received(i, &m);
            }
        }
    });
    let clock = probe.start_clock();
    let (ch, exchange) = (side.publish.clone(), ex.clone());
    let producer = super::ours::produce!(probe, |msg| {
        publish_to(&ch, &exchange, "bench.fanout", &body(&msg)?, durable).await?
    });
    let r = finish(&probe, clock, producer, n as u64).await;
    let _ = side
        .consume
        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = side
        .consume
        .exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = side.conn.close(200, "done".into()).await;
    consumer.abort();
    r
}

async fn raw_pingpong(durable: bool, cfg: &RunConfig) -> BenchResult<Sample> {
    let tag = format!("{}-{:x}", std::process::id(), fastrand_u64());
    let (ping_q, pong_q) = (format!("sy-raw-ping-{tag}"), format!("sy-raw-pong-{tag}"));
    let a = raw_connect(durable, &[&ping_q, &pong_q]).await?;
    let b = raw_connect(durable, &[]).await?;
    // The ponger answers each ping with the same body (confirmed publish, then ack).
    let (pong_pub, pq) = (b.publish.clone(), pong_q.clone());
    let (tx_ping, mut rx_ping) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let ponger_feed = raw_consumer(b.consume.clone(), ping_q.clone(), move |body| {
        let _ = tx_ping.send(body.to_vec());
    });
    let ponger = tokio::spawn(async move {
        while let Some(body) = rx_ping.recv().await {
            if publish_confirmed(&pong_pub, &pq, &body, durable)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let (tx_pong, mut rx_pong) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let pinger_feed = raw_consumer(a.consume.clone(), pong_q.clone(), move |body| {
        let _ = tx_pong.send(body.to_vec());
    });
    let probe = Probe::new(1, cfg)?;
    let clock = probe.start_clock();
    let p = probe.clone();
    let (ping_pub, q) = (a.publish.clone(), ping_q.clone());
    let pinger = tokio::spawn(async move {
        let cfg = p.cfg();
        let mut seq = 0u64;
        let mut intended = cfg.now_ns();
        while !p.stopped() {
            publish_confirmed(&ping_pub, &q, &body(&cfg.msg_at(seq, intended))?, durable).await?;
            let back = rx_pong.recv().await.ok_or("the raw ponger stopped")?;
            let m = read(&back).ok_or("a malformed pong")?;
            intended = cfg.now_ns();
            p.round_trip(0, intended.saturating_sub(m.stamp_ns));
            seq += 1;
        }
        Ok(0)
    });
    let r = finish(&probe, clock, pinger, 0).await;
    for q in [&ping_q, &pong_q] {
        let _ = a
            .consume
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = a.conn.close(200, "done".into()).await;
    let _ = b.conn.close(200, "done".into()).await;
    ponger.abort();
    ponger_feed.abort();
    pinger_feed.abort();
    r
}
