//! The `zeromq` transport (other hosts, brokerless) beside the raw `zeromq` crate.
//!
//! Ours: two sessions in this process with distinct host ids sharing one
//! in-process registry, zeromq their only transport, so the selector computes
//! `Remote` and every message crosses a real TCP connection on loopback (the
//! sender's DEALER to the receiver's ROUTER; topics from the sender's PUB to the
//! receiver's SUB). Raw: the same socket types from the `zeromq` crate on
//! loopback, each message the same frames as ours (kind byte, target id, and a
//! body padded to the length of our envelope), decoded at the far end.
//!
//! - one-way / one-way send: DEALER → ROUTER;
//! - ping-pong: DEALER → ROUTER and back on the same connection (raw: an echo task);
//! - fan-out: PUB → one SUB; the receiving process delivers each message to
//!   `--fanout` subscribers (raw: the receiving task decodes it `--fanout` times);
//! - any-of-type: DEALER → ROUTER to `--workers` machines of the receiving process
//!   (raw: counted round-robin over `--workers` buckets).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use switchyard::transport::LocalRegistry;
use switchyard::zeromq::{ZmqConfig, ZmqTransport, codec};
use switchyard::{Address, Envelope, Payload, Registry, Session};
use zeromq::prelude::*;
use zeromq::{DealerSocket, PubSocket, RouterSocket, SubSocket, ZmqMessage};

use super::measure::{BenchError, BenchMsg, BenchResult, Probe, RunConfig, Sample};
use super::ours::{self, Deployment, finish, produce};
use super::provider::{Provider, Side, Workload};

/// The zeromq transport between two "hosts" of this process.
pub struct Zeromq;

impl Provider for Zeromq {
    fn name(&self) -> &'static str {
        "zeromq"
    }
    fn baseline(&self) -> &'static str {
        "zeromq crate, same socket types on loopback tcp, frames padded to our size"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async {
            let mut r = RouterSocket::new();
            r.bind("tcp://127.0.0.1:0")
                .await
                .map(drop)
                .map_err(|e| format!("cannot bind a ROUTER on loopback: {e}"))
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
                    let (dep, zmqs) = two_hosts()?;
                    for z in &zmqs {
                        z.ready().await?;
                    }
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
                    Workload::OneWay | Workload::OneWaySend => raw_oneway(cfg, 1, 1).await,
                    Workload::AnyOfType => raw_oneway(cfg, cfg.workers.max(1), 1).await,
                    Workload::FanOut => raw_fanout(cfg, cfg.fanout.max(1)).await,
                    Workload::PingPong => raw_pingpong(cfg).await,
                },
            }
        })
    }
}

/// Two sessions with distinct host ids on one registry, zeromq their only transport.
fn two_hosts() -> BenchResult<(Deployment, [Arc<ZmqTransport>; 2])> {
    let registry: Arc<dyn Registry> = Arc::new(LocalRegistry::new(Duration::from_secs(60)));
    let host = |name: &str| -> BenchResult<(Session, Arc<ZmqTransport>)> {
        let zmq = ZmqTransport::new(ZmqConfig::default())?;
        let r = registry.clone();
        let s = switchyard::builder()
            .zeromq(&zmq)
            .selector(|s| s.without(["direct", "memory"]))
            .session(|s| {
                s.registry(r)
                    .host_id(name.to_string())
                    .heartbeat_interval(None)
            })
            .build()?;
        Ok((s, zmq))
    };
    let (a, za) = host("bench-host-a")?;
    let (b, zb) = host("bench-host-b")?;
    Ok((
        Deployment {
            senders: a,
            receivers: Some(b),
            context: None,
        },
        [za, zb],
    ))
}

/// Raw frames as long as ours: `[kind, "sink", body]`, the body the MessagePack message
/// behind its length, padded to the length of our envelope of the same message.
#[derive(Clone, Copy)]
struct RawCodec {
    body_len: usize,
}

impl RawCodec {
    fn like_ours(cfg: &RunConfig) -> RawCodec {
        let env = Envelope::new(
            u64::MAX >> 8,
            "source".into(),
            Address::Machine("sink".into()),
            "E".into(),
            Payload::new(cfg.msg_at(u64::MAX >> 8, u64::MAX >> 8)),
        );
        let mut buf = Vec::new();
        let body_len = match codec::write_envelope(&mut buf, &env) {
            Ok(()) => buf.len(),
            Err(_) => 0,
        };
        RawCodec { body_len }
    }

    fn encode(self, msg: &BenchMsg) -> BenchResult<ZmqMessage> {
        let mut b = vec![0u8; 4];
        rmp_serde::encode::write_named(&mut b, msg)
            .map_err(|e| format!("a raw message does not encode: {e}"))?;
        let n = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&n.to_be_bytes());
        if b.len() < self.body_len {
            b.resize(self.body_len, 0);
        }
        let mut m = ZmqMessage::from(Bytes::from_static(&[codec::kind::SEND]));
        m.push_back(Bytes::from_static(b"sink"));
        m.push_back(Bytes::from(b));
        Ok(m)
    }

    fn decode(body: &[u8]) -> BenchResult<BenchMsg> {
        let len: [u8; 4] = body
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or("a raw body is too short")?;
        let n = u32::from_be_bytes(len) as usize;
        let m = body
            .get(4..4 + n)
            .ok_or("a raw body is shorter than its message")?;
        Ok(rmp_serde::from_slice(m).map_err(|e| format!("a raw body does not decode: {e}"))?)
    }
}

async fn router_on_loopback() -> BenchResult<(RouterSocket, String)> {
    let mut r = RouterSocket::new();
    let ep = r.bind("tcp://127.0.0.1:0").await?.to_string();
    Ok((r, ep))
}

/// One DEALER streaming to one ROUTER; the receiving task counts each message in turn into
/// one of `buckets` (workers) `times` times (subscribers).
async fn raw_oneway(cfg: &RunConfig, buckets: usize, times: usize) -> BenchResult<Sample> {
    let probe = Probe::new(buckets * times, cfg)?;
    let codec = RawCodec::like_ours(cfg);
    let (mut router, ep) = router_on_loopback().await?;
    let mut dealer = DealerSocket::new();
    dealer.connect(&ep).await?;
    let p = probe.clone();
    let consumer = tokio::spawn(async move {
        let mut next = 0usize;
        loop {
            let m = router.recv().await?;
            // ROUTER adds the sender's identity in front: [identity, kind, to, body].
            let msg = RawCodec::decode(m.get(3).ok_or("a raw message has no body")?)?;
            for t in 0..times {
                p.received(next * times + t, &msg);
            }
            next = (next + 1) % buckets;
        }
        #[allow(unreachable_code)]
        Ok::<(), BenchError>(())
    });
    let clock = probe.start_clock();
    let producer = produce!(probe, |msg| dealer.send(codec.encode(&msg)?).await?);
    let r = finish(&probe, clock, producer, times as u64).await;
    consumer.abort();
    r
}

/// One PUB, one SUB; the receiving task reads each message for `n` subscribers (each
/// decodes its own, as each of ours does).
async fn raw_fanout(cfg: &RunConfig, n: usize) -> BenchResult<Sample> {
    let probe = Probe::new(n, cfg)?;
    let codec = RawCodec::like_ours(cfg);
    let mut publisher = PubSocket::new();
    let ep = publisher.bind("tcp://127.0.0.1:0").await?.to_string();
    let mut sub = SubSocket::new();
    sub.connect(&ep).await?;
    sub.subscribe("bench.").await?;
    // Wait until the subscription reached the PUB: probes until one arrives (no sleep).
    let mut warm = ZmqMessage::from(Bytes::from_static(b"bench.warm"));
    warm.push_back(Bytes::from_static(b""));
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            publisher.send(warm.clone()).await?;
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(20), sub.recv()).await {
                return Ok::<(), BenchError>(());
            }
        }
    })
    .await
    .map_err(|_| "the raw SUB never got a message")??;
    let p = probe.clone();
    let consumer = tokio::spawn(async move {
        loop {
            let m = sub.recv().await?;
            let Some(body) = m.get(2) else { continue };
            for i in 0..n {
                p.received(i, &RawCodec::decode(body)?);
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), BenchError>(())
    });
    let clock = probe.start_clock();
    let producer = produce!(probe, |msg| {
        // [topic, meta, body]: the same three frames as ours.
        let frames = codec.encode(&msg)?.into_vec();
        let mut m = ZmqMessage::from(Bytes::from_static(b"bench.fanout"));
        m.push_back(Bytes::from_static(&[0u8; 48]));
        m.push_back(frames[2].clone());
        publisher.send(m).await?
    });
    let r = finish(&probe, clock, producer, n as u64).await;
    consumer.abort();
    r
}

/// DEALER → ROUTER and back, closed loop; an echo task answers on the same connection.
async fn raw_pingpong(cfg: &RunConfig) -> BenchResult<Sample> {
    let probe = Probe::new(1, cfg)?;
    let codec = RawCodec::like_ours(cfg);
    let (mut router, ep) = router_on_loopback().await?;
    let echo = tokio::spawn(async move {
        loop {
            let m = router.recv().await?;
            router.send(m).await?;
        }
        #[allow(unreachable_code)]
        Ok::<(), BenchError>(())
    });
    let mut dealer = DealerSocket::new();
    dealer.connect(&ep).await?;
    let clock = probe.start_clock();
    let p = probe.clone();
    let pinger = tokio::spawn(async move {
        let cfg = p.cfg();
        let mut seq = 0u64;
        let mut intended = cfg.now_ns();
        while !p.stopped() {
            dealer
                .send(codec.encode(&cfg.msg_at(seq, intended))?)
                .await?;
            let back = dealer.recv().await?;
            let msg = RawCodec::decode(back.get(2).ok_or("an echo has no body")?)?;
            intended = cfg.now_ns();
            p.round_trip(0, intended.saturating_sub(msg.stamp_ns));
            seq += 1;
        }
        Ok::<u64, BenchError>(0)
    });
    let r = finish(&probe, clock, pinger, 0).await;
    echo.abort();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bodies_are_as_long_as_our_envelopes_and_decode_back() {
        let cfg = RunConfig::new(64, Duration::ZERO, Duration::ZERO, 1, 1);
        let codec = RawCodec::like_ours(&cfg);
        assert!(codec.body_len > 64, "{}", codec.body_len);
        let m = codec.encode(&cfg.msg_at(7, 42)).expect("encodes");
        let body = m.get(2).expect("a body frame");
        assert_eq!(body.len(), codec.body_len);
        let back = RawCodec::decode(body).expect("decodes");
        assert_eq!((back.seq, back.stamp_ns, back.data.len()), (7, 42, 64));
        assert!(RawCodec::decode(&[0, 0]).is_err());
    }
}
