//! Pure path handling: assembling event paths from kernel dentry components and raw user strings,
//! lexical normalisation, and the prefixes that never count (`/proc`, `/dev`, `/sys`, configured).

/// Joins the child-first dentry `components` of a base directory (or of the object itself when
/// `raw` is empty) with the raw user path; an absolute `raw` ignores the base. Returns a normalised
/// absolute path as the calling process sees it (its root is `/`).
pub fn assemble(components: &[String], raw: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    if !raw.starts_with('/') {
        for c in components.iter().rev() {
            parts.push(c.as_str());
        }
    }
    let mut out: Vec<&str> = Vec::new();
    for p in parts.into_iter().chain(raw.split('/')) {
        push_component(&mut out, p);
    }
    let mut s = String::with_capacity(64);
    for c in &out {
        s.push('/');
        s.push_str(c);
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

fn push_component<'a>(out: &mut Vec<&'a str>, c: &'a str) {
    match c {
        "" | "." => {}
        ".." => {
            out.pop();
        }
        c => out.push(c),
    }
}

/// The form used in dirty sets: relative to the sandbox root, `.` for the root itself.
pub fn relative(absolute: &str) -> String {
    let r = absolute.trim_start_matches('/');
    if r.is_empty() {
        ".".to_string()
    } else {
        r.to_string()
    }
}

/// Prefixes whose changes never count; always includes `/proc`, `/dev` and `/sys`.
#[derive(Debug, Clone)]
pub struct IgnoredPrefixes {
    prefixes: Vec<String>,
}

impl Default for IgnoredPrefixes {
    fn default() -> Self {
        Self::new(&[])
    }
}

impl IgnoredPrefixes {
    /// The built-in prefixes plus `extra` (absolute paths inside the sandbox).
    pub fn new(extra: &[String]) -> Self {
        let mut prefixes: Vec<String> = ["/proc", "/dev", "/sys"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for e in extra {
            let n = assemble(&[], e);
            if n != "/" {
                prefixes.push(n);
            }
        }
        Self { prefixes }
    }

    /// Whether the absolute path lies under an ignored prefix.
    pub fn is_ignored(&self, absolute: &str) -> bool {
        self.prefixes.iter().any(|p| {
            absolute == p
                || (absolute.starts_with(p.as_str())
                    && absolute.as_bytes().get(p.len()) == Some(&b'/'))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comps(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Components arrive child first; relative raw paths resolve against them.
    #[test]
    fn assembles_relative_and_absolute() {
        assert_eq!(assemble(&comps(&["x", "tmp"]), "a/b"), "/tmp/x/a/b");
        assert_eq!(
            assemble(&comps(&["x", "tmp"]), "/etc/passwd"),
            "/etc/passwd"
        );
        assert_eq!(assemble(&comps(&["x", "tmp"]), ""), "/tmp/x");
        assert_eq!(assemble(&comps(&["x", "tmp"]), "../y/./z//w"), "/tmp/y/z/w");
        assert_eq!(assemble(&[], "/../.."), "/");
        assert_eq!(relative("/tmp/x"), "tmp/x");
        assert_eq!(relative("/"), ".");
    }

    /// /proc, /dev, /sys and configured prefixes are ignored, but not their look-alikes.
    #[test]
    fn ignores_prefixes() {
        let p = IgnoredPrefixes::new(&["/var/cache/".to_string()]);
        assert!(p.is_ignored("/proc/self/fd/1"));
        assert!(p.is_ignored("/dev"));
        assert!(p.is_ignored("/var/cache/apt"));
        assert!(!p.is_ignored("/devices"));
        assert!(!p.is_ignored("/var/cached"));
        assert!(!p.is_ignored("/tmp/x"));
    }
}
