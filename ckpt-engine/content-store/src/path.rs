//! Validated relative paths inside a snapshot and their portable text encoding.
//!
//! A [`RelPath`] is a sequence of `/`-separated byte components relative to a tree's root; the
//! empty path is the root itself. Every constructor validates, so a `RelPath` can be handed to
//! `openat`-style calls under a root directory without escaping it: no absolute paths, no `.`
//! or `..`, no empty components, no NUL, components of at most [`MAX_NAME_LEN`] bytes, at most
//! [`MAX_DEPTH`] components and [`MAX_PATH_LEN`] bytes in total.
//!
//! Paths are Unix bytes, not necessarily UTF-8. In manifests they are written as text: valid
//! UTF-8 is kept, `%` and every byte of an invalid UTF-8 sequence become `%XX`.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::error::StoreError;

/// Longest file name component (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;
/// Deepest nesting accepted in a snapshot.
pub const MAX_DEPTH: usize = 256;
/// Longest relative path accepted (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;

/// A validated path relative to a tree root (see the module docs).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    /// The root of the tree.
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    /// Validates raw bytes (`a/b/c`, or empty for the root).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StoreError> {
        let fail = |reason| {
            Err(StoreError::InvalidPath {
                path: String::from_utf8_lossy(bytes).into_owned(),
                reason,
            })
        };
        if bytes.is_empty() {
            return Ok(RelPath::root());
        }
        if bytes.len() > MAX_PATH_LEN {
            return fail("path too long");
        }
        if bytes.contains(&0) {
            return fail("path contains a NUL byte");
        }
        if bytes[0] == b'/' {
            return fail("absolute path");
        }
        let mut depth = 0;
        for component in bytes.split(|&b| b == b'/') {
            depth += 1;
            match component {
                b"" => return fail("empty path component"),
                b"." | b".." => return fail("dot or dot-dot component"),
                c if c.len() > MAX_NAME_LEN => return fail("component longer than 255 bytes"),
                _ => {}
            }
        }
        if depth > MAX_DEPTH {
            return fail("path nested too deeply");
        }
        Ok(RelPath(bytes.to_vec()))
    }

    /// Validates a `Path` that must be relative and free of `.`/`..` (e.g. from a dirty set).
    pub fn from_path(path: &Path) -> Result<Self, StoreError> {
        let mut out = Vec::new();
        for component in path.components() {
            match component {
                Component::Normal(name) => {
                    if !out.is_empty() {
                        out.push(b'/');
                    }
                    out.extend_from_slice(name.as_bytes());
                }
                Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) => {
                    return Err(StoreError::InvalidPath {
                        path: path.display().to_string(),
                        reason: "absolute path",
                    });
                }
                Component::ParentDir => {
                    return Err(StoreError::InvalidPath {
                        path: path.display().to_string(),
                        reason: "dot or dot-dot component",
                    });
                }
            }
        }
        RelPath::from_bytes(&out)
    }

    /// The raw bytes (empty for the root).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether this is the root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// As a relative `Path` (empty for the root).
    pub fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.0))
    }

    /// `root.join(self)` without a trailing separator for the root.
    pub fn under(&self, root: &Path) -> PathBuf {
        if self.is_root() {
            root.to_path_buf()
        } else {
            root.join(self.as_path())
        }
    }

    /// The components, outermost first.
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/').filter(|c| !c.is_empty())
    }

    /// Number of components (0 for the root).
    pub fn depth(&self) -> usize {
        self.components().count()
    }

    /// The parent directory (None for the root).
    pub fn parent(&self) -> Option<RelPath> {
        if self.is_root() {
            return None;
        }
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Some(RelPath(self.0[..i].to_vec())),
            None => Some(RelPath::root()),
        }
    }

    /// The last component (empty for the root).
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// A child of this path; `name` must be a single valid component.
    pub fn join(&self, name: &[u8]) -> Result<RelPath, StoreError> {
        let mut bytes = self.0.clone();
        if !bytes.is_empty() {
            bytes.push(b'/');
        }
        bytes.extend_from_slice(name);
        if name.contains(&b'/') || name.is_empty() {
            return Err(StoreError::InvalidPath {
                path: String::from_utf8_lossy(&bytes).into_owned(),
                reason: "invalid component",
            });
        }
        RelPath::from_bytes(&bytes)
    }

    /// Whether `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        other.is_root()
            || (self.0.starts_with(&other.0)
                && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/'))
    }

    /// The portable text form used in manifests.
    pub fn encode(&self) -> String {
        encode_bytes(&self.0)
    }

    /// Parses and validates the portable text form.
    pub fn decode(text: &str) -> Result<Self, StoreError> {
        let bytes = decode_bytes(text).ok_or_else(|| StoreError::InvalidPath {
            path: text.to_owned(),
            reason: "malformed percent escape",
        })?;
        RelPath::from_bytes(&bytes)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.encode())
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            f.write_str(".")
        } else {
            f.write_str(&self.encode())
        }
    }
}

impl serde::Serialize for RelPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.encode())
    }
}

impl<'de> serde::Deserialize<'de> for RelPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        RelPath::decode(&text).map_err(serde::de::Error::custom)
    }
}

/// Byte string to text: valid UTF-8 kept, `%` and invalid bytes escaped as `%XX`.
pub fn encode_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '%' {
                out.push_str("%25");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Inverse of [`encode_bytes`]; `None` on a malformed escape.
pub fn decode_bytes(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_escapes_and_bad_components() {
        for bad in [
            &b"/etc/passwd"[..],
            b"a/../b",
            b"..",
            b"a//b",
            b"a/./b",
            b"a/",
            b"a\0b",
        ] {
            assert!(RelPath::from_bytes(bad).is_err(), "{bad:?} accepted");
        }
        assert!(RelPath::from_bytes(&[b'x'; 256]).is_err());
        assert!(RelPath::from_bytes(&[b'x'; 255]).is_ok());
        let deep = vec!["d"; MAX_DEPTH + 1].join("/");
        assert!(RelPath::from_bytes(deep.as_bytes()).is_err());
        assert!(RelPath::from_path(Path::new("../x")).is_err());
        assert!(RelPath::from_path(Path::new("/x")).is_err());
    }

    #[test]
    fn encoding_round_trips_non_utf8() {
        let raw = b"dir/na\xffme%41/\xc3\xa9t\xc3";
        let p = RelPath::from_bytes(raw).unwrap();
        let text = p.encode();
        assert_eq!(RelPath::decode(&text).unwrap(), p);
        assert!(RelPath::decode("a/%2").is_err());
        assert!(
            RelPath::decode("a/%2F..").is_err(),
            "escaped slash must not smuggle .."
        );
    }

    #[test]
    fn parent_and_prefix() {
        let p = RelPath::from_bytes(b"a/b/c").unwrap();
        assert_eq!(p.parent().unwrap().as_bytes(), b"a/b");
        assert_eq!(p.file_name(), b"c");
        assert!(p.starts_with(&RelPath::from_bytes(b"a/b").unwrap()));
        assert!(!p.starts_with(&RelPath::from_bytes(b"a/bc").unwrap()));
        assert!(
            !RelPath::from_bytes(b"a/bc")
                .unwrap()
                .starts_with(&RelPath::from_bytes(b"a/b").unwrap())
        );
    }
}
