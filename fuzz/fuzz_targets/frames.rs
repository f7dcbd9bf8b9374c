//! The frame reader and every body a peer can send: whatever the bytes, parsing returns
//! a value or a typed error, never panics; an envelope the daemon's check passes decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_ipc::codec::{check_envelope, decode_envelope};
use switchyard_ipc::frame::{self, Body, kind};

fn envelope(env: &[u8]) {
    if let Ok(c) = check_envelope(env) {
        let e = decode_envelope(env).expect("an envelope the daemon would forward decodes");
        assert_eq!((e.id, e.source.as_str()), (c.id, c.source));
    }
}

fuzz_target!(|data: &[u8]| {
    // A small limit too, so the size check is reached.
    for max in [64usize, frame::DEFAULT_MAX_FRAME] {
        let mut rest = data;
        let _ = frame::check_eof(rest);
        while let Ok(Some(f)) = frame::peek_frame(rest, max) {
            let body = &rest[frame::HEADER_LEN..f.total];
            match f.kind {
                kind::SEND => {
                    if let Ok(mut b) = Body::array(body, 2) {
                        let _ = b.raw_str();
                        envelope(b.rest());
                        let _ = b.envelope();
                    }
                }
                kind::PUBLISH | kind::GROUP => {
                    if let Ok(mut b) = Body::array(body, 3) {
                        let _ = b.uint();
                        let _ = b.str();
                        envelope(b.rest());
                    }
                }
                kind::TOPIC | kind::GROUP_DELIVER => {
                    if let Ok(mut b) = Body::array(body, 2) {
                        let _ = b.str();
                        let _ = b.uint();
                        let _ = b.envelope_with(&mut Default::default());
                    }
                }
                kind::HELLO => drop(frame::decode_msg::<frame::Hello>(body)),
                kind::WELCOME => drop(frame::decode_msg::<frame::Welcome>(body)),
                kind::ERROR => drop(frame::decode_msg::<frame::ErrorMsg>(body)),
                kind::REQUEST => drop(frame::decode_msg::<frame::RequestMsg>(body)),
                kind::REPLY => drop(frame::decode_msg::<frame::ReplyMsg>(body)),
                kind::EVENT => drop(frame::decode_msg::<frame::EventMsg>(body)),
                kind::NACK => drop(frame::decode_msg::<frame::NackMsg>(body)),
                kind::ACK => drop(frame::decode_msg::<frame::AckMsg>(body)),
                _ => {}
            }
            rest = &rest[f.total..];
        }
    }
});
