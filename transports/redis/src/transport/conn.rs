//! The supervised connections: opening one, and the task that keeps it up.

use super::*;

/// Which supervised connection.
#[derive(Clone, Copy, Debug)]
pub(super) enum Role {
    Cmd,
    Sub,
}

/// Opens one named connection.
pub(super) async fn open(
    sh: &Shared,
    role: &str,
    response_timeout: Option<Duration>,
    push: Option<mpsc::UnboundedSender<PushInfo>>,
) -> Result<MultiplexedConnection> {
    let mut cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(sh.cfg.connect_timeout))
        .set_response_timeout(response_timeout);
    if let Some(tx) = push {
        cfg = cfg.set_push_sender(tx);
    }
    let url = sh.cfg.redis.redacted_url();
    let mut c = sh
        .client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .map_err(|e| {
            let why = match e.kind() {
                redis::ErrorKind::AuthenticationFailed => {
                    "the server refused the credentials: check the user and password in the URL"
                }
                _ if e.is_io_error() || e.is_timeout() => {
                    "the server does not answer: is it running, and is the host and port right?"
                }
                _ => "see the error",
            };
            Error::Transport {
                transport: NAME,
                reason: format!("could not connect to Redis at {url}: {e} ({why})"),
                retryable: !matches!(e.kind(), redis::ErrorKind::AuthenticationFailed),
            }
        })?;
    let name = format!("{}:{}:{role}", sh.cfg.redis.namespace, sh.tag);
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(&name)
        .exec_async(&mut c)
        .await
        .map_err(|e| op_error("CLIENT SETNAME", &e))?;
    Ok(c)
}

pub(super) fn next_delay(prev: Duration, cfg: &RedisTransportConfig) -> Duration {
    if prev.is_zero() {
        cfg.backoff_min
    } else {
        (prev * 2).min(cfg.backoff_max)
    }
}

/// Keeps one connection up until the transport closes: connects with backoff, restores
/// what the role needs, publishes it, and waits for the disconnect notice.
pub(super) async fn supervise(weak: Weak<Shared>, role: Role, mut stop: watch::Receiver<bool>) {
    let mut delay = Duration::ZERO;
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
        let (tx, mut pushes) = mpsc::unbounded_channel();
        let (label, timeout) = match role {
            Role::Cmd => ("cmd", Some(sh.cfg.redis.response_timeout)),
            Role::Sub => ("sub", Some(sh.cfg.redis.response_timeout)),
        };
        let attempt = tokio::select! {
            r = open(&sh, label, timeout, Some(tx)) => r,
            _ = stop.changed() => return,
        };
        let mut conn = match attempt {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, role = label, "Redis connection attempt failed; retrying");
                lock(&sh.last_error).replace(e.to_string());
                delay = next_delay(delay, &sh.cfg);
                continue;
            }
        };
        let slot = match role {
            Role::Cmd => &sh.cmd,
            Role::Sub => {
                let _topo = sh.sub_topo.lock().await;
                let globs: Vec<String> = lock(&sh.topics).globs.keys().cloned().collect();
                let mut failed = None;
                for g in globs {
                    if let Err(e) = conn.psubscribe(&g).await {
                        failed = Some(e);
                        break;
                    }
                }
                if let Some(e) = failed {
                    tracing::warn!(error = %e, "could not subscribe again; reconnecting");
                    lock(&sh.last_error).replace(e.to_string());
                    delay = next_delay(delay, &sh.cfg);
                    continue;
                }
                sh.sub.send_replace(Some(conn.clone()));
                &sh.sub
            }
        };
        if matches!(role, Role::Cmd) {
            slot.send_replace(Some(conn.clone()));
        }
        // Seen from here on: a command that saw the connection fail marks the slot down.
        let mut slot_rx = slot.subscribe();
        slot_rx.borrow_and_update();
        let weak_sh = Arc::downgrade(&sh);
        drop(sh);
        // Until the connection drops: dispatch what it pushes.
        loop {
            let push = tokio::select! {
                p = pushes.recv() => p,
                r = slot_rx.changed() => {
                    if r.is_err() || slot_rx.borrow_and_update().is_none() {
                        break;
                    }
                    continue;
                }
                _ = stop.changed() => return,
            };
            let Some(push) = push else { break };
            match push.kind {
                PushKind::Disconnection => break,
                PushKind::PMessage => {
                    let Some(sh) = weak_sh.upgrade() else { return };
                    dispatch_topic(&sh, push.data).await;
                }
                _ => {}
            }
        }
        let Some(sh) = weak_sh.upgrade() else { return };
        tracing::warn!(role = label, "Redis connection lost; reconnecting");
        lock(&sh.last_error).replace(format!("the {label} connection was lost"));
        match role {
            Role::Cmd => sh.cmd.send_replace(None),
            Role::Sub => sh.sub.send_replace(None),
        };
        drop(conn);
        delay = sh.cfg.backoff_min;
    }
}
