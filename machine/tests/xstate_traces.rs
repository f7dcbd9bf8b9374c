//! Replays the traces recorded from XState v5 itself (`machine/xstate-traces`, fixtures in
//! `tests/xstate/*.json`) on the pure [`Interpreter`] (its virtual clock) and on a machine
//! bound to a Node (a paused tokio clock), and fails on the first difference.
//!
//! Every fixture is a chart, the steps run on it (start, send an event, advance the clock) and
//! what XState showed after each step: state value, active leaf paths, status, context and the
//! actions that ran. The actions and guards are implemented here exactly as the recorder
//! implements them for XState (see `xstate-traces/xstate-run.mjs`).
//!
//! `XSTATE_TRACES_SUMMARY=1 cargo test -p switchyard-machine --test xstate_traces` replays every
//! chart instead of stopping at the first difference and prints how many agree.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use switchyard_machine::{
    Actions, Chart, Event, Interpreter, MachineError, MachineState, Snapshot, StateMachine, Status,
};

#[derive(Deserialize)]
struct Fixture {
    xstate: String,
    charts: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    /// Kept as text: document order decides initial states and candidate order.
    chart: Box<RawValue>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Step {
    #[serde(default)]
    start: bool,
    send: Option<serde_json::Map<String, Value>>,
    advance: Option<u64>,
    expect: Observation,
}

impl Step {
    fn describe(&self) -> String {
        if self.start {
            "start".into()
        } else if let Some(ev) = &self.send {
            format!("send {}", Value::Object(ev.clone()))
        } else {
            format!("advance {} ms", self.advance.unwrap_or(0))
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
struct Observation {
    value: Value,
    leaves: Vec<String>,
    status: String,
    context: Value,
    actions: Vec<String>,
}

fn fixtures() -> Vec<(String, Fixture)> {
    // XSTATE_TRACES_DIR: another corpus (`node record.mjs --out DIR`), e.g. a larger one.
    let dir = std::env::var_os("XSTATE_TRACES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/xstate"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("a readable fixture");
            let f: Fixture = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not a trace fixture: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), f)
        })
        .collect()
}

/// JSON with object keys sorted (the recorder's `canonical`).
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .iter()
                .map(|k| format!("{}:{}", Value::String((*k).clone()), canonical(&m[*k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

type Log = Arc<Mutex<Vec<String>>>;

/// The recorder's implementations: every action logs itself, `$inc` counts, `$below` compares
/// the count, any other guard reads a flag of the event.
fn actions_for(chart: &Chart, log: &Log) -> Actions {
    let mut actions = Actions::new();
    for name in chart.action_names() {
        let log = log.clone();
        let owned = name.to_owned();
        actions = if name == "$inc" {
            actions.action(name, move |ctx| {
                let n = ctx
                    .context()
                    .get("count")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                ctx.set("count", n + 1)?;
                log.lock().unwrap().push(owned.clone());
                Ok(())
            })
        } else {
            actions.action(name, move |ctx| {
                let entry = match ctx.params() {
                    Some(p) => format!("{owned}{}", canonical(p)),
                    None => owned.clone(),
                };
                log.lock().unwrap().push(entry);
                Ok(())
            })
        };
    }
    for name in chart.guard_names() {
        let owned = name.to_owned();
        actions = if name == "$below" {
            actions.guard(name, |g| {
                let n = g
                    .context()
                    .get("count")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                let max = g.params().and_then(|p| p.get("n")).and_then(Value::as_u64);
                max.is_some_and(|max| n < max)
            })
        } else {
            actions.guard(name, move |g| {
                g.data::<Value>()
                    .and_then(|d| d.get(&owned).cloned())
                    .is_some_and(|v| v == Value::Bool(true))
            })
        };
    }
    actions
}

fn event_of(send: &serde_json::Map<String, Value>) -> Event {
    let mut data = send.clone();
    let name = match data.remove("type") {
        Some(Value::String(s)) => s,
        other => panic!("an event without a string type: {other:?}"),
    };
    Event::with_data(name, Value::Object(data))
}

fn status_name(s: Status) -> &'static str {
    match s {
        Status::Idle => "idle",
        Status::Active => "active",
        Status::Done => "done",
    }
}

fn observe(interp: &Interpreter, st: &MachineState, log: &Log) -> Observation {
    let snap = interp.snapshot(st);
    Observation {
        value: snap.value,
        leaves: interp.active_leaves(st).map(str::to_owned).collect(),
        status: status_name(snap.status).to_owned(),
        context: snap.context,
        actions: std::mem::take(&mut *log.lock().unwrap()),
    }
}

fn interpreter_for(case: &Case, log: &Log) -> Result<Interpreter, String> {
    let chart = Chart::from_json(case.chart.get()).map_err(|e| format!("does not load: {e}"))?;
    let actions = actions_for(&chart, log);
    Interpreter::new(chart, &actions).map_err(|e| e.to_string())
}

/// Replays one case on the pure interpreter; `Err` describes the first difference.
fn replay_interpreter(case: &Case) -> Result<(), String> {
    let log: Log = Arc::default();
    let interp = interpreter_for(case, &log)?;
    let mut st = interp.new_state();
    for (i, step) in case.steps.iter().enumerate() {
        if step.start {
            let s = interp.start(&mut st);
            if let Some(f) = s.failure {
                return Err(format!("start failed: {f}"));
            }
        } else if let Some(ev) = &step.send {
            let s = interp.send(&mut st, &event_of(ev));
            if let Some(f) = s.failure {
                return Err(difference(case, i, &format!("the step failed: {f}"), None));
            }
        } else if let Some(ms) = step.advance {
            for s in interp.advance(&mut st, Duration::from_millis(ms)) {
                if let Some(f) = s.failure {
                    return Err(difference(
                        case,
                        i,
                        &format!("a timer step failed: {f}"),
                        None,
                    ));
                }
            }
        }
        let got = observe(&interp, &st, &log);
        if got != step.expect {
            return Err(difference(case, i, "", Some(&got)));
        }
    }
    Ok(())
}

fn observe_bound(m: &StateMachine, log: &Log) -> Observation {
    let Snapshot {
        value,
        context,
        status,
    } = m.snapshot();
    Observation {
        value,
        leaves: m.active_leaves(),
        status: status_name(status).to_owned(),
        context,
        actions: std::mem::take(&mut *log.lock().unwrap()),
    }
}

/// Replays one case on a machine bound to a Node of `session`, its timers on tokio's paused
/// clock; `Err` describes the first difference.
async fn replay_bound(session: &switchyard::Session, case: &Case, n: usize) -> Result<(), String> {
    let log: Log = Arc::default();
    let interp = interpreter_for(case, &log)?;
    let m = interp
        .bind(session, format!("trace{n}"), "Trace")
        .publish_states(false)
        .build()
        .await
        .map_err(|e| format!("does not start: {e}"))?;
    let r = async {
        for (i, step) in case.steps.iter().enumerate() {
            if let Some(ev) = &step.send {
                let done = m.is_done();
                let e = event_of(ev);
                let data = e.data::<Value>().map_err(|e| e.to_string())?;
                match (m.send(e.name().to_owned(), data).await, done) {
                    (Ok(()), false) | (Err(MachineError::Done { .. }), true) => {}
                    (r, _) => {
                        return Err(difference(case, i, &format!("send gave {r:?}"), None));
                    }
                }
            } else if let Some(ms) = step.advance {
                tokio::time::advance(Duration::from_millis(ms)).await;
                m.fire_due_timers()
                    .await
                    .map_err(|e| difference(case, i, &e.to_string(), None))?;
            }
            let got = observe_bound(&m, &log);
            if got != step.expect {
                return Err(difference(case, i, "", Some(&got)));
            }
        }
        Ok(())
    }
    .await;
    m.stop().await.map_err(|e| e.to_string())?;
    r
}

fn pretty(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// A readable account of a difference at step `i`: the steps so far, then field by field.
fn difference(case: &Case, i: usize, why: &str, got: Option<&Observation>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "chart `{}` differs from XState at step {i}", case.name);
    for (n, step) in case.steps.iter().enumerate().take(i + 1) {
        let _ = writeln!(
            s,
            "  {}{n}: {}",
            if n == i { "> " } else { "  " },
            step.describe()
        );
    }
    if !why.is_empty() {
        let _ = writeln!(s, "  {why}");
    }
    let want = &case.steps[i].expect;
    if let Some(got) = got {
        let fields: [(&str, String, String); 5] = [
            ("value", pretty(&want.value), pretty(&got.value)),
            ("leaves", pretty(&want.leaves), pretty(&got.leaves)),
            ("status", want.status.clone(), got.status.clone()),
            ("context", pretty(&want.context), pretty(&got.context)),
            ("actions", pretty(&want.actions), pretty(&got.actions)),
        ];
        for (name, w, g) in fields {
            if w != g {
                let _ = writeln!(s, "  {name}:\n    xstate:      {w}\n    switchyard:  {g}");
            }
        }
    }
    let _ = writeln!(s, "  chart: {}", case.chart.get());
    s
}

async fn replay_all(driver: &str, mut replay: impl AsyncFnMut(&Case, usize) -> Result<(), String>) {
    let summary = std::env::var_os("XSTATE_TRACES_SUMMARY").is_some();
    let mut total = 0;
    let mut agreed = 0;
    let mut failures = Vec::new();
    for (file, fixture) in fixtures() {
        let mut file_agreed = 0;
        for case in &fixture.charts {
            total += 1;
            match replay(case, total).await {
                Ok(()) => {
                    agreed += 1;
                    file_agreed += 1;
                }
                Err(diff) if summary => failures.push(diff),
                Err(diff) => panic!(
                    "{driver}: {file} (XState {}): {diff}\n({agreed} charts agreed before this one)",
                    fixture.xstate
                ),
            }
        }
        if summary {
            println!(
                "{driver}: {file}: {file_agreed}/{} charts agree",
                fixture.charts.len()
            );
        }
    }
    if summary {
        println!("{driver}: {agreed}/{total} charts agree with XState");
        for f in failures.iter().take(5) {
            println!("{f}");
        }
    }
    assert_eq!(
        agreed, total,
        "{driver}: {agreed}/{total} charts agree with XState"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn xstate_traces_on_the_interpreter() {
    replay_all("interpreter", async |case, _| replay_interpreter(case)).await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn xstate_traces_on_a_bound_machine() {
    // Direct transport only: nothing to publish to, every step runs on this task.
    let session = switchyard::builder()
        .selector(|s| s.without(["memory"]))
        .build()
        .expect("session builds");
    replay_all("bound machine", async |case, n| {
        replay_bound(&session, case, n).await
    })
    .await;
}
