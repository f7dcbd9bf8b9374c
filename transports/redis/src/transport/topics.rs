//! Topics on Redis pub/sub and consumer groups on member streams: publishing, dispatching
//! what a subscription receives, and the `PubSub` implementation.

use super::*;

/// Where a subscriber is relative to the publisher.
pub(super) fn location_of(host: &str, process: &str, sub: &MachineEntry) -> Location {
    if &*sub.host_id != host {
        Location::Remote
    } else if &*sub.process_id != process {
        Location::SameMachine
    } else {
        Location::SameProcess
    }
}

pub(super) fn location_from(n: u8) -> Location {
    Location::ALL[usize::from(n.min(3))]
}

/// Delivers one pushed `pmessage` (`[pattern, channel, payload]`) to the session's
/// matching subscriptions.
///
/// Redis sends a message once per matching pattern of the connection, and a glob may match
/// more than the topic pattern it came from; so a machine gets the message only with the
/// smallest of its subscriptions' globs that matches exactly, which happens once.
pub(super) async fn dispatch_topic(sh: &Shared, data: Vec<Value>) {
    let mut it = data.into_iter();
    let (Some(pattern), Some(channel), Some(payload)) = (
        it.next().and_then(value_bytes),
        it.next().and_then(value_bytes),
        it.next().and_then(value_bytes),
    ) else {
        return;
    };
    let Some(topic) = sh.names.topic_of(&channel) else {
        return;
    };
    let (header, env) = match wire::split_topic_message(&payload) {
        Ok(x) => x,
        Err(e) => {
            sh.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic, bytes = payload.len(), error = %e, "skipped a malformed topic message (not a Switchyard publish)");
            return;
        }
    };
    if !matches!(&env.target, Address::Topic(t) if &**t == topic) {
        sh.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(topic, target = %env.target, "skipped a topic message whose envelope names another target");
        return;
    }
    let reach = Reach::new(
        location_from(header.nearest),
        location_from(header.farthest),
    );
    let subs = lock(&sh.topics).snapshot.clone();
    let parts: Vec<&str> = topic.split('.').collect();
    let matching: Vec<&Arc<TopicSub>> = subs
        .iter()
        .filter(|s| s.pattern.matches_segments(&parts))
        .collect();
    // Who gets it with this message: per machine, its first subscription (in order) whose
    // glob is the smallest among its matching ones equal to the message's pattern, within
    // reach and passing its filter.
    let mut targets: Vec<&Arc<TopicSub>> = Vec::with_capacity(matching.len());
    for s in &matching {
        let id = s.inbox.id();
        if targets.iter().any(|t| t.inbox.id() == id) {
            continue;
        }
        let smallest = matching
            .iter()
            .filter(|o| o.inbox.id() == id)
            .map(|o| o.glob.as_str())
            .min()
            .unwrap_or(s.glob.as_str());
        if smallest.as_bytes() != &pattern[..] {
            continue;
        }
        if !reach.covers(location_of(&header.host, &header.process, s.inbox.entry())) {
            continue;
        }
        // A machine's filters: the first subscription whose filter takes it delivers.
        let Some(chosen) = matching
            .iter()
            .filter(|o| o.inbox.id() == id)
            .find(|o| o.filter.as_ref().is_none_or(|f| f(&env)))
        else {
            continue;
        };
        targets.push(chosen);
    }
    let last = targets.len().saturating_sub(1);
    let mut env = Some(env);
    for (i, s) in targets.into_iter().enumerate() {
        // The last one takes the envelope itself; the others a copy.
        let ev = if i == last { env.take() } else { env.clone() };
        let Some(ev) = ev else { break };
        match s.inbox.deliver(ev).await {
            Ok(()) => {
                sh.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => s.inbox.count_dropped(),
        }
    }
}

/// Sends queued publishes in order, pipelining whatever is waiting into one round trip.
pub(super) async fn publish_loop(
    weak: Weak<Shared>,
    mut rx: mpsc::Receiver<PubReq>,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch: Vec<PubReq> = Vec::new();
    loop {
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = stop.changed() => return,
        };
        let Some(first) = first else { return };
        batch.push(first);
        while batch.len() < PUBLISH_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let Some(sh) = weak.upgrade() else { return };
        let result = match sh.wait_conn(&sh.cmd, sh.deadline()).await {
            Ok(mut c) => {
                let mut pipe = redis::pipe();
                for r in &batch {
                    pipe.cmd("PUBLISH").arg(&r.channel).arg(&r.body);
                }
                pipe.query_async::<Vec<i64>>(&mut c).await.map_err(|e| {
                    if e.is_unrecoverable_error() {
                        sh.connection_lost(&sh.cmd);
                    }
                    op_error("PUBLISH", &e)
                })
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(counts) => {
                for (r, n) in batch.drain(..).zip(counts) {
                    if let Some(tx) = r.reply {
                        let _ = tx.send(Ok(n));
                    }
                }
            }
            Err(e) => {
                let mut emitted = 0usize;
                for r in batch.drain(..) {
                    match r.reply {
                        Some(tx) => {
                            let _ = tx.send(Err(e.clone()));
                        }
                        None => emitted += 1,
                    }
                }
                if emitted > 0 {
                    sh.dropped.fetch_add(emitted as u64, Ordering::Relaxed);
                    tracing::warn!(error = %e, lost = emitted, "emitted topic messages were not published");
                }
            }
        }
    }
}

impl RedisTransport {
    async fn add_group(&self, from: &MachineEntry, env: &Envelope, group: &str) -> Result<usize> {
        let _ = from;
        let sh = &self.shared;
        let body = env.encode()?;
        if body.len() > sh.cfg.max_message {
            return Err(Error::TooLarge {
                transport: NAME,
                size: body.len(),
                limit: sh.cfg.max_message,
            });
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(GROUP_PUBLISH)
            .arg(2)
            .arg(sh.names.group_members(group))
            .arg(sh.names.group_counter(group))
            .arg(sh.names.member_prefix(group))
            .arg(sh.cfg.stream_maxlen)
            .arg(FIELD)
            .arg(body);
        // On a task, so a dropped caller does not cancel a publish half-way.
        let sh = sh.clone();
        let n: i64 = tokio::spawn(async move { sh.run("EVAL", &cmd).await })
            .await
            .map_err(|_| self.shared.closed_error())??;
        Ok(usize::from(n > 0))
    }

    /// The channel message of a publish: the publisher header (cached: a session publishes
    /// from few machines and reaches) and the envelope, built in one buffer.
    fn topic_body(&self, from: &MachineEntry, env: &Envelope, reach: Reach) -> Result<Vec<u8>> {
        let sh = &self.shared;
        let (near, far) = (reach.nearest as u8, reach.farthest as u8);
        let header = {
            let mut cache = lock(&sh.header_cache);
            match &*cache {
                Some((h, p, n, f, bytes))
                    if h == &from.host_id && p == &from.process_id && *n == near && *f == far =>
                {
                    bytes.clone()
                }
                _ => {
                    let bytes: Arc<[u8]> = wire::topic_header(&wire::TopicHeader {
                        format: wire::TOPIC_FORMAT,
                        host: from.host_id.to_string(),
                        process: from.process_id.to_string(),
                        nearest: near,
                        farthest: far,
                    })?
                    .into();
                    *cache = Some((
                        from.host_id.clone(),
                        from.process_id.clone(),
                        near,
                        far,
                        bytes.clone(),
                    ));
                    bytes
                }
            }
        };
        let mut body = Vec::with_capacity(header.len() + 128);
        body.extend_from_slice(&header);
        OutgoingRef::of(env).encode_into(&mut Vec::new(), &mut body)?;
        let max = sh.cfg.max_message;
        if body.len() > max {
            return Err(Error::TooLarge {
                transport: NAME,
                size: body.len(),
                limit: max,
            });
        }
        Ok(body)
    }

    async fn queue_publish(&self, req: PubReq) -> Result<()> {
        let sh = &self.shared;
        if sh.closed.load(Ordering::Acquire) {
            return Err(sh.closed_error());
        }
        sh.publisher.send(req).await.map_err(|_| sh.closed_error())
    }
}

pub(super) fn not_publishable(target: &Address) -> Error {
    Error::InvalidPattern {
        pattern: target.to_string(),
        reason: "publish takes a topic or a group address",
    }
}

#[async_trait]
impl PubSub for RedisTransport {
    async fn publish(&self, from: &MachineEntry, env: Envelope, reach: Reach) -> Result<usize> {
        let sh = &self.shared;
        match &env.target {
            Address::Topic(t) => {
                let channel = sh.names.channel(t);
                let body = self.topic_body(from, &env, reach)?;
                let (tx, rx) = oneshot::channel();
                self.queue_publish(PubReq {
                    channel,
                    body,
                    reply: Some(tx),
                })
                .await?;
                let n = rx.await.map_err(|_| sh.closed_error())??;
                // Redis counts receiving connections per matching pattern, not machines: say
                // whether anyone got it (docs/SEMANTICS.md).
                Ok(usize::from(n > 0))
            }
            Address::Group(g) => self.add_group(from, &env, g).await,
            other => Err(not_publishable(other)),
        }
    }

    async fn emit(&self, from: &MachineEntry, env: Envelope, reach: Reach) -> Result<()> {
        let sh = &self.shared;
        match &env.target {
            Address::Topic(t) => {
                let channel = sh.names.channel(t);
                let body = self.topic_body(from, &env, reach)?;
                self.queue_publish(PubReq {
                    channel,
                    body,
                    reply: None,
                })
                .await
            }
            Address::Group(g) => self.add_group(from, &env, g).await.map(drop),
            other => Err(not_publishable(other)),
        }
    }

    async fn subscribe(&self, sub: Subscription) -> Result<SubscriptionId> {
        let sh = &self.shared;
        if sh.closed.load(Ordering::Acquire) {
            return Err(sh.closed_error());
        }
        let id = SubscriptionId(sh.next_sub.fetch_add(1, Ordering::Relaxed));
        if let Some(group) = sub.group.clone() {
            if sub.topic.is_some() {
                return Err(Error::NotSupported {
                    transport: NAME,
                    capability: "topic subscriptions shared by a consumer group (join the group \
                                 and publish to it with publish_to_group instead)",
                });
            }
            let member = format!("{}-{}", sh.tag, id.0);
            let stream = sh.names.member_stream(&group, &member);
            sh.ensure_group(&stream).await?;
            sh.heartbeat(&group, &member).await?;
            lock(&sh.topics).groups.insert(
                id,
                Membership {
                    group,
                    member,
                    stream: stream.clone(),
                    inbox: sub.inbox.clone(),
                },
            );
            sh.add_stream(stream, sub.inbox);
            return Ok(id);
        }
        let Some(pattern) = sub.topic else {
            return Err(Error::InvalidPattern {
                pattern: String::new(),
                reason: "a subscription needs a topic pattern or a group",
            });
        };
        let glob = sh.names.channel_pattern(&pattern);
        let first = {
            let mut t = lock(&sh.topics);
            t.subs.insert(
                id,
                Arc::new(TopicSub {
                    pattern,
                    glob: glob.clone(),
                    filter: sub.filter,
                    inbox: sub.inbox,
                }),
            );
            t.rebuild();
            let n = t.globs.entry(glob.clone()).or_insert(0);
            *n += 1;
            *n == 1
        };
        sh.ensure_subscriber();
        if first {
            let deadline = sh.deadline();
            loop {
                let mut c = sh.wait_conn(&sh.sub, deadline).await?;
                let _topo = sh.sub_topo.lock().await;
                match c.psubscribe(&glob).await {
                    Ok(()) => break,
                    Err(e)
                        if e.is_unrecoverable_error() && tokio::time::Instant::now() < deadline =>
                    {
                        // The supervisor subscribes everything again on its new connection.
                        sh.connection_lost(&sh.sub);
                    }
                    Err(e) => return Err(op_error("PSUBSCRIBE", &e)),
                }
            }
        }
        Ok(id)
    }

    async fn unsubscribe(&self, id: SubscriptionId) -> Result<()> {
        let sh = &self.shared;
        let group = lock(&sh.topics).groups.remove(&id);
        if let Some(m) = group {
            sh.remove_stream(&m.stream);
            // Expired at once: no more publishes come its way, and a remaining member adopts
            // what its stream still holds.
            let mut cmd = redis::cmd("HSET");
            cmd.arg(sh.names.group_members(&m.group))
                .arg(&m.member)
                .arg(0);
            sh.run::<Value>("HSET", &cmd).await?;
            return Ok(());
        }
        let last_glob = {
            let mut t = lock(&sh.topics);
            let Some(s) = t.subs.remove(&id) else {
                return Ok(());
            };
            t.rebuild();
            match t.globs.get_mut(&s.glob) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    None
                }
                Some(_) => {
                    t.globs.remove(&s.glob);
                    Some(s.glob.clone())
                }
                None => None,
            }
        };
        if let Some(glob) = last_glob {
            let conn = sh.sub.borrow().clone();
            if let Some(mut c) = conn {
                let _topo = sh.sub_topo.lock().await;
                let _ = c.punsubscribe(&glob).await;
            }
        }
        Ok(())
    }
}
