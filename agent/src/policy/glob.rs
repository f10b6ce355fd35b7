//! The policy file's glob patterns: `*` (any run of characters, possibly empty) and `?` (any
//! one character); every other character stands for itself (no `[...]` classes, no escapes).
//!
//! Matching is the classic two-cursor walk that only ever backtracks to the most recent `*`:
//! O(pattern x text) in the worst case, never exponential (`a*a*a*a*b` on a long run of `a`s
//! is as cheap as any other pattern).

/// Whether `text` matches `pattern`, `*` matching anything (for namespace and pod names).
pub fn matches(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    matches_chars(&pattern, &text)
}

/// Whether the cgroup path `path` matches `pattern`, where neither `*` nor `?` crosses a `/`
/// (like a shell glob on paths): `/system.slice/*.service` matches `/system.slice/a.service`
/// but not `/system.slice/a/b.service`. Empty components do not count, so a leading, trailing
/// or doubled `/` makes no difference; the root cgroup is `/`.
pub fn matches_path(pattern: &str, path: &str) -> bool {
    let mut patterns = components(pattern);
    let mut texts = components(path);
    loop {
        match (patterns.next(), texts.next()) {
            (None, None) => return true,
            (Some(pattern), Some(text)) => {
                if !matches(pattern, text) {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

fn components(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|component| !component.is_empty())
}

fn matches_chars(pattern: &[char], text: &[char]) -> bool {
    let (mut p, mut t) = (0, 0);
    // After the most recent `*`: the pattern index just past it, and the text index it has
    // consumed up to. Backtracking lets that star eat one more character; earlier stars never
    // need revisiting, since the latest star can absorb whatever they would have.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                p += 1;
                star = Some((p, t));
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((after_star, consumed)) => {
                    p = after_star;
                    t = consumed + 1;
                    star = Some((after_star, t));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_and_wildcards() {
        assert!(matches("db", "db"));
        assert!(!matches("db", "db-0"));
        assert!(matches("db-*", "db-0"));
        assert!(matches("db-*", "db-"));
        assert!(!matches("db-*", "web-0"));
        assert!(matches("*", ""));
        assert!(matches("*", "anything/at/all"));
        assert!(matches("?b", "db"));
        assert!(!matches("?b", "b"));
        assert!(matches("*-?", "api-7"));
        assert!(!matches("*-?", "api-77"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXcYYb"));
        assert!(matches("**", "x"));
        assert!(!matches("", "x"));
        assert!(matches("", ""));
    }

    #[test]
    fn backtracking_finds_later_match() {
        assert!(matches("*ab", "aab"));
        assert!(matches("*a?c", "abcaxc"));
        assert!(matches("a*ba", "abbba"));
        assert!(!matches("a*ba", "abbbb"));
    }

    #[test]
    fn characters_not_bytes() {
        assert!(matches("?", "é"));
        assert!(matches("caf?", "café"));
    }

    #[test]
    fn pathological_pattern_is_fast() {
        let text = "a".repeat(50_000);
        let pattern = "a*".repeat(30) + "b";
        assert!(!matches(&pattern, &text));
        let text = text + "b";
        assert!(matches(&pattern, &text));
        assert!(!matches_path(
            &format!("/{pattern}"),
            &format!("/{}", "a".repeat(50_000))
        ));
    }

    #[test]
    fn path_star_stays_in_one_component() {
        let pattern = "/system.slice/legacy-*.service";
        assert!(matches_path(
            pattern,
            "/system.slice/legacy-billing.service"
        ));
        assert!(!matches_path(pattern, "/system.slice/legacy-a/b.service"));
        assert!(!matches_path(pattern, "/system.slice/other.service"));
        assert!(!matches_path(pattern, "/system.slice"));
        assert!(!matches_path("/system.slice/?", "/system.slice/a/b"));
        assert!(matches_path("/*/*.service", "/system.slice/x.service"));
        assert!(!matches_path("/*", "/system.slice/x.service"));
        assert!(matches_path("/*", "/system.slice"));
    }

    #[test]
    fn path_slashes_are_normalised() {
        assert!(matches_path("/", "/"));
        assert!(!matches_path("/*", "/"));
        assert!(!matches_path("/", "/a"));
        assert!(matches_path("/a/b", "/a/b/"));
        assert!(matches_path("/a/b", "//a//b"));
        assert!(matches_path("/a/b", "a/b"));
    }
}
