//! The statechart model: XState JSON parsed, validated and compiled into a flat
//! table of states in document order, ready for the interpreter.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::error::LoadError;
use crate::json::Json;

/// The kind of a state node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateKind {
    /// No child states.
    Atomic,
    /// Exactly one child active at a time.
    Compound,
    /// Every child (region) active at once.
    Parallel,
    /// A final state: entering it completes its parent.
    Final,
}

/// Which events a transition listens to.
#[derive(Clone, Debug)]
pub(crate) enum Matcher {
    /// One event name (index into the event table).
    Exact(u32),
    /// `prefix.*`: the name `prefix` or any name starting with `prefix.`.
    Prefix(Box<str>),
    /// `*`: every event.
    Any,
}

impl Matcher {
    /// XState v5 candidate order: the exact name first, then the wildcards, longest first.
    fn rank(&self) -> (u8, usize) {
        match self {
            Matcher::Exact(_) => (0, 0),
            // `prefix.*` is the prefix plus two characters, `*` one.
            Matcher::Prefix(p) => (1, usize::MAX - (p.len() + 2)),
            Matcher::Any => (1, usize::MAX - 1),
        }
    }
}

/// An action named in the JSON, with its parameters.
#[derive(Clone, Debug)]
pub(crate) struct ActionRef {
    /// Index into [`Chart::action_names`].
    pub(crate) name: u32,
    pub(crate) params: Option<Arc<Value>>,
}

/// A guard named in the JSON, with its parameters.
#[derive(Clone, Debug)]
pub(crate) struct GuardRef {
    /// Index into [`Chart::guard_names`].
    pub(crate) name: u32,
    pub(crate) params: Option<Arc<Value>>,
}

/// The transition domain (XState v5 `getTransitionDomain`): the state whose active descendants
/// a transition exits and below which it enters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Domain {
    /// A targetless transition: it exits and enters nothing.
    None,
    /// Exits the active descendants of this state (not the state itself).
    State(u32),
    /// Above the root (`reenter: true` to the root or from it): exits and re-enters the root too.
    AboveRoot,
}

/// One transition.
#[derive(Clone, Debug)]
pub(crate) struct Transition {
    pub(crate) source: u32,
    /// Resolved targets; empty for a targetless transition.
    pub(crate) targets: Vec<u32>,
    pub(crate) guard: Option<GuardRef>,
    pub(crate) actions: Vec<ActionRef>,
    /// `reenter: true` (v4: `internal: false`).
    pub(crate) reenter: bool,
    pub(crate) domain: Domain,
}

/// A delayed (`after`) transition group of one state.
#[derive(Clone, Debug)]
pub(crate) struct After {
    pub(crate) delay: Duration,
    /// The internal event the timer raises (`xstate.after.<ms>.<state id>`).
    pub(crate) event: u32,
}

/// One state node.
#[derive(Clone, Debug)]
pub(crate) struct StateNode {
    pub(crate) key: Box<str>,
    /// Dotted path from the root (`""` for the root).
    pub(crate) path: Box<str>,
    /// `#id` of the state (custom `id`, else `<machine id>.<path>`).
    pub(crate) id: Box<str>,
    pub(crate) parent: Option<u32>,
    pub(crate) kind: StateKind,
    pub(crate) children: Vec<u32>,
    /// Index of the last descendant in document order (own index when there is none).
    pub(crate) end: u32,
    /// The default entry target of a compound state (a child or deeper descendant).
    pub(crate) initial: Option<u32>,
    pub(crate) entry: Vec<ActionRef>,
    pub(crate) exit: Vec<ActionRef>,
    /// Transitions by event: the exact names first, then the wildcards, longest first, each
    /// in document order (XState v5's candidate order).
    pub(crate) on: Vec<(Matcher, u32)>,
    pub(crate) always: Vec<u32>,
    pub(crate) after: Vec<After>,
    /// `xstate.done.state.<id>`, raised when this (compound or parallel) state completes.
    pub(crate) done_event: u32,
}

/// A parsed and validated statechart (no implementations yet); see [`crate::Interpreter`].
#[derive(Clone, Debug)]
pub struct Chart {
    pub(crate) id: Arc<str>,
    pub(crate) context: Value,
    pub(crate) states: Vec<StateNode>,
    pub(crate) transitions: Vec<Transition>,
    pub(crate) events: HashMap<Box<str>, u32>,
    pub(crate) event_names: Vec<Arc<str>>,
    /// Distinct action names with the JSON path of their first use.
    pub(crate) action_names: Vec<(Arc<str>, String)>,
    /// Distinct guard names with the JSON path of their first use.
    pub(crate) guard_names: Vec<(Arc<str>, String)>,
    pub(crate) by_path: HashMap<Box<str>, u32>,
    /// Whether any state has `always` transitions (else eventless selection is skipped).
    pub(crate) has_always: bool,
}

/// Prefix of the event a compound or parallel state raises when it completes (XState v5).
pub(crate) const DONE_STATE: &str = "xstate.done.state.";

/// Keys that XState allows and that carry no behaviour here.
const IGNORED_KEYS: &[&str] = &[
    "description",
    "meta",
    "tags",
    "version",
    "predictableActionArguments",
    "preserveActionOrder",
    "schema",
    "tsTypes",
    "$schema",
    "types",
    "key",
    "order",
];
const STATE_KEYS: &[&str] = &[
    "id", "type", "initial", "states", "on", "entry", "exit", "after", "always", "onDone",
];
const UNSUPPORTED_KEYS: &[(&str, &str)] = &[
    ("invoke", "`invoke` (spawned services)"),
    ("history", "history states"),
    ("activities", "`activities`"),
    ("output", "`output` on final states"),
    ("data", "`data` (done data) on final states"),
    (
        "parallel",
        "the v3 `parallel: true` flag (use `type: \"parallel\"`)",
    ),
    ("onError", "`onError`"),
];
const TRANSITION_KEYS: &[&str] = &[
    "target",
    "actions",
    "guard",
    "cond",
    "internal",
    "reenter",
    "description",
    "meta",
];

fn not_chart(path: &str, reason: impl Into<String>) -> LoadError {
    LoadError::NotAStatechart {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn child_path(base: &str, key: &str) -> String {
    let simple = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '$');
    if simple {
        format!("{base}.{key}")
    } else {
        format!("{base}[{key:?}]")
    }
}

fn get<'a>(obj: &'a [(String, Json)], key: &str) -> Option<&'a Json> {
    obj.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

struct RawTransition<'a> {
    source: u32,
    json: &'a Json,
    path: String,
    /// Where the transition goes: an event matcher, `always`, or nothing (after/onDone fill it in).
    slot: Slot,
}

enum Slot {
    On(Matcher),
    Always,
}

struct Builder<'a> {
    chart: Chart,
    raw: Vec<&'a [(String, Json)]>,
    json_paths: Vec<String>,
    ids: HashMap<Box<str>, u32>,
    pending: Vec<RawTransition<'a>>,
}

impl Chart {
    /// Parses XState JSON text; object key order is kept, so states are in document order.
    pub fn from_json(text: &str) -> Result<Chart, LoadError> {
        let json: Json = serde_json::from_str(text).map_err(|e| LoadError::Json(e.to_string()))?;
        Chart::compile(&json)
    }

    /// Loads an already parsed `serde_json::Value`.
    ///
    /// Document order follows the map's key order: without serde_json's
    /// `preserve_order` feature that is alphabetical, which changes the default
    /// initial state of a compound state that has no `initial`. Prefer
    /// [`Chart::from_json`] when order matters.
    pub fn from_value(value: &Value) -> Result<Chart, LoadError> {
        Chart::compile(&Json::from_value(value))
    }

    /// The machine id (`id` of the root, `(machine)` if absent).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The initial `context` of the JSON (`null` if absent).
    pub fn initial_context(&self) -> &Value {
        &self.context
    }

    /// Every state path (`"active.playing"`) in document order, without the root.
    pub fn state_paths(&self) -> impl Iterator<Item = &str> {
        self.states.iter().skip(1).map(|s| &*s.path)
    }

    /// Every action name the JSON uses.
    pub fn action_names(&self) -> impl Iterator<Item = &str> {
        self.action_names.iter().map(|(n, _)| &**n)
    }

    /// Every guard name the JSON uses.
    pub fn guard_names(&self) -> impl Iterator<Item = &str> {
        self.guard_names.iter().map(|(n, _)| &**n)
    }

    /// The kind of the state at `path` (`""` is the root), if there is one.
    pub fn state_kind(&self, path: &str) -> Option<StateKind> {
        self.by_path
            .get(path)
            .map(|&i| self.states[i as usize].kind)
    }

    pub(crate) fn event_id(&self, name: &str) -> Option<u32> {
        self.events.get(name).copied()
    }

    fn compile(json: &Json) -> Result<Chart, LoadError> {
        let Json::Object(root) = json else {
            return Err(not_chart(
                "$",
                format!(
                    "expected an object with `id`, `initial` and `states`, found {}",
                    json.kind()
                ),
            ));
        };
        let id: Arc<str> = match get(root, "id") {
            None => "(machine)".into(),
            Some(Json::String(s)) if !s.is_empty() => s.as_str().into(),
            Some(other) => {
                return Err(not_chart(
                    "$.id",
                    format!("expected a non-empty string, found {}", other.kind()),
                ));
            }
        };
        match get(root, "states") {
            Some(Json::Object(o)) if !o.is_empty() => {}
            Some(Json::Object(_)) => {
                return Err(not_chart(
                    "$.states",
                    "a statechart needs at least one state",
                ));
            }
            Some(other) => {
                return Err(not_chart(
                    "$.states",
                    format!("expected an object of states, found {}", other.kind()),
                ));
            }
            None => {
                return Err(not_chart(
                    "$",
                    "no `states`: a statechart is an object with `initial` and `states` (XState JSON)",
                ));
            }
        }
        let context = match get(root, "context") {
            // XState v5's default context.
            None => Value::Object(serde_json::Map::new()),
            Some(c) => c.to_value(),
        };
        let mut b = Builder {
            chart: Chart {
                id,
                context,
                states: Vec::new(),
                transitions: Vec::new(),
                events: HashMap::new(),
                event_names: Vec::new(),
                action_names: Vec::new(),
                guard_names: Vec::new(),
                by_path: HashMap::new(),
                has_always: false,
            },
            raw: Vec::new(),
            json_paths: Vec::new(),
            ids: HashMap::new(),
            pending: Vec::new(),
        };
        b.add_state(root, "", None, "$".to_owned(), true)?;
        for i in 0..b.chart.states.len() {
            b.link_state(i as u32)?;
        }
        let pending = std::mem::take(&mut b.pending);
        for raw in pending {
            b.add_transitions(raw)?;
        }
        for s in &mut b.chart.states {
            s.on.sort_by_key(|(m, _)| m.rank());
        }
        let chart = &mut b.chart;
        chart.has_always = chart.states.iter().any(|s| !s.always.is_empty());
        Ok(b.chart)
    }
}

impl<'a> Builder<'a> {
    fn intern_event(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.chart.events.get(name) {
            return i;
        }
        let i = self.chart.event_names.len() as u32;
        self.chart.events.insert(name.into(), i);
        self.chart.event_names.push(name.into());
        i
    }

    /// Pass 1: creates the node (preorder) and its descendants.
    fn add_state(
        &mut self,
        obj: &'a [(String, Json)],
        key: &str,
        parent: Option<u32>,
        json_path: String,
        is_root: bool,
    ) -> Result<u32, LoadError> {
        for (k, v) in obj {
            let known = STATE_KEYS.contains(&k.as_str()) || IGNORED_KEYS.contains(&k.as_str());
            let root_only = k == "context";
            if let Some((_, feature)) = UNSUPPORTED_KEYS.iter().find(|(u, _)| u == k) {
                return Err(LoadError::Unsupported {
                    path: child_path(&json_path, k),
                    feature: (*feature).to_owned(),
                });
            }
            if root_only && !is_root {
                return Err(not_chart(
                    &child_path(&json_path, k),
                    "only the root of the machine has a `context`",
                ));
            }
            if !known && !root_only {
                return Err(not_chart(
                    &child_path(&json_path, k),
                    format!(
                        "unknown key `{k}`; a state node has {}",
                        STATE_KEYS.join(", ")
                    ),
                ));
            }
            let _ = v;
        }
        let states = match get(obj, "states") {
            None => None,
            Some(Json::Object(o)) => Some(o),
            Some(other) => {
                return Err(not_chart(
                    &child_path(&json_path, "states"),
                    format!("expected an object of states, found {}", other.kind()),
                ));
            }
        };
        let has_children = states.is_some_and(|s| !s.is_empty());
        let kind = match get(obj, "type") {
            None => {
                if has_children {
                    StateKind::Compound
                } else {
                    StateKind::Atomic
                }
            }
            Some(Json::String(t)) => match t.as_str() {
                "atomic" if !has_children => StateKind::Atomic,
                "compound" if has_children => StateKind::Compound,
                "parallel" if has_children => StateKind::Parallel,
                "final" if !has_children => StateKind::Final,
                "atomic" | "final" => {
                    return Err(not_chart(
                        &child_path(&json_path, "type"),
                        format!("a `{t}` state has no child `states`"),
                    ));
                }
                "compound" | "parallel" => {
                    return Err(not_chart(
                        &child_path(&json_path, "type"),
                        format!("a `{t}` state needs child `states`"),
                    ));
                }
                "history" => {
                    return Err(LoadError::Unsupported {
                        path: child_path(&json_path, "type"),
                        feature: "history states".into(),
                    });
                }
                other => {
                    return Err(not_chart(
                        &child_path(&json_path, "type"),
                        format!(
                            "unknown state type `{other}`; use atomic, compound, parallel or final"
                        ),
                    ));
                }
            },
            Some(other) => {
                return Err(not_chart(
                    &child_path(&json_path, "type"),
                    format!("expected a string, found {}", other.kind()),
                ));
            }
        };
        if is_root && kind == StateKind::Final {
            return Err(not_chart("$.type", "the root of a machine cannot be final"));
        }
        if kind == StateKind::Final {
            for k in ["on", "always", "after", "onDone"] {
                if get(obj, k).is_some() {
                    return Err(not_chart(
                        &child_path(&json_path, k),
                        "a final state has no outgoing transitions",
                    ));
                }
            }
        }
        if key.contains(['.', '*', '#']) {
            return Err(not_chart(
                &json_path,
                format!(
                    "state key `{key}` contains `.`, `*` or `#`, which separate state paths and topic segments; rename it"
                ),
            ));
        }
        if !is_root && key.is_empty() {
            return Err(not_chart(&json_path, "a state key must not be empty"));
        }
        let index = self.chart.states.len() as u32;
        let path: Box<str> = match parent {
            None => "".into(),
            Some(p) => {
                let pp = &self.chart.states[p as usize].path;
                if pp.is_empty() {
                    key.into()
                } else {
                    format!("{pp}.{key}").into()
                }
            }
        };
        let default_id: Box<str> = if path.is_empty() {
            (*self.chart.id).into()
        } else {
            format!("{}.{}", self.chart.id, path).into()
        };
        let custom_id = match get(obj, "id") {
            None => None,
            Some(Json::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(other) => {
                return Err(not_chart(
                    &child_path(&json_path, "id"),
                    format!("expected a non-empty string, found {}", other.kind()),
                ));
            }
        };
        let id: Box<str> = match (&custom_id, is_root) {
            (Some(c), false) => c.as_str().into(),
            _ => default_id.clone(),
        };
        for candidate in [Some(default_id), custom_id.map(Into::into)]
            .into_iter()
            .flatten()
        {
            if let Some(&other) = self.ids.get(&candidate)
                && other != index
            {
                return Err(not_chart(
                    &child_path(&json_path, "id"),
                    format!(
                        "id `{candidate}` is already used by state `{}`; ids must be unique",
                        self.json_paths[other as usize]
                    ),
                ));
            }
            self.ids.insert(candidate, index);
        }
        let done_name = format!("{DONE_STATE}{id}");
        let done_event = self.intern_event(&done_name);
        self.chart.by_path.insert(path.clone(), index);
        self.chart.states.push(StateNode {
            key: key.into(),
            path,
            id,
            parent,
            kind,
            children: Vec::new(),
            end: index,
            initial: None,
            entry: Vec::new(),
            exit: Vec::new(),
            on: Vec::new(),
            always: Vec::new(),
            after: Vec::new(),
            done_event,
        });
        self.raw.push(obj);
        self.json_paths.push(json_path.clone());
        if let Some(children) = states {
            let states_path = child_path(&json_path, "states");
            for (k, v) in children {
                let cpath = child_path(&states_path, k);
                let Json::Object(cobj) = v else {
                    return Err(not_chart(
                        &cpath,
                        format!("expected a state object, found {}", v.kind()),
                    ));
                };
                let c = self.add_state(cobj, k, Some(index), cpath, false)?;
                self.chart.states[index as usize].children.push(c);
            }
        }
        self.chart.states[index as usize].end = self.chart.states.len() as u32 - 1;
        Ok(index)
    }

    /// Pass 2: initial state, actions, and the transitions (queued; targets need every state).
    fn link_state(&mut self, i: u32) -> Result<(), LoadError> {
        let obj = self.raw[i as usize];
        let jp = self.json_paths[i as usize].clone();
        let kind = self.chart.states[i as usize].kind;
        match (get(obj, "initial"), kind) {
            (Some(Json::String(init)), StateKind::Compound) => {
                let target = self
                    .resolve_keys(i, init)
                    .filter(|&t| t != i)
                    .ok_or_else(|| LoadError::UnknownInitial {
                        path: child_path(&jp, "initial"),
                        initial: init.clone(),
                    })?;
                self.chart.states[i as usize].initial = Some(target);
            }
            (Some(Json::String(init)), StateKind::Atomic | StateKind::Final) => {
                return Err(LoadError::UnknownInitial {
                    path: child_path(&jp, "initial"),
                    initial: init.clone(),
                });
            }
            (Some(Json::String(_)), StateKind::Parallel) => {
                // Every region of a parallel state is entered; `initial` has no meaning there.
            }
            (Some(other), _) => {
                return Err(not_chart(
                    &child_path(&jp, "initial"),
                    format!("expected the key of a child state, found {}", other.kind()),
                ));
            }
            (None, StateKind::Compound) => {
                // SCXML: the first child in document order.
                self.chart.states[i as usize].initial =
                    self.chart.states[i as usize].children.first().copied();
            }
            (None, _) => {}
        }
        if let Some(e) = get(obj, "entry") {
            let acts = self.actions(e, &child_path(&jp, "entry"))?;
            self.chart.states[i as usize].entry = acts;
        }
        if let Some(e) = get(obj, "exit") {
            let acts = self.actions(e, &child_path(&jp, "exit"))?;
            self.chart.states[i as usize].exit = acts;
        }
        if let Some(on) = get(obj, "on") {
            let on_path = child_path(&jp, "on");
            match on {
                Json::Object(o) => {
                    for (ev, t) in o {
                        let slot = if ev.is_empty() {
                            Slot::Always
                        } else if ev == "*" {
                            Slot::On(Matcher::Any)
                        } else if let Some(prefix) = ev.strip_suffix(".*") {
                            Slot::On(Matcher::Prefix(prefix.into()))
                        } else if ev.contains('*') {
                            return Err(not_chart(
                                &child_path(&on_path, ev),
                                "`*` is allowed only as `*` or as a last segment (`feedback.*`)",
                            ));
                        } else if let Some(id) = ev.strip_prefix("done.state.") {
                            // The v4 name of the completion event.
                            Slot::On(Matcher::Exact(
                                self.intern_event(&format!("{DONE_STATE}{id}")),
                            ))
                        } else {
                            Slot::On(Matcher::Exact(self.intern_event(ev)))
                        };
                        self.pending.push(RawTransition {
                            source: i,
                            json: t,
                            path: child_path(&on_path, ev),
                            slot,
                        });
                    }
                }
                other => {
                    return Err(not_chart(
                        &on_path,
                        format!("expected an object of event names, found {}", other.kind()),
                    ));
                }
            }
        }
        if let Some(a) = get(obj, "always") {
            self.pending.push(RawTransition {
                source: i,
                json: a,
                path: child_path(&jp, "always"),
                slot: Slot::Always,
            });
        }
        if let Some(d) = get(obj, "onDone") {
            let ev = self.chart.states[i as usize].done_event;
            self.pending.push(RawTransition {
                source: i,
                json: d,
                path: child_path(&jp, "onDone"),
                slot: Slot::On(Matcher::Exact(ev)),
            });
        }
        if let Some(after) = get(obj, "after") {
            let after_path = child_path(&jp, "after");
            let mut groups: Vec<(u64, &'a Json, String)> = Vec::new();
            match after {
                Json::Object(o) => {
                    for (ms, t) in o {
                        let p = child_path(&after_path, ms);
                        let delay = ms.trim().parse::<u64>().map_err(|_| {
                            if ms.chars().all(|c| c.is_ascii_digit() || c == '.') {
                                not_chart(&p, "a delay is a whole number of milliseconds")
                            } else {
                                LoadError::Unsupported {
                                    path: p.clone(),
                                    feature: format!("the named delay `{ms}`"),
                                }
                            }
                        })?;
                        groups.push((delay, t, p));
                    }
                }
                Json::Array(a) => {
                    for (n, t) in a.iter().enumerate() {
                        let p = format!("{after_path}[{n}]");
                        let delay = match t {
                            Json::Object(o) => match get(o, "delay") {
                                Some(Json::Number(d)) => d.as_u64(),
                                _ => None,
                            },
                            _ => None,
                        }
                        .ok_or_else(|| {
                            not_chart(&p, "expected `{ \"delay\": <ms>, \"target\": .. }`")
                        })?;
                        groups.push((delay, t, p));
                    }
                }
                other => {
                    return Err(not_chart(
                        &after_path,
                        format!(
                            "expected an object of delays in milliseconds, found {}",
                            other.kind()
                        ),
                    ));
                }
            }
            for (delay, t, p) in groups {
                let name = format!("xstate.after.{delay}.{}", self.chart.states[i as usize].id);
                let ev = self.intern_event(&name);
                if !self.chart.states[i as usize]
                    .after
                    .iter()
                    .any(|a| a.event == ev)
                {
                    self.chart.states[i as usize].after.push(After {
                        delay: Duration::from_millis(delay),
                        event: ev,
                    });
                }
                self.pending.push(RawTransition {
                    source: i,
                    json: t,
                    path: p,
                    slot: Slot::On(Matcher::Exact(ev)),
                });
            }
        }
        Ok(())
    }

    fn add_transitions(&mut self, raw: RawTransition<'a>) -> Result<(), LoadError> {
        let items: Vec<(&Json, String)> = match raw.json {
            Json::Array(a) => a
                .iter()
                .enumerate()
                .map(|(n, t)| (t, format!("{}[{n}]", raw.path)))
                .collect(),
            other => vec![(other, raw.path.clone())],
        };
        for (t, path) in items {
            let tr = self.transition(raw.source, t, &path)?;
            let idx = self.chart.transitions.len() as u32;
            self.chart.transitions.push(tr);
            let s = &mut self.chart.states[raw.source as usize];
            match &raw.slot {
                Slot::On(m) => s.on.push((m.clone(), idx)),
                Slot::Always => s.always.push(idx),
            }
        }
        Ok(())
    }

    fn transition(&mut self, source: u32, t: &Json, path: &str) -> Result<Transition, LoadError> {
        let mut tr = Transition {
            source,
            targets: Vec::new(),
            guard: None,
            actions: Vec::new(),
            reenter: false,
            domain: Domain::None,
        };
        let mut reenter: Option<bool> = None;
        match t {
            // `EVENT: null` (XState v4 "forbidden transition"): consumes the event, does nothing.
            Json::Null => {}
            Json::String(target) => {
                tr.targets = self.targets(source, path, target)?;
            }
            Json::Object(o) => {
                for (k, _) in o {
                    if !TRANSITION_KEYS.contains(&k.as_str()) && k != "delay" {
                        return Err(not_chart(
                            &child_path(path, k),
                            format!(
                                "unknown key `{k}`; a transition has {}",
                                TRANSITION_KEYS.join(", ")
                            ),
                        ));
                    }
                }
                if let Some(target) = get(o, "target") {
                    let tp = child_path(path, "target");
                    tr.targets = match target {
                        Json::Null => Vec::new(),
                        Json::String(s) => self.targets(source, &tp, s)?,
                        Json::Array(a) => {
                            let mut v = Vec::new();
                            for (n, x) in a.iter().enumerate() {
                                let xp = format!("{tp}[{n}]");
                                match x {
                                    Json::String(s) => v.extend(self.targets(source, &xp, s)?),
                                    other => {
                                        return Err(not_chart(
                                            &xp,
                                            format!(
                                                "expected a target string, found {}",
                                                other.kind()
                                            ),
                                        ));
                                    }
                                }
                            }
                            v
                        }
                        other => {
                            return Err(not_chart(
                                &tp,
                                format!(
                                    "expected a target string or an array of them, found {}",
                                    other.kind()
                                ),
                            ));
                        }
                    };
                }
                if let Some(a) = get(o, "actions") {
                    tr.actions = self.actions(a, &child_path(path, "actions"))?;
                }
                let guard = match (get(o, "guard"), get(o, "cond")) {
                    (Some(_), Some(_)) => {
                        return Err(not_chart(
                            path,
                            "both `guard` (v5) and `cond` (v4) are set; keep one",
                        ));
                    }
                    (Some(g), None) => Some((g, child_path(path, "guard"))),
                    (None, Some(g)) => Some((g, child_path(path, "cond"))),
                    (None, None) => None,
                };
                if let Some((g, gp)) = guard {
                    tr.guard = Some(self.guard(g, &gp)?);
                }
                for (k, invert) in [("reenter", false), ("internal", true)] {
                    match get(o, k) {
                        None => {}
                        Some(Json::Bool(b)) => reenter = Some(*b != invert),
                        Some(other) => {
                            return Err(not_chart(
                                &child_path(path, k),
                                format!("expected true or false, found {}", other.kind()),
                            ));
                        }
                    }
                }
            }
            other => {
                return Err(not_chart(
                    path,
                    format!(
                        "expected a target string, a transition object or an array of them, found {}",
                        other.kind()
                    ),
                ));
            }
        }
        tr.reenter = reenter.unwrap_or(false);
        tr.domain = self.domain(&tr);
        Ok(tr)
    }

    fn is_desc(&self, a: u32, b: u32) -> bool {
        b < a && a <= self.chart.states[b as usize].end
    }

    /// XState v5 `getTransitionDomain`. Without `reenter`, a transition to its own source or the
    /// source's descendants stays inside the source; otherwise the domain is the least common
    /// ancestor of the targets and the source, of whatever kind (a parallel state too, so its
    /// other regions are exited and re-entered but the state itself is not); with no common
    /// ancestor, the root, or above it with `reenter`.
    fn domain(&self, tr: &Transition) -> Domain {
        let Some((&head, rest)) = tr.targets.split_first() else {
            return Domain::None;
        };
        if !tr.reenter
            && tr
                .targets
                .iter()
                .all(|&t| t == tr.source || self.is_desc(t, tr.source))
        {
            return Domain::State(tr.source);
        }
        let mut at = self.chart.states[head as usize].parent;
        while let Some(a) = at {
            if self.is_desc(tr.source, a) && rest.iter().all(|&t| self.is_desc(t, a)) {
                return Domain::State(a);
            }
            at = self.chart.states[a as usize].parent;
        }
        if tr.reenter {
            Domain::AboveRoot
        } else {
            Domain::State(0)
        }
    }

    fn targets(&self, source: u32, path: &str, target: &str) -> Result<Vec<u32>, LoadError> {
        let unknown = || LoadError::UnknownTarget {
            path: path.to_owned(),
            target: target.to_owned(),
        };
        let t = self.resolve_target(source, target).ok_or_else(unknown)?;
        Ok(vec![t])
    }

    /// Resolves `#id`, `#id.child`, `.child.grandchild` and `sibling.child`.
    fn resolve_target(&self, source: u32, target: &str) -> Option<u32> {
        if let Some(id) = target.strip_prefix('#') {
            if let Some(&i) = self.ids.get(id) {
                return Some(i);
            }
            // `#id.rest`: the longest id prefix, then keys below it.
            let mut cut = id.len();
            while let Some(dot) = id[..cut].rfind('.') {
                if let Some(&i) = self.ids.get(&id[..dot]) {
                    return self.resolve_keys(i, &id[dot + 1..]);
                }
                cut = dot;
            }
            None
        } else if let Some(rel) = target.strip_prefix('.') {
            self.resolve_keys(source, rel)
        } else {
            let base = self.chart.states[source as usize].parent.unwrap_or(0);
            self.resolve_keys(base, target)
        }
    }

    /// Walks `a.b.c` down from `from`'s children.
    fn resolve_keys(&self, from: u32, keys: &str) -> Option<u32> {
        let mut at = from;
        for k in keys.split('.') {
            at = *self.chart.states[at as usize]
                .children
                .iter()
                .find(|&&c| &*self.chart.states[c as usize].key == k)?;
        }
        Some(at)
    }

    fn name_index(names: &mut Vec<(Arc<str>, String)>, name: &str, path: &str) -> u32 {
        if let Some(i) = names.iter().position(|(n, _)| &**n == name) {
            return i as u32;
        }
        names.push((name.into(), path.to_owned()));
        names.len() as u32 - 1
    }

    /// `"name"`, `{ "type": "name", "params": .. }` or an array of them.
    fn actions(&mut self, j: &Json, path: &str) -> Result<Vec<ActionRef>, LoadError> {
        let items: Vec<(&Json, String)> = match j {
            Json::Array(a) => a
                .iter()
                .enumerate()
                .map(|(n, x)| (x, format!("{path}[{n}]")))
                .collect(),
            other => vec![(other, path.to_owned())],
        };
        let mut out = Vec::with_capacity(items.len());
        for (x, p) in items {
            let (name, params) = self.named(x, &p, "action")?;
            let name = Self::name_index(&mut self.chart.action_names, &name, &p);
            out.push(ActionRef { name, params });
        }
        Ok(out)
    }

    fn guard(&mut self, j: &Json, path: &str) -> Result<GuardRef, LoadError> {
        let (name, params) = self.named(j, path, "guard")?;
        let name = Self::name_index(&mut self.chart.guard_names, &name, path);
        Ok(GuardRef { name, params })
    }

    fn named(
        &self,
        j: &Json,
        path: &str,
        what: &str,
    ) -> Result<(String, Option<Arc<Value>>), LoadError> {
        match j {
            Json::String(s) if !s.is_empty() => Ok((s.clone(), None)),
            Json::Object(o) => {
                let name = match get(o, "type") {
                    Some(Json::String(s)) if !s.is_empty() => s.clone(),
                    _ => {
                        return Err(not_chart(
                            path,
                            format!("an {what} object needs a `type` naming the {what}"),
                        ));
                    }
                };
                let params = match get(o, "params") {
                    Some(p) => Some(Arc::new(p.to_value())),
                    None => {
                        // v4 style: the other keys of the object are the parameters.
                        let rest: serde_json::Map<String, Value> = o
                            .iter()
                            .filter(|(k, _)| k != "type")
                            .map(|(k, v)| (k.clone(), v.to_value()))
                            .collect();
                        (!rest.is_empty()).then(|| Arc::new(Value::Object(rest)))
                    }
                };
                Ok((name, params))
            }
            other => Err(not_chart(
                path,
                format!(
                    "expected an {what} name or {{ \"type\": name }}, found {}",
                    other.kind()
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_nested_in_document_order() {
        let c = Chart::from_json(
            r#"{"id":"m","initial":"z","states":{
                "z":{"initial":"b","states":{"b":{},"a":{}}, "on":{"GO":".a"}},
                "y":{"type":"final"}}}"#,
        )
        .unwrap();
        let paths: Vec<_> = c.state_paths().collect();
        assert_eq!(paths, ["z", "z.b", "z.a", "y"]);
        assert_eq!(c.states[0].end, 4);
        assert_eq!(c.states[1].end, 3);
        let t = &c.transitions[0];
        assert_eq!(t.domain, Domain::State(1));
        assert_eq!(t.targets, [3]);
    }
}
