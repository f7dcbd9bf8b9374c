//! Switchyard selector: routes every send by the target's location to the right transport.
//!
//! For each send the selector compares the target's registry entry with the
//! sender's ([`Location::between`]), then takes the transports configured for
//! that location, in order. The first one is used; on a retryable failure
//! (`Error::is_retryable`) the next one is tried. A per-machine override can
//! force a location (to exercise a remote path on one host) or a transport list.
//! Which transports exist is decided by cargo features (the facade wires them)
//! plus this configuration.
//!
//! ```
//! use switchyard_core::{Location, Router};
//! use switchyard_selector::Selector;
//! let sel = Selector::builder()
//!     .prefer(Location::SameProcess, ["memory"])
//!     .build();
//! assert!(sel.transports().is_empty());
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use switchyard_core::{Error, Location, MachineEntry, MachineId, Result, Route, Router, Transport};

/// Configures a [`Selector`].
#[derive(Default)]
pub struct SelectorBuilder {
    transports: Vec<Arc<dyn Transport>>,
    prefer: HashMap<Location, Vec<String>>,
    force_location: HashMap<MachineId, Location>,
    force_location_all: Option<Location>,
    force_transports: HashMap<MachineId, Vec<String>>,
}

impl SelectorBuilder {
    /// Adds a transport; by default transports are tried in the order they were added.
    pub fn transport(mut self, t: Arc<dyn Transport>) -> Self {
        self.transports.push(t);
        self
    }
    /// Sets the transports (by name, in order) used for a location; others that reach it are not used.
    pub fn prefer<I, S>(mut self, loc: Location, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.prefer
            .insert(loc, names.into_iter().map(Into::into).collect());
        self
    }
    /// Treats a machine as if it were at `loc`, whatever its registry entry says.
    pub fn force_location(mut self, id: impl Into<MachineId>, loc: Location) -> Self {
        self.force_location.insert(id.into(), loc);
        self
    }
    /// Treats every machine as if it were at `loc` (per-machine overrides still win), e.g. to run a
    /// cross-process transport between machines of one process.
    pub fn force_location_all(mut self, loc: Location) -> Self {
        self.force_location_all = Some(loc);
        self
    }
    /// Uses exactly these transports (by name, in order) for sends to one machine.
    pub fn force_transports<I, S>(mut self, id: impl Into<MachineId>, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.force_transports
            .insert(id.into(), names.into_iter().map(Into::into).collect());
        self
    }
    /// Removes the transports with these names (configuration on top of cargo features).
    pub fn without<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let names: Vec<String> = names.into_iter().map(|s| s.as_ref().to_string()).collect();
        self.transports
            .retain(|t| !names.iter().any(|n| n == t.name()));
        self
    }
    /// Names of the transports added so far.
    pub fn transport_names(&self) -> Vec<&'static str> {
        self.transports.iter().map(|t| t.name()).collect()
    }

    /// Builds the selector.
    pub fn build(self) -> Selector {
        let by_name = |names: &[String]| -> Arc<[Arc<dyn Transport>]> {
            names
                .iter()
                .filter_map(|n| self.transports.iter().find(|t| t.name() == n).cloned())
                .collect()
        };
        let by_location = Location::ALL.map(|loc| match self.prefer.get(&loc) {
            Some(names) => by_name(names),
            None => self
                .transports
                .iter()
                .filter(|t| t.capabilities().reaches(loc))
                .cloned()
                .collect(),
        });
        let force_transports = self
            .force_transports
            .iter()
            .map(|(id, names)| (id.clone(), by_name(names)))
            .collect();
        let pubsub = self
            .transports
            .iter()
            .filter(|t| {
                let c = t.capabilities();
                c.topics || c.groups
            })
            .cloned()
            .collect();
        Selector {
            by_location,
            force_location: self.force_location,
            force_location_all: self.force_location_all,
            force_transports,
            pubsub,
            all: self.transports,
        }
    }
}

/// The standard [`Router`]: location → ordered transports, with fallback and per-machine overrides.
pub struct Selector {
    all: Vec<Arc<dyn Transport>>,
    by_location: [Arc<[Arc<dyn Transport>]>; 4],
    force_location: HashMap<MachineId, Location>,
    force_location_all: Option<Location>,
    force_transports: HashMap<MachineId, Arc<[Arc<dyn Transport>]>>,
    pubsub: Vec<Arc<dyn Transport>>,
}

impl Selector {
    /// A builder with no transports.
    pub fn builder() -> SelectorBuilder {
        SelectorBuilder::default()
    }

    /// The transports configured for a location, in the order they are tried.
    pub fn for_location(&self, loc: Location) -> &[Arc<dyn Transport>] {
        &self.by_location[loc as usize]
    }

    /// The location the selector uses for a send from `from` to `to` (overrides applied).
    pub fn location(&self, from: &MachineEntry, to: &MachineEntry) -> Location {
        self.force_location
            .get(&to.id)
            .copied()
            .or(self.force_location_all)
            .unwrap_or_else(|| Location::between(from, to))
    }
}

impl Router for Selector {
    fn route(&self, from: &MachineEntry, to: &MachineEntry) -> Result<Route> {
        let location = self.location(from, to);
        let transports = match self.force_transports.get(&to.id) {
            Some(list) => list.clone(),
            None => self.by_location[location as usize].clone(),
        };
        if transports.is_empty() {
            return Err(Error::NoTransport {
                target: to.id.clone(),
                location,
            });
        }
        Ok(Route::new(location, transports))
    }

    fn locate(&self, from: &MachineEntry, to: &MachineEntry) -> Location {
        self.location(from, to)
    }

    fn pubsub(&self) -> &[Arc<dyn Transport>] {
        &self.pubsub
    }

    fn transports(&self) -> &[Arc<dyn Transport>] {
        &self.all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, process: &str) -> MachineEntry {
        MachineEntry {
            id: id.into(),
            machine_type: "T".into(),
            host_id: "h".into(),
            process_id: process.into(),
            context: None,
            version: None,
            accepts: Vec::new(),
            metadata: Default::default(),
        }
    }

    #[test]
    fn force_location_all_applies_to_every_target_but_per_machine_overrides_win() {
        let sel = Selector::builder()
            .force_location_all(Location::SameMachine)
            .force_location("pinned", Location::Remote)
            .build();
        let from = entry("a", "p1");
        assert_eq!(
            sel.location(&from, &entry("b", "p1")),
            Location::SameMachine
        );
        assert_eq!(
            sel.location(&from, &entry("pinned", "p1")),
            Location::Remote
        );
        let plain = Selector::builder().build();
        assert_eq!(
            plain.location(&from, &entry("b", "p1")),
            Location::SameProcess
        );
    }
}
