//! The machine registry: who exists, of which type, where, and whether it is healthy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::address::MachineId;
use crate::error::{Error, Result};

/// What the registry knows about one machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineEntry {
    /// Unique id; an empty id asks the registry to generate `{type}-{n}-{8 hex}`.
    pub id: MachineId,
    /// Service type, e.g. `"PingService"`.
    pub machine_type: Arc<str>,
    /// Stable per host (overridable).
    pub host_id: Arc<str>,
    /// Unique per process start (not just the pid).
    pub process_id: Arc<str>,
    /// Single-threaded context the machine is pinned to, if any.
    #[serde(default)]
    pub context: Option<u64>,
    /// Version of the service.
    #[serde(default)]
    pub version: Option<String>,
    /// Events the machine accepts (informational; empty means unspecified).
    #[serde(default)]
    pub accepts: Vec<String>,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// A change seen by [`Registry::watch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryEvent {
    /// A machine registered.
    Joined(MachineEntry),
    /// A machine deregistered.
    Left(MachineId),
    /// A machine's health changed (heartbeat seen again, or TTL expired).
    HealthChanged {
        /// The machine.
        id: MachineId,
        /// Its new health.
        healthy: bool,
    },
    /// Events may have been missed (a shared registry reconnected): anything cached
    /// from the registry should be read again.
    Resync,
}

/// Told of every registry change; returns `false` once it no longer wants to hear (its
/// session is gone), and is then dropped.
pub type ChangeHook = Arc<dyn Fn(&RegistryEvent) -> bool + Send + Sync>;

/// Where machines are registered and discovered; in-process ([`LocalRegistry`]) or shared.
#[async_trait]
pub trait Registry: Send + Sync {
    /// Registers a machine; an empty id is generated; a taken id is [`Error::DuplicateId`].
    async fn register(&self, entry: MachineEntry) -> Result<MachineEntry>;
    /// Removes a machine; unknown ids are [`Error::UnknownTarget`].
    async fn deregister(&self, id: &MachineId) -> Result<()>;
    /// Looks up one machine.
    async fn get(&self, id: &MachineId) -> Result<Option<MachineEntry>>;
    /// Every machine of a type, in registration order.
    async fn discover(&self, machine_type: &str) -> Result<Vec<MachineEntry>>;
    /// Every machine whose type matches a glob (`*`, `?`; anchored, case-insensitive).
    async fn discover_pattern(&self, pattern: &str) -> Result<Vec<MachineEntry>>;
    /// Every registered type, sorted.
    async fn types(&self) -> Result<Vec<String>>;
    /// Records a heartbeat.
    async fn heartbeat(&self, id: &MachineId) -> Result<()>;
    /// Whether the last heartbeat is within the TTL.
    async fn is_healthy(&self, id: &MachineId) -> Result<bool>;
    /// A stream of joins, leaves and health changes.
    fn watch(&self) -> broadcast::Receiver<RegistryEvent>;
    /// Increases on every join or leave; route caches compare it to stay fresh without lookups.
    fn generation(&self) -> u64;
    /// Calls `hook` with every change, as [`Registry::watch`] would report it.
    ///
    /// Sessions mark their cached routes stale from here. A registry that can should call
    /// the hook where it learns of the change, before any later answer of its shows the
    /// change (so a caller that saw a machine gone also finds its routes stale); the
    /// default relays [`Registry::watch`] from a task, a little later.
    fn on_change(&self, hook: ChangeHook) {
        let mut events = self.watch();
        tokio::spawn(async move {
            loop {
                let ev = match events.recv().await {
                    Ok(ev) => ev,
                    Err(broadcast::error::RecvError::Lagged(_)) => RegistryEvent::Resync,
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if !hook(&ev) {
                    break;
                }
            }
        });
    }
}

/// The hooks of a registry that calls them itself (see [`Registry::on_change`]).
#[derive(Default)]
pub struct ChangeHooks(Mutex<Vec<ChangeHook>>);

impl ChangeHooks {
    /// Adds a hook.
    pub fn add(&self, hook: ChangeHook) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(hook);
    }
    /// Tells every hook, dropping those that no longer listen.
    pub fn call(&self, ev: &RegistryEvent) {
        let hooks: Vec<ChangeHook> = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if hooks.is_empty() {
            return;
        }
        let gone: Vec<ChangeHook> = hooks.into_iter().filter(|h| !h(ev)).collect();
        if !gone.is_empty() {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|h| !gone.iter().any(|g| Arc::ptr_eq(g, h)));
        }
    }
}

/// Matches a discovery glob: `*` any run, `?` one character, anchored, case-insensitive, all else literal.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    wildmatch::WildMatchPattern::<'*', '?'>::new_case_insensitive(pattern).matches(text)
}

struct Record {
    entry: MachineEntry,
    seq: u64,
    last_heartbeat: Instant,
    healthy: bool,
}

struct State {
    records: HashMap<MachineId, Record>,
    per_type: HashMap<Arc<str>, u64>,
    seq: u64,
    rng: fastrand::Rng,
}

/// The in-process registry of one session.
pub struct LocalRegistry {
    state: Mutex<State>,
    events: broadcast::Sender<RegistryEvent>,
    hooks: ChangeHooks,
    ttl: Duration,
    generation: AtomicU64,
}

impl LocalRegistry {
    /// A registry whose machines stay healthy for `ttl` after each heartbeat.
    pub fn new(ttl: Duration) -> LocalRegistry {
        LocalRegistry {
            state: Mutex::new(State {
                records: HashMap::new(),
                per_type: HashMap::new(),
                seq: 0,
                rng: fastrand::Rng::new(),
            }),
            events: broadcast::channel(1024).0,
            hooks: ChangeHooks::default(),
            ttl,
            generation: AtomicU64::new(0),
        }
    }

    /// The heartbeat TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves only plain maps behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks machines whose heartbeat is older than the TTL unhealthy and reports it on the watch stream.
    pub fn sweep(&self) {
        let now = Instant::now();
        // Events are sent under the lock (a broadcast send never waits), so a heartbeat
        // racing this sweep cannot report "healthy" before the sweep's "unhealthy".
        let mut st = self.lock();
        for r in st.records.values_mut() {
            let healthy = now.duration_since(r.last_heartbeat) <= self.ttl;
            if healthy != r.healthy {
                r.healthy = healthy;
                let _ = self.events.send(RegistryEvent::HealthChanged {
                    id: r.entry.id.clone(),
                    healthy,
                });
            }
        }
    }

    /// Runs [`LocalRegistry::sweep`] every `interval` until the registry is dropped or the task aborted.
    pub fn spawn_sweeper(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(reg) => reg.sweep(),
                    None => break,
                }
            }
        })
    }

    fn sorted(mut v: Vec<(u64, MachineEntry)>) -> Vec<MachineEntry> {
        v.sort_by_key(|(seq, _)| *seq);
        v.into_iter().map(|(_, e)| e).collect()
    }
}

fn check_name(name: &str, what: &'static str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(Error::InvalidName {
            name: name.to_string(),
            reason: what,
        });
    }
    Ok(())
}

#[async_trait]
impl Registry for LocalRegistry {
    async fn register(&self, mut entry: MachineEntry) -> Result<MachineEntry> {
        check_name(&entry.machine_type, "a machine type must not be empty")?;
        {
            let mut st = self.lock();
            let n = {
                let c = st.per_type.entry(entry.machine_type.clone()).or_insert(0);
                *c += 1;
                *c
            };
            if entry.id.as_str().is_empty() {
                loop {
                    let id = MachineId::from(format!(
                        "{}-{}-{:08x}",
                        entry.machine_type,
                        n,
                        st.rng.u32(..)
                    ));
                    if !st.records.contains_key(&id) {
                        entry.id = id;
                        break;
                    }
                }
            } else if st.records.contains_key(&entry.id) {
                return Err(Error::DuplicateId(entry.id));
            }
            st.seq += 1;
            let seq = st.seq;
            st.records.insert(
                entry.id.clone(),
                Record {
                    entry: entry.clone(),
                    seq,
                    last_heartbeat: Instant::now(),
                    healthy: true,
                },
            );
            // Hooks (route invalidation) first, then watchers, all under the lock so
            // that a concurrent deregister cannot be seen before this join.
            self.generation.fetch_add(1, Ordering::SeqCst);
            let ev = RegistryEvent::Joined(entry.clone());
            self.hooks.call(&ev);
            let _ = self.events.send(ev);
        }
        Ok(entry)
    }

    async fn deregister(&self, id: &MachineId) -> Result<()> {
        let ev = RegistryEvent::Left(id.clone());
        {
            let mut st = self.lock();
            if st.records.remove(id).is_none() {
                return Err(Error::UnknownTarget(id.clone()));
            }
            self.generation.fetch_add(1, Ordering::SeqCst);
            self.hooks.call(&ev);
            let _ = self.events.send(ev);
        }
        Ok(())
    }

    async fn get(&self, id: &MachineId) -> Result<Option<MachineEntry>> {
        Ok(self.lock().records.get(id).map(|r| r.entry.clone()))
    }

    async fn discover(&self, machine_type: &str) -> Result<Vec<MachineEntry>> {
        let st = self.lock();
        Ok(Self::sorted(
            st.records
                .values()
                .filter(|r| &*r.entry.machine_type == machine_type)
                .map(|r| (r.seq, r.entry.clone()))
                .collect(),
        ))
    }

    async fn discover_pattern(&self, pattern: &str) -> Result<Vec<MachineEntry>> {
        if pattern.is_empty() {
            return Err(Error::InvalidPattern {
                pattern: String::new(),
                reason: "a discovery pattern must not be empty (use `*` for every type)",
            });
        }
        let pat = wildmatch::WildMatchPattern::<'*', '?'>::new_case_insensitive(pattern);
        let st = self.lock();
        Ok(Self::sorted(
            st.records
                .values()
                .filter(|r| pat.matches(&r.entry.machine_type))
                .map(|r| (r.seq, r.entry.clone()))
                .collect(),
        ))
    }

    async fn types(&self) -> Result<Vec<String>> {
        let st = self.lock();
        let set: BTreeSet<String> = st
            .records
            .values()
            .map(|r| r.entry.machine_type.to_string())
            .collect();
        Ok(set.into_iter().collect())
    }

    async fn heartbeat(&self, id: &MachineId) -> Result<()> {
        let mut st = self.lock();
        let r = st
            .records
            .get_mut(id)
            .ok_or_else(|| Error::UnknownTarget(id.clone()))?;
        r.last_heartbeat = Instant::now();
        if !std::mem::replace(&mut r.healthy, true) {
            let _ = self.events.send(RegistryEvent::HealthChanged {
                id: id.clone(),
                healthy: true,
            });
        }
        Ok(())
    }

    async fn is_healthy(&self, id: &MachineId) -> Result<bool> {
        let st = self.lock();
        let r = st
            .records
            .get(id)
            .ok_or_else(|| Error::UnknownTarget(id.clone()))?;
        Ok(Instant::now().duration_since(r.last_heartbeat) <= self.ttl)
    }

    fn watch(&self) -> broadcast::Receiver<RegistryEvent> {
        self.events.subscribe()
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn on_change(&self, hook: ChangeHook) {
        self.hooks.add(hook);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_is_anchored_case_insensitive_and_literal() {
        assert!(glob_matches("Service_*", "Service_1"));
        assert!(glob_matches("service_*", "SERVICE_Alpha"));
        assert!(!glob_matches("Service_*", "MyService_1"));
        assert!(glob_matches("*_Alpha_*", "Svc_Alpha_2"));
        assert!(!glob_matches("*_Alpha_*", "Svc_Alpha"));
        assert!(glob_matches("a.b", "a.b"));
        assert!(!glob_matches("a.b", "axb"));
        assert!(glob_matches("a?c", "abc"));
        assert!(!glob_matches("a?c", "ac"));
        assert!(glob_matches("a[1]", "a[1]"));
        assert!(!glob_matches("a[1]", "a1"));
        assert!(glob_matches("a+b", "a+b"));
    }
}
