//! Network namespaces: the host's (the agent's own) and each served pod's. A socket belongs to
//! the namespace its creating thread was in at socket(2) time and keeps it for life, so the
//! agent enters a pod's namespace only for the moment it creates a socket there (a listener,
//! an upstream connection), on the thread that will use it, and returns at once.

use std::{
    cell::RefCell,
    collections::HashMap,
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::Path,
    sync::Arc,
};

use socket2::{Domain, Socket, Type};

use crate::{
    config::PortSet,
    metrics::WorkloadLabels,
    sys::{self, netns_cookie},
};

/// statfs(2)'s f_type of namespace files (linux/magic.h).
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// An open network namespace and its cookie (what the kernel programs key namespaces by).
#[derive(Debug)]
pub struct Netns {
    file: File,
    cookie: u64,
}

thread_local! {
    /// The namespace this thread started in, to return to after `Netns::run`.
    static HOME: RefCell<Option<File>> = const { RefCell::new(None) };
}

impl Netns {
    /// The calling thread's network namespace.
    pub fn current() -> io::Result<Self> {
        let file = File::open("/proc/thread-self/ns/net")?;
        let probe = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        Ok(Self {
            file,
            cookie: netns_cookie(&probe)?,
        })
    }

    /// Opens a network namespace file (`/var/run/netns/NAME`, `/proc/PID/ns/net`). Nothing
    /// else is opened: a FIFO's open would block for ever and a device's can act (a
    /// watchdog's arms it).
    pub fn open(path: &Path) -> io::Result<Self> {
        if sys::file_system_type(path)? != NSFS_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a namespace file", path.display()),
            ));
        }
        let file = File::open(path)?;
        let mut netns = Self { file, cookie: 0 };
        let probe = netns.run(|| Socket::new(Domain::IPV4, Type::STREAM, None))??;
        netns.cookie = netns_cookie(&probe)?;
        Ok(netns)
    }

    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// The namespace file, for attaching programs to the namespace.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Whether `path` still names this namespace. It does not once the runtime removed the
    /// pod's namespace file (ours keeps the namespace itself alive).
    pub fn still_at(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(path), self.file.metadata()) {
            (Ok(named), Ok(ours)) => named.dev() == ours.dev() && named.ino() == ours.ino(),
            _ => false,
        }
    }

    /// Runs `f` on this thread inside this namespace, then returns to the thread's own one.
    /// Fails (without running `f`) when the file is not a network namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        remember_home()?;
        sys::enter_network_namespace(self.file.as_fd())?;
        let _return_home = ReturnHome;
        Ok(f())
    }

    /// Whether `ip` is an address of an interface in this namespace (a bind to it succeeds).
    pub fn holds_address(&self, ip: IpAddr) -> bool {
        self.run(|| {
            let socket = Socket::new(
                Domain::for_address(SocketAddr::new(ip, 0)),
                Type::STREAM,
                None,
            )?;
            socket.bind(&SocketAddr::new(ip, 0).into())
        })
        .is_ok_and(|bound| bound.is_ok())
    }
}

/// Opens this thread's own namespace (once per thread) so `Netns::run` can return to it. A
/// long-lived thread that will enter namespaces calls it at start, so the file it holds is
/// there from the beginning and not opened midway.
pub fn remember_home() -> io::Result<()> {
    HOME.with(|home| -> io::Result<()> {
        let mut home = home.borrow_mut();
        if home.is_none() {
            *home = Some(File::open("/proc/thread-self/ns/net")?);
        }
        Ok(())
    })
}

/// Returns the thread to its own namespace when dropped, even if the closure panicked.
struct ReturnHome;

impl Drop for ReturnHome {
    fn drop(&mut self) {
        let returned = HOME.with(|home| match home.borrow().as_ref() {
            Some(file) => sys::enter_network_namespace(file.as_fd()),
            None => Err(io::Error::other("no home namespace recorded")),
        });
        if let Err(error) = returned {
            // A proxy thread left in a pod's namespace would create the next host socket
            // there: there is no safe way to continue.
            tracing::error!(%error, "returning to the agent's network namespace failed");
            std::process::abort();
        }
    }
}

/// Where a connection was accepted: the agent's own network namespace (host mode) or a pod's.
/// Its upstream sockets are created in the same namespace, so the destination sees the pod's
/// address and the pod's network policy applies.
#[derive(Debug)]
pub struct Origin {
    /// None for the agent's own namespace: sockets are created without entering anything.
    pub netns: Option<Netns>,
    pub netns_cookie: u64,
    /// Namespace and pod name labels (empty in host mode).
    pub workload: WorkloadLabels,
    /// Opaque ports of this pod's policy, added to the node-wide ones (rewritten on reload).
    pub policy_opaque_ports: parking_lot::RwLock<PortSet>,
    /// Host mode: opaque ports of the cgroups a policy entry selects, by cgroup id (rewritten
    /// on reload and as cgroups come and go; empty in a pod's origin).
    pub cgroup_opaque_ports: parking_lot::RwLock<HashMap<u64, PortSet>>,
}

impl Origin {
    pub fn host(cookie: u64) -> Arc<Self> {
        Arc::new(Self {
            netns: None,
            netns_cookie: cookie,
            workload: WorkloadLabels::default(),
            policy_opaque_ports: Default::default(),
            cgroup_opaque_ports: Default::default(),
        })
    }

    /// Whether this origin's policy, or the policy of the workload's cgroup (host mode), makes
    /// `port` opaque.
    pub fn policy_opaque(&self, port: u16, workload_cgroup: Option<u64>) -> bool {
        self.policy_opaque_ports.read().contains(port)
            || workload_cgroup.is_some_and(|cgroup| {
                self.cgroup_opaque_ports
                    .read()
                    .get(&cgroup)
                    .is_some_and(|ports| ports.contains(port))
            })
    }

    /// Whether any cgroup here has opaque ports of its own (else finding a connection's
    /// workload cgroup is not worth a lookup).
    pub fn has_cgroup_opaque_ports(&self) -> bool {
        !self.cgroup_opaque_ports.read().is_empty()
    }

    /// Creates a socket (or anything else namespace-bound) in this origin's namespace.
    pub fn within<T>(&self, create: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        match &self.netns {
            None => create(),
            Some(netns) => netns.run(create)?,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::mpsc, time::Duration};

    use super::*;

    /// Opens `path` on a thread of its own, bounded: a FIFO's open blocks for ever.
    fn open_bounded(path: &Path) -> io::Result<Netns> {
        let (sender, receiver) = mpsc::channel();
        let path = path.to_path_buf();
        std::thread::spawn(move || sender.send(Netns::open(&path)));
        receiver
            .recv_timeout(Duration::from_secs(10))
            .expect("Netns::open did not return")
    }

    #[test]
    fn only_namespace_files_are_opened() {
        let dir = std::env::temp_dir().join(format!("sockmesh-netns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success(), "mkfifo");
        let plain = dir.join("plain");
        std::fs::write(&plain, b"not a namespace").unwrap();
        for path in [&fifo, &plain, Path::new("/dev/null")] {
            let error = open_bounded(path).expect_err("opened a non-namespace file");
            assert_eq!(
                error.kind(),
                io::ErrorKind::InvalidInput,
                "{path:?}: {error}"
            );
            assert!(
                error.to_string().contains("is not a namespace file"),
                "{error}"
            );
        }
        let missing = open_bounded(&dir.join("missing")).expect_err("opened a missing file");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&dir).unwrap();
        // What the check lets through: the thread's own namespace file is one.
        let own = sys::file_system_type(Path::new("/proc/thread-self/ns/net")).unwrap();
        assert_eq!(own, NSFS_MAGIC);
    }
}
