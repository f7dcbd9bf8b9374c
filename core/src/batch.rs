//! Events on their way to one machine (one or a batch), taken by links either as
//! envelopes or encoded in place.
//!
//! A send does not wrap its event in an [`Envelope`] up front: a link that writes
//! frames (ipc) encodes each event straight from the caller's value through
//! [`Outgoing::front`], and in-process links take envelopes built on demand with
//! [`Outgoing::pop`]. A single send is a batch of one ([`OneEvent`]).

use serde::Serialize;
use std::collections::VecDeque;

use crate::address::{Address, MachineId};
use crate::envelope::{Envelope, EnvelopeData, Headers};
use crate::letter::{Letter, LetterData, LetterPayload, LetterPool};
use crate::name::Name;
use crate::payload::{Payload, PayloadRef};

/// The next event of a batch, borrowed, with every envelope field a wire encoder needs.
#[derive(Clone, Copy, Debug)]
pub struct OutgoingRef<'a> {
    /// Unique per sending session.
    pub id: u64,
    /// The sending machine.
    pub source: &'a MachineId,
    /// Where it goes.
    pub target: &'a Address,
    /// The event name.
    pub event: &'a str,
    /// The data.
    pub payload: PayloadRef<'a>,
    /// Correlation, reply-to, timing, priority, expiry.
    pub headers: &'a Headers,
}

/// [`OutgoingRef`] as the envelope map of docs/PROTOCOL.md §2, borrowing every field.
#[derive(Serialize)]
struct WireRef<'a> {
    id: u64,
    source: &'a MachineId,
    target: &'a Address,
    event: &'a str,
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
    headers: &'a Headers,
}

impl<'a> OutgoingRef<'a> {
    /// Encodes the event as the envelope map [`Envelope::encode`] writes, without building
    /// an envelope; `scratch` holds the payload's bytes when they are not encoded yet.
    pub fn encode(&self, scratch: &mut Vec<u8>) -> crate::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(64 + self.event.len());
        self.encode_into(scratch, &mut out)?;
        Ok(out)
    }

    /// Appends the envelope map of [`OutgoingRef::encode`] to `out` (after a header, say).
    pub fn encode_into(&self, scratch: &mut Vec<u8>, out: &mut Vec<u8>) -> crate::Result<()> {
        let payload: &[u8] = match self.payload.as_msgpack() {
            Some(b) => b,
            None => {
                scratch.clear();
                self.payload.write_msgpack(scratch)?;
                scratch
            }
        };
        let wire = WireRef {
            id: self.id,
            source: self.source,
            target: self.target,
            event: self.event,
            payload,
            headers: self.headers,
        };
        rmp_serde::encode::write_named(out, &wire).map_err(|e| crate::Error::Encode(e.to_string()))
    }

    /// Borrows an envelope.
    pub fn of(env: &'a Envelope) -> OutgoingRef<'a> {
        OutgoingRef {
            id: env.id,
            source: &env.source,
            target: &env.target,
            event: &env.event,
            payload: env.payload.view(),
            headers: &env.headers,
        }
    }
}

/// Events on their way to one machine, in order; a transport takes them from the front.
///
/// Whatever a transport has not taken stays, so the caller can hand the rest to
/// another transport without losing or repeating any.
pub trait Outgoing: Send {
    /// How many events are left.
    fn len(&self) -> usize;
    /// Whether none are left.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The next event, borrowed, for a transport that encodes it; take it with [`Outgoing::advance`].
    fn front(&self) -> Option<OutgoingRef<'_>>;
    /// Drops the next event: the transport took it as [`Outgoing::front`] showed it.
    fn advance(&mut self);
    /// Takes the next event as an envelope.
    fn pop(&mut self) -> Option<Envelope>;
    /// Takes the next event as an envelope marked as carried by `carrier`
    /// ([`crate::EnvelopeData::carried_by`]); builders mark it as they build it, which saves
    /// the copy-on-write check of marking it afterwards.
    fn pop_by(&mut self, carrier: &'static str) -> Option<Envelope> {
        let mut env = self.pop()?;
        if env.carried_by != Some(carrier) {
            env.carried_by = Some(carrier);
        }
        Some(env)
    }
    /// Takes the next event for an in-process mailbox, marked as carried by `carrier`:
    /// builders hand over its fields with a small payload in place, in an allocation the
    /// mailbox reuses (`pool`, from [`crate::Mailbox::letters`]); the default takes it as an
    /// envelope.
    fn pop_letter(&mut self, carrier: &'static str, pool: &LetterPool) -> Option<Letter> {
        let _ = pool;
        self.pop_by(carrier).map(Letter::Envelope)
    }
    /// Puts back an envelope taken with [`Outgoing::pop`] that the transport could not take.
    fn push_front(&mut self, env: Envelope);
}

impl Outgoing for Option<Envelope> {
    fn len(&self) -> usize {
        usize::from(self.is_some())
    }
    fn front(&self) -> Option<OutgoingRef<'_>> {
        self.as_ref().map(OutgoingRef::of)
    }
    fn advance(&mut self) {
        *self = None;
    }
    fn pop(&mut self) -> Option<Envelope> {
        self.take()
    }
    fn push_front(&mut self, env: Envelope) {
        *self = Some(env);
    }
}

/// One event from a caller's value: what a single send hands its link.
///
/// Nothing is allocated until a link takes it as an envelope ([`Outgoing::pop`]);
/// a link that encodes in place takes it borrowed ([`Outgoing::front`]).
pub struct OneEvent<'a, P> {
    id: u64,
    source: &'a MachineId,
    target: &'a Address,
    event: Name,
    headers: Headers,
    state: OneState<P>,
}

enum OneState<P> {
    Value(P),
    Envelope(Envelope),
    Taken,
}

impl<'a, P: Serialize + Send + Sync + 'static> OneEvent<'a, P> {
    /// The event `id` from `source` to `target`.
    pub fn new(
        id: u64,
        source: &'a MachineId,
        target: &'a Address,
        event: Name,
        payload: P,
        headers: Headers,
    ) -> OneEvent<'a, P> {
        OneEvent {
            id,
            source,
            target,
            event,
            headers,
            state: OneState::Value(payload),
        }
    }
}

impl<P: Serialize + Send + Sync + 'static> OneEvent<'_, P> {
    fn take(&mut self, carrier: Option<&'static str>) -> Option<Envelope> {
        match std::mem::replace(&mut self.state, OneState::Taken) {
            OneState::Value(p) => Some(Envelope::from(EnvelopeData {
                id: self.id,
                source: self.source.clone(),
                target: self.target.clone(),
                event: self.event.clone(),
                payload: Payload::new(p),
                headers: self.headers.clone(),
                carried_by: carrier,
            })),
            OneState::Envelope(mut env) => {
                if carrier.is_some() && env.carried_by != carrier {
                    env.carried_by = carrier;
                }
                Some(env)
            }
            OneState::Taken => None,
        }
    }
}

impl<P: Serialize + Send + Sync + 'static> Outgoing for OneEvent<'_, P> {
    fn len(&self) -> usize {
        usize::from(!matches!(self.state, OneState::Taken))
    }
    fn front(&self) -> Option<OutgoingRef<'_>> {
        match &self.state {
            OneState::Value(p) => Some(OutgoingRef {
                id: self.id,
                source: self.source,
                target: self.target,
                event: &self.event,
                payload: PayloadRef::of(p),
                headers: &self.headers,
            }),
            OneState::Envelope(env) => Some(OutgoingRef::of(env)),
            OneState::Taken => None,
        }
    }
    fn advance(&mut self) {
        self.state = OneState::Taken;
    }
    fn pop(&mut self) -> Option<Envelope> {
        self.take(None)
    }
    fn pop_by(&mut self, carrier: &'static str) -> Option<Envelope> {
        self.take(Some(carrier))
    }
    fn pop_letter(&mut self, carrier: &'static str, pool: &LetterPool) -> Option<Letter> {
        match std::mem::replace(&mut self.state, OneState::Taken) {
            OneState::Value(p) => Some(Letter::Data(pool.boxed(LetterData {
                id: self.id,
                source: self.source.clone(),
                address: match self.target {
                    Address::Machine(_) => None,
                    other => Some(other.clone()),
                },
                event: self.event.clone(),
                payload: LetterPayload::of(p),
                headers: self.headers.clone(),
                carried_by: Some(carrier),
            }))),
            OneState::Envelope(env) => {
                self.state = OneState::Envelope(env);
                self.pop_by(carrier).map(Letter::Envelope)
            }
            OneState::Taken => None,
        }
    }
    fn push_front(&mut self, env: Envelope) {
        self.state = OneState::Envelope(env);
    }
}

impl Outgoing for VecDeque<Envelope> {
    fn len(&self) -> usize {
        VecDeque::len(self)
    }
    fn front(&self) -> Option<OutgoingRef<'_>> {
        VecDeque::front(self).map(OutgoingRef::of)
    }
    fn advance(&mut self) {
        self.pop_front();
    }
    fn pop(&mut self) -> Option<Envelope> {
        self.pop_front()
    }
    fn push_front(&mut self, env: Envelope) {
        VecDeque::push_front(self, env)
    }
}

/// The batch [`crate::Node::send_batch`] builds: the caller's values, with the fields they share
/// (source, target, send time) held once and ids reserved as one block.
pub(crate) struct ValueBatch<E, P> {
    source: MachineId,
    target: Address,
    headers: Headers,
    next_id: u64,
    items: VecDeque<(E, P)>,
    /// Envelopes a transport popped and gave back; they go first.
    returned: Vec<Envelope>,
}

impl<E: Into<Name> + AsRef<str> + Send, P: Serialize + Send + Sync + 'static> ValueBatch<E, P> {
    /// `items` numbered from `first_id`, all stamped `sent_at_us`.
    pub(crate) fn new(
        source: MachineId,
        target: Address,
        sent_at_us: u64,
        first_id: u64,
        items: VecDeque<(E, P)>,
    ) -> ValueBatch<E, P> {
        ValueBatch {
            source,
            target,
            headers: Headers {
                sent_at_us,
                ..Headers::default()
            },
            next_id: first_id,
            items,
            returned: Vec::new(),
        }
    }
}

impl<E: Into<Name> + AsRef<str> + Send, P: Serialize + Send + Sync + 'static> Outgoing
    for ValueBatch<E, P>
{
    fn len(&self) -> usize {
        self.items.len() + self.returned.len()
    }
    fn front(&self) -> Option<OutgoingRef<'_>> {
        if let Some(env) = self.returned.last() {
            return Some(OutgoingRef::of(env));
        }
        let (event, payload) = self.items.front()?;
        Some(OutgoingRef {
            id: self.next_id,
            source: &self.source,
            target: &self.target,
            event: event.as_ref(),
            payload: PayloadRef::of(payload),
            headers: &self.headers,
        })
    }
    fn advance(&mut self) {
        if self.returned.pop().is_none() && self.items.pop_front().is_some() {
            self.next_id += 1;
        }
    }
    fn pop(&mut self) -> Option<Envelope> {
        if let Some(env) = self.returned.pop() {
            return Some(env);
        }
        let (event, payload) = self.items.pop_front()?;
        let id = self.next_id;
        self.next_id += 1;
        Some(Envelope::with_headers(
            id,
            self.source.clone(),
            self.target.clone(),
            event.into(),
            Payload::new(payload),
            self.headers.clone(),
        ))
    }
    fn push_front(&mut self, env: Envelope) {
        self.returned.push(env);
    }
    fn pop_letter(&mut self, carrier: &'static str, pool: &LetterPool) -> Option<Letter> {
        if !self.returned.is_empty() {
            return self.pop_by(carrier).map(Letter::Envelope);
        }
        let (event, payload) = self.items.pop_front()?;
        let id = self.next_id;
        self.next_id += 1;
        Some(Letter::Data(pool.boxed(LetterData {
            id,
            source: self.source.clone(),
            address: None,
            event: event.into(),
            payload: LetterPayload::of(payload),
            headers: self.headers.clone(),
            carried_by: Some(carrier),
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> ValueBatch<&'static str, u32> {
        ValueBatch::new(
            "a".into(),
            Address::Machine("b".into()),
            77,
            100,
            [("X", 1u32), ("Y", 2), ("Z", 3)].into_iter().collect(),
        )
    }

    #[test]
    fn a_borrowed_event_encodes_as_its_envelope_does() {
        let mut b = batch();
        let mut scratch = Vec::new();
        let borrowed = b.front().unwrap().encode(&mut scratch).unwrap();
        let env = b.pop().unwrap();
        assert_eq!(
            borrowed,
            env.encode().unwrap(),
            "a payload encoded on the way"
        );
        let decoded = Envelope::decode(&borrowed).unwrap();
        let again = OutgoingRef::of(&decoded).encode(&mut scratch).unwrap();
        assert_eq!(again, borrowed, "a payload already encoded");
        let mut after = b"hdr".to_vec();
        OutgoingRef::of(&decoded)
            .encode_into(&mut scratch, &mut after)
            .unwrap();
        assert_eq!(&after[..3], b"hdr");
        assert_eq!(&after[3..], &borrowed[..]);
    }

    #[test]
    fn front_and_pop_agree_and_number_in_order() {
        let mut b = batch();
        let f = b.front().unwrap();
        assert_eq!((f.id, f.event, f.source.as_str()), (100, "X", "a"));
        assert_eq!(f.payload.read::<u32>().unwrap(), 1);
        assert_eq!(f.headers.sent_at_us, 77);
        b.advance();
        let e = b.pop().unwrap();
        assert_eq!((e.id, &*e.event, e.data::<u32>().unwrap()), (101, "Y", 2));
        assert_eq!(e.target, Address::Machine("b".into()));
        assert_eq!(e.headers.sent_at_us, 77);
        // A refused envelope goes back in front, unchanged, and is seen first.
        b.push_front(e);
        assert_eq!(b.len(), 2);
        assert_eq!(b.front().unwrap().id, 101);
        assert_eq!(b.pop().unwrap().id, 101);
        assert_eq!(b.front().unwrap().id, 102);
        b.advance();
        assert!(b.is_empty() && b.front().is_none() && b.pop().is_none());
    }

    #[test]
    fn unit_payload_is_empty() {
        let mut b = ValueBatch::new(
            "a".into(),
            Address::Machine("b".into()),
            0,
            0,
            [("X", ())].into_iter().collect(),
        );
        assert!(b.front().unwrap().payload.is_empty());
        assert!(b.pop().unwrap().payload.is_empty());
    }
}
