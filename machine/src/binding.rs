//! A machine bound to a [`Node`]: addressable by id and type, fed by whatever transport
//! carried the event, its state changes published on `state.<id>.<path>`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard_core::{
    Envelope, Error, Location, MachineBuilder, MachineEntry, MachineId, Node, ReplyTo, Session,
};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::actions::{Effect, Event, Origin};
use crate::error::{Failure, MachineError};
use crate::interpreter::{ERROR_ACTION, Interpreter, MachineState, Snapshot, Step};

/// The event a machine receives when one of its sends failed (data: [`SendFailure`]).
pub const ERROR_COMMUNICATION: &str = "error.communication";
/// Prefix of the event carrying a request's reply: `done.request.<request event>`.
pub const DONE_REQUEST: &str = "done.request.";
/// Prefix of the event reporting a failed request or timeout: `error.request.<request event>`.
pub const ERROR_REQUEST: &str = "error.request.";
/// Prefix of the event answering [`crate::ActionContext::request_location`]: `done.locate.<target>`.
pub const DONE_LOCATE: &str = "done.locate.";
/// Prefix of the event reporting a failed location request: `error.locate.<target>`.
pub const ERROR_LOCATE: &str = "error.locate.";
/// Default bound of a machine's own event queue.
pub const DEFAULT_QUEUE_CAPACITY: usize = 4096;

/// Data of `error.communication` and `error.request.<event>`: a send that failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendFailure {
    /// The target (machine id, type, or topic).
    pub target: String,
    /// The event that was sent.
    pub event: String,
    /// The error.
    pub message: String,
}

/// Data of `done.locate.<target>`: where the target lives, as the selector sees it from this machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Located {
    /// The target's registry entry.
    pub entry: MachineEntry,
    /// Its location relative to this machine.
    pub location: Location,
}

/// Data published on `state.<machine id>.<state path>` when a machine enters an atomic state.
///
/// The published event's name is the topic itself, so another JSON machine can react
/// with `on: { "state.light.red": .. }` or `on: { "state.light.*": .. }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateChange {
    /// The machine id.
    pub machine: String,
    /// The dotted path of the entered atomic state.
    pub state: String,
    /// The whole state value after the step (XState shape).
    pub value: Value,
    /// The event that caused the change (`xstate.init` for the start).
    pub event: String,
}

enum Input {
    Event(Event),
    /// Fire the `after` timers that are due by now.
    Clock,
}

/// The task that wakes the machine when its earliest `after` timer falls due.
struct ClockTask {
    /// Tells this task from the one that replaced it.
    id: u64,
    due: Duration,
    task: AbortHandle,
}

struct Shared {
    interp: Interpreter,
    state: Mutex<MachineState>,
    queue: Mutex<VecDeque<Input>>,
    capacity: usize,
    running: AtomicBool,
    /// Time zero of the machine's virtual clock: its `after` timers run on tokio's clock.
    origin: Instant,
    clock: Mutex<Option<ClockTask>>,
    clock_tasks: AtomicU64,
    stopped: AtomicBool,
    /// The machine reached a top-level final state (kept out of the state's lock, which an
    /// action holds while it runs).
    done: AtomicBool,
    publish: AtomicBool,
    changes: watch::Sender<u64>,
    dropped: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Actions run under `catch_unwind`; the guarded state is consistent even after a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Resets the drain flag even if the draining future is dropped halfway.
struct Draining<'a>(&'a AtomicBool);
impl Drop for Draining<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Shared {
    fn push(&self, input: Input) -> bool {
        let mut q = lock(&self.queue);
        if q.len() >= self.capacity {
            drop(q);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        q.push_back(input);
        true
    }

    /// [`Shared::deliver`] as a boxed `Send` future, for spawned tasks (breaks the async recursion).
    fn deliver_owned(self: Arc<Self>, node: Node, input: Input) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let _ = self.deliver(&node, input).await;
        })
    }

    /// Queues the input and runs the queue unless another caller is running it; says why an
    /// input was not taken.
    async fn deliver(self: &Arc<Self>, node: &Node, input: Input) -> Result<(), MachineError> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(MachineError::Stopped {
                id: node.id().to_string(),
            });
        }
        if matches!(input, Input::Event(_)) && self.done.load(Ordering::Acquire) {
            return Err(MachineError::Done {
                id: node.id().to_string(),
            });
        }
        if !self.push(input) {
            tracing::warn!(machine = %node.id(), capacity = self.capacity, "machine event queue full; event dropped");
            return Err(MachineError::QueueFull {
                id: node.id().to_string(),
                capacity: self.capacity,
            });
        }
        self.drain(node).await;
        Ok(())
    }

    /// Runs queued events one at a time; a caller that finds another drain running leaves its
    /// event to it (no re-entrancy, no deadlock when a transport delivers inline).
    async fn drain(self: &Arc<Self>, node: &Node) {
        loop {
            if self.running.swap(true, Ordering::AcqRel) {
                return;
            }
            let guard = Draining(&self.running);
            loop {
                let next = lock(&self.queue).pop_front();
                let Some(input) = next else { break };
                self.process(node, input).await;
            }
            drop(guard);
            if lock(&self.queue).is_empty() {
                return;
            }
        }
    }

    async fn process(self: &Arc<Self>, node: &Node, input: Input) {
        // The timers that fell due before this input fire first, in due order, each its own step.
        let now = self.origin.elapsed();
        loop {
            let done = {
                let mut st = lock(&self.state);
                self.interp
                    .fire_due_named(&mut st, now, Some(node))
                    .map(|(name, step)| self.collect(&mut st, step, name))
            };
            let Some(done) = done else { break };
            self.finish(node, done).await;
        }
        if let Input::Event(e) = input {
            let done = {
                let mut st = lock(&self.state);
                let step = self.interp.send_with(&mut st, &e, Some(node));
                self.collect(&mut st, step, e.name_arc().clone())
            };
            self.finish(node, done).await;
        }
        self.schedule_clock(node);
    }

    /// What a step left to do outside the lock: its sends, its state-change publications.
    fn collect(&self, st: &mut MachineState, step: Step, event: Arc<str>) -> StepOutput {
        let effects = if st.has_effects() {
            st.take_effects()
        } else {
            Vec::new()
        };
        // The machine's own clock runs its timers; the commands are for other hosts.
        st.clear_timers();
        if st.is_done() {
            self.done.store(true, Ordering::Release);
        }
        let publications = self.publications(st, step.transitioned, &event);
        StepOutput {
            step,
            event,
            effects,
            publications,
        }
    }

    async fn finish(self: &Arc<Self>, node: &Node, out: StepOutput) {
        if out.step.transitioned {
            self.changes.send_modify(|v| *v = v.wrapping_add(1));
        }
        self.apply(node, out.publications, out.effects).await;
        if let Some(f) = out.step.failure {
            self.report(node, f, &out.event);
        }
    }

    /// Makes sure a task wakes the machine when its earliest timer falls due.
    fn schedule_clock(self: &Arc<Self>, node: &Node) {
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        let next = lock(&self.state).next_timer();
        let mut slot = lock(&self.clock);
        if let (Some(due), Some(t)) = (next, slot.as_ref())
            && t.due == due
        {
            return;
        }
        // Whoever takes a task out of the slot owns it: a task that took itself out (it woke
        // up) is running the machine and is not aborted.
        if let Some(t) = slot.take() {
            t.task.abort();
        }
        let Some(due) = next else { return };
        let id = self.clock_tasks.fetch_add(1, Ordering::Relaxed);
        let shared = self.clone();
        let n = node.clone();
        let at = self.origin + due;
        // Spawned while the slot is held, so the task finds itself there when it wakes.
        let task = tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            {
                let mut slot = lock(&shared.clock);
                if slot.as_ref().is_none_or(|t| t.id != id) {
                    return;
                }
                *slot = None;
            }
            shared.deliver_owned(n, Input::Clock).await;
        });
        *slot = Some(ClockTask {
            id,
            due,
            task: task.abort_handle(),
        });
    }

    fn stop_clock(&self) {
        self.stopped.store(true, Ordering::Release);
        if let Some(t) = lock(&self.clock).take() {
            t.task.abort();
        }
    }

    fn report(&self, node: &Node, f: Failure, event_name: &str) {
        tracing::error!(
            machine = %node.id(), kind = ?f.kind, name = %f.name, event = %f.event, message = %f.message,
            "statechart action failed; the event was rolled back and the machine keeps its last consistent state"
        );
        if event_name != ERROR_ACTION && !self.push(Input::Event(Event::with_data(ERROR_ACTION, f)))
        {
            tracing::warn!(machine = %node.id(), "machine event queue full; error.action dropped");
        }
    }

    fn publications(
        &self,
        st: &MachineState,
        transitioned: bool,
        event: &str,
    ) -> Vec<(String, StateChange)> {
        if !transitioned || !self.publish.load(Ordering::Relaxed) || st.entered().is_empty() {
            return Vec::new();
        }
        let value = self.interp.snapshot_value(st);
        let id = st.machine_id();
        self.interp
            .entered_paths(st)
            .map(|p| {
                (
                    format!("state.{id}.{p}"),
                    StateChange {
                        machine: id.to_owned(),
                        state: p.to_owned(),
                        value: value.clone(),
                        event: event.to_owned(),
                    },
                )
            })
            .collect()
    }

    async fn apply(
        self: &Arc<Self>,
        node: &Node,
        publications: Vec<(String, StateChange)>,
        effects: Vec<Effect>,
    ) {
        for (topic, change) in publications {
            match node.publish(&topic, topic.clone(), change).await {
                Ok(_) => {}
                Err(Error::NotSupported { .. }) => {
                    // No pub/sub transport (e.g. direct only): state changes are simply not published.
                    self.publish.store(false, Ordering::Relaxed);
                    break;
                }
                Err(Error::SessionClosed | Error::Closed(_)) => break,
                Err(e) => {
                    tracing::warn!(machine = %node.id(), topic = %topic, error = %e, "state change not published");
                }
            }
        }
        for effect in effects {
            self.run_effect(node, effect).await;
        }
    }

    /// Polls `fut` once: a ready answer is queued behind the current step, a pending one is
    /// delivered from a task when it arrives.
    async fn answer_now_or_later<T, F, O>(
        self: &Arc<Self>,
        node: &Node,
        mut fut: F,
        outcome: O,
        what: &str,
    ) where
        F: Future<Output = T> + Unpin + Send + 'static,
        O: FnOnce(T) -> Event + Send + 'static,
    {
        match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut fut).poll(cx))).await {
            Poll::Ready(r) => {
                if !self.push(Input::Event(outcome(r))) {
                    tracing::warn!(machine = %node.id(), "machine event queue full; {what} dropped");
                }
            }
            Poll::Pending => {
                let shared = self.clone();
                let n = node.clone();
                tokio::spawn(async move {
                    let ev = outcome(fut.await);
                    shared.deliver_owned(n, Input::Event(ev)).await;
                });
            }
        }
    }

    async fn run_effect(self: &Arc<Self>, node: &Node, effect: Effect) {
        let (target, event, result): (String, Arc<str>, Result<(), Error>) = match effect {
            Effect::Send { to, event, payload } => {
                let r = node
                    .send(to.clone(), event.clone(), payload.into_payload())
                    .await;
                (to.to_string(), event, r)
            }
            Effect::SendToAnyOfType {
                machine_type,
                event,
                payload,
            } => {
                let r = payload
                    .send_any(node.clone(), machine_type.clone(), event.clone())
                    .await
                    .map(|_| ());
                (format!("any:{machine_type}"), event, r)
            }
            Effect::Publish {
                topic,
                event,
                payload,
            } => {
                let r = payload
                    .publish(node.clone(), topic.clone(), event.clone())
                    .await
                    .map(|_| ());
                (format!("topic:{topic}"), event, r)
            }
            Effect::SendSelf { event, payload } => {
                if !self.push(Input::Event(Event::from_payload(
                    event.clone(),
                    payload.into_payload(),
                ))) {
                    tracing::warn!(machine = %node.id(), event = %event, "machine event queue full; send_self dropped");
                }
                return;
            }
            Effect::SendDelayed {
                to,
                event,
                payload,
                delay,
            } => {
                let r = payload
                    .send_delayed(node.clone(), to.clone(), event.clone(), delay)
                    .await;
                (to.to_string(), event, r)
            }
            Effect::Request {
                to,
                event,
                payload,
                timeout,
            } => {
                let fut = payload.request(node.clone(), to.clone(), event.clone(), timeout);
                let outcome = move |r: Result<Envelope, Error>| match r {
                    Ok(reply) => {
                        let name: Arc<str> = format!("{DONE_REQUEST}{event}").into();
                        let origin = Origin {
                            source: reply.source.clone(),
                            reply_to: reply.headers.reply_to.clone(),
                            correlation_id: None,
                            transport: reply.carried_by,
                        };
                        Event::from_payload(name, reply.payload.clone()).with_origin(origin)
                    }
                    Err(e) => Event::with_data(
                        format!("{ERROR_REQUEST}{event}"),
                        SendFailure {
                            target: to.to_string(),
                            event: event.to_string(),
                            message: e.to_string(),
                        },
                    ),
                };
                // Polled once here, the request goes out in order with the other sends (it does
                // whenever the transport takes it at once); the wait for the reply runs in a task.
                self.answer_now_or_later(node, fut, outcome, "request outcome")
                    .await;
                return;
            }
            Effect::Locate { target } => {
                let n = node.clone();
                let id = target.clone();
                let fut = Box::pin(async move { n.locate(&id).await });
                let outcome = move |r: Result<(MachineEntry, Location), Error>| match r {
                    Ok((entry, location)) => Event::with_data(
                        format!("{DONE_LOCATE}{target}"),
                        Located { entry, location },
                    ),
                    Err(e) => Event::with_data(
                        format!("{ERROR_LOCATE}{target}"),
                        SendFailure {
                            target: target.to_string(),
                            event: "locate".into(),
                            message: e.to_string(),
                        },
                    ),
                };
                // An in-process registry answers at once: the answer is queued behind this step
                // like `send_self`; a registry that needs I/O answers from a task.
                self.answer_now_or_later(node, fut, outcome, "location answer")
                    .await;
                return;
            }
            Effect::Reply {
                origin,
                event,
                payload,
            } => {
                let to = origin.reply_to.clone().unwrap_or(origin.source.clone());
                let r = node
                    .reply(
                        ReplyTo::new(to.clone(), origin.correlation_id),
                        event.clone(),
                        payload.into_payload(),
                    )
                    .await;
                (to.to_string(), event, r)
            }
        };
        if let Err(e) = result {
            if matches!(e, Error::SessionClosed | Error::Closed(_)) {
                tracing::debug!(machine = %node.id(), target = %target, "send after shutdown dropped");
                return;
            }
            tracing::warn!(machine = %node.id(), target = %target, event = %event, error = %e, "send requested by an action failed");
            let failure = SendFailure {
                target,
                event: event.to_string(),
                message: e.to_string(),
            };
            if !self.push(Input::Event(Event::with_data(ERROR_COMMUNICATION, failure))) {
                tracing::warn!(machine = %node.id(), "machine event queue full; error.communication dropped");
            }
        }
    }
}

/// A step's results, taken out of the machine's lock.
struct StepOutput {
    step: Step,
    event: Arc<str>,
    effects: Vec<Effect>,
    publications: Vec<(String, StateChange)>,
}

impl Interpreter {
    /// Starts describing a machine that runs this statechart on a Node of `session`.
    pub fn bind(
        &self,
        session: &Session,
        id: impl Into<MachineId>,
        machine_type: impl Into<Arc<str>>,
    ) -> StateMachineBuilder {
        StateMachineBuilder {
            interp: self.clone(),
            builder: session.machine(id, machine_type),
            context: None,
            // Without a pub/sub transport there is nobody to publish to: skip the work.
            publish: !session.router().pubsub().is_empty(),
            capacity: DEFAULT_QUEUE_CAPACITY,
        }
    }
}

/// Configures a machine before it joins the session; see [`Interpreter::bind`].
pub struct StateMachineBuilder {
    interp: Interpreter,
    builder: MachineBuilder,
    context: Option<Value>,
    publish: bool,
    capacity: usize,
}

impl StateMachineBuilder {
    /// Replaces the chart's initial `context`.
    pub fn context(mut self, context: Value) -> Self {
        self.context = Some(context);
        self
    }
    /// Adjusts the Node (single-threaded context, mailbox, metadata, version); its handler is replaced.
    pub fn configure(mut self, f: impl FnOnce(MachineBuilder) -> MachineBuilder) -> Self {
        self.builder = f(self.builder);
        self
    }
    /// Whether state changes are published on `state.<id>.<path>` (default: on when the session
    /// has a pub/sub transport).
    pub fn publish_states(mut self, on: bool) -> Self {
        self.publish = on;
        self
    }
    /// Bound of the machine's own event queue (default [`DEFAULT_QUEUE_CAPACITY`]); past it events are dropped and counted.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Registers the machine, enters its initial states and runs their actions.
    pub async fn build(self) -> Result<StateMachine, MachineError> {
        let st = match self.context {
            Some(c) => self.interp.new_state_with_context(c),
            None => self.interp.new_state(),
        };
        let shared = Arc::new(Shared {
            interp: self.interp,
            state: Mutex::new(st),
            queue: Mutex::new(VecDeque::new()),
            capacity: self.capacity,
            // Claimed until the start is done: early events wait in the queue.
            running: AtomicBool::new(true),
            origin: Instant::now(),
            clock: Mutex::new(None),
            clock_tasks: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            done: AtomicBool::new(false),
            publish: AtomicBool::new(self.publish),
            changes: watch::Sender::new(0),
            dropped: AtomicU64::new(0),
        });
        let s2 = shared.clone();
        let node = self
            .builder
            .handler_async(move |node: Node, env| {
                let shared = s2.clone();
                async move {
                    // A full queue was logged; a stopped or done machine takes nothing.
                    let _ = shared
                        .deliver(&node, Input::Event(Event::from_envelope(env)))
                        .await;
                }
            })
            .build()
            .await;
        let node = match node {
            Ok(n) => n,
            Err(e) => {
                shared.running.store(false, Ordering::Release);
                return Err(e.into());
            }
        };
        let init: Arc<str> = crate::interpreter::INIT_EVENT.into();
        let out = {
            let mut st = lock(&shared.state);
            st.set_machine_id(node.id().as_str());
            let step = shared.interp.start_with(&mut st, Some(&node));
            shared.collect(&mut st, step, init)
        };
        if let Some(failure) = out.step.failure {
            shared.stop_clock();
            let _ = node.close().await;
            return Err(MachineError::Start {
                id: node.id().to_string(),
                failure,
            });
        }
        {
            let guard = Draining(&shared.running);
            shared.finish(&node, out).await;
            shared.schedule_clock(&node);
            drop(guard);
        }
        shared.drain(&node).await;
        Ok(StateMachine { shared, node })
    }
}

/// A running statechart bound to a Node; cheap to clone.
#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
    node: Node,
}

impl std::fmt::Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("id", self.node.id())
            .finish()
    }
}

impl StateMachine {
    /// The machine id.
    pub fn id(&self) -> &MachineId {
        self.node.id()
    }
    /// The Node the machine talks through.
    pub fn node(&self) -> &Node {
        &self.node
    }
    /// The current state value, context and status.
    pub fn snapshot(&self) -> Snapshot {
        let st = lock(&self.shared.state);
        self.shared.interp.snapshot(&st)
    }
    /// Whether the state at the dotted path (`"active.paused"`) is active.
    pub fn matches(&self, path: &str) -> bool {
        let st = lock(&self.shared.state);
        self.shared.interp.matches(&st, path)
    }
    /// Whether a top-level final state was reached.
    pub fn is_done(&self) -> bool {
        lock(&self.shared.state).is_done()
    }
    /// The dotted paths of the active atomic (and final) states, in document order.
    pub fn active_leaves(&self) -> Vec<String> {
        let st = lock(&self.shared.state);
        self.shared
            .interp
            .active_leaves(&st)
            .map(str::to_owned)
            .collect()
    }
    /// How many events (including the start) changed the machine so far.
    pub fn transitions(&self) -> u64 {
        *self.shared.changes.borrow()
    }
    /// Events dropped because the machine's queue was full.
    pub fn dropped_events(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Gives the machine an event directly (no transport), as if it had been received.
    ///
    /// `Ok` means the machine took the event: it was handled before `send` returned, or queued
    /// behind the event another caller is running (it is handled before that caller returns).
    /// An error says it was not taken: the machine was stopped ([`MachineError::Stopped`]), has
    /// reached a top-level final state and ignores events ([`MachineError::Done`]), or its queue
    /// is full ([`MachineError::QueueFull`], counted in [`StateMachine::dropped_events`]).
    pub async fn send<P: Serialize + Send + Sync + 'static>(
        &self,
        event: impl Into<Arc<str>>,
        payload: P,
    ) -> Result<(), MachineError> {
        self.shared
            .deliver(&self.node, Input::Event(Event::with_data(event, payload)))
            .await
    }

    /// Fires the `after` timers that are due by now on tokio's clock, in due order, and returns
    /// when they have been handled.
    ///
    /// The machine does this by itself when its earliest timer falls due; call it to be sure
    /// that it has, e.g. after `tokio::time::advance` on a paused clock in a test.
    pub async fn fire_due_timers(&self) -> Result<(), MachineError> {
        self.shared.deliver(&self.node, Input::Clock).await
    }

    /// Waits until the snapshot satisfies `f` (checked after every step); wrap it in a timeout.
    pub async fn wait_until(&self, mut f: impl FnMut(&Snapshot) -> bool) -> Snapshot {
        let mut rx = self.shared.changes.subscribe();
        loop {
            let snap = self.snapshot();
            if f(&snap) {
                return snap;
            }
            if rx.changed().await.is_err() {
                return snap;
            }
        }
    }

    /// Waits until the state at the dotted path is active; wrap it in a timeout.
    pub async fn wait_for_state(&self, path: &str) -> Snapshot {
        let mut rx = self.shared.changes.subscribe();
        loop {
            if self.matches(path) {
                return self.snapshot();
            }
            if rx.changed().await.is_err() {
                return self.snapshot();
            }
        }
    }

    /// Cancels the machine's timers and removes it from the session; it takes no more events.
    pub async fn stop(&self) -> Result<(), MachineError> {
        self.shared.stop_clock();
        self.node.close().await?;
        Ok(())
    }
}
