//! Reads an envelope frame in place: the shape [`crate::codec::write_event`] writes (the
//! keys in that order, a machine target), with no allocation. Anything else is `None`, and
//! the serde decoder decides whether the bytes are an envelope at all.

use std::ops::Range;

use switchyard_core::Headers;

/// An envelope to a machine, borrowed from its frame.
pub(crate) struct Plain<'a> {
    pub(crate) id: u64,
    pub(crate) source: &'a str,
    pub(crate) to: &'a str,
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
        Some(self.take(n)?.iter().fold(0u64, |v, b| (v << 8) | u64::from(*b)))
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

/// Reads a machine-addressed envelope; `None` for any other shape.
pub(crate) fn read(frame: &[u8]) -> Option<Plain<'_>> {
    let mut r = Rd { all: frame, at: 0 };
    r.lit(b"\x86\xa2id")?;
    let id = r.uint()?;
    r.lit(b"\xa6source")?;
    let source = r.str()?;
    r.lit(b"\xa6target\x81\xa7Machine")?;
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
            assert_eq!((p.id, p.source, p.to, p.event), (e.id, "ünï-source", "b", "EV"));
            assert_eq!(p.headers, e.headers);
            assert_eq!(&b[p.payload.clone()], &e.payload.to_msgpack().unwrap()[..]);
            // Truncated anywhere: refused, never a panic.
            for cut in 0..b.len() {
                assert!(read(&b[..cut]).is_none(), "cut at {cut}");
            }
        }
        let mut topic = Vec::new();
        let e = Envelope::new(1, "a".into(), Address::Topic("t".into()), "E".into(), Payload::new(()));
        write_envelope(&mut topic, &e).unwrap();
        assert!(read(&topic).is_none(), "only machine targets");
    }
}
