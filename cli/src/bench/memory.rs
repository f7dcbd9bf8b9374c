//! The `memory` transport (same process) beside raw tokio mpsc channels of the same capacity.

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::measure::{BenchMsg, BenchResult, Probe, RunConfig, Sample};
use super::ours::{self, Deployment, finish, produce};
use super::provider::{Provider, Side, Workload};

/// Same-process delivery through bounded mailboxes.
pub struct Memory;

impl Provider for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn baseline(&self) -> &'static str {
        "tokio mpsc, same capacity"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
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
                    let dep = Deployment::single("memory", false)?;
                    match w {
                        Workload::OneWay => ours::oneway(&dep, cfg, true).await,
                        Workload::OneWaySend => ours::oneway(&dep, cfg, false).await,
                        Workload::PingPong => ours::pingpong(&dep, cfg).await,
                        Workload::FanOut => ours::fanout(&dep, cfg).await,
                        Workload::AnyOfType => ours::any_of_type(&dep, cfg).await,
                    }
                }
                Side::Raw => match w {
                    Workload::OneWay | Workload::OneWaySend => raw_channels(cfg, 1, false).await,
                    Workload::FanOut => raw_channels(cfg, cfg.fanout.max(1), true).await,
                    Workload::AnyOfType => raw_channels(cfg, cfg.workers.max(1), false).await,
                    Workload::PingPong => raw_pingpong(cfg).await,
                },
            }
        })
    }
}

/// One producer, `n` consumer tasks, each behind its own channel; every message goes to all (`fan_out`) or to one in turn.
async fn raw_channels(cfg: &RunConfig, n: usize, fan_out: bool) -> BenchResult<Sample> {
    let probe = Probe::new(n, cfg)?;
    let mut senders = Vec::with_capacity(n);
    let mut consumers = Vec::with_capacity(n);
    for i in 0..n {
        let (tx, mut rx) = mpsc::channel::<BenchMsg>(cfg.capacity);
        senders.push(tx);
        let p = probe.clone();
        consumers.push(tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                p.received(i, &m);
            }
        }));
    }
    let clock = probe.start_clock();
    let mut next = 0usize;
    let producer = produce!(probe, |msg| {
        if fan_out {
            for tx in &senders {
                tx.send(msg.clone())
                    .await
                    .map_err(|_| "a raw consumer stopped")?;
            }
        } else {
            senders[next]
                .send(msg)
                .await
                .map_err(|_| "a raw consumer stopped")?;
            next = (next + 1) % senders.len();
        }
    });
    let per_message = if fan_out { n as u64 } else { 1 };
    let r = finish(&probe, clock, producer, per_message).await;
    for c in consumers {
        let _ = c.await;
    }
    r
}

/// Two tasks and two channels; each ping carries its intended send time (when the previous answer came in).
async fn raw_pingpong(cfg: &RunConfig) -> BenchResult<Sample> {
    let probe = Probe::new(1, cfg)?;
    let (ping_tx, mut ping_rx) = mpsc::channel::<BenchMsg>(cfg.capacity);
    let (pong_tx, mut pong_rx) = mpsc::channel::<BenchMsg>(cfg.capacity);
    let ponger = tokio::spawn(async move {
        while let Some(m) = ping_rx.recv().await {
            if pong_tx.send(m).await.is_err() {
                break;
            }
        }
    });
    let clock = probe.start_clock();
    let p = probe.clone();
    let pinger = tokio::spawn(async move {
        let cfg = p.cfg();
        let mut seq = 0u64;
        // Closed loop: each ping is meant to go out the moment the previous answer is in.
        let mut intended = cfg.now_ns();
        while !p.stopped() {
            ping_tx
                .send(cfg.msg_at(seq, intended))
                .await
                .map_err(|_| "the raw ponger stopped")?;
            let back = pong_rx.recv().await.ok_or("the raw ponger stopped")?;
            intended = cfg.now_ns();
            p.round_trip(0, intended.saturating_sub(back.stamp_ns));
            seq += 1;
        }
        Ok(0)
    });
    let r = finish(&probe, clock, pinger, 0).await;
    let _ = ponger.await;
    r
}
