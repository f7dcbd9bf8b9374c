//! Switchyard selector: routes every send by the target's location to the right transport.
//!
//! For each send the selector compares the target's registry entry with the
//! sender's ([`Location::between`]), then takes the transports configured for
//! that location, in order. The first one is used; on a retryable failure
//! (`Error::is_retryable`: the transport cannot carry anything now) the next one
//! is tried. A per-machine override can force a location (to exercise a remote
//! path on one host) or a transport list. Which transports exist is decided by
//! cargo features (the facade wires them) plus this configuration.
//!
//! Publishes are routed by location too: each location is covered by the first
//! transport with topics among those configured for it (a location no such
//! transport reaches is covered by the nearest one that reaches farther), and each
//! pub/sub transport is handed the span of locations it covers, so every
//! subscriber gets a publish once, from the nearest transport.
//!
//! ```
//! use switchyard_core::{Location, Router};
//! use switchyard_selector::Selector;
//! let sel = Selector::builder()
//!     .prefer(Location::SameProcess, ["memory"])
//!     .build();
//! // No transport named "memory" was added: the preference is an error.
//! assert!(sel.is_err());
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use switchyard_core::{
    Error, Location, MachineEntry, MachineId, Reach, Result, RoutePlan, Router, Transport,
};

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
    ///
    /// A name that is not a configured transport makes [`SelectorBuilder::build`] fail.
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

    fn by_name(&self, names: &[String]) -> Result<Arc<[Arc<dyn Transport>]>> {
        names
            .iter()
            .map(|n| {
                self.transports
                    .iter()
                    .find(|t| t.name() == n)
                    .cloned()
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "the selector names transport `{n}`, which is not configured (configured: {}); \
                             check the spelling or enable its cargo feature",
                            self.transport_names().join(", ")
                        ))
                    })
            })
            .collect()
    }

    /// Builds the selector; a preference or override naming an unconfigured transport is
    /// [`Error::Config`].
    pub fn build(self) -> Result<Selector> {
        let mut by_location: [Arc<[Arc<dyn Transport>]>; 4] = Default::default();
        for loc in Location::ALL {
            by_location[loc as usize] = match self.prefer.get(&loc) {
                Some(names) => self.by_name(names)?,
                None => self
                    .transports
                    .iter()
                    .filter(|t| t.capabilities().reaches(loc))
                    .cloned()
                    .collect(),
            };
        }
        let mut force_transports = HashMap::new();
        for (id, names) in &self.force_transports {
            force_transports.insert(id.clone(), self.by_name(names)?);
        }
        let (pubsub, groups) = pubsub_plan(&by_location);
        Ok(Selector {
            by_location,
            force_location: self.force_location,
            force_location_all: self.force_location_all,
            force_transports,
            pubsub,
            groups,
            all: self.transports,
        })
    }
}

/// Each pub/sub transport with the span of locations it covers.
type PubSubPlan = Vec<(Arc<dyn Transport>, Reach)>;

/// Which pub/sub transport covers each location, as spans; and the owner of groups.
fn pubsub_plan(
    by_location: &[Arc<[Arc<dyn Transport>]>; 4],
) -> (PubSubPlan, Option<Arc<dyn Transport>>) {
    let mut cover: [Option<Arc<dyn Transport>>; 4] = Default::default();
    for loc in Location::ALL {
        cover[loc as usize] = by_location[loc as usize]
            .iter()
            .find(|t| t.pubsub().is_some())
            .cloned();
    }
    // A location no pub/sub transport reaches is covered by the nearest one that reaches
    // farther: it can deliver nearer too (ipc to its own process, a broker to its own host).
    for i in (0..3).rev() {
        if cover[i].is_none() {
            cover[i] = cover[i + 1].clone();
        }
    }
    let mut plan: Vec<(Arc<dyn Transport>, Reach)> = Vec::new();
    for loc in Location::ALL {
        let Some(t) = &cover[loc as usize] else {
            continue;
        };
        match plan.last_mut() {
            Some((last, reach))
                if Arc::ptr_eq(last, t) && reach.farthest as usize + 1 == loc as usize =>
            {
                reach.farthest = loc;
            }
            _ => plan.push((t.clone(), Reach::new(loc, loc))),
        }
    }
    let groups = cover
        .iter()
        .rev()
        .flatten()
        .find(|t| t.capabilities().groups)
        .cloned();
    (plan, groups)
}

/// The standard [`Router`]: location → ordered transports, with fallback and per-machine overrides.
pub struct Selector {
    all: Vec<Arc<dyn Transport>>,
    by_location: [Arc<[Arc<dyn Transport>]>; 4],
    force_location: HashMap<MachineId, Location>,
    force_location_all: Option<Location>,
    force_transports: HashMap<MachineId, Arc<[Arc<dyn Transport>]>>,
    pubsub: PubSubPlan,
    groups: Option<Arc<dyn Transport>>,
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
    fn route(&self, from: &MachineEntry, to: &MachineEntry) -> Result<RoutePlan> {
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
        Ok(RoutePlan {
            location,
            transports,
        })
    }

    fn locate(&self, from: &MachineEntry, to: &MachineEntry) -> Location {
        self.location(from, to)
    }

    fn pubsub(&self) -> &[(Arc<dyn Transport>, Reach)] {
        &self.pubsub
    }

    fn groups(&self) -> Option<&Arc<dyn Transport>> {
        self.groups.as_ref()
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
            .build()
            .unwrap();
        let from = entry("a", "p1");
        assert_eq!(
            sel.location(&from, &entry("b", "p1")),
            Location::SameMachine
        );
        assert_eq!(
            sel.location(&from, &entry("pinned", "p1")),
            Location::Remote
        );
        let plain = Selector::builder().build().unwrap();
        assert_eq!(
            plain.location(&from, &entry("b", "p1")),
            Location::SameProcess
        );
    }

    #[test]
    fn an_unknown_transport_name_is_an_error_at_build() {
        let err = Selector::builder()
            .prefer(Location::SameProcess, ["memroy"])
            .build()
            .err()
            .expect("an unknown name fails the build");
        assert!(
            matches!(&err, Error::Config(m) if m.contains("memroy")),
            "{err}"
        );
        let err = Selector::builder()
            .force_transports("x", ["nope"])
            .build()
            .err()
            .expect("an unknown name fails the build");
        assert!(matches!(err, Error::Config(_)));
    }
}
