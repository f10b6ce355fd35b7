//! `--accelerate local` never shares a socket with another tool's socket map. Two sockmap
//! users on one socket share its psock (the kernel's `sock_map_link` refuses only a second
//! program of the same kind) and break each other (grafana/beyla#2691: Beyla and Cilium on one
//! node). So while a socket map that is not sockmesh's is loaded, the fast path pauses:
//! sockops leaves every new connection on plain TCP (`ProxyConfig::accelerate` is 0). Looked
//! at before the programs attach and every `CHECK_PERIOD` after; a connection accelerated
//! before a foreign map appeared stays as it is (nothing takes a socket back out of a psock
//! another tool shares).

use std::{fmt, io, time::Duration};

use agent_common::{ProxyConfig, map_names};
use aya::maps::{Array, MapData, MapError, MapInfo, MapType, loaded_maps};
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

/// How often the node's maps are listed: a foreign tool that starts inserting sockets is met
/// within this long.
pub const CHECK_PERIOD: Duration = Duration::from_secs(1);

/// A socket map (sockmap or sockhash) loaded by a program that is not sockmesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignMap {
    pub id: u32,
    pub name: String,
}

impl fmt::Display for ForeignMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.name.is_empty() {
            "(unnamed)"
        } else {
            &self.name
        };
        write!(f, "{name} (id {})", self.id)
    }
}

/// Every socket map loaded on the node that is not one of sockmesh's. Ours are known by name:
/// another sockmesh agent's maps follow the same rules, and are not foreign.
pub fn foreign_socket_maps() -> Result<Vec<ForeignMap>, MapError> {
    let mut foreign = Vec::new();
    for info in loaded_maps() {
        let info = match info {
            Ok(info) => info,
            // Unloaded between being listed and being looked at: gone, so not foreign.
            Err(MapError::SyscallError(error))
                if error.io_error.kind() == io::ErrorKind::NotFound =>
            {
                continue;
            }
            Err(error) => return Err(error),
        };
        if let Some(map) = foreign_socket_map(&info) {
            foreign.push(map);
        }
    }
    Ok(foreign)
}

fn foreign_socket_map(info: &MapInfo) -> Option<ForeignMap> {
    let name = String::from_utf8_lossy(info.name()).into_owned();
    is_foreign_socket_map(info.map_type().ok(), &name).then(|| ForeignMap {
        id: info.id(),
        name,
    })
}

/// A sockmap or sockhash whose name is none of sockmesh's (a map type this aya does not know
/// is no socket map: those have existed since 4.14 and 4.18).
fn is_foreign_socket_map(kind: Option<MapType>, name: &str) -> bool {
    matches!(kind, Some(MapType::SockMap | MapType::SockHash))
        && !map_names::SOCKET_MAPS.contains(&name)
}

/// The kernel's switch for the fast path, turned off while foreign socket maps are loaded.
pub struct ForeignMapGate {
    config: Array<MapData, ProxyConfig>,
    /// What the last look found: the foreign maps, or why the node's maps could not be listed.
    seen: Result<Vec<ForeignMap>, String>,
    /// `sockmesh_accelerate_foreign_socket_maps`.
    gauge: Gauge,
}

impl ForeignMapGate {
    /// `config` is the `CONFIG` map, as the agent filled it in (`accelerate` on).
    pub fn new(config: Array<MapData, ProxyConfig>, gauge: Gauge) -> Self {
        Self {
            config,
            seen: Ok(Vec::new()),
            gauge,
        }
    }

    /// Looks at the node's maps and sets the switch: on only when no foreign socket map is
    /// loaded. Maps that cannot be listed count as foreign: the fast path is never worth a
    /// socket someone else may hold.
    pub fn check(&mut self) {
        let seen =
            foreign_socket_maps().map_err(|error| format!("{:#}", anyhow::Error::from(error)));
        if seen != self.seen {
            log_change(&seen);
        }
        let count = match &seen {
            Ok(maps) => maps.len(),
            Err(_) => 1,
        };
        self.gauge.set(i64::try_from(count).unwrap_or(i64::MAX));
        self.set_accelerate(count == 0);
        self.seen = seen;
    }

    /// Checks every `CHECK_PERIOD` until `shutdown`.
    pub async fn watch(mut self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(CHECK_PERIOD);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => self.check(),
            }
        }
    }

    fn set_accelerate(&mut self, on: bool) {
        let wanted = u16::from(on);
        let written = self.config.get(&0, 0).and_then(|mut config| {
            if config.accelerate == wanted {
                return Ok(());
            }
            config.accelerate = wanted;
            self.config.set(0, config, 0)
        });
        if let Err(error) = written {
            tracing::warn!(error = %crate::metrics::ErrorChain(&error), "switching --accelerate local in CONFIG");
        }
    }
}

fn log_change(seen: &Result<Vec<ForeignMap>, String>) {
    match seen {
        Ok(maps) if maps.is_empty() => {
            tracing::info!(
                "--accelerate local: no other program's socket map is loaded; new connections are accelerated again"
            );
        }
        Ok(maps) => {
            let maps = maps
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            tracing::warn!(
                %maps,
                "--accelerate local paused: another program's socket map is loaded, and a socket in two tools' socket maps breaks both; new connections go by plain TCP until it is gone"
            );
        }
        Err(error) => {
            tracing::warn!(%error, "--accelerate local paused: the node's eBPF maps could not be listed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockmesh_socket_maps_are_not_foreign() {
        for name in map_names::SOCKET_MAPS {
            assert!(
                !is_foreign_socket_map(Some(MapType::SockHash), name),
                "{name}"
            );
        }
    }

    #[test]
    fn any_other_socket_map_is_foreign() {
        assert!(is_foreign_socket_map(Some(MapType::SockHash), "sk_msg_map"));
        assert!(is_foreign_socket_map(Some(MapType::SockMap), ""));
        // A map of another type, even under one of our names, holds no sockets.
        assert!(!is_foreign_socket_map(Some(MapType::Hash), "sk_msg_map"));
        assert!(!is_foreign_socket_map(None, "sk_msg_map"));
    }

    #[test]
    fn a_foreign_map_is_shown_by_name_and_id() {
        let named = ForeignMap {
            id: 42,
            name: "sock_hash".to_string(),
        };
        assert_eq!(named.to_string(), "sock_hash (id 42)");
        let unnamed = ForeignMap {
            id: 7,
            name: String::new(),
        };
        assert_eq!(unnamed.to_string(), "(unnamed) (id 7)");
    }
}
