//! What travels through Redis: the envelope map of docs/PROTOCOL.md §2 (MessagePack) as
//! the `e` field of a stream entry, and, on a topic channel, a small publisher header
//! followed by that envelope map.

use serde::{Deserialize, Serialize};
use switchyard_core::{Envelope, Error, Result};

/// Version of the topic message header; a subscriber skips other versions.
pub(crate) const TOPIC_FORMAT: u8 = 1;

/// The header bytes of a topic message: the MessagePack array of 5 that precedes the envelope.
pub(crate) fn topic_header(header: &TopicHeader) -> Result<Vec<u8>> {
    rmp_serde::to_vec(header).map_err(|e| Error::Encode(e.to_string()))
}

/// Decodes an envelope map into an envelope carried by `redis`.
pub(crate) fn decode(body: &[u8]) -> Result<Envelope> {
    let mut env = Envelope::decode(body)?;
    env.carried_by = Some(crate::NAME);
    Ok(env)
}

/// Who published a topic message and which locations it covers.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TopicHeader {
    /// [`TOPIC_FORMAT`].
    pub format: u8,
    /// Host id of the publisher.
    pub host: String,
    /// Process id of the publisher.
    pub process: String,
    /// Nearest location covered (0 same thread .. 3 remote).
    pub nearest: u8,
    /// Farthest location covered.
    pub farthest: u8,
}

/// A topic message: the header as a MessagePack array of 5, then the envelope map.
#[cfg(test)]
pub(crate) fn topic_message(header: &TopicHeader, envelope: &[u8]) -> Result<Vec<u8>> {
    let mut out = rmp_serde::to_vec(header).map_err(|e| Error::Encode(e.to_string()))?;
    out.extend_from_slice(envelope);
    Ok(out)
}

/// Splits a topic message into its header and envelope.
pub(crate) fn split_topic_message(msg: &[u8]) -> Result<(TopicHeader, Envelope)> {
    let mut cursor = std::io::Cursor::new(msg);
    let header: TopicHeader = {
        let mut de = rmp_serde::Deserializer::new(&mut cursor);
        TopicHeader::deserialize(&mut de).map_err(|e| Error::Decode(e.to_string()))?
    };
    if header.format != TOPIC_FORMAT {
        return Err(Error::Decode(format!(
            "topic message format {} (this build reads {TOPIC_FORMAT})",
            header.format
        )));
    }
    let at = usize::try_from(cursor.position())
        .map_err(|_| Error::Decode("topic message header too long".into()))?;
    let env = decode(msg.get(at..).unwrap_or_default())?;
    Ok((header, env))
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::{Address, Name, OutgoingRef, Payload};

    fn env() -> Envelope {
        Envelope::new(
            7,
            "a".into(),
            Address::Topic("x.y".into()),
            Name::new("EV"),
            Payload::new((1u32, "x".to_string())),
        )
    }

    #[test]
    fn encoded_events_decode_as_envelopes() {
        let env = env();
        let bytes = OutgoingRef::of(&env).encode(&mut Vec::new()).unwrap();
        assert_eq!(bytes, env.encode().unwrap(), "same bytes as the core codec");
        let back = decode(&bytes).unwrap();
        assert_eq!(back.data::<(u32, String)>().unwrap(), (1, "x".to_string()));
        assert_eq!(back.carried_by, Some(crate::NAME));
        assert!(decode(b"\xc1garbage").is_err());
    }

    #[test]
    fn topic_messages_round_trip() {
        let env0 = env();
        let mut built = topic_header(&TopicHeader {
            format: TOPIC_FORMAT,
            host: "h".into(),
            process: "p".into(),
            nearest: 3,
            farthest: 3,
        })
        .unwrap();
        OutgoingRef::of(&env0)
            .encode_into(&mut Vec::new(), &mut built)
            .unwrap();
        let (_, e) = split_topic_message(&built).unwrap();
        assert_eq!(e.name(), "EV");
        let h = TopicHeader {
            format: TOPIC_FORMAT,
            host: "h".into(),
            process: "p".into(),
            nearest: 3,
            farthest: 3,
        };
        let msg = topic_message(&h, &env().encode().unwrap()).unwrap();
        let (h2, e) = split_topic_message(&msg).unwrap();
        assert_eq!(h2, h);
        assert_eq!(e.name(), "EV");
        assert!(split_topic_message(b"not msgpack at all").is_err());
        assert!(split_topic_message(&msg[..msg.len() - 3]).is_err());
        let mut other = h;
        other.format = 9;
        let msg = topic_message(&other, &env().encode().unwrap()).unwrap();
        assert!(split_topic_message(&msg).is_err());
    }
}
