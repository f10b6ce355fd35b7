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
//! `conflist` edits the config's text (pure); this module does the file system and signals.

use std::{
    ffi::OsStr,
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::cli::InstallCniArgs;

mod conflist;

use conflist::{PLUGIN_TYPE, chain, chained_name, is_config_name, pick_config, unchain};

/// Suffix of our temporary files: no config extension, so the runtime never picks one up.
const TEMP_SUFFIX: &str = "sockmesh-tmp";

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
    use super::conflist::tests::{BRIDGE_CONFLIST, SOCKET, types, value};
    use super::*;

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
