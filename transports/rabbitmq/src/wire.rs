//! The message body (the envelope map of docs/PROTOCOL.md §2, MessagePack) and the AMQP
//! properties and headers that travel beside it.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use switchyard_core::{Envelope, Headers, Result};

/// Header: host id of a topic publisher (subscribers on its own host are skipped).
pub(crate) const H_HOST: &str = "sy-host";
/// Header: process id of a topic publisher.
pub(crate) const H_PROC: &str = "sy-proc";
/// Header: nearest and farthest location (0..=3) the publish covers.
pub(crate) const H_REACH: &str = "sy-reach";

/// Decodes a body into an envelope carried by `rabbitmq`.
pub(crate) fn decode(body: &[u8]) -> Result<Envelope> {
    let mut env = Envelope::decode(body)?;
    env.carried_by = Some(crate::NAME);
    Ok(env)
}

/// The AMQP properties of an event: persistence, priority, expiry, correlation.
pub(crate) fn properties(
    headers: &Headers,
    durable: bool,
    max_priority: u8,
    reply_queue: Option<ShortString>,
) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_content_type(ShortString::from("application/msgpack"))
        .with_delivery_mode(if durable { 2 } else { 1 });
    if headers.priority > 0 && max_priority > 0 {
        p = p.with_priority(headers.priority.min(max_priority));
    }
    if let Some(at) = headers.expires_at_us {
        let now = switchyard_core::envelope::coarse_now_micros();
        let ms = at.saturating_sub(now) / 1000;
        p = p.with_expiration(ShortString::from(ms.to_string()));
    }
    if let Some(c) = headers.correlation_id {
        p = p.with_correlation_id(ShortString::from(c.to_string()));
    }
    if let Some(q) = reply_queue {
        p = p.with_reply_to(q);
    }
    p
}

/// Headers of a topic publish: who published it and which locations it covers.
pub(crate) fn publish_headers(host: &str, process: &str, nearest: u8, farthest: u8) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        ShortString::from(H_HOST),
        AMQPValue::LongString(LongString::from(host.as_bytes().to_vec())),
    );
    t.insert(
        ShortString::from(H_PROC),
        AMQPValue::LongString(LongString::from(process.as_bytes().to_vec())),
    );
    t.insert(
        ShortString::from(H_REACH),
        AMQPValue::ShortUInt(u16::from(nearest) << 8 | u16::from(farthest)),
    );
    t
}

/// Reads a string header.
pub(crate) fn header_str<'a>(props: &'a BasicProperties, key: &str) -> Option<&'a [u8]> {
    match props.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// Reads the reach header: (nearest, farthest).
pub(crate) fn header_reach(props: &BasicProperties) -> Option<(u8, u8)> {
    match props.headers().as_ref()?.inner().get(H_REACH)? {
        AMQPValue::ShortUInt(v) => Some(((v >> 8) as u8, (v & 0xff) as u8)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::{Address, Name, OutgoingRef, Payload};

    #[test]
    fn encoded_events_decode_as_envelopes() {
        let env = Envelope::new(
            7,
            "a".into(),
            Address::Machine("b".into()),
            Name::new("EV"),
            Payload::new((1u32, "x".to_string())),
        );
        let bytes = OutgoingRef::of(&env).encode(&mut Vec::new()).unwrap();
        assert_eq!(bytes, env.encode().unwrap(), "same bytes as the core codec");
        let back = decode(&bytes).unwrap();
        assert_eq!(back.data::<(u32, String)>().unwrap(), (1, "x".to_string()));
        assert_eq!(back.carried_by, Some(crate::NAME));
        assert!(decode(b"\xc1garbage").is_err());
    }

    #[test]
    fn reach_and_publisher_headers_round_trip() {
        let p = BasicProperties::default().with_headers(publish_headers("h", "p", 3, 3));
        assert_eq!(header_str(&p, H_HOST), Some(&b"h"[..]));
        assert_eq!(header_str(&p, H_PROC), Some(&b"p"[..]));
        assert_eq!(header_reach(&p), Some((3, 3)));
    }
}
