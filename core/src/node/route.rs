//! Routes: a target resolved once into its location and the links to try, cached until
//! the target leaves or a link closes; and the send paths along them.
//!
//! A route is resolved from the registry entry of the target ([`crate::Router::route`]
//! picks the transports, [`crate::Transport::link`] resolves the first one). The
//! session's registry watcher marks it stale when the target leaves or joins again;
//! a link that closes (its target unbound, its connection lost) makes it stale too.
//! A stale route is resolved again on the next send, so a send never goes to a place
//! the target has left, and a send to a machine that is gone is an error.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use futures_util::FutureExt;

use crate::address::{Address, MachineId};
use crate::batch::{OneEvent, Outgoing};
use crate::error::{Error, Result};
use crate::location::Location;
use crate::node::Node;
use crate::registry::MachineEntry;
use crate::session::{RoutePlan, lock};
use crate::transport::{Link, Transport};

/// Most routes one machine keeps cached.
const MAX_CACHED: usize = 4096;

struct Hop {
    transport: Arc<dyn Transport>,
    /// `Some(None)`: the transport could not resolve the target when the route was made.
    link: OnceLock<Option<Arc<dyn Link>>>,
}

/// A resolved way to one machine: where it is and which links to try, first to last.
pub struct Route {
    location: Location,
    target: Address,
    entry: MachineEntry,
    hops: Box<[Hop]>,
    stale: Arc<AtomicBool>,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.hops.iter().map(|h| h.transport.name()).collect();
        f.debug_struct("Route")
            .field("target", &self.entry.id)
            .field("location", &self.location)
            .field("transports", &names)
            .finish()
    }
}

/// What is left of a send after its part that must not wait.
pub(crate) enum Later {
    /// Nothing: it was taken.
    Done,
    /// The link could only take it by waiting: the rest, from this hop of this route on.
    Wait(Arc<Route>, usize, Option<crate::Envelope>),
    /// No usable route (not cached, or its target gone): resolve, then send the rest.
    Resolve(Option<crate::Envelope>),
}

/// What a send that must not wait did.
pub(crate) enum Tried {
    /// Everything was taken.
    Done,
    /// The rest must go the async way, from this hop on.
    Pending(usize),
    /// A failure no other transport of the route can mend.
    Failed(Error),
}

impl Route {
    fn new(plan: RoutePlan, entry: MachineEntry, stale: Arc<AtomicBool>) -> Route {
        Route {
            location: plan.location,
            target: Address::Machine(entry.id.clone()),
            hops: plan
                .transports
                .iter()
                .map(|t| Hop {
                    transport: t.clone(),
                    link: OnceLock::new(),
                })
                .collect(),
            entry,
            stale,
        }
    }

    /// The target's location as seen from the sender.
    pub fn location(&self) -> Location {
        self.location
    }

    /// The target's registry entry when the route was resolved.
    pub fn entry(&self) -> &MachineEntry {
        &self.entry
    }

    /// Names of the transports the route tries, in order.
    pub fn transports(&self) -> Vec<&'static str> {
        self.hops.iter().map(|h| h.transport.name()).collect()
    }

    /// Whether the registry said the target left or joined again since the route was made.
    #[inline]
    pub(crate) fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    /// Whether the route may still be used: the target has not left or rejoined, and the
    /// link in use is open.
    pub(crate) fn is_valid(&self) -> bool {
        if self.stale.load(Ordering::Acquire) {
            return false;
        }
        for h in self.hops.iter() {
            match h.link.get() {
                Some(Some(l)) => return l.is_open(),
                Some(None) => continue,
                None => return true,
            }
        }
        true
    }

    /// Resolves the first transport that can link to the target.
    async fn resolve_first(&self) -> Result<()> {
        let mut last = None;
        for h in self.hops.iter() {
            match h.transport.link(&self.entry).await {
                Ok(l) => {
                    let _ = h.link.set(Some(l));
                    return Ok(());
                }
                Err(e) if e.is_retryable() => {
                    tracing::debug!(transport = h.transport.name(), target = %self.entry.id, error = %e, "transport cannot link; trying the next");
                    let _ = h.link.set(None);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(Error::NoTransport {
            target: self.entry.id.clone(),
            location: self.location,
        }))
    }

    fn no_transport(&self) -> Error {
        Error::NoTransport {
            target: self.entry.id.clone(),
            location: self.location,
        }
    }

    /// Hands `out` to the first link that takes it without waiting.
    pub(crate) fn try_send(&self, out: &mut dyn Outgoing) -> Tried {
        let n = self.hops.len();
        for (i, h) in self.hops.iter().enumerate() {
            let link = match h.link.get() {
                Some(Some(l)) => l,
                Some(None) => continue,
                None => return Tried::Pending(i),
            };
            match link.try_send(out) {
                Ok(()) if out.is_empty() => return Tried::Done,
                Ok(()) => return Tried::Pending(i),
                Err(e) if e.is_retryable() && i + 1 < n => {
                    tracing::debug!(transport = h.transport.name(), error = %e, "falling back to the next transport");
                }
                Err(e) => return Tried::Failed(e),
            }
        }
        Tried::Failed(self.no_transport())
    }

    /// Sends `out` from hop `start` on, waiting where the links wait, falling back on
    /// retryable failures.
    pub(crate) async fn send_from(&self, start: usize, out: &mut dyn Outgoing) -> Result<()> {
        let n = self.hops.len();
        let mut last = None;
        for i in start..n {
            let h = &self.hops[i];
            let link = match h.link.get() {
                Some(Some(l)) => l.clone(),
                Some(None) => continue,
                None => match h.transport.link(&self.entry).await {
                    Ok(l) => {
                        let _ = h.link.set(Some(l.clone()));
                        l
                    }
                    Err(e) if e.is_retryable() && i + 1 < n => {
                        let _ = h.link.set(None);
                        last = Some(e);
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            match link.send(out).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() && i + 1 < n => {
                    tracing::debug!(transport = h.transport.name(), error = %e, "falling back to the next transport");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| self.no_transport()))
    }
}

/// A machine's cached routes to the targets it sent to.
#[derive(Default)]
pub(crate) struct RouteCache {
    map: rustc_hash::FxHashMap<MachineId, Arc<Route>>,
    /// The last route looked up: a stream of sends to one machine skips the hashing.
    last: Option<Arc<Route>>,
}

impl RouteCache {
    pub(crate) fn clear(&mut self) {
        self.map.clear();
        self.last = None;
    }

    fn get(&mut self, to: &MachineId) -> Option<Arc<Route>> {
        if let Some(r) = &self.last
            && &r.entry.id == to
        {
            if r.is_valid() {
                return Some(r.clone());
            }
            self.last = None;
        }
        let r = self.map.get(to)?;
        if !r.is_valid() {
            self.map.remove(to);
            return None;
        }
        let r = r.clone();
        self.last = Some(r.clone());
        Some(r)
    }

    fn insert(&mut self, route: Arc<Route>) {
        if self.map.len() >= MAX_CACHED {
            // Stale entries go first; if all are live, start over (the next sends re-resolve).
            self.map.retain(|_, r| r.is_valid());
            if self.map.len() >= MAX_CACHED {
                self.map.clear();
            }
        }
        self.map.insert(route.entry.id.clone(), route.clone());
        self.last = Some(route);
    }

    pub(crate) fn remove(&mut self, to: &MachineId) {
        self.map.remove(to);
        if self.last.as_ref().is_some_and(|r| &r.entry.id == to) {
            self.last = None;
        }
    }
}

impl Node {
    /// A valid cached route to `to`, if there is one.
    pub(crate) fn cached_route(&self, to: &MachineId) -> Option<Arc<Route>> {
        lock(&self.0.routes).get(to)
    }

    /// Resolves `to` afresh (registry, router, first link) and caches the route.
    pub(crate) async fn resolve(&self, to: &MachineId) -> Result<Arc<Route>> {
        let s = &self.0.session;
        // Watched before the registry is read, so a change after the read marks it stale.
        let stale = s.watch_route(to);
        let entry = s
            .registry
            .get(to)
            .await?
            .ok_or_else(|| Error::UnknownTarget(to.clone()))?;
        let plan = s.router.route(&self.0.entry, &entry)?;
        let route = Route::new(plan, entry, stale);
        route.resolve_first().await?;
        let route = Arc::new(route);
        lock(&self.0.routes).insert(route.clone());
        Ok(route)
    }

    /// The route to a machine, cached until it leaves or its link closes.
    pub async fn route_to(&self, to: &MachineId) -> Result<Arc<Route>> {
        match self.cached_route(to) {
            Some(r) => Ok(r),
            None => self.resolve(to).await,
        }
    }

    /// Sends `out` along `route`; when the link finds the target gone, resolves it once
    /// more (it may have moved) and tries again.
    pub(crate) async fn send_along(
        &self,
        to: &MachineId,
        mut route: Arc<Route>,
        out: &mut dyn Outgoing,
    ) -> Result<()> {
        let mut retried = false;
        loop {
            let r = match route.try_send(out) {
                Tried::Done => return Ok(()),
                Tried::Failed(e) => Err(e),
                Tried::Pending(i) => route.send_from(i, out).await,
            };
            match r {
                Err(Error::TargetGone(_)) if !retried && !out.is_empty() => {
                    retried = true;
                    lock(&self.0.routes).remove(to);
                    route = self.resolve(to).await?;
                }
                r => return r,
            }
        }
    }

    /// The part of a send to `to` that must not wait, along its cached route if there is
    /// one. What is left goes the async way ([`Node::send_rest`]) or to a task
    /// ([`Node::finish_post`]).
    #[inline]
    pub(crate) fn send_now<P: serde::Serialize + Send + Sync + 'static>(
        &self,
        to: &MachineId,
        route: Option<&Arc<Route>>,
        address: Option<&Address>,
        event: crate::name::Name,
        payload: P,
        headers: crate::envelope::Headers,
    ) -> Result<Later> {
        let id = self.0.session.next_id();
        let Some(route) = route else {
            let target = address
                .cloned()
                .unwrap_or_else(|| Address::Machine(to.clone()));
            let mut one = OneEvent::new(id, self.id(), &target, event, payload, headers);
            return Ok(Later::Resolve(one.pop()));
        };
        let target = address.unwrap_or(&route.target);
        let mut one = OneEvent::new(id, self.id(), target, event, payload, headers);
        match route.try_send(&mut one) {
            Tried::Done => Ok(Later::Done),
            Tried::Pending(hop) => Ok(Later::Wait(route.clone(), hop, one.pop())),
            Tried::Failed(Error::TargetGone(_)) => Ok(Later::Resolve(one.pop())),
            Tried::Failed(e) => Err(e),
        }
    }

    /// Finishes a send the async way.
    pub(crate) async fn send_rest(&self, to: &MachineId, later: Later) -> Result<()> {
        match later {
            Later::Done => Ok(()),
            Later::Wait(route, hop, mut rest) => match route.send_from(hop, &mut rest).await {
                Err(Error::TargetGone(_)) if rest.is_some() => {
                    lock(&self.0.routes).remove(to);
                    let route = self.resolve(to).await?;
                    self.send_along(to, route, &mut rest).await
                }
                r => r,
            },
            Later::Resolve(mut rest) => {
                lock(&self.0.routes).remove(to);
                let route = self.resolve(to).await?;
                self.send_along(to, route, &mut rest).await
            }
        }
    }

    /// A post's fallback: finishes the send on a task, or right here if the route can be
    /// resolved without waiting (an in-process registry), so an unknown target is the
    /// caller's error, not a log line.
    pub(crate) fn finish_post(&self, to: MachineId, later: Later) -> Result<()> {
        let later = match later {
            Later::Done => return Ok(()),
            Later::Resolve(mut rest) => {
                let fut = async {
                    lock(&self.0.routes).remove(&to);
                    let route = self.resolve(&to).await?;
                    self.send_along(&to, route, &mut rest).await
                };
                let done = {
                    let mut fut = std::pin::pin!(fut);
                    (&mut fut).now_or_never()
                };
                match done {
                    // Finished here: sent, or failed in a way waiting would not mend.
                    Some(r) => return r,
                    // Taken by a link that finishes the write itself (an encoding transport).
                    None if rest.is_none() => return Ok(()),
                    None => Later::Resolve(rest),
                }
            }
            wait => wait,
        };
        let node = self.clone();
        let rt = self.0.session.runtime.clone();
        rt.spawn(async move {
            if let Err(e) = node.send_rest(&to, later).await {
                node.report_failure("posted send", &to, &e);
            }
        });
        Ok(())
    }
}
