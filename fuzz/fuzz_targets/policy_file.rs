//! The policy file parser (`agent::policy::Policy::parse`) and what it feeds: glob selectors
//! and port lists. The file comes from a ConfigMap, so whoever may edit that one ConfigMap
//! writes it.
//!
//! The first input byte picks the mode:
//! - raw text (even byte): parsing never panics and is deterministic; an accepted policy has
//!   at most MAX_ENTRIES entries and reports its ignored keys sorted, each once; and asking
//!   it about any pod or cgroup (names taken from the input) never panics;
//! - one generated entry per selector kind (odd byte): for a namespace glob, a cgroup glob
//!   and a port list drawn from small alphabets, the parsed policy selects exactly the pods
//!   and cgroups a reference glob matcher (dynamic programming, not the agent's two-cursor
//!   walk) selects, and holds exactly the ports a reference reading of the list holds.
#![no_main]

use agent::policy::{MAX_ENTRIES, Policy};
use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        raw(rest);
    } else {
        let _ = generated(&mut Unstructured::new(rest));
    }
});

fn raw(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let parsed = Policy::parse(text);
    let again = Policy::parse(text);
    match (&parsed, &again) {
        (Ok(first), Ok(second)) => assert_eq!(first, second, "not deterministic"),
        (Err(first), Err(second)) => assert_eq!(first.to_string(), second.to_string()),
        _ => panic!("not deterministic: {parsed:?} then {again:?}"),
    }
    let Ok((policy, ignored)) = parsed else {
        return;
    };
    assert!(policy.entries() <= MAX_ENTRIES);
    assert!(
        ignored.windows(2).all(|pair| pair[0] < pair[1]),
        "{ignored:?}"
    );
    // Names from the text itself: the likeliest to match something.
    for word in text.split(['\n', ' ', '"', '\'']).take(16) {
        let _ = policy.for_pod(word, word);
        let _ = policy.for_cgroup(word);
    }
}

const GLOB: &[char] = &['a', 'b', '*', '?', '/', 'é'];
const NAME: &[char] = &['a', 'b', '/', 'é'];
const PORTS: &[char] = &['0', '1', '8', '9', '6', '5', ',', '-', ' ', '+'];

fn text(input: &mut Unstructured<'_>, alphabet: &[char], max: usize) -> Result<String> {
    let len = input.int_in_range(0..=max)?;
    (0..len).map(|_| input.choose(alphabet).copied()).collect()
}

fn generated(input: &mut Unstructured<'_>) -> Result<()> {
    let namespace_glob = text(input, GLOB, 10)?;
    let cgroup_glob = format!("/{}", text(input, GLOB, 10)?);
    let ports = text(input, PORTS, 16)?;
    let file = serde_json::json!({
        "workloads": [
            {
                "namespace": namespace_glob,
                "annotations": {
                    "linkerd.io/inject": "disabled",
                    "config.linkerd.io/opaque-ports": ports,
                },
            },
            { "cgroup": cgroup_glob, "annotations": { "linkerd.io/inject": "disabled" } },
        ]
    });
    let parsed = Policy::parse(&file.to_string());
    let want_ports = port_list(&ports);
    if namespace_glob.is_empty() || want_ports.is_none() {
        assert!(parsed.is_err(), "accepted {file}");
        return Ok(());
    }
    let (policy, ignored) = parsed.unwrap_or_else(|error| panic!("refused {file}: {error}"));
    assert!(ignored.is_empty());
    for _ in 0..8 {
        let namespace = text(input, NAME, 10)?;
        let pod = policy.for_pod(&namespace, "pod-0");
        let matched = glob(&namespace_glob, &namespace);
        assert_eq!(
            pod.inject_disabled, matched,
            "{namespace_glob:?} on {namespace:?}"
        );
        if matched {
            let ranges = want_ports.as_deref().unwrap_or_default();
            for port in [0, 1, 5, 8, 9, 10, 18, 80, 81, 100, 1000, 6553, 65535] {
                let want = ranges
                    .iter()
                    .any(|&(first, last)| (first..=last).contains(&port));
                assert_eq!(pod.opaque_ports.contains(port), want, "{ports:?} {port}");
            }
        }
        let cgroup = format!("/{}", text(input, NAME, 12)?);
        assert_eq!(
            policy.for_cgroup(&cgroup).inject_disabled,
            path_glob(&cgroup_glob, &cgroup),
            "{cgroup_glob:?} on {cgroup:?}"
        );
    }
    Ok(())
}

/// `*` any run of characters, `?` any one, by dynamic programming over (pattern, text).
fn glob(pattern: &str, text: &str) -> bool {
    let (pattern, text): (Vec<char>, Vec<char>) =
        (pattern.chars().collect(), text.chars().collect());
    // matches[i][j]: pattern[i..] matches text[j..].
    let mut matches = vec![vec![false; text.len() + 1]; pattern.len() + 1];
    matches[pattern.len()][text.len()] = true;
    for i in (0..pattern.len()).rev() {
        for j in (0..=text.len()).rev() {
            matches[i][j] = match pattern[i] {
                '*' => matches[i + 1][j] || (j < text.len() && matches[i][j + 1]),
                '?' => j < text.len() && matches[i + 1][j + 1],
                c => j < text.len() && text[j] == c && matches[i + 1][j + 1],
            };
        }
    }
    matches[0][0]
}

/// Component by component; empty components (doubled, leading, trailing `/`) do not count.
fn path_glob(pattern: &str, path: &str) -> bool {
    let parts = |s: &str| -> Vec<String> {
        s.split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect()
    };
    let (pattern, path) = (parts(pattern), parts(path));
    pattern.len() == path.len() && pattern.iter().zip(&path).all(|(p, t)| glob(p, t))
}

/// `80,443,4000-4100` (whitespace around each port; Rust's integer syntax, so `+80` too); an
/// empty list is empty. None when invalid.
fn port_list(text: &str) -> Option<Vec<(u16, u16)>> {
    if text.trim().is_empty() {
        return Some(Vec::new());
    }
    let port = |s: &str| -> Option<u16> {
        let s = s.trim();
        let digits = s.strip_prefix('+').unwrap_or(s);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let value = digits.bytes().try_fold(0u32, |v, d| {
            let v = v * 10 + u32::from(d - b'0');
            (v <= 65535).then_some(v)
        })?;
        u16::try_from(value).ok()
    };
    text.split(',')
        .map(|part| match part.split_once('-') {
            None => port(part).map(|p| (p, p)),
            Some((first, last)) => {
                let (first, last) = (port(first)?, port(last)?);
                (first <= last).then_some((first, last))
            }
        })
        .collect()
}
