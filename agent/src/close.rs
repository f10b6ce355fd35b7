//! How a proxied connection ended: one value that its close metric (the `errno` label), its
//! tap event and its log line all read, whichever forwarder it went through.

use std::{io, net::SocketAddr};

use crate::{
    forward::{
        http::HttpError,
        opaque::{Failure, Outcome},
    },
    metrics::errno_name,
};

#[derive(Debug)]
pub enum CloseReason {
    /// Both directions ended cleanly. An HTTP client whose malformed request was answered
    /// (400, 408, 431) also ends cleanly: its socket did not fail.
    Clean,
    /// The upstream connect failed; the client was answered 502 or reset.
    ConnectFailed(io::Error),
    /// A socket error while forwarding opaque bytes; both connections were reset.
    Reset(Failure),
    /// The HTTP forwarder's connection ended with an error.
    Http(HttpError),
}

impl CloseReason {
    /// The bounded errno label: empty for a clean close, else the socket error's name.
    pub fn errno(&self) -> &'static str {
        match self {
            Self::Clean => "",
            Self::ConnectFailed(error) => errno_name(error),
            Self::Reset(failure) => errno_name(&failure.error),
            Self::Http(error) => error.errno(),
        }
    }

    /// One structured debug line: connections end with resets all the time, so none of this
    /// is worth more than debug.
    pub fn log(&self, id: u64, client: SocketAddr, dst: SocketAddr) {
        match self {
            Self::Clean => tracing::debug!(id, %client, %dst, "connection closed"),
            Self::ConnectFailed(error) => {
                tracing::debug!(id, %client, %dst, %error, "upstream connect failed")
            }
            Self::Reset(failure) => tracing::debug!(
                id, %client, %dst, step = failure.step, error = %failure.error,
                "connection reset"
            ),
            Self::Http(error) => {
                tracing::debug!(id, %client, %dst, %error, "http connection ended with an error")
            }
        }
    }
}

impl From<Outcome> for CloseReason {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Closed => Self::Clean,
            Outcome::Reset(failure) => Self::Reset(failure),
        }
    }
}

impl From<Result<(), HttpError>> for CloseReason {
    fn from(result: Result<(), HttpError>) -> Self {
        match result {
            Ok(()) => Self::Clean,
            Err(error) => Self::Http(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_labels_follow_the_reason() {
        assert_eq!(CloseReason::Clean.errno(), "");
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(CloseReason::ConnectFailed(refused).errno(), "ECONNREFUSED");
        let reset = Failure {
            step: "reading client",
            error: io::Error::from_raw_os_error(libc::ECONNRESET),
        };
        assert_eq!(
            CloseReason::from(Outcome::Reset(reset)).errno(),
            "ECONNRESET"
        );
        assert_eq!(CloseReason::from(Outcome::Closed).errno(), "");
    }
}
