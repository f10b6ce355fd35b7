//! sockmesh: an eBPF-accelerated, node-level transparent proxy agent (the library behind the
//! `sockmesh` binary).
//!
//! A connection's life, one module per stage: `intercept` (kernel programs on a cgroup) ->
//! `accept` -> `connection` (`original_dst` -> `accel` -> `connect` -> `classify`/`detect` -> `forward`:
//! http | opaque, then kernel once chatty) -> `metrics` and `tap`, served by `admin`. `run`
//! wires them together; `config` and `cli` parse the flags once; `ops` holds the operator
//! commands; `sys` holds every raw system call (the only module allowed `unsafe`).

#![deny(unsafe_code)]

pub mod accel;
pub mod accept;
pub mod admin;
pub mod cgroup;
pub mod classify;
pub mod cli;
pub mod close;
pub mod config;
pub mod connect;
pub mod connection;
pub mod detect;
pub mod forward;
pub mod intercept;
pub mod listeners;
pub mod liveness;
pub mod metrics;
pub mod netns;
pub mod ops;
pub mod original_dst;
pub mod pod;
pub mod policy;
pub mod run;
pub mod sys;
pub mod tap;
pub mod unaccepted;

/// Entry points for the fuzz targets in `fuzz/`; not an API. The HTTP/1 head and body parsers
/// and the HTTP/2 frame scanner and observer live in private modules; everything else the
/// targets use is public already.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::forward::http::h1::body::{ChunkError, Framing, Remaining};
    pub use crate::forward::http::h1::head::{
        HeadError, MAX_HEAD_BYTES, RequestHead, ResponseHead, parse_request, parse_response,
    };
    pub use crate::forward::http::h2::{
        Event as Http2Event, FrameScanner as Http2FrameScanner, HpackDecoder, HpackError,
        ScanError as Http2ScanError, observe_chunks as observe_http2,
    };
}
