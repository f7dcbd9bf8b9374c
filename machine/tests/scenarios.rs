//! Machines bound to Nodes: timers, the original guide's UI + worker (also across two
//! processes) and pipeline, locating peers, requests, failures, and concurrent deliveries
//! on two transports.

mod common;

use std::time::Duration;

use common::{
    ChildProcess, Observer, child_role, ipc_session, memory_session, parent_lines, say, within,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use switchyard::ipc::{Daemon, DaemonConfig, unique_socket_path};
use switchyard::{Node, Session};
use switchyard_machine::{
    Actions, ERROR_ACTION, Failure, FailureKind, Interpreter, Located, MachineError, SendFailure,
    StateMachine, Status,
};
use tokio::time::Instant;

fn interp(json: &str, actions: &Actions) -> Interpreter {
    Interpreter::from_json(json, actions).expect("statechart loads")
}

fn traffic_actions() -> Actions {
    Actions::new().action("countCycle", |ctx| {
        let n: u64 = ctx.get("cycles")?;
        ctx.set("cycles", n + 1)
    })
}

#[tokio::test(start_paused = true)]
async fn traffic_light_runs_on_after_timers() {
    let session = memory_session();
    let mut states = Observer::new(&session, "watch", "state.light.#").await;
    let start = Instant::now();
    let light = interp(
        include_str!("fixtures/traffic_light.json"),
        &traffic_actions(),
    )
    .bind(&session, "light", "TrafficLight")
    .build()
    .await
    .unwrap();
    let expected = [
        ("state.light.green", 0),
        ("state.light.yellow", 1000),
        ("state.light.red.walk", 1500),
        ("state.light.red.wait", 2300),
        ("state.light.red.stop", 2900),
        ("state.light.green", 3500),
        ("state.light.yellow", 4500),
    ];
    for (topic, at_ms) in expected {
        let (t, change) = states.next().await;
        assert_eq!(t, topic);
        let ms = start.elapsed().as_millis() as u64;
        assert!(
            (at_ms..at_ms + 5).contains(&ms),
            "{topic} at {ms} ms (virtual), expected {at_ms}"
        );
        assert_eq!(change.machine, "light");
    }
    assert_eq!(light.snapshot().context["cycles"], 1);
    assert!(light.matches("yellow"));
}

#[tokio::test(start_paused = true)]
async fn leaving_a_state_cancels_its_timer() {
    let session = memory_session();
    let mut states = Observer::new(&session, "watch", "state.light.#").await;
    let light = interp(
        include_str!("fixtures/traffic_light.json"),
        &traffic_actions(),
    )
    .bind(&session, "light", "TrafficLight")
    .build()
    .await
    .unwrap();
    assert_eq!(states.next().await.0, "state.light.green");
    tokio::time::sleep(Duration::from_millis(400)).await;
    // A sender on the memory transport.
    let police = session.machine("police", "Police").build().await.unwrap();
    police.send("light", "EMERGENCY", ()).await.unwrap();
    let start = Instant::now();
    // green's 1000 ms timer was cancelled: no yellow at t=1000, red runs its own course.
    let seen = states.until("state.light.green").await;
    assert_eq!(
        seen,
        [
            "state.light.red.walk",
            "state.light.red.wait",
            "state.light.red.stop",
            "state.light.green"
        ]
    );
    let ms = start.elapsed().as_millis() as u64;
    assert!((2000..2005).contains(&ms), "green again after {ms} ms");
    assert!(light.matches("green"));
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Task {
    task_id: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct WorkResult {
    task_id: u64,
    result: String,
}

/// The guide's UI + worker: `DO_WORK` -> (2 s of work) -> `WORK_COMPLETE`.
fn ui_worker_actions() -> Actions {
    Actions::new()
        .action("onStartWork", |ctx| {
            let task_id: u64 = ctx.get("next_task")?;
            ctx.set("next_task", task_id + 1)?;
            ctx.send("worker-1", "DO_WORK", Task { task_id });
            Ok(())
        })
        .action("onWorkComplete", |ctx| {
            let result: WorkResult = ctx.data()?;
            let mut results: Vec<WorkResult> = ctx.get("results")?;
            results.push(result);
            ctx.set("results", results)
        })
        .action("onDoWork", |ctx| {
            let task: Task = ctx.data()?;
            let requester = ctx
                .event()
                .origin()
                .map(|o| o.source.to_string())
                .ok_or("DO_WORK without a sender")?;
            ctx.set("task", task)?;
            ctx.set("requester", requester)
        })
        .action("finishWork", |ctx| {
            let task: Task = ctx.get("task")?;
            let requester: String = ctx.get("requester")?;
            let done: u64 = ctx.get("done")?;
            ctx.set("done", done + 1)?;
            ctx.send(
                requester,
                "WORK_COMPLETE",
                WorkResult {
                    task_id: task.task_id,
                    result: "Success".into(),
                },
            );
            Ok(())
        })
}

/// The worker of the UI + worker pair, on `session`.
async fn start_worker(session: &Session) -> StateMachine {
    interp(include_str!("fixtures/worker.json"), &ui_worker_actions())
        .bind(session, "worker-1", "Worker")
        .build()
        .await
        .unwrap()
}

/// The UI of the UI + worker pair, on `session`.
async fn start_ui(session: &Session) -> StateMachine {
    interp(include_str!("fixtures/ui.json"), &ui_worker_actions())
        .bind(session, "ui-main", "UI")
        .build()
        .await
        .unwrap()
}

/// The results the UI collected, which must be one success per round.
fn assert_results(ui: &StateMachine, rounds: u64) {
    let results: Vec<WorkResult> =
        serde_json::from_value(ui.snapshot().context["results"].clone()).unwrap();
    let want: Vec<WorkResult> = (1..=rounds)
        .map(|task_id| WorkResult {
            task_id,
            result: "Success".into(),
        })
        .collect();
    assert_eq!(results, want);
}

#[tokio::test(start_paused = true)]
async fn ui_and_worker() {
    let session = switchyard::builder().build().unwrap();
    let mut states = Observer::new(&session, "watch", "state.#").await;
    let worker = start_worker(&session).await;
    let ui = start_ui(&session).await;
    states.until("state.ui-main.idle").await;
    for round in 1..=2u64 {
        let start = Instant::now();
        ui.send("START_WORK", ())
            .await
            .expect("the machine takes the event");
        let seen = states.until("state.ui-main.idle").await;
        assert_eq!(
            seen,
            [
                "state.ui-main.waiting",
                "state.worker-1.working",
                "state.worker-1.ready",
                "state.ui-main.idle"
            ]
        );
        assert!(start.elapsed() >= Duration::from_millis(2000));
        assert_eq!(worker.snapshot().context["done"], round);
    }
    assert_results(&ui, 2);
}

/// The same pair with the worker in a child process (this test binary re-executed to run only
/// `ipc_child`) and the UI here, both sessions on one ipc bus daemon. The worker's two seconds
/// of work are real time here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ui_and_worker_across_processes() {
    let socket = unique_socket_path(&std::env::temp_dir(), "machine-ui-worker");
    let _daemon = Daemon::start(DaemonConfig::new(&socket)).expect("the bus daemon starts");
    let mut child = ChildProcess::spawn("ipc_child", "worker", &socket, false);
    child.expect("READY").await;
    let (session, _bus) = ipc_session(&socket, false);
    // State changes arrive from both processes: the UI's through memory, the worker's through
    // the daemon; each machine's own changes are in order.
    let mut states = Observer::new(&session, "watch", "state.#").await;
    let ui = start_ui(&session).await;
    states.until("state.ui-main.idle").await;
    for round in 1..=2u64 {
        ui.send("START_WORK", ())
            .await
            .expect("the machine takes the event");
        let mut seen = states.until("state.ui-main.idle").await;
        if !seen.iter().any(|t| t == "state.worker-1.ready") {
            seen.extend(states.until("state.worker-1.ready").await);
        }
        let of = |machine: &str| -> Vec<&str> {
            seen.iter()
                .map(String::as_str)
                .filter(|t| t.starts_with(machine))
                .collect()
        };
        assert_eq!(
            of("state.ui-main."),
            ["state.ui-main.waiting", "state.ui-main.idle"]
        );
        assert_eq!(
            of("state.worker-1."),
            ["state.worker-1.working", "state.worker-1.ready"]
        );
        child.tell("CONTEXT");
        let worker: serde_json::Value =
            serde_json::from_str(&child.expect("CONTEXT").await).expect("the worker's context");
        assert_eq!(worker["done"], round);
        assert_eq!(worker["requester"], "ui-main");
    }
    assert_results(&ui, 2);
    child.tell("QUIT");
    child.expect("BYE").await;
}

/// The child side of the cross-process test; does nothing in an ordinary test run.
#[test]
fn ipc_child() {
    let Some((role, socket, p2p)) = child_role() else {
        return;
    };
    assert_eq!(role, "worker", "the only role of this binary");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let mut parent = parent_lines();
        let (session, _bus) = ipc_session(&socket, p2p);
        let worker = start_worker(&session).await;
        say("READY", "");
        while let Some(line) = parent.recv().await {
            match line.as_str() {
                "CONTEXT" => say("CONTEXT", &worker.snapshot().context.to_string()),
                "QUIT" => break,
                other => panic!("unknown command {other:?}"),
            }
        }
        worker.stop().await.expect("the worker stops");
        session.shutdown();
        say("BYE", "");
    });
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct FileData {
    file: String,
    data: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_stage_pipeline() {
    let session = switchyard::builder().build().unwrap();
    let mut states = Observer::new(&session, "watch", "state.ingester.#").await;
    let actions = Actions::new()
        .action("scanFiles", |ctx| {
            let files: Vec<FileData> = ctx.get("files")?;
            for f in files {
                ctx.send("processor", "PROCESS_DATA", f);
            }
            Ok(())
        })
        .action("transformData", |ctx| {
            let input: FileData = ctx.data()?;
            let n: u64 = ctx.get("processed")?;
            ctx.set("processed", n + 1)?;
            ctx.send(
                "storage",
                "SAVE_DATA",
                FileData {
                    file: input.file,
                    data: input.data.to_uppercase(),
                },
            );
            Ok(())
        })
        .action("saveToDb", |ctx| {
            let input: FileData = ctx.data()?;
            ctx.context_mut()["saved"][&input.file] = json!(input.data);
            ctx.send("ingester", "FILE_COMPLETE", input.file);
            Ok(())
        })
        .action("markComplete", |ctx| {
            let file: String = ctx.data()?;
            let mut done: Vec<String> = ctx.get("completed")?;
            done.push(file);
            ctx.set("completed", done)
        })
        .guard("lastFile", |g| {
            let total = g.context()["files"].as_array().map_or(0, Vec::len);
            let done = g.context()["completed"].as_array().map_or(0, Vec::len);
            done + 1 >= total
        });
    let storage = interp(include_str!("fixtures/storage.json"), &actions)
        .bind(&session, "storage", "Storage")
        .build()
        .await
        .unwrap();
    let processor = interp(include_str!("fixtures/processor.json"), &actions)
        .bind(&session, "processor", "Processor")
        .build()
        .await
        .unwrap();
    let files = json!([
        { "file": "a.txt", "data": "alpha" },
        { "file": "b.txt", "data": "beta" },
        { "file": "c.txt", "data": "gamma" }
    ]);
    let ingester = interp(include_str!("fixtures/ingester.json"), &actions)
        .bind(&session, "ingester", "Ingester")
        .context(json!({ "files": files, "completed": [] }))
        .build()
        .await
        .unwrap();
    assert_eq!(states.next().await.0, "state.ingester.idle");
    let starter = session.machine("cli", "Cli").build().await.unwrap();
    starter.send("ingester", "START", ()).await.unwrap();
    let seen = states.until("state.ingester.complete").await;
    assert_eq!(seen, ["state.ingester.scanning", "state.ingester.complete"]);
    assert_eq!(ingester.snapshot().status, Status::Done);
    assert_eq!(processor.snapshot().context["processed"], 3);
    assert_eq!(
        storage.snapshot().context["saved"],
        json!({ "a.txt": "ALPHA", "b.txt": "BETA", "c.txt": "GAMMA" })
    );
    let mut completed: Vec<String> =
        serde_json::from_value(ingester.snapshot().context["completed"].clone()).unwrap();
    completed.sort();
    assert_eq!(completed, ["a.txt", "b.txt", "c.txt"]);
}

const CLIENT: &str = r#"{
  "id": "client", "initial": "idle", "context": {},
  "states": {
    "idle": { "on": { "GO": { "target": "asking", "actions": "ask" } } },
    "asking": {
      "on": {
        "done.request.ADD": { "target": "answered", "actions": "store" },
        "error.request.ADD": { "target": "failed", "actions": "storeError" }
      }
    },
    "answered": {},
    "failed": {}
  }
}"#;
const CALC: &str =
    r#"{"id":"calc","initial":"on","states":{"on":{"on":{"ADD":{"actions":"answer"}}}}}"#;

fn request_actions() -> Actions {
    Actions::new()
        .action("ask", |ctx| {
            let target: String = ctx.data()?;
            ctx.request(target, "ADD", (2u32, 3u32), Duration::from_millis(500));
            Ok(())
        })
        .action("answer", |ctx| {
            let (a, b): (u32, u32) = ctx.data()?;
            ctx.reply("SUM", a + b)
        })
        .action("store", |ctx| {
            let sum: u32 = ctx.data()?;
            ctx.set("sum", sum)
        })
        .action("storeError", |ctx| {
            let f: SendFailure = ctx.data()?;
            ctx.set("error", f)
        })
}

#[tokio::test(start_paused = true)]
async fn request_reply_and_timeout_come_back_as_events() {
    let session = switchyard::builder().build().unwrap();
    let actions = request_actions();
    let _calc = interp(CALC, &actions)
        .bind(&session, "calc", "Calculator")
        .build()
        .await
        .unwrap();
    let _silent: Node = session.machine("silent", "Silent").build().await.unwrap();
    let client = interp(CLIENT, &actions);

    let asker = client
        .bind(&session, "asker", "Client")
        .build()
        .await
        .unwrap();
    asker
        .send("GO", "calc".to_string())
        .await
        .expect("the machine takes the event");
    let snap = within(asker.wait_for_state("answered")).await;
    assert_eq!(snap.context["sum"], 5);

    let start = Instant::now();
    let waiter = client
        .bind(&session, "waiter", "Client")
        .build()
        .await
        .unwrap();
    waiter
        .send("GO", "silent".to_string())
        .await
        .expect("the machine takes the event");
    assert!(
        waiter.matches("asking"),
        "the request does not block the machine"
    );
    let snap = within(waiter.wait_for_state("failed")).await;
    assert!(start.elapsed() >= Duration::from_millis(500));
    assert_eq!(snap.context["error"]["target"], "silent");
    assert_eq!(snap.context["error"]["event"], "ADD");
}

const FINDER: &str = r#"{
  "id": "finder", "initial": "idle", "context": {},
  "states": {
    "idle": { "on": { "FIND": { "target": "finding", "actions": "find" } } },
    "finding": {
      "on": {
        "done.locate.*": { "target": "found", "actions": "store" },
        "error.locate.*": { "target": "lost", "actions": "storeError" }
      }
    },
    "found": {},
    "lost": {}
  }
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locate_now_or_as_an_event() {
    let session = memory_session();
    let actions = Actions::new()
        .action("find", |ctx| {
            let target: String = ctx.data()?;
            // The in-process registry answers at once; an unknown id is an error.
            match ctx.locate(&target) {
                Ok((entry, location)) => {
                    ctx.set("now", format!("{location:?}"))?;
                    ctx.set("now_type", entry.machine_type.to_string())?;
                }
                Err(e) => ctx.set("now_error", e.to_string())?,
            }
            ctx.request_location(target);
            Ok(())
        })
        .action("store", |ctx| {
            let found: Located = ctx.data()?;
            ctx.set("later", format!("{:?}", found.location))?;
            ctx.set("later_type", found.entry.machine_type.to_string())?;
            ctx.set("event", ctx.event_name().to_owned())
        })
        .action("storeError", |ctx| {
            let f: SendFailure = ctx.data()?;
            ctx.set("error", f)?;
            ctx.set("event", ctx.event_name().to_owned())
        });
    let _peer: Node = session.machine("peer", "Peer").build().await.unwrap();
    let finder = interp(FINDER, &actions);

    let a = finder.bind(&session, "a", "Finder").build().await.unwrap();
    a.send("FIND", "peer".to_string())
        .await
        .expect("the machine takes the event");
    let snap = within(a.wait_for_state("found")).await;
    assert_eq!(snap.context["now"], "SameProcess");
    assert_eq!(snap.context["now_type"], "Peer");
    assert_eq!(snap.context["later"], "SameProcess");
    assert_eq!(snap.context["later_type"], "Peer");
    assert_eq!(snap.context["event"], "done.locate.peer");

    let b = finder.bind(&session, "b", "Finder").build().await.unwrap();
    b.send("FIND", "nobody".to_string())
        .await
        .expect("the machine takes the event");
    let snap = within(b.wait_for_state("lost")).await;
    assert!(
        snap.context["now_error"]
            .as_str()
            .is_some_and(|e| e.contains("nobody")),
        "{snap:?}"
    );
    assert_eq!(snap.context["event"], "error.locate.nobody");
    assert_eq!(snap.context["error"]["target"], "nobody");
    assert_eq!(snap.context["error"]["event"], "locate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_actions_report_error_action_and_keep_state() {
    let json = r#"{
      "id": "fragile", "initial": "ok", "context": { "n": 0, "errors": [] },
      "states": {
        "ok": {
          "on": {
            "INC": { "actions": "inc" },
            "BAD": { "target": "other", "actions": ["inc", "fail"] },
            "PANIC": { "target": "other", "actions": ["inc", "boom"] },
            "error.action": { "actions": "recordError" }
          }
        },
        "other": {}
      }
    }"#;
    let actions = Actions::new()
        .action("inc", |ctx| {
            let n: u64 = ctx.get("n")?;
            ctx.set("n", n + 1)
        })
        .action("fail", |_| Err("the database is down".into()))
        .action("boom", |_| panic!("boom"))
        .action("recordError", |ctx| {
            assert_eq!(ctx.event_name(), ERROR_ACTION);
            let f: Failure = ctx.data()?;
            let mut errors: Vec<Failure> = ctx.get("errors")?;
            errors.push(f);
            ctx.set("errors", errors)
        });
    let session = switchyard::builder().build().unwrap();
    let m = interp(json, &actions)
        .bind(&session, "fragile", "Fragile")
        .build()
        .await
        .unwrap();
    let sender = session.machine("sender", "Sender").build().await.unwrap();
    for ev in ["INC", "BAD", "PANIC", "INC"] {
        sender.send("fragile", ev, ()).await.unwrap();
    }
    let snap = within(m.wait_until(|s| {
        s.context["n"] == 2 && s.context["errors"].as_array().is_some_and(|e| e.len() == 2)
    }))
    .await;
    assert_eq!(
        snap.value,
        json!("ok"),
        "the failed events were rolled back"
    );
    let errors: Vec<Failure> = serde_json::from_value(snap.context["errors"].clone()).unwrap();
    assert_eq!(errors[0].kind, FailureKind::Action);
    assert_eq!(errors[0].name, "fail");
    assert_eq!(errors[0].event, "BAD");
    assert_eq!(errors[0].message, "the database is down");
    assert_eq!(errors[1].kind, FailureKind::Panic);
    assert_eq!(errors[1].name, "boom");
    // Still alive.
    sender.send("fragile", "BAD", ()).await.unwrap();
    within(m.wait_until(|s| s.context["errors"].as_array().is_some_and(|e| e.len() == 3))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_on_two_transports_are_serialised() {
    const N: u64 = 300;
    let json = r#"{"id":"counter","initial":"on","context":{"n":0,"by":{}},
        "states":{"on":{"on":{"INC":{"actions":"inc"}}}}}"#;
    let actions = Actions::new().action("inc", |ctx| {
        let via = ctx
            .event()
            .origin()
            .and_then(|o| o.transport)
            .unwrap_or("local");
        let n: u64 = ctx.get("n")?;
        ctx.set("n", n + 1)?;
        let by = &mut ctx.context_mut()["by"][via];
        *by = json!(by.as_u64().unwrap_or(0) + 1);
        Ok(())
    });
    let session = switchyard::builder().build().unwrap();
    let ctx = session.context();
    let counter = interp(json, &actions)
        .bind(&session, "counter", "Counter")
        .configure(|b| b.context(ctx))
        .build()
        .await
        .unwrap();
    let near = session
        .machine("near", "Sender")
        .context(ctx)
        .build()
        .await
        .unwrap();
    let far = session.machine("far", "Sender").build().await.unwrap();
    let mut tasks = Vec::new();
    for node in [near, far] {
        tasks.push(tokio::spawn(async move {
            for _ in 0..N {
                node.send("counter", "INC", ()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let snap = within(counter.wait_until(|s| s.context["n"] == 2 * N)).await;
    assert_eq!(snap.context["by"], json!({ "direct": N, "memory": N }));
    assert_eq!(counter.dropped_events(), 0);
}

#[tokio::test]
async fn failing_initial_entry_fails_build() {
    let json = r#"{"id":"bad","initial":"a","states":{"a":{"entry":"explode"}}}"#;
    let actions = Actions::new().action("explode", |_| Err("no config".into()));
    let session = switchyard::builder().build().unwrap();
    let err = interp(json, &actions)
        .bind(&session, "bad", "Bad")
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, switchyard_machine::MachineError::Start { failure, .. } if failure.name == "explode"),
        "{err:?}"
    );
    assert!(session.node("bad").is_none(), "the node left the session");
}

#[tokio::test]
async fn failed_send_raises_error_communication() {
    let json = r#"{"id":"lonely","initial":"a","context":{},"states":{"a":{"on":{
        "CALL":{"actions":"call"},
        "error.communication":{"target":"b","actions":"keep"}}},"b":{}}}"#;
    let actions = Actions::new()
        .action("call", |ctx| {
            ctx.send("nobody", "HELLO", ());
            Ok(())
        })
        .action("keep", |ctx| {
            let f: SendFailure = ctx.data()?;
            ctx.set("failure", f)
        });
    let session = switchyard::builder().build().unwrap();
    let m = interp(json, &actions)
        .bind(&session, "lonely", "Lonely")
        .build()
        .await
        .unwrap();
    m.send("CALL", ())
        .await
        .expect("the machine takes the event");
    let snap = within(m.wait_for_state("b")).await;
    assert_eq!(snap.context["failure"]["target"], "nobody");
    assert_eq!(snap.context["failure"]["event"], "HELLO");
}

#[tokio::test(start_paused = true)]
async fn self_delayed_and_published_sends() {
    let json = r#"{
      "id": "sender", "initial": "idle", "context": {},
      "states": {
        "idle": { "on": { "GO": { "target": "first", "actions": "selfNext" } } },
        "first": { "on": { "NEXT": "second" } },
        "second": { "entry": "snooze", "on": { "WAKE": { "target": "awake", "actions": "announce" } } },
        "awake": {}
      }
    }"#;
    let actions = Actions::new()
        .action("selfNext", |ctx| {
            ctx.send_self("NEXT", ());
            Ok(())
        })
        .action("snooze", |ctx| {
            let me = ctx.machine_id().to_owned();
            ctx.send_delayed(me, "WAKE", (), Duration::from_millis(300));
            Ok(())
        })
        .action("announce", |ctx| {
            ctx.publish("news.awake", "AWAKE", ctx.machine_id().to_owned());
            Ok(())
        });
    let session = memory_session();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = session
        .machine("reader", "Reader")
        .handler(move |_n: &Node, env: switchyard::Envelope| {
            let _ = tx.send((env.name().to_owned(), env.data::<String>().unwrap()));
        })
        .build()
        .await
        .unwrap();
    reader.subscribe("news.#").await.unwrap();
    let m = interp(json, &actions)
        .bind(&session, "sleeper", "Sleeper")
        .build()
        .await
        .unwrap();
    let start = Instant::now();
    m.send("GO", ()).await.expect("the machine takes the event");
    // send_self is handled right after GO, before `send` returns to us.
    assert!(m.matches("second"));
    within(m.wait_for_state("awake")).await;
    assert!(start.elapsed() >= Duration::from_millis(300));
    let (name, who) = within(rx.recv()).await.unwrap();
    assert_eq!((name.as_str(), who.as_str()), ("AWAKE", "sleeper"));
}

#[tokio::test(start_paused = true)]
async fn stop_cancels_timers_and_leaves_the_session() {
    let session = memory_session();
    let light = interp(
        include_str!("fixtures/traffic_light.json"),
        &traffic_actions(),
    )
    .bind(&session, "light", "TrafficLight")
    .build()
    .await
    .unwrap();
    assert!(session.node("light").is_some());
    light.stop().await.unwrap();
    assert!(session.node("light").is_none());
    let before = light.transitions();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(light.transitions(), before, "no timer fired after stop");
    assert!(light.matches("green"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_editor_publishes_each_region() {
    let session = memory_session();
    let mut states = Observer::new(&session, "watch", "state.editor.#").await;
    let editor = interp(include_str!("fixtures/text_editor.json"), &Actions::new())
        .bind(&session, "editor", "Editor")
        .build()
        .await
        .unwrap();
    for topic in [
        "state.editor.bold.off",
        "state.editor.italic.off",
        "state.editor.underline.off",
    ] {
        assert_eq!(states.next().await.0, topic);
    }
    let user = session.machine("user", "User").build().await.unwrap();
    user.send("editor", "TOGGLE_BOLD", ()).await.unwrap();
    let (topic, change) = states.next().await;
    assert_eq!(topic, "state.editor.bold.on");
    assert_eq!(change.event, "TOGGLE_BOLD");
    assert_eq!(
        change.value,
        json!({ "bold": "on", "italic": "off", "underline": "off" })
    );
    user.send("editor", "TOGGLE_ITALIC", ()).await.unwrap();
    assert_eq!(states.next().await.0, "state.editor.italic.on");
    assert!(editor.matches("bold.on") && editor.matches("italic.on"));
    assert!(editor.snapshot().matches("underline.off"));
}

#[tokio::test]
async fn nested_player_over_direct() {
    let session = common::direct_session();
    let ctx = session.context();
    let actions = Actions::new()
        .action("log", |_| Ok(()))
        .action("nextTrack", |ctx| {
            let t: u64 = ctx.get("track")?;
            ctx.set("track", t + 1)
        });
    let player = interp(include_str!("fixtures/media_player.json"), &actions)
        .bind(&session, "player", "Player")
        .configure(|b| b.context(ctx))
        .build()
        .await
        .unwrap();
    let remote = session
        .machine("remote", "Remote")
        .context(ctx)
        .build()
        .await
        .unwrap();
    for ev in ["PLAY", "PAUSE", "NEXT", "FF"] {
        let r = remote.send("player", ev, ()).await;
        assert!(r.is_ok(), "{ev}: {r:?}");
    }
    // A bound machine's handler is async, so direct hands the events to its mailbox task.
    let snap = common::within(player.wait_for_state("active.fastForward")).await;
    assert_eq!(snap.value, json!({ "active": "fastForward" }));
    assert_eq!(snap.context["track"], 1);
    remote.send("player", "STOP", ()).await.unwrap();
    common::within(player.wait_for_state("stopped")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_of_one_step_go_out_in_order() {
    let asker = r#"{"id":"asker","initial":"a","states":{
        "a":{"on":{"GO":{"target":"b","actions":["first","second"]}}},
        "b":{"on":{"done.request.ADD":"c"}},
        "c":{}}}"#;
    let recorder = r#"{"id":"rec","initial":"on","context":{"seen":[]},"states":{"on":{"on":{
        "ADD":{"actions":["record","answer"]},
        "*":{"actions":"record"}}}}}"#;
    let actions = request_actions()
        .action("first", |ctx| {
            ctx.send("rec", "ONE", ());
            ctx.request("rec", "ADD", (1u32, 1u32), Duration::from_secs(5));
            Ok(())
        })
        .action("second", |ctx| {
            ctx.send_to_any_of_type("Recorder", "THREE", ());
            ctx.send("rec", "FOUR", ());
            Ok(())
        })
        .action("record", |ctx| {
            let name = ctx.event_name().to_owned();
            let mut seen: Vec<String> = ctx.get("seen")?;
            seen.push(name);
            ctx.set("seen", seen)
        });
    let session = memory_session();
    let rec = interp(recorder, &actions)
        .bind(&session, "rec", "Recorder")
        .build()
        .await
        .unwrap();
    let m = interp(asker, &actions)
        .bind(&session, "asker", "Asker")
        .build()
        .await
        .unwrap();
    m.send("GO", ()).await.expect("the machine takes the event");
    within(m.wait_for_state("c")).await;
    let snap =
        within(rec.wait_until(|s| s.context["seen"].as_array().is_some_and(|a| a.len() == 4)))
            .await;
    assert_eq!(snap.context["seen"], json!(["ONE", "ADD", "THREE", "FOUR"]));
}

#[tokio::test]
async fn send_says_when_the_machine_did_not_take_the_event() {
    let session = memory_session();
    let json =
        r#"{"id":"m","initial":"a","states":{"a":{"on":{"END":"over"}},"over":{"type":"final"}}}"#;
    let m = interp(json, &Actions::new())
        .bind(&session, "ender", "Ender")
        .build()
        .await
        .unwrap();
    m.send("NOTHING", ())
        .await
        .expect("an unhandled event is still taken");
    m.send("END", ()).await.expect("END is taken");
    assert!(m.is_done());
    let e = m
        .send("END", ())
        .await
        .expect_err("a done machine takes nothing");
    assert!(
        matches!(e, MachineError::Done { ref id } if id == "ender"),
        "{e}"
    );

    let m = interp(json, &Actions::new())
        .bind(&session, "stopper", "Ender")
        .build()
        .await
        .unwrap();
    m.stop().await.unwrap();
    let e = m
        .send("END", ())
        .await
        .expect_err("a stopped machine takes nothing");
    assert!(
        matches!(e, MachineError::Stopped { ref id } if id == "stopper"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_reports_a_full_queue() {
    let session = memory_session();
    let json = r#"{"id":"m","initial":"a","states":{"a":{"on":{"SLOW":{"actions":"hold"}}}}}"#;
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let (release, held) = std::sync::mpsc::channel::<()>();
    let held = std::sync::Mutex::new(held);
    // `hold` keeps the machine busy (its worker thread blocked) until the test releases it.
    let actions = Actions::new().action("hold", move |_| {
        let _ = started_tx.send(());
        let _ = held.lock().unwrap().recv();
        Ok(())
    });
    let m = interp(json, &actions)
        .bind(&session, "busy", "Busy")
        .queue_capacity(1)
        .build()
        .await
        .unwrap();
    let busy = m.clone();
    let slow = tokio::spawn(async move { busy.send("SLOW", ()).await });
    within(started.recv()).await.expect("hold runs");
    // SLOW is being handled: one event fits in the queue behind it, the next does not.
    m.send("QUEUED", ())
        .await
        .expect("the queue has room for one");
    let e = m.send("DROPPED", ()).await.expect_err("the queue is full");
    assert!(
        matches!(e, MachineError::QueueFull { ref id, capacity: 1 } if id == "busy"),
        "{e}"
    );
    assert_eq!(m.dropped_events(), 1);
    release.send(()).unwrap();
    within(slow).await.unwrap().expect("SLOW was taken");
}
