//! Chunked-body framing (`Remaining::take` for `Framing::Chunked`): where a chunked body ends
//! in the bytes after its head. The forwarder passes the body on unchanged, so the end it
//! finds is where it starts reading the next message: it must be where the peer's is.
//!
//! The input is a body, and where to split it into reads. Asserts:
//! - the scanner agrees exactly with the reference reading of the agent's grammar
//!   (`sockmesh_fuzz::chunked::lenient`): the same end, "not over yet" or "malformed";
//! - every body the RFC grammar accepts (`strict`), the scanner accepts, ending at the same
//!   byte;
//! - the same body split into any reads ends at the same byte (or fails the same way);
//! - against hyper's HTTP/1 server, reading the body of a chunked POST: where the scanner
//!   finds an end, hyper ends the body at the same byte or refuses it (it refuses more: junk
//!   after whitespace in a size line, its limits on extensions and trailers), never reads on;
//!   and a body hyper reads to its end is never one the scanner is still inside.
#![no_main]

use agent::fuzzing::{ChunkError, Framing, Remaining};
use libfuzzer_sys::fuzz_target;
use sockmesh_fuzz::{BodyRead, chunked, hyper_server};

/// What the scanner made of all the bytes given to it.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    Done(usize),
    Incomplete,
    Invalid,
}

fn scan(reads: &[&[u8]]) -> Scan {
    let mut remaining = Remaining::of(Framing::Chunked);
    let mut taken = 0;
    for read in reads {
        match remaining.take(read) {
            Ok(n) => {
                assert!(n <= read.len());
                taken += n;
                if remaining.is_done() {
                    return Scan::Done(taken);
                }
                assert_eq!(n, read.len(), "stopped inside the body");
            }
            Err(ChunkError) => return Scan::Invalid,
        }
    }
    Scan::Incomplete
}

const HEAD: &[u8] = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    // The first byte says how to split the rest into reads.
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let whole = scan(&[body]);

    let want = match chunked::lenient(body) {
        chunked::Outcome::Done { end, .. } => Scan::Done(end),
        chunked::Outcome::Incomplete => Scan::Incomplete,
        chunked::Outcome::Invalid => Scan::Invalid,
    };
    assert_eq!(whole, want, "scanner vs the reference");
    if let chunked::Outcome::Done { end, .. } = chunked::strict(body) {
        assert_eq!(whole, Scan::Done(end), "a body the RFC allows");
    }

    let step = usize::from(split % 32) + 1;
    let reads: Vec<&[u8]> = body.chunks(step).collect();
    let pieces = scan(&reads);
    // A malformed byte after the end is never read; before it, whatever the split, it fails.
    assert_eq!(pieces, whole, "split into reads of {step}");

    against_hyper(body, &whole);
});

/// How hyper's server reads `body` as a chunked request body (None: it refused the head).
fn hyper_reads(body: &[u8]) -> Option<BodyRead> {
    let request = [HEAD, body].concat();
    hyper_server(&request, true).and_then(|served| served.body_read)
}

fn against_hyper(body: &[u8], scanned: &Scan) {
    match *scanned {
        Scan::Done(end) => {
            // hyper does not want more than the agent's body (it ends there, or refuses)...
            let at_end = hyper_reads(&body[..end]);
            assert_ne!(
                at_end,
                Some(BodyRead::Eof),
                "hyper reads on past byte {end}"
            );
            // ...and does not end it earlier.
            if at_end == Some(BodyRead::Complete) {
                assert_eq!(
                    hyper_reads(&body[..end - 1]),
                    Some(BodyRead::Eof),
                    "hyper ends the body before byte {end}"
                );
            }
        }
        Scan::Incomplete => assert_ne!(
            hyper_reads(body),
            Some(BodyRead::Complete),
            "hyper ends a body the agent is still inside"
        ),
        // The agent refuses (the connection fails): nothing to disagree about.
        Scan::Invalid => {}
    }
}
