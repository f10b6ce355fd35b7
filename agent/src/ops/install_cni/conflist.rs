//! A node's CNI network config, edited as text: which file the runtime reads, and our plugin's
//! entry chained into it or taken out. Pure: the installer does the file system.

use std::{ffi::OsStr, path::Path};

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value};

/// The plugin's `type` in a network config, and its binary's name.
pub const PLUGIN_TYPE: &str = "sockmesh-cni";
/// Extensions the runtime (libcni's ConfFiles) reads network configs from.
const CONFIG_EXTENSIONS: [&str; 3] = ["conflist", "conf", "json"];
/// The network config file the runtime uses among `names` (file names in the conf dir): the
/// lexicographically first one with a config extension. Hidden files are skipped.
pub fn pick_config<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    names
        .into_iter()
        .filter(|name| !name.starts_with('.') && is_config_name(name))
        .min()
}

pub fn is_config_name(name: &str) -> bool {
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::ops::install_cni) const SOCKET: &str = "/var/run/sockmesh/cni.sock";

    pub(in crate::ops::install_cni) const BRIDGE_CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "k8s-pod-network",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]]}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
  ]
}"#;

    pub(in crate::ops::install_cni) fn value(text: &str) -> Value {
        serde_json::from_str(text).expect("valid JSON")
    }

    pub(in crate::ops::install_cni) fn types(config: &Value) -> Vec<&str> {
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
}
