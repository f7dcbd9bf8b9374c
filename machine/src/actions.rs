//! Events, the user's action and guard map, and what actions see and request.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use switchyard_core::{Envelope, Error, Location, MachineEntry, MachineId, Node, Payload};

use crate::error::ActionError;

/// Who sent an event, so an action can answer it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The sending machine.
    pub source: MachineId,
    /// Where a reply goes (set by `request`).
    pub reply_to: Option<MachineId>,
    /// The request's correlation id, if the event is a request.
    pub correlation_id: Option<u64>,
    /// The transport that carried the event (`"direct"`, `"memory"`, ..).
    pub transport: Option<&'static str>,
}

/// An event given to a machine: a name and typed data.
#[derive(Clone, Debug)]
pub struct Event {
    name: Arc<str>,
    data: Payload,
    origin: Option<Origin>,
}

impl Event {
    /// An event without data.
    pub fn new(name: impl Into<Arc<str>>) -> Event {
        Event {
            name: name.into(),
            data: Payload::Empty,
            origin: None,
        }
    }

    /// An event with data (any serde value).
    pub fn with_data<T: Serialize + Send + Sync + 'static>(
        name: impl Into<Arc<str>>,
        data: T,
    ) -> Event {
        Event {
            name: name.into(),
            data: Payload::new(data),
            origin: None,
        }
    }

    /// An event with an already wrapped payload.
    pub fn from_payload(name: impl Into<Arc<str>>, data: Payload) -> Event {
        Event {
            name: name.into(),
            data,
            origin: None,
        }
    }

    /// The event a Node delivered, keeping its sender for replies.
    pub fn from_envelope(env: Envelope) -> Event {
        // Field by field (the envelope may be boxed): every clone here is a reference count.
        Event {
            origin: Some(Origin {
                source: env.source.clone(),
                reply_to: env.headers.reply_to.clone(),
                correlation_id: env.headers.correlation_id,
                transport: env.carried_by,
            }),
            name: env.event.clone().into(),
            data: env.payload.clone(),
        }
    }

    /// Sets the origin.
    pub fn with_origin(mut self, origin: Origin) -> Event {
        self.origin = Some(origin);
        self
    }

    /// The event name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shared event name.
    pub fn name_arc(&self) -> &Arc<str> {
        &self.name
    }

    /// The raw payload.
    pub fn payload(&self) -> &Payload {
        &self.data
    }

    /// Reads the data as a `T`, whichever transport carried it.
    pub fn data<T: DeserializeOwned + Clone + 'static>(&self) -> switchyard_core::Result<T> {
        self.data.read_cloned()
    }

    /// Who sent it (`None` for events made locally: timers, `send_self`, the start event).
    pub fn origin(&self) -> Option<&Origin> {
        self.origin.as_ref()
    }
}

/// A payload requested by an action, kept typed until the Node sends it.
pub struct OutPayload(Box<dyn ErasedPayload>);

impl fmt::Debug for OutPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OutPayload({})", self.0.type_name())
    }
}

impl OutPayload {
    /// Wraps a value.
    pub fn new<P: Serialize + Send + Sync + 'static>(p: P) -> OutPayload {
        OutPayload(Box::new(Typed(p)))
    }
    /// The value as JSON (for inspection and tests).
    pub fn to_json(&self) -> Result<Value, ActionError> {
        self.0.to_json()
    }
    /// The value as a [`Payload`] (no copy, no encoding).
    pub fn into_payload(self) -> Payload {
        self.0.into_payload()
    }
}

type Fut<T> = BoxFuture<'static, switchyard_core::Result<T>>;

trait ErasedPayload: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn to_json(&self) -> Result<Value, ActionError>;
    fn into_payload(self: Box<Self>) -> Payload;
    fn publish(self: Box<Self>, node: Node, topic: Arc<str>, event: Arc<str>) -> Fut<usize>;
    fn send_any(self: Box<Self>, node: Node, ty: Arc<str>, event: Arc<str>) -> Fut<MachineId>;
    fn send_delayed(
        self: Box<Self>,
        node: Node,
        to: MachineId,
        event: Arc<str>,
        d: Duration,
    ) -> Fut<()>;
    fn request(
        self: Box<Self>,
        node: Node,
        to: MachineId,
        event: Arc<str>,
        t: Duration,
    ) -> Fut<Envelope>;
}

struct Typed<P>(P);

impl<P: Serialize + Send + Sync + 'static> ErasedPayload for Typed<P> {
    fn type_name(&self) -> &'static str {
        std::any::type_name::<P>()
    }
    fn to_json(&self) -> Result<Value, ActionError> {
        Ok(serde_json::to_value(&self.0)?)
    }
    fn into_payload(self: Box<Self>) -> Payload {
        Payload::new(self.0)
    }
    fn publish(self: Box<Self>, node: Node, topic: Arc<str>, event: Arc<str>) -> Fut<usize> {
        async move { node.publish(&topic, event, self.0).await }.boxed()
    }
    fn send_any(self: Box<Self>, node: Node, ty: Arc<str>, event: Arc<str>) -> Fut<MachineId> {
        async move { node.send_to_any_of_type(&ty, event, self.0).await }.boxed()
    }
    fn send_delayed(
        self: Box<Self>,
        node: Node,
        to: MachineId,
        event: Arc<str>,
        d: Duration,
    ) -> Fut<()> {
        async move { node.send_delayed(to, event, self.0, d).await.map(|_| ()) }.boxed()
    }
    fn request(
        self: Box<Self>,
        node: Node,
        to: MachineId,
        event: Arc<str>,
        t: Duration,
    ) -> Fut<Envelope> {
        async move { node.request(to, event, self.0, t).await }.boxed()
    }
}

impl OutPayload {
    pub(crate) fn publish(self, node: Node, topic: Arc<str>, event: Arc<str>) -> Fut<usize> {
        self.0.publish(node, topic, event)
    }
    pub(crate) fn send_any(self, node: Node, ty: Arc<str>, event: Arc<str>) -> Fut<MachineId> {
        self.0.send_any(node, ty, event)
    }
    pub(crate) fn send_delayed(
        self,
        node: Node,
        to: MachineId,
        event: Arc<str>,
        d: Duration,
    ) -> Fut<()> {
        self.0.send_delayed(node, to, event, d)
    }
    pub(crate) fn request(
        self,
        node: Node,
        to: MachineId,
        event: Arc<str>,
        t: Duration,
    ) -> Fut<Envelope> {
        self.0.request(node, to, event, t)
    }
}

/// A send requested by an action; the binding runs them in order after the transition.
#[derive(Debug)]
#[non_exhaustive]
pub enum Effect {
    /// `Node::send` to one machine.
    Send {
        /// Target id.
        to: MachineId,
        /// Event name.
        event: Arc<str>,
        /// Data.
        payload: OutPayload,
    },
    /// `Node::send_to_any_of_type`.
    SendToAnyOfType {
        /// The service type.
        machine_type: Arc<str>,
        /// Event name.
        event: Arc<str>,
        /// Data.
        payload: OutPayload,
    },
    /// `Node::publish` to a topic.
    Publish {
        /// The topic.
        topic: Arc<str>,
        /// Event name.
        event: Arc<str>,
        /// Data.
        payload: OutPayload,
    },
    /// An event to this machine, queued after the current one (never through a transport).
    SendSelf {
        /// Event name.
        event: Arc<str>,
        /// Data.
        payload: OutPayload,
    },
    /// `Node::send_delayed`.
    SendDelayed {
        /// Target id.
        to: MachineId,
        /// Event name.
        event: Arc<str>,
        /// Data.
        payload: OutPayload,
        /// Delay.
        delay: Duration,
    },
    /// `Node::request`, run in the background; the reply comes back as `done.request.<event>`,
    /// a failure or timeout as `error.request.<event>`.
    Request {
        /// Target id.
        to: MachineId,
        /// Event name.
        event: Arc<str>,
        /// Data.
        payload: OutPayload,
        /// How long to wait for the reply.
        timeout: Duration,
    },
    /// `Node::locate`, run in the background; the answer comes back as `done.locate.<target>`
    /// (data: [`crate::Located`]), a failure as `error.locate.<target>` (data: [`crate::SendFailure`]).
    Locate {
        /// The machine to locate.
        target: MachineId,
    },
    /// `Node::reply` to the current event's sender.
    Reply {
        /// Who asked.
        origin: Origin,
        /// Event name.
        event: Arc<str>,
        /// Data.
        payload: OutPayload,
    },
}

impl Effect {
    /// The event name of the send.
    pub fn event(&self) -> &str {
        match self {
            Effect::Send { event, .. }
            | Effect::SendToAnyOfType { event, .. }
            | Effect::Publish { event, .. }
            | Effect::SendSelf { event, .. }
            | Effect::SendDelayed { event, .. }
            | Effect::Request { event, .. }
            | Effect::Reply { event, .. } => event,
            Effect::Locate { .. } => "locate",
        }
    }
}

/// What an action sees: the machine id, the event, the machine's context, and the sends.
///
/// Sends are collected and go out after the transition completes, in the order they were requested.
pub struct ActionContext<'a> {
    pub(crate) machine_id: &'a Arc<str>,
    pub(crate) event: &'a Event,
    pub(crate) context: &'a mut Arc<Value>,
    /// Set when the action may have written the context (XState: an `assign` ran), so
    /// eventless transitions are selected again.
    pub(crate) context_written: &'a mut bool,
    pub(crate) params: Option<&'a Value>,
    pub(crate) effects: &'a mut Vec<Effect>,
    pub(crate) node: Option<&'a Node>,
}

impl<'a> ActionContext<'a> {
    /// The id of the machine running the action.
    pub fn machine_id(&self) -> &str {
        self.machine_id
    }
    /// The event being handled.
    pub fn event(&self) -> &Event {
        self.event
    }
    /// The event's name.
    pub fn event_name(&self) -> &str {
        self.event.name()
    }
    /// The event's data as a `T`.
    pub fn data<T: DeserializeOwned + Clone + 'static>(&self) -> Result<T, ActionError> {
        Ok(self.event.data()?)
    }
    /// The action's `params` from the JSON, if any.
    pub fn params(&self) -> Option<&Value> {
        self.params
    }
    /// The machine's context.
    pub fn context(&self) -> &Value {
        self.context
    }
    /// The machine's context, to update (copied on the first write of an event, for rollback).
    pub fn context_mut(&mut self) -> &mut Value {
        *self.context_written = true;
        Arc::make_mut(self.context)
    }
    /// Reads one context field as a `T`.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<T, ActionError> {
        let v = self
            .context
            .get(key)
            .ok_or_else(|| ActionError::new(format!("context has no field `{key}`")))?;
        Ok(T::deserialize(v)?)
    }
    /// Sets one context field (the context becomes an object if it was not one).
    pub fn set<T: Serialize>(&mut self, key: &str, value: T) -> Result<(), ActionError> {
        let v = serde_json::to_value(value)?;
        let ctx = self.context_mut();
        if !ctx.is_object() {
            *ctx = Value::Object(serde_json::Map::new());
        }
        if let Value::Object(m) = ctx {
            m.insert(key.to_owned(), v);
        }
        Ok(())
    }
    /// The whole context as a `T`.
    pub fn context_as<T: DeserializeOwned>(&self) -> Result<T, ActionError> {
        Ok(T::deserialize(&**self.context)?)
    }
    /// Replaces the whole context.
    pub fn set_context<T: Serialize>(&mut self, value: T) -> Result<(), ActionError> {
        *self.context = Arc::new(serde_json::to_value(value)?);
        *self.context_written = true;
        Ok(())
    }

    /// Sends an event to a machine by id.
    pub fn send<P: Serialize + Send + Sync + 'static>(
        &mut self,
        to: impl Into<MachineId>,
        event: impl Into<Arc<str>>,
        payload: P,
    ) {
        self.effects.push(Effect::Send {
            to: to.into(),
            event: event.into(),
            payload: OutPayload::new(payload),
        });
    }
    /// Sends to exactly one other machine of a type.
    pub fn send_to_any_of_type<P: Serialize + Send + Sync + 'static>(
        &mut self,
        machine_type: impl Into<Arc<str>>,
        event: impl Into<Arc<str>>,
        payload: P,
    ) {
        self.effects.push(Effect::SendToAnyOfType {
            machine_type: machine_type.into(),
            event: event.into(),
            payload: OutPayload::new(payload),
        });
    }
    /// Publishes to a topic.
    pub fn publish<P: Serialize + Send + Sync + 'static>(
        &mut self,
        topic: impl Into<Arc<str>>,
        event: impl Into<Arc<str>>,
        payload: P,
    ) {
        self.effects.push(Effect::Publish {
            topic: topic.into(),
            event: event.into(),
            payload: OutPayload::new(payload),
        });
    }
    /// Sends an event to this machine, handled after the current one.
    pub fn send_self<P: Serialize + Send + Sync + 'static>(
        &mut self,
        event: impl Into<Arc<str>>,
        payload: P,
    ) {
        self.effects.push(Effect::SendSelf {
            event: event.into(),
            payload: OutPayload::new(payload),
        });
    }
    /// Sends an event to a machine after a delay.
    pub fn send_delayed<P: Serialize + Send + Sync + 'static>(
        &mut self,
        to: impl Into<MachineId>,
        event: impl Into<Arc<str>>,
        payload: P,
        delay: Duration,
    ) {
        self.effects.push(Effect::SendDelayed {
            to: to.into(),
            event: event.into(),
            payload: OutPayload::new(payload),
            delay,
        });
    }
    /// Sends a request without blocking the machine: the reply arrives as the event
    /// `done.request.<event>` (its data is the reply's data), a failure or timeout as
    /// `error.request.<event>` (data: [`crate::SendFailure`]).
    pub fn request<P: Serialize + Send + Sync + 'static>(
        &mut self,
        to: impl Into<MachineId>,
        event: impl Into<Arc<str>>,
        payload: P,
        timeout: Duration,
    ) {
        self.effects.push(Effect::Request {
            to: to.into(),
            event: event.into(),
            payload: OutPayload::new(payload),
            timeout,
        });
    }
    /// Answers the current event: a request gets a correlated reply, a plain event an ordinary event
    /// back to its sender. Fails if the event has no sender (timers, `send_self`).
    pub fn reply<P: Serialize + Send + Sync + 'static>(
        &mut self,
        event: impl Into<Arc<str>>,
        payload: P,
    ) -> Result<(), ActionError> {
        let origin = self.event.origin().cloned().ok_or_else(|| {
            ActionError::new(format!(
                "event `{}` has no sender to reply to (it was made locally)",
                self.event.name()
            ))
        })?;
        self.effects.push(Effect::Reply {
            origin,
            event: event.into(),
            payload: OutPayload::new(payload),
        });
        Ok(())
    }

    /// Where a machine lives: its registry entry and its [`Location`] from this machine.
    ///
    /// Answered from the session's registry without waiting; a registry that needs I/O for the
    /// lookup (one shared by several processes, e.g. the ipc bus registry) gives a retryable
    /// `Error::Transport`: use [`ActionContext::request_location`] there. Without a Node (pure
    /// interpreter) it is `Error::NotSupported`.
    pub fn locate(&self, target: &str) -> Result<(MachineEntry, Location), Error> {
        let Some(node) = self.node else {
            return Err(Error::NotSupported {
                transport: "interpreter",
                capability: "locate (the machine is not bound to a Node)",
            });
        };
        let id = MachineId::from(target);
        node.locate(&id).now_or_never().unwrap_or_else(|| {
            Err(Error::Transport {
                transport: "registry",
                reason: "the lookup needs I/O and actions cannot wait: use `request_location`, whose answer arrives as `done.locate.<target>`".into(),
                retryable: true,
            })
        })
    }

    /// Locates a machine without blocking the machine, with any registry (also one that needs I/O):
    /// the answer arrives as the event `done.locate.<target>` (data: [`crate::Located`]), a failure
    /// (unknown target, registry unreachable) as `error.locate.<target>` (data: [`crate::SendFailure`]).
    ///
    /// Like a send, the lookup starts after the step, in order with the step's sends.
    pub fn request_location(&mut self, target: impl Into<MachineId>) {
        self.effects.push(Effect::Locate {
            target: target.into(),
        });
    }

    /// The Node the machine is bound to (`None` in the pure interpreter).
    pub fn node(&self) -> Option<&Node> {
        self.node
    }
}

/// What a guard sees: the machine id, the event and the context (read-only).
pub struct GuardContext<'a> {
    pub(crate) machine_id: &'a Arc<str>,
    pub(crate) event: &'a Event,
    pub(crate) context: &'a Value,
    pub(crate) params: Option<&'a Value>,
}

impl<'a> GuardContext<'a> {
    /// The id of the machine.
    pub fn machine_id(&self) -> &str {
        self.machine_id
    }
    /// The event being handled.
    pub fn event(&self) -> &Event {
        self.event
    }
    /// The event's name.
    pub fn event_name(&self) -> &str {
        self.event.name()
    }
    /// The event's data as a `T` (`None` if it is not one).
    pub fn data<T: DeserializeOwned + Clone + 'static>(&self) -> Option<T> {
        self.event.data().ok()
    }
    /// The guard's `params` from the JSON, if any.
    pub fn params(&self) -> Option<&Value> {
        self.params
    }
    /// The machine's context.
    pub fn context(&self) -> &Value {
        self.context
    }
    /// One context field as a `T` (`None` if absent or of another shape).
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.context.get(key).and_then(|v| T::deserialize(v).ok())
    }
}

/// An action closure.
pub type ActionFn = dyn Fn(&mut ActionContext<'_>) -> Result<(), ActionError> + Send + Sync;
/// A guard closure.
pub type GuardFn = dyn Fn(&GuardContext<'_>) -> bool + Send + Sync;

/// The user's map of named actions and guards; cheap to clone and share between machines.
#[derive(Clone, Default)]
pub struct Actions {
    pub(crate) actions: HashMap<Arc<str>, Arc<ActionFn>>,
    pub(crate) guards: HashMap<Arc<str>, Arc<GuardFn>>,
}

impl fmt::Debug for Actions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut a: Vec<_> = self.actions.keys().collect();
        let mut g: Vec<_> = self.guards.keys().collect();
        a.sort();
        g.sort();
        f.debug_struct("Actions")
            .field("actions", &a)
            .field("guards", &g)
            .finish()
    }
}

impl Actions {
    /// An empty map.
    pub fn new() -> Actions {
        Actions::default()
    }
    /// Adds (or replaces) an action.
    pub fn action<F>(mut self, name: &str, f: F) -> Actions
    where
        F: Fn(&mut ActionContext<'_>) -> Result<(), ActionError> + Send + Sync + 'static,
    {
        self.actions.insert(name.into(), Arc::new(f));
        self
    }
    /// Adds (or replaces) a guard.
    pub fn guard<F>(mut self, name: &str, f: F) -> Actions
    where
        F: Fn(&GuardContext<'_>) -> bool + Send + Sync + 'static,
    {
        self.guards.insert(name.into(), Arc::new(f));
        self
    }
    /// Adds every action and guard of `other` (replacing same names).
    pub fn merge(mut self, other: &Actions) -> Actions {
        self.actions
            .extend(other.actions.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.guards
            .extend(other.guards.iter().map(|(k, v)| (k.clone(), v.clone())));
        self
    }
}
