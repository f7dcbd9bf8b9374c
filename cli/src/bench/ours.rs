//! The workloads on Switchyard itself, through `Node` and the selector, for any deployment.

use std::sync::Arc;

use switchyard::{ContextId, MachineBuilder, MachineId, Node, Session, SubscriptionHandle};
use tokio::sync::Notify;

use super::measure::{BenchError, BenchMsg, BenchResult, DRAIN_LIMIT, Probe, RunConfig, Sample};

/// Producers yield this often so that consumers sharing their worker get to run.
pub const YIELD_EVERY: u64 = 1024;

/// Where the machines of a run live.
pub struct Deployment {
    /// The producer's (or pinger's) session.
    pub senders: Session,
    /// The consumers' session; `None` means the producer's.
    pub receivers: Option<Session>,
    /// Pins every machine to one single-threaded context (same-thread transports).
    pub context: Option<ContextId>,
}

impl Deployment {
    /// One session whose selector keeps only the transport `name`.
    pub fn single(name: &'static str, same_thread: bool) -> BenchResult<Deployment> {
        let senders = only_transport(name)?;
        let context = same_thread.then(|| senders.context());
        Ok(Deployment {
            senders,
            receivers: None,
            context,
        })
    }

    fn rx(&self) -> &Session {
        self.receivers.as_ref().unwrap_or(&self.senders)
    }

    fn machine(&self, s: &Session, id: impl Into<MachineId>, ty: &str) -> MachineBuilder {
        let b = s.machine(id, ty);
        match self.context {
            Some(c) => b.context(c),
            None => b,
        }
    }
}

/// A session whose selector keeps only the transport `name` (automatic heartbeats off: they are noise here).
pub fn only_transport(name: &'static str) -> BenchResult<Session> {
    Ok(switchyard::builder()
        .selector(|s| {
            let others: Vec<&'static str> = s
                .transport_names()
                .into_iter()
                .filter(|n| *n != name)
                .collect();
            s.without(others)
        })
        .session(|s| s.heartbeat_interval(None))
        .build()?)
}

/// Spawns a producer that sends `cfg.next_msg(seq)` with `$send` until the window closes; yields the count sent.
macro_rules! produce {
    ($probe:expr, |$msg:ident| $send:expr) => {{
        let probe = $probe.clone();
        tokio::spawn(async move {
            let mut seq = 0u64;
            let start = probe.cfg().now_ns();
            while !probe.stopped() {
                let $msg = probe.cfg().next_msg(seq, start).await;
                $send;
                seq += 1;
                if seq.is_multiple_of($crate::bench::ours::YIELD_EVERY) {
                    tokio::task::yield_now().await;
                }
            }
            Ok::<u64, $crate::bench::measure::BenchError>(seq)
        })
    }};
}
pub(crate) use produce;

/// Closes the window, collects the producer's count and the losses.
pub async fn finish(
    probe: &Arc<Probe>,
    clock: super::measure::Clock,
    producer: tokio::task::JoinHandle<Result<u64, BenchError>>,
    per_message: u64,
) -> BenchResult<Sample> {
    let window = clock.finish().await;
    probe.stop();
    let sent = producer
        .await
        .map_err(|e| format!("the producer task failed: {e}"))??;
    let window = window?;
    let lost = probe.drain(sent * per_message, DRAIN_LIMIT).await;
    Ok(Sample::new(&window, probe, lost))
}

fn counting(
    probe: &Arc<Probe>,
    i: usize,
) -> impl Fn(&Node, switchyard::EventRef<'_>) + Send + Sync + 'static {
    let probe = probe.clone();
    move |_, ev| probe.received_payload(i, ev.payload)
}

/// One producer, one consumer; through a declared sender, or a plain `send` per message.
pub async fn oneway(dep: &Deployment, cfg: &RunConfig, declared: bool) -> BenchResult<Sample> {
    let probe = Probe::new(1, cfg)?;
    let sink = dep
        .machine(dep.rx(), "sink", "Sink")
        .handler_ref(counting(&probe, 0))
        .build()
        .await?;
    let source = dep
        .machine(&dep.senders, "source", "Source")
        .build()
        .await?;
    source.locate(sink.id()).await?;
    let to = sink.id().clone();
    let clock = probe.start_clock();
    let producer = if declared {
        let sender = source.sender(to).await?;
        produce!(probe, |msg| sender.send("E", msg).await?)
    } else {
        produce!(probe, |msg| source.send(to.clone(), "E", msg).await?)
    };
    finish(&probe, clock, producer, 1).await
}

/// Closed-loop ping-pong, event-driven as a state machine would do it: the pinger's handler
/// records each round trip and sends the next ping, stamped with its intended send time
/// (when the previous answer arrived), so time spent before the send is counted too.
pub async fn pingpong(dep: &Deployment, cfg: &RunConfig) -> BenchResult<Sample> {
    let ponger = dep
        .machine(dep.rx(), "ponger", "Ponger")
        .handler(ponger())
        .build()
        .await?;
    pingpong_with(dep, cfg, ponger.id().clone(), Some(&ponger)).await
}

/// The ponger's handler: answers every ping with the same message.
pub fn ponger() -> impl Fn(&Node, switchyard::Envelope) + Send + Sync + 'static {
    move |node, ev| {
        if let Some(m) = BenchMsg::from_payload(&ev.payload)
            && let Err(e) = node.post(ev.source.clone(), "PONG", m)
        {
            tracing::warn!(error = %e, "ponger could not answer");
        }
    }
}

/// Ping-pong against a ponger that already runs (here, or in another process: `local` is `None`).
pub async fn pingpong_with(
    dep: &Deployment,
    cfg: &RunConfig,
    ponger_id: MachineId,
    local: Option<&Node>,
) -> BenchResult<Sample> {
    let probe = Probe::new(1, cfg)?;
    let done = Arc::new(Notify::new());
    let ping = "PING";
    let pinger = dep
        .machine(&dep.senders, "pinger", "Pinger")
        .handler({
            let (probe, done, to) = (probe.clone(), done.clone(), ponger_id.clone());
            move |node, ev| {
                let cfg = probe.cfg();
                let arrived = cfg.now_ns();
                let Some(m) = BenchMsg::from_payload(&ev.payload) else {
                    return;
                };
                probe.round_trip(0, arrived.saturating_sub(m.stamp_ns));
                if probe.stopped() {
                    done.notify_one();
                    return;
                }
                // Closed loop: the next ping is meant to go out the moment this answer arrived.
                let next = cfg.msg_at(m.seq + 1, arrived);
                if let Err(e) = node.post(to.clone(), ping, next) {
                    tracing::warn!(error = %e, "pinger could not send");
                    done.notify_one();
                }
            }
        })
        .build()
        .await?;
    pinger.locate(&ponger_id).await?;
    if let Some(ponger) = local {
        ponger.locate(pinger.id()).await?;
    }
    let clock = probe.start_clock();
    let first = cfg.msg_at(0, cfg.now_ns());
    // On a same-thread transport this runs the whole exchange inline and returns when the window closes.
    let kick = pinger.send(ponger_id, ping, first).await;
    let window = clock.finish().await;
    probe.stop();
    kick?;
    let window = window?;
    tokio::time::timeout(DRAIN_LIMIT, done.notified())
        .await
        .map_err(|_| "ping-pong stalled: the last round trip never came back")?;
    Ok(Sample::new(&window, &probe, 0))
}

/// One publisher, `cfg.fanout` topic subscribers.
pub async fn fanout(dep: &Deployment, cfg: &RunConfig) -> BenchResult<Sample> {
    let n = cfg.fanout.max(1);
    let probe = Probe::new(n, cfg)?;
    let mut subs: Vec<(Node, SubscriptionHandle)> = Vec::with_capacity(n);
    for i in 0..n {
        let node = dep
            .machine(dep.rx(), format!("sub-{i}"), "Subscriber")
            .handler_ref(counting(&probe, i))
            .build()
            .await?;
        let handle = node.subscribe("bench.fanout").await?;
        subs.push((node, handle));
    }
    let source = dep
        .machine(&dep.senders, "source", "Source")
        .build()
        .await?;
    let publisher = source.publisher("bench.fanout")?;
    let clock = probe.start_clock();
    let producer = produce!(probe, |msg| publisher.emit("E", msg).await?);
    let r = finish(&probe, clock, producer, n as u64).await;
    drop(subs);
    r
}

/// One producer, `cfg.workers` machines of one type; each message reaches one of them.
pub async fn any_of_type(dep: &Deployment, cfg: &RunConfig) -> BenchResult<Sample> {
    let n = cfg.workers.max(1);
    let probe = Probe::new(n, cfg)?;
    let mut workers = Vec::with_capacity(n);
    for i in 0..n {
        workers.push(
            dep.machine(dep.rx(), format!("worker-{i}"), "BenchWorker")
                .handler_ref(counting(&probe, i))
                .build()
                .await?,
        );
    }
    let source = dep
        .machine(&dep.senders, "source", "Source")
        .build()
        .await?;
    for w in &workers {
        source.locate(w.id()).await?;
    }
    let clock = probe.start_clock();
    let producer = produce!(probe, |msg| source
        .send_to_any_of_type("BenchWorker", "E", msg)
        .await?);
    finish(&probe, clock, producer, 1).await
}
