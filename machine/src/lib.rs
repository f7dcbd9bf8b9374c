//! Switchyard statecharts: XState-style JSON machines whose actions talk through a [`Node`].
//!
//! - [`Chart`] loads the XState JSON format (the v4/v5 common subset: `id`, `initial`,
//!   `context`, nested `states`, `type: "parallel" | "final"`, `on` with a target, an object
//!   or an array of guarded candidates, targetless transitions, `entry`/`exit`, `after`,
//!   `always`, `onDone`) and checks it; every error names its JSON path ([`LoadError`]).
//!   Unknown keys are errors (they are usually typos); documentation keys (`description`,
//!   `meta`, `tags`, ..) are ignored; `invoke` and history states are [`LoadError::Unsupported`].
//! - [`Interpreter`] binds a chart to the user's named [`Actions`] and guards, and runs it the
//!   way XState v5 does (its version of the SCXML algorithm: same configuration and same action
//!   order after every event) over a [`MachineState`]. It is pure: no tokio, no Node, so it can
//!   be unit-tested and benchmarked by feeding it events; `after` timers run on a virtual clock
//!   ([`Interpreter::advance`]).
//! - [`Interpreter::bind`] puts a machine on a [`Node`] of a [`Session`]: it is addressable by
//!   id and type, receives events from whichever transport the selector chose, runs `after`
//!   timers on tokio's clock, executes the sends its actions requested after each step (in
//!   order), and publishes every state change on the topic `state.<machine id>.<state path>`.
//!
//! # Semantics
//!
//! XState v5 is the reference: traces recorded from XState itself (`machine/xstate-traces`,
//! replayed by `tests/xstate_traces.rs`) are the test. `docs/STATECHARTS.md` lists the few
//! places where switchyard keeps a different rule on purpose (v4 aliases such as `cond`, load
//! errors for typos, failures that roll back instead of stopping the machine), with reasons.
//!
//! - **Re-entry**: a transition to its own source or to the source's descendants does not exit
//!   the source unless it says `reenter: true` (v4: `internal: false`); an atomic
//!   self-transition runs only its actions, a compound one restarts at the initial child.
//!   Otherwise the states below the least common ancestor of source and targets are exited,
//!   whatever its kind: a parallel ancestor itself stays, its regions are exited and entered.
//! - **Event matching**: the exact name first, then the wildcards, the longest first (`x.y.*`
//!   before `x.*` before `*`); candidates of one pattern are tried in document order, the first
//!   whose guard (`guard` or v4 `cond`) passes wins. The deepest active states choose first;
//!   a state is asked only when none of its active descendants took the event (for a parallel
//!   state: none of its regions); regions are asked in the order they were entered.
//! - **Eventless** (`always`) transitions are selected after every event and every raised
//!   completion event, with that event, for the active atomic states in the order they were
//!   entered; one that changes nothing (same states, no context write) is not repeated.
//! - **Completion**: a final state completes its compound parent (`xstate.done.state.<id>`,
//!   handled with `onDone`), and a parallel state completes when every region has; a final
//!   state directly in a parallel region completes that region. When the root completes, the
//!   machine is done and every active state's exit actions run.
//! - **Sends** requested by actions ([`ActionContext::send`], `send_to_any_of_type`, `publish`,
//!   `send_self`, `send_delayed`, `request`, `reply`) are collected during the step and run after
//!   it, in the order requested. `send_self` queues the event on the machine itself without a
//!   transport. A failed send raises `error.communication` ([`SendFailure`]) on the machine.
//! - **Requests** never block the machine: the request goes out in order with the step's other
//!   sends (whenever the transport takes it at once), and the reply arrives later as the event
//!   `done.request.<event>` (its data is the reply's data), a failure or timeout as
//!   `error.request.<event>` (data: [`SendFailure`]).
//! - **Locating** a peer: [`ActionContext::locate`] answers at once when the registry can
//!   (in-process); with a registry that needs I/O (the ipc bus registry, shared by the host's
//!   processes) use [`ActionContext::request_location`], answered later as the event
//!   `done.locate.<target>` (data: [`Located`]) or `error.locate.<target>`.
//! - **Failures**: an action that returns an error or panics (or a guard that panics) rolls the
//!   whole event back (configuration, context, timers, sends), and the machine gets an
//!   `error.action` event ([`Failure`]) and logs it with tracing. A failure while handling
//!   `error.action` is only logged. A failing `after` transition is not retried (its timer has
//!   fired); handle `error.action` to move on.
//! - **Start**: if an entry action of the initial states fails, `build()` returns
//!   [`MachineError::Start`] and the Node leaves the session.
//! - **State changes**: each atomic state entered by a step is published on
//!   `state.<id>.<path>`; the event name is the topic and the data a [`StateChange`]. Without a
//!   pub/sub transport (direct only) nothing is published, which is not an error; use
//!   [`StateMachine::wait_for_state`] there.
//! - **Timers**: one per (state, delay), started on entry, cancelled on exit; timers that fall
//!   due at the same time fire in the order they started, one step each, and a timer started
//!   by a fired one counts from that one's due time. A bound machine fires the timers that are
//!   due before each event it handles.
//! - **Ordering**: a machine handles one event at a time; deliveries from several transports
//!   are queued on the machine (bounded, [`DEFAULT_QUEUE_CAPACITY`]; past it events are dropped,
//!   counted and logged). [`StateMachine::send`] says when the machine did not take an event
//!   (stopped, done, queue full).
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use switchyard_machine::{Actions, Interpreter};
//!
//! let json = r#"{
//!   "id": "toggle", "initial": "off", "context": { "flips": 0 },
//!   "states": {
//!     "off": { "on": { "FLIP": { "target": "on", "actions": "count" } } },
//!     "on":  { "on": { "FLIP": { "target": "off", "actions": ["count", "tell"] } } }
//!   }
//! }"#;
//! let actions = Actions::new()
//!     .action("count", |ctx| {
//!         let n: u64 = ctx.get("flips")?;
//!         ctx.set("flips", n + 1)
//!     })
//!     .action("tell", |ctx| {
//!         ctx.publish("lamp.flipped", "FLIPPED", ());
//!         Ok(())
//!     });
//! let interp = Interpreter::from_json(json, &actions)?;
//!
//! // Pure: feed events directly.
//! let mut st = interp.new_state();
//! interp.start(&mut st);
//! interp.send(&mut st, &switchyard_machine::Event::new("FLIP"));
//! assert!(interp.matches(&st, "on"));
//!
//! // Bound to a Node: addressable by id and type, state changes on `state.lamp.#`.
//! let session = switchyard::builder().build()?; // the facade: direct + memory transports
//! let lamp = interp.bind(&session, "lamp", "Lamp").build().await?;
//! lamp.send("FLIP", ()).await?;
//! assert!(lamp.matches("on"));
//! assert_eq!(lamp.snapshot().context["flips"], 1);
//! # Ok(()) }
//! ```
//!
//! The same machine code runs on any transport; only the session configuration differs.
//!
//! [`Node`]: switchyard_core::Node
//! [`Session`]: switchyard_core::Session

#![warn(missing_docs)]

mod actions;
mod binding;
mod chart;
mod error;
mod interpreter;
mod json;

pub use actions::{
    ActionContext, ActionFn, Actions, Effect, Event, GuardContext, GuardFn, Origin, OutPayload,
};
pub use binding::{
    DEFAULT_QUEUE_CAPACITY, DONE_LOCATE, DONE_REQUEST, ERROR_COMMUNICATION, ERROR_LOCATE,
    ERROR_REQUEST, Located, SendFailure, StateChange, StateMachine, StateMachineBuilder,
};
pub use chart::{Chart, StateKind};
pub use error::{ActionError, Failure, FailureKind, LoadError, MachineError};
pub use interpreter::{
    ERROR_ACTION, INIT_EVENT, Interpreter, MAX_MICROSTEPS, MachineState, Snapshot, Status, Step,
    TimerCommand, TimerId,
};
