//! Topics and consumer groups ([`PubSub`]): the session queue and the group queues.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use lapin::types::FieldTable;
use switchyard_core::{
    Address, Envelope, Error, MachineEntry, PubSub, Reach, Result, Subscription, SubscriptionId,
};

use crate::{GroupSub, NAME, RabbitTransport, TopicSub, lock, names, wire};

#[async_trait]
impl PubSub for RabbitTransport {
    async fn publish(&self, from: &MachineEntry, env: Envelope, reach: Reach) -> Result<usize> {
        let sh = &self.shared;
        let body = env.encode()?;
        if body.len() > sh.cfg.max_message {
            return Err(Error::TooLarge {
                transport: NAME,
                size: body.len(),
                limit: sh.cfg.max_message,
            });
        }
        let (exchange, key, headers) = match &env.target {
            Address::Topic(t) => (
                &sh.names.topics,
                names::topic_key(t)?,
                Some(wire::publish_headers(
                    &from.host_id,
                    &from.process_id,
                    reach.nearest as u8,
                    reach.farthest as u8,
                )),
            ),
            Address::Group(g) => (
                &sh.names.groups,
                names::short(g.to_string(), "group")?,
                None,
            ),
            other => {
                return Err(Error::InvalidPattern {
                    pattern: other.to_string(),
                    reason: "publish takes a topic or a group address",
                });
            }
        };
        let mut props = wire::properties(&env.headers, sh.durable(), sh.cfg.max_priority, None);
        if let Some(h) = headers {
            props = props.with_headers(h);
        }
        let routed = sh.publish_confirmed(exchange, key, &body, props).await?;
        Ok(usize::from(routed))
    }

    async fn subscribe(&self, sub: Subscription) -> Result<SubscriptionId> {
        let sh = &self.shared;
        let id = SubscriptionId(sh.next_sub.fetch_add(1, Ordering::Relaxed));
        let deadline = sh.deadline();
        if let Some(group) = sub.group.clone() {
            sh.names.group_queue(&group)?;
            let live = sh.wait_live(deadline).await?;
            let _topo = sh.topo.lock().await;
            let ch = sh
                .start_group(
                    &live,
                    &group,
                    sub.topic.as_ref(),
                    sub.filter.clone(),
                    sub.inbox.clone(),
                )
                .await?;
            lock(&sh.subs).groups.insert(
                id,
                GroupSub {
                    group,
                    topic: sub.topic,
                    filter: sub.filter,
                    inbox: sub.inbox,
                    channel: Some(ch),
                },
            );
            return Ok(id);
        }
        let Some(pattern) = sub.topic else {
            return Err(Error::InvalidPattern {
                pattern: String::new(),
                reason: "a subscription needs a topic pattern or a group",
            });
        };
        let key = names::binding_key(&pattern)?.to_string();
        let live = sh.wait_live(deadline).await?;
        let _topo = sh.topo.lock().await;
        let ch = sh.session_channel(&live).await?;
        let first = !lock(&sh.subs).keys.contains_key(&key);
        if first {
            sh.bind_key(&ch, &key).await?;
        }
        let mut subs = lock(&sh.subs);
        *subs.keys.entry(key).or_insert(0) += 1;
        subs.topics.insert(
            id,
            Arc::new(TopicSub {
                pattern,
                filter: sub.filter,
                inbox: sub.inbox,
            }),
        );
        Ok(id)
    }

    async fn unsubscribe(&self, id: SubscriptionId) -> Result<()> {
        let sh = &self.shared;
        let _topo = sh.topo.lock().await;
        let group = lock(&sh.subs).groups.remove(&id);
        if let Some(g) = group {
            if let Some((_, ch)) = g.channel {
                let _ = ch.close(200, "left the group".into()).await;
            }
            return Ok(());
        }
        let (unbind, ch) = {
            let mut subs = lock(&sh.subs);
            let Some(s) = subs.topics.remove(&id) else {
                return Ok(());
            };
            let key = s.pattern.as_str().to_string();
            let last = match subs.keys.get_mut(&key) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    subs.keys.remove(&key);
                    true
                }
                None => false,
            };
            (
                last.then_some(key),
                subs.channel.as_ref().map(|(_, c)| c.clone()),
            )
        };
        if let (Some(key), Some(ch)) = (unbind, ch)
            && ch.status().connected()
        {
            let _ = ch
                .queue_unbind(
                    sh.names.session_queue(&sh.tag)?,
                    sh.names.topics.clone(),
                    names::short(key, "topic")?,
                    FieldTable::default(),
                )
                .await;
        }
        Ok(())
    }
}
