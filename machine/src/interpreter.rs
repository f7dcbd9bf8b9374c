//! The pure interpreter: a chart plus its implementations, and the SCXML
//! transition function over a [`MachineState`]. No tokio, no Node: events go in,
//! a new configuration, context, effects and timer commands come out.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard_core::Node;

use crate::actions::{ActionContext, ActionFn, Actions, Effect, Event, GuardContext, GuardFn};
use crate::chart::{ActionRef, Chart, Matcher, StateKind};
use crate::error::{Failure, FailureKind, LoadError};

/// Most microsteps one event may cause before it is rolled back as a loop.
pub const MAX_MICROSTEPS: usize = 10_000;

/// The name of the event a machine receives when an action or guard failed.
pub const ERROR_ACTION: &str = "error.action";

/// The event an interpreter uses for the initial entry.
pub const INIT_EVENT: &str = "xstate.init";

/// A chart bound to its actions and guards, validated: ready to run any number of machines.
#[derive(Clone)]
pub struct Interpreter {
    pub(crate) chart: Arc<Chart>,
    actions: Vec<Arc<ActionFn>>,
    guards: Vec<Arc<GuardFn>>,
}

impl std::fmt::Debug for Interpreter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interpreter")
            .field("id", &self.chart.id)
            .field("states", &self.chart.states.len())
            .finish()
    }
}

/// Identifies one running `after` timer: the state, its delay event and the state's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerId {
    pub(crate) state: u32,
    pub(crate) event: u32,
    pub(crate) generation: u64,
}

/// What the host must do about `after` timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerCommand {
    /// Start a timer; when it elapses, call [`Interpreter::fire`] with the id.
    Start(TimerId, Duration),
    /// The state was exited: cancel the timer.
    Cancel(TimerId),
}

/// Whether the machine is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not started yet.
    Idle,
    /// Running.
    Active,
    /// A top-level final state was reached; further events are ignored.
    Done,
}

/// The state of a machine: its state value (XState shape), context and status; serializable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// `"green"`, `{"active": "playing"}`, `{"bold": "on", "italic": "off"}`.
    pub value: Value,
    /// The machine's context.
    pub context: Value,
    /// Whether it runs.
    pub status: Status,
}

impl Snapshot {
    /// Whether the state at the dotted path (`"active.paused"`) is active in this snapshot.
    pub fn matches(&self, path: &str) -> bool {
        let mut v = &self.value;
        let mut keys = path.split('.').peekable();
        while let Some(key) = keys.next() {
            match v {
                Value::String(s) => return s == key && keys.peek().is_none(),
                Value::Object(m) => match m.get(key) {
                    Some(next) => v = next,
                    None => return false,
                },
                _ => return false,
            }
        }
        true
    }
}

/// What one call to [`Interpreter::send`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// At least one transition was taken (the configuration or context may have changed).
    pub transitioned: bool,
    /// An action or guard failed: the event was rolled back; report it as `error.action`.
    pub failure: Option<Failure>,
}

/// One machine's configuration, context and pending outputs.
#[derive(Debug)]
pub struct MachineState {
    machine_id: Arc<str>,
    active: Vec<bool>,
    /// Shared with the rollback copy until an action writes to it (copy on write).
    context: Arc<Value>,
    entered_gen: Vec<u64>,
    generation: u64,
    started: bool,
    done: bool,
    effects: Vec<Effect>,
    timers: Vec<TimerCommand>,
    entered: Vec<u32>,
    // scratch
    enabled: Vec<u32>,
    mark: Vec<bool>,
    list: Vec<u32>,
    internal: VecDeque<u32>,
    // rollback
    saved_active: Vec<bool>,
    saved_gen: Vec<u64>,
    saved_context: Option<Arc<Value>>,
}

impl MachineState {
    /// The machine id actions see.
    pub fn machine_id(&self) -> &str {
        &self.machine_id
    }
    /// Sets the machine id actions see (the Node's id when bound).
    pub fn set_machine_id(&mut self, id: impl Into<Arc<str>>) {
        self.machine_id = id.into();
    }
    /// The context.
    pub fn context(&self) -> &Value {
        &self.context
    }
    /// Whether a top-level final state was reached.
    pub fn is_done(&self) -> bool {
        self.done
    }
    /// Whether [`Interpreter::start`] ran.
    pub fn is_started(&self) -> bool {
        self.started
    }
    /// Takes the sends requested by actions so far, in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }
    /// Whether actions requested sends that were not taken yet.
    pub fn has_effects(&self) -> bool {
        !self.effects.is_empty()
    }
    /// Takes the timer commands so far, in order.
    pub fn take_timers(&mut self) -> Vec<TimerCommand> {
        std::mem::take(&mut self.timers)
    }
    /// Whether there are timer commands not taken yet.
    pub fn has_timers(&self) -> bool {
        !self.timers.is_empty()
    }
    pub(crate) fn entered(&self) -> &[u32] {
        &self.entered
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

impl Interpreter {
    /// Binds a chart to its actions and guards; every name used in the JSON must be in the map.
    pub fn new(chart: Chart, actions: &Actions) -> Result<Interpreter, LoadError> {
        let mut a = Vec::with_capacity(chart.action_names.len());
        for (name, path) in &chart.action_names {
            match actions.actions.get(name) {
                Some(f) => a.push(f.clone()),
                None => {
                    return Err(LoadError::MissingAction {
                        path: path.clone(),
                        name: name.to_string(),
                    });
                }
            }
        }
        let mut g = Vec::with_capacity(chart.guard_names.len());
        for (name, path) in &chart.guard_names {
            match actions.guards.get(name) {
                Some(f) => g.push(f.clone()),
                None => {
                    return Err(LoadError::MissingGuard {
                        path: path.clone(),
                        name: name.to_string(),
                    });
                }
            }
        }
        Ok(Interpreter {
            chart: Arc::new(chart),
            actions: a,
            guards: g,
        })
    }

    /// Parses XState JSON and binds it to the actions in one go.
    pub fn from_json(json: &str, actions: &Actions) -> Result<Interpreter, LoadError> {
        Interpreter::new(Chart::from_json(json)?, actions)
    }

    /// The chart.
    pub fn chart(&self) -> &Chart {
        &self.chart
    }

    /// A fresh, not yet started machine with the chart's initial context.
    pub fn new_state(&self) -> MachineState {
        self.new_state_with_context(self.chart.context.clone())
    }

    /// A fresh, not yet started machine with its own initial context.
    pub fn new_state_with_context(&self, context: Value) -> MachineState {
        let n = self.chart.states.len();
        MachineState {
            machine_id: self.chart.id.clone(),
            active: vec![false; n],
            context: Arc::new(context),
            entered_gen: vec![0; n],
            generation: 0,
            started: false,
            done: false,
            effects: Vec::new(),
            timers: Vec::new(),
            entered: Vec::new(),
            enabled: Vec::new(),
            mark: vec![false; n],
            list: Vec::new(),
            internal: VecDeque::new(),
            saved_active: Vec::with_capacity(n),
            saved_gen: Vec::with_capacity(n),
            saved_context: None,
        }
    }

    /// Enters the initial states (entry actions, eventless transitions); idempotent.
    pub fn start(&self, st: &mut MachineState) -> Step {
        self.start_with(st, None)
    }

    /// Processes one event to completion (run-to-completion macrostep).
    pub fn send(&self, st: &mut MachineState, event: &Event) -> Step {
        self.send_with(st, event, None)
    }

    /// Processes the event of an elapsed `after` timer; a stale timer (its state was exited) is ignored.
    pub fn fire(&self, st: &mut MachineState, timer: TimerId) -> Step {
        self.fire_with(st, timer, None)
    }

    pub(crate) fn start_with(&self, st: &mut MachineState, node: Option<&Node>) -> Step {
        if st.started {
            return Step::default();
        }
        let marks = (st.effects.len(), st.timers.len());
        self.save(st);
        st.started = true;
        st.entered.clear();
        let event = Event::new(INIT_EVENT);
        st.list.clear();
        self.add_descendants(st, 0);
        let r = self
            .enter_listed(st, &event, node)
            .and_then(|()| self.settle(st, &event, node));
        match r {
            Ok(()) => {
                st.saved_context = None;
                Step {
                    transitioned: true,
                    failure: None,
                }
            }
            Err(f) => {
                self.restore(st, marks);
                st.started = false;
                Step {
                    transitioned: false,
                    failure: Some(f),
                }
            }
        }
    }

    pub(crate) fn send_with(
        &self,
        st: &mut MachineState,
        event: &Event,
        node: Option<&Node>,
    ) -> Step {
        if !st.started || st.done {
            return Step::default();
        }
        let id = self.chart.event_id(event.name());
        self.macrostep(st, event, id, node)
    }

    pub(crate) fn fire_with(
        &self,
        st: &mut MachineState,
        timer: TimerId,
        node: Option<&Node>,
    ) -> Step {
        let s = timer.state as usize;
        if !st.started
            || st.done
            || s >= st.active.len()
            || !st.active[s]
            || st.entered_gen[s] != timer.generation
        {
            return Step::default();
        }
        let Some(name) = self.chart.event_names.get(timer.event as usize) else {
            return Step::default();
        };
        let event = Event::new(name.clone());
        self.macrostep(st, &event, Some(timer.event), node)
    }

    /// The name of the event a timer raises (`xstate.after.<ms>.<state id>`).
    pub fn timer_event(&self, timer: TimerId) -> Option<&Arc<str>> {
        self.chart.event_names.get(timer.event as usize)
    }

    /// The state value, context and status.
    pub fn snapshot(&self, st: &MachineState) -> Snapshot {
        Snapshot {
            value: if st.started {
                self.value(st, 0)
            } else {
                Value::Null
            },
            context: (*st.context).clone(),
            status: if !st.started {
                Status::Idle
            } else if st.done {
                Status::Done
            } else {
                Status::Active
            },
        }
    }

    /// Whether the state at the dotted path (`"active.paused"`) is active.
    pub fn matches(&self, st: &MachineState, path: &str) -> bool {
        self.chart
            .by_path
            .get(path)
            .is_some_and(|&i| st.active[i as usize])
    }

    /// The dotted paths of the active atomic (and final) states, in document order.
    pub fn active_leaves<'a>(&'a self, st: &'a MachineState) -> impl Iterator<Item = &'a str> + 'a {
        self.chart
            .states
            .iter()
            .enumerate()
            .filter(move |(i, s)| st.active[*i] && is_leaf(s.kind))
            .map(|(_, s)| &*s.path)
    }

    /// Paths of the atomic states entered by the last step, in entry order.
    pub fn entered_paths<'a>(&'a self, st: &'a MachineState) -> impl Iterator<Item = &'a str> + 'a {
        st.entered
            .iter()
            .map(|&i| &*self.chart.states[i as usize].path)
    }

    pub(crate) fn snapshot_value(&self, st: &MachineState) -> Value {
        if st.started {
            self.value(st, 0)
        } else {
            Value::Null
        }
    }

    fn value(&self, st: &MachineState, s: u32) -> Value {
        let node = &self.chart.states[s as usize];
        match node.kind {
            StateKind::Compound => {
                let Some(&c) = node.children.iter().find(|&&c| st.active[c as usize]) else {
                    return Value::Null;
                };
                let child = &self.chart.states[c as usize];
                if is_leaf(child.kind) {
                    Value::String(child.key.to_string())
                } else {
                    let mut m = serde_json::Map::new();
                    m.insert(child.key.to_string(), self.value(st, c));
                    Value::Object(m)
                }
            }
            StateKind::Parallel => {
                let mut m = serde_json::Map::new();
                for &c in &node.children {
                    let child = &self.chart.states[c as usize];
                    let v = if is_leaf(child.kind) {
                        Value::Object(serde_json::Map::new())
                    } else {
                        self.value(st, c)
                    };
                    m.insert(child.key.to_string(), v);
                }
                Value::Object(m)
            }
            StateKind::Atomic | StateKind::Final => Value::String(node.key.to_string()),
        }
    }

    // ---- the SCXML algorithm ----

    fn macrostep(
        &self,
        st: &mut MachineState,
        event: &Event,
        id: Option<u32>,
        node: Option<&Node>,
    ) -> Step {
        st.entered.clear();
        let mut enabled = std::mem::take(&mut st.enabled);
        enabled.clear();
        if let Err(f) = self.select(st, Some((id, event.name())), event, &mut enabled) {
            st.enabled = enabled;
            return Step {
                transitioned: false,
                failure: Some(f),
            };
        }
        if enabled.is_empty() {
            st.enabled = enabled;
            return Step::default();
        }
        let marks = (st.effects.len(), st.timers.len());
        self.save(st);
        let r = self
            .microstep(st, &enabled, event, node)
            .and_then(|()| self.settle(st, event, node));
        st.enabled = enabled;
        match r {
            Ok(()) => {
                st.saved_context = None;
                Step {
                    transitioned: true,
                    failure: None,
                }
            }
            Err(f) => {
                self.restore(st, marks);
                Step {
                    transitioned: false,
                    failure: Some(f),
                }
            }
        }
    }

    /// Eventless transitions and raised (`done.state.*`) events until the configuration is stable.
    fn settle(
        &self,
        st: &mut MachineState,
        event: &Event,
        node: Option<&Node>,
    ) -> Result<(), Failure> {
        let mut enabled = Vec::new();
        let mut steps = 0usize;
        loop {
            if st.done {
                st.internal.clear();
                return Ok(());
            }
            enabled.clear();
            self.select(st, None, event, &mut enabled)?;
            if enabled.is_empty() {
                let Some(ev) = st.internal.pop_front() else {
                    return Ok(());
                };
                let raised = Event::new(self.chart.event_names[ev as usize].clone());
                self.select(st, Some((Some(ev), raised.name())), &raised, &mut enabled)?;
                if !enabled.is_empty() {
                    self.microstep(st, &enabled, &raised, node)?;
                }
            } else {
                self.microstep(st, &enabled, event, node)?;
            }
            steps += 1;
            if steps > MAX_MICROSTEPS {
                return Err(Failure {
                    kind: FailureKind::Loop,
                    name: "always".into(),
                    event: event.name().to_owned(),
                    message: format!(
                        "more than {MAX_MICROSTEPS} eventless transitions for one event; a guard must stop the loop"
                    ),
                });
            }
        }
    }

    fn save(&self, st: &mut MachineState) {
        st.saved_active.clone_from(&st.active);
        st.saved_gen.clone_from(&st.entered_gen);
        st.saved_context = None;
    }

    fn restore(&self, st: &mut MachineState, (effects, timers): (usize, usize)) {
        std::mem::swap(&mut st.active, &mut st.saved_active);
        std::mem::swap(&mut st.entered_gen, &mut st.saved_gen);
        if let Some(c) = st.saved_context.take() {
            st.context = c;
        }
        st.done = false;
        st.internal.clear();
        st.effects.truncate(effects);
        st.timers.truncate(timers);
        st.entered.clear();
    }

    fn matches_event(m: &Matcher, id: Option<u32>, name: &str) -> bool {
        match m {
            Matcher::Exact(e) => id == Some(*e),
            Matcher::Prefix(p) => {
                name == &**p
                    || (name.len() > p.len()
                        && name.starts_with(&**p)
                        && name.as_bytes()[p.len()] == b'.')
            }
            Matcher::Any => true,
        }
    }

    /// SCXML selectTransitions / selectEventlessTransitions (`ev` is `None` for eventless).
    fn select(
        &self,
        st: &MachineState,
        ev: Option<(Option<u32>, &str)>,
        event: &Event,
        enabled: &mut Vec<u32>,
    ) -> Result<(), Failure> {
        let states = &self.chart.states;
        for (i, s) in states.iter().enumerate() {
            if !st.active[i] || !is_leaf(s.kind) {
                continue;
            }
            let mut at = Some(i as u32);
            'ancestors: while let Some(a) = at {
                let node = &states[a as usize];
                match ev {
                    Some((id, name)) => {
                        for (m, t) in &node.on {
                            if Self::matches_event(m, id, name) && self.guard_ok(st, *t, event)? {
                                if !enabled.contains(t) {
                                    enabled.push(*t);
                                }
                                break 'ancestors;
                            }
                        }
                    }
                    None => {
                        for t in &node.always {
                            if self.guard_ok(st, *t, event)? {
                                if !enabled.contains(t) {
                                    enabled.push(*t);
                                }
                                break 'ancestors;
                            }
                        }
                    }
                }
                at = node.parent;
            }
        }
        if enabled.len() > 1 {
            self.remove_conflicting(enabled);
        }
        Ok(())
    }

    fn guard_ok(&self, st: &MachineState, t: u32, event: &Event) -> Result<bool, Failure> {
        let Some(g) = &self.chart.transitions[t as usize].guard else {
            return Ok(true);
        };
        let f = &self.guards[g.name as usize];
        let ctx = GuardContext {
            machine_id: &st.machine_id,
            event,
            context: &st.context,
            params: g.params.as_deref(),
        };
        catch_unwind(AssertUnwindSafe(|| f(&ctx))).map_err(|p| Failure {
            kind: FailureKind::Panic,
            name: self.chart.guard_names[g.name as usize].0.to_string(),
            event: event.name().to_owned(),
            message: panic_message(p),
        })
    }

    fn is_desc(&self, a: u32, b: u32) -> bool {
        b < a && a <= self.chart.states[b as usize].end
    }

    fn domain(&self, t: u32) -> Option<u32> {
        let tr = &self.chart.transitions[t as usize];
        if tr.targets.is_empty() {
            return None;
        }
        if tr.internal {
            return Some(tr.source);
        }
        let states = &self.chart.states;
        let mut at = states[tr.source as usize].parent;
        while let Some(a) = at {
            let eligible = a == 0 || states[a as usize].kind == StateKind::Compound;
            if eligible && tr.targets.iter().all(|&x| self.is_desc(x, a)) {
                return Some(a);
            }
            at = states[a as usize].parent;
        }
        Some(0)
    }

    fn exit_sets_intersect(&self, t1: u32, t2: u32) -> bool {
        // An exit set is the active part of `(domain, end]`: empty for an atomic domain
        // (internal self-transition), never empty for an active compound or the root.
        let nonempty = |d: u32| self.chart.states[d as usize].end > d;
        match (self.domain(t1), self.domain(t2)) {
            (Some(a), Some(b)) if nonempty(a) && nonempty(b) => {
                a == b || self.is_desc(a, b) || self.is_desc(b, a)
            }
            _ => false,
        }
    }

    fn remove_conflicting(&self, enabled: &mut Vec<u32>) {
        let mut filtered: Vec<u32> = Vec::with_capacity(enabled.len());
        for &t1 in enabled.iter() {
            let mut preempted = false;
            let mut remove: Vec<u32> = Vec::new();
            for &t2 in &filtered {
                if self.exit_sets_intersect(t1, t2) {
                    let s1 = self.chart.transitions[t1 as usize].source;
                    let s2 = self.chart.transitions[t2 as usize].source;
                    if self.is_desc(s1, s2) {
                        remove.push(t2);
                    } else {
                        preempted = true;
                        break;
                    }
                }
            }
            if !preempted {
                filtered.retain(|t| !remove.contains(t));
                filtered.push(t1);
            }
        }
        *enabled = filtered;
    }

    fn run_actions(
        &self,
        st: &mut MachineState,
        actions: &[ActionRef],
        event: &Event,
        node: Option<&Node>,
    ) -> Result<(), Failure> {
        for a in actions {
            if st.saved_context.is_none() {
                // A reference count; the value is copied only if an action writes to it.
                st.saved_context = Some(st.context.clone());
            }
            let f = &self.actions[a.name as usize];
            let mut ctx = ActionContext {
                machine_id: &st.machine_id,
                event,
                context: &mut st.context,
                params: a.params.as_deref(),
                effects: &mut st.effects,
                node,
            };
            let name = || self.chart.action_names[a.name as usize].0.to_string();
            match catch_unwind(AssertUnwindSafe(|| f(&mut ctx))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(Failure {
                        kind: FailureKind::Action,
                        name: name(),
                        event: event.name().to_owned(),
                        message: e.message().to_owned(),
                    });
                }
                Err(p) => {
                    return Err(Failure {
                        kind: FailureKind::Panic,
                        name: name(),
                        event: event.name().to_owned(),
                        message: panic_message(p),
                    });
                }
            }
        }
        Ok(())
    }

    fn microstep(
        &self,
        st: &mut MachineState,
        enabled: &[u32],
        event: &Event,
        node: Option<&Node>,
    ) -> Result<(), Failure> {
        // Exit set: active descendants of each domain, exited in reverse document order.
        st.list.clear();
        for &t in enabled {
            if let Some(d) = self.domain(t) {
                let end = self.chart.states[d as usize].end;
                for s in d + 1..=end {
                    if st.active[s as usize] && !st.mark[s as usize] {
                        st.mark[s as usize] = true;
                        st.list.push(s);
                    }
                }
            }
        }
        if !st.list.is_empty() {
            let mut exits = std::mem::take(&mut st.list);
            exits.sort_unstable_by(|a, b| b.cmp(a));
            for &s in &exits {
                st.mark[s as usize] = false;
            }
            let mut r = Ok(());
            for &s in &exits {
                let node_s = &self.chart.states[s as usize];
                r = self.run_actions(st, &node_s.exit, event, node);
                if r.is_err() {
                    break;
                }
                for a in &node_s.after {
                    st.timers.push(TimerCommand::Cancel(TimerId {
                        state: s,
                        event: a.event,
                        generation: st.entered_gen[s as usize],
                    }));
                }
                st.active[s as usize] = false;
            }
            exits.clear();
            st.list = exits;
            r?;
        }
        for &t in enabled {
            let tr = &self.chart.transitions[t as usize];
            self.run_actions(st, &tr.actions, event, node)?;
        }
        // Entry set.
        st.list.clear();
        for &t in enabled {
            let tr = &self.chart.transitions[t as usize];
            if tr.targets.is_empty() {
                continue;
            }
            for &s in &tr.targets {
                if tr.internal && s == tr.source {
                    // Internal self-transition: the source stays; a compound one restarts at its initial child.
                    let init = self.chart.states[s as usize].initial;
                    if let Some(init) = init {
                        self.add_descendants(st, init);
                        self.add_ancestors(st, init, Some(s));
                    }
                } else {
                    self.add_descendants(st, s);
                }
            }
            let domain = self.domain(t);
            for &s in &tr.targets {
                self.add_ancestors(st, s, domain);
            }
        }
        self.enter_listed(st, event, node)
    }

    fn add(&self, st: &mut MachineState, s: u32) -> bool {
        if st.mark[s as usize] {
            return false;
        }
        st.mark[s as usize] = true;
        st.list.push(s);
        true
    }

    fn covered(&self, st: &MachineState, child: u32) -> bool {
        st.list
            .iter()
            .any(|&x| x == child || self.is_desc(x, child))
    }

    fn add_descendants(&self, st: &mut MachineState, s: u32) {
        self.add(st, s);
        let node = &self.chart.states[s as usize];
        match node.kind {
            StateKind::Compound => {
                if let Some(init) = node.initial {
                    self.add_descendants(st, init);
                    self.add_ancestors(st, init, Some(s));
                }
            }
            StateKind::Parallel => {
                for &c in &node.children {
                    if !self.covered(st, c) {
                        self.add_descendants(st, c);
                    }
                }
            }
            StateKind::Atomic | StateKind::Final => {}
        }
    }

    /// SCXML addAncestorStatesToEnter: the proper ancestors of `s` below `stop` (none if `stop`
    /// is not an ancestor of `s`).
    fn add_ancestors(&self, st: &mut MachineState, s: u32, stop: Option<u32>) {
        if let Some(d) = stop
            && !self.is_desc(s, d)
        {
            return;
        }
        let mut at = self.chart.states[s as usize].parent;
        while let Some(a) = at {
            if Some(a) == stop {
                break;
            }
            self.add(st, a);
            let node = &self.chart.states[a as usize];
            if node.kind == StateKind::Parallel {
                for &c in &node.children {
                    if !self.covered(st, c) {
                        self.add_descendants(st, c);
                    }
                }
            }
            at = node.parent;
        }
    }

    /// Enters the states in `st.list` in document order.
    fn enter_listed(
        &self,
        st: &mut MachineState,
        event: &Event,
        node: Option<&Node>,
    ) -> Result<(), Failure> {
        let mut list = std::mem::take(&mut st.list);
        list.sort_unstable();
        for &s in &list {
            st.mark[s as usize] = false;
        }
        let mut r = Ok(());
        for &s in &list {
            let ns = &self.chart.states[s as usize];
            st.active[s as usize] = true;
            st.generation += 1;
            st.entered_gen[s as usize] = st.generation;
            for a in &ns.after {
                st.timers.push(TimerCommand::Start(
                    TimerId {
                        state: s,
                        event: a.event,
                        generation: st.generation,
                    },
                    a.delay,
                ));
            }
            r = self.run_actions(st, &ns.entry, event, node);
            if r.is_err() {
                break;
            }
            if is_leaf(ns.kind) {
                st.entered.push(s);
            }
            if ns.kind == StateKind::Final {
                self.completed(st, s);
            }
        }
        list.clear();
        st.list = list;
        r
    }

    /// A final state was entered: raise `done.state.<parent>` (and for a completed parallel grandparent).
    fn completed(&self, st: &mut MachineState, s: u32) {
        let states = &self.chart.states;
        let Some(p) = states[s as usize].parent else {
            return;
        };
        if p == 0 {
            st.done = true;
            return;
        }
        st.internal.push_back(states[p as usize].done_event);
        if let Some(gp) = states[p as usize].parent
            && states[gp as usize].kind == StateKind::Parallel
            && states[gp as usize]
                .children
                .iter()
                .all(|&c| self.in_final(st, c))
        {
            if gp == 0 {
                st.done = true;
            } else {
                st.internal.push_back(states[gp as usize].done_event);
            }
        }
    }

    fn in_final(&self, st: &MachineState, s: u32) -> bool {
        let node = &self.chart.states[s as usize];
        match node.kind {
            StateKind::Compound => node.children.iter().any(|&c| {
                st.active[c as usize] && self.chart.states[c as usize].kind == StateKind::Final
            }),
            StateKind::Parallel => node.children.iter().all(|&c| self.in_final(st, c)),
            StateKind::Final => true,
            StateKind::Atomic => false,
        }
    }
}

fn is_leaf(k: StateKind) -> bool {
    matches!(k, StateKind::Atomic | StateKind::Final)
}
