//! The pure interpreter, fed events directly (no tokio, no Node).

use std::time::Duration;

use serde_json::{Value, json};
use switchyard_machine::{
    ActionError, Actions, Effect, Event, FailureKind, Interpreter, MachineState, Status,
    TimerCommand,
};

const TRAFFIC: &str = include_str!("fixtures/traffic_light.json");
const PLAYER: &str = include_str!("fixtures/media_player.json");
const EDITOR: &str = include_str!("fixtures/text_editor.json");
const DOOR: &str = include_str!("fixtures/door.json");

fn ev(name: &str) -> Event {
    Event::new(name)
}

fn started(interp: &Interpreter) -> MachineState {
    let mut st = interp.new_state();
    let step = interp.start(&mut st);
    assert!(step.failure.is_none(), "{:?}", step.failure);
    st
}

fn leaves(interp: &Interpreter, st: &MachineState) -> Vec<String> {
    interp.active_leaves(st).map(str::to_owned).collect()
}

fn log_actions() -> Actions {
    Actions::new()
        .action("log", |ctx| {
            let msg = ctx
                .params()
                .and_then(|p| p.get("msg"))
                .cloned()
                .unwrap_or(Value::Null);
            match ctx.context_mut().get_mut("log") {
                Some(Value::Array(a)) => a.push(msg),
                _ => return Err(ActionError::new("context.log is not an array")),
            }
            Ok(())
        })
        .action("nextTrack", |ctx| {
            let t: u64 = ctx.get("track")?;
            ctx.set("track", t + 1)
        })
}

fn take_log(st: &mut MachineState) -> Vec<String> {
    st.context()["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn flat_toggle() {
    let interp = Interpreter::from_json(
        r#"{"id":"t","initial":"a","states":{"a":{"on":{"T":"b"}},"b":{"on":{"T":"a"}}}}"#,
        &Actions::new(),
    )
    .unwrap();
    let mut st = interp.new_state();
    assert_eq!(interp.snapshot(&st).status, Status::Idle);
    interp.start(&mut st);
    assert!(interp.matches(&st, "a"));
    let step = interp.send(&mut st, &ev("T"));
    assert!(step.transitioned);
    assert!(interp.matches(&st, "b") && !interp.matches(&st, "a"));
    assert_eq!(interp.snapshot(&st).value, json!("b"));
    // Unknown events are ignored.
    let step = interp.send(&mut st, &ev("NOPE"));
    assert!(!step.transitioned && step.failure.is_none());
    interp.send(&mut st, &ev("T"));
    assert!(interp.matches(&st, "a"));
}

#[test]
fn traffic_light_timers_start_and_cancel() {
    let actions = Actions::new().action("countCycle", |ctx| {
        let n: u64 = ctx.get("cycles")?;
        ctx.set("cycles", n + 1)
    });
    let interp = Interpreter::from_json(TRAFFIC, &actions).unwrap();
    let mut st = started(&interp);
    let timers = st.take_timers();
    assert_eq!(timers.len(), 1);
    let TimerCommand::Start(green_timer, d) = timers[0] else {
        panic!("expected a start, got {timers:?}")
    };
    assert_eq!(d, Duration::from_millis(1000));

    // The timer elapses: green -> yellow, green's timer is cancelled (it fired), yellow's starts.
    let step = interp.fire(&mut st, green_timer);
    assert!(step.transitioned);
    assert!(interp.matches(&st, "yellow"));
    let timers = st.take_timers();
    assert!(matches!(timers[0], TimerCommand::Cancel(id) if id == green_timer));
    let TimerCommand::Start(yellow_timer, d) = timers[1] else {
        panic!()
    };
    assert_eq!(d, Duration::from_millis(500));

    // The stale green timer (state already left) is ignored.
    assert!(!interp.fire(&mut st, green_timer).transitioned);

    // yellow -> red.walk: red's and walk's timers start, in document order.
    interp.fire(&mut st, yellow_timer);
    assert!(interp.matches(&st, "red.walk"));
    assert_eq!(st.context()["cycles"], 1);
    let timers = st.take_timers();
    let starts: Vec<Duration> = timers
        .iter()
        .filter_map(|t| match t {
            TimerCommand::Start(_, d) => Some(*d),
            TimerCommand::Cancel(_) => None,
        })
        .collect();
    assert_eq!(
        starts,
        [Duration::from_millis(2000), Duration::from_millis(800)]
    );
    let TimerCommand::Start(red_timer, _) = timers[1] else {
        panic!()
    };
    let TimerCommand::Start(walk_timer, _) = timers[2] else {
        panic!()
    };
    interp.fire(&mut st, walk_timer);
    assert!(interp.matches(&st, "red.wait"));
    let _ = st.take_timers();
    // red's own timer takes the whole red state out: wait's timer is cancelled.
    interp.fire(&mut st, red_timer);
    assert!(interp.matches(&st, "green"));
    let cancels = st
        .take_timers()
        .iter()
        .filter(|t| matches!(t, TimerCommand::Cancel(_)))
        .count();
    assert_eq!(cancels, 2, "red.wait and red are both left");
}

#[test]
fn media_player_nested_entry_exit_order() {
    let interp = Interpreter::from_json(PLAYER, &log_actions()).unwrap();
    let mut st = started(&interp);
    assert_eq!(take_log(&mut st), ["enter stopped"]);

    interp.send(&mut st, &ev("PLAY"));
    assert!(interp.matches(&st, "active") && interp.matches(&st, "active.playing"));
    assert_eq!(interp.snapshot(&st).value, json!({"active": "playing"}));
    assert_eq!(
        take_log(&mut st)[1..],
        ["exit stopped", "start", "enter active", "enter playing"]
    );

    interp.send(&mut st, &ev("PAUSE"));
    assert!(interp.matches(&st, "active.paused"));
    assert!(interp.snapshot(&st).matches("active.paused"));
    assert!(!interp.snapshot(&st).matches("active.playing"));

    // NEXT targets `.playing`: internal to `active`, which is not exited.
    let before = take_log(&mut st).len();
    interp.send(&mut st, &ev("NEXT"));
    assert!(interp.matches(&st, "active.playing"));
    assert_eq!(st.context()["track"], 1);
    assert_eq!(
        take_log(&mut st)[before..],
        ["exit paused", "enter playing"]
    );

    // RESTART (`reenter: true`) exits and re-enters `active`.
    let before = take_log(&mut st).len();
    interp.send(&mut st, &ev("RESTART"));
    assert_eq!(
        take_log(&mut st)[before..],
        [
            "exit playing",
            "exit active",
            "enter active",
            "enter playing"
        ]
    );

    // STOP is handled by the parent from a nested state.
    interp.send(&mut st, &ev("FF"));
    assert!(interp.matches(&st, "active.fastForward"));
    interp.send(&mut st, &ev("STOP"));
    assert!(interp.matches(&st, "stopped") && !interp.matches(&st, "active"));
    assert_eq!(interp.snapshot(&st).value, json!("stopped"));
}

#[test]
fn parallel_text_editor() {
    let interp = Interpreter::from_json(EDITOR, &Actions::new()).unwrap();
    let mut st = started(&interp);
    assert_eq!(
        interp.snapshot(&st).value,
        json!({"bold": "off", "italic": "off", "underline": "off"})
    );
    assert_eq!(
        leaves(&interp, &st),
        ["bold.off", "italic.off", "underline.off"]
    );
    interp.send(&mut st, &ev("TOGGLE_BOLD"));
    interp.send(&mut st, &ev("TOGGLE_UNDERLINE"));
    assert_eq!(
        interp.snapshot(&st).value,
        json!({"bold": "on", "italic": "off", "underline": "on"})
    );
    assert_eq!(
        interp.entered_paths(&st).collect::<Vec<_>>(),
        ["underline.on"]
    );
    interp.send(&mut st, &ev("TOGGLE_BOLD"));
    assert!(interp.matches(&st, "bold.off") && interp.matches(&st, "underline.on"));
    // A multi-target transition resets every region.
    interp.send(&mut st, &ev("TOGGLE_ITALIC"));
    interp.send(&mut st, &ev("RESET"));
    assert_eq!(
        interp.snapshot(&st).value,
        json!({"bold": "off", "italic": "off", "underline": "off"})
    );
}

fn door_actions() -> Actions {
    Actions::new()
        .guard("codeMatches", |g| {
            g.data::<String>().as_deref() == g.get::<String>("code").as_deref()
        })
        .guard("tooManyAttempts", |g| {
            let max = g
                .params()
                .and_then(|p| p["max"].as_u64())
                .unwrap_or(u64::MAX);
            g.get::<u64>("attempts").unwrap_or(0) >= max
        })
        .action("countAttempt", |ctx| {
            let n: u64 = ctx.get("attempts")?;
            ctx.set("attempts", n + 1)
        })
}

#[test]
fn guards_choose_between_candidates() {
    let interp = Interpreter::from_json(DOOR, &door_actions()).unwrap();

    // Right code: the first candidate.
    let mut st = started(&interp);
    interp.send(&mut st, &Event::with_data("UNLOCK", "1234".to_string()));
    assert!(interp.matches(&st, "opened"));

    // Wrong codes: the targetless third candidate counts, until the second (v4 `cond`) fires.
    let mut st = started(&interp);
    for attempt in 1..=2u64 {
        let step = interp.send(&mut st, &Event::with_data("UNLOCK", "0000".to_string()));
        assert!(step.transitioned);
        assert!(interp.matches(&st, "closed"));
        assert_eq!(st.context()["attempts"], attempt);
        assert!(interp.entered_paths(&st).next().is_none(), "targetless");
    }
    interp.send(&mut st, &Event::with_data("UNLOCK", "0000".to_string()));
    assert!(interp.matches(&st, "alarm"));
    assert!(st.is_done());
    assert_eq!(interp.snapshot(&st).status, Status::Done);
    // A done machine ignores events.
    assert!(
        !interp
            .send(&mut st, &Event::with_data("UNLOCK", "1234".to_string()))
            .transitioned
    );
}

#[test]
fn always_and_on_done() {
    let json = r#"{
      "id": "job", "initial": "work", "context": { "n": 0 },
      "states": {
        "work": {
          "initial": "step",
          "states": {
            "step": { "on": { "TICK": { "target": "check", "actions": "inc" } } },
            "check": { "always": [ { "target": "finished", "guard": "enough" }, { "target": "step" } ] },
            "finished": { "type": "final" }
          },
          "onDone": "report"
        },
        "report": { "type": "final" }
      }
    }"#;
    let actions = Actions::new()
        .action("inc", |ctx| {
            let n: u64 = ctx.get("n")?;
            ctx.set("n", n + 1)
        })
        .guard("enough", |g| g.get::<u64>("n") >= Some(3));
    let interp = Interpreter::from_json(json, &actions).unwrap();
    let mut st = started(&interp);
    interp.send(&mut st, &ev("TICK"));
    assert!(interp.matches(&st, "work.step"), "always went back to step");
    interp.send(&mut st, &ev("TICK"));
    interp.send(&mut st, &ev("TICK"));
    assert!(
        interp.matches(&st, "report"),
        "final child raised done.state.job.work"
    );
    assert!(st.is_done());
}

#[test]
fn parallel_completion_raises_done() {
    let json = r#"{
      "id": "p", "initial": "both",
      "states": {
        "both": {
          "type": "parallel",
          "states": {
            "a": { "initial": "x", "states": { "x": { "on": { "A": "y" } }, "y": { "type": "final" } } },
            "b": { "initial": "x", "states": { "x": { "on": { "B": "y" } }, "y": { "type": "final" } } }
          },
          "onDone": "over"
        },
        "over": {}
      }
    }"#;
    let interp = Interpreter::from_json(json, &Actions::new()).unwrap();
    let mut st = started(&interp);
    interp.send(&mut st, &ev("A"));
    assert!(interp.matches(&st, "both.a.y"));
    interp.send(&mut st, &ev("B"));
    assert!(interp.matches(&st, "over"));
}

#[test]
fn failing_action_rolls_back_the_event() {
    let json = r#"{
      "id": "f", "initial": "a", "context": { "n": 0 },
      "states": {
        "a": { "on": { "GO": { "target": "b", "actions": ["inc", "fail"] }, "BOOM": { "target": "b", "actions": ["inc", "boom"] } } },
        "b": { "entry": "send", "after": { "10": "a" } }
      }
    }"#;
    let actions = Actions::new()
        .action("inc", |ctx| {
            let n: u64 = ctx.get("n")?;
            ctx.set("n", n + 1)
        })
        .action("fail", |_| Err(ActionError::new("disk full")))
        .action("boom", |_| panic!("kaboom"))
        .action("send", |ctx| {
            ctx.send("other", "HELLO", 1u8);
            Ok(())
        });
    let interp = Interpreter::from_json(json, &actions).unwrap();
    let mut st = started(&interp);
    let step = interp.send(&mut st, &ev("GO"));
    let f = step.failure.expect("failure reported");
    assert_eq!(f.kind, FailureKind::Action);
    assert_eq!(f.name, "fail");
    assert_eq!(f.event, "GO");
    assert_eq!(f.message, "disk full");
    assert!(interp.matches(&st, "a"), "configuration rolled back");
    assert_eq!(st.context()["n"], 0, "context rolled back");
    assert!(!st.has_effects() && !st.has_timers());

    let step = interp.send(&mut st, &ev("BOOM"));
    let f = step.failure.expect("panic reported");
    assert_eq!(f.kind, FailureKind::Panic);
    assert_eq!(f.message, "kaboom");
    assert!(interp.matches(&st, "a"));

    // The machine keeps working.
    let ok = Interpreter::from_json(&json.replace(r#"["inc", "fail"]"#, r#"["inc"]"#), &actions)
        .unwrap();
    let mut st = started(&ok);
    assert!(ok.send(&mut st, &ev("GO")).transitioned);
    assert!(ok.matches(&st, "b"));
    let effects = st.take_effects();
    assert_eq!(effects.len(), 1);
    match &effects[0] {
        Effect::Send { to, event, payload } => {
            assert_eq!(to.as_str(), "other");
            assert_eq!(&**event, "HELLO");
            assert_eq!(payload.to_json().unwrap(), json!(1));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn eventless_loop_is_a_failure_not_a_hang() {
    let json = r#"{"id":"l","initial":"a","states":{
        "a":{"on":{"GO":"b"}},
        "b":{"always":"c"},
        "c":{"always":"b"}}}"#;
    let interp = Interpreter::from_json(json, &Actions::new()).unwrap();
    let mut st = started(&interp);
    let step = interp.send(&mut st, &ev("GO"));
    assert_eq!(step.failure.unwrap().kind, FailureKind::Loop);
    assert!(interp.matches(&st, "a"));
}

#[test]
fn wildcards_and_event_data() {
    let json = r#"{"id":"w","initial":"a","context":{"seen":[]},"states":{
        "a":{"on":{"feedback.*":{"actions":"record"},"*":{"target":"b","actions":"record"}}},
        "b":{}}}"#;
    let actions = Actions::new().action("record", |ctx| {
        let name = ctx.event_name().to_owned();
        if let Some(Value::Array(a)) = ctx.context_mut().get_mut("seen") {
            a.push(Value::String(name));
        }
        Ok(())
    });
    let interp = Interpreter::from_json(json, &actions).unwrap();
    let mut st = started(&interp);
    interp.send(&mut st, &ev("feedback.good"));
    assert!(interp.matches(&st, "a"));
    interp.send(&mut st, &ev("feedbackish"));
    assert!(interp.matches(&st, "b"));
    assert_eq!(
        st.context()["seen"],
        json!(["feedback.good", "feedbackish"])
    );
}

#[test]
fn root_parallel_and_ids() {
    let json = r##"{"id":"m","initial":"a","states":{
        "a":{"id":"first","on":{"GO":"#m.b.deep"}},
        "b":{"initial":"shallow","states":{"shallow":{},"deep":{"on":{"BACK":"#first"}}}}}}"##;
    let interp = Interpreter::from_json(json, &Actions::new()).unwrap();
    let mut st = started(&interp);
    interp.send(&mut st, &ev("GO"));
    assert!(interp.matches(&st, "b.deep"));
    interp.send(&mut st, &ev("BACK"));
    assert!(interp.matches(&st, "a"));
}

#[test]
fn snapshot_serializes() {
    let interp = Interpreter::from_json(PLAYER, &log_actions()).unwrap();
    let mut st = started(&interp);
    interp.send(&mut st, &ev("PLAY"));
    let snap = interp.snapshot(&st);
    let text = serde_json::to_string(&snap).unwrap();
    let back: switchyard_machine::Snapshot = serde_json::from_str(&text).unwrap();
    assert_eq!(back, snap);
    assert_eq!(back.status, Status::Active);
    assert!(text.contains(r#""value":{"active":"playing"}"#), "{text}");
}

#[test]
fn self_transitions_follow_xstate_v5_reenter() {
    let json = r#"{
      "id": "s", "initial": "a", "context": { "log": [] },
      "states": {
        "a": {
          "entry": { "type": "log", "params": { "msg": "enter a" } },
          "exit": { "type": "log", "params": { "msg": "exit a" } },
          "after": { "100": "b" },
          "on": {
            "SELF": "a",
            "AGAIN": { "target": "a", "reenter": true },
            "AGAIN_V4": { "target": "a", "internal": false }
          }
        },
        "b": {
          "initial": "x",
          "entry": { "type": "log", "params": { "msg": "enter b" } },
          "on": { "RESET": "b", "Y": ".y" },
          "states": {
            "x": { "entry": { "type": "log", "params": { "msg": "enter x" } } },
            "y": { "exit": { "type": "log", "params": { "msg": "exit y" } } }
          }
        }
      }
    }"#;
    let interp = Interpreter::from_json(json, &log_actions()).unwrap();
    let mut st = started(&interp);
    let _ = st.take_timers();
    let n = take_log(&mut st).len();

    // Default: neither exits nor re-enters, the timer keeps running.
    assert!(interp.send(&mut st, &ev("SELF")).transitioned);
    assert_eq!(take_log(&mut st).len(), n);
    assert!(!st.has_timers());
    assert!(interp.entered_paths(&st).next().is_none());

    // `reenter: true` (v5) and `internal: false` (v4) exit and re-enter, restarting the timer.
    for event in ["AGAIN", "AGAIN_V4"] {
        let n = take_log(&mut st).len();
        interp.send(&mut st, &ev(event));
        assert_eq!(take_log(&mut st)[n..], ["exit a", "enter a"], "{event}");
        let timers = st.take_timers();
        assert!(matches!(
            timers[..],
            [TimerCommand::Cancel(_), TimerCommand::Start(..)]
        ));
    }

    // A compound self-transition restarts at the initial child without leaving the state.
    let TimerCommand::Start(t, _) = interp_timer(&interp, &mut st) else {
        panic!()
    };
    interp.fire(&mut st, t);
    interp.send(&mut st, &ev("Y"));
    assert!(interp.matches(&st, "b.y"));
    let n = take_log(&mut st).len();
    interp.send(&mut st, &ev("RESET"));
    assert!(interp.matches(&st, "b.x"));
    assert_eq!(take_log(&mut st)[n..], ["exit y", "enter x"]);
}

/// Re-enters `a` once more and returns the timer it starts.
fn interp_timer(interp: &Interpreter, st: &mut MachineState) -> TimerCommand {
    interp.send(st, &ev("AGAIN"));
    st.take_timers()[1]
}

#[test]
fn loads_from_a_json_value() {
    let chart = switchyard_machine::Chart::from_value(&json!({
        "id": "v", "initial": "a", "context": { "k": 1 },
        "states": { "a": { "on": { "GO": "b" } }, "b": {} }
    }))
    .unwrap();
    assert_eq!(chart.id(), "v");
    assert_eq!(chart.initial_context(), &json!({ "k": 1 }));
    let interp = Interpreter::new(chart, &Actions::new()).unwrap();
    let mut st = started(&interp);
    interp.send(&mut st, &ev("GO"));
    assert!(interp.matches(&st, "b"));
}

#[test]
fn virtual_clock_fires_in_due_order() {
    // a: 300 ms to b; b: 100 ms to c (counted from b's entry); p's regions race on 200 ms.
    let json = r#"{
      "id": "c", "type": "parallel",
      "states": {
        "x": { "initial": "a", "states": {
          "a": { "after": { "300": { "target": "b", "actions": "log_a" } } },
          "b": { "after": { "100": { "target": "c", "actions": "log_b" } } },
          "c": {} } },
        "y": { "initial": "a", "states": {
          "a": { "after": { "200": { "target": "b", "actions": "log_ya" } } },
          "b": {} } },
        "z": { "initial": "a", "states": {
          "a": { "after": { "200": { "target": "b", "actions": "log_za" } } },
          "b": {} } }
      }
    }"#;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut actions = Actions::new();
    for name in ["log_a", "log_b", "log_ya", "log_za"] {
        let seen = seen.clone();
        actions = actions.action(name, move |ctx| {
            seen.lock()
                .unwrap()
                .push(format!("{name}@{}", ctx.event_name()));
            Ok(())
        });
    }
    let interp = Interpreter::from_json(json, &actions).unwrap();
    let mut st = started(&interp);
    assert_eq!(st.next_timer(), Some(Duration::from_millis(200)));

    // Nothing is due before 200 ms.
    assert!(
        interp
            .advance(&mut st, Duration::from_millis(199))
            .is_empty()
    );
    assert_eq!(st.now(), Duration::from_millis(199));

    // One advance past everything: y and z (same due time, in start order), then x.a at 300,
    // then x.b at 400 (100 ms after it was entered at 300, not after the advance began).
    let steps = interp.advance(&mut st, Duration::from_millis(1000));
    assert_eq!(steps.len(), 4);
    assert!(steps.iter().all(|s| s.transitioned && s.failure.is_none()));
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "log_ya@xstate.after.200.c.y.a",
            "log_za@xstate.after.200.c.z.a",
            "log_a@xstate.after.300.c.x.a",
            "log_b@xstate.after.100.c.x.b"
        ]
    );
    assert_eq!(st.now(), Duration::from_millis(1199));
    assert_eq!(st.next_timer(), None);
    assert_eq!(
        leaves(&interp, &st),
        ["x.c", "y.b", "z.b"],
        "every timer ran"
    );
}

#[test]
fn virtual_clock_drops_the_timers_of_exited_states() {
    let actions = Actions::new().action("countCycle", |ctx| {
        let n: u64 = ctx.get("cycles")?;
        ctx.set("cycles", n + 1)
    });
    let interp = Interpreter::from_json(TRAFFIC, &actions).unwrap();
    let mut st = started(&interp);
    assert!(
        interp
            .advance(&mut st, Duration::from_millis(400))
            .is_empty()
    );
    // Leaving green cancels its 1000 ms timer; red's and walk's count from now.
    interp.send(&mut st, &ev("EMERGENCY"));
    assert!(interp.matches(&st, "red.walk"));
    assert_eq!(st.next_timer(), Some(Duration::from_millis(1200)));
    // fire_due: one timer at a time, the clock at its due time; green's never comes.
    assert!(
        interp
            .fire_due(&mut st, Duration::from_millis(1199))
            .is_none()
    );
    let step = interp
        .fire_due(&mut st, Duration::from_millis(5000))
        .unwrap();
    assert!(step.transitioned);
    assert_eq!(st.now(), Duration::from_millis(1200));
    assert!(interp.matches(&st, "red.wait"));
    assert_eq!(
        interp.advance(&mut st, Duration::from_millis(1200)).len(),
        2
    );
    assert!(interp.matches(&st, "green"), "stop at 1800, green at 2400");
    assert_eq!(st.context()["cycles"], 1);
    // A host that takes no timer commands does not pile them up: a start and a cancel it
    // never saw drop each other, so only green's running timer is left.
    let timers = st.take_timers();
    assert!(
        matches!(timers[..], [TimerCommand::Start(_, d)] if d == Duration::from_millis(1000)),
        "{timers:?}"
    );
}

#[test]
fn completion_event_has_the_v5_name_and_the_v4_name_is_an_alias() {
    let json = r#"{
      "id": "job", "initial": "work", "context": { "seen": [] },
      "states": {
        "work": {
          "initial": "step",
          "states": { "step": { "on": { "FINISH": "finished" } }, "finished": { "type": "final" } },
          "on": { "done.state.job.work": { "target": "report", "actions": "record" } }
        },
        "report": {}
      }
    }"#;
    let actions = Actions::new().action("record", |ctx| {
        let name = ctx.event_name().to_owned();
        ctx.set("seen", [name])
    });
    let interp = Interpreter::from_json(json, &actions).unwrap();
    let mut st = started(&interp);
    interp.send(&mut st, &ev("FINISH"));
    assert!(interp.matches(&st, "report"));
    assert_eq!(st.context()["seen"], json!(["xstate.done.state.job.work"]));
}
