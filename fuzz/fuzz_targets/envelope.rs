//! The envelope decoders against serde: the in-place view reader (cold and warm), the fast
//! decoders and the daemon's shape check must agree with `Envelope::decode` or decline.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_ipc::codec::check_decoders_agree;

fuzz_target!(|data: &[u8]| {
    // The first byte splits the input into a previous frame (to warm the reader's caches) and the frame.
    let Some((&cut, rest)) = data.split_first() else { return };
    let cut = usize::from(cut).min(rest.len());
    let (prev, body) = rest.split_at(cut);
    if let Err(e) = check_decoders_agree(prev, body) {
        panic!("{e}");
    }
    // The body alone as an envelope, too (most inputs are not SEND bodies).
    let mut framed = vec![0x92, 0xa1, b'b'];
    framed.extend_from_slice(body);
    if let Err(e) = check_decoders_agree(prev, &framed) {
        panic!("{e}");
    }
});
