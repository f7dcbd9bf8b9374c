//! Errors: load-time ([`LoadError`]), action failures ([`ActionError`], [`Failure`]) and
//! binding errors ([`MachineError`]).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A statechart that cannot be loaded; every variant names the place in the JSON
/// (`$.states.green.on.TIMER[0].target`) and says how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The text is not JSON at all.
    #[error("the statechart is not valid JSON: {0}; fix the syntax at that line and column")]
    Json(String),
    /// The JSON is not a statechart (wrong type, unknown key, missing `states`).
    #[error("`{path}` is not a valid statechart: {reason}")]
    NotAStatechart {
        /// Where in the JSON.
        path: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// A transition targets a state that does not exist.
    #[error(
        "`{path}`: transition target `{target}` is not a state of this machine; use a sibling key (`\"red\"`), a child (`\".child\"`) or an id (`\"#machine.a.b\"`)"
    )]
    UnknownTarget {
        /// Where in the JSON.
        path: String,
        /// The target as written.
        target: String,
    },
    /// `initial` names a state that is not a child of that state.
    #[error(
        "`{path}`: initial state `{initial}` is not a child of this state; name one of its `states` keys"
    )]
    UnknownInitial {
        /// Where in the JSON.
        path: String,
        /// The initial state as written.
        initial: String,
    },
    /// An action named in the JSON is not in the action map.
    #[error(
        "`{path}`: action `{name}` is not in the action map; add it with `Actions::action(\"{name}\", ..)`"
    )]
    MissingAction {
        /// Where in the JSON.
        path: String,
        /// The action name.
        name: String,
    },
    /// A guard named in the JSON is not in the action map.
    #[error(
        "`{path}`: guard `{name}` is not in the action map; add it with `Actions::guard(\"{name}\", ..)`"
    )]
    MissingGuard {
        /// Where in the JSON.
        path: String,
        /// The guard name.
        name: String,
    },
    /// A valid XState feature this interpreter does not implement.
    #[error(
        "`{path}`: {feature} is not supported by switchyard-machine; remove it or model it with actions and events"
    )]
    Unsupported {
        /// Where in the JSON.
        path: String,
        /// The feature.
        feature: String,
    },
}

impl LoadError {
    /// The JSON path the error is about (`$` for the whole document).
    pub fn path(&self) -> &str {
        match self {
            LoadError::Json(_) => "$",
            LoadError::NotAStatechart { path, .. }
            | LoadError::UnknownTarget { path, .. }
            | LoadError::UnknownInitial { path, .. }
            | LoadError::MissingAction { path, .. }
            | LoadError::MissingGuard { path, .. }
            | LoadError::Unsupported { path, .. } => path,
        }
    }
}

/// What an action returns when it fails; the machine rolls the event back and raises `error.action`.
#[derive(Clone, PartialEq, Eq)]
pub struct ActionError(String);

impl ActionError {
    /// An error with a message.
    pub fn new(message: impl Into<String>) -> ActionError {
        ActionError(message.into())
    }
    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ActionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ActionError({:?})", self.0)
    }
}
impl fmt::Display for ActionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl From<String> for ActionError {
    fn from(s: String) -> Self {
        ActionError(s)
    }
}
impl From<&str> for ActionError {
    fn from(s: &str) -> Self {
        ActionError(s.to_owned())
    }
}
impl From<switchyard_core::Error> for ActionError {
    fn from(e: switchyard_core::Error) -> Self {
        ActionError(e.to_string())
    }
}
impl From<serde_json::Error> for ActionError {
    fn from(e: serde_json::Error) -> Self {
        ActionError(e.to_string())
    }
}

/// Which kind of user code failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureKind {
    /// An action returned an error.
    Action,
    /// An action or guard panicked.
    Panic,
    /// Eventless (`always`) transitions or raised events kept firing without settling.
    Loop,
}

/// Why an event was rolled back; the payload of the `error.action` event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?} failure in `{name}` while handling `{event}`: {message}")]
pub struct Failure {
    /// What failed.
    pub kind: FailureKind,
    /// The action or guard name (or `always` for a loop).
    pub name: String,
    /// The event being handled.
    pub event: String,
    /// The error or panic message.
    pub message: String,
}

/// Errors of a machine bound to a Node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MachineError {
    /// The statechart or its action map is invalid.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// An entry action of the initial states failed, so the machine did not start.
    #[error(
        "machine `{id}` did not start: {failure}; fix the action or guard (the machine was removed from the session)"
    )]
    Start {
        /// The machine id.
        id: String,
        /// What failed.
        failure: Failure,
    },
    /// Registering or binding the Node failed.
    #[error(transparent)]
    Node(#[from] switchyard_core::Error),
    /// The machine was stopped and takes no more events.
    #[error("machine `{id}` is stopped and takes no more events; bind a new one to go on")]
    Stopped {
        /// The machine id.
        id: String,
    },
    /// The machine reached a top-level final state; it ignores further events.
    #[error(
        "machine `{id}` is done (it reached a top-level final state) and ignores events; bind a new one to start over"
    )]
    Done {
        /// The machine id.
        id: String,
    },
    /// The machine's event queue is full; the event was dropped.
    #[error(
        "machine `{id}`: its event queue is full ({capacity} events) and the event was dropped; send more slowly or raise `queue_capacity`"
    )]
    QueueFull {
        /// The machine id.
        id: String,
        /// The queue's bound.
        capacity: usize,
    },
}
