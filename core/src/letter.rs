//! Events on their way through a machine's mailbox without an allocation of their own.
//!
//! An in-process send used to allocate twice per event (the envelope and the payload),
//! and the receiving task freed both on another thread, which contends on the
//! allocator. A [`Letter`] carries the event's fields by value in the mailbox's slot,
//! and a small payload (up to [`INLINE_BYTES`]) inside it: nothing is allocated on the
//! sender's side. A borrowed handler reads it in place; an owned one gets an
//! [`Envelope`] built on the receiving task (allocated and freed on one thread).

use std::mem::{ManuallyDrop, MaybeUninit};
use std::sync::Arc;

use serde::Serialize;

use crate::address::{Address, MachineId};
use crate::envelope::{Envelope, EnvelopeData, EventRef, Headers};
use crate::name::Name;
use crate::payload::{LocalValue, Payload, PayloadRef};

/// Largest payload value kept inside a letter instead of behind an `Arc`.
pub const INLINE_BYTES: usize = 64;

#[repr(C, align(16))]
struct Slot([MaybeUninit<u8>; INLINE_BYTES]);

struct VTable {
    as_local: unsafe fn(*const u8) -> *const dyn LocalValue,
    drop: unsafe fn(*mut u8),
    into_arc: unsafe fn(*mut u8) -> Arc<dyn LocalValue>,
}

struct VTableOf<T>(std::marker::PhantomData<T>);

impl<T: LocalValue> VTableOf<T> {
    const VT: VTable = VTable {
        // SAFETY (all three): `p` points at a valid, initialised `T` written by
        // `InlineValue::new`; `drop` and `into_arc` are called at most once, by the owner.
        as_local: |p| p.cast::<T>() as *const dyn LocalValue,
        drop: |p| unsafe { std::ptr::drop_in_place(p.cast::<T>()) },
        into_arc: |p| unsafe { Arc::new(std::ptr::read(p.cast::<T>())) as Arc<dyn LocalValue> },
    };
}

/// A small value stored in place, with what it takes to lend, drop or move it.
pub struct InlineValue {
    slot: Slot,
    vt: &'static VTable,
}

// SAFETY: an `InlineValue` only ever holds a `T: LocalValue`, which is `Send + Sync`.
unsafe impl Send for InlineValue {}
// SAFETY: as above; shared access only lends `&T`.
unsafe impl Sync for InlineValue {}

impl InlineValue {
    /// Stores `value` in place, or gives it back when it is too large or too aligned.
    pub fn new<T: LocalValue>(value: T) -> Result<InlineValue, T> {
        if size_of::<T>() > INLINE_BYTES || align_of::<T>() > align_of::<Slot>() {
            return Err(value);
        }
        let mut slot = Slot([MaybeUninit::uninit(); INLINE_BYTES]);
        // SAFETY: the slot is large and aligned enough for a `T` (checked above).
        unsafe { std::ptr::write(slot.0.as_mut_ptr().cast::<T>(), value) };
        Ok(InlineValue {
            slot,
            vt: &VTableOf::<T>::VT,
        })
    }

    /// Lends the value.
    pub fn get(&self) -> &dyn LocalValue {
        // SAFETY: the slot holds the value `vt` was made for, alive while `self` is.
        unsafe { &*(self.vt.as_local)(self.slot.0.as_ptr().cast()) }
    }

    /// Moves the value behind an `Arc`.
    pub fn into_arc(self) -> Arc<dyn LocalValue> {
        let mut me = ManuallyDrop::new(self);
        // SAFETY: the value is moved out once and `me` is never dropped.
        unsafe { (me.vt.into_arc)(me.slot.0.as_mut_ptr().cast()) }
    }
}

impl Drop for InlineValue {
    fn drop(&mut self) {
        // SAFETY: the value is still in place (`into_arc` forgets `self`).
        unsafe { (self.vt.drop)(self.slot.0.as_mut_ptr().cast()) }
    }
}

/// A letter's payload.
pub enum LetterPayload {
    /// A payload as envelopes carry it.
    Payload(Payload),
    /// A small value in place.
    Inline(InlineValue),
}

impl LetterPayload {
    /// Keeps `value` in place when it is small, behind an `Arc` otherwise.
    pub fn of<T: Serialize + Send + Sync + 'static>(value: T) -> LetterPayload {
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<()>()
            || std::any::TypeId::of::<T>() == std::any::TypeId::of::<Payload>()
        {
            return LetterPayload::Payload(Payload::new(value));
        }
        match InlineValue::new(value) {
            Ok(v) => LetterPayload::Inline(v),
            Err(value) => LetterPayload::Payload(Payload::new(value)),
        }
    }

    fn view(&self) -> PayloadRef<'_> {
        match self {
            LetterPayload::Payload(p) => p.view(),
            LetterPayload::Inline(v) => PayloadRef::Value(v.get()),
        }
    }

    fn into_payload(self) -> Payload {
        match self {
            LetterPayload::Payload(p) => p,
            LetterPayload::Inline(v) => Payload::Value(v.into_arc()),
        }
    }
}

/// The fields of an event in a mailbox slot; see the module docs.
pub struct LetterData {
    /// Unique per sending session.
    pub id: u64,
    /// The sending machine.
    pub source: MachineId,
    /// The address it was sent to when that is not the receiving machine itself.
    pub address: Option<Address>,
    /// The event name.
    pub event: Name,
    /// The data.
    pub payload: LetterPayload,
    /// Correlation, reply-to, timing, priority, expiry.
    pub headers: Headers,
    /// The transport that carried it.
    pub carried_by: Option<&'static str>,
}

/// Told when a tracked letter's handler has run; see [`crate::Inbox::deliver_tracked`].
pub struct Done(pub(crate) tokio::sync::oneshot::Sender<()>);

/// An event on its way into a mailbox: an envelope, or the fields of one in a box the
/// mailbox reuses.
pub enum Letter {
    /// An envelope (shared, e.g. one publish to many subscribers).
    Envelope(Envelope),
    /// The fields, with a small payload in place, in a reused allocation.
    Data(Box<LetterData>),
    /// An envelope whose sender wants to know when its handler has run.
    Tracked(Envelope, Done),
}

impl From<Envelope> for Letter {
    fn from(env: Envelope) -> Letter {
        Letter::Envelope(env)
    }
}

impl LetterData {
    /// Lends it as a borrowed event.
    pub fn as_event(&self) -> EventRef<'_> {
        EventRef {
            id: self.id,
            source: self.source.as_str(),
            event: &self.event,
            payload: self.payload.view(),
            headers: &self.headers,
            carried_by: self.carried_by,
        }
    }

    /// An envelope addressed to `me` unless the letter says otherwise.
    pub fn into_envelope(self, me: &MachineId) -> Envelope {
        Envelope::from(EnvelopeData {
            id: self.id,
            source: self.source,
            target: self.address.unwrap_or_else(|| Address::Machine(me.clone())),
            event: self.event,
            payload: self.payload.into_payload(),
            headers: self.headers,
            carried_by: self.carried_by,
        })
    }
}

impl Letter {
    /// The headers.
    pub fn headers(&self) -> &Headers {
        match self {
            Letter::Envelope(e) | Letter::Tracked(e, _) => &e.headers,
            Letter::Data(d) => &d.headers,
        }
    }

    /// An envelope addressed to `me` unless the letter says otherwise.
    pub fn into_envelope(self, me: &MachineId) -> Envelope {
        match self {
            Letter::Envelope(e) | Letter::Tracked(e, _) => e,
            Letter::Data(d) => (*d).into_envelope(me),
        }
    }
}

/// Allocations of letters kept for reuse by one mailbox: its senders take them, its task
/// gives them back, so a steady stream allocates nothing. Holds at most the mailbox's
/// capacity of idle allocations.
pub struct LetterPool {
    free: crossbeam_queue::ArrayQueue<Box<MaybeUninit<LetterData>>>,
}

impl LetterPool {
    pub(crate) fn new(size: usize) -> LetterPool {
        LetterPool {
            free: crossbeam_queue::ArrayQueue::new(size.max(1)),
        }
    }

    /// Boxes `data`, in a reused allocation when there is one.
    #[inline]
    pub fn boxed(&self, data: LetterData) -> Box<LetterData> {
        match self.free.pop() {
            Some(b) => Box::write(b, data),
            None => Box::new(data),
        }
    }

    /// Takes the fields out and keeps the allocation for a later letter.
    pub(crate) fn take(&self, b: Box<LetterData>) -> LetterData {
        let raw = Box::into_raw(b);
        // SAFETY: `raw` is a valid, initialised `LetterData` from `Box::into_raw`; it is read
        // once and the allocation is then owned as uninitialised memory of the same layout.
        let data = unsafe { std::ptr::read(raw) };
        let empty = unsafe { Box::from_raw(raw.cast::<MaybeUninit<LetterData>>()) };
        let _ = self.free.push(empty);
        data
    }

    /// Drops the fields in place and keeps the allocation for a later letter.
    pub(crate) fn recycle(&self, b: Box<LetterData>) {
        let raw = Box::into_raw(b);
        // SAFETY: as in `take`; the fields are dropped once, in place.
        unsafe { std::ptr::drop_in_place(raw) };
        let empty = unsafe { Box::from_raw(raw.cast::<MaybeUninit<LetterData>>()) };
        let _ = self.free.push(empty);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Serialize)]
    struct Counted(#[serde(skip)] Arc<AtomicUsize>, u64);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn small_values_stay_in_place_and_drop_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let v = InlineValue::new(Counted(drops.clone(), 7))
            .ok()
            .expect("fits");
        assert_eq!(v.get().as_any().downcast_ref::<Counted>().unwrap().1, 7);
        drop(v);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        let v = InlineValue::new(Counted(drops.clone(), 8))
            .ok()
            .expect("fits");
        let arc = v.into_arc();
        assert_eq!(drops.load(Ordering::SeqCst), 1, "moved, not dropped");
        assert_eq!(arc.as_any().downcast_ref::<Counted>().unwrap().1, 8);
        drop(arc);
        assert_eq!(drops.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn large_or_overaligned_values_go_behind_an_arc() {
        assert!(
            InlineValue::new([0u64; INLINE_BYTES / 8 + 1].to_vec()).is_ok(),
            "a Vec is small: its bytes are elsewhere"
        );
        assert!(InlineValue::new(([0u64; 8], 1u8)).is_err());
        #[derive(Serialize)]
        #[repr(align(64))]
        struct Aligned(u8);
        assert!(InlineValue::new(Aligned(1)).is_err());
        assert!(matches!(
            LetterPayload::of(([0u64; 8], [0u64; 8])),
            LetterPayload::Payload(Payload::Value(_))
        ));
        assert!(matches!(LetterPayload::of(5u32), LetterPayload::Inline(_)));
        assert!(matches!(
            LetterPayload::of(()),
            LetterPayload::Payload(Payload::Empty)
        ));
    }

    #[test]
    fn a_letter_reads_and_converts_like_its_envelope() {
        let pool = LetterPool::new(2);
        let l = pool.boxed(LetterData {
            id: 3,
            source: "a".into(),
            address: None,
            event: "E".into(),
            payload: LetterPayload::of(41u32),
            headers: Headers::default(),
            carried_by: Some("memory"),
        });
        let ev = l.as_event();
        assert_eq!((ev.id, ev.source, ev.event), (3, "a", "E"));
        assert_eq!(ev.data::<u32>().unwrap(), 41);
        let l = pool.take(l);
        assert_eq!(pool.free.len(), 1, "the allocation is kept");
        let again = pool.boxed(LetterData {
            id: 4,
            source: "a".into(),
            address: None,
            event: "F".into(),
            payload: LetterPayload::of(String::from("x")),
            headers: Headers::default(),
            carried_by: None,
        });
        assert_eq!(pool.free.len(), 0, "reused");
        pool.recycle(again);
        assert_eq!(pool.free.len(), 1);
        let env = l.into_envelope(&"b".into());
        assert_eq!(env.target, Address::Machine("b".into()));
        assert_eq!(env.payload.get_ref::<u32>(), Some(&41));
        assert_eq!(env.carried_by, Some("memory"));
    }
}
