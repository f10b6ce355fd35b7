//! The agent's end of the CNI socket: accepts `sockmesh-cni` connections, reads one bounded
//! request line each, applies it to the pod registry and answers with one line.

use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::oneshot,
};
use tokio_util::sync::CancellationToken;

use super::{
    Added, Pods,
    api::{MAX_REQUEST_BYTES, Request, Response},
};

/// How long a plugin may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CniSocketError {
    #[error("creating {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing the stale {}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("binding the CNI socket {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("restricting {}", path.display())]
    Restrict {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The listening CNI socket; the file is removed when this is dropped.
pub struct CniSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl CniSocket {
    /// Binds the socket (root only: mode 0600), replacing a stale one a previous agent left.
    pub fn bind(path: &Path) -> Result<Self, CniSocketError> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|source| CniSocketError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        match fs::remove_file(path) {
            Err(source) if source.kind() != ErrorKind::NotFound => {
                return Err(CniSocketError::RemoveStale {
                    path: path.to_path_buf(),
                    source,
                });
            }
            _ => {}
        }
        let listener = UnixListener::bind(path).map_err(|source| CniSocketError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
            CniSocketError::Restrict {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Serves registrations until `shutdown` fires.
    pub async fn serve(self, pods: Arc<Pods>, shutdown: CancellationToken) {
        let registry = match RegistryThread::start(pods) {
            Ok(registry) => registry,
            Err(error) => {
                tracing::error!(%error, "starting the pod registry thread failed");
                return;
            }
        };
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, registry.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "CNI socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Drop for CniSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Registry changes enter namespaces (setns) and bind sockets: they run off the async
/// threads, one at a time, on one long-lived thread (so a burst of ADDs never grows a pool of
/// threads, each holding its own descriptor of the agent's namespace).
#[derive(Clone)]
struct RegistryThread {
    requests: std::sync::mpsc::Sender<(Request, oneshot::Sender<Response>)>,
}

impl RegistryThread {
    fn start(pods: Arc<Pods>) -> std::io::Result<Self> {
        let (requests, queue) = std::sync::mpsc::channel::<(Request, oneshot::Sender<Response>)>();
        std::thread::Builder::new()
            .name("pod-registry".into())
            .spawn(move || {
                // Ends when every sender is gone (the CNI socket stopped).
                for (request, reply) in queue {
                    let _ = reply.send(apply(&pods, request));
                }
            })?;
        Ok(Self { requests })
    }

    async fn apply(&self, request: Request) -> Response {
        let (reply, answer) = oneshot::channel();
        if self.requests.send((request, reply)).is_err() {
            return Response::failed("the pod registry has stopped");
        }
        answer
            .await
            .unwrap_or_else(|_| Response::failed("the pod registry dropped the request"))
    }
}

async fn answer(stream: UnixStream, registry: RegistryThread) {
    let (reader, mut writer) = stream.into_split();
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(reader)).await {
        Err(_) => Response::failed("no request within 10 s"),
        Ok(Err(message)) => Response::failed(message),
        Ok(Ok(request)) => registry.apply(request).await,
    };
    let mut line = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    let _ = writer.write_all(&line).await;
    let _ = writer.shutdown().await;
}

async fn read_request(reader: tokio::net::unix::OwnedReadHalf) -> Result<Request, String> {
    let mut line = Vec::new();
    let limited = reader.take(MAX_REQUEST_BYTES as u64 + 1);
    BufReader::new(limited)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|error| format!("reading the request: {error}"))?;
    if line.len() > MAX_REQUEST_BYTES {
        return Err(format!("request longer than {MAX_REQUEST_BYTES} bytes"));
    }
    serde_json::from_slice(&line).map_err(|error| format!("malformed request: {error}"))
}

fn apply(pods: &Pods, request: Request) -> Response {
    match request {
        Request::Add { pod } => {
            let (id, name) = (pod.container_id.clone(), pod.name.clone());
            match pods.add(pod) {
                Ok(Added::Meshed | Added::AlreadyMeshed) => Response::served(true, ""),
                Ok(Added::HostNetwork) => {
                    Response::served(false, "host network namespace: not meshed")
                }
                Err(error) => {
                    tracing::warn!(container_id = %id, pod = %name, %error, "CNI ADD failed");
                    Response::failed(error.to_string())
                }
            }
        }
        Request::Del { container_id } => match pods.remove(&container_id) {
            Ok(_) => Response::served(false, ""),
            Err(error) => Response::failed(error.to_string()),
        },
        Request::Check { container_id } => {
            let meshed = pods.is_served(&container_id);
            Response::served(meshed, if meshed { "" } else { "not served" })
        }
    }
}
