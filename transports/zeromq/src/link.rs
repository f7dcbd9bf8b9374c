//! Links: to a machine in another process (its DEALER connection), or in this one.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use switchyard_core::{Envelope, Error, Inbox, Link, MachineId, Outgoing, Result};
use zeromq::ZmqMessage;

use crate::codec::{self, kind};
use crate::conn::{Conn, Dead, TrySend};
use crate::{BATCH_BYTES, BATCH_EVENTS, NAME, Shared};

/// A link to a machine in another process: its process's DEALER connection.
pub(crate) struct ZmqLink {
    pub(crate) shared: Weak<Shared>,
    pub(crate) conn: Arc<Conn>,
    pub(crate) to: MachineId,
    /// `to` as a frame, made once: each message shares it.
    pub(crate) to_frame: Bytes,
    pub(crate) max: usize,
}

impl ZmqLink {
    pub(crate) fn err(&self, d: Dead) -> Error {
        match self.shared.upgrade() {
            Some(s) if !s.is_closed() => {
                tracing::debug!(to = %self.to, reason = %d.0, "zeromq link failed");
                Error::TargetGone(self.to.clone())
            }
            _ => Error::Closed(NAME),
        }
    }

    /// Encodes events from the front of `out` (without taking them) into one `SEND`
    /// message; returns it, its size and how many events it holds.
    pub(crate) fn encode(&self, out: &dyn Outgoing) -> Result<Option<(ZmqMessage, u64, usize)>> {
        let Some(first) = out.front() else {
            return Ok(None);
        };
        let mut buf = Vec::with_capacity(192 + first.event.len() + first.source.as_str().len());
        codec::write_event(&mut buf, &first)?;
        if buf.len() > self.max {
            return Err(Error::TooLarge {
                transport: NAME,
                size: buf.len(),
                limit: self.max,
            });
        }
        let size = 1 + self.to_frame.len() as u64 + buf.len() as u64;
        // Built from a Vec: one allocation for the frame list.
        let frames = vec![
            Bytes::from_static(&[kind::SEND]),
            self.to_frame.clone(),
            Bytes::from(buf),
        ];
        match ZmqMessage::try_from(frames) {
            Ok(msg) => Ok(Some((msg, size, 1))),
            Err(_) => Ok(None),
        }
    }

    /// Like [`ZmqLink::encode`] for a run: up to [`BATCH_EVENTS`] events or [`BATCH_BYTES`].
    pub(crate) fn encode_run(
        &self,
        out: &mut dyn Outgoing,
    ) -> Result<Option<(ZmqMessage, u64, Vec<Envelope>)>> {
        // Events are taken as envelopes so a failed send can put them back in order.
        let mut msg = ZmqMessage::from(Bytes::from_static(&[kind::SEND]));
        let mut size = 1 + self.to_frame.len() as u64;
        msg.push_back(self.to_frame.clone());
        let mut taken = Vec::new();
        while taken.len() < BATCH_EVENTS && (size as usize) < BATCH_BYTES {
            let Some(ev) = out.front() else { break };
            let mut buf = Vec::with_capacity(128);
            codec::write_event(&mut buf, &ev)?;
            if buf.len() > self.max {
                if taken.is_empty() {
                    return Err(Error::TooLarge {
                        transport: NAME,
                        size: buf.len(),
                        limit: self.max,
                    });
                }
                break;
            }
            size += buf.len() as u64;
            msg.push_back(Bytes::from(buf));
            match out.pop_by(NAME) {
                Some(env) => taken.push(env),
                None => break,
            }
        }
        if taken.is_empty() {
            return Ok(None);
        }
        Ok(Some((msg, size, taken)))
    }
}

#[async_trait]
impl Link for ZmqLink {
    fn try_send(&self, out: &mut dyn Outgoing) -> Result<()> {
        if out.len() != 1 {
            // Batches go the waiting way, packed into few messages.
            return Ok(());
        }
        let Some((msg, size, _)) = self.encode(out)? else {
            return Ok(());
        };
        match self.conn.try_send(msg, size) {
            Ok(TrySend::Sent) => {
                out.advance();
                Ok(())
            }
            Ok(TrySend::Busy) => Ok(()),
            Err(d) => Err(self.err(d)),
        }
    }

    async fn send(&self, out: &mut dyn Outgoing) -> Result<()> {
        while !out.is_empty() {
            if self.conn.is_dead() {
                return Err(self.err(self.conn.why()));
            }
            if out.len() == 1 {
                let Some((msg, size, _)) = self.encode(out)? else {
                    return Ok(());
                };
                self.conn.send(msg, size).await.map_err(|d| self.err(d))?;
                out.advance();
                continue;
            }
            let Some((msg, size, taken)) = self.encode_run(out)? else {
                return Ok(());
            };
            if let Err(d) = self.conn.send(msg, size).await {
                for env in taken.into_iter().rev() {
                    out.push_front(env);
                }
                return Err(self.err(d));
            }
        }
        Ok(())
    }

    fn is_open(&self) -> bool {
        !self.conn.is_dead()
            && !self.conn.was_nacked(&self.to)
            && self.shared.upgrade().is_some_and(|s| !s.is_closed())
    }
}

/// A link to a machine of this very process (a forced location, or `same_machine` with one
/// process): handed to its inbox.
pub(crate) struct LocalLink {
    pub(crate) inbox: Inbox,
}

#[async_trait]
impl Link for LocalLink {
    async fn send(&self, out: &mut dyn Outgoing) -> Result<()> {
        while let Some(env) = out.pop_by(NAME) {
            self.inbox.deliver(env).await?;
        }
        Ok(())
    }
    fn is_open(&self) -> bool {
        !self.inbox.is_closed()
    }
}
