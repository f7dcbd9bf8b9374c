//! The pure interpreter: a chart plus its implementations, and XState v5's transition
//! function over a [`MachineState`]. No tokio, no Node: events go in, a new configuration,
//! context, effects and timer commands come out; `after` timers run on a virtual clock.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard_core::Node;

use crate::actions::{ActionContext, ActionFn, Actions, Effect, Event, GuardContext, GuardFn};
use crate::chart::{ActionRef, Chart, Domain, Matcher, StateKind};
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

/// What the host must do about `after` timers, for a host that runs its own timers instead of
/// the built-in clock ([`Interpreter::advance`]).
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

/// What one call to [`Interpreter::send`] (or one fired timer) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// At least one transition was taken (the configuration or context may have changed).
    pub transitioned: bool,
    /// An action or guard failed: the event was rolled back; report it as `error.action`.
    pub failure: Option<Failure>,
}

impl TimerId {
    /// The same `after` delay of the same state, whichever entry started it (XState keys its
    /// delayed events by the event name `xstate.after.<ms>.<state id>` alone).
    fn same_delay(self, other: TimerId) -> bool {
        self.state == other.state && self.event == other.event
    }
}

/// One timer on the virtual clock.
#[derive(Clone, Copy, Debug)]
struct Pending {
    due: Duration,
    /// Start order: timers due at the same time fire in the order they started.
    seq: u64,
    id: TimerId,
    /// Whether a cancel of this delay reaches this timer. XState's scheduler keeps one timer per
    /// delay event: a second start (a state entered again without being exited, which only
    /// the root can be) leaves the first timer running but unreachable, and the first timer
    /// of the pair to fire makes the other one unreachable too.
    registered: bool,
}

/// One machine's configuration, context, virtual clock and pending outputs.
#[derive(Debug)]
pub struct MachineState {
    machine_id: Arc<str>,
    active: Vec<bool>,
    /// Shared with the rollback copy until an action writes to it (copy on write).
    context: Arc<Value>,
    context_written: bool,
    /// When each active state was entered, relative to the others (XState's `_nodes` order):
    /// parallel regions see events, and eventless transitions are selected, in this order.
    order: Vec<u64>,
    next_order: u64,
    /// Which entry of a state a timer belongs to.
    entered_gen: Vec<u64>,
    generation: u64,
    started: bool,
    done: bool,
    effects: Vec<Effect>,
    timers: Vec<TimerCommand>,
    entered: Vec<u32>,
    // the virtual clock
    now: Duration,
    pending: Vec<Pending>,
    timer_seq: u64,
    // scratch
    enabled: Vec<u32>,
    mark: Vec<bool>,
    list: Vec<u32>,
    /// States exited by the current microstep, with their entry order.
    exited: Vec<(u32, u64)>,
    /// States made active by the current microstep.
    activated: Vec<u32>,
    leaves: Vec<u32>,
    internal: VecDeque<u32>,
    // rollback
    saved: bool,
    saved_active: Vec<bool>,
    saved_gen: Vec<u64>,
    saved_order: Vec<u64>,
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
    /// Takes the timer commands so far, in order (for a host that runs its own timers).
    ///
    /// A host that uses the built-in clock ([`Interpreter::advance`]) need not take them: a
    /// start and a cancel of the same timer that were not taken yet drop each other, so the
    /// list never holds more than the running timers and the cancels of taken starts.
    pub fn take_timers(&mut self) -> Vec<TimerCommand> {
        std::mem::take(&mut self.timers)
    }
    /// Whether there are timer commands not taken yet.
    pub fn has_timers(&self) -> bool {
        !self.timers.is_empty()
    }
    /// The virtual clock's time: how far [`Interpreter::advance`] has moved it since the start.
    pub fn now(&self) -> Duration {
        self.now
    }
    /// When the earliest running `after` timer falls due on the virtual clock, if any.
    pub fn next_timer(&self) -> Option<Duration> {
        self.pending.iter().map(|p| p.due).min()
    }
    pub(crate) fn entered(&self) -> &[u32] {
        &self.entered
    }
    pub(crate) fn clear_timers(&mut self) {
        self.timers.clear();
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
            context_written: false,
            order: vec![0; n],
            next_order: 0,
            entered_gen: vec![0; n],
            generation: 0,
            started: false,
            done: false,
            effects: Vec::new(),
            timers: Vec::new(),
            entered: Vec::new(),
            now: Duration::ZERO,
            pending: Vec::new(),
            timer_seq: 0,
            enabled: Vec::new(),
            mark: vec![false; n],
            list: Vec::new(),
            exited: Vec::new(),
            activated: Vec::new(),
            leaves: Vec::new(),
            internal: VecDeque::new(),
            saved: false,
            saved_active: Vec::with_capacity(n),
            saved_gen: Vec::with_capacity(n),
            saved_order: Vec::with_capacity(n),
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

    /// Processes the event of an elapsed `after` timer that the host ran itself (see
    /// [`MachineState::take_timers`]); a stale timer (its state was exited) is ignored.
    pub fn fire(&self, st: &mut MachineState, timer: TimerId) -> Step {
        self.fire_with(st, timer, None)
    }

    /// Moves the virtual clock forward by `by`, firing every `after` timer that falls due on the
    /// way, in due order (timers due at the same time in the order they started), each as its
    /// own macrostep, like XState's `SimulatedClock`. A timer started by a fired one counts from
    /// the fired one's due time. Returns one [`Step`] per fired timer.
    pub fn advance(&self, st: &mut MachineState, by: Duration) -> Vec<Step> {
        let until = st.now.saturating_add(by);
        let mut steps = Vec::new();
        while let Some(step) = self.fire_due(st, until) {
            steps.push(step);
        }
        steps
    }

    /// Fires the earliest timer due at or before `until` on the virtual clock (the clock moves
    /// to its due time) and returns its step; when none is due, moves the clock to `until` and
    /// returns `None`. [`Interpreter::advance`] is this in a loop.
    pub fn fire_due(&self, st: &mut MachineState, until: Duration) -> Option<Step> {
        self.fire_due_named(st, until, None).map(|(_, step)| step)
    }

    pub(crate) fn start_with(&self, st: &mut MachineState, node: Option<&Node>) -> Step {
        if st.started {
            return Step::default();
        }
        st.started = true;
        let event = Event::new(INIT_EVENT);
        let step = self.macrostep(st, &event, None, node);
        if step.failure.is_some() {
            st.started = false;
        }
        step
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
        self.macrostep(st, event, Some(id), node)
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
        // The host ran this timer: the virtual clock must not fire it again.
        st.pending.retain(|p| p.id != timer);
        let event = Event::new(name.clone());
        self.macrostep(st, &event, Some(Some(timer.event)), node)
    }

    /// [`Interpreter::fire_due`], also naming the timer's event.
    pub(crate) fn fire_due_named(
        &self,
        st: &mut MachineState,
        until: Duration,
        node: Option<&Node>,
    ) -> Option<(Arc<str>, Step)> {
        let next = st
            .pending
            .iter()
            .enumerate()
            .filter(|(_, p)| p.due <= until)
            .min_by_key(|(_, p)| (p.due, p.seq))
            .map(|(i, _)| i);
        let Some(i) = next else {
            st.now = st.now.max(until);
            return None;
        };
        let fired = st.pending.remove(i);
        for p in &mut st.pending {
            if p.id.same_delay(fired.id) {
                p.registered = false;
            }
        }
        st.now = st.now.max(fired.due);
        let name = self.chart.event_names[fired.id.event as usize].clone();
        if !st.started || st.done {
            return Some((name, Step::default()));
        }
        // Like an XState delayed event, the timer's event is an ordinary event: cancelled on
        // exit, it only fires while its state is active.
        let step = self.macrostep(
            st,
            &Event::new(name.clone()),
            Some(Some(fired.id.event)),
            node,
        );
        Some((name, step))
    }

    /// The name of the event a timer raises (`xstate.after.<ms>.<state id>`).
    pub fn timer_event(&self, timer: TimerId) -> Option<&Arc<str>> {
        self.chart.event_names.get(timer.event as usize)
    }

    /// The state value, context and status.
    pub fn snapshot(&self, st: &MachineState) -> Snapshot {
        Snapshot {
            value: self.snapshot_value(st),
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

    // ---- XState v5's macrostep and microstep (the SCXML algorithm with v5's rules) ----

    /// One event to completion; `ev` is `None` for the initial entry, else the event's id
    /// (`None` inside when the chart does not know the name; wildcards may still match).
    fn macrostep(
        &self,
        st: &mut MachineState,
        event: &Event,
        ev: Option<Option<u32>>,
        node: Option<&Node>,
    ) -> Step {
        st.entered.clear();
        st.saved = false;
        st.saved_context = None;
        let marks = (st.effects.len(), st.timers.len());
        let mut enabled = std::mem::take(&mut st.enabled);
        enabled.clear();
        let r = self.run(st, event, ev, node, &mut enabled);
        st.enabled = enabled;
        match r {
            Ok(transitioned) => {
                st.saved_context = None;
                st.internal.clear();
                self.commit_timers(st, marks.1);
                Step {
                    transitioned,
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

    fn run(
        &self,
        st: &mut MachineState,
        event: &Event,
        ev: Option<Option<u32>>,
        node: Option<&Node>,
        enabled: &mut Vec<u32>,
    ) -> Result<bool, Failure> {
        let mut transitioned = false;
        match ev {
            None => {
                // XState's initial microstep: the root and its default descendants.
                st.list.clear();
                self.add(st, 0);
                self.add_descendants(st, 0);
                self.save(st);
                self.begin_microstep(st);
                self.enter_listed(st, event, node)?;
                self.end_microstep(st, event, node)?;
                transitioned = true;
            }
            Some(id) => {
                self.select_event(st, id, event.name(), event, enabled)?;
                if !enabled.is_empty() {
                    self.microstep(st, enabled, event, node)?;
                    transitioned = true;
                } else if !self.chart.has_always {
                    return Ok(false);
                }
            }
        }
        self.settle(st, event, node, &mut transitioned)?;
        Ok(transitioned)
    }

    /// XState's macrostep loop: eventless transitions (selected with the event handled last),
    /// then raised completion events, until the configuration is stable.
    fn settle(
        &self,
        st: &mut MachineState,
        event: &Event,
        node: Option<&Node>,
        transitioned: &mut bool,
    ) -> Result<(), Failure> {
        let mut enabled = Vec::new();
        let mut raised: Option<Event> = None;
        let mut eventless = true;
        let mut steps = 0usize;
        while !st.done {
            enabled.clear();
            let current = raised.as_ref().unwrap_or(event);
            if eventless && self.chart.has_always {
                self.select_eventless(st, current, &mut enabled)?;
            }
            let was_eventless = !enabled.is_empty();
            if !was_eventless {
                let Some(ev) = st.internal.pop_front() else {
                    break;
                };
                let name = self.chart.event_names[ev as usize].clone();
                let e = raised.insert(Event::new(name));
                self.select_event(
                    st,
                    Some(ev),
                    &self.chart.event_names[ev as usize],
                    e,
                    &mut enabled,
                )?;
            }
            let current = raised.as_ref().unwrap_or(event);
            let changed = if enabled.is_empty() {
                false
            } else {
                *transitioned = true;
                self.microstep(st, &enabled, current, node)?
            };
            // An eventless microstep that changed nothing (same states, no context write) is
            // not repeated: XState selects eventless transitions again only after a change.
            eventless = !was_eventless || changed;
            steps += 1;
            if steps > MAX_MICROSTEPS {
                return Err(Failure {
                    kind: FailureKind::Loop,
                    name: "always".into(),
                    event: event.name().to_owned(),
                    message: format!(
                        "more than {MAX_MICROSTEPS} eventless transitions or raised events for one event; a guard must stop the loop"
                    ),
                });
            }
        }
        Ok(())
    }

    fn save(&self, st: &mut MachineState) {
        if st.saved {
            return;
        }
        st.saved = true;
        st.saved_active.clone_from(&st.active);
        st.saved_gen.clone_from(&st.entered_gen);
        st.saved_order.clone_from(&st.order);
    }

    fn restore(&self, st: &mut MachineState, (effects, timers): (usize, usize)) {
        if st.saved {
            std::mem::swap(&mut st.active, &mut st.saved_active);
            std::mem::swap(&mut st.entered_gen, &mut st.saved_gen);
            std::mem::swap(&mut st.order, &mut st.saved_order);
            st.saved = false;
        }
        if let Some(c) = st.saved_context.take() {
            st.context = c;
        }
        st.done = false;
        st.internal.clear();
        st.effects.truncate(effects);
        st.timers.truncate(timers);
        st.entered.clear();
    }

    /// Applies the step's timer commands to the virtual clock, and drops start/cancel pairs
    /// that no host has taken yet.
    fn commit_timers(&self, st: &mut MachineState, from: usize) {
        if st.timers.len() > from {
            for i in from..st.timers.len() {
                match st.timers[i] {
                    TimerCommand::Start(id, delay) => {
                        for p in &mut st.pending {
                            if p.id.same_delay(id) {
                                p.registered = false;
                            }
                        }
                        st.timer_seq += 1;
                        st.pending.push(Pending {
                            due: st.now.saturating_add(delay),
                            seq: st.timer_seq,
                            id,
                            registered: true,
                        });
                    }
                    TimerCommand::Cancel(id) => {
                        if let Some(i) = st
                            .pending
                            .iter()
                            .position(|p| p.registered && p.id.same_delay(id))
                        {
                            st.pending.remove(i);
                        }
                    }
                }
            }
            let mut i = 0;
            while i < st.timers.len() {
                if let TimerCommand::Cancel(id) = st.timers[i]
                    && let Some(j) = st.timers[..i]
                        .iter()
                        .rposition(|c| matches!(c, TimerCommand::Start(s, _) if *s == id))
                {
                    st.timers.remove(i);
                    st.timers.remove(j);
                    i -= 1;
                    continue;
                }
                i += 1;
            }
        }
        if st.done {
            // XState stops a done machine's delayed events.
            st.pending.clear();
        }
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

    /// XState v5 `transitionNode` from the root, then conflicts removed: the deepest states
    /// choose first; a state is asked only when none of its active descendants took the event
    /// (for a parallel state: none of its regions), and regions are asked in entry order.
    fn select_event(
        &self,
        st: &MachineState,
        id: Option<u32>,
        name: &str,
        event: &Event,
        enabled: &mut Vec<u32>,
    ) -> Result<(), Failure> {
        self.transition_node(st, 0, id, name, event, enabled)?;
        if enabled.len() > 1 {
            self.remove_conflicting(enabled);
        }
        Ok(())
    }

    fn transition_node(
        &self,
        st: &MachineState,
        s: u32,
        id: Option<u32>,
        name: &str,
        event: &Event,
        enabled: &mut Vec<u32>,
    ) -> Result<(), Failure> {
        let node = &self.chart.states[s as usize];
        let before = enabled.len();
        match node.kind {
            StateKind::Compound => {
                if let Some(&c) = node.children.iter().find(|&&c| st.active[c as usize]) {
                    self.transition_node(st, c, id, name, event, enabled)?;
                }
            }
            StateKind::Parallel => {
                let in_order = node
                    .children
                    .windows(2)
                    .all(|w| st.order[w[0] as usize] < st.order[w[1] as usize]);
                if in_order {
                    for &c in &node.children {
                        self.transition_node(st, c, id, name, event, enabled)?;
                    }
                } else {
                    let mut regions = node.children.clone();
                    regions.sort_by_key(|&c| st.order[c as usize]);
                    for c in regions {
                        self.transition_node(st, c, id, name, event, enabled)?;
                    }
                }
            }
            StateKind::Atomic | StateKind::Final => {}
        }
        if enabled.len() == before {
            for (m, t) in &node.on {
                if Self::matches_event(m, id, name) && self.guard_ok(st, *t, event)? {
                    enabled.push(*t);
                    break;
                }
            }
        }
        Ok(())
    }

    /// XState v5 `selectEventlessTransitions`: for each active atomic state in entry order, the
    /// first enabled `always` transition of it or its nearest ancestor that has one.
    fn select_eventless(
        &self,
        st: &mut MachineState,
        event: &Event,
        enabled: &mut Vec<u32>,
    ) -> Result<(), Failure> {
        let mut leaves = std::mem::take(&mut st.leaves);
        leaves.clear();
        leaves.extend(
            self.chart
                .states
                .iter()
                .enumerate()
                .filter(|(i, s)| st.active[*i] && is_leaf(s.kind))
                .map(|(i, _)| i as u32),
        );
        leaves.sort_by_key(|&s| st.order[s as usize]);
        let r = (|| {
            for &leaf in &leaves {
                let mut at = Some(leaf);
                'ancestors: while let Some(a) = at {
                    let node = &self.chart.states[a as usize];
                    for &t in &node.always {
                        if self.guard_ok(st, t, event)? {
                            if !enabled.contains(&t) {
                                enabled.push(t);
                            }
                            break 'ancestors;
                        }
                    }
                    at = node.parent;
                }
            }
            Ok(())
        })();
        st.leaves = leaves;
        r?;
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

    /// Whether `a` is a proper descendant of `b`.
    fn is_desc(&self, a: u32, b: u32) -> bool {
        b < a && a <= self.chart.states[b as usize].end
    }

    /// Whether the exit sets of two transitions (the active states below each domain) share a
    /// state. A domain is active, and an active state with children has an active descendant,
    /// so an exit set is empty exactly when its domain is a leaf (or there is no target).
    fn exit_sets_intersect(&self, t1: u32, t2: u32) -> bool {
        let d1 = self.chart.transitions[t1 as usize].domain;
        let d2 = self.chart.transitions[t2 as usize].domain;
        let nonempty = |d: Domain| match d {
            Domain::None => false,
            Domain::AboveRoot => true,
            Domain::State(s) => !is_leaf(self.chart.states[s as usize].kind),
        };
        if !nonempty(d1) || !nonempty(d2) {
            return false;
        }
        match (d1, d2) {
            (Domain::State(a), Domain::State(b)) => {
                a == b || self.is_desc(a, b) || self.is_desc(b, a)
            }
            _ => true,
        }
    }

    /// XState v5 / SCXML `removeConflictingTransitions`: of two transitions whose exit sets
    /// intersect, the one from the deeper source wins, else the one selected first.
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
                context_written: &mut st.context_written,
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

    /// Exits, transition actions, entries; returns whether the machine changed (its set of
    /// active states, its context, or its status), which decides whether eventless transitions
    /// are selected again.
    fn microstep(
        &self,
        st: &mut MachineState,
        enabled: &[u32],
        event: &Event,
        node: Option<&Node>,
    ) -> Result<bool, Failure> {
        self.save(st);
        self.begin_microstep(st);
        // Exit set: the active states below each domain, exited in reverse document order.
        st.list.clear();
        for &t in enabled {
            let range = match self.chart.transitions[t as usize].domain {
                Domain::None => continue,
                Domain::State(d) => d + 1..=self.chart.states[d as usize].end,
                Domain::AboveRoot => 0..=self.chart.states[0].end,
            };
            for s in range {
                if st.active[s as usize] && !st.mark[s as usize] {
                    st.mark[s as usize] = true;
                    st.list.push(s);
                }
            }
        }
        if !st.list.is_empty() {
            let mut exits = std::mem::take(&mut st.list);
            exits.sort_unstable_by(|a, b| b.cmp(a));
            for &s in &exits {
                st.mark[s as usize] = false;
            }
            let r = self.exit_states(st, &exits, event, node, true);
            exits.clear();
            st.list = exits;
            r?;
        }
        for &t in enabled {
            let tr = &self.chart.transitions[t as usize];
            self.run_actions(st, &tr.actions, event, node)?;
        }
        st.list.clear();
        for &t in enabled {
            self.entry_set(st, t);
        }
        self.enter_listed(st, event, node)?;
        self.end_microstep(st, event, node)
    }

    fn begin_microstep(&self, st: &mut MachineState) {
        st.context_written = false;
        st.exited.clear();
        st.activated.clear();
    }

    /// Runs the exit actions of `states` (in that order) and cancels their timers; `deactivate`
    /// is false when a done machine exits but keeps showing its final configuration.
    fn exit_states(
        &self,
        st: &mut MachineState,
        states: &[u32],
        event: &Event,
        node: Option<&Node>,
        deactivate: bool,
    ) -> Result<(), Failure> {
        for &s in states {
            let node_s = &self.chart.states[s as usize];
            self.run_actions(st, &node_s.exit, event, node)?;
            for a in &node_s.after {
                st.timers.push(TimerCommand::Cancel(TimerId {
                    state: s,
                    event: a.event,
                    generation: st.entered_gen[s as usize],
                }));
            }
            if deactivate {
                st.active[s as usize] = false;
                st.exited.push((s, st.order[s as usize]));
            }
        }
        Ok(())
    }

    /// After the entries: a machine that completed exits every state (XState v5, SCXML); a
    /// microstep that left the same states active keeps their entry order (XState keeps its
    /// previous snapshot then).
    fn end_microstep(
        &self,
        st: &mut MachineState,
        event: &Event,
        node: Option<&Node>,
    ) -> Result<bool, Failure> {
        if st.done {
            let mut all = std::mem::take(&mut st.list);
            all.clear();
            all.extend(
                (0..st.active.len() as u32)
                    .rev()
                    .filter(|&s| st.active[s as usize]),
            );
            let r = self.exit_states(st, &all, event, node, false);
            all.clear();
            st.list = all;
            r?;
            return Ok(true);
        }
        let same = st.exited.len() == st.activated.len()
            && st
                .exited
                .iter()
                .rev()
                .zip(&st.activated)
                .all(|((a, _), b)| a == b);
        if same {
            for &(s, order) in &st.exited {
                st.order[s as usize] = order;
            }
        }
        Ok(!same || st.context_written)
    }

    fn add(&self, st: &mut MachineState, s: u32) {
        if !st.mark[s as usize] {
            st.mark[s as usize] = true;
            st.list.push(s);
        }
    }

    /// Whether a state below `child` is already to be entered.
    fn covered(&self, st: &MachineState, child: u32) -> bool {
        st.list.iter().any(|&x| self.is_desc(x, child))
    }

    /// XState v5 `computeEntrySet` for one transition.
    fn entry_set(&self, st: &mut MachineState, t: u32) {
        let tr = &self.chart.transitions[t as usize];
        if tr.targets.is_empty() {
            return;
        }
        let domain = match tr.domain {
            Domain::State(d) => Some(d),
            Domain::None | Domain::AboveRoot => None,
        };
        for &s in &tr.targets {
            // A transition into its own source without `reenter` leaves the source itself.
            if s != tr.source || domain != Some(tr.source) || tr.reenter {
                self.add(st, s);
            }
            self.add_descendants(st, s);
        }
        let reentrancy = if tr.source == 0 && tr.reenter {
            None
        } else {
            domain
        };
        for &s in &tr.targets {
            if domain != Some(s) {
                let mut at = self.chart.states[s as usize].parent;
                while let Some(a) = at {
                    if Some(a) == domain {
                        break;
                    }
                    self.add_ancestor(st, a, reentrancy);
                    at = self.chart.states[a as usize].parent;
                }
            }
            if let Some(d) = domain
                && self.chart.states[d as usize].kind == StateKind::Parallel
            {
                self.add_ancestor(st, d, reentrancy);
            }
        }
    }

    /// XState v5 `addAncestorStatesToEnter` for one ancestor: entered unless it is outside the
    /// reentrancy domain; a parallel ancestor also enters its regions not entered otherwise.
    fn add_ancestor(&self, st: &mut MachineState, a: u32, reentrancy: Option<u32>) {
        if reentrancy.is_none_or(|r| self.is_desc(a, r)) {
            self.add(st, a);
        }
        let node = &self.chart.states[a as usize];
        if node.kind == StateKind::Parallel {
            for &c in &node.children {
                if !self.covered(st, c) {
                    self.add(st, c);
                    self.add_descendants(st, c);
                }
            }
        }
    }

    /// XState v5 `addDescendantStatesToEnter` (the state itself is added by the caller).
    fn add_descendants(&self, st: &mut MachineState, s: u32) {
        let node = &self.chart.states[s as usize];
        match node.kind {
            StateKind::Compound => {
                if let Some(init) = node.initial {
                    self.add(st, init);
                    self.add_descendants(st, init);
                    // A deeper `initial` (`"a.b"`) also enters the states in between.
                    let mut at = self.chart.states[init as usize].parent;
                    while let Some(a) = at {
                        if a == s {
                            break;
                        }
                        self.add_ancestor(st, a, None);
                        at = self.chart.states[a as usize].parent;
                    }
                }
            }
            StateKind::Parallel => {
                for &c in &node.children {
                    if !self.covered(st, c) {
                        self.add(st, c);
                        self.add_descendants(st, c);
                    }
                }
            }
            StateKind::Atomic | StateKind::Final => {}
        }
    }

    /// Enters the states in `st.list` in document order, raising completion events.
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
        let mut completed: Vec<u32> = Vec::new();
        let mut r = Ok(());
        for &s in &list {
            let ns = &self.chart.states[s as usize];
            let i = s as usize;
            if !st.active[i] {
                st.active[i] = true;
                st.generation += 1;
                st.entered_gen[i] = st.generation;
                st.next_order += 1;
                st.order[i] = st.next_order;
                st.activated.push(s);
            }
            // (Only the root can be entered while active: a transition to the root from inside
            // it without `reenter` enters it again without exiting it, as XState does.)
            for a in &ns.after {
                st.timers.push(TimerCommand::Start(
                    TimerId {
                        state: s,
                        event: a.event,
                        generation: st.entered_gen[i],
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
                self.completed(st, s, &mut completed);
            }
        }
        list.clear();
        st.list = list;
        r
    }

    /// XState v5 `enterStates` for a final state: its compound parent raises
    /// `xstate.done.state.<parent>`, then every parallel ancestor whose regions are all done
    /// raises its own, outwards; reaching the root completes the machine.
    fn completed(&self, st: &mut MachineState, s: u32, completed: &mut Vec<u32>) {
        let states = &self.chart.states;
        let Some(p) = states[s as usize].parent else {
            return;
        };
        let parent = &states[p as usize];
        let mut marker = if parent.kind == StateKind::Parallel {
            Some(p)
        } else {
            parent.parent
        };
        if parent.kind == StateKind::Compound {
            st.internal.push_back(parent.done_event);
        }
        while let Some(m) = marker {
            if states[m as usize].kind != StateKind::Parallel
                || completed.contains(&m)
                || !self.in_final(st, m)
            {
                break;
            }
            completed.push(m);
            st.internal.push_back(states[m as usize].done_event);
            marker = states[m as usize].parent;
        }
        if marker.is_none() {
            st.done = true;
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
