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
    accept::{ProxyThreads, Scope},
    admin::{self, AdminState},
    cgroup,
    cli::RunArgs,
    config::{Config, CopyMode},
    connection::Proxy,
    forward::kernel::KernelForwarder,
    intercept::Intercept,
    metrics::Metrics,
    netns::{Netns, Origin},
    pod::{Pods, PodsConfig, server::CniSocket, store::Store},
    tap::Tap,
};

/// How often the agent looks for pods whose namespace vanished without a DEL.
const VANISHED_POD_CHECK: std::time::Duration = std::time::Duration::from_secs(2);
/// How long after detaching the programs the listeners keep accepting before they close.
const REDIRECT_SETTLE: std::time::Duration = std::time::Duration::from_millis(100);
/// Period of each proxy thread's housekeeping timer (see `keep_a_timer_pending`).
const TIMER_TICK: std::time::Duration = std::time::Duration::from_secs(1);

pub fn run(mut args: RunArgs) -> Result<()> {
    raise_fd_limit();
    let cgroup = cgroup::resolve(args.cgroup.cgroup.take())?;
    let config = args.into_config(cgroup);
    tracing::info!(
        cgroup = %config.cgroup.display(),
        outbound_port = config.outbound_port,
        admin = %config.admin_addr,
        skip_ports = %config.skip_outbound_ports,
        skip_networks = %config.skip_outbound_networks,
        "starting"
    );
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> Result<()> {
    let mut intercept = Intercept::load(&config)?;
    let kernel_counters = intercept.kernel_counter_map()?;
    let metrics = Arc::new(Metrics::new(Box::new(move || kernel_counters.read())));
    let served = Arc::new(intercept.served_netns_map()?);
    let tap = Arc::new(Tap::default());
    let kernel = kernel_forwarder(&config, &mut intercept, &metrics);
    // Cancelled at shutdown: listeners stop accepting, HTTP keep-alive connections wind down.
    let proxy_shutdown = CancellationToken::new();
    let proxy = Arc::new(Proxy::new(
        Arc::clone(&metrics),
        Arc::clone(&tap),
        intercept.original_dst_map()?,
        kernel,
        &config,
        proxy_shutdown.clone(),
    ));
    let admin_state = Arc::new(AdminState {
        metrics,
        tap,
        ready: false.into(),
        config_json: config.to_json(),
        shutdown_enabled: config.enable_shutdown_endpoint,
        shutdown_requested: Notify::new(),
    });
    let shutdown = CancellationToken::new();
    let connections = TaskTracker::new();

    // Listeners first: once the programs are attached, connects arrive at once.
    let admin_listener = admin::bind(config.admin_addr).await?;
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::clone(&admin_state),
        shutdown.child_token(),
    ));
    let threads = start_proxy_threads(&shutdown)?;
    let host = Netns::current().context("opening the agent's network namespace")?;
    let host_scope = Scope {
        origin: Origin::host(host.cookie()),
        proxy: Arc::clone(&proxy),
        connections: connections.clone(),
        scope_connections: None,
        stop_accepting: proxy_shutdown.clone(),
        abort: shutdown.clone(),
    };
    if config.serve_host_netns {
        threads.listen(&host_scope, config.outbound_port)?;
        served.serve(host.cookie(), config.outbound_port)?;
    }
    let cni = match &config.cni_socket {
        Some(socket) => {
            let pods = Arc::new(Pods::new(PodsConfig {
                threads: threads.clone(),
                proxy: Arc::clone(&proxy),
                served: Arc::clone(&served),
                connections: connections.clone(),
                stop_accepting: proxy_shutdown.clone(),
                abort: shutdown.clone(),
                host_netns_cookie: host.cookie(),
                outbound_port: config.outbound_port,
                drain: config.shutdown_grace,
                store: Store::beside(socket),
            }));
            let adopt = Arc::clone(&pods);
            let (adopted, dropped) = tokio::task::spawn_blocking(move || adopt.adopt_registered())
                .await
                .context("re-adopting registered pods")?;
            tracing::info!(adopted, dropped, "pod registry loaded");
            tokio::spawn(reap_vanished_pods(
                Arc::clone(&pods),
                shutdown.child_token(),
            ));
            let cni = CniSocket::bind(socket)?;
            tracing::info!(socket = %socket.display(), "serving CNI registrations");
            Some(tokio::spawn(cni.serve(pods, shutdown.child_token())))
        }
        None => None,
    };
    intercept.attach(&config.cgroup)?;
    admin_state.ready.store(true, Ordering::SeqCst);
    tracing::info!("ready");

    let reason = wait_for_stop(&admin_state).await?;
    tracing::info!(reason, "shutting down");
    admin_state.ready.store(false, Ordering::SeqCst);
    intercept.detach();
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
    let forwarder = intercept.kernel_forwarding().and_then(|(peers, active)| {
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
    let mut handles = Vec::with_capacity(threads);
    for index in 0..threads {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a proxy thread's runtime")?;
        handles.push(runtime.handle().clone());
        let shutdown = shutdown.clone();
        // Detached: each thread ends when `shutdown` fires (or with the process).
        std::thread::Builder::new()
            .name(format!("proxy-{index}"))
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::spawn(keep_a_timer_pending());
                    // Connection tasks live here: keep the runtime until the agent stops.
                    shutdown.cancelled().await;
                });
            })
            .context("starting a proxy thread")?;
    }
    Ok(ProxyThreads { handles })
}

/// A timer that is always pending on this thread's runtime. tokio wakes its driver (an eventfd
/// write and one more epoll_wait) whenever a new timer is due before every pending one; with
/// this one second tick pending, the per-request upstream timeouts (30 s) never are.
async fn keep_a_timer_pending() {
    let mut tick = tokio::time::interval(TIMER_TICK);
    loop {
        tick.tick().await;
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
