//! Request/reply: a request carries a correlation id and a reply-to; the reply carries
//! the id back and completes the pending request wherever it arrives, without queueing
//! behind the handler (see [`crate::Inbox::complete_reply`]).

use std::time::Duration;

use serde::Serialize;
use tokio::sync::oneshot;

use crate::address::MachineId;
use crate::envelope::{Envelope, EventRef};
use crate::error::{Error, Result};
use crate::name::Name;
use crate::node::Node;
use crate::node::sender::fresh_headers;
use crate::session::lock;

/// Where a reply goes and what it answers: taken from a received event.
#[derive(Clone, Debug)]
pub struct ReplyTo {
    to: MachineId,
    correlation_id: Option<u64>,
}

impl ReplyTo {
    /// A reply to machine `to` answering request `correlation_id` (`None`: a plain event).
    pub fn new(to: MachineId, correlation_id: Option<u64>) -> ReplyTo {
        ReplyTo { to, correlation_id }
    }
}

impl From<&Envelope> for ReplyTo {
    fn from(env: &Envelope) -> ReplyTo {
        ReplyTo {
            to: env
                .headers
                .reply_to
                .clone()
                .unwrap_or_else(|| env.source.clone()),
            correlation_id: env.headers.correlation_id,
        }
    }
}

impl From<&EventRef<'_>> for ReplyTo {
    fn from(ev: &EventRef<'_>) -> ReplyTo {
        ReplyTo {
            to: ev
                .headers
                .reply_to
                .clone()
                .unwrap_or_else(|| MachineId::from(ev.source)),
            correlation_id: ev.headers.correlation_id,
        }
    }
}

impl From<EventRef<'_>> for ReplyTo {
    fn from(ev: EventRef<'_>) -> ReplyTo {
        ReplyTo::from(&ev)
    }
}

impl Node {
    /// Registers a pending request; its reply will complete the receiver.
    pub(crate) fn pending_request(&self) -> (u64, oneshot::Receiver<Envelope>) {
        let cid = self.0.session.next_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.0.pending).insert(cid, tx);
        (cid, rx)
    }

    /// Waits for the reply to request `cid` (sent by `send`), all within `timeout`.
    pub(crate) async fn await_reply(
        &self,
        cid: u64,
        rx: oneshot::Receiver<Envelope>,
        send: impl Future<Output = Result<()>>,
        to: MachineId,
        timeout: Duration,
    ) -> Result<Envelope> {
        let exchange = async {
            send.await?;
            rx.await.map_err(|_| Error::SessionClosed)
        };
        let r = match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                target: to,
                timeout,
            }),
        };
        if r.is_err() {
            lock(&self.0.pending).remove(&cid);
        }
        r
    }

    /// Sends a request and waits for the reply (see [`Node::reply`]) or [`Error::Timeout`].
    ///
    /// The timeout covers the whole exchange, the send included. Options (priority, time
    /// to live) go through [`Node::message`]`(..).request(timeout)`.
    pub async fn request<P: Serialize + Send + Sync + 'static>(
        &self,
        to: impl Into<MachineId>,
        event: impl Into<Name>,
        payload: P,
        timeout: Duration,
    ) -> Result<Envelope> {
        self.message(to, event, payload).request(timeout).await
    }

    fn reply_parts(&self, request: ReplyTo) -> (MachineId, crate::envelope::Headers) {
        let mut headers = fresh_headers();
        headers.correlation_id = request.correlation_id;
        headers.is_reply = request.correlation_id.is_some();
        (request.to, headers)
    }

    /// Answers a request (an `&Envelope` or a borrowed `EventRef`); a plain event (no
    /// correlation id) gets an ordinary event back.
    pub async fn reply<P: Serialize + Send + Sync + 'static>(
        &self,
        request: impl Into<ReplyTo>,
        event: impl Into<Name>,
        payload: P,
    ) -> Result<()> {
        let (to, headers) = self.reply_parts(request.into());
        self.send_with(&to, event.into(), payload, headers).await
    }

    /// [`Node::reply`] without awaiting, for synchronous handlers (see [`Node::post`]).
    pub fn post_reply<P: Serialize + Send + Sync + 'static>(
        &self,
        request: impl Into<ReplyTo>,
        event: impl Into<Name>,
        payload: P,
    ) -> Result<()> {
        let (to, headers) = self.reply_parts(request.into());
        self.post_with(to, event.into(), payload, headers)
    }
}
