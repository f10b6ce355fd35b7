//! The per-workload policy: which ports a workload skips or treats as opaque, and whether it
//! is meshed at all, with Linkerd's annotation names and meanings.
//!
//! The file (`--policy PATH`; in the DaemonSet a ConfigMap mounted as a file) is YAML, and
//! JSON, being YAML, works too:
//!
//! ```yaml
//! # sockmesh policy: per-workload settings with Linkerd's annotation names.
//! workloads:
//!   - namespace: payments        # pod mode: Kubernetes namespace, glob (* and ?)
//!     pod: "db-*"                # pod mode: pod name, glob; omitted = every pod
//!     annotations:
//!       config.linkerd.io/opaque-ports: "5433"
//!       config.linkerd.io/skip-inbound-ports: "9000,9100-9110"
//!       config.linkerd.io/skip-outbound-ports: "25"
//!   - cgroup: "/system.slice/legacy-*.service"   # host mode: cgroup v2 path under the cgroup root, glob
//!     annotations:
//!       linkerd.io/inject: disabled
//! ```
//!
//! - An entry selects pods (`namespace`, required, and `pod`, default `*`) or a host cgroup
//!   (`cgroup`, an absolute path under the cgroup v2 root), never both. In names `*` matches
//!   anything; in a cgroup path `*` and `?` stay within one `/`-separated component.
//! - Port lists are the flags' syntax (`80,443,4000-4100`); a single port may be a YAML number.
//!   `linkerd.io/inject` is `enabled` or `disabled`.
//! - Annotation keys other than the four above are ignored and reported (a ConfigMap copied
//!   from real pod annotations carries many); unknown fields elsewhere are errors.
//! - Where several entries match a workload, the port lists are the union of them all, and
//!   the last entry that sets `linkerd.io/inject` decides it. The caller adds the result to
//!   the node-wide lists (`Config`).
//! - An empty file, or `workloads: []`, is an empty policy. At most [`MAX_ENTRIES`] entries
//!   and [`MAX_FILE_BYTES`] bytes.
//!
//! Errors name entries as the YAML parser does, `workloads[0]` being the first (0-based).
//!
//! [`WorkloadPolicy`] is the internal form, independent of the source: the file today, a
//! pod's own annotations from the Kubernetes API later ([`WorkloadPolicy::from_annotations`]).
//! [`PolicyWatcher`] reloads the file when its content changes.

pub mod enforce;
mod glob;
mod watch;

use std::{collections::BTreeSet, fmt, io, path::Path, path::PathBuf};

use serde::Deserialize;
use serde_norway::Value;

use crate::config::{PortError, PortSet};

pub use watch::{Loaded, PolicyWatcher};

/// The largest policy file accepted.
pub const MAX_FILE_BYTES: usize = 1024 * 1024;
/// The most workload entries a policy may have.
pub const MAX_ENTRIES: usize = 1024;

/// Ports whose outbound connections are not proxied (added to `--skip-outbound-ports`).
pub const SKIP_OUTBOUND_PORTS: &str = "config.linkerd.io/skip-outbound-ports";
/// Ports whose inbound connections are not proxied.
pub const SKIP_INBOUND_PORTS: &str = "config.linkerd.io/skip-inbound-ports";
/// Ports forwarded as opaque TCP without protocol detection (added to `--opaque-ports`).
pub const OPAQUE_PORTS: &str = "config.linkerd.io/opaque-ports";
/// `disabled` leaves the workload unmeshed; `enabled` meshes it (overriding an earlier entry).
pub const INJECT: &str = "linkerd.io/inject";

/// Settings for one workload, from whatever source (file today, Kubernetes API later).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadPolicy {
    #[serde(serialize_with = "as_text")]
    pub skip_outbound_ports: PortSet,
    #[serde(serialize_with = "as_text")]
    pub skip_inbound_ports: PortSet,
    #[serde(serialize_with = "as_text")]
    pub opaque_ports: PortSet,
    pub inject_disabled: bool,
}

impl WorkloadPolicy {
    /// A workload's settings from its annotations (string to string, as the Kubernetes API
    /// gives them), and the keys ignored (sorted, without duplicates).
    pub fn from_annotations<'a>(
        annotations: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<(WorkloadPolicy, Vec<String>), AnnotationError> {
        let mut settings = Settings::default();
        let mut ignored = BTreeSet::new();
        for (key, value) in annotations {
            settings.apply(key, Ok(value), &mut ignored)?;
        }
        let mut policy = WorkloadPolicy::default();
        settings.merge_into(&mut policy);
        Ok((policy, ignored.into_iter().collect()))
    }
}

fn as_text<S: serde::Serializer>(value: &PortSet, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// A bad value for one of the annotations the agent reads.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    #[error("{key}: '{value}' is not a port list such as \"80,443,4000-4100\": {error}")]
    Ports {
        key: String,
        value: String,
        error: PortError,
    },
    #[error("{key}: expected a port list as a string (or a single port number), found {found}")]
    NotText { key: String, found: String },
    #[error("{key}: '{value}' is neither `enabled` nor `disabled`")]
    Inject { key: String, value: String },
}

/// Why a policy was rejected. Each message is complete on its own (no `source()` chain to
/// print): the file, the entry, the key and the value where they apply.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read the policy file {}: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    #[error("the policy file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    /// A problem with the content; `error` is never `InFile` itself.
    #[error("policy file {}: {error}", path.display())]
    InFile {
        path: PathBuf,
        error: Box<PolicyError>,
    },
    #[error("the policy is larger than {MAX_FILE_BYTES} bytes (1 MiB): remove or merge entries")]
    TooLarge,
    #[error("the policy is not UTF-8 text")]
    NotUtf8,
    #[error("the policy is not valid YAML in the policy format: {0}")]
    Syntax(String),
    #[error(
        "the policy has more than one YAML document (a `---` line): put every entry under one `workloads:`"
    )]
    MultipleDocuments,
    #[error("the policy has {count} workload entries, more than the limit of {MAX_ENTRIES}")]
    TooManyEntries { count: usize },
    #[error(
        "workloads[{entry}]: has both a pod selector (namespace/pod) and cgroup; an entry selects pods or a cgroup, so split it in two"
    )]
    BothSelectors { entry: usize },
    #[error(
        "workloads[{entry}]: no selector; give `namespace` (and optionally `pod`) for pods, or `cgroup` for a host cgroup"
    )]
    NoSelector { entry: usize },
    #[error(
        "workloads[{entry}]: `pod` needs a `namespace` too (namespace: \"*\" for every namespace)"
    )]
    PodWithoutNamespace { entry: usize },
    #[error("workloads[{entry}]: `{field}` is empty (\"*\" matches everything)")]
    EmptySelector { entry: usize, field: &'static str },
    #[error(
        "workloads[{entry}]: cgroup '{value}' is not an absolute path under the cgroup root, such as \"/system.slice/*.service\""
    )]
    CgroupNotAbsolute { entry: usize, value: String },
    #[error("workloads[{entry}]: annotation key {key} is not a string")]
    AnnotationKey { entry: usize, key: String },
    #[error("workloads[{entry}] ({selector}): annotation {error}")]
    Annotation {
        entry: usize,
        selector: String,
        error: AnnotationError,
    },
}

impl PolicyError {
    /// The error without the file it was found in (`InFile` unwrapped), for matching on.
    pub fn without_path(&self) -> &PolicyError {
        match self {
            PolicyError::InFile { error, .. } => error,
            other => other,
        }
    }

    fn in_file(self, path: &Path) -> PolicyError {
        match self {
            PolicyError::InFile { .. }
            | PolicyError::Read { .. }
            | PolicyError::NotAFile { .. } => self,
            error => PolicyError::InFile {
                path: path.to_path_buf(),
                error: Box::new(error),
            },
        }
    }
}

/// The parsed policy file: its entries, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    entries: Vec<Entry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    selector: Selector,
    settings: Settings,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Selector {
    Pod { namespace: String, pod: String },
    Cgroup(String),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Pod { namespace, pod } => write!(f, "namespace {namespace}, pod {pod}"),
            Selector::Cgroup(path) => write!(f, "cgroup {path}"),
        }
    }
}

/// One entry's annotations, interpreted; `inject_disabled` is None where the entry does not
/// set `linkerd.io/inject`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Settings {
    skip_outbound_ports: PortSet,
    skip_inbound_ports: PortSet,
    opaque_ports: PortSet,
    inject_disabled: Option<bool>,
}

impl Settings {
    /// Applies one annotation; `value` is its text, or Err(the YAML value) when not a scalar
    /// that reads as text.
    fn apply(
        &mut self,
        key: &str,
        value: Result<&str, &str>,
        ignored: &mut BTreeSet<String>,
    ) -> Result<(), AnnotationError> {
        let ports = match key {
            SKIP_OUTBOUND_PORTS => &mut self.skip_outbound_ports,
            SKIP_INBOUND_PORTS => &mut self.skip_inbound_ports,
            OPAQUE_PORTS => &mut self.opaque_ports,
            INJECT => {
                self.inject_disabled = Some(match value {
                    Ok("disabled") => true,
                    Ok("enabled") => false,
                    Ok(value) | Err(value) => {
                        return Err(AnnotationError::Inject {
                            key: key.to_string(),
                            value: value.to_string(),
                        });
                    }
                });
                return Ok(());
            }
            _ => {
                ignored.insert(key.to_string());
                return Ok(());
            }
        };
        let text = value.map_err(|found| AnnotationError::NotText {
            key: key.to_string(),
            found: found.to_string(),
        })?;
        let parsed: PortSet = text.parse().map_err(|error| AnnotationError::Ports {
            key: key.to_string(),
            value: text.to_string(),
            error,
        })?;
        *ports = std::mem::take(ports).with(&parsed);
        Ok(())
    }

    fn merge_into(&self, policy: &mut WorkloadPolicy) {
        for (into, from) in [
            (&mut policy.skip_outbound_ports, &self.skip_outbound_ports),
            (&mut policy.skip_inbound_ports, &self.skip_inbound_ports),
            (&mut policy.opaque_ports, &self.opaque_ports),
        ] {
            *into = std::mem::take(into).with(from);
        }
        if let Some(disabled) = self.inject_disabled {
            policy.inject_disabled = disabled;
        }
    }
}

// The file as written; validated into `Policy`.
#[derive(Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a policy: a mapping with a `workloads:` list"
)]
struct RawFile {
    #[serde(default)]
    workloads: Option<Vec<RawEntry>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a workload entry: a mapping with `namespace` (and `pod`) or `cgroup`, and `annotations`"
)]
struct RawEntry {
    namespace: Option<String>,
    pod: Option<String>,
    cgroup: Option<String>,
    // A YAML mapping rejects duplicate keys.
    #[serde(default)]
    annotations: Option<serde_norway::Mapping>,
}

impl Policy {
    /// Parses a policy's text; returns it with the annotation keys it ignored (sorted, each
    /// once) for the caller to log.
    pub fn parse(text: &str) -> Result<(Policy, Vec<String>), PolicyError> {
        if text.len() > MAX_FILE_BYTES {
            return Err(PolicyError::TooLarge);
        }
        let raw = parse_document(text)?;
        let raw_entries = raw.workloads.unwrap_or_default();
        if raw_entries.len() > MAX_ENTRIES {
            return Err(PolicyError::TooManyEntries {
                count: raw_entries.len(),
            });
        }
        let mut ignored = BTreeSet::new();
        let entries = raw_entries
            .into_iter()
            .enumerate()
            .map(|(index, raw)| Entry::validate(index, raw, &mut ignored))
            .collect::<Result<_, _>>()?;
        Ok((Policy { entries }, ignored.into_iter().collect()))
    }

    /// Reads (at most [`MAX_FILE_BYTES`], following symlinks) and parses the policy file.
    pub fn load(path: &Path) -> Result<(Policy, Vec<String>), PolicyError> {
        let bytes = read_capped(path)?;
        parse_bytes(path, &bytes)
    }

    /// The settings for a pod: every pod entry matching both names, merged.
    pub fn for_pod(&self, namespace: &str, pod: &str) -> WorkloadPolicy {
        self.merged(|selector| match selector {
            Selector::Pod {
                namespace: namespace_glob,
                pod: pod_glob,
            } => glob::matches(namespace_glob, namespace) && glob::matches(pod_glob, pod),
            Selector::Cgroup(_) => false,
        })
    }

    /// The settings for a host cgroup, by its path under the cgroup v2 root
    /// (`/system.slice/x.service`): every cgroup entry matching it, merged.
    pub fn for_cgroup(&self, cgroup_path: &str) -> WorkloadPolicy {
        self.merged(|selector| match selector {
            Selector::Cgroup(glob) => glob::matches_path(glob, cgroup_path),
            Selector::Pod { .. } => false,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether any entry selects host cgroups.
    pub fn has_cgroup_entries(&self) -> bool {
        self.entries
            .iter()
            .any(|entry| matches!(entry.selector, Selector::Cgroup(_)))
    }

    /// The number of workload entries.
    pub fn entries(&self) -> usize {
        self.entries.len()
    }

    fn merged(&self, selects: impl Fn(&Selector) -> bool) -> WorkloadPolicy {
        let mut policy = WorkloadPolicy::default();
        for entry in self.entries.iter().filter(|entry| selects(&entry.selector)) {
            entry.settings.merge_into(&mut policy);
        }
        policy
    }
}

impl Entry {
    fn validate(
        entry: usize,
        raw: RawEntry,
        ignored: &mut BTreeSet<String>,
    ) -> Result<Entry, PolicyError> {
        let nonempty = |field: &'static str, value: String| {
            if value.is_empty() {
                Err(PolicyError::EmptySelector { entry, field })
            } else {
                Ok(value)
            }
        };
        let selector = match (raw.namespace, raw.pod, raw.cgroup) {
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                return Err(PolicyError::BothSelectors { entry });
            }
            (None, None, None) => return Err(PolicyError::NoSelector { entry }),
            (None, Some(_), None) => return Err(PolicyError::PodWithoutNamespace { entry }),
            (Some(namespace), pod, None) => Selector::Pod {
                namespace: nonempty("namespace", namespace)?,
                pod: nonempty("pod", pod.unwrap_or_else(|| "*".to_string()))?,
            },
            (None, None, Some(cgroup)) => {
                if !cgroup.starts_with('/') {
                    return Err(PolicyError::CgroupNotAbsolute {
                        entry,
                        value: cgroup,
                    });
                }
                Selector::Cgroup(cgroup)
            }
        };
        let mut settings = Settings::default();
        for (key, value) in raw.annotations.unwrap_or_default() {
            let Value::String(key) = key else {
                return Err(PolicyError::AnnotationKey {
                    entry,
                    key: yaml_text(&key),
                });
            };
            let text = match &value {
                Value::String(text) => Ok(text.clone()),
                Value::Number(number) if number.is_i64() || number.is_u64() => {
                    Ok(number.to_string())
                }
                other => Err(yaml_text(other)),
            };
            let text = text.as_deref().map_err(String::as_str);
            settings
                .apply(&key, text, ignored)
                .map_err(|error| PolicyError::Annotation {
                    entry,
                    selector: selector.to_string(),
                    error,
                })?;
        }
        Ok(Entry { selector, settings })
    }
}

/// A YAML value as the user would write it, for messages.
fn yaml_text(value: &Value) -> String {
    match value {
        Value::Null => "nothing (null)".to_string(),
        Value::String(text) => format!("{text:?}"),
        other => serde_norway::to_string(other)
            .map(|text| text.trim_end().to_string())
            .unwrap_or_else(|_| format!("{other:?}")),
    }
}

fn parse_document(text: &str) -> Result<RawFile, PolicyError> {
    let mut documents = serde_norway::Deserializer::from_str(text);
    // No document at all: an empty file, or one of comments only.
    let Some(document) = documents.next() else {
        return Ok(RawFile::default());
    };
    let raw = RawFile::deserialize(document).map_err(|err| PolicyError::Syntax(err.to_string()))?;
    if documents.next().is_some() {
        return Err(PolicyError::MultipleDocuments);
    }
    Ok(raw)
}

/// The file's bytes through `path` (symlinks followed), at most one byte over the limit.
fn read_capped(path: &Path) -> Result<Vec<u8>, PolicyError> {
    use std::io::Read;

    let read_error = |error| PolicyError::Read {
        path: path.to_path_buf(),
        error,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    // Not a FIFO or device, which could block or never end.
    if !file.metadata().map_err(read_error)?.is_file() {
        return Err(PolicyError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    Ok(bytes)
}

fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<(Policy, Vec<String>), PolicyError> {
    if bytes.len() > MAX_FILE_BYTES {
        return Err(PolicyError::TooLarge.in_file(path));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| PolicyError::NotUtf8.in_file(path))?;
    Policy::parse(text).map_err(|error| error.in_file(path))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = r#"
# sockmesh policy: per-workload settings with Linkerd's annotation names.
workloads:
  - namespace: payments        # pod mode: Kubernetes namespace, glob (* and ?)
    pod: "db-*"                # pod mode: pod name, glob; omitted = every pod
    annotations:
      config.linkerd.io/opaque-ports: "5433"
      config.linkerd.io/skip-inbound-ports: "9000,9100-9110"
      config.linkerd.io/skip-outbound-ports: "25"
  - cgroup: "/system.slice/legacy-*.service"   # host mode: cgroup v2 path under the cgroup root, glob
    annotations:
      linkerd.io/inject: disabled
"#;

    /// A unique scratch directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("sockmesh-policy-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn parse(text: &str) -> Policy {
        let (policy, ignored) = Policy::parse(text).expect("valid policy");
        assert!(ignored.is_empty(), "ignored: {ignored:?}");
        policy
    }

    fn error(text: &str) -> PolicyError {
        Policy::parse(text).expect_err("invalid policy")
    }

    #[test]
    fn example_parses_and_selects_pods() {
        let policy = parse(EXAMPLE);
        assert_eq!(policy.entries(), 2);
        assert!(!policy.is_empty());
        let db = policy.for_pod("payments", "db-0");
        assert_eq!(db.opaque_ports.to_string(), "5433");
        assert_eq!(db.skip_inbound_ports.to_string(), "9000,9100-9110");
        assert_eq!(db.skip_outbound_ports.to_string(), "25");
        assert!(db.skip_inbound_ports.contains(9105) && !db.skip_inbound_ports.contains(9050));
        assert!(!db.inject_disabled);
        // The cgroup entry never applies to pods.
        assert_eq!(
            policy.for_pod("payments", "web-0"),
            WorkloadPolicy::default()
        );
        assert_eq!(policy.for_pod("other", "db-0"), WorkloadPolicy::default());
    }

    #[test]
    fn example_selects_cgroups() {
        let policy = parse(EXAMPLE);
        let legacy = policy.for_cgroup("/system.slice/legacy-billing.service");
        assert!(legacy.inject_disabled);
        assert_eq!(legacy.opaque_ports, PortSet::default());
        assert_eq!(
            policy.for_cgroup("/system.slice/nginx.service"),
            WorkloadPolicy::default()
        );
        // `*` does not cross `/`, and pod entries never apply to cgroups.
        assert!(
            !policy
                .for_cgroup("/system.slice/legacy-a/b.service")
                .inject_disabled
        );
        assert_eq!(
            policy.for_cgroup("/payments/db-0"),
            WorkloadPolicy::default()
        );
    }

    #[test]
    fn json_is_accepted() {
        let policy = parse(
            r#"{"workloads": [{"namespace": "a", "annotations": {"config.linkerd.io/opaque-ports": 5433}}]}"#,
        );
        assert!(policy.for_pod("a", "x").opaque_ports.contains(5433));
    }

    #[test]
    fn matching_entries_are_unioned_and_last_inject_wins() {
        let policy = parse(
            r#"
workloads:
  - namespace: "*"
    annotations:
      config.linkerd.io/skip-outbound-ports: "25"
      linkerd.io/inject: disabled
  - namespace: pay*
    pod: db-?
    annotations:
      config.linkerd.io/skip-outbound-ports: 3306
      config.linkerd.io/opaque-ports: "5432-5433"
      linkerd.io/inject: enabled
  - namespace: payments
    annotations:
      config.linkerd.io/opaque-ports: "6379"
"#,
        );
        let db = policy.for_pod("payments", "db-1");
        assert_eq!(db.skip_outbound_ports.to_string(), "25,3306");
        assert_eq!(db.opaque_ports.to_string(), "5432-5433,6379");
        // The second entry sets inject last; the third does not set it.
        assert!(!db.inject_disabled);
        let web = policy.for_pod("payments", "web");
        assert_eq!(web.skip_outbound_ports.to_string(), "25");
        assert_eq!(web.opaque_ports.to_string(), "6379");
        assert!(web.inject_disabled);
        let other = policy.for_pod("kube-system", "coredns");
        assert!(other.inject_disabled);
        assert_eq!(other.opaque_ports, PortSet::default());
    }

    #[test]
    fn serializes_ports_as_text() {
        let db = parse(EXAMPLE).for_pod("payments", "db-0");
        let json = serde_json::to_value(&db).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "skip_outbound_ports": "25",
                "skip_inbound_ports": "9000,9100-9110",
                "opaque_ports": "5433",
                "inject_disabled": false,
            })
        );
    }

    #[test]
    fn empty_policies() {
        for text in [
            "",
            "\n",
            "# only a comment\n",
            "workloads: []",
            "workloads:",
            "---\n",
            "{}",
        ] {
            let policy = parse(text);
            assert!(policy.is_empty(), "{text:?}");
            assert_eq!(policy.entries(), 0);
            assert_eq!(policy.for_pod("a", "b"), WorkloadPolicy::default());
        }
        assert!(Policy::default().is_empty());
    }

    #[test]
    fn ignored_annotations_are_reported() {
        let (policy, ignored) = Policy::parse(
            r#"
workloads:
  - namespace: a
    annotations:
      config.linkerd.io/proxy-cpu-limit: 1.5
      config.linkerd.io/opaque-ports: "80"
      config.alpha.linkerd.io/proxy-wait-before-exit-seconds: "10"
  - namespace: b
    annotations:
      config.linkerd.io/proxy-cpu-limit: "2"
      linkerd.io/created-by: {nested: true}
"#,
        )
        .unwrap();
        assert_eq!(policy.entries(), 2);
        assert_eq!(
            ignored,
            [
                "config.alpha.linkerd.io/proxy-wait-before-exit-seconds",
                "config.linkerd.io/proxy-cpu-limit",
                "linkerd.io/created-by"
            ]
        );
    }

    #[test]
    fn both_selectors_is_an_error() {
        let err = error("workloads:\n  - namespace: a\n  - namespace: a\n    cgroup: /x\n");
        assert!(
            matches!(err, PolicyError::BothSelectors { entry: 1 }),
            "{err}"
        );
        assert!(err.to_string().contains("workloads[1]"), "{err}");
        assert!(matches!(
            error("workloads: [{pod: a, cgroup: /x}]"),
            PolicyError::BothSelectors { entry: 0 }
        ));
    }

    #[test]
    fn no_selector_is_an_error() {
        let err = error("workloads:\n  - annotations:\n      linkerd.io/inject: disabled\n");
        assert!(matches!(err, PolicyError::NoSelector { entry: 0 }), "{err}");
        assert!(
            err.to_string().contains("workloads[0]: no selector"),
            "{err}"
        );
        assert!(matches!(
            error("workloads: [{pod: db}]"),
            PolicyError::PodWithoutNamespace { entry: 0 }
        ));
        assert!(matches!(
            error("workloads: [{namespace: \"\"}]"),
            PolicyError::EmptySelector {
                entry: 0,
                field: "namespace"
            }
        ));
        let err = error("workloads: [{cgroup: system.slice/x.service}]");
        assert!(
            matches!(err, PolicyError::CgroupNotAbsolute { entry: 0, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("'system.slice/x.service'"),
            "{err}"
        );
    }

    #[test]
    fn bad_port_is_an_error() {
        let err = error(
            "workloads:\n  - namespace: a\n    annotations:\n      config.linkerd.io/opaque-ports: \"80,http\"\n",
        );
        let message = err.to_string();
        assert!(
            matches!(
                &err,
                PolicyError::Annotation { entry: 0, error: AnnotationError::Ports { key, value, error: PortError::NotAPort(port) }, .. }
                    if key == OPAQUE_PORTS && value == "80,http" && port == "http"
            ),
            "{err:?}"
        );
        assert_eq!(
            message,
            "workloads[0] (namespace a, pod *): annotation config.linkerd.io/opaque-ports: \
             '80,http' is not a port list such as \"80,443,4000-4100\": 'http' is not a port number (0-65535)"
        );
        for value in ["70000", "-1", "1.5", "true", "[80]", "~"] {
            let text = format!(
                "workloads: [{{namespace: a, annotations: {{config.linkerd.io/skip-inbound-ports: {value}}}}}]"
            );
            let err = error(&text);
            assert!(
                matches!(err, PolicyError::Annotation { .. }),
                "{value}: {err}"
            );
        }
    }

    #[test]
    fn backwards_range_is_an_error() {
        let err = error(
            "workloads: [{cgroup: /a, annotations: {config.linkerd.io/skip-outbound-ports: \"9-3\"}}]",
        );
        assert!(
            matches!(
                &err,
                PolicyError::Annotation {
                    error: AnnotationError::Ports {
                        error: PortError::Backwards { first: 9, last: 3 },
                        ..
                    },
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("cgroup /a"), "{err}");
    }

    #[test]
    fn bad_inject_value_is_an_error() {
        let err = error("workloads: [{namespace: a, annotations: {linkerd.io/inject: ingress}}]");
        assert!(
            matches!(&err, PolicyError::Annotation { error: AnnotationError::Inject { value, .. }, .. } if value == "ingress"),
            "{err:?}"
        );
        assert!(err.to_string().contains("'ingress'"), "{err}");
        assert!(matches!(
            error("workloads: [{namespace: a, annotations: {linkerd.io/inject: false}}]"),
            PolicyError::Annotation {
                error: AnnotationError::Inject { .. },
                ..
            }
        ));
    }

    #[test]
    fn unknown_fields_are_errors() {
        let err = error("workloads:\n  - namespce: a\n");
        assert!(matches!(err, PolicyError::Syntax(_)), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("namespce") && message.contains("workloads[0]"),
            "{message}"
        );
        let err = error("workload:\n  - namespace: a\n");
        assert!(
            err.to_string().contains("unknown field `workload`"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_annotation_is_an_error() {
        let err = error(
            "workloads:\n  - namespace: a\n    annotations:\n      linkerd.io/inject: disabled\n      linkerd.io/inject: enabled\n",
        );
        assert!(err.to_string().contains("duplicate"), "{err}");
    }

    #[test]
    fn too_many_entries_is_an_error() {
        let entries = "  - namespace: a\n".repeat(MAX_ENTRIES);
        assert_eq!(
            parse(&format!("workloads:\n{entries}")).entries(),
            MAX_ENTRIES
        );
        let text = format!("workloads:\n{entries}  - namespace: b\n");
        assert!(matches!(
            error(&text),
            PolicyError::TooManyEntries { count } if count == MAX_ENTRIES + 1
        ));
    }

    #[test]
    fn oversized_file_is_an_error() {
        let text = format!("# {}\nworkloads: []\n", "x".repeat(MAX_FILE_BYTES));
        assert!(matches!(error(&text), PolicyError::TooLarge));
        let dir = TempDir::new("oversized");
        let path = dir.0.join("policy.yaml");
        std::fs::write(&path, &text).unwrap();
        let err = Policy::load(&path).expect_err("too large");
        assert!(
            matches!(err.without_path(), PolicyError::TooLarge),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn not_yaml_is_an_error() {
        for text in [
            "workloads: [unclosed",
            "{{{{",
            "\tworkloads: []",
            "just a string",
            "- a list",
            "workloads: 5",
            "workloads: [5]",
            "workloads: []\n---\nworkloads: []\n",
        ] {
            let err = error(text);
            assert!(
                matches!(err, PolicyError::Syntax(_) | PolicyError::MultipleDocuments),
                "{text:?}: {err:?}"
            );
        }
        let dir = TempDir::new("binary");
        let path = dir.0.join("policy.yaml");
        std::fs::write(&path, [0xff, 0xfe, 0x00, 0x80]).unwrap();
        let err = Policy::load(&path).expect_err("not UTF-8");
        assert!(
            matches!(err.without_path(), PolicyError::NotUtf8),
            "{err:?}"
        );
    }

    #[test]
    fn hostile_yaml_is_refused_without_panic() {
        // Alias expansion ("billion laughs") and deep nesting, where any value is taken: under
        // an annotation the agent ignores.
        let mut bomb = String::from(
            "workloads:\n  - namespace: a\n    annotations:\n      k0: &a0 [x, x, x, x, x, x, x, x, x, x]\n",
        );
        for level in 1..12 {
            let prev = format!("*a{}", level - 1);
            let list = vec![prev; 10].join(", ");
            bomb.push_str(&format!("      k{level}: &a{level} [{list}]\n"));
        }
        let err = Policy::parse(&bomb).expect_err("alias bomb");
        assert!(err.to_string().contains("repetition limit"), "{err}");
        let deep = format!(
            "workloads: [{{namespace: a, annotations: {{k: {}{}}}}}]",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let err = Policy::parse(&deep).expect_err("deep nesting");
        assert!(err.to_string().contains("recursion limit"), "{err}");
    }

    #[test]
    fn load_reads_files_and_names_them() {
        let dir = TempDir::new("load");
        let path = dir.0.join("policy.yaml");
        std::fs::write(&path, EXAMPLE).unwrap();
        let (policy, ignored) = Policy::load(&path).unwrap();
        assert_eq!((policy.entries(), ignored.len()), (2, 0));
        let err = Policy::load(&dir.0.join("missing.yaml")).expect_err("missing");
        assert!(matches!(err, PolicyError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("missing.yaml"), "{err}");
        assert!(matches!(
            Policy::load(&dir.0),
            Err(PolicyError::NotAFile { .. })
        ));
        std::fs::write(&path, "workloads: [{namespace: a, pod: b, cgroup: /c}]").unwrap();
        let err = Policy::load(&path).expect_err("bad");
        assert!(matches!(
            err.without_path(),
            PolicyError::BothSelectors { entry: 0 }
        ));
        assert!(
            err.to_string()
                .starts_with(&format!("policy file {}: workloads[0]", path.display()))
        );
    }

    #[test]
    fn from_annotations_reads_a_pods_annotations() {
        let (policy, ignored) = WorkloadPolicy::from_annotations([
            (OPAQUE_PORTS, "5433"),
            (INJECT, "disabled"),
            ("linkerd.io/control-plane-ns", "linkerd"),
        ])
        .unwrap();
        assert!(policy.inject_disabled && policy.opaque_ports.contains(5433));
        assert_eq!(ignored, ["linkerd.io/control-plane-ns"]);
        assert!(matches!(
            WorkloadPolicy::from_annotations([(SKIP_INBOUND_PORTS, "x")]),
            Err(AnnotationError::Ports { .. })
        ));
    }
}
