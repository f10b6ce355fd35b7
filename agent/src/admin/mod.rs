//! The admin server (loopback by default): /metrics (OpenMetrics text), /ready (200 once the
//! programs are attached and the listeners accept; 503 before that and during shutdown),
//! /live, /config.json (the effective configuration), /tap (a live event stream, see `tap`)
//! and /shutdown (POST, from loopback, only with --enable-shutdown-endpoint).

mod tap;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::Notify};
use tokio_util::sync::CancellationToken;

use crate::{metrics::Metrics, tap::Tap};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Kernel send buffer of an admin connection. A /tap watcher that stops reading should start
/// skipping events after this much, not pin megabytes of kernel memory (loopback autotuning
/// grows buffers to 4 MiB).
const ADMIN_SEND_BUFFER: usize = 64 * 1024;

type AdminBody = UnsyncBoxBody<Bytes, Infallible>;

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub tap: Arc<Tap>,
    pub ready: AtomicBool,
    /// The effective configuration, rendered once at start-up.
    pub config_json: String,
    /// The effective per-workload policy now (`effective_policy` in /config.json).
    pub policy: Option<Arc<crate::policy::enforce::Enforcer>>,
    pub shutdown_enabled: bool,
    /// Notified by POST /shutdown.
    pub shutdown_requested: Notify,
}

impl AdminState {
    /// The configuration, with the per-workload policy in force now.
    fn config_json(&self) -> String {
        let Some(policy) = &self.policy else {
            return self.config_json.clone();
        };
        let Ok(mut config) = serde_json::from_str::<serde_json::Value>(&self.config_json) else {
            return self.config_json.clone();
        };
        config["effective_policy"] = policy.effective();
        serde_json::to_string_pretty(&config).unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("binding the admin server {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    continue;
                }
            },
        };
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(ADMIN_SEND_BUFFER);
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| route(request, peer, Arc::clone(&state)));
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = connection => if let Err(error) = result {
                    tracing::debug!(%error, "admin connection");
                },
                // Open /tap streams end with the agent.
                () = shutdown.cancelled() => {}
            }
        });
    }
}

async fn route(
    request: Request<Incoming>,
    peer: SocketAddr,
    state: Arc<AdminState>,
) -> Result<Response<AdminBody>, Infallible> {
    // HEAD answers like GET; hyper sends the head without the body.
    let read = matches!(*request.method(), Method::GET | Method::HEAD);
    let response = match (request.method(), request.uri().path()) {
        (_, "/metrics") if read => metrics(&state),
        (_, "/ready") if read && state.ready.load(Ordering::SeqCst) => {
            text(StatusCode::OK, "ready\n")
        }
        (_, "/ready") if read => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        (_, "/live") if read => text(StatusCode::OK, "live\n"),
        (_, "/config.json") if read => json(state.config_json()),
        (&Method::GET, "/tap") if !peer.ip().is_loopback() => text(
            StatusCode::FORBIDDEN,
            "/tap is served to loopback clients only\n",
        ),
        (&Method::GET, "/tap") => tap::stream(request.uri().query().unwrap_or(""), &state.tap),
        (&Method::POST, "/shutdown") => shutdown(&state, peer),
        (_, "/metrics" | "/ready" | "/live" | "/config.json" | "/tap") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
        }
        (_, "/shutdown") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

fn shutdown(state: &AdminState, peer: SocketAddr) -> Response<AdminBody> {
    if !state.shutdown_enabled {
        return text(
            StatusCode::FORBIDDEN,
            "the shutdown endpoint is disabled (--enable-shutdown-endpoint)\n",
        );
    }
    if !peer.ip().is_loopback() {
        return text(
            StatusCode::FORBIDDEN,
            "shutdown is accepted from loopback clients only\n",
        );
    }
    tracing::info!(%peer, "shutdown requested through the admin endpoint");
    state.shutdown_requested.notify_one();
    text(StatusCode::ACCEPTED, "shutting down\n")
}

fn metrics(state: &AdminState) -> Response<AdminBody> {
    match state.metrics.render() {
        Ok(body) => with_type(body_of(body), OPENMETRICS),
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics encoding failed\n",
        ),
    }
}

fn json(body: String) -> Response<AdminBody> {
    with_type(body_of(body), "application/json")
}

fn with_type(mut response: Response<AdminBody>, content_type: &'static str) -> Response<AdminBody> {
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

fn body_of(body: impl Into<Bytes>) -> Response<AdminBody> {
    Response::new(Full::new(body.into()).boxed_unsync())
}

fn text(status: StatusCode, body: &'static str) -> Response<AdminBody> {
    let mut response = body_of(body);
    *response.status_mut() = status;
    response
}
