//! Pure net-change bookkeeping for one sandbox's file system within one window (since the last
//! checkpoint). No I/O: it consumes resolved [`FsOp`]s and reports the [`FileChange`] set.
//!
//! Model: every path touched in the window records whether it existed at the baseline (known
//! from the first operation on it: a successful create proves it did not; a write, metadata
//! change, delete or rename-away proves it did; a rename target is unknown unless
//! `RENAME_NOREPLACE`). Each path maps to a *node* (a file identity); nodes that pre-existed carry
//! their baseline path as `origin`. Renames move nodes (and every tracked path below a renamed
//! directory), hard links share nodes, deletes unmap them. The report compares, per path, the
//! baseline against the current occupant, so a file created and deleted in the window is no
//! change, a temporary file renamed over an existing one (`sed -i`) is a modification, and a
//! pre-existing file moved elsewhere is a rename.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

/// One file-system operation, paths relative to the sandbox root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsOp {
    /// A new name appeared (creat/O_CREAT that created, mkdir, mknod, symlink).
    Create { path: String },
    /// Content changed (write, truncate, O_TRUNC, fallocate, copy_file_range, shared mapping).
    Write { path: String },
    /// Metadata changed only (chmod, chown, xattrs, timestamps).
    Meta { path: String },
    /// A name disappeared (unlink, rmdir).
    Remove { path: String },
    /// A rename; `noreplace` proves the target was absent, `exchange` swaps the two.
    Rename {
        from: String,
        to: String,
        noreplace: bool,
        exchange: bool,
    },
    /// A hard link `to` of `from` (`from` is `None` for an O_TMPFILE materialised by linkat).
    Link { from: Option<String>, to: String },
}

/// One entry of the dirty set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum FileChange {
    Created { path: String },
    Modified { path: String },
    Deleted { path: String },
    Renamed { from: String, to: String },
    Metadata { path: String },
}

impl FileChange {
    /// Short human-readable form (`+ a`, `~ b`, `- c`, `> d -> e`, `m f`).
    pub fn short(&self) -> String {
        match self {
            FileChange::Created { path } => format!("+ {path}"),
            FileChange::Modified { path } => format!("~ {path}"),
            FileChange::Deleted { path } => format!("- {path}"),
            FileChange::Renamed { from, to } => format!("> {from} -> {to}"),
            FileChange::Metadata { path } => format!("m {path}"),
        }
    }
}

/// FNV-1a: paths are short and trusted enough (a sandbox cannot make us do more than hash its
/// own paths), and SipHash dominated `changes()` on 25k-file windows.
#[derive(Default, Clone, Copy)]
pub struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf29ce484222325
        } else {
            self.0
        };
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        self.0 = h;
    }
}

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fnv>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Existed {
    No,
    Yes,
    Unknown,
}

#[derive(Debug, Clone)]
struct Node {
    origin: Option<String>,
    content: bool,
    meta: bool,
}

/// The net-change state of one window.
#[derive(Debug, Default, Clone)]
pub struct FsTracker {
    nodes: Vec<Node>,
    /// Ordered, so a directory's tracked subtree is one range query.
    at: BTreeMap<String, (usize, Existed)>,
    baseline: FastMap<String, Existed>,
    /// Paths that (may have) existed at the baseline and have no occupant now, kept sorted so
    /// the report of a mass deletion needs no sort.
    vacant: BTreeSet<String>,
    ops: u64,
}

fn under<'a>(path: &'a str, dir: &str) -> Option<&'a str> {
    if dir == "." {
        return Some(path);
    }
    path.strip_prefix(dir).and_then(|r| r.strip_prefix('/'))
}

fn join(dir: &str, rest: &str) -> String {
    if dir == "." {
        rest.to_string()
    } else {
        format!("{dir}/{rest}")
    }
}

impl FsTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets everything: the current state becomes the baseline (after a checkpoint).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Number of operations applied since the last reset.
    pub fn ops(&self) -> u64 {
        self.ops
    }

    fn new_node(&mut self, origin: Option<String>) -> usize {
        self.nodes.push(Node {
            origin,
            content: false,
            meta: false,
        });
        self.nodes.len() - 1
    }

    /// Records the baseline existence of `path` on first touch; a pre-existing path gets its
    /// baseline node.
    fn touch(&mut self, path: &str, existed: Existed) {
        if self.baseline.contains_key(path) {
            return;
        }
        self.baseline.insert(path.to_string(), existed);
        if existed == Existed::Yes {
            let n = self.new_node(Some(path.to_string()));
            self.place(path.to_string(), n);
        }
    }

    /// Puts node `n` at `path` (whose baseline existence is known by now), caching that
    /// existence next to it so the report needs no lookups.
    fn place(&mut self, path: String, n: usize) {
        let existed = self.baseline.get(&path).copied().unwrap_or(Existed::Yes);
        if existed != Existed::No {
            self.vacant.remove(&path);
        }
        self.at.insert(path, (n, existed));
    }

    /// The node at `path`, creating one for a path that exists but is unknown to us.
    fn occupant(&mut self, path: &str) -> usize {
        self.touch(path, Existed::Yes);
        if let Some(&(n, _)) = self.at.get(path) {
            return n;
        }
        let n = self.new_node(None);
        self.place(path.to_string(), n);
        n
    }

    /// Tracked paths at or below `path`, with the part below it (`""` for the path itself).
    fn subtree(&self, path: &str) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        if let Some(&(n, _)) = self.at.get(path) {
            out.push((String::new(), n));
        }
        if path == "." {
            out.extend(
                self.at
                    .iter()
                    .filter(|(p, _)| p.as_str() != ".")
                    .map(|(p, &(n, _))| (p.clone(), n)),
            );
            return out;
        }
        // Keys starting with "path/" sort between "path/" and "path0" ('0' follows '/').
        let lo = format!("{path}/");
        let hi = format!("{path}0");
        for (p, &(n, _)) in self.at.range(lo..hi) {
            out.push((p[path.len() + 1..].to_string(), n));
        }
        out
    }

    /// Unmaps `path` and everything tracked below it. Paths created in this window and now
    /// vacant are forgotten: they contribute nothing to the report.
    fn remove_subtree(&mut self, path: &str) {
        for (rest, _) in self.subtree(path) {
            let p = if rest.is_empty() {
                path.to_string()
            } else {
                join(path, &rest)
            };
            self.at.remove(&p);
            match self.baseline.get(&p) {
                Some(Existed::No) => {
                    self.baseline.remove(&p);
                }
                Some(_) => {
                    self.vacant.insert(p);
                }
                None => {}
            }
        }
    }

    /// Applies one operation.
    pub fn apply(&mut self, op: FsOp) {
        self.ops += 1;
        match op {
            FsOp::Create { path } => {
                self.touch(&path, Existed::No);
                let n = self.new_node(None);
                self.place(path, n);
            }
            FsOp::Write { path } => {
                let n = self.occupant(&path);
                self.nodes[n].content = true;
            }
            FsOp::Meta { path } => {
                let n = self.occupant(&path);
                self.nodes[n].meta = true;
            }
            FsOp::Remove { path } => {
                self.touch(&path, Existed::Yes);
                self.remove_subtree(&path);
            }
            FsOp::Link { from, to } => {
                self.touch(&to, Existed::No);
                let n = match from {
                    Some(f) => self.occupant(&f),
                    None => self.new_node(None),
                };
                self.place(to, n);
            }
            FsOp::Rename {
                from,
                to,
                noreplace,
                exchange,
            } => self.rename(&from, &to, noreplace, exchange),
        }
    }

    fn rename(&mut self, from: &str, to: &str, noreplace: bool, exchange: bool) {
        if from == to {
            return;
        }
        self.occupant(from);
        if exchange {
            self.occupant(to);
        } else {
            self.touch(
                to,
                if noreplace {
                    Existed::No
                } else {
                    Existed::Unknown
                },
            );
        }
        let to_existed = self.baseline.get(to).copied().unwrap_or(Existed::Unknown);
        // Collect the subtrees (the path itself and everything tracked below it).
        let moving = self.subtree(from);
        let swapped = if exchange {
            self.subtree(to)
        } else {
            Vec::new()
        };
        self.remove_subtree(from);
        self.remove_subtree(to);
        for (rest, n) in moving {
            let dest = if rest.is_empty() {
                to.to_string()
            } else {
                join(to, &rest)
            };
            // A directory can only be renamed over an empty directory, so paths below the
            // target did not exist before (unless an exchange, or already known).
            let existed = if rest.is_empty() {
                to_existed
            } else if exchange {
                Existed::Unknown
            } else {
                Existed::No
            };
            self.touch(&dest, existed);
            self.place(dest, n);
        }
        for (rest, n) in swapped {
            let dest = if rest.is_empty() {
                from.to_string()
            } else {
                join(from, &rest)
            };
            self.touch(&dest, Existed::Unknown);
            self.place(dest, n);
        }
    }

    /// The net dirty set of the window, sorted.
    pub fn changes(&self) -> Vec<FileChange> {
        // Baseline paths whose node now lives at another path (renamed, not deleted).
        let mut placed: FastMap<&str, &str> = FastMap::default();
        for (p, &(n, _)) in &self.at {
            if let Some(o) = self.nodes[n].origin.as_deref() {
                if o != p {
                    placed.insert(o, p.as_str());
                }
            }
        }
        // One bucket per kind, each filled in path order, so the result needs no sort.
        let mut created = Vec::new();
        let mut modified = Vec::new();
        let mut metadata = Vec::new();
        let mut deleted = Vec::new();
        let mut renames: BTreeMap<String, String> = BTreeMap::new();
        // Paths that are occupied now (`at` is a subset of `baseline`'s keys).
        for (p, &(n, existed)) in &self.at {
            let node = &self.nodes[n];
            match node.origin.as_deref() {
                Some(o) if o == p => {
                    if node.content {
                        modified.push(FileChange::Modified { path: p.clone() });
                    } else if node.meta && existed != Existed::No {
                        metadata.push(FileChange::Metadata { path: p.clone() });
                    }
                }
                Some(o)
                    if self
                        .at
                        .get(o)
                        .is_none_or(|&(m, _)| self.nodes[m].origin.as_deref() != Some(o)) =>
                {
                    renames.insert(o.to_string(), p.clone());
                    if node.content {
                        modified.push(FileChange::Modified { path: p.clone() });
                    }
                }
                _ => {
                    if existed == Existed::No {
                        created.push(FileChange::Created { path: p.clone() });
                    } else {
                        modified.push(FileChange::Modified { path: p.clone() });
                    }
                }
            }
        }
        // Vacated baseline paths, already in order.
        for p in &self.vacant {
            if !placed.contains_key(p.as_str()) {
                deleted.push(FileChange::Deleted { path: p.clone() });
            }
        }
        // A rename implied by a renamed ancestor directory is not listed separately.
        let mut renamed = Vec::new();
        for (from, to) in &renames {
            let implied = renames.iter().any(|(af, at)| {
                af != from && under(from, af).is_some_and(|rest| under(to, at) == Some(rest))
            });
            if !implied {
                renamed.push(FileChange::Renamed {
                    from: from.clone(),
                    to: to.clone(),
                });
            }
        }
        // The variant order of `FileChange`'s derived `Ord`: created, modified, deleted,
        // renamed, metadata.
        let mut out = created;
        out.append(&mut modified);
        out.append(&mut deleted);
        out.append(&mut renamed);
        out.append(&mut metadata);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ops: Vec<FsOp>) -> Vec<String> {
        let mut t = FsTracker::new();
        for op in ops {
            t.apply(op);
        }
        let mut v: Vec<String> = t.changes().iter().map(FileChange::short).collect();
        v.sort();
        v
    }
    fn c(p: &str) -> FsOp {
        FsOp::Create { path: p.into() }
    }
    fn w(p: &str) -> FsOp {
        FsOp::Write { path: p.into() }
    }
    fn m(p: &str) -> FsOp {
        FsOp::Meta { path: p.into() }
    }
    fn rm(p: &str) -> FsOp {
        FsOp::Remove { path: p.into() }
    }
    fn mv(a: &str, b: &str) -> FsOp {
        FsOp::Rename {
            from: a.into(),
            to: b.into(),
            noreplace: false,
            exchange: false,
        }
    }

    /// A temp file created and deleted in the window is no change.
    #[test]
    fn create_then_delete_is_nothing() {
        assert!(run(vec![c("t"), w("t"), rm("t")]).is_empty());
        assert!(run(vec![c("d"), c("d/x"), rm("d/x"), rm("d")]).is_empty());
    }

    /// Deleting a pre-existing file is a change.
    #[test]
    fn delete_preexisting() {
        assert_eq!(run(vec![rm("a")]), vec!["- a"]);
        assert_eq!(run(vec![w("a"), rm("a")]), vec!["- a"]);
    }

    /// `sed -i`: a new temp file renamed over the original is a modification.
    #[test]
    fn replace_by_rename() {
        assert_eq!(
            run(vec![
                c("d/sedX"),
                w("d/sedX"),
                m("d/sedX"),
                mv("d/sedX", "d/f")
            ]),
            vec!["~ d/f"]
        );
    }

    /// Renames of files and directories; tracked children follow their directory.
    #[test]
    fn renames() {
        assert_eq!(run(vec![mv("a", "b")]), vec!["> a -> b"]);
        // The target's prior existence is unknown, so vacating it is conservatively a delete.
        assert_eq!(run(vec![mv("a", "b"), mv("b", "a")]), vec!["- b"]);
        assert_eq!(run(vec![w("d/f"), mv("d", "e")]), vec!["> d -> e", "~ e/f"]);
        assert_eq!(run(vec![c("d/n"), mv("d", "e")]), vec!["+ e/n", "> d -> e"]);
        // The target may have existed (plain rename): conservatively a modification.
        assert_eq!(
            run(vec![c("new"), c("new/x"), mv("new", "fin")]),
            vec!["+ fin/x", "~ fin"]
        );
        // A file created and renamed to a fresh name (noreplace) is a creation.
        assert_eq!(
            run(vec![
                c("t"),
                FsOp::Rename {
                    from: "t".into(),
                    to: "u".into(),
                    noreplace: true,
                    exchange: false
                }
            ]),
            vec!["+ u"]
        );
        assert_eq!(
            run(vec![FsOp::Rename {
                from: "a".into(),
                to: "b".into(),
                noreplace: false,
                exchange: true
            }]),
            vec!["> a -> b", "> b -> a"]
        );
    }

    /// Hard links and O_TMPFILE+linkat create names; writes through a link dirty the shared file.
    #[test]
    fn links() {
        assert_eq!(
            run(vec![FsOp::Link {
                from: Some("a".into()),
                to: "b".into()
            }]),
            vec!["+ b"]
        );
        assert_eq!(
            run(vec![
                FsOp::Link {
                    from: Some("a".into()),
                    to: "b".into()
                },
                w("b")
            ]),
            vec!["+ b", "~ a"]
        );
        assert_eq!(
            run(vec![FsOp::Link {
                from: None,
                to: "t".into()
            }]),
            vec!["+ t"]
        );
        // git-style: temp object linked to its final name, temp removed.
        assert_eq!(
            run(vec![
                c("tmp_obj"),
                FsOp::Link {
                    from: Some("tmp_obj".into()),
                    to: "obj".into()
                },
                rm("tmp_obj")
            ]),
            vec!["+ obj"]
        );
    }

    /// Metadata-only changes are reported as such; on new files they are just creations.
    #[test]
    fn metadata() {
        assert_eq!(run(vec![m("a")]), vec!["m a"]);
        assert_eq!(run(vec![m("a"), w("a")]), vec!["~ a"]);
        assert_eq!(run(vec![c("n"), m("n")]), vec!["+ n"]);
    }

    /// Reset makes the current state the baseline.
    #[test]
    fn reset_forgets() {
        let mut t = FsTracker::new();
        t.apply(c("x"));
        t.reset();
        t.apply(rm("x"));
        assert_eq!(t.changes(), vec![FileChange::Deleted { path: "x".into() }]);
    }

    /// Large windows stay correct (and linear): 100k churned files, then 25k created files
    /// removed with their directory.
    #[test]
    fn large_windows() {
        let mut t = FsTracker::new();
        for i in 0..100_000 {
            t.apply(c(&format!("w/t{i}")));
            t.apply(rm(&format!("w/t{i}")));
        }
        assert!(t.changes().is_empty());
        t.apply(c("big"));
        for i in 0..25_000 {
            t.apply(c(&format!("big/f{i}")));
            t.apply(w(&format!("big/f{i}")));
        }
        assert_eq!(t.changes().len(), 25_001);
        t.apply(FsOp::Rename {
            from: "big".into(),
            to: "big2".into(),
            noreplace: true,
            exchange: false,
        });
        assert_eq!(t.changes().len(), 25_001);
        for i in 0..25_000 {
            t.apply(rm(&format!("big2/f{i}")));
        }
        t.apply(rm("big2"));
        assert!(t.changes().is_empty());
    }
}
