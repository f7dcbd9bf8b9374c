//! The `direct` transport (same thread) beside a plain function call through `Arc<dyn Fn>`.

use std::hint::black_box;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::measure::{BenchMsg, BenchResult, Probe, RunConfig, Sample};
use super::ours::{self, Deployment, finish, produce};
use super::provider::{Provider, Side, Workload};

/// Same-thread delivery: the handler runs on the sender's task.
pub struct Direct;

type Call = Arc<dyn Fn(BenchMsg) + Send + Sync>;

impl Provider for Direct {
    fn name(&self) -> &'static str {
        "direct"
    }
    fn baseline(&self) -> &'static str {
        "function call through Arc<dyn Fn>"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn supports(&self, w: Workload) -> Result<(), &'static str> {
        match w {
            Workload::FanOut => {
                Err("the direct transport has no topics (topics go through memory)")
            }
            _ => Ok(()),
        }
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
                    let dep = Deployment::single("direct", true)?;
                    match w {
                        Workload::OneWay => ours::oneway(&dep, cfg, true).await,
                        Workload::OneWaySend => ours::oneway(&dep, cfg, false).await,
                        Workload::PingPong => ours::pingpong(&dep, cfg).await,
                        Workload::FanOut => ours::fanout(&dep, cfg).await,
                        Workload::AnyOfType => ours::any_of_type(&dep, cfg).await,
                    }
                }
                Side::Raw => match w {
                    Workload::OneWay | Workload::OneWaySend => raw_calls(cfg, 1).await,
                    Workload::AnyOfType => raw_calls(cfg, cfg.workers.max(1)).await,
                    Workload::PingPong => raw_pingpong(cfg).await,
                    Workload::FanOut => Err("the direct transport has no topics".into()),
                },
            }
        })
    }
}

/// One producer calling `n` targets in turn.
async fn raw_calls(cfg: &RunConfig, n: usize) -> BenchResult<Sample> {
    let probe = Probe::new(n, cfg)?;
    // black_box keeps the compiler from seeing through the `dyn Fn`, as it cannot for a registered handler.
    let targets: Vec<Call> = (0..n)
        .map(|i| {
            let p = probe.clone();
            black_box(Arc::new(move |m: BenchMsg| p.received(i, &m)) as Call)
        })
        .collect();
    let clock = probe.start_clock();
    let mut next = 0usize;
    let producer = produce!(probe, |msg| {
        targets[next](msg);
        next = (next + 1) % targets.len();
    });
    finish(&probe, clock, producer, 1).await
}

/// A call that returns the message; each call is timed from when the previous one returned.
async fn raw_pingpong(cfg: &RunConfig) -> BenchResult<Sample> {
    let probe = Probe::new(1, cfg)?;
    let pong: Arc<dyn Fn(BenchMsg) -> BenchMsg + Send + Sync> = black_box(Arc::new(|m| m));
    let clock = probe.start_clock();
    let p = probe.clone();
    let pinger = tokio::spawn(async move {
        let cfg = p.cfg();
        let mut seq = 0u64;
        // Closed loop: each ping is meant to go out the moment the previous answer is in.
        let mut intended = cfg.now_ns();
        while !p.stopped() {
            let back = pong(cfg.msg_at(seq, intended));
            intended = cfg.now_ns();
            p.round_trip(0, intended.saturating_sub(back.stamp_ns));
            seq += 1;
            if seq.is_multiple_of(ours::YIELD_EVERY) {
                tokio::task::yield_now().await;
            }
        }
        Ok(0)
    });
    finish(&probe, clock, pinger, 0).await
}
