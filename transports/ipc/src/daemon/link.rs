//! One client connection's frames, routed: the route cache to target machines and the
//! handling of every frame kind a client sends (send, publish, registry calls, credits).

use super::*;

/// A cached route to a machine: its connection and what sends to it must agree with.
#[derive(Clone)]
pub(super) struct Route {
    /// The machine id (credited back to senders per target).
    pub(super) id: Arc<str>,
    pub(super) outbox: Arc<Outbox>,
    pub(super) machine_type: Arc<str>,
    pub(super) drop_oldest: bool,
    pub(super) max_frame: usize,
}

pub(super) struct RouteCache {
    pub(super) generation: u64,
    pub(super) by_id: FxHashMap<Box<str>, Route>,
    /// Sources checked against the registry: whether this connection registered them.
    pub(super) owned: FxHashMap<Box<str>, bool>,
}

impl RouteCache {
    /// Drops what the registry may have changed.
    pub(super) fn refresh(&mut self, shared: &Shared) {
        let generation = shared.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.by_id.clear();
            self.owned.clear();
            self.generation = generation;
        }
    }

    /// The route to machine `to`, cached until the registry changes.
    pub(super) fn route(&mut self, shared: &Shared, to: &str) -> Option<Route> {
        self.refresh(shared);
        if let Some(o) = self.by_id.get(to) {
            return Some(o.clone());
        }
        let st = lock(&shared.st);
        let r = st.machines.get(to).and_then(|m| {
            st.conns.get(&m.conn).map(|c| Route {
                id: Arc::from(m.entry.id.as_str()),
                outbox: c.outbox.clone(),
                machine_type: m.entry.machine_type.clone(),
                drop_oldest: m.when_full == WhenFull::DropOldest,
                max_frame: c.max_frame,
            })
        });
        drop(st);
        if let Some(r) = &r {
            if self.by_id.len() > 4096 {
                self.by_id.clear();
            }
            self.by_id.insert(to.into(), r.clone());
        }
        r
    }

    /// Whether connection `conn` registered machine `source`.
    pub(super) fn owns(&mut self, shared: &Shared, conn: u64, source: &str) -> bool {
        self.refresh(shared);
        if let Some(ok) = self.owned.get(source) {
            return *ok;
        }
        let ok = lock(&shared.st)
            .machines
            .get(source)
            .is_some_and(|m| m.conn == conn);
        if self.owned.len() > 4096 {
            self.owned.clear();
        }
        self.owned.insert(source.into(), ok);
        ok
    }
}

/// Why one event was refused: a `NACK` code and message.
pub(super) type Refusal = (&'static str, String);

/// One client connection as its reader task sees it.
pub(super) struct Link<'a> {
    pub(super) shared: &'a Shared,
    pub(super) conn: u64,
    pub(super) me: &'a Arc<Outbox>,
    /// Where this client's data frames are acknowledged, when it asked for `ACK`s.
    pub(super) sink: Option<Arc<AckSink>>,
    pub(super) cache: RouteCache,
    /// Checks runs of plain sends in place.
    pub(super) view: ViewReader,
    /// The last source a run was checked to own (empty: none).
    pub(super) last_source: Vec<u8>,
}

impl Link<'_> {
    pub(super) async fn read_loop(
        &mut self,
        stream: &Stream,
        rd: &mut FrameReader,
        mut stop: watch::Receiver<bool>,
        wd: &Watchdog,
    ) -> Result<(), IpcError> {
        loop {
            loop {
                // A run of plain sends to one machine is checked in place and forwarded as one piece.
                if let Some((to_at, len, n)) = rd.send_run()
                    && self.forward_run(rd.prefix(len), to_at, n)
                {
                    self.shared.routed.fetch_add(n, Ordering::Relaxed);
                    rd.skip(len);
                    continue;
                }
                // Anything else, and a run that did not pass whole (each frame is answered alone).
                let Some(f) = rd.next_frame()? else { break };
                let bytes = rd.bytes(&f);
                if f.refused {
                    self.refuse_over_budget(f.kind, bytes);
                } else {
                    self.handle_frame(f.kind, bytes)?;
                }
                rd.consume(&f);
            }
            // One ACK per batch of this client's frames when it published (send credits go
            // in their own steps, so a stream of sends does not wake its sender for each batch).
            if let Some(k) = &self.sink {
                k.flush_publishes();
            }
            self.shared
                .last_activity
                .store(now_micros(), Ordering::Relaxed);
            let partial = rd.partial_since().map_or(0, |t| self.shared.ms_at(t));
            wd.partial_since.store(partial, Ordering::Relaxed);
            tokio::select! {
                r = rd.fill(stream) => {
                    if !r? { return Ok(()) }
                    wd.last_read.store(self.shared.ms(), Ordering::Relaxed);
                }
                _ = stop.wait_for(|s| *s) => return Ok(()),
                _ = wd.kick.notified() => {
                    return Err(lock(&wd.why).take().unwrap_or_else(|| {
                        IpcError::SlowConsumer("disconnected by the daemon".into())
                    }));
                }
            }
        }
    }

    /// Settles one publish or group message of this client at once.
    pub(super) fn settle(&self) {
        if let Some(k) = &self.sink {
            k.credit(1);
        }
    }

    /// Gives the bytes of a refused send back to this client's window for `to`.
    pub(super) fn settle_send(&self, to: &str, bytes: usize) {
        if let Some(k) = &self.sink {
            k.credit_send(&Arc::from(to), bytes as u64);
        }
    }

    /// Forwards a run of `n` plain `SEND` frames to the machine named at `to_at`; `false` when
    /// any frame needs a closer look (or the run did not fit), and nothing was forwarded.
    pub(super) fn forward_run(
        &mut self,
        run: &[u8],
        to_at: std::ops::Range<usize>,
        n: u64,
    ) -> bool {
        let Ok(to) = std::str::from_utf8(&run[to_at]) else {
            return false;
        };
        let Some(route) = self.cache.route(self.shared, to) else {
            return false;
        };
        let mut at = 0;
        while at < run.len() {
            let total =
                4 + u32::from_be_bytes([run[at], run[at + 1], run[at + 2], run[at + 3]]) as usize;
            if total > route.max_frame {
                return false;
            }
            let body = &run[at + HEADER_LEN..at + total];
            let Some(v) = self.view.read(body) else {
                return false;
            };
            let source = v.source;
            // Frames from the last source checked cost one comparison, not a lookup. (Only this
            // connection's own requests, handled in order, can change what it owns.)
            if !crate::codec::same(&self.last_source, source.as_bytes()) {
                if !self.cache.owns(self.shared, self.conn, source) {
                    return false;
                }
                self.last_source.clear();
                self.last_source.extend_from_slice(source.as_bytes());
            }
            at += total;
        }
        let sink = self.sink.as_ref().map(|k| (k, &route.id));
        route.outbox.offer(run, n, sink, route.drop_oldest) == Offer::Queued
    }

    /// Answers a frame that was read past the memory budget and thrown away.
    pub(super) fn refuse_over_budget(&self, k: u8, head: &[u8]) {
        self.shared.over_budget.fetch_add(1, Ordering::Relaxed);
        let body = head.get(HEADER_LEN..).unwrap_or_default();
        let why = format!(
            "the bus daemon's memory budget ({} bytes) has no room for a frame of this size now: retry later or send less",
            self.shared.budget.limit()
        );
        match k {
            kind::SEND => {
                let mut b = Body::array(body, 2).ok();
                let to = b.as_mut().and_then(|b| b.str().ok()).unwrap_or_default();
                let id = b.map_or(0, |b| peek_envelope_id(b.rest()));
                self.nack(to, id, nack::OVER_BUDGET, why);
                let announced = head
                    .get(..4)
                    .map_or(0, |l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize);
                self.settle_send(to, announced + 4);
            }
            kind::PUBLISH | kind::GROUP => {
                let mut b = Body::array(body, 3).ok();
                let req = b.as_mut().and_then(|b| b.uint().ok()).unwrap_or(NO_REPLY);
                let to = b.as_mut().and_then(|b| b.str().ok()).unwrap_or_default();
                let id = b.map_or(0, |b| peek_envelope_id(b.rest()));
                self.refuse(req, to, id, (nack::OVER_BUDGET, why));
                self.settle();
            }
            _ => {
                let r = ReplyMsg {
                    req: peek_req(body),
                    ok: false,
                    code: Some(nack::OVER_BUDGET.into()),
                    message: Some(why),
                    ..ReplyMsg::default()
                };
                self.reply(&r);
            }
        }
    }

    pub(super) fn nack(&self, to: &str, id: u64, code: &'static str, message: String) {
        self.nack_from(to, id, None, code, message);
    }

    /// A `NACK` that names the envelope's source (so a sender can count per source and target).
    pub(super) fn nack_from(
        &self,
        to: &str,
        id: u64,
        source: Option<&str>,
        code: &'static str,
        message: String,
    ) {
        if let Ok(f) = frame::msg_frame(
            kind::NACK,
            &NackMsg {
                to: to.to_string(),
                id,
                code: code.into(),
                message,
                source: source.map(str::to_string),
            },
        ) {
            let _ = self.me.push_force(&f);
        }
    }

    pub(super) fn reply(&self, r: &ReplyMsg) {
        if r.req == NO_REPLY {
            return;
        }
        if let Ok(f) = frame::msg_frame(kind::REPLY, r) {
            // Control frames never wait: a client that stops reading only fills its own queue.
            let _ = self.me.push_force(&f);
        }
    }

    /// Refuses a `PUBLISH` or `GROUP`: a failed `REPLY`, or a `NACK` when no reply is wanted.
    pub(super) fn refuse(&self, req: u64, to: &str, id: u64, (code, message): Refusal) {
        if req == NO_REPLY {
            self.nack(to, id, code, message);
        } else {
            self.reply(&ReplyMsg {
                req,
                ok: false,
                code: Some(code.into()),
                message: Some(message),
                ..ReplyMsg::default()
            });
        }
    }

    /// Checks an envelope the daemon is asked to route: shape, source and target.
    pub(super) fn check<'b>(
        &mut self,
        env: &'b [u8],
        want: &[TargetKind],
        name_ok: impl FnOnce(TargetKind, &str) -> bool,
    ) -> Result<Checked<'b>, Refusal> {
        let c = check_envelope(env).map_err(|why| {
            (
                nack::MALFORMED,
                format!("the envelope does not follow docs/PROTOCOL.md §2: {why}"),
            )
        })?;
        if !want.contains(&c.kind) || !name_ok(c.kind, c.target) {
            return Err((
                nack::WRONG_TARGET,
                format!(
                    "the envelope's target ({:?} `{}`) disagrees with where the frame sends it",
                    c.kind, c.target
                ),
            ));
        }
        if !self.cache.owns(self.shared, self.conn, c.source) {
            return Err((
                nack::NOT_OWNER,
                format!(
                    "source `{}` is not a machine this connection registered: register it first, and send only as your own machines",
                    c.source
                ),
            ));
        }
        Ok(c)
    }

    pub(super) fn handle_frame(&mut self, k: u8, bytes: &[u8]) -> Result<(), IpcError> {
        let body = &bytes[HEADER_LEN..];
        match k {
            kind::SEND => {
                let mut b = Body::array(body, 2)?;
                let to = b.str()?;
                let env = b.rest();
                let route = self.cache.route(self.shared, to);
                let verdict = match &route {
                    None => Err((
                        nack::UNKNOWN_TARGET,
                        Error::UnknownTarget(to.into()).to_string(),
                    )),
                    Some(r) => self
                        .check(
                            env,
                            &[
                                TargetKind::Machine,
                                TargetKind::AnyOfType,
                                TargetKind::AllOfType,
                            ],
                            |kind, name| match kind {
                                TargetKind::Machine => name == to,
                                _ => name == &*r.machine_type,
                            },
                        )
                        .map(|c| (c.id, c.source)),
                };
                let (id, source) = match verdict {
                    Ok(c) => c,
                    Err((code, message)) => {
                        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                        let c = check_envelope(env).ok();
                        let id = c.map_or_else(|| peek_envelope_id(env), |c| c.id);
                        self.nack_from(to, id, c.map(|c| c.source), code, message);
                        self.settle_send(to, bytes.len());
                        return Ok(());
                    }
                };
                let Some(route) = route else { return Ok(()) };
                if bytes.len() > route.max_frame {
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                    self.nack_from(
                        to,
                        id,
                        Some(source),
                        nack::TOO_LARGE,
                        format!(
                            "a frame of {} bytes is over the {}-byte limit `{to}`'s process accepts: send less",
                            bytes.len(),
                            route.max_frame
                        ),
                    );
                    self.settle_send(to, bytes.len());
                    return Ok(());
                }
                let sink = self.sink.as_ref().map(|k| (k, &route.id));
                match route.outbox.offer(bytes, 1, sink, route.drop_oldest) {
                    Offer::Queued => {
                        self.shared.routed.fetch_add(1, Ordering::Relaxed);
                    }
                    Offer::Full => {
                        self.shared.nacked_full.fetch_add(1, Ordering::Relaxed);
                        self.nack_from(
                            to,
                            id,
                            Some(source),
                            nack::FULL,
                            format!(
                                "the queue of `{to}` in the bus daemon is full: its process is not reading fast enough; slow down or retry"
                            ),
                        );
                        self.settle_send(to, bytes.len());
                    }
                    Offer::Closed => {
                        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                        self.nack_from(
                            to,
                            id,
                            Some(source),
                            nack::UNKNOWN_TARGET,
                            Error::UnknownTarget(to.into()).to_string(),
                        );
                        self.settle_send(to, bytes.len());
                    }
                }
                Ok(())
            }
            kind::PUBLISH => {
                let mut b = Body::array(body, 3)?;
                let req = b.uint()?;
                let topic = b.str()?;
                let env = b.rest();
                let verdict = match switchyard_core::topic::validate_topic(topic) {
                    Err(e) => Err((nack::INVALID_TOPIC, e.to_string())),
                    Ok(()) => self
                        .check(env, &[TargetKind::Topic], |_, name| name == topic)
                        .map(|_| ()),
                };
                if let Err(why) = verdict {
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                    self.refuse(req, topic, peek_envelope_id(env), why);
                    self.settle();
                    return Ok(());
                }
                if let Some(count) = self.publish(topic, env, bytes.len(), req)? {
                    self.reply_count(req, count);
                }
                self.settle();
                Ok(())
            }
            kind::TOPIC_COUNT => {
                let mut b = Body::array(body, 2)?;
                let id = b.uint()?;
                let n = b.uint()?;
                self.shared.counted(id, self.conn, n);
                Ok(())
            }
            kind::GROUP => {
                let mut b = Body::array(body, 3)?;
                let req = b.uint()?;
                let group = b.str()?;
                let env = b.rest();
                if let Err(why) = self.check(env, &[TargetKind::Group], |_, name| name == group) {
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                    self.refuse(req, group, peek_envelope_id(env), why);
                    self.settle();
                    return Ok(());
                }
                let count = self.publish_to_group(group, env, bytes.len())?;
                self.reply_count(req, count);
                self.settle();
                Ok(())
            }
            kind::REQUEST => {
                // A request may deregister the machine the run cache vouches for.
                self.last_source.clear();
                let req: RequestMsg = frame::decode_msg(body)?;
                let r = self.shared.request(self.conn, req);
                self.reply(&r);
                Ok(())
            }
            kind::HELLO => Err(IpcError::Malformed("HELLO after the handshake".into())),
            other => Err(IpcError::UnknownFrame(other)),
        }
    }

    /// Fans a topic event out. A publisher that wants the count (`req` not 0) gets, from the
    /// connections that took it, how many of their machines got it (each once, after its
    /// content filters): the answer then comes once they all said (`None` here); group
    /// deliveries count one each.
    pub(super) fn publish(
        &mut self,
        topic: &str,
        env: &[u8],
        size: usize,
        req: u64,
    ) -> Result<Option<u64>, IpcError> {
        let parts: Vec<&str> = topic.split('.').collect();
        // Plain subscriptions get one TOPIC frame per connection; queue groups (pattern and
        // group) one GROUP_DELIVER to one member per group, on any connection.
        let (plain, groups) = {
            let mut st = lock(&self.shared.st);
            let mut plain: Vec<(Arc<Outbox>, usize, u64, u64)> = Vec::new();
            // Per queue group: its (connection, subscription) members.
            type Members = Vec<(u64, u64)>;
            let mut groups: Vec<(Arc<str>, Members)> = Vec::new();
            for s in &st.subs {
                let Some(p) = &s.topic else { continue };
                if !p.matches_segments(&parts) {
                    continue;
                }
                match &s.group {
                    None if s.conn != self.conn => {
                        if let Some(c) = st.conns.get(&s.conn) {
                            match plain
                                .iter_mut()
                                .find(|(o, _, _, _)| Arc::ptr_eq(o, &c.outbox))
                            {
                                Some(e) => e.2 += 1,
                                None => plain.push((c.outbox.clone(), c.max_frame, 1, s.conn)),
                            }
                        }
                    }
                    None => {}
                    Some(g) => match groups.iter_mut().find(|(n, _)| n == g) {
                        Some((_, m)) => m.push((s.conn, s.sub)),
                        None => groups.push((g.clone(), vec![(s.conn, s.sub)])),
                    },
                }
            }
            let mut chosen = Vec::new();
            for (g, members) in groups {
                let start = *st.group_next.get(&g).unwrap_or(&0);
                let picks: Vec<(Arc<Outbox>, usize, u64)> = (0..members.len())
                    .filter_map(|k| {
                        let (c, sub) = members[(start + k) % members.len()];
                        st.conns
                            .get(&c)
                            .map(|ci| (ci.outbox.clone(), ci.max_frame, sub))
                    })
                    .collect();
                st.group_next.insert(g, start.wrapping_add(1));
                chosen.push(picks);
            }
            (plain, chosen)
        };
        let mut count = 0;
        for picks in groups {
            for (o, max, sub) in picks {
                let fr = wrap(kind::GROUP_DELIVER, |w| frame::write_uint(w, sub), env)?;
                if self.deliver(&o, max, &fr, size) {
                    count += 1;
                    break;
                }
            }
        }
        if plain.is_empty() {
            return Ok(Some(count));
        }
        if req == NO_REPLY {
            let fr = wrap(kind::TOPIC, |w| frame::write_str(w, topic), env)?;
            for (o, max, _, _) in plain {
                self.deliver(&o, max, &fr, size);
            }
            return Ok(Some(count));
        }
        // Registered before any frame goes out, so an answer cannot come first.
        let id = {
            let mut st = lock(&self.shared.st);
            st.next_count += 1;
            let id = st.next_count;
            st.counts.insert(
                id,
                PendingCount {
                    publisher: self.me.clone(),
                    req,
                    waiting: plain.iter().map(|(_, _, _, c)| *c).collect(),
                    sum: count,
                },
            );
            id
        };
        let fr = wrap_n(
            kind::TOPIC_COUNTED,
            3,
            |w| {
                frame::write_str(w, topic)?;
                frame::write_uint(w, id)
            },
            env,
        )?;
        for (o, max, _, c) in plain {
            if !self.deliver(&o, max, &fr, size) {
                self.shared.counted(id, c, 0);
            }
        }
        let weak = self.shared.me.clone();
        tokio::spawn(async move {
            tokio::time::sleep(COUNT_WAIT).await;
            if let Some(shared) = weak.upgrade() {
                shared.count_timed_out(id);
            }
        });
        Ok(None)
    }

    /// A group message to one member (round-robin, skipping members whose queue is full).
    pub(super) fn publish_to_group(
        &mut self,
        group: &str,
        env: &[u8],
        size: usize,
    ) -> Result<u64, IpcError> {
        let picks: Vec<(Arc<Outbox>, usize, u64)> = {
            let mut st = lock(&self.shared.st);
            let members: Vec<(u64, u64)> = st
                .subs
                .iter()
                .filter(|s| s.topic.is_none() && s.group.as_deref() == Some(group))
                .map(|s| (s.conn, s.sub))
                .collect();
            if members.is_empty() {
                Vec::new()
            } else {
                let i = st.group_next.entry(group.into()).or_insert(0);
                let start = *i;
                *i = i.wrapping_add(1);
                (0..members.len())
                    .filter_map(|k| {
                        let (c, sub) = members[(start + k) % members.len()];
                        st.conns
                            .get(&c)
                            .map(|ci| (ci.outbox.clone(), ci.max_frame, sub))
                    })
                    .collect()
            }
        };
        for (o, max, sub) in picks {
            let fr = wrap(kind::GROUP_DELIVER, |w| frame::write_uint(w, sub), env)?;
            if self.deliver(&o, max, &fr, size) {
                return Ok(1);
            }
        }
        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        Ok(0)
    }

    /// Queues a topic or group delivery; a full subscriber loses it (counted) and its slow clock runs.
    pub(super) fn deliver(&self, o: &Outbox, max: usize, fr: &[u8], size: usize) -> bool {
        if fr.len().max(size) > max {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        match o.offer(fr, 0, None, false) {
            Offer::Queued => {
                self.shared.routed.fetch_add(1, Ordering::Relaxed);
                true
            }
            Offer::Full => {
                o.mark_full();
                self.shared.dropped_slow.fetch_add(1, Ordering::Relaxed);
                false
            }
            Offer::Closed => false,
        }
    }

    /// Answers a `PUBLISH` or `GROUP` with how many got it, unless its request id asks for no reply.
    pub(super) fn reply_count(&self, req: u64, count: u64) {
        self.reply(&ReplyMsg {
            count: Some(count),
            ..ReplyMsg::ok(req)
        });
    }
}

/// Answers a counted publish (a control frame: it never waits for room).
pub(super) fn answer_count(publisher: &Outbox, req: u64, count: u64) {
    let r = ReplyMsg {
        count: Some(count),
        ..ReplyMsg::ok(req)
    };
    if let Ok(bytes) = frame::msg_frame(kind::REPLY, &r) {
        let _ = publisher.push_force(&bytes);
    }
}

/// A frame `[first, envelope]` of `kind` around an envelope already checked.
pub(super) fn wrap(
    k: u8,
    first: impl FnOnce(&mut Vec<u8>) -> switchyard_core::Result<()>,
    env: &[u8],
) -> Result<Vec<u8>, IpcError> {
    wrap_n(k, 2, first, env)
}

/// A frame `[.., envelope]` of `kind` with `n` elements: `first` writes all but the envelope.
pub(super) fn wrap_n(
    k: u8,
    n: u32,
    first: impl FnOnce(&mut Vec<u8>) -> switchyard_core::Result<()>,
    env: &[u8],
) -> Result<Vec<u8>, IpcError> {
    let mut fr = Vec::with_capacity(env.len() + 48);
    frame::write_frame(&mut fr, k, usize::MAX, |w| {
        frame::write_array(w, n)?;
        first(w)?;
        w.extend_from_slice(env);
        Ok(())
    })
    .map_err(|e| IpcError::Malformed(e.to_string()))?;
    Ok(fr)
}

/// The `req` of a control map, for answering a refused request; 0 when it cannot be read.
pub(super) fn peek_req(body: &[u8]) -> u64 {
    #[derive(serde::Deserialize)]
    struct ReqOnly {
        #[serde(default)]
        req: u64,
    }
    rmp_serde::from_slice::<ReqOnly>(body)
        .map(|x| x.req)
        .unwrap_or(0)
}

/// The `id` field of an envelope map, for NACKs; 0 when it cannot be read.
///
/// Reads the first key directly (where every encoder puts `id`), so a truncated or
/// otherwise broken envelope still names its event when it can.
pub(crate) fn peek_envelope_id(env: &[u8]) -> u64 {
    let mut rd = env;
    if rmp::decode::read_map_len(&mut rd).is_ok()
        && let Ok((b"id", mut rest)) =
            rmp::decode::read_str_from_slice(rd).map(|(k, r)| (k.as_bytes(), r))
        && let Ok(id) = rmp::decode::read_int::<u64, _>(&mut rest)
    {
        return id;
    }
    #[derive(serde::Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: u64,
    }
    rmp_serde::from_slice::<IdOnly>(env)
        .map(|x| x.id)
        .unwrap_or(0)
}
