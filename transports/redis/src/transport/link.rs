//! The stream path, sending side: the per-target link and its pipelined `XADD`s.

use super::*;

/// A resolved way to one machine: its inbox stream.
pub(super) struct RedisLink {
    pub(super) shared: Arc<Shared>,
    pub(super) to: MachineId,
    pub(super) key: String,
}

/// Puts encoded-but-unsent events back in front of `out`, in order.
pub(super) fn give_back(out: &mut dyn Outgoing, bodies: Vec<Vec<u8>>) {
    for body in bodies.into_iter().rev() {
        if let Ok(env) = Envelope::decode(&body) {
            out.push_front(env);
        }
    }
}

/// Appends encoded events to a stream in one pipelined round trip, waiting out an outage
/// (bounded) and sending again what a lost connection may not have taken (at least once).
/// On failure, gives back the error and the events not known to be in the stream.
pub(super) async fn xadd_batch(
    sh: Arc<Shared>,
    to: MachineId,
    key: String,
    mut bodies: Vec<Vec<u8>>,
    deadline: tokio::time::Instant,
) -> std::result::Result<(), (Error, Vec<Vec<u8>>)> {
    let maxlen = sh.cfg.stream_maxlen.to_string();
    loop {
        let mut conn = match sh.wait_conn(&sh.cmd, deadline).await {
            Ok(c) => c,
            Err(e) => return Err((e, bodies)),
        };
        let mut pipe = redis::pipe();
        for b in &bodies {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("NOMKSTREAM")
                .arg("MAXLEN")
                .arg("~")
                .arg(&maxlen)
                .arg("*")
                .arg(FIELD)
                .arg(b);
        }
        match pipe.query_async::<Vec<Option<String>>>(&mut conn).await {
            Ok(ids) => {
                return match ids.iter().position(|id| id.is_none()) {
                    // No stream: the machine is bound nowhere (it left, or its session
                    // closed). What went before it is in; the rest is not.
                    Some(gone) => Err((Error::TargetGone(to), bodies.split_off(gone))),
                    None => Ok(()),
                };
            }
            Err(e) if e.is_unrecoverable_error() => {
                lock(&sh.last_error).replace(e.to_string());
                sh.connection_lost(&sh.cmd);
                if tokio::time::Instant::now() >= deadline {
                    let err = Error::Transport {
                        transport: NAME,
                        reason: format!(
                            "lost the connection to Redis at {} and it did not come back within {:?}",
                            sh.cfg.redis.redacted_url(),
                            sh.cfg.outage_wait
                        ),
                        retryable: true,
                    };
                    return Err((err, bodies));
                }
            }
            Err(e) => return Err((op_error("XADD", &e), bodies)),
        }
    }
}

#[async_trait]
impl Link for RedisLink {
    async fn send(&self, out: &mut dyn Outgoing) -> Result<()> {
        let sh = &self.shared;
        if sh.closed.load(Ordering::Acquire) {
            return Err(sh.closed_error());
        }
        let deadline = sh.deadline();
        let mut scratch = Vec::new();
        while !out.is_empty() {
            // Take a batch off the front, encoded; what fails to encode stops the batch.
            let mut bodies: Vec<Vec<u8>> = Vec::new();
            let mut bytes = 0usize;
            let mut failed = None;
            while bodies.len() < SEND_BATCH && (bodies.is_empty() || bytes < SEND_BYTES) {
                let Some(ev) = out.front() else { break };
                let body = match ev.encode(&mut scratch) {
                    Ok(b) => b,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                };
                if body.len() > sh.cfg.max_message {
                    failed = Some(Error::TooLarge {
                        transport: NAME,
                        size: body.len(),
                        limit: sh.cfg.max_message,
                    });
                    break;
                }
                bytes += body.len();
                out.advance();
                bodies.push(body);
            }
            if !bodies.is_empty() {
                // On a task of its own: once the events left `out` they must reach Redis even
                // if this future is dropped (a post polls it once), and a dropped redis-rs
                // request is never written.
                let task = tokio::spawn(xadd_batch(
                    sh.clone(),
                    self.to.clone(),
                    self.key.clone(),
                    bodies,
                    deadline,
                ));
                match task.await {
                    Ok(Ok(())) => {}
                    Ok(Err((e, unsent))) => {
                        give_back(out, unsent);
                        return Err(e);
                    }
                    Err(_) => return Err(sh.closed_error()),
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    }

    fn is_open(&self) -> bool {
        !self.shared.closed.load(Ordering::Acquire)
    }
}
