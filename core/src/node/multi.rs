//! Sends to machines picked by type or by link: any one of a type (load balanced),
//! every one of a type, every linked machine.
//!
//! One rule for every multi-target send: each target is tried, a failure does not stop
//! the others, and the result is the count when all succeeded or
//! [`Error::Partial`] naming each target that failed.

use std::sync::Arc;

use serde::Serialize;

use crate::address::{Address, MachineId};
use crate::batch::OneEvent;
use crate::error::{Error, Result};
use crate::name::Name;
use crate::node::Node;
use crate::node::sender::fresh_headers;
use crate::payload::Payload;
use crate::session::lock;

/// How `send_to_any_of_type` picks an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Balance {
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// A random instance each time.
    Random,
}

/// The other machines of one type, for the registry generation they were read in.
pub(crate) struct TypeCache {
    generation: u64,
    name: Arc<str>,
    peers: Arc<[MachineId]>,
    next: usize,
}

impl Node {
    /// The other machines of a type, cached until the registry changes.
    async fn peers_of_type(&self, machine_type: &str) -> Result<(Arc<str>, Arc<[MachineId]>)> {
        let s = &self.0.session;
        let generation = s.registry.generation();
        if let Some(c) = lock(&self.0.types).get(machine_type)
            && c.generation == generation
        {
            return Ok((c.name.clone(), c.peers.clone()));
        }
        let peers: Arc<[MachineId]> = s
            .registry
            .discover(machine_type)
            .await?
            .into_iter()
            .map(|e| e.id)
            .filter(|id| id != self.id())
            .collect();
        let name: Arc<str> = machine_type.into();
        let mut types = lock(&self.0.types);
        let next = types.get(machine_type).map_or(0, |c| c.next);
        types.insert(
            name.clone(),
            TypeCache {
                generation,
                name: name.clone(),
                peers: peers.clone(),
                next,
            },
        );
        Ok((name, peers))
    }

    /// The next instance of a type for `send_to_any_of_type`.
    async fn pick_of_type(&self, machine_type: &str) -> Result<(Arc<str>, MachineId)> {
        let generation = self.0.session.registry.generation();
        if self.0.balance == Balance::RoundRobin
            && let Some(c) = lock(&self.0.types).get_mut(machine_type)
            && c.generation == generation
            && !c.peers.is_empty()
        {
            let i = c.next % c.peers.len();
            c.next = c.next.wrapping_add(1);
            return Ok((c.name.clone(), c.peers[i].clone()));
        }
        let (name, peers) = self.peers_of_type(machine_type).await?;
        if peers.is_empty() {
            return Err(Error::NoMachineOfType(name));
        }
        let i = match self.0.balance {
            Balance::Random => lock(&self.0.rng).usize(..peers.len()),
            Balance::RoundRobin => match lock(&self.0.types).get_mut(machine_type) {
                Some(c) => {
                    let i = c.next % peers.len();
                    c.next = c.next.wrapping_add(1);
                    i
                }
                None => 0,
            },
        };
        Ok((name, peers[i].clone()))
    }

    /// Sends to exactly one other machine of a type (round-robin, or random); returns its id.
    ///
    /// A picked instance that turns out to be gone is skipped for the next one, so the
    /// event reaches a live instance while there is one.
    pub async fn send_to_any_of_type<P: Serialize + Send + Sync + 'static>(
        &self,
        machine_type: &str,
        event: impl Into<Name>,
        payload: P,
    ) -> Result<MachineId> {
        self.check_open()?;
        let (name, first) = self.pick_of_type(machine_type).await?;
        let target = Address::AnyOfType(name);
        let id = self.0.session.next_id();
        let mut one = OneEvent::new(
            id,
            self.id(),
            &target,
            event.into(),
            payload,
            fresh_headers(),
        );
        let mut to = first;
        let mut last = None;
        for _ in 0..8 {
            let r = match self.check_link(&to) {
                Ok(()) => match self.route_to(&to).await {
                    Ok(route) => self.send_along(&to, route, &mut one).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => return Ok(to),
                Err(e @ (Error::TargetGone(_) | Error::UnknownTarget(_))) => {
                    lock(&self.0.types).remove(machine_type);
                    last = Some(e);
                    match self.pick_of_type(machine_type).await {
                        Ok((_, next)) => to = next,
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(Error::NoMachineOfType(machine_type.into())))
    }

    /// Sends one event to each of `ids`, each envelope addressed to `address` (or to
    /// its machine), trying every one.
    async fn send_each(
        &self,
        ids: &[MachineId],
        address: Option<&Address>,
        event: Name,
        payload: Payload,
    ) -> Result<usize> {
        let mut failed = Vec::new();
        let mut n = 0;
        for id in ids {
            let r = self
                .send_addressed(id, address, event.clone(), payload.clone(), fresh_headers())
                .await;
            match r {
                Ok(()) => n += 1,
                Err(e) => failed.push((id.clone(), e)),
            }
        }
        if failed.is_empty() {
            Ok(n)
        } else {
            Err(Error::Partial {
                delivered: n,
                failed,
            })
        }
    }

    /// Sends to every other machine of a type; returns how many got it, or
    /// [`Error::Partial`] naming those that did not (the others still got it).
    pub async fn send_to_all_of_type<P: Serialize + Send + Sync + 'static>(
        &self,
        machine_type: &str,
        event: impl Into<Name>,
        payload: P,
    ) -> Result<usize> {
        self.check_open()?;
        let (name, peers) = self.peers_of_type(machine_type).await?;
        let address = Address::AllOfType(name);
        self.send_each(&peers, Some(&address), event.into(), Payload::new(payload))
            .await
    }

    /// Sends to every other machine of this machine's type; see [`Node::send_to_all_of_type`].
    pub async fn broadcast_to_same_type<P: Serialize + Send + Sync + 'static>(
        &self,
        event: impl Into<Name>,
        payload: P,
    ) -> Result<usize> {
        let t = self.0.entry.machine_type.clone();
        self.send_to_all_of_type(&t, event, payload).await
    }

    /// Sends to every machine linked to this one; returns how many got it, or
    /// [`Error::Partial`] naming those that did not (the others still got it).
    pub async fn broadcast<P: Serialize + Send + Sync + 'static>(
        &self,
        event: impl Into<Name>,
        payload: P,
    ) -> Result<usize> {
        self.check_open()?;
        let peers = self.0.session.linked_peers(self.id());
        self.send_each(&peers, None, event.into(), Payload::new(payload))
            .await
    }
}
