//! Switchyard statecharts: XState-style JSON machines whose actions talk through a [`Node`].
//!
//! - [`Chart`] loads the XState JSON format (the v4/v5 common subset: `id`, `initial`,
//!   `context`, nested `states`, `type: "parallel" | "final"`, `on` with a target, an object
//!   or an array of guarded candidates, targetless transitions, `entry`/`exit`, `after`,
//!   `always`, `onDone`) and checks it; every error names its JSON path ([`LoadError`]).
//!   Unknown keys are errors (they are usually typos); documentation keys (`description`,
//!   `meta`, `tags`, ..) are ignored; `invoke` and history states are [`LoadError::Unsupported`].
//! - [`Interpreter`] binds a chart to the user's named [`Actions`] and guards, and runs the
//!   W3C SCXML algorithm (exit and entry sets via the least common compound ancestor, in
//!   document order, run-to-completion) over a [`MachineState`]. It is pure: no tokio, no
//!   Node, so it can be unit-tested and benchmarked by feeding it events.
//! - [`Interpreter::bind`] puts a machine on a [`Node`] of a [`Session`]: it is addressable by
//!   id and type, receives events from whichever transport the selector chose, runs `after`
//!   timers, executes the sends its actions requested after each step (in order), and
//!   publishes every state change on the topic `state.<machine id>.<state path>`.
//!
//! # Semantics where XState leaves a choice
//!
//! - **Re-entry** follows XState v5: a transition to its own source or to the source's
//!   descendants does not exit the source unless it says `reenter: true` (v4: `internal: false`);
//!   an atomic self-transition runs only its actions, a compound one restarts at the initial
//!   child. (v4 re-entered on a plain self-target; write `reenter: true` for that.)
//! - **Event matching**: exact names first, then `prefix.*`, then `*`; candidates of one event are
//!   tried in document order, the first whose guard (`guard` or v4 `cond`) passes wins;
//!   `EVENT: null` consumes the event without doing anything.
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
//! - **Timers**: one per (state, delay), started on entry, cancelled on exit; a timer that
//!   elapses after its state was left is ignored.
//! - **Ordering**: a machine handles one event at a time; deliveries from several transports
//!   are queued on the machine (bounded, [`DEFAULT_QUEUE_CAPACITY`]; past it events are dropped,
//!   counted and logged).
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
