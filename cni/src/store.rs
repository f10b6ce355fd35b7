//! The pod registry on disk: one JSON file per pod under `<dir>/pods/`, named by its
//! container id. The agent writes it on ADD and removes it on DEL, and re-adopts every pod in
//! it at start; `sockmesh-cni` writes one too when the agent is unreachable, so a pod created
//! while the agent was down is meshed once it is back. Files are replaced atomically (write a
//! temporary file, rename), so a reader never sees half a registration.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::api::{PodInfo, valid_container_id};

#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The registry beside the CNI socket: `<socket dir>/pods`.
    pub fn beside(socket: &Path) -> Self {
        let parent = socket.parent().unwrap_or(Path::new("/"));
        Self {
            dir: parent.join("pods"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn save(&self, pod: &PodInfo) -> io::Result<()> {
        let path = self.path_of(&pod.container_id)?;
        fs::create_dir_all(&self.dir)?;
        let temporary = self.dir.join(format!(".{}.tmp", pod.container_id));
        let json = serde_json::to_vec_pretty(pod).map_err(io::Error::other)?;
        fs::write(&temporary, json)?;
        fs::rename(&temporary, path)
    }

    /// Removes a pod's file; a pod that is not there is fine.
    pub fn remove(&self, container_id: &str) -> io::Result<()> {
        match fs::remove_file(self.path_of(container_id)?) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }

    /// Every registered pod. A file that does not parse is reported and skipped.
    pub fn load_all(&self) -> Vec<Result<PodInfo, (PathBuf, String)>> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut pods = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            let parsed = fs::read(&path)
                .map_err(|error| error.to_string())
                .and_then(|bytes| {
                    serde_json::from_slice::<PodInfo>(&bytes).map_err(|error| error.to_string())
                })
                .and_then(|pod| match pod.container_id == id {
                    true => Ok(pod),
                    false => Err(format!("holds container id {}", pod.container_id)),
                });
            pods.push(parsed.map_err(|error| (path, error)));
        }
        pods
    }

    fn path_of(&self, container_id: &str) -> io::Result<PathBuf> {
        if !valid_container_id(container_id) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid container id {container_id:?}"),
            ));
        }
        Ok(self.dir.join(format!("{container_id}.json")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(id: &str) -> PodInfo {
        PodInfo {
            container_id: id.into(),
            netns: "/var/run/netns/x".into(),
            namespace: "ns".into(),
            name: "p".into(),
            uid: String::new(),
            ips: vec![],
        }
    }

    #[test]
    fn saves_loads_and_removes_pods() {
        let dir = std::env::temp_dir().join(format!("sockmesh-store-{}", std::process::id()));
        let store = Store::beside(&dir.join("cni.sock"));
        store.save(&pod("one")).unwrap();
        store.save(&pod("two")).unwrap();
        fs::write(store.dir().join("broken.json"), b"{").unwrap();
        let mut loaded: Vec<_> = store.load_all();
        loaded.sort_by_key(|entry| format!("{entry:?}"));
        assert_eq!(loaded.iter().filter(|entry| entry.is_ok()).count(), 2);
        assert_eq!(loaded.iter().filter(|entry| entry.is_err()).count(), 1);
        store.remove("one").unwrap();
        store.remove("one").unwrap();
        assert!(store.remove("../escape").is_err());
        assert!(store.save(&pod("../escape")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
