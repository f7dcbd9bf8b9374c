//! Peer processes: the table of them, connections to their ROUTERs, and telling them
//! about this process and its subscriptions.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use switchyard_core::{Error, Location, MachineEntry, MachineId, Result, TopicPattern};
use tokio::sync::{oneshot, watch};

use crate::codec::{self, Hello, Nack, SubInfo, Subs, kind};
use crate::conn::{Conn, Dead};
use crate::topics::{MarkerWait, SubCmd};
use crate::{NAME, PUB_KEY, ROUTER_KEY, Shared, lock};

/// A peer process as this one knows it.
pub(crate) struct Peer {
    pub(crate) host: Arc<str>,
    pub(crate) router: String,
    pub(crate) pub_ep: String,
    pub(crate) version: u64,
    pub(crate) subs: Vec<RemoteSub>,
    pub(crate) machines: HashSet<MachineId>,
    /// True once the introduction is over (the peer answered `HELLO`, or gave up): from
    /// then on it knows this process and its subscriptions reach this PUB.
    pub(crate) ready: watch::Receiver<bool>,
}

pub(crate) struct RemoteSub {
    pub(crate) sub: u64,
    pub(crate) pattern: Option<TopicPattern>,
    pub(crate) group: Option<Arc<str>>,
}

impl RemoteSub {
    pub(crate) fn of(s: &SubInfo) -> Option<RemoteSub> {
        let pattern = match &s.pattern {
            Some(p) => Some(TopicPattern::parse(p).ok()?),
            None => None,
        };
        Some(RemoteSub {
            sub: s.sub,
            pattern,
            group: s.group.as_deref().map(Arc::from),
        })
    }
}

/// Where a subscriber is relative to a publisher.
pub(crate) fn location_of(
    host: &str,
    process: &str,
    context: Option<u64>,
    e: &MachineEntry,
) -> Location {
    if *e.host_id != *host {
        Location::Remote
    } else if *e.process_id != *process {
        Location::SameMachine
    } else if context.is_some() && context == e.context {
        Location::SameThread
    } else {
        Location::SameProcess
    }
}

pub(crate) fn peer_location(me: &(Arc<str>, Arc<str>), host: &str, process: &str) -> Location {
    if *me.0 != *host {
        Location::Remote
    } else if *me.1 != *process {
        Location::SameMachine
    } else {
        Location::SameProcess
    }
}

pub(crate) fn loc_byte(l: Location) -> u8 {
    l as u8
}

pub(crate) fn byte_loc(b: u8) -> Location {
    Location::ALL[usize::from(b.min(3))]
}

impl Shared {
    /// The connection to a peer's ROUTER, made on first use and again after it died.
    pub(crate) async fn conn(
        self: &Arc<Self>,
        endpoint: &str,
    ) -> std::result::Result<Arc<Conn>, Dead> {
        if self.is_closed() {
            return Err(Dead("the transport is closed".into()));
        }
        let slot = lock(&self.conns)
            .entry(endpoint.to_string())
            .or_default()
            .clone();
        let mut g = slot.lock().await;
        if let Some(c) = g.as_ref() {
            if !c.is_dead() {
                return Ok(c.clone());
            }
            // Just failed: say so rather than queue more for a peer that is not there; try
            // again once `connect_timeout` has passed.
            if c.died_within(self.cfg.connect_timeout) {
                return Err(c.why());
            }
        }
        let weak = Arc::downgrade(self);
        let on_nack: Arc<dyn Fn(&Nack) + Send + Sync> = Arc::new(move |n: &Nack| {
            if let Some(s) = weak.upgrade() {
                s.dropped.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(to = %n.to, id = n.id, code = %n.code, "zeromq peer refused an event: {}", n.message);
        });
        let c = Conn::start(
            endpoint,
            self.cfg.window as u64,
            self.cfg.peer_timeout,
            self.cfg.connect_timeout,
            on_nack,
        );
        *g = Some(c.clone());
        Ok(c)
    }

    /// The conn if it is alive now, without connecting.
    pub(crate) fn conn_now(&self, endpoint: &str) -> Option<Arc<Conn>> {
        let slot = lock(&self.conns).get(endpoint)?.clone();
        let g = slot.try_lock().ok()?;
        g.as_ref().filter(|c| !c.is_dead()).cloned()
    }

    pub(crate) fn sub_infos(&self) -> (u64, Vec<SubInfo>) {
        let subs = lock(&self.subs);
        let v = subs
            .map
            .iter()
            .map(|(id, s)| SubInfo {
                sub: *id,
                pattern: s.topic.as_ref().map(|t| t.as_str().to_string()),
                group: s.group.as_deref().map(str::to_string),
            })
            .collect();
        (subs.version, v)
    }

    pub(crate) async fn sub_command(
        &self,
        make: impl FnOnce(oneshot::Sender<()>) -> SubCmd,
    ) -> Result<()> {
        let tx = self.sub_cmd.get().ok_or(Error::Closed(NAME))?;
        let (done, rx) = oneshot::channel();
        tx.send(make(done)).map_err(|_| Error::Closed(NAME))?;
        rx.await.map_err(|_| Error::Closed(NAME))
    }

    pub(crate) async fn sub_connect(&self, endpoint: &str) -> std::result::Result<(), String> {
        let Some(tx) = self.sub_cmd.get() else {
            return Err("closed".into());
        };
        let (done, rx) = oneshot::channel();
        tx.send(SubCmd::Connect(endpoint.to_string(), done))
            .map_err(|_| "closed".to_string())?;
        rx.await.map_err(|_| "closed".to_string())?
    }

    /// Brings the peer table up to date when the registry changed since it last was, so a
    /// publish reaches every process whose machines were registered before it. One atomic
    /// load when nothing changed.
    pub(crate) async fn catch_up(self: &Arc<Self>) {
        let Some(reg) = self.registry.get() else {
            return;
        };
        if reg.generation() != self.seen_generation.load(Ordering::Acquire) {
            self.refresh_peers().await;
        }
    }

    /// Reads every machine of the registry and introduces this process to the unknown ones
    /// (waiting for introductions already under way).
    pub(crate) async fn refresh_peers(self: &Arc<Self>) {
        let Some(reg) = self.registry.get().cloned() else {
            return;
        };
        let generation = reg.generation();
        let entries = match reg.discover_pattern("*").await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "zeromq: cannot list the registry to find peers");
                return;
            }
        };
        let ids: Vec<(Arc<str>, MachineId)> = entries
            .iter()
            .map(|e| (e.process_id.clone(), e.id.clone()))
            .collect();
        let mut firsts: HashMap<Arc<str>, MachineEntry> = HashMap::new();
        for e in entries {
            firsts.entry(e.process_id.clone()).or_insert(e);
        }
        let intros = firsts.values().map(|e| self.introduce_entry(e));
        futures_util::future::join_all(intros).await;
        {
            // Every machine of each peer, so the peer is forgotten only when its last one leaves.
            let mut peers = self.peers_mut();
            for (process, id) in ids {
                if let Some(p) = peers.get_mut(&process) {
                    p.machines.insert(id);
                }
            }
        }
        self.seen_generation.store(generation, Ordering::Release);
    }

    pub(crate) fn peers_mut(&self) -> MutexGuard<'_, HashMap<Arc<str>, Peer>> {
        lock(&self.peers)
    }

    pub(crate) fn machine_left(&self, id: &MachineId) {
        let mut peers = self.peers_mut();
        let gone: Vec<Arc<str>> = peers
            .iter_mut()
            .filter_map(|(p, peer)| {
                (peer.machines.remove(id) && peer.machines.is_empty()).then(|| p.clone())
            })
            .collect();
        for p in gone {
            // A process without machines has no subscriptions; it introduces itself again
            // when a machine of it registers.
            peers.remove(&p);
        }
    }

    /// Learns of a peer process from one of its machines' entries; the first time, says
    /// `HELLO` (it then syncs its subscriptions to this process) and syncs this process's
    /// subscriptions to it.
    pub(crate) async fn introduce_entry(self: &Arc<Self>, e: &MachineEntry) {
        let Some(me) = self.me().cloned() else { return };
        if e.process_id == me.1 {
            return;
        }
        let (Some(router), Some(pub_ep)) = (e.metadata.get(ROUTER_KEY), e.metadata.get(PUB_KEY))
        else {
            return;
        };
        let (ready_tx, ready_rx) = watch::channel(false);
        let waiting = {
            let mut peers = self.peers_mut();
            match peers.get_mut(&e.process_id) {
                Some(p) => {
                    p.machines.insert(e.id.clone());
                    Some(p.ready.clone())
                }
                None => {
                    peers.insert(
                        e.process_id.clone(),
                        Peer {
                            host: e.host_id.clone(),
                            router: router.clone(),
                            pub_ep: pub_ep.clone(),
                            version: 0,
                            subs: Vec::new(),
                            machines: HashSet::from([e.id.clone()]),
                            ready: ready_rx,
                        },
                    );
                    None
                }
            }
        };
        if let Some(mut ready) = waiting {
            // Another task is introducing this peer: its introduction is ours too.
            let bound = self.cfg.connect_timeout + self.cfg.peer_timeout * 3;
            let _ = tokio::time::timeout(bound, ready.wait_for(|r| *r)).await;
            return;
        }
        let process = e.process_id.clone();
        let hello = async {
            let c = self.conn(router).await?;
            let (version, subs) = self.sub_infos();
            let body = codec::to_map(&Hello {
                protocol: codec::PROTOCOL,
                process: me.1.to_string(),
                host: me.0.to_string(),
                router: self.router_ep.clone(),
                pub_ep: self.pub_ep.clone(),
                version,
                subs,
            })
            .map_err(|e| Dead(e.to_string()))?;
            c.request(kind::HELLO, vec![body], self.cfg.peer_timeout)
                .await
        };
        let (said, ()) = tokio::join!(hello, self.sync_peers(vec![process.clone()], true));
        if let Err(d) = said {
            tracing::debug!(peer = %process, reason = %d.0, "zeromq: a peer did not answer HELLO");
            self.forget_peer(&process);
        }
        ready_tx.send_replace(true);
    }

    pub(crate) fn forget_peer(&self, process: &str) {
        self.peers_mut().remove(process);
    }

    /// A peer told this process who it is and what it subscribes (`HELLO` or `SUBS`).
    pub(crate) fn learn_peer(
        &self,
        process: &str,
        host: &str,
        endpoints: Option<(&str, &str)>,
        version: u64,
        subs: &[SubInfo],
    ) {
        let mut peers = self.peers_mut();
        let peer = match peers.get_mut(process) {
            Some(p) => p,
            None => {
                let Some((router, pub_ep)) = endpoints else {
                    return;
                };
                peers.entry(process.into()).or_insert(Peer {
                    host: host.into(),
                    router: router.to_string(),
                    pub_ep: pub_ep.to_string(),
                    version: 0,
                    subs: Vec::new(),
                    machines: HashSet::new(),
                    // It introduced itself: nothing to wait for.
                    ready: watch::channel(true).1,
                })
            }
        };
        if version >= peer.version {
            peer.version = version;
            peer.subs = subs.iter().filter_map(RemoteSub::of).collect();
        }
    }

    /// Makes sure each peer knows this process's subscriptions and, with `marker`, that each
    /// peer's PUB has every prefix this process subscribes (not needed when only a group
    /// membership or an unsubscribe changed).
    pub(crate) async fn sync_peers(self: &Arc<Self>, processes: Vec<Arc<str>>, marker: bool) {
        let targets: Vec<(Arc<str>, String, String)> = {
            let peers = self.peers_mut();
            processes
                .iter()
                .filter_map(|p| {
                    peers
                        .get(p)
                        .map(|peer| (p.clone(), peer.router.clone(), peer.pub_ep.clone()))
                })
                .collect()
        };
        if targets.is_empty() {
            return;
        }
        // Connected before the marker is subscribed: the prefixes then travel to each PUB
        // ahead of the marker on the same connection.
        let connects = targets.iter().map(|(p, _, pub_ep)| async move {
            if let Err(e) = self.sub_connect(pub_ep).await {
                tracing::debug!(peer = %p, error = %e, "zeromq: cannot subscribe to a peer's PUB");
            }
        });
        futures_util::future::join_all(connects).await;
        let (version, subs, has_topics) = {
            let (v, s) = self.sub_infos();
            let t = s.iter().any(|i| i.pattern.is_some());
            (v, s, t)
        };
        if subs.is_empty() && version == 0 {
            return;
        }
        let Some(me) = self.me().cloned() else { return };
        let marker = (marker && has_topics).then(|| format!("\0m{:016x}", fastrand::u64(..)));
        let arrived = Arc::new(tokio::sync::Notify::new());
        if let Some(m) = &marker {
            lock(&self.markers).insert(
                m.clone(),
                MarkerWait {
                    waiting: targets.iter().map(|t| t.0.clone()).collect(),
                    arrived: arrived.clone(),
                },
            );
            let mm = m.clone();
            let _ = self.sub_command(|d| SubCmd::Subscribe(mm, d)).await;
        }
        let one = |(process, router, _): (Arc<str>, String, String)| {
            let marker = marker.clone();
            let arrived = arrived.clone();
            let me = me.clone();
            let subs = subs.clone();
            async move {
                let c = match self.conn(&router).await {
                    Ok(c) => c,
                    Err(d) => {
                        tracing::debug!(peer = %process, reason = %d.0, "zeromq: cannot reach a peer to sync subscriptions");
                        return;
                    }
                };
                let body = match codec::to_map(&Subs {
                    process: me.1.to_string(),
                    host: me.0.to_string(),
                    router: self.router_ep.clone(),
                    pub_ep: self.pub_ep.clone(),
                    version,
                    subs,
                    marker: marker.clone(),
                }) {
                    Ok(b) => b,
                    Err(_) => return,
                };
                if let Err(d) = c
                    .request(kind::SUBS, vec![body], self.cfg.peer_timeout)
                    .await
                {
                    tracing::debug!(peer = %process, reason = %d.0, "zeromq: a peer did not take our subscriptions");
                    return;
                }
                let Some(m) = marker else { return };
                let deadline = tokio::time::Instant::now() + self.cfg.peer_timeout;
                loop {
                    let notified = arrived.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    let still = lock(&self.markers)
                        .get(&m)
                        .is_some_and(|w| w.waiting.contains(&process));
                    if !still {
                        return;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        tracing::warn!(peer = %process, "zeromq: a peer's PUB never echoed our subscription marker; its publishes may miss this process");
                        return;
                    }
                    if tokio::time::timeout(Duration::from_millis(50), notified)
                        .await
                        .is_err()
                    {
                        // Not through yet (the prefix travels on another connection than the
                        // request): ask for the marker again.
                        let _ = c
                            .request(
                                kind::MARK,
                                vec![Bytes::from(m.clone().into_bytes())],
                                self.cfg.peer_timeout,
                            )
                            .await;
                    }
                }
            }
        };
        futures_util::future::join_all(targets.into_iter().map(one)).await;
        if let Some(m) = marker {
            lock(&self.markers).remove(&m);
            let _ = self.sub_command(|d| SubCmd::Unsubscribe(m, d)).await;
        }
    }
}
