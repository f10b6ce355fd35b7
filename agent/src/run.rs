//! `sockmesh run`: the agent's life. Start-up order is listeners, then programs attached,
//! then ready; shutdown is not ready, programs detached (new connections go direct), open
//! connections drained within the grace period, exit 0.

use std::sync::{Arc, atomic::Ordering};

use anyhow::{Context, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Notify,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    accel::foreign::ForeignMapGate,
    accept::{ProxyThreads, Scope},
    admin::{self, AdminState},
    cgroup,
    cli::RunArgs,
    config::{Accelerate, Config, CopyMode},
    connection::{KernelMaps, Proxy},
    forward::kernel::KernelForwarder,
    intercept::{Inbound, InboundScope, Intercept, OriginalDstMap},
    listeners,
    liveness::{HEARTBEAT_PERIOD, Heartbeats, Publisher},
    metrics::{Direction, Metrics, ReloadLabels},
    netns::{Netns, Origin},
    pod::{Pods, PodsConfig, server::CniSocket, store::Store},
    policy::{Policy, PolicyWatcher, enforce::Enforcer},
    tap::Tap,
    unaccepted::Sweep,
};

/// How often the agent looks for pods whose namespace vanished without a DEL.
const VANISHED_POD_CHECK: std::time::Duration = std::time::Duration::from_secs(2);
/// How often the meshed listening ports are reconciled with the kernel's listeners.
const LISTENER_CHECK: std::time::Duration = std::time::Duration::from_secs(2);
/// How often the policy file is read for changes.
const POLICY_CHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// How long after detaching the programs the listeners keep accepting before they close.
const REDIRECT_SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

pub fn run(mut args: RunArgs) -> Result<()> {
    // The policy file is input like the flags: a bad one stops the start before anything
    // touches the kernel (there is no last good policy yet).
    let policy = load_policy(args.policy.as_deref())?;
    raise_fd_limit();
    let cgroup = cgroup::resolve(args.cgroup.cgroup.take())?;
    let config = args.into_config(cgroup);
    tracing::info!(
        cgroup = %config.cgroup.display(),
        outbound_port = config.outbound_port,
        inbound_port = config.inbound_port,
        skip_inbound_ports = %config.skip_inbound_ports,
        admin = %config.admin_addr,
        skip_ports = %config.skip_outbound_ports,
        skip_networks = %config.skip_outbound_networks,
        "starting"
    );
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(serve(config, policy))
}

/// The policy file's watcher and first content, loaded and logged.
type LoadedPolicy = Option<(PolicyWatcher, Arc<Policy>)>;

async fn serve(config: Config, loaded: LoadedPolicy) -> Result<()> {
    let host = Netns::current().context("opening the agent's network namespace")?;
    let mut intercept = Intercept::load(&config, config.serve_host_netns.then(|| host.cookie()))?;
    let inbound = Arc::new(intercept.inbound()?);
    let kernel_counters = intercept.kernel_counter_map()?;
    let metrics = Arc::new(Metrics::new(Box::new(move || Ok(kernel_counters.read()?))));
    let served = Arc::new(intercept.served_netns_map()?);
    let tap = Arc::new(Tap::default());
    let (watcher, policy) = match loaded {
        Some((watcher, policy)) => {
            count_reload(&metrics, true);
            (Some(watcher), policy)
        }
        None => (None, Arc::new(Policy::default())),
    };
    let mount = cgroup::cgroup2_mount()?;
    let host_origin = Origin::host(host.cookie());
    let enforcer = Arc::new(Enforcer::new(
        intercept.policy_maps()?,
        Arc::clone(&policy),
        (&config.cgroup, &mount),
        Arc::clone(&host_origin),
    ));
    let kernel = kernel_forwarder(&config, &mut intercept, &metrics);
    let accelerator = match config.accelerate {
        Accelerate::Off => None,
        Accelerate::Local => {
            let accelerator = intercept
                .accelerator()
                .context("--accelerate local (see `sockmesh check`)")?;
            tracing::warn!(
                "--accelerate local is experimental: on kernels without the tcp_bpf fix in \
                 docs/experiments/ (6.18 among them), blocking applications that send and \
                 receive on one socket at once get EAGAIN; `sockmesh check` says which this is"
            );
            Some(Arc::new(accelerator))
        }
    };
    // Cancelled at shutdown: listeners stop accepting, HTTP keep-alive connections wind down.
    let proxy_shutdown = CancellationToken::new();
    // Every connection task, and what each starts beside itself; shutdown drains them.
    let connections = TaskTracker::new();
    let proxy = Arc::new(Proxy::new(
        Arc::clone(&metrics),
        Arc::clone(&tap),
        KernelMaps {
            original_dsts: intercept.original_dst_map()?,
            inbound: Arc::clone(&inbound),
            accelerator,
        },
        kernel,
        &config,
        proxy_shutdown.clone(),
    ));
    let admin_state = Arc::new(AdminState {
        metrics,
        tap,
        ready: false.into(),
        config_json: config.to_json(),
        policy: Some(Arc::clone(&enforcer)),
        shutdown_enabled: config.enable_shutdown_endpoint,
        shutdown_requested: Notify::new(),
    });
    let shutdown = CancellationToken::new();
    if config.accelerate == Accelerate::Local {
        start_foreign_map_gate(&mut intercept, &admin_state.metrics, &shutdown)?;
    }

    // Listeners first: once the programs are attached, connects arrive at once.
    let admin_listener = admin::bind(config.admin_addr).await?;
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::clone(&admin_state),
        shutdown.child_token(),
    ));
    let threads = start_proxy_threads(&shutdown)?;
    let host_scope = Scope {
        origin: host_origin,
        proxy: Arc::clone(&proxy),
        direction: Direction::Outbound,
        connections: connections.clone(),
        stop_accepting: proxy_shutdown.clone(),
        pod_drain: None,
    };
    if config.serve_host_netns {
        threads.listen(&host_scope, config.outbound_port)?;
        listen_inbound(&threads, &host_scope, &host, &inbound, config.inbound_port)?;
        // Servers already listening are captured from the first connection on.
        let meshed = crate::cgroup::subtree(&config.cgroup, &mount);
        let meshed = meshed.into_iter().map(|(id, _)| id).collect();
        listeners::reconcile(&inbound, &host_scope.origin, &meshed)?;
        served.serve(host.cookie(), config.outbound_port, 0)?;
    }
    let (cni, pods) = match &config.cni_socket {
        Some(socket) => {
            let pods = Arc::new(Pods::new(PodsConfig {
                threads: threads.clone(),
                proxy: Arc::clone(&proxy),
                served: Arc::clone(&served),
                inbound: Arc::clone(&inbound),
                enforcer: Arc::clone(&enforcer),
                connections: connections.clone(),
                stop_accepting: proxy_shutdown.clone(),
                abort: shutdown.clone(),
                host_netns_cookie: host.cookie(),
                outbound_port: config.outbound_port,
                inbound_port: config.inbound_port,
                drain: config.shutdown_grace,
                metrics_retention: config.pod_metrics_retention,
                store: Store::beside(socket),
            }));
            let cni = start_pod_mode(socket, Arc::clone(&pods), &shutdown).await?;
            (Some(cni), Some(pods))
        }
        None => (None, None),
    };
    let workloads = pods
        .as_ref()
        .map(|pods| pods.workloads())
        .unwrap_or_default();
    enforcer.apply(Arc::clone(&policy), &workloads, &served)?;
    if let Some(watcher) = watcher {
        tokio::spawn(watch_policy(
            watcher,
            policy,
            Arc::clone(&enforcer),
            pods.clone(),
            Arc::clone(&served),
            Arc::clone(&admin_state.metrics),
            shutdown.child_token(),
        ));
    }
    start_kernel_scan(
        KernelScan {
            inbound: Arc::clone(&inbound),
            original_dsts: intercept.original_dst_map()?,
            unaccepted: Sweep::default(),
            unaccepted_removed: admin_state.metrics.unaccepted_removed_total.clone(),
            host: config
                .serve_host_netns
                .then(|| Arc::clone(&host_scope.origin)),
            pods: pods.clone(),
            cgroup: config.cgroup.clone(),
            mount: mount.clone(),
        },
        shutdown.child_token(),
    )?;
    if proxy.sweeps_activity() {
        start_activity_sweep(Arc::clone(&proxy), shutdown.child_token());
    }
    let publisher = liveness_publisher(
        &config,
        &mut intercept,
        &threads,
        pods,
        &admin_state,
        &proxy,
    )?;
    start_heartbeat(publisher, &threads.heartbeats, &shutdown).await?;
    intercept.attach(&config.cgroup)?;
    admin_state.ready.store(true, Ordering::SeqCst);
    tracing::info!("ready");

    let reason = wait_for_stop(&admin_state).await?;
    tracing::info!(reason, "shutting down");
    admin_state.ready.store(false, Ordering::SeqCst);
    intercept.detach();
    inbound.detach_all();
    // A connect the programs redirected just before the detach may still be on its way into
    // a listener's queue; the listeners accept their whole backlog before they close.
    tokio::time::sleep(REDIRECT_SETTLE).await;
    proxy_shutdown.cancel();
    connections.close();
    if tokio::time::timeout(config.shutdown_grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "grace period over; closing open connections"
        );
    }
    shutdown.cancel();
    if let Some(cni) = cni {
        // Dropping the socket removes its file; the pod registry stays for the next agent.
        let _ = cni.await;
    }
    drop(intercept);
    tracing::info!("stopped");
    Ok(())
}

/// Loads the policy file, if one is given.
fn load_policy(path: Option<&std::path::Path>) -> Result<LoadedPolicy> {
    let Some(path) = path else {
        return Ok(None);
    };
    let (watcher, policy, ignored) =
        PolicyWatcher::start(path.to_path_buf()).context("loading the policy file")?;
    log_loaded(&policy, &ignored, path);
    Ok(Some((watcher, policy)))
}

fn count_reload(metrics: &Metrics, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics
        .policy_reload_total
        .get_or_create(&ReloadLabels { result })
        .inc();
}

fn log_loaded(policy: &Policy, ignored: &[String], path: &std::path::Path) {
    tracing::info!(path = %path.display(), entries = policy.entries(), "policy loaded");
    if !ignored.is_empty() {
        tracing::info!(
            annotations = ignored.join(","),
            "policy: ignored annotations"
        );
    }
}

/// Reads the policy file every second; applies a changed good one, keeps the last good one
/// (and says why) when it turns bad. With cgroup selectors, re-applies on every check, as
/// cgroups come and go.
async fn watch_policy(
    mut watcher: PolicyWatcher,
    initial: Arc<Policy>,
    enforcer: Arc<Enforcer>,
    pods: Option<Arc<Pods>>,
    served: Arc<crate::intercept::ServedNetnsMap>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(POLICY_CHECK);
    let mut current = initial;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let changed = match watcher.check() {
            Ok(Some((policy, ignored))) => {
                count_reload(&metrics, true);
                log_loaded(&policy, &ignored, watcher.path());
                Some(policy)
            }
            Ok(None) => None,
            Err(error) => {
                count_reload(&metrics, false);
                tracing::warn!(%error, "policy file rejected; the last good policy stays");
                None
            }
        };
        let policy = match changed {
            Some(policy) => policy,
            None if enforcer.selects_cgroups() => Arc::clone(&current),
            None => continue,
        };
        current = Arc::clone(&policy);
        let workloads = pods
            .as_ref()
            .map(|pods| pods.workloads())
            .unwrap_or_default();
        if let Err(error) = enforcer.apply(policy, &workloads, &served) {
            tracing::warn!(error = %crate::metrics::ErrorChain(&error), "applying the policy");
        }
    }
}

/// Every `busy::SWEEP_EVERY`, finds which opaque connections moved bytes (the kernel
/// hand-off counts the busy ones).
fn start_activity_sweep(proxy: Arc<Proxy>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::forward::busy::SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => proxy.sweep_activity(),
            }
        }
    });
}

/// What the periodic kernel scan looks at: the meshed listeners (reconciled with the
/// kernel's) and the original destinations of connections that ended before an accept.
struct KernelScan {
    inbound: Arc<Inbound>,
    original_dsts: OriginalDstMap,
    unaccepted: Sweep,
    unaccepted_removed: prometheus_client::metrics::counter::Counter,
    /// The host's origin, when the agent serves it.
    host: Option<Arc<Origin>>,
    pods: Option<Arc<Pods>>,
    cgroup: std::path::PathBuf,
    mount: std::path::PathBuf,
}

impl KernelScan {
    /// One pass over every served namespace (blocking: it enters namespaces and reads /sys).
    fn pass(&mut self) {
        let meshed = crate::cgroup::subtree(&self.cgroup, &self.mount)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let pods = self
            .pods
            .as_ref()
            .map(|pods| pods.workloads())
            .unwrap_or_default();
        let origins: Vec<Arc<Origin>> = self
            .host
            .iter()
            .cloned()
            .chain(pods.into_iter().map(|pod| pod.origin))
            .collect();
        for origin in &origins {
            match listeners::reconcile(&self.inbound, origin, &meshed) {
                Ok(done) if done != listeners::Reconciled::default() => {
                    tracing::debug!(
                        netns = origin.netns_cookie,
                        added = done.added,
                        removed = done.removed,
                        "meshed listeners reconciled"
                    );
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(
                        error = %crate::metrics::ErrorChain(&error),
                        "reconciling meshed listeners"
                    );
                }
            }
        }
        let removed = self.unaccepted.pass(&self.original_dsts, &origins);
        if removed > 0 {
            tracing::debug!(
                removed,
                "original destinations of unaccepted connections removed"
            );
            self.unaccepted_removed.inc_by(removed as u64);
        }
    }
}

/// Every few seconds, reconciles the meshed listening ports with the kernel's listeners and
/// sweeps the entries of connections never accepted, on a thread of its own (it enters pods'
/// namespaces: a pooled thread would hold its way home open for as long as the pool keeps
/// it). The thread ends when the ticker stops at shutdown.
fn start_kernel_scan(mut scan: KernelScan, shutdown: CancellationToken) -> Result<()> {
    let (tick_tx, tick_rx) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("kernel-scan".into())
        .spawn(move || {
            if let Err(error) = crate::netns::remember_home() {
                tracing::warn!(%error, "the kernel scan cannot enter namespaces");
                return;
            }
            while tick_rx.recv().is_ok() {
                scan.pass();
            }
        })
        .context("starting the kernel-scan thread")?;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(LISTENER_CHECK);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // A scan still running skips this tick.
            let _ = tick_tx.try_send(());
        }
    });
    Ok(())
}

/// The host's inbound listeners, registered with the kernel, and the host's sk_lookup program.
fn listen_inbound(
    threads: &ProxyThreads,
    outbound: &Scope,
    host: &Netns,
    inbound: &Inbound,
    port: u16,
) -> Result<()> {
    let scope = Scope {
        direction: Direction::Inbound,
        ..outbound.clone()
    };
    let listeners = threads.listen(&scope, port)?;
    inbound.register_listeners(host.cookie(), &listeners)?;
    inbound.attach(host.cookie(), host.as_fd(), InboundScope::Host)?;
    Ok(())
}

/// Pod mode: re-adopts the registered pods, then serves CNI registrations (and drops pods
/// whose namespace vanished). Returns the CNI socket's task.
///
/// The socket is bound before the registry is read: a plugin whose ADD finds no socket
/// registers the pod on disk instead, and one that did so after the read would stay
/// unmeshed until the next restart. Bound first, its connect waits in the backlog and is
/// answered once the registered pods are adopted.
async fn start_pod_mode(
    socket: &std::path::Path,
    pods: Arc<Pods>,
    shutdown: &CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let cni = CniSocket::bind(socket)?;
    let adopt = Arc::clone(&pods);
    let (adopted, dropped) = tokio::task::spawn_blocking(move || adopt.adopt_registered())
        .await
        .context("re-adopting registered pods")?;
    tracing::info!(adopted, dropped, "pod registry loaded");
    tokio::spawn(reap_vanished_pods(
        Arc::clone(&pods),
        shutdown.child_token(),
    ));
    tracing::info!(socket = %socket.display(), "serving CNI registrations");
    Ok(tokio::spawn(cni.serve(pods, shutdown.child_token())))
}

/// `--accelerate local` pauses while other programs' socket maps are loaded: looked at once
/// now, before the programs attach, then every second.
fn start_foreign_map_gate(
    intercept: &mut Intercept,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<()> {
    let mut gate = ForeignMapGate::new(
        intercept.config_map()?,
        metrics.accelerate_foreign_socket_maps.clone(),
    );
    gate.check();
    tokio::spawn(gate.watch(shutdown.child_token()));
    Ok(())
}

/// The liveness gate's publisher: the budget leaves room for every served pod's listeners.
fn liveness_publisher(
    config: &Config,
    intercept: &mut Intercept,
    threads: &ProxyThreads,
    pods: Option<Arc<Pods>>,
    admin: &Arc<AdminState>,
    proxy: &Proxy,
) -> Result<Publisher> {
    if let Some(max) = config.max_connections
        && max > crate::liveness::MAX_BUDGET
    {
        tracing::warn!(
            max_connections = max,
            taken = crate::liveness::MAX_BUDGET,
            "--max-connections is over what the kernel's connection maps track; using their bound"
        );
    }
    // An outbound and an inbound pair per proxy thread.
    let listeners_per_pod = 4 * threads.handles.len() as u64;
    let metrics = Arc::clone(&admin.metrics);
    Ok(Publisher {
        map: intercept.liveness_map()?,
        heartbeats: threads.heartbeats.clone(),
        timeout: config.liveness_timeout,
        max_connections: config.max_connections,
        other_reserved: Box::new(move || {
            pods.as_ref()
                .map_or(0, |pods| pods.count() as u64 * listeners_per_pod)
        }),
        open_redirects: intercept.open_redirects_map()?,
        open_inbound: proxy.open_inbound.clone(),
        report: Box::new(move |budget, open| {
            metrics
                .connection_budget
                .set(i64::try_from(budget).unwrap_or(i64::MAX));
            metrics
                .open_redirects
                .set(i64::try_from(open).unwrap_or(i64::MAX));
        }),
    })
}

/// Waits (at most 5 s) until every proxy thread has ticked, publishes the first heartbeat,
/// then keeps publishing. Before the programs are attached: the first redirected connect must
/// find a fresh heartbeat.
async fn start_heartbeat(
    mut publisher: Publisher,
    heartbeats: &Heartbeats,
    shutdown: &CancellationToken,
) -> Result<()> {
    let started = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while heartbeats.oldest() == 0 {
            tokio::time::sleep(HEARTBEAT_PERIOD / 4).await;
        }
    })
    .await;
    started.context("the proxy threads did not start ticking within 5 s")?;
    publisher.publish()?;
    tracing::info!(
        max_connections = publisher.budget(),
        liveness_timeout_ms = publisher.timeout.as_millis() as u64,
        "connects go direct when the agent is at its budget or its heartbeat is older than the timeout"
    );
    tokio::spawn(publisher.run(shutdown.child_token()));
    Ok(())
}

/// In-kernel forwarding for `--copy-mode sockmap`, or None (splice instead) when this kernel
/// cannot do it.
fn kernel_forwarder(
    config: &Config,
    intercept: &mut Intercept,
    metrics: &Arc<Metrics>,
) -> Option<Arc<KernelForwarder>> {
    if config.copy_mode != CopyMode::Sockmap {
        return None;
    }
    let forwarder = intercept
        .kernel_forwarding()
        .map_err(anyhow::Error::from)
        .and_then(|(peers, active)| {
            KernelForwarder::new(peers, active).context("starting the socket watcher")
        });
    match forwarder {
        Ok(forwarder) => {
            let forwarder = Arc::new(forwarder);
            let weak = Arc::downgrade(&forwarder);
            metrics.refresh_before_render(Box::new(move || {
                if let Some(forwarder) = weak.upgrade() {
                    forwarder.sync_counters();
                }
            }));
            Some(forwarder)
        }
        Err(error) => {
            tracing::warn!(
                error = format!("{error:#}"),
                "in-kernel forwarding is unavailable; opaque connections use splice"
            );
            None
        }
    }
}

/// One proxy thread per core, each with a single-threaded runtime: a connection lives its
/// whole life on one thread, so handing work between its client and upstream sides never wakes
/// another thread. Listeners (the host's, each pod's) are added to every thread later.
fn start_proxy_threads(shutdown: &CancellationToken) -> Result<ProxyThreads> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let heartbeats = Heartbeats::new(threads);
    let mut handles = Vec::with_capacity(threads);
    for index in 0..threads {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a proxy thread's runtime")?;
        handles.push(runtime.handle().clone());
        let (shutdown, heartbeats) = (shutdown.clone(), heartbeats.clone());
        // Detached: each thread ends when `shutdown` fires (or with the process).
        std::thread::Builder::new()
            .name(format!("proxy-{index}"))
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::spawn(keep_a_timer_pending(heartbeats, index));
                    // Connection tasks live here: keep the runtime until the agent stops.
                    shutdown.cancelled().await;
                });
            })
            .context("starting a proxy thread")?;
    }
    Ok(ProxyThreads {
        handles,
        heartbeats,
    })
}

/// The thread's heartbeat (the kernel redirects only while every proxy thread ticks), which is
/// also a timer always pending on this thread's runtime: tokio wakes its driver (an eventfd
/// write and one more epoll_wait) whenever a new timer is due before every pending one; with
/// this tick pending, the per-request upstream timeouts (30 s) never are.
async fn keep_a_timer_pending(heartbeats: Heartbeats, index: usize) {
    let mut tick = tokio::time::interval(HEARTBEAT_PERIOD);
    loop {
        tick.tick().await;
        heartbeats.tick(index);
    }
}

/// Every few seconds, drops the pods whose network namespace disappeared without a DEL.
async fn reap_vanished_pods(pods: Arc<Pods>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(VANISHED_POD_CHECK);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let pods = Arc::clone(&pods);
        let _ = tokio::task::spawn_blocking(move || pods.reap_vanished()).await;
    }
}

/// Waits for SIGTERM, SIGINT or POST /shutdown.
async fn wait_for_stop(admin: &AdminState) -> Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        () = admin.shutdown_requested.notified() => "POST /shutdown",
    })
}

/// Each proxied connection costs two sockets and, while bytes move, a pipe: use the whole
/// hard limit of open files rather than the usual soft 1024.
fn raise_fd_limit() {
    if let Err(error) = crate::sys::raise_open_file_limit() {
        tracing::warn!(%error, "raising the open-file limit failed");
    }
}
