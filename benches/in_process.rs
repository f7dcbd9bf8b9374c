//! In-process transports beside the primitive underneath them, in the same run.
//!
//! Groups (64-byte payloads):
//! - `direct/throughput`: a send through the selector to a same-thread machine vs a plain call through `Arc<dyn Fn>`;
//! - `memory/throughput`: sends to a same-process machine vs raw tokio mpsc(1024) and crossbeam bounded(1024);
//! - `direct/ping_pong`, `memory/ping_pong`: one round trip (request → reply) vs the raw round trip.
//!
//! Run: `cargo bench --bench in_process`

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use switchyard::{Location, MachineId, Node, Session};
use tokio::runtime::Runtime;
use tokio::sync::{Notify, mpsc, oneshot};

const BATCH: u64 = 10_000;

#[derive(Clone, Copy, Serialize, Deserialize)]
struct P64 {
    words: [u64; 8],
}

const P: P64 = P64 { words: [7; 8] };

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

struct Counted {
    count: Arc<AtomicU64>,
    target: Arc<AtomicU64>,
    done: Arc<Notify>,
}

impl Counted {
    fn new() -> Counted {
        Counted {
            count: Arc::new(AtomicU64::new(0)),
            target: Arc::new(AtomicU64::new(u64::MAX)),
            done: Arc::new(Notify::new()),
        }
    }
    fn handler(&self) -> impl Fn(&Node, switchyard::Envelope) + Send + Sync + 'static {
        let (count, target, done) = (self.count.clone(), self.target.clone(), self.done.clone());
        move |_, ev| {
            black_box(ev.payload.get_ref::<P64>());
            let n = count.fetch_add(1, Ordering::Relaxed) + 1;
            if n == target.load(Ordering::Relaxed) {
                done.notify_one();
            }
        }
    }
}

/// A session with a sender and a receiver placed so the selector picks `transport`.
async fn pair(transport: &str, counted: &Counted) -> (Session, Node, MachineId) {
    let session = switchyard::builder().build().expect("session");
    let ctx = session.context();
    let same_thread = transport == "direct";
    let mut rx = session.machine("rx", "Rx").handler(counted.handler());
    let mut tx = session.machine("tx", "Tx");
    if same_thread {
        rx = rx.context(ctx);
        tx = tx.context(ctx);
    }
    let _rx = rx.build().await.expect("rx");
    let tx = tx.build().await.expect("tx");
    let to = MachineId::from("rx");
    let (_, loc) = tx.locate(&to).await.expect("locate");
    assert_eq!(
        loc,
        if same_thread {
            Location::SameThread
        } else {
            Location::SameProcess
        }
    );
    (session, tx, to)
}

fn throughput(c: &mut Criterion) {
    let rt = runtime();
    let ev: Arc<str> = Arc::from("EV");

    let mut g = c.benchmark_group("direct/throughput");
    g.throughput(Throughput::Elements(BATCH));
    let sink = Arc::new(AtomicU64::new(0));
    let raw: Arc<dyn Fn(P64) + Send + Sync> = {
        let sink = sink.clone();
        Arc::new(move |p: P64| {
            black_box(&p);
            sink.fetch_add(1, Ordering::Relaxed);
        })
    };
    g.bench_function("raw_fn_call", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                raw(black_box(P));
            }
        })
    });
    let counted = Counted::new();
    let (_s, tx, to) = rt.block_on(pair("direct", &counted));
    g.bench_function("switchyard", |b| {
        b.to_async(&rt).iter(|| async {
            for _ in 0..BATCH {
                tx.send(&to, ev.clone(), P).await.expect("send");
            }
        })
    });
    g.finish();
    drop(_s);

    let mut g = c.benchmark_group("memory/throughput");
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function("raw_tokio_mpsc", |b| {
        b.to_async(&rt).iter(|| async {
            let (txc, mut rxc) = mpsc::channel::<P64>(1024);
            let consumer = tokio::spawn(async move {
                let mut n = 0u64;
                while let Some(p) = rxc.recv().await {
                    black_box(&p);
                    n += 1;
                    if n == BATCH {
                        break;
                    }
                }
            });
            for _ in 0..BATCH {
                txc.send(P).await.expect("send");
            }
            consumer.await.expect("consumer");
        })
    });
    g.bench_function("raw_crossbeam", |b| {
        b.iter(|| {
            let (txc, rxc) = crossbeam_channel::bounded::<P64>(1024);
            let consumer = std::thread::spawn(move || {
                for _ in 0..BATCH {
                    black_box(rxc.recv().expect("recv"));
                }
            });
            for _ in 0..BATCH {
                txc.send(P).expect("send");
            }
            consumer.join().expect("consumer");
        })
    });
    let counted = Counted::new();
    let (_s, tx, to) = rt.block_on(pair("memory", &counted));
    g.bench_function("switchyard", |b| {
        b.to_async(&rt).iter(|| async {
            let start = counted.count.load(Ordering::Relaxed);
            counted.target.store(start + BATCH, Ordering::Relaxed);
            let done = counted.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            for _ in 0..BATCH {
                tx.send(&to, ev.clone(), P).await.expect("send");
            }
            done.await;
        })
    });
    g.bench_function("switchyard_send_batch_64", |b| {
        b.to_async(&rt).iter(|| async {
            let start = counted.count.load(Ordering::Relaxed);
            counted.target.store(start + BATCH, Ordering::Relaxed);
            let done = counted.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            for _ in 0..BATCH / 64 {
                tx.send_batch(&to, (0..64).map(|_| (ev.clone(), P)))
                    .await
                    .expect("send_batch");
            }
            let left = BATCH % 64;
            tx.send_batch(&to, (0..left).map(|_| (ev.clone(), P)))
                .await
                .expect("send_batch");
            done.await;
        })
    });
    g.finish();
}

fn ping_pong(c: &mut Criterion) {
    let rt = runtime();
    for transport in ["direct", "memory"] {
        let mut g = c.benchmark_group(format!("{transport}/ping_pong"));
        if transport == "direct" {
            let pong: Arc<dyn Fn(P64) -> P64 + Send + Sync> = Arc::new(black_box::<P64>);
            g.bench_function(BenchmarkId::new("raw", "fn_call_round_trip"), |b| {
                b.iter(|| black_box(pong(black_box(P))))
            });
        } else {
            // Two tasks bouncing a message over two channels.
            let (ping_tx, mut ping_rx) = mpsc::channel::<(P64, oneshot::Sender<P64>)>(1024);
            rt.spawn(async move {
                while let Some((p, back)) = ping_rx.recv().await {
                    let _ = back.send(p);
                }
            });
            let (a_tx, mut a_rx) = mpsc::channel::<P64>(1024);
            let (b_tx, b_rx) = mpsc::channel::<P64>(1024);
            rt.spawn(async move {
                while let Some(p) = a_rx.recv().await {
                    if b_tx.send(p).await.is_err() {
                        break;
                    }
                }
            });
            let b_rx = Arc::new(tokio::sync::Mutex::new(b_rx));
            g.bench_function(BenchmarkId::new("raw", "tokio_mpsc_round_trip"), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (a_tx, b_rx) = (a_tx.clone(), b_rx.clone());
                    async move {
                        let mut b_rx = b_rx.lock().await;
                        let start = std::time::Instant::now();
                        for _ in 0..iters {
                            a_tx.send(P).await.expect("send");
                            black_box(b_rx.recv().await.expect("recv"));
                        }
                        start.elapsed()
                    }
                })
            });
            g.bench_function(
                BenchmarkId::new("raw", "tokio_mpsc_oneshot_round_trip"),
                |b| {
                    b.to_async(&rt).iter(|| async {
                        let (t, r) = oneshot::channel();
                        ping_tx.send((P, t)).await.expect("send");
                        black_box(r.await.expect("reply"));
                    })
                },
            );
        }
        let session: Session =
            rt.block_on(async { switchyard::builder().build().expect("session") });
        let ctx = session.context();
        let (pong, ping) = rt.block_on(async {
            let mut pong = session.machine("pong", "Pong").handler(|node, ev| {
                let _ = node.post_reply(
                    &ev,
                    "PONG",
                    ev.payload.get_ref::<P64>().copied().unwrap_or(P),
                );
            });
            let mut ping = session.machine("ping", "Ping");
            if transport == "direct" {
                pong = pong.context(ctx);
                ping = ping.context(ctx);
            }
            (
                pong.build().await.expect("pong"),
                ping.build().await.expect("ping"),
            )
        });
        let to = pong.id().clone();
        let ev: Arc<str> = Arc::from("PING");
        g.bench_function(BenchmarkId::new("switchyard", "request_reply"), |b| {
            b.to_async(&rt).iter(|| async {
                let r = ping
                    .request(&to, ev.clone(), P, Duration::from_secs(5))
                    .await
                    .expect("reply");
                assert_eq!(r.carried_by, Some(transport));
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    targets = throughput, ping_pong
}
criterion_main!(benches);
