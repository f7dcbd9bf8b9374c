//! Reads an envelope frame in place: the shape [`crate::codec::write_event`] writes (the
//! keys in that order, a machine target), with no allocation. Anything else is `None`, and
//! the serde decoder decides whether the bytes are an envelope at all.

use std::ops::Range;

use switchyard_core::Headers;

/// An envelope to a machine or a topic, borrowed from its frame.
pub(crate) struct Plain<'a> {
    pub(crate) id: u64,
    pub(crate) source: &'a str,
    /// The machine id or the topic.
    pub(crate) to: &'a str,
    /// Whether the target is a topic (else a machine).
    pub(crate) topic: bool,
    pub(crate) event: &'a str,
    /// Where the payload's MessagePack bytes lie in the frame.
    pub(crate) payload: Range<usize>,
    pub(crate) headers: Headers,
}

struct Rd<'a> {
    all: &'a [u8],
    at: usize,
}

impl<'a> Rd<'a> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.all.get(self.at)?;
        self.at += 1;
        Some(b)
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.all.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn lit(&mut self, l: &[u8]) -> Option<()> {
        (self.take(l.len())? == l).then_some(())
    }
    fn be(&mut self, n: usize) -> Option<u64> {
        Some(
            self.take(n)?
                .iter()
                .fold(0u64, |v, b| (v << 8) | u64::from(*b)),
        )
    }
    fn uint(&mut self) -> Option<u64> {
        match self.byte()? {
            b @ 0x00..=0x7f => Some(u64::from(b)),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            _ => None,
        }
    }
    fn str_len(&mut self) -> Option<usize> {
        match self.byte()? {
            b @ 0xa0..=0xbf => Some(usize::from(b & 0x1f)),
            0xd9 => self.be(1).map(|n| n as usize),
            0xda => self.be(2).map(|n| n as usize),
            0xdb => self.be(4).map(|n| n as usize),
            _ => None,
        }
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = self.str_len()?;
        std::str::from_utf8(self.take(n)?).ok()
    }
    fn bin(&mut self) -> Option<Range<usize>> {
        let n = match self.byte()? {
            0xc4 => self.be(1)?,
            0xc5 => self.be(2)?,
            0xc6 => self.be(4)?,
            _ => return None,
        } as usize;
        let start = self.at;
        self.take(n)?;
        Some(start..self.at)
    }
}

/// Reads an envelope to a machine or a topic; `None` for any other shape.
pub(crate) fn read(frame: &[u8]) -> Option<Plain<'_>> {
    let mut r = Rd { all: frame, at: 0 };
    r.lit(b"\x86\xa2id")?;
    let id = r.uint()?;
    r.lit(b"\xa6source")?;
    let source = r.str()?;
    r.lit(b"\xa6target\x81")?;
    let topic = match r.str()? {
        "Machine" => false,
        "Topic" => true,
        _ => return None,
    };
    let to = r.str()?;
    r.lit(b"\xa5event")?;
    let event = r.str()?;
    r.lit(b"\xa7payload")?;
    let payload = r.bin()?;
    r.lit(b"\xa7headers")?;
    let n = match r.byte()? {
        b @ 0x80..=0x8f => b & 0x0f,
        _ => return None,
    };
    let mut headers = Headers::default();
    for _ in 0..n {
        match r.str()? {
            "correlation_id" => headers.correlation_id = Some(r.uint()?),
            "reply_to" => headers.reply_to = Some(r.str()?.into()),
            "is_reply" => {
                headers.is_reply = match r.byte()? {
                    0xc3 => true,
                    0xc2 => false,
                    _ => return None,
                }
            }
            "sent_at_us" => headers.sent_at_us = r.uint()?,
            "priority" => headers.priority = u8::try_from(r.uint()?).ok()?,
            "expires_at_us" => headers.expires_at_us = Some(r.uint()?),
            _ => return None,
        }
    }
    (r.at == frame.len()).then_some(Plain {
        id,
        source,
        to,
        topic,
        event,
        payload,
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::write_envelope;
    use switchyard_core::{Address, Envelope, Payload};

    #[test]
    fn reads_what_the_writer_writes_and_refuses_other_shapes() {
        for (i, payload) in [vec![], vec![7u32; 40], vec![1u32; 20_000]]
            .into_iter()
            .enumerate()
        {
            let mut e = Envelope::new(
                1 << (i * 20),
                "ünï-source".into(),
                Address::Machine("b".into()),
                "EV".into(),
                Payload::new(payload),
            );
            if i == 1 {
                e.headers.correlation_id = Some(1 << 40);
                e.headers.reply_to = Some("me".into());
                e.headers.is_reply = true;
                e.headers.priority = 7;
                e.headers.expires_at_us = Some(u64::MAX);
            }
            let mut b = Vec::new();
            write_envelope(&mut b, &e).unwrap();
            let p = read(&b).expect("the writer's shape");
            assert_eq!(
                (p.id, p.source, p.to, p.event),
                (e.id, "ünï-source", "b", "EV")
            );
            assert!(!p.topic);
            assert_eq!(p.headers, e.headers);
            assert_eq!(&b[p.payload.clone()], &e.payload.to_msgpack().unwrap()[..]);
            // Truncated anywhere: refused, never a panic.
            for cut in 0..b.len() {
                assert!(read(&b[..cut]).is_none(), "cut at {cut}");
            }
        }
        let mut topic = Vec::new();
        let e = Envelope::new(
            1,
            "a".into(),
            Address::Topic("t.x".into()),
            "E".into(),
            Payload::new(()),
        );
        write_envelope(&mut topic, &e).unwrap();
        let p = read(&topic).expect("a topic target");
        assert!(p.topic && p.to == "t.x");
        let mut group = Vec::new();
        let e = Envelope::new(
            1,
            "a".into(),
            Address::Group("g".into()),
            "E".into(),
            Payload::new(()),
        );
        write_envelope(&mut group, &e).unwrap();
        assert!(read(&group).is_none(), "groups take the serde path");
    }
}

/// Reads the meta map of a topic message (see [`crate::codec::Meta`]) in place; `None` for
/// any shape but the one [`write_meta`] writes.
pub(crate) fn read_meta(b: &[u8]) -> Option<crate::codec::Meta> {
    let mut r = Rd { all: b, at: 0 };
    let n = match r.byte()? {
        x @ 0x80..=0x8f => x & 0x0f,
        _ => return None,
    };
    let (mut process, mut host, mut count, mut near, mut far) = (None, None, None, None, None);
    for _ in 0..n {
        match r.str()? {
            "process" => process = Some(r.str()?.to_string()),
            "host" => host = Some(r.str()?.to_string()),
            "count" => count = Some(r.uint()?),
            "near" => near = Some(u8::try_from(r.uint()?).ok()?),
            "far" => far = Some(u8::try_from(r.uint()?).ok()?),
            _ => return None,
        }
    }
    (r.at == b.len()).then_some(())?;
    Some(crate::codec::Meta {
        process: process?,
        host: host?,
        count,
        near: near?,
        far: far?,
    })
}

/// Writes a topic message's meta map, as `rmp_serde` would write [`crate::codec::Meta`].
pub(crate) fn write_meta(
    buf: &mut Vec<u8>,
    process: &str,
    host: &str,
    count: Option<u64>,
    near: u8,
    far: u8,
) {
    let fields = 4 + u8::from(count.is_some());
    buf.push(0x80 | fields);
    buf.extend_from_slice(b"\xa7process");
    str_into(buf, process);
    buf.extend_from_slice(b"\xa4host");
    str_into(buf, host);
    if let Some(c) = count {
        buf.extend_from_slice(b"\xa5count");
        uint_into(buf, c);
    }
    buf.extend_from_slice(b"\xa4near");
    uint_into(buf, u64::from(near));
    buf.extend_from_slice(b"\xa3far");
    uint_into(buf, u64::from(far));
}

fn str_into(buf: &mut Vec<u8>, s: &str) {
    let n = s.len();
    if n < 32 {
        buf.push(0xa0 | n as u8);
    } else if n < 0x100 {
        buf.extend_from_slice(&[0xd9, n as u8]);
    } else if n < 0x1_0000 {
        buf.push(0xda);
        buf.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        buf.push(0xdb);
        buf.extend_from_slice(&(n.min(u32::MAX as usize) as u32).to_be_bytes());
    }
    buf.extend_from_slice(s.as_bytes());
}

fn uint_into(buf: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        buf.push(v as u8);
    } else if v < 0x100 {
        buf.extend_from_slice(&[0xcc, v as u8]);
    } else if v < 0x1_0000 {
        buf.push(0xcd);
        buf.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v < 0x1_0000_0000 {
        buf.push(0xce);
        buf.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        buf.push(0xcf);
        buf.extend_from_slice(&v.to_be_bytes());
    }
}

#[cfg(test)]
mod meta_tests {
    use super::*;
    use crate::codec::{Meta, to_map};

    #[test]
    fn meta_is_written_as_serde_writes_it_and_read_back() {
        for count in [None, Some(7), Some(1 << 40)] {
            let m = Meta {
                process: "p-1".into(),
                host: "h".into(),
                count,
                near: 3,
                far: 3,
            };
            let mut mine = Vec::new();
            write_meta(&mut mine, &m.process, &m.host, m.count, m.near, m.far);
            assert_eq!(mine, to_map(&m).unwrap().to_vec());
            let back = read_meta(&mine).unwrap();
            assert_eq!(
                (back.process, back.count, back.far),
                (m.process, m.count, 3)
            );
            for cut in 0..mine.len() {
                assert!(read_meta(&mine[..cut]).is_none());
            }
        }
    }
}
