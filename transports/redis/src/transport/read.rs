//! The stream path, receiving side: the blocking reader, delivery and acknowledgement,
//! and the reclaimer that takes over what dead consumers held.

use super::*;

/// One stream entry as read: its id and its envelope field (`None`: missing or deleted).
pub(super) struct Entry {
    pub(super) id: String,
    pub(super) body: Option<Vec<u8>>,
    pub(super) fields: usize,
}

pub(super) fn value_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        _ => None,
    }
}

pub(super) fn value_string(v: Value) -> Option<String> {
    value_bytes(v).and_then(|b| String::from_utf8(b).ok())
}

/// Entries of one stream: `[[id, [field, value, ...]], ...]`.
pub(super) fn parse_entries(v: Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut parts) = item else {
            continue;
        };
        if parts.is_empty() {
            continue;
        }
        let fields_v = if parts.len() > 1 {
            parts.swap_remove(1)
        } else {
            Value::Nil
        };
        let Some(id) = value_string(parts.swap_remove(0)) else {
            continue;
        };
        let pairs: Vec<(Value, Value)> = match fields_v {
            Value::Array(flat) => {
                let mut it = flat.into_iter();
                let mut pairs = Vec::new();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    pairs.push((k, v));
                }
                pairs
            }
            Value::Map(m) => m,
            _ => Vec::new(),
        };
        let fields = pairs.len();
        let body = pairs
            .into_iter()
            .find(|(k, _)| {
                matches!(k, Value::BulkString(b) if b == FIELD.as_bytes())
                    || matches!(k, Value::SimpleString(s) if s == FIELD)
            })
            .and_then(|(_, v)| value_bytes(v));
        out.push(Entry { id, body, fields });
    }
    out
}

/// An `XREADGROUP` reply: per stream, its entries (RESP3 map or RESP2 array).
pub(super) fn parse_read(v: Value) -> Vec<(String, Vec<Entry>)> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Map(m) => m,
        Value::Array(a) => a
            .into_iter()
            .filter_map(|kv| match kv {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let v = kv.swap_remove(1);
                    let k = kv.swap_remove(0);
                    Some((k, v))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(k, v)| Some((value_string(k)?, parse_entries(v))))
        .collect()
}

/// Reads every stream of the session through one blocking `XREADGROUP` on a connection of
/// its own, delivers, and acknowledges once handled; reconnects when the connection drops.
pub(super) async fn read_loop(weak: Weak<Shared>, mut stop: watch::Receiver<bool>) {
    let mut delay = Duration::ZERO;
    // Handled entries to acknowledge with the next read; kept across a reconnection, so
    // the first read on the new connection does not hand them out again.
    let mut acks: Vec<(String, Vec<String>)> = Vec::new();
    loop {
        if !delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
        }
        let Some(sh) = weak.upgrade() else { return };
        if sh.closed.load(Ordering::Acquire) {
            return;
        }
        let mut conn = match open(&sh, "read", None, None).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "Redis reader connection failed; retrying");
                lock(&sh.last_error).replace(e.to_string());
                delay = next_delay(delay, &sh.cfg);
                continue;
            }
        };
        match redis::cmd("CLIENT")
            .arg("ID")
            .query_async::<i64>(&mut conn)
            .await
        {
            Ok(id) => *lock(&sh.reader_id) = Some(id),
            Err(e) => {
                lock(&sh.last_error).replace(e.to_string());
                delay = next_delay(delay, &sh.cfg);
                continue;
            }
        }
        let mut changed = sh.read_changed.subscribe();
        drop(sh);
        // Per stream: the id after which to read our own pending entries again, or `>` for
        // new ones. A fresh connection starts every stream at `0`: what was read but not
        // acknowledged before comes first, so nothing is lost.
        let mut cursors: HashMap<String, String> = HashMap::new();
        loop {
            let Some(sh) = weak.upgrade() else { return };
            if sh.closed.load(Ordering::Acquire) {
                return;
            }
            let (generation, all, streams) = {
                let rs = lock(&sh.read);
                let read: BTreeMap<String, Inbox> = rs
                    .streams
                    .iter()
                    .filter(|(k, _)| !rs.parked.contains(*k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let all: HashSet<String> = rs.streams.keys().cloned().collect();
                (rs.generation, all, read)
            };
            changed.borrow_and_update();
            sh.reader_seen.store(generation, Ordering::Release);
            // A parked stream keeps its cursor: it is read on from there once unparked.
            cursors.retain(|k, _| all.contains(k));
            if streams.is_empty() {
                drop(sh);
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    _ = stop.changed() => return,
                }
                continue;
            }
            for k in streams.keys() {
                cursors.entry(k.clone()).or_insert_with(|| "0".to_string());
            }
            let history = streams
                .keys()
                .any(|k| cursors.get(k).is_some_and(|c| c != ">"));
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(GROUP)
                .arg(&sh.tag)
                .arg("COUNT")
                .arg(sh.cfg.read_count.max(1));
            if !history {
                cmd.arg("BLOCK")
                    .arg(sh.cfg.block.as_millis().clamp(1, 3_600_000) as u64);
            }
            cmd.arg("STREAMS");
            for k in streams.keys() {
                cmd.arg(k);
            }
            for k in streams.keys() {
                cmd.arg(cursors.get(k).map_or("0", |c| c.as_str()));
            }
            drop(sh);
            // What the last read handled is acknowledged in the same round trip as the next
            // read (XACKs first): no extra round trip, and a lost connection only means
            // those entries are read again (at least once).
            let mut pipe = redis::pipe();
            for (key, ids) in &acks {
                pipe.cmd("XACK").arg(key).arg(GROUP).arg(ids).ignore();
            }
            pipe.add_command(cmd);
            let reply = tokio::select! {
                r = pipe.query_async::<Vec<Value>>(&mut conn) => {
                    r.map(|mut v| v.pop().unwrap_or(Value::Nil))
                }
                _ = stop.changed() => return,
            };
            let Some(sh) = weak.upgrade() else { return };
            if !reply.as_ref().is_err_and(|e| e.is_unrecoverable_error()) {
                // Sent: acknowledged (acknowledging again after a lost connection is harmless).
                acks.clear();
            }
            match reply {
                Ok(v) => {
                    let got = parse_read(v);
                    let mut seen: HashSet<String> = HashSet::new();
                    for (key, entries) in got {
                        seen.insert(key.clone());
                        if history && cursors.get(&key).is_some_and(|c| c != ">") {
                            match entries.last() {
                                Some(e) => {
                                    cursors.insert(key.clone(), e.id.clone());
                                }
                                None => {
                                    cursors.insert(key.clone(), ">".to_string());
                                }
                            }
                        }
                        if let Some(inbox) = streams.get(&key) {
                            let ids = handle_entries(&sh, &key, inbox, entries).await;
                            if !ids.is_empty() {
                                acks.push((key.clone(), ids));
                            }
                        }
                    }
                    if history {
                        // A stream in history mode that returned nothing has no more pending.
                        for (k, c) in cursors.iter_mut() {
                            if c != ">" && streams.contains_key(k) && !seen.contains(k) {
                                *c = ">".to_string();
                            }
                        }
                    }
                }
                Err(e) if e.is_unrecoverable_error() => {
                    tracing::warn!(error = %e, "Redis reader connection lost; reconnecting");
                    lock(&sh.last_error).replace(e.to_string());
                    delay = sh.cfg.backoff_min;
                    break;
                }
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        // A stream of the set was deleted (or never made): make it again,
                        // since this session still reads it.
                        for k in streams.keys() {
                            if let Err(e) = sh.ensure_group(k).await {
                                tracing::warn!(stream = %k, error = %e, "could not create the consumer group");
                            }
                        }
                    } else if !e.to_string().contains("UNBLOCKED") {
                        tracing::warn!(error = %e, "XREADGROUP failed");
                        lock(&sh.last_error).replace(e.to_string());
                        let pause = sh.cfg.backoff_min;
                        drop(sh);
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = stop.changed() => return,
                        }
                    }
                }
            }
        }
    }
}

/// Adopts the stream of a group member that expired (died, or left): delivers what it
/// read but did not acknowledge and what it never read to `inbox` (a member of the same
/// group here), then deletes the stream. Removing the member from the hash first makes one
/// adopter win when several see it expire.
pub(super) async fn adopt(sh: &Arc<Shared>, group: &str, dead: &str, inbox: &Inbox) {
    let members = sh.names.group_members(group);
    let mut hdel = redis::cmd("HDEL");
    hdel.arg(&members).arg(dead);
    if !matches!(sh.run::<i64>("HDEL", &hdel).await, Ok(1)) {
        return;
    }
    let key = sh.names.member_stream(group, dead);
    let mut pending = redis::cmd("XPENDING");
    pending.arg(&key).arg(GROUP).arg("-").arg("+").arg(10_000);
    if let Ok(Value::Array(rows)) = sh.run::<Value>("XPENDING", &pending).await {
        let ids: Vec<String> = rows
            .into_iter()
            .filter_map(|row| match row {
                Value::Array(mut f) if !f.is_empty() => value_string(f.swap_remove(0)),
                _ => None,
            })
            .collect();
        if !ids.is_empty() {
            let mut claim = redis::cmd("XCLAIM");
            claim.arg(&key).arg(GROUP).arg(&sh.tag).arg(0).arg(&ids);
            if let Ok(v) = sh.run::<Value>("XCLAIM", &claim).await {
                let entries = parse_entries(v);
                tracing::info!(
                    group,
                    member = dead,
                    claimed = entries.len(),
                    "took over what a group member that left or died had not acknowledged"
                );
                let acks = handle_entries(sh, &key, inbox, entries).await;
                sh.ack(&key, &acks).await;
            }
        }
    }
    loop {
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(GROUP)
            .arg(&sh.tag)
            .arg("COUNT")
            .arg(sh.cfg.read_count.max(1))
            .arg("STREAMS")
            .arg(&key)
            .arg(">");
        let Ok(v) = sh.run::<Value>("XREADGROUP", &read).await else {
            break;
        };
        let entries: Vec<Entry> = parse_read(v).into_iter().flat_map(|(_, e)| e).collect();
        if entries.is_empty() {
            break;
        }
        let acks = handle_entries(sh, &key, inbox, entries).await;
        sh.ack(&key, &acks).await;
    }
    let mut del = redis::cmd("DEL");
    del.arg(&key);
    let _ = sh.run::<Value>("DEL", &del).await;
}

/// Takes, every `claim_idle / 2`, the entries other consumers of the session's streams
/// read but did not acknowledge within `claim_idle` (a member that died), and delivers them.
///
/// `XPENDING ... IDLE` then `XCLAIM` rather than `XAUTOCLAIM`: the latter would also take
/// this session's own entries whose (async) handler is still running, delivering them twice.
pub(super) async fn reclaim_loop(weak: Weak<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let period = match weak.upgrade() {
            Some(sh) => {
                let lease = sh.cfg.inbox_lease.unwrap_or(Duration::MAX);
                (sh.cfg.claim_idle.min(lease) / 3).max(Duration::from_millis(50))
            }
            None => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
        let Some(sh) = weak.upgrade() else { return };
        if sh.closed.load(Ordering::Acquire) {
            return;
        }
        sh.renew_leases().await;
        let members: Vec<Membership> = lock(&sh.topics).groups.values().cloned().collect();
        for m in members {
            match sh.heartbeat(&m.group, &m.member).await {
                Ok(dead) => {
                    for d in dead {
                        adopt(&sh, &m.group, &d, &m.inbox).await;
                    }
                }
                Err(e) => tracing::warn!(group = %m.group, error = %e, "group heartbeat failed"),
            }
        }
        let streams = lock(&sh.read).streams.clone();
        let idle = sh.cfg.claim_idle.as_millis().max(1) as u64;
        for (key, inbox) in streams {
            let mut cmd = redis::cmd("XPENDING");
            cmd.arg(&key)
                .arg(GROUP)
                .arg("IDLE")
                .arg(idle)
                .arg("-")
                .arg("+")
                .arg(256);
            let Ok(Value::Array(rows)) = sh.run::<Value>("XPENDING", &cmd).await else {
                continue;
            };
            let ids: Vec<String> = rows
                .into_iter()
                .filter_map(|row| {
                    let Value::Array(mut f) = row else {
                        return None;
                    };
                    if f.len() < 2 {
                        return None;
                    }
                    let consumer = value_string(f.swap_remove(1))?;
                    let id = value_string(f.swap_remove(0))?;
                    (consumer != sh.tag).then_some(id)
                })
                .collect();
            if ids.is_empty() {
                continue;
            }
            let mut claim = redis::cmd("XCLAIM");
            claim.arg(&key).arg(GROUP).arg(&sh.tag).arg(idle).arg(&ids);
            match sh.run::<Value>("XCLAIM", &claim).await {
                Ok(v) => {
                    let entries = parse_entries(v);
                    tracing::info!(stream = %key, claimed = entries.len(), "claimed entries another consumer did not acknowledge");
                    let acks = handle_entries(&sh, &key, &inbox, entries).await;
                    sh.ack(&key, &acks).await;
                }
                Err(e) => tracing::warn!(stream = %key, error = %e, "XCLAIM failed"),
            }
        }
    }
}

/// What became of one delivered entry.
pub(super) enum Outcome {
    /// Handled (or dropped on purpose, counted): acknowledge now.
    Ack,
    /// Queued for an async handler: acknowledge once it ran.
    AckWhen(switchyard_core::Handled),
    /// The machine is gone: leave it pending.
    Leave,
}

pub(super) async fn deliver_entry(sh: &Shared, inbox: &Inbox, env: Envelope) -> Outcome {
    match inbox.deliver_tracked(env).await {
        Ok(done) => {
            sh.delivered.fetch_add(1, Ordering::Relaxed);
            if inbox.is_sync() {
                Outcome::Ack
            } else {
                Outcome::AckWhen(done)
            }
        }
        Err(Error::TargetGone(_)) | Err(Error::SessionClosed) => Outcome::Leave,
        Err(e) => {
            // Refused by the mailbox policy (`Fail`): dropped here, counted.
            tracing::debug!(machine = %inbox.id(), error = %e, "event refused by the mailbox");
            inbox.count_dropped();
            sh.dropped.fetch_add(1, Ordering::Relaxed);
            Outcome::Ack
        }
    }
}

/// The envelope of an entry; a malformed entry is logged and counted (`None`: acknowledge
/// and skip it).
pub(super) fn decode_entry(sh: &Shared, key: &str, entry: &Entry) -> Option<Envelope> {
    match entry.body.as_deref().map(wire::decode) {
        Some(Ok(env)) => Some(env),
        other => {
            sh.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                stream = key,
                id = %entry.id,
                fields = entry.fields,
                error = %other.and_then(|r| r.err()).map_or_else(
                    || format!("no `{FIELD}` field (or the entry was deleted)"),
                    |e| e.to_string()
                ),
                "skipped a malformed entry (not a Switchyard envelope); acknowledged"
            );
            None
        }
    }
}

/// Records what became of entry `id`: acknowledge now (pushed to `acks`), after its async
/// handler ran (on a task), or never (the machine is gone).
pub(super) fn settle(
    sh: &Arc<Shared>,
    key: &str,
    id: String,
    outcome: Outcome,
    acks: &mut Vec<String>,
) {
    match outcome {
        Outcome::Ack => acks.push(id),
        Outcome::Leave => {}
        Outcome::AckWhen(done) => {
            let weak = Arc::downgrade(sh);
            let key = key.to_string();
            tokio::spawn(async move {
                done.await;
                if let Some(sh) = weak.upgrade() {
                    sh.ack(&key, &[id]).await;
                }
            });
        }
    }
}

pub(super) type Delivery = std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send>>;

/// Delivers the entries read from one stream. Returns the ids handled now, for the caller
/// to acknowledge; an async handler's entry is acknowledged after its handler ran, on a
/// task, so the reader keeps reading (the handler may wait for a reply that comes this way).
///
/// When an async handler's mailbox is full and its policy is `Wait`, the reader does not
/// wait with it (that would stall every other machine of the session): the stream is
/// parked, and a task delivers the rest of the batch as room comes, acknowledges it and
/// unparks the stream. Redis keeps what arrives meanwhile.
pub(super) async fn handle_entries(
    sh: &Arc<Shared>,
    key: &str,
    inbox: &Inbox,
    entries: Vec<Entry>,
) -> Vec<String> {
    let mut acks = Vec::with_capacity(entries.len());
    let mut rest = entries.into_iter();
    while let Some(entry) = rest.next() {
        let Some(env) = decode_entry(sh, key, &entry) else {
            acks.push(entry.id);
            continue;
        };
        if inbox.is_sync() {
            // Runs the handler here; never waits for room.
            let outcome = deliver_entry(sh, inbox, env).await;
            settle(sh, key, entry.id, outcome, &mut acks);
            continue;
        }
        let (sh2, inbox2) = (sh.clone(), inbox.clone());
        let mut delivery: Delivery =
            Box::pin(async move { deliver_entry(&sh2, &inbox2, env).await });
        match futures_util::FutureExt::now_or_never(&mut delivery) {
            Some(outcome) => settle(sh, key, entry.id, outcome, &mut acks),
            None => {
                park(sh, key, inbox, (entry.id, delivery), rest.collect());
                break;
            }
        }
    }
    acks
}

/// Stops reading `key` while a task finishes `waiting` and delivers `rest` (see
/// [`handle_entries`]).
pub(super) fn park(
    sh: &Arc<Shared>,
    key: &str,
    inbox: &Inbox,
    waiting: (String, Delivery),
    rest: Vec<Entry>,
) {
    lock(&sh.read).parked.insert(key.to_string());
    let (weak, key, inbox) = (Arc::downgrade(sh), key.to_string(), inbox.clone());
    tokio::spawn(async move {
        let (id, delivery) = waiting;
        let outcome = delivery.await;
        let Some(sh) = weak.upgrade() else { return };
        let mut acks = Vec::new();
        settle(&sh, &key, id, outcome, &mut acks);
        for entry in rest {
            match decode_entry(&sh, &key, &entry) {
                Some(env) => {
                    let outcome = deliver_entry(&sh, &inbox, env).await;
                    settle(&sh, &key, entry.id, outcome, &mut acks);
                }
                None => acks.push(entry.id),
            }
        }
        sh.ack(&key, &acks).await;
        let generation = {
            let mut rs = lock(&sh.read);
            rs.parked.remove(&key);
            rs.generation += 1;
            rs.generation
        };
        sh.read_changed.send_replace(generation);
        sh.wake_reader(generation);
    });
}
