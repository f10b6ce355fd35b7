//! HTTP/2 frames as the h2c forwarder follows them (`FrameScanner`, and the observer with its
//! two HPACK decoders). The bytes are forwarded unchanged whatever they are; what is asserted
//! is that following them never panics or hangs, and that it does not depend on how the
//! bytes arrive.
//!
//! The input: a byte choosing where reads are cut, then a connection's bytes, which are split
//! between client and server at every 0xff byte (alternating, the client first). Asserts:
//! - the scanner reports the same events, or the same error after the same events, whether a
//!   direction's bytes come at once or in reads of any size;
//! - the observer takes the same chunks, in either cut, without panicking.
#![no_main]

use agent::fuzzing::{Http2Event, Http2FrameScanner, Http2ScanError, observe_http2};
use libfuzzer_sys::fuzz_target;

/// Everything the scanner reported, in order, and how it ended.
fn scan(scanner: &mut Http2FrameScanner, reads: &[&[u8]]) -> (Vec<String>, Option<Http2ScanError>) {
    let mut events = Vec::new();
    for read in reads {
        let result = scanner.scan(read, |event: Http2Event<'_>| {
            events.push(format!("{event:?}"));
            Ok(())
        });
        if let Err(error) = result {
            return (events, Some(error));
        }
    }
    (events, None)
}

fuzz_target!(|input: &[u8]| {
    let Some((&cut, bytes)) = input.split_first() else {
        return;
    };
    let piece = usize::from(cut).max(1);
    let directions: Vec<&[u8]> = bytes.split(|&byte| byte == 0xff).collect();
    let client: Vec<u8> = directions
        .iter()
        .step_by(2)
        .flat_map(|d| d.iter().copied())
        .collect();
    let server: Vec<u8> = directions
        .iter()
        .skip(1)
        .step_by(2)
        .flat_map(|d| d.iter().copied())
        .collect();

    for (whole, make) in [
        (
            &client,
            Http2FrameScanner::client as fn() -> Http2FrameScanner,
        ),
        (&server, Http2FrameScanner::server),
    ] {
        let at_once = scan(&mut make(), &[whole]);
        let pieces: Vec<&[u8]> = whole.chunks(piece).collect();
        let in_pieces = scan(&mut make(), &pieces);
        assert_eq!(at_once, in_pieces, "reads of {piece}");
    }

    let chunks: Vec<(bool, &[u8])> = directions
        .iter()
        .enumerate()
        .flat_map(|(index, direction)| {
            direction
                .chunks(piece)
                .map(move |chunk| (index % 2 == 0, chunk))
        })
        .collect();
    observe_http2(&chunks);
});
