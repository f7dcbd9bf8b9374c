//! Statechart transitions per second.
//!
//! Groups:
//! - `interpreter`: the pure transition step (events fed to the interpreter directly, no Node,
//!   no tokio): a flat two-state toggle without actions, the same toggle with one context-updating
//!   action, a nested media player and a parallel text editor;
//! - `end_to_end`: the flat toggle bound to a Node, for information (current-thread runtime):
//!   events given to the machine directly (`machine_send`, a session with direct + memory, so
//!   state changes are published, to no subscriber), sent by another machine over `direct`
//!   (same thread; no pub/sub transport, so nothing is published) and over `memory` (same
//!   process; published; waits until the machine has handled them all).
//!
//! Run: `cargo bench -p switchyard-machine --bench transitions`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use switchyard_machine::{Actions, Event, Interpreter, StateMachine};

const TOGGLE: &str = r#"{"id":"toggle","initial":"a","states":{
    "a":{"on":{"T":"b"}},
    "b":{"on":{"T":"a"}}}}"#;

const TOGGLE_COUNTING: &str = r#"{"id":"toggle","initial":"a","context":{"n":0},"states":{
    "a":{"on":{"T":{"target":"b","actions":"inc"}}},
    "b":{"on":{"T":{"target":"a","actions":"inc"}}}}}"#;

const PLAYER: &str = include_str!("../tests/fixtures/media_player.json");
const EDITOR: &str = include_str!("../tests/fixtures/text_editor.json");

fn player_actions() -> Actions {
    Actions::new()
        .action("log", |_| Ok(()))
        .action("nextTrack", |_| Ok(()))
}

fn cycle(c: &mut Criterion, name: &str, interp: &Interpreter, events: &[&str]) {
    let events: Vec<Event> = events.iter().map(|e| Event::new(*e)).collect();
    let mut st = interp.new_state();
    interp.start(&mut st);
    let mut g = c.benchmark_group("interpreter");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function(name, |b| {
        b.iter(|| {
            for e in &events {
                let step = interp.send(&mut st, e);
                debug_assert!(step.transitioned);
                black_box(step);
            }
            // Nothing is collected by these charts, but a host would drain these.
            if st.has_timers() {
                black_box(st.take_timers());
            }
        })
    });
    g.finish();
}

fn interpreter(c: &mut Criterion) {
    let toggle = Interpreter::from_json(TOGGLE, &Actions::new()).expect("toggle loads");
    cycle(c, "flat_toggle", &toggle, &["T", "T"]);

    let counting = Interpreter::from_json(
        TOGGLE_COUNTING,
        &Actions::new().action("inc", |ctx| {
            let n = ctx.context()["n"].as_u64().unwrap_or(0);
            ctx.context_mut()["n"] = (n + 1).into();
            Ok(())
        }),
    )
    .expect("counting toggle loads");
    cycle(c, "flat_toggle_with_action", &counting, &["T", "T"]);

    let player = Interpreter::from_json(PLAYER, &player_actions()).expect("player loads");
    cycle(
        c,
        "nested_media_player",
        &player,
        &["PLAY", "PAUSE", "PLAY", "FF", "PLAY", "NEXT", "STOP"],
    );

    let editor = Interpreter::from_json(EDITOR, &Actions::new()).expect("editor loads");
    cycle(
        c,
        "parallel_text_editor",
        &editor,
        &[
            "TOGGLE_BOLD",
            "TOGGLE_ITALIC",
            "TOGGLE_UNDERLINE",
            "TOGGLE_BOLD",
            "TOGGLE_ITALIC",
            "TOGGLE_UNDERLINE",
        ],
    );
}

async fn wait_transitions(m: &StateMachine, n: u64) {
    while m.transitions() < n {
        tokio::task::yield_now().await;
    }
}

fn end_to_end(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let toggle = Interpreter::from_json(TOGGLE, &Actions::new()).expect("toggle loads");
    let mut g = c.benchmark_group("end_to_end");
    g.throughput(Throughput::Elements(1));

    // Events handed to the bound machine directly (queue + step + publication attempt).
    let session = rt
        .block_on(async { switchyard::builder().build() })
        .expect("session");
    let local = rt
        .block_on(toggle.bind(&session, "local", "Toggle").build())
        .expect("machine");
    g.bench_function("machine_send", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    local
                        .send("T", ())
                        .await
                        .expect("the machine takes the event");
                }
                t.elapsed()
            })
        })
    });

    // Another machine sends over `direct` (same context): handled inline, one step per send.
    let direct = rt
        .block_on(async {
            switchyard::builder()
                .selector(|s| s.without(["memory"]))
                .build()
        })
        .expect("session");
    let ctx = direct.context();
    let (target, sender) = rt.block_on(async {
        let m = toggle
            .bind(&direct, "toggle", "Toggle")
            .configure(|b| b.context(ctx))
            .build()
            .await
            .expect("machine");
        let s = direct
            .machine("sender", "Sender")
            .context(ctx)
            .build()
            .await
            .expect("sender");
        (m, s)
    });
    g.bench_function("node_send_direct", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let goal = target.transitions() + iters;
                let t = Instant::now();
                for _ in 0..iters {
                    sender.send("toggle", "T", ()).await.expect("send");
                }
                wait_transitions(&target, goal).await;
                t.elapsed()
            })
        })
    });

    // Over `memory`: the machine's mailbox task handles them; waits until all are handled.
    let memory = rt
        .block_on(async {
            switchyard::builder()
                .selector(|s| s.without(["direct"]))
                .build()
        })
        .expect("session");
    let (mtarget, msender) = rt.block_on(async {
        let m = toggle
            .bind(&memory, "toggle", "Toggle")
            .build()
            .await
            .expect("machine");
        let s = memory
            .machine("sender", "Sender")
            .build()
            .await
            .expect("sender");
        (m, s)
    });
    g.bench_function("node_send_memory", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let goal = mtarget.transitions() + iters;
                let t = Instant::now();
                for _ in 0..iters {
                    msender.send("toggle", "T", ()).await.expect("send");
                }
                wait_transitions(&mtarget, goal).await;
                t.elapsed()
            })
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = interpreter, end_to_end
}
criterion_main!(benches);
