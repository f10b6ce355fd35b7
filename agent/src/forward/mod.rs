//! Forwarding: moving bytes between the client and its original destination.
//! `opaque` splices raw TCP in both directions through pooled pipes.

pub mod opaque;
pub mod pipe;
