//! GET /tap: newline-delimited JSON, one line per event, filtered by the query string. Each
//! watcher has its own bounded queue in the tap's broadcast channel; one that reads too slowly
//! skips events (a "lagged" line says how many) and never slows the proxy down.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{
    Response, StatusCode,
    body::{Body, Frame},
    header,
};
use tokio::sync::{broadcast::error::RecvError, mpsc};

use super::{AdminBody, text};
use crate::tap::{Tap, TapEvent, TapFilter};

/// Lines buffered between the watcher's task and its HTTP connection.
const LINES_IN_FLIGHT: usize = 64;

pub fn stream(query: &str, tap: &Tap) -> Response<AdminBody> {
    let filter = match TapFilter::parse(query) {
        Ok(filter) => filter,
        Err(error) => {
            let mut response = text(StatusCode::BAD_REQUEST, "bad tap filter\n");
            *response.body_mut() =
                http_body_util::Full::new(Bytes::from(format!("{error}\n"))).boxed_unsync();
            return response;
        }
    };
    let mut events = tap.subscribe();
    let (lines, body) = mpsc::channel(LINES_IN_FLIGHT);
    tokio::spawn(async move {
        loop {
            let received = tokio::select! {
                received = events.recv() => received,
                // The watcher went away while nothing happened: unsubscribe now.
                () = lines.closed() => return,
            };
            let event = match received {
                Ok(event) => event,
                Err(RecvError::Lagged(skipped)) => TapEvent::Lagged { skipped },
                Err(RecvError::Closed) => return,
            };
            if !filter.matches(&event) {
                continue;
            }
            let Ok(mut line) = serde_json::to_vec(&event) else {
                continue;
            };
            line.push(b'\n');
            // The watcher went away: stop (and unsubscribe).
            if lines.send(Bytes::from(line)).await.is_err() {
                return;
            }
        }
    });
    let mut response = Response::new(LineStream(body).boxed_unsync());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// A response body fed line by line from a channel.
struct LineStream(mpsc::Receiver<Bytes>);

impl Body for LineStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|line| line.map(|line| Ok(Frame::data(line))))
    }
}
