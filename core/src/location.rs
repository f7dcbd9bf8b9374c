//! Where a target lives relative to the sender.

use serde::{Deserialize, Serialize};

use crate::registry::MachineEntry;

/// The distance between a sender and its target; the selector routes by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Location {
    /// Same single-threaded context.
    SameThread,
    /// Same process, other thread or task.
    SameProcess,
    /// Same host, other process.
    SameMachine,
    /// Another host.
    Remote,
}

impl Location {
    /// All locations, nearest first.
    pub const ALL: [Location; 4] = [
        Location::SameThread,
        Location::SameProcess,
        Location::SameMachine,
        Location::Remote,
    ];

    /// Computes the location of `to` as seen from `from` by comparing host, process and context ids.
    pub fn between(from: &MachineEntry, to: &MachineEntry) -> Location {
        if from.host_id != to.host_id {
            Location::Remote
        } else if from.process_id != to.process_id {
            Location::SameMachine
        } else if from.context.is_some() && from.context == to.context {
            Location::SameThread
        } else {
            Location::SameProcess
        }
    }
}
