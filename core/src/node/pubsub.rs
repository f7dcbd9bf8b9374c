//! Topics and consumer groups, routed by location.
//!
//! The router gives each pub/sub transport the span of locations it covers
//! ([`crate::Router::pubsub`]): memory the publisher's own process, ipc the other
//! processes of the host, a broker the other hosts. A subscription is registered on
//! every one of them, and a publish goes to each with its span, so every subscriber
//! gets each publish exactly once, from the nearest transport that reaches it. Groups
//! belong to one transport ([`crate::Router::groups`]), so each message reaches exactly
//! one member however far apart the members are.

use std::sync::Arc;

use serde::Serialize;

use crate::address::Address;
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::name::Name;
use crate::node::inbox::Inbox;
use crate::node::sender::fresh_headers;
use crate::node::{Node, pubsub_of};
use crate::payload::Payload;
use crate::session::lock;
use crate::topic::{TopicPattern, validate_topic};
use crate::transport::{Filter, Reach, Subscription, SubscriptionId, Transport};

/// Options for [`Node::subscribe_with`].
#[derive(Clone, Default)]
pub struct SubscribeOptions {
    /// Consumer group: each message reaches one member of the group.
    pub group: Option<Arc<str>>,
    /// Content filter run before delivery.
    pub filter: Option<Filter>,
}

/// A live subscription; [`SubscriptionHandle::unsubscribe`] ends it (closing the machine does too).
pub struct SubscriptionHandle {
    node: Node,
    ids: Vec<(Arc<dyn Transport>, SubscriptionId)>,
}

impl SubscriptionHandle {
    /// Ends the subscription on every transport.
    pub async fn unsubscribe(self) -> Result<()> {
        {
            let mut subs = lock(&self.node.0.subscriptions);
            subs.retain(|(t, id)| {
                !self
                    .ids
                    .iter()
                    .any(|(t2, id2)| Arc::ptr_eq(t, t2) && id == id2)
            });
        }
        let mut first = None;
        for (t, id) in self.ids {
            if let Err(e) = pubsub_of(&t)?.unsubscribe(id).await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

fn no_topics() -> Error {
    Error::NotSupported {
        transport: "session",
        capability: "topics (no transport with pub/sub is enabled)",
    }
}

fn no_groups() -> Error {
    Error::NotSupported {
        transport: "session",
        capability: "groups (no transport with consumer groups is enabled)",
    }
}

impl Node {
    fn topic_plan(&self) -> Result<&[(Arc<dyn Transport>, Reach)]> {
        let plan = self.0.session.router.pubsub();
        if plan.is_empty() {
            return Err(no_topics());
        }
        Ok(plan)
    }

    fn topic_envelope(&self, topic: Arc<str>, event: Name, payload: Payload) -> Envelope {
        Envelope::with_headers(
            self.0.session.next_id(),
            self.id().clone(),
            Address::Topic(topic),
            event,
            payload,
            fresh_headers(),
        )
    }

    /// Publishes on every pub/sub transport with its span; returns how many machines got it.
    async fn publish_env(&self, env: Envelope, count: bool) -> Result<usize> {
        self.check_open()?;
        let mut n = 0;
        let mut first = None;
        let plan = self.topic_plan()?;
        let mut env = Some(env);
        for (i, (t, reach)) in plan.iter().enumerate() {
            let ps = pubsub_of(t)?;
            // The last transport gets the envelope itself: a transport that marks it as
            // carried by itself then copies nothing.
            let env = if i + 1 == plan.len() {
                env.take()
            } else {
                env.clone()
            };
            let Some(env) = env else { break };
            let r = if count {
                ps.publish(&self.0.entry, env, *reach).await
            } else {
                ps.emit(&self.0.entry, env, *reach).await.map(|()| 0)
            };
            match r {
                Ok(k) => n += k,
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    /// Publishes to a topic; returns how many machines got it (after their content
    /// filters; a machine whose subscriptions match twice counts, and receives, once).
    pub async fn publish<P: Serialize + Send + Sync + 'static>(
        &self,
        topic: &str,
        event: impl Into<Name>,
        payload: P,
    ) -> Result<usize> {
        validate_topic(topic)?;
        let env = self.topic_envelope(topic.into(), event.into(), Payload::new(payload));
        self.publish_env(env, true).await
    }

    /// Publishes to a topic without waiting to learn how many subscribers got it.
    ///
    /// Delivery, ordering and filters are those of [`Node::publish`]; only the count is
    /// not returned. For a stream of events this is the call to use: a transport that
    /// must ask another process for the count (ipc asks the bus daemon) then pipelines
    /// the publishes instead of waiting for each answer.
    pub async fn emit<P: Serialize + Send + Sync + 'static>(
        &self,
        topic: &str,
        event: impl Into<Name>,
        payload: P,
    ) -> Result<()> {
        validate_topic(topic)?;
        let env = self.topic_envelope(topic.into(), event.into(), Payload::new(payload));
        self.publish_env(env, false).await.map(drop)
    }

    /// Checks `topic` once and returns a publisher for it.
    pub fn publisher(&self, topic: &str) -> Result<Publisher> {
        validate_topic(topic)?;
        self.check_open()?;
        self.topic_plan()?;
        Ok(Publisher {
            node: self.clone(),
            topic: topic.into(),
        })
    }

    /// Sends to exactly one member of a consumer group; returns how many got it (0 or 1).
    pub async fn publish_to_group<P: Serialize + Send + Sync + 'static>(
        &self,
        group: &str,
        event: impl Into<Name>,
        payload: P,
    ) -> Result<usize> {
        self.check_open()?;
        let t = self.0.session.router.groups().ok_or_else(no_groups)?;
        let env = Envelope::with_headers(
            self.0.session.next_id(),
            self.id().clone(),
            Address::Group(group.into()),
            event.into(),
            Payload::new(payload),
            fresh_headers(),
        );
        pubsub_of(t)?.publish(&self.0.entry, env, Reach::ALL).await
    }

    /// Subscribes this machine to topics matching `pattern` (`*` one segment, `#` zero or more).
    pub async fn subscribe(&self, pattern: &str) -> Result<SubscriptionHandle> {
        self.subscribe_with(pattern, SubscribeOptions::default())
            .await
    }

    /// Subscribes with a consumer group and/or a content filter.
    pub async fn subscribe_with(
        &self,
        pattern: &str,
        opts: SubscribeOptions,
    ) -> Result<SubscriptionHandle> {
        let topic = TopicPattern::parse(pattern)?;
        self.add_subscription(Some(topic), opts).await
    }

    /// Joins a consumer group for [`Node::publish_to_group`].
    pub async fn join_group(&self, group: &str) -> Result<SubscriptionHandle> {
        if group.is_empty() {
            return Err(Error::InvalidName {
                name: String::new(),
                reason: "a group name must not be empty",
            });
        }
        self.add_subscription(
            None,
            SubscribeOptions {
                group: Some(group.into()),
                filter: None,
            },
        )
        .await
    }

    async fn add_subscription(
        &self,
        topic: Option<TopicPattern>,
        opts: SubscribeOptions,
    ) -> Result<SubscriptionHandle> {
        self.check_open()?;
        // Topic subscriptions go to every pub/sub transport (each covers its own span);
        // group memberships go to the one transport that owns groups.
        let chosen: Vec<Arc<dyn Transport>> = if opts.group.is_some() {
            vec![
                self.0
                    .session
                    .router
                    .groups()
                    .ok_or_else(no_groups)?
                    .clone(),
            ]
        } else {
            self.topic_plan()?.iter().map(|(t, _)| t.clone()).collect()
        };
        let mut ids = Vec::new();
        for t in &chosen {
            let sub = Subscription {
                topic: topic.clone(),
                group: opts.group.clone(),
                filter: opts.filter.clone(),
                inbox: Inbox(self.clone()),
            };
            match pubsub_of(t)?.subscribe(sub).await {
                Ok(id) => ids.push((t.clone(), id)),
                Err(e) => {
                    for (t, id) in ids {
                        if let Some(ps) = t.pubsub() {
                            let _ = ps.unsubscribe(id).await;
                        }
                    }
                    return Err(e);
                }
            }
        }
        lock(&self.0.subscriptions).extend(ids.iter().cloned());
        Ok(SubscriptionHandle {
            node: self.clone(),
            ids,
        })
    }
}

/// A declared publisher for one topic: the topic is checked once. Made by [`Node::publisher`].
#[derive(Clone)]
pub struct Publisher {
    node: Node,
    topic: Arc<str>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("from", self.node.id())
            .field("topic", &self.topic)
            .finish()
    }
}

impl Publisher {
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Publishes; see [`Node::publish`].
    pub async fn publish<P: Serialize + Send + Sync + 'static>(
        &self,
        event: impl Into<Name>,
        payload: P,
    ) -> Result<usize> {
        let env = self
            .node
            .topic_envelope(self.topic.clone(), event.into(), Payload::new(payload));
        self.node.publish_env(env, true).await
    }

    /// Publishes without the count; see [`Node::emit`].
    pub async fn emit<P: Serialize + Send + Sync + 'static>(
        &self,
        event: impl Into<Name>,
        payload: P,
    ) -> Result<()> {
        let env = self
            .node
            .topic_envelope(self.topic.clone(), event.into(), Payload::new(payload));
        self.node.publish_env(env, false).await.map(drop)
    }
}
