//! Enforcement: turns the policy in force into what the kernel and the proxy read. Each
//! distinct workload policy gets an id in `POLICIES`; a served pod's namespace names its id in
//! `SERVED_NETNS` (pod mode), a selected cgroup in `CGROUP_POLICY` (host mode), and a pod's
//! opaque ports go to its `Origin`. Ids are never rewritten with other content: a changed
//! policy gets a new id, namespaces and cgroups switch to it, then the old id is removed.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use agent_common::{KernelPolicy, POLICY_INJECT_DISABLED};
use parking_lot::Mutex;

use super::{Policy, WorkloadPolicy};
use crate::{
    config::PortSet,
    intercept::{InterceptError, PolicyMaps, ServedNetnsMap, port_bitmap},
    netns::Origin,
};

/// A served pod, as the enforcer sees it.
pub struct PodWorkload {
    pub namespace: String,
    pub name: String,
    pub origin: Arc<Origin>,
}

pub struct Enforcer {
    state: Mutex<State>,
    /// The meshed cgroup (host-mode selectors match cgroups at or below it).
    cgroup_root: PathBuf,
    /// The cgroup2 mount: selector paths are relative to it.
    cgroup_mount: PathBuf,
    /// The agent's own namespace: host-mode connections find their cgroup's opaque ports here.
    host: Arc<Origin>,
}

struct State {
    maps: PolicyMaps,
    policy: Arc<Policy>,
    /// Live ids and their content.
    ids: Vec<(WorkloadPolicy, u32)>,
    next_id: u32,
    /// The effective policy per workload, for /config.json.
    effective: serde_json::Value,
    /// Whose entry each `effective["pods"]` key is (the pod's netns cookie): a pod removed
    /// after another of the same name was added must not take the new one's entry along.
    pod_entries: HashMap<String, u64>,
}

impl Enforcer {
    /// `cgroups`: the meshed cgroup and the cgroup2 mount.
    pub fn new(
        maps: PolicyMaps,
        policy: Arc<Policy>,
        (cgroup_root, mount): (&Path, &Path),
        host: Arc<Origin>,
    ) -> Self {
        Self {
            state: Mutex::new(State {
                maps,
                policy,
                ids: Vec::new(),
                next_id: 1,
                effective: serde_json::json!({}),
                pod_entries: HashMap::new(),
            }),
            cgroup_root: cgroup_root.to_path_buf(),
            cgroup_mount: mount.to_path_buf(),
            host,
        }
    }

    /// A new pod's policy id (0: none), and its opaque ports set on its origin. Called before
    /// the pod's namespace is served, so its first connect already follows its policy.
    pub fn for_new_pod(&self, pod: &PodWorkload) -> Result<u32, InterceptError> {
        let mut state = self.state.lock();
        let workload = state.policy.for_pod(&pod.namespace, &pod.name);
        *pod.origin.policy_opaque_ports.write() = workload.opaque_ports.clone();
        if workload != WorkloadPolicy::default()
            && let Some(pods) = state.effective["pods"].as_object_mut()
        {
            let key = pod_key(&pod.namespace, &pod.name);
            pods.insert(key.clone(), json(&workload));
            state.pod_entries.insert(key, pod.origin.netns_cookie);
        }
        state.id_for(&workload)
    }

    /// Takes a pod that is no longer served (removed, or its ADD failed) out of the effective
    /// policy, which would otherwise list every pod the agent ever served.
    pub fn forget_pod(&self, namespace: &str, name: &str, netns_cookie: u64) {
        let mut state = self.state.lock();
        let key = pod_key(namespace, name);
        if state.pod_entries.get(&key) != Some(&netns_cookie) {
            return;
        }
        state.pod_entries.remove(&key);
        if let Some(pods) = state.effective["pods"].as_object_mut() {
            pods.remove(&key);
        }
    }

    /// Applies `policy` (a new one, or the same after pods or cgroups changed) to every served
    /// pod and to the cgroups below the meshed one, then drops the ids nobody uses.
    pub fn apply(
        &self,
        policy: Arc<Policy>,
        pods: &[PodWorkload],
        served: &ServedNetnsMap,
    ) -> Result<(), InterceptError> {
        let mut state = self.state.lock();
        state.policy = policy;
        let mut used = Vec::new();
        let mut effective_pods = serde_json::Map::new();
        state.pod_entries.clear();
        for pod in pods {
            let workload = state.policy.for_pod(&pod.namespace, &pod.name);
            let id = state.id_for(&workload)?;
            served.set_policy(pod.origin.netns_cookie, id)?;
            *pod.origin.policy_opaque_ports.write() = workload.opaque_ports.clone();
            used.push(id);
            if workload != WorkloadPolicy::default() {
                let key = pod_key(&pod.namespace, &pod.name);
                effective_pods.insert(key.clone(), json(&workload));
                state.pod_entries.insert(key, pod.origin.netns_cookie);
            }
        }
        let mut effective_cgroups = serde_json::Map::new();
        let mut selected = Vec::new();
        let mut opaque_by_cgroup = HashMap::new();
        for (cgroup_id, path) in self.cgroups_below_root() {
            let workload = state.policy.for_cgroup(&path);
            if workload == WorkloadPolicy::default() {
                continue;
            }
            let id = state.id_for(&workload)?;
            state.maps.set_cgroup(cgroup_id, id)?;
            selected.push(cgroup_id);
            used.push(id);
            if workload.opaque_ports != PortSet::default() {
                opaque_by_cgroup.insert(cgroup_id, workload.opaque_ports.clone());
            }
            effective_cgroups.insert(path, json(&workload));
        }
        *self.host.cgroup_opaque_ports.write() = opaque_by_cgroup;
        for stale in state.maps.cgroups() {
            if !selected.contains(&stale) {
                state.maps.remove_cgroup(stale);
            }
        }
        state.drop_unused(&used);
        state.effective = serde_json::json!({
            "pods": effective_pods,
            "cgroups": effective_cgroups,
        });
        Ok(())
    }

    /// The effective non-default policy per pod and per cgroup.
    pub fn effective(&self) -> serde_json::Value {
        self.state.lock().effective.clone()
    }

    /// Whether the policy has cgroup selectors (whose matches change as cgroups come and go).
    pub fn selects_cgroups(&self) -> bool {
        self.state.lock().policy.has_cgroup_entries()
    }

    fn cgroups_below_root(&self) -> Vec<(u64, String)> {
        crate::cgroup::subtree(&self.cgroup_root, &self.cgroup_mount)
    }
}

fn pod_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl State {
    /// The id of `workload`'s content, written to the kernel the first time; 0 for the
    /// default (nothing beyond the node-wide lists).
    fn id_for(&mut self, workload: &WorkloadPolicy) -> Result<u32, InterceptError> {
        if *workload == WorkloadPolicy::default() {
            return Ok(0);
        }
        if let Some((_, id)) = self.ids.iter().find(|(known, _)| known == workload) {
            return Ok(*id);
        }
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        self.maps.write(id, &kernel_policy(workload))?;
        self.ids.push((workload.clone(), id));
        Ok(id)
    }

    fn drop_unused(&mut self, used: &[u32]) {
        let (kept, dropped): (Vec<_>, Vec<_>) =
            self.ids.drain(..).partition(|(_, id)| used.contains(id));
        for (_, id) in dropped {
            self.maps.remove(id);
        }
        self.ids = kept;
    }
}

fn kernel_policy(workload: &WorkloadPolicy) -> KernelPolicy {
    KernelPolicy {
        flags: if workload.inject_disabled {
            POLICY_INJECT_DISABLED
        } else {
            0
        },
        pad: 0,
        skip_outbound: port_bitmap(&workload.skip_outbound_ports),
        skip_inbound: port_bitmap(&workload.skip_inbound_ports),
    }
}

fn json(workload: &WorkloadPolicy) -> serde_json::Value {
    serde_json::to_value(workload).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use agent_common::skip_port_slot;

    use crate::config::PortSet;

    use super::*;

    #[test]
    fn bitmaps_hold_every_port_of_the_set() {
        let ports: PortSet = "1,64,65535,100-101".parse().unwrap();
        let words = port_bitmap(&ports);
        for port in [1u16, 64, 65535, 100, 101] {
            let (word, bit) = skip_port_slot(port);
            assert_ne!(words[word as usize] & bit, 0, "{port}");
        }
        let set: u32 = words.iter().map(|w| w.count_ones()).sum();
        assert_eq!(set, 5);
    }

    #[test]
    fn inject_disabled_is_a_kernel_flag() {
        let workload = WorkloadPolicy {
            inject_disabled: true,
            ..WorkloadPolicy::default()
        };
        assert_eq!(kernel_policy(&workload).flags, POLICY_INJECT_DISABLED);
    }
}
