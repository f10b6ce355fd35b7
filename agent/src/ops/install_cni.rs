//! `sockmesh install-cni`: puts `sockmesh-cni` on the node and chains it into the node's CNI
//! network config, the way linkerd-cni and istio-cni do, then keeps it there until told to stop.
//!
//! - The plugin binary is copied into the runtime's CNI bin dir atomically (temp file, rename).
//! - The node's network config is the one the runtime uses: the lexicographically first
//!   `*.conflist` / `*.conf` / `*.json` file in the conf dir. A single-plugin `.conf` is
//!   converted to a `.conflist` (the runtime reads a file's format from its extension). Our
//!   entry, `{"type":"sockmesh-cni","agent_socket":...}`, is appended to `plugins` unless one
//!   is already there, and the file is written back atomically with its key order kept.
//! - Every interval both are checked again: the node's CNI may rewrite its file (dropping our
//!   entry) or appear only after us.
//! - On SIGTERM/SIGINT our entry is removed from every config that has it, everything else left
//!   as it was, and the binary is removed. Pods created afterwards are simply not meshed.
//!
//! `chain`, `unchain` and `pick_config` are pure; the rest is file system and signals.

use std::{
    ffi::OsStr,
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value};

use crate::cli::InstallCniArgs;

/// The plugin's `type` in a network config, and its binary's name.
pub const PLUGIN_TYPE: &str = "sockmesh-cni";
/// Extensions the runtime (libcni's ConfFiles) reads network configs from.
const CONFIG_EXTENSIONS: [&str; 3] = ["conflist", "conf", "json"];
/// Suffix of our temporary files: no config extension, so the runtime never picks one up.
const TEMP_SUFFIX: &str = "sockmesh-tmp";

/// The network config file the runtime uses among `names` (file names in the conf dir): the
/// lexicographically first one with a config extension. Hidden files are skipped.
pub fn pick_config<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    names
        .into_iter()
        .filter(|name| !name.starts_with('.') && is_config_name(name))
        .min()
}

fn is_config_name(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(OsStr::to_str)
        .is_some_and(|ext| CONFIG_EXTENSIONS.contains(&ext))
}

/// The file a chained config is written to: a `.conflist` stays where it is; a `.conf` or
/// `.json` becomes `<stem>.conflist`, since the runtime reads only `.conflist` files as lists.
pub fn chained_name(name: &str) -> String {
    match name.rsplit_once('.') {
        Some((_, "conflist")) => name.to_string(),
        Some((stem, _)) => format!("{stem}.conflist"),
        None => format!("{name}.conflist"),
    }
}

/// Chains our plugin into a network config's text. Returns the new conflist text, or `None`
/// when an entry of our type is already there. A single-plugin config (no `plugins`, a
/// `type`) is converted to a conflist first. Fails, without a result to write, on anything
/// that is not a network config.
pub fn chain(text: &str, agent_socket: &str) -> Result<Option<String>> {
    let mut config = parse_object(text)?;
    if !config.contains_key("plugins") {
        config = single_to_list(config)?;
    }
    let plugins = plugins_mut(&mut config)?;
    if plugins.iter().any(is_ours) {
        return Ok(None);
    }
    let mut entry = Map::new();
    entry.insert("type".into(), PLUGIN_TYPE.into());
    entry.insert("agent_socket".into(), agent_socket.into());
    plugins.push(Value::Object(entry));
    Ok(Some(render(&config)))
}

/// Removes every entry of our type from a network config's text. Returns the new text, or
/// `None` when there was none (a single-plugin config never has one).
pub fn unchain(text: &str) -> Result<Option<String>> {
    let mut config = parse_object(text)?;
    if !config.contains_key("plugins") {
        return Ok(None);
    }
    let plugins = plugins_mut(&mut config)?;
    let before = plugins.len();
    plugins.retain(|plugin| !is_ours(plugin));
    if plugins.len() == before {
        return Ok(None);
    }
    Ok(Some(render(&config)))
}

fn parse_object(text: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str::<Value>(text).context("not valid JSON")? {
        Value::Object(object) => Ok(object),
        other => bail!("not a JSON object but {}", json_kind(&other)),
    }
}

fn plugins_mut(config: &mut Map<String, Value>) -> Result<&mut Vec<Value>> {
    match config.get_mut("plugins") {
        Some(Value::Array(plugins)) => Ok(plugins),
        Some(other) => bail!("`plugins` is {}, not an array", json_kind(other)),
        None => bail!("no `plugins` array"),
    }
}

/// `{cniVersion, name, plugins: [the config]}`, as linkerd-cni and istio-cni convert.
fn single_to_list(config: Map<String, Value>) -> Result<Map<String, Value>> {
    if !config.get("type").is_some_and(Value::is_string) {
        bail!("neither a conflist (`plugins`) nor a single plugin config (`type`)");
    }
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(value) = config.get(key) {
            list.insert(key.into(), value.clone());
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(config)]));
    Ok(list)
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn render(config: &Map<String, Value>) -> String {
    let mut text = serde_json::to_string_pretty(config).expect("a JSON object serializes");
    text.push('\n');
    text
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The command: install, then (unless --once) keep installed until SIGTERM/SIGINT, then undo.
pub fn run(args: &InstallCniArgs) -> Result<()> {
    let installer = Installer::new(args)?;
    if args.once {
        installer.install_binary(true)?;
        return match installer.chain_config()? {
            ChainState::Waiting => bail!(
                "no CNI network config (*.conflist, *.conf, *.json) in {}",
                installer.conf_dir.display()
            ),
            _ => Ok(()),
        };
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(installer.keep_installed(args.interval))?;
    installer.uninstall()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ChainState {
    /// No network config yet.
    Waiting,
    /// This file holds our entry.
    Chained(PathBuf),
    /// The config could not be chained (logged); tried again next time.
    Failed,
}

struct Installer {
    plugin: PathBuf,
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    agent_socket: String,
}

impl Installer {
    fn new(args: &InstallCniArgs) -> Result<Self> {
        let plugin = match &args.plugin {
            Some(plugin) => plugin.clone(),
            None => std::env::current_exe()
                .context("finding the running executable")?
                .with_file_name(PLUGIN_TYPE),
        };
        if !plugin.is_file() {
            bail!("the plugin binary {} does not exist", plugin.display());
        }
        let agent_socket = args
            .agent_socket
            .to_str()
            .context("--agent-socket is not UTF-8")?
            .to_string();
        if agent_socket.is_empty() {
            bail!("--agent-socket is empty");
        }
        Ok(Self {
            plugin,
            bin_dir: args.cni_bin_dir.clone(),
            conf_dir: args.cni_conf_dir.clone(),
            agent_socket,
        })
    }

    fn installed_binary(&self) -> PathBuf {
        self.bin_dir.join(PLUGIN_TYPE)
    }

    /// Copies the plugin into the bin dir. Unless `force`, only when no file of the plugin's
    /// size is there (the first copy is forced, so an upgrade replaces an older binary).
    fn install_binary(&self, force: bool) -> Result<bool> {
        let target = self.installed_binary();
        let source_len = fs::metadata(&self.plugin)
            .with_context(|| format!("reading {}", self.plugin.display()))?
            .len();
        if !force
            && fs::metadata(&target).is_ok_and(|meta| meta.len() == source_len && meta.is_file())
        {
            return Ok(false);
        }
        let mut source = fs::File::open(&self.plugin)
            .with_context(|| format!("opening {}", self.plugin.display()))?;
        // Streamed, not read whole: the container's memory limit is small.
        write_atomically(&target, 0o755, |file| {
            std::io::copy(&mut source, file).map(drop)
        })
        .with_context(|| format!("installing the plugin as {}", target.display()))?;
        tracing::info!(from = %self.plugin.display(), to = %target.display(), "installed the CNI plugin");
        Ok(true)
    }

    /// Chains our entry into the node's network config; logs what it did.
    fn chain_config(&self) -> Result<ChainState> {
        let Some(name) = self.current_config()? else {
            return Ok(ChainState::Waiting);
        };
        let path = self.conf_dir.join(&name);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let chained = chain(&text, &self.agent_socket)
            .with_context(|| format!("chaining sockmesh-cni into {}", path.display()))?;
        let target = self.conf_dir.join(chained_name(&name));
        let Some(chained) = chained else {
            return Ok(ChainState::Chained(target));
        };
        let mode = fs::metadata(&path).map_or(0o644, |meta| meta.permissions().mode() & 0o7777);
        write_atomically(&target, mode, |file| file.write_all(chained.as_bytes()))
            .with_context(|| format!("writing {}", target.display()))?;
        if target != path {
            fs::remove_file(&path).with_context(|| {
                format!("removing {} (now {})", path.display(), target.display())
            })?;
            tracing::info!(from = %path.display(), to = %target.display(), "converted the network config to a conflist");
        }
        tracing::info!(config = %target.display(), agent_socket = %self.agent_socket, "chained sockmesh-cni");
        Ok(ChainState::Chained(target))
    }

    /// The file name the runtime would use, if any.
    fn current_config(&self) -> Result<Option<String>> {
        let names = self.config_names()?;
        Ok(pick_config(names.iter().map(String::as_str)).map(str::to_string))
    }

    fn config_names(&self) -> Result<Vec<String>> {
        let entries = match fs::read_dir(&self.conf_dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => {
                return Err(error).with_context(|| format!("listing {}", self.conf_dir.display()));
            }
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", self.conf_dir.display()))?;
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }

    /// Installs, then re-checks every `interval` until SIGTERM or SIGINT.
    async fn keep_installed(&self, interval: Duration) -> Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
        tracing::info!(
            bin_dir = %self.bin_dir.display(),
            conf_dir = %self.conf_dir.display(),
            interval_ms = interval.as_millis() as u64,
            "keeping sockmesh-cni installed until SIGTERM"
        );
        if let Err(error) = self.install_binary(true) {
            tracing::error!("{error:#}");
        }
        let mut last = None;
        loop {
            let state = self.check_once();
            if last.as_ref() != Some(&state) {
                if state == ChainState::Waiting {
                    tracing::info!(conf_dir = %self.conf_dir.display(), "no CNI network config yet; waiting for the node's CNI to write one");
                }
                last = Some(state);
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = term.recv() => { tracing::info!("SIGTERM: uninstalling"); return Ok(()); }
                _ = int.recv() => { tracing::info!("SIGINT: uninstalling"); return Ok(()); }
            }
        }
    }

    /// One round of checks; failures are logged and retried next round.
    fn check_once(&self) -> ChainState {
        if let Err(error) = self.install_binary(false) {
            tracing::error!("{error:#}");
        }
        match self.chain_config() {
            Ok(state) => state,
            Err(error) => {
                tracing::error!("{error:#}");
                ChainState::Failed
            }
        }
    }

    /// Removes our entry from every network config holding it, then the binary.
    fn uninstall(&self) -> Result<()> {
        let mut failures = Vec::new();
        for name in self.config_names()? {
            if name.starts_with('.') || !is_config_name(&name) {
                continue;
            }
            if let Err(error) = self.unchain_file(&self.conf_dir.join(&name)) {
                tracing::error!("{error:#}");
                failures.push(name);
            }
        }
        let binary = self.installed_binary();
        match fs::remove_file(&binary) {
            Ok(()) => tracing::info!(binary = %binary.display(), "removed the CNI plugin"),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error).with_context(|| format!("removing {}", binary.display()));
            }
        }
        if !failures.is_empty() {
            bail!(
                "could not unchain sockmesh-cni from {}",
                failures.join(", ")
            );
        }
        Ok(())
    }

    fn unchain_file(&self, path: &Path) -> Result<()> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let Some(unchained) =
            unchain(&text).with_context(|| format!("unchaining {}", path.display()))?
        else {
            return Ok(());
        };
        let mode = fs::metadata(path).map_or(0o644, |meta| meta.permissions().mode() & 0o7777);
        write_atomically(path, mode, |file| file.write_all(unchained.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        tracing::info!(config = %path.display(), "unchained sockmesh-cni");
        Ok(())
    }
}

/// Writes `bytes` to a temporary file beside `target` (a name the runtime ignores), syncs it
/// and renames it over `target`: readers see the old file or the new one, never half of one.
fn write_atomically(
    target: &Path,
    mode: u32,
    write: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let dir = target.parent().context("the target has no directory")?;
    let name = target
        .file_name()
        .and_then(OsStr::to_str)
        .context("the target has no UTF-8 file name")?;
    let temp = dir.join(format!(".{name}.{}.{TEMP_SUFFIX}", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)
            .with_context(|| format!("creating {}", temp.display()))?;
        write(&mut file)?;
        // The umask may have narrowed the mode given at creation.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&temp, target)
            .with_context(|| format!("renaming {} to {}", temp.display(), target.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKET: &str = "/var/run/sockmesh/cni.sock";

    const BRIDGE_CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "k8s-pod-network",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]]}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
  ]
}"#;

    fn value(text: &str) -> Value {
        serde_json::from_str(text).expect("valid JSON")
    }

    fn types(config: &Value) -> Vec<&str> {
        config["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .map(|plugin| plugin["type"].as_str().expect("type"))
            .collect()
    }

    #[test]
    fn picks_the_first_config_by_name() {
        let names = [
            "99-loopback.conf",
            "10-flannel.conflist",
            "20-other.json",
            ".10-bridge.conflist.1.sockmesh-tmp",
            ".00-hidden.conflist",
            "00-readme.txt",
            "05-bridge.conf.bak",
        ];
        assert_eq!(pick_config(names), Some("10-flannel.conflist"));
        assert_eq!(pick_config(["b.conf", "a.json"]), Some("a.json"));
        assert_eq!(pick_config(["notes.md", "x.yaml"]), None);
        assert_eq!(pick_config([]), None);
    }

    #[test]
    fn appends_the_plugin_after_the_others() {
        let chained = chain(BRIDGE_CONFLIST, SOCKET).unwrap().expect("changed");
        let config = value(&chained);
        assert_eq!(types(&config), ["bridge", "portmap", "sockmesh-cni"]);
        assert_eq!(config["plugins"][2]["agent_socket"], SOCKET);
        // Everything else is as it was, in the same order.
        let original = value(BRIDGE_CONFLIST);
        assert_eq!(config["plugins"][0], original["plugins"][0]);
        assert_eq!(config["plugins"][1], original["plugins"][1]);
        let keys: Vec<&String> = config.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["cniVersion", "name", "plugins"]);
        let bridge_keys: Vec<&String> = config["plugins"][0].as_object().unwrap().keys().collect();
        assert_eq!(
            bridge_keys,
            ["type", "bridge", "isGateway", "ipMasq", "ipam"]
        );
    }

    #[test]
    fn chaining_twice_changes_nothing() {
        let chained = chain(BRIDGE_CONFLIST, SOCKET).unwrap().expect("changed");
        assert_eq!(chain(&chained, SOCKET).unwrap(), None);
        assert_eq!(chain(&chained, "/elsewhere.sock").unwrap(), None);
    }

    #[test]
    fn unchain_restores_the_other_plugins() {
        let chained = chain(BRIDGE_CONFLIST, SOCKET).unwrap().expect("changed");
        let unchained = unchain(&chained).unwrap().expect("changed");
        assert_eq!(value(&unchained), value(BRIDGE_CONFLIST));
        // Key order survives the round trip too.
        let keys: Vec<String> = value(&unchained)["plugins"][1]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys, ["type", "snat", "capabilities"]);
        assert_eq!(unchain(&unchained).unwrap(), None);
        assert_eq!(unchain(BRIDGE_CONFLIST).unwrap(), None);
    }

    #[test]
    fn converts_a_single_plugin_conf() {
        let conf = r#"{"cniVersion": "0.4.0", "name": "mynet", "type": "bridge",
                       "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}}"#;
        let chained = value(&chain(conf, SOCKET).unwrap().expect("changed"));
        assert_eq!(chained["cniVersion"], "0.4.0");
        assert_eq!(chained["name"], "mynet");
        assert_eq!(types(&chained), ["bridge", "sockmesh-cni"]);
        assert_eq!(chained["plugins"][0], value(conf));
        assert_eq!(chained_name("10-mynet.conf"), "10-mynet.conflist");
        assert_eq!(chained_name("10-mynet.json"), "10-mynet.conflist");
        assert_eq!(chained_name("10-mynet.conflist"), "10-mynet.conflist");
        // A single-plugin conf has nothing to unchain.
        assert_eq!(unchain(conf).unwrap(), None);
    }

    #[test]
    fn rejects_what_is_not_a_network_config() {
        for (text, expected) in [
            (
                r#"{"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}"#,
                "not valid JSON",
            ),
            ("[1, 2]", "not a JSON object but an array"),
            (
                r#"{"plugins": {"type": "bridge"}}"#,
                "`plugins` is an object",
            ),
            (r#"{"name": "x"}"#, "neither a conflist"),
        ] {
            let error = format!("{:#}", chain(text, SOCKET).expect_err(text));
            assert!(error.contains(expected), "{text}: {error}");
        }
        assert!(unchain("{oops").is_err());
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sockmesh-install-cni-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::create_dir_all(dir.join("net.d")).unwrap();
        dir
    }

    fn installer(dir: &Path) -> Installer {
        let plugin = dir.join("plugin");
        fs::write(&plugin, b"#!/bin/sh\nexit 0\n").unwrap();
        Installer {
            plugin,
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("net.d"),
            agent_socket: SOCKET.into(),
        }
    }

    #[test]
    fn leaves_a_malformed_conflist_untouched() {
        let dir = temp_dir("malformed");
        let installer = installer(&dir);
        let path = dir.join("net.d/10-broken.conflist");
        let broken = "{\"cniVersion\": \"1.0.0\", \"plugins\": [";
        fs::write(&path, broken).unwrap();
        let error = format!("{:#}", installer.chain_config().expect_err("malformed"));
        assert!(error.contains("10-broken.conflist"), "{error}");
        assert!(error.contains("not valid JSON"), "{error}");
        assert_eq!(fs::read_to_string(&path).unwrap(), broken);
        let leftovers: Vec<_> = fs::read_dir(dir.join("net.d")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn installs_chains_and_uninstalls_files() {
        let dir = temp_dir("files");
        let installer = installer(&dir);
        assert_eq!(installer.chain_config().unwrap(), ChainState::Waiting);
        fs::write(
            dir.join("net.d/10-bridge.conf"),
            r#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#,
        )
        .unwrap();
        fs::write(dir.join("net.d/99-loopback.conflist"), BRIDGE_CONFLIST).unwrap();
        assert!(installer.install_binary(false).unwrap());
        assert!(
            !installer.install_binary(false).unwrap(),
            "already installed"
        );
        assert!(installer.install_binary(true).unwrap(), "forced");
        let mode = fs::metadata(dir.join("bin/sockmesh-cni"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        let chained = dir.join("net.d/10-bridge.conflist");
        assert_eq!(
            installer.chain_config().unwrap(),
            ChainState::Chained(chained.clone())
        );
        assert!(
            !dir.join("net.d/10-bridge.conf").exists(),
            "the .conf became a .conflist"
        );
        assert_eq!(
            types(&value(&fs::read_to_string(&chained).unwrap())),
            ["bridge", "sockmesh-cni"]
        );
        assert_eq!(
            installer.chain_config().unwrap(),
            ChainState::Chained(chained.clone())
        );
        installer.uninstall().unwrap();
        assert_eq!(
            types(&value(&fs::read_to_string(&chained).unwrap())),
            ["bridge"]
        );
        assert_eq!(
            fs::read_to_string(dir.join("net.d/99-loopback.conflist")).unwrap(),
            BRIDGE_CONFLIST
        );
        assert!(!dir.join("bin/sockmesh-cni").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
