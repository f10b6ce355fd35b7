//! Pod mode: the pods the agent serves in their own network namespaces. For each pod a chained
//! CNI plugin (`sockmesh-cni`) registers, the agent opens its outbound and inbound listeners
//! *inside* the pod's namespace (one pair each per proxy thread), dials upstreams from there,
//! attaches the inbound sk_lookup program to the namespace, and only then adds the namespace
//! to `SERVED_NETNS`, so the kernel never sends a connection to a port where nothing listens. Removing a pod reverses that order. The registry is kept on disk
//! (`store`) so a restarted agent re-adopts its pods; `server` speaks the CNI socket protocol
//! (`api`).

pub mod server;

/// The CNI socket protocol and the on-disk registry, shared with the plugin.
pub use sockmesh_cni::{api, store};

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use parking_lot::{Mutex, MutexGuard};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::{api::PodInfo, store::Store};
use crate::{
    accept::{AcceptError, PodDrain, ProxyThreads, Scope},
    connection::Proxy,
    intercept::{Inbound, InboundScope, InterceptError, ServedNetnsMap},
    metrics::{Direction, ErrorChain, SharedLabel, WorkloadLabels},
    netns::{Netns, Origin},
    policy::enforce::{Enforcer, PodWorkload},
};

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("invalid container id {0:?}")]
    InvalidContainerId(String),
    #[error("opening the network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the network namespace {path} is already served for pod {other}")]
    NamespaceTaken { path: PathBuf, other: String },
    #[error("the agent serves {0} pods already")]
    Full(usize),
    #[error("opening the pod's listeners: {}", ErrorChain(.0))]
    Listen(AcceptError),
    #[error("registering the namespace with the kernel programs: {}", ErrorChain(.0))]
    Kernel(InterceptError),
    #[error("writing the pod registry: {0}")]
    Store(std::io::Error),
}

/// What became of an ADD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    Meshed,
    /// The same pod was added before (a runtime retrying ADD): nothing changed.
    AlreadyMeshed,
    /// The pod shares the agent's (host) network namespace: left alone.
    HostNetwork,
}

/// Everything a pod's listeners are built from.
pub struct PodsConfig {
    pub threads: ProxyThreads,
    pub proxy: Arc<Proxy>,
    pub served: Arc<ServedNetnsMap>,
    pub inbound: Arc<Inbound>,
    pub enforcer: Arc<Enforcer>,
    /// Every connection of the agent runs on this tracker.
    pub connections: TaskTracker,
    /// Cancelled at agent shutdown: every pod stops accepting.
    pub stop_accepting: CancellationToken,
    /// Cancelled once the agent's drain is over.
    pub abort: CancellationToken,
    /// The agent's own network namespace: a pod in it is a host-network pod.
    pub host_netns_cookie: u64,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// How long a removed pod's open connections may take to finish.
    pub drain: Duration,
    /// How long a removed pod's metric series stay once its connections ended.
    pub metrics_retention: Duration,
    pub store: Store,
}

struct ServedPod {
    info: PodInfo,
    origin: Arc<Origin>,
    stop_accepting: CancellationToken,
    drain: PodDrain,
}

impl ServedPod {
    fn netns_cookie(&self) -> u64 {
        self.origin.netns_cookie
    }
}

pub struct Pods {
    config: PodsConfig,
    /// Shared with the tasks that forget removed pods' metric series.
    served: Arc<Mutex<HashMap<String, ServedPod>>>,
}

impl Pods {
    pub fn new(config: PodsConfig) -> Self {
        Self {
            config,
            served: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Serves a pod: listeners inside its namespace first, then the kernel redirects there,
    /// then the registry on disk. Returns once connects in the pod are accepted.
    pub fn add(&self, pod: PodInfo) -> Result<Added, PodError> {
        if !api::valid_container_id(&pod.container_id) {
            return Err(PodError::InvalidContainerId(pod.container_id));
        }
        let netns = Netns::open(&pod.netns).map_err(|source| PodError::Netns {
            path: pod.netns.clone(),
            source,
        })?;
        self.add_in(pod, netns)
    }

    /// `add` for a namespace already open.
    fn add_in(&self, pod: PodInfo, netns: Netns) -> Result<Added, PodError> {
        if netns.cookie() == self.config.host_netns_cookie {
            return Ok(Added::HostNetwork);
        }
        let mut served = self.lock();
        if let Some(existing) = served.get(&pod.container_id)
            && existing.netns_cookie() == netns.cookie()
        {
            return Ok(Added::AlreadyMeshed);
        }
        if let Some(other) = served
            .values()
            .find(|other| other.netns_cookie() == netns.cookie())
        {
            return Err(PodError::NamespaceTaken {
                path: pod.netns.clone(),
                other: other.info.container_id.clone(),
            });
        }
        if served.len() + 1 >= agent_common::MAX_SERVED_NETNS as usize {
            return Err(PodError::Full(served.len()));
        }
        if let Some(previous) = served.remove(&pod.container_id) {
            // Same id, another namespace: the runtime re-created the sandbox.
            self.retire(previous);
        }
        let entry = self.start(pod, netns)?;
        self.config.proxy.metrics.served_pods.inc();
        served.insert(entry.info.container_id.clone(), entry);
        Ok(Added::Meshed)
    }

    /// Stops serving a pod; Ok(false) when it was not served (DEL is idempotent).
    pub fn remove(&self, container_id: &str) -> Result<bool, PodError> {
        if !api::valid_container_id(container_id) {
            return Err(PodError::InvalidContainerId(container_id.to_string()));
        }
        let removed = self.lock().remove(container_id);
        // Retired before the store is touched: the pod has left the map, so a store error
        // returned first would leave its kernel entries and listeners with nobody to remove
        // them.
        let retired = removed.map(|pod| self.retire(pod)).is_some();
        self.config
            .store
            .remove(container_id)
            .map_err(PodError::Store)?;
        Ok(retired)
    }

    /// Stops serving pods whose namespace file is gone without a DEL (a runtime that crashed
    /// or cleaned up on its own): the agent's sockets would otherwise keep the namespace alive
    /// for ever. Returns how many were removed.
    pub fn reap_vanished(&self) -> usize {
        let vanished: Vec<String> = self
            .lock()
            .values()
            .filter(|pod| {
                pod.origin
                    .netns
                    .as_ref()
                    .is_some_and(|netns| !netns.still_at(&pod.info.netns))
            })
            .map(|pod| pod.info.container_id.clone())
            .collect();
        for container_id in &vanished {
            tracing::info!(%container_id, "the pod's network namespace is gone; removing it");
            if let Err(error) = self.remove(container_id) {
                tracing::warn!(%container_id, %error, "removing a vanished pod");
            }
        }
        vanished.len()
    }

    pub fn is_served(&self, container_id: &str) -> bool {
        self.lock().contains_key(container_id)
    }

    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// The served pods, for applying a policy.
    pub fn workloads(&self) -> Vec<PodWorkload> {
        self.lock()
            .values()
            .map(|pod| PodWorkload {
                namespace: pod.info.namespace.clone(),
                name: pod.info.name.clone(),
                origin: Arc::clone(&pod.origin),
            })
            .collect()
    }

    /// Re-adopts every pod in the registry whose namespace still exists and still holds the
    /// pod's addresses; forgets the others. Returns (adopted, dropped).
    pub fn adopt_registered(&self) -> (usize, usize) {
        let (mut adopted, mut dropped) = (0, 0);
        for entry in self.config.store.load_all() {
            let pod = match entry {
                Ok(pod) => pod,
                Err((path, error)) => {
                    tracing::warn!(path = %path.display(), %error, "dropping an unreadable pod registration");
                    let _ = std::fs::remove_file(&path);
                    dropped += 1;
                    continue;
                }
            };
            match self.readopt(&pod) {
                Ok(()) => adopted += 1,
                Err(reason) => {
                    tracing::info!(container_id = %pod.container_id, pod = %pod.name, %reason, "dropping a vanished pod");
                    let _ = self.config.store.remove(&pod.container_id);
                    dropped += 1;
                }
            }
        }
        (adopted, dropped)
    }

    fn readopt(&self, pod: &PodInfo) -> Result<(), String> {
        if !api::valid_container_id(&pod.container_id) {
            return Err(format!("invalid container id {:?}", pod.container_id));
        }
        let netns = Netns::open(&pod.netns).map_err(|error| error.to_string())?;
        if let Some(ip) = pod.ips.iter().find(|ip| !netns.holds_address(**ip)) {
            return Err(format!("its namespace no longer holds {ip}"));
        }
        match self.add_in(pod.clone(), netns) {
            Ok(Added::Meshed | Added::AlreadyMeshed) => Ok(()),
            Ok(Added::HostNetwork) => Err("it is in the host network namespace".into()),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Opens the pod's listeners and registers its namespace with the kernel programs.
    fn start(&self, pod: PodInfo, netns: Netns) -> Result<ServedPod, PodError> {
        let config = &self.config;
        let netns_cookie = netns.cookie();
        let origin = Arc::new(Origin {
            netns: Some(netns),
            netns_cookie,
            workload: WorkloadLabels {
                namespace: SharedLabel::new(&pod.namespace),
                pod: SharedLabel::new(&pod.name),
            },
            policy_opaque_ports: Default::default(),
            cgroup_opaque_ports: Default::default(),
        });
        let workload = PodWorkload {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            origin: Arc::clone(&origin),
        };
        let entry = ServedPod {
            info: pod,
            origin: Arc::clone(&origin),
            stop_accepting: config.stop_accepting.child_token(),
            drain: PodDrain {
                connections: TaskTracker::new(),
                abort: config.abort.child_token(),
            },
        };
        let scope = Scope {
            origin: Arc::clone(&origin),
            proxy: Arc::clone(&config.proxy),
            direction: Direction::Outbound,
            connections: config.connections.clone(),
            stop_accepting: entry.stop_accepting.clone(),
            pod_drain: Some(entry.drain.clone()),
        };
        let started = self
            .listen(&scope, &entry.info)
            .and_then(|()| {
                config
                    .enforcer
                    .for_new_pod(&workload)
                    .and_then(|policy| {
                        config
                            .served
                            .serve(netns_cookie, config.outbound_port, policy)
                    })
                    .map_err(PodError::Kernel)
            })
            .and_then(|()| config.store.save(&entry.info).map_err(PodError::Store));
        if let Err(error) = started {
            config.served.unserve(netns_cookie);
            config.inbound.detach(netns_cookie);
            config
                .inbound
                .remove_addresses(netns_cookie, &entry.info.ips);
            entry.stop_accepting.cancel();
            entry.drain.abort.cancel();
            config
                .enforcer
                .forget_pod(&workload.namespace, &workload.name, netns_cookie);
            return Err(error);
        }
        tracing::info!(
            container_id = %entry.info.container_id,
            namespace = %entry.info.namespace,
            pod = %entry.info.name,
            netns = %entry.info.netns.display(),
            "serving pod"
        );
        Ok(entry)
    }

    /// Opens the pod's outbound listeners, then its inbound ones, which the pod's sk_lookup
    /// program (attached last) steers connections to meshed ports into.
    fn listen(&self, outbound: &Scope, pod: &PodInfo) -> Result<(), PodError> {
        let config = &self.config;
        let netns_cookie = outbound.origin.netns_cookie;
        config
            .threads
            .listen(outbound, config.outbound_port)
            .map_err(PodError::Listen)?;
        let inbound_scope = Scope {
            direction: Direction::Inbound,
            ..outbound.clone()
        };
        let listeners = config
            .threads
            .listen(&inbound_scope, config.inbound_port)
            .map_err(PodError::Listen)?;
        let kernel = |result: Result<(), InterceptError>| result.map_err(PodError::Kernel);
        kernel(config.inbound.register_listeners(netns_cookie, &listeners))?;
        kernel(config.inbound.add_addresses(netns_cookie, &pod.ips))?;
        if let Some(netns) = &outbound.origin.netns {
            kernel(
                config
                    .inbound
                    .attach(netns_cookie, netns.as_fd(), InboundScope::Pod),
            )?;
        }
        Ok(())
    }

    /// The kernel stops redirecting first, then the listeners close, then the pod's open
    /// connections get the drain period before they are closed.
    fn retire(&self, pod: ServedPod) {
        let config = &self.config;
        config.served.unserve(pod.netns_cookie());
        config.inbound.detach(pod.netns_cookie());
        config
            .inbound
            .remove_addresses(pod.netns_cookie(), &pod.info.ips);
        config.inbound.forget_ports(pod.netns_cookie());
        pod.stop_accepting.cancel();
        config
            .enforcer
            .forget_pod(&pod.info.namespace, &pod.info.name, pod.netns_cookie());
        let stale = config.proxy.forget_netns(pod.netns_cookie());
        config.proxy.metrics.served_pods.dec();
        tracing::info!(
            container_id = %pod.info.container_id,
            pod = %pod.info.name,
            stale_entries = stale,
            "stopped serving pod"
        );
        pod.drain.connections.close();
        let drain = config.drain;
        let forget = ForgetSeries {
            workload: pod.origin.workload.clone(),
            retention: config.metrics_retention,
            served: Arc::clone(&self.served),
            metrics: Arc::clone(&config.proxy.metrics),
        };
        let PodDrain { connections, abort } = pod.drain;
        config.threads.handles[0].spawn(async move {
            if tokio::time::timeout(drain, connections.wait())
                .await
                .is_err()
            {
                tracing::info!(
                    open = connections.len(),
                    "closing a removed pod's connections"
                );
                abort.cancel();
                // Aborted tasks end at their next poll, on their own threads.
                let _ = tokio::time::timeout(ABORTED_TASKS_END, connections.wait()).await;
            }
            abort.cancel();
            forget.after_retention().await;
        });
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, ServedPod>> {
        self.served.lock()
    }
}

/// How long the tasks of a removed pod's aborted connections may take to end before its
/// series are forgotten (a task ends at its next poll; this only bounds the wait).
const ABORTED_TASKS_END: Duration = Duration::from_secs(5);

/// A removed pod's metric series, forgotten once its connections have ended and the retention
/// has passed: without this, every pod a node ever ran would keep its series on /metrics (and
/// in the agent's heap) for the agent's whole life.
struct ForgetSeries {
    workload: WorkloadLabels,
    retention: Duration,
    served: Arc<Mutex<HashMap<String, ServedPod>>>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl ForgetSeries {
    async fn after_retention(self) {
        tokio::time::sleep(self.retention).await;
        // The registry's lock may be held while a pod's listeners are bound: not on a proxy
        // thread.
        let _ = tokio::task::spawn_blocking(move || self.now()).await;
    }

    /// Unless a pod of the same namespace and name is served again (a StatefulSet's pod comes
    /// back under its name): its series carry on. Under the registry's lock, so that no such
    /// pod starts counting while the series go.
    fn now(&self) {
        let served = self.served.lock();
        if served
            .values()
            .any(|pod| pod.origin.workload == self.workload)
        {
            tracing::debug!(
                namespace = %self.workload.namespace.as_str(),
                pod = %self.workload.pod.as_str(),
                "a pod of the same name is served again; its metric series stay"
            );
            return;
        }
        let removed = self.metrics.forget_workload(&self.workload);
        tracing::debug!(
            namespace = %self.workload.namespace.as_str(),
            pod = %self.workload.pod.as_str(),
            removed,
            "forgot a removed pod's metric series"
        );
    }
}
