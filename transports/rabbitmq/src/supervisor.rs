//! The connection supervisor: reconnects with backoff and restores the topology.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;

use crate::config::RabbitConfig;
use crate::conn::{self, Live};
use crate::{Shared, lock};

/// Reconnects whenever the connection is lost, until the transport closes.
pub(crate) async fn supervise(
    weak: Weak<Shared>,
    mut stop: watch::Receiver<bool>,
    first: Option<Arc<Live>>,
) {
    let mut next = first;
    let mut delay = Duration::ZERO;
    loop {
        if !delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
        }
        let Some(shared) = weak.upgrade() else { return };
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        let live = match next.take() {
            Some(l) => l,
            None => {
                let generation = shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
                let attempt = tokio::select! {
                    r = conn::connect(&shared.cfg, &shared.names, generation) => r,
                    _ = stop.changed() => return,
                };
                match attempt {
                    Ok(l) => Arc::new(l),
                    Err(e) => {
                        tracing::warn!(error = %e, "RabbitMQ connection attempt failed; retrying");
                        lock(&shared.last_error).replace(e.to_string());
                        delay = next_delay(delay, &shared.cfg);
                        continue;
                    }
                }
            }
        };
        let restored = {
            let _topo = shared.topo.lock().await;
            let r = shared.restore(&live).await;
            if r.is_ok() {
                shared.state.send_replace(Some(live.clone()));
            }
            r
        };
        if let Err(e) = restored {
            tracing::warn!(error = %e, "could not restore the RabbitMQ topology; reconnecting");
            lock(&shared.last_error).replace(e.to_string());
            let _ = live.conn.close(200, "restore failed".into()).await;
            delay = next_delay(delay, &shared.cfg);
            continue;
        }
        if shared.closed.load(Ordering::Acquire) {
            let _ = live.conn.close(200, "closed".into()).await;
            return;
        }
        let backoff_min = shared.cfg.backoff_min;
        drop(shared);
        // Wait until the connection fails (or the transport stops).
        let mut events = live.conn.events_listener();
        loop {
            tokio::select! {
                ev = events.next() => match ev {
                    Some(lapin::Event::Error(e)) => {
                        tracing::warn!(error = %e, "RabbitMQ connection lost; reconnecting");
                        if let Some(s) = weak.upgrade() {
                            lock(&s.last_error).replace(e.to_string());
                        }
                        break;
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    if !live.is_up() {
                        break;
                    }
                }
                _ = stop.changed() => {
                    let _ = live.conn.close(200, "closed".into()).await;
                    return;
                }
            }
        }
        if let Some(s) = weak.upgrade() {
            s.state.send_replace(None);
        }
        delay = backoff_min;
    }
}

pub(crate) fn next_delay(prev: Duration, cfg: &RabbitConfig) -> Duration {
    if prev.is_zero() {
        cfg.backoff_min
    } else {
        (prev * 2).min(cfg.backoff_max)
    }
}
