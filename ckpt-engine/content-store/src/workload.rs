//! Deterministic synthetic workloads: pseudo-random and pseudo-source bytes, and the 30-turn
//! edit-heavy agent trajectory that measures stored bytes against a full copy per turn (used by
//! the `trajectory` test and by `loadtest bench engine`, so both measure the same thing).
//!
//! The trajectory: a repository-like tree (400 source files in 20 packages, three 1.5 MB binary
//! assets, a log); each turn edits 3 files in place and appends to the log, and every few turns
//! creates, deletes or renames files and writes 200 kB of build output. Each turn returns the
//! changes it made, as an inspector would report them.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::Change;

/// Turns of the edit-heavy trajectory after the initial tree.
pub const TURNS: u64 = 30;

/// Deterministic pseudo-random bytes (xorshift), incompressible.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Pseudo source code (compressible like real code), deterministic in `seed`.
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "fn", "let", "mut", "self", "return", "if", "else", "match", "impl", "struct", "pub",
        "use", "crate", "value", "count", "index", "buffer", "result", "error", "Ok", "Err",
        "None", "Some", "for", "in", "while", "loop", "break", "=", "+", "(", ")", "{", "}", ";",
        "config", "parse", "request", "response", "handler", "state", "update",
    ];
    let r = random_bytes(seed, len / 3 + 16);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        let w = WORDS[r[i % r.len()] as usize % WORDS.len()];
        out.extend_from_slice(w.as_bytes());
        out.push(if r[(i + 1) % r.len()].is_multiple_of(9) {
            b'\n'
        } else {
            b' '
        });
        i += 1;
    }
    out.truncate(len);
    out
}

/// Writes the trajectory's initial tree into the (empty) directory `root`.
pub fn initial_tree(root: &Path) -> std::io::Result<()> {
    for pkg in 0..20 {
        let dir = root.join(format!("src/pkg{pkg}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..20 {
            let seed = pkg * 100 + f;
            std::fs::write(
                dir.join(format!("mod{f}.rs")),
                text_bytes(seed, 2_000 + (seed as usize * 37) % 12_000),
            )?;
        }
    }
    std::fs::create_dir_all(root.join("assets"))?;
    for a in 0..3 {
        std::fs::write(
            root.join(format!("assets/blob{a}.bin")),
            random_bytes(9000 + a, 1_500_000),
        )?;
    }
    std::fs::write(root.join("agent.log"), text_bytes(1, 10_000))
}

/// Edits one line-ish region of a file in place.
fn edit(root: &Path, rel: &str, seed: u64) -> std::io::Result<()> {
    let p = root.join(rel);
    let mut data = std::fs::read(&p)?;
    let at = (seed as usize * 7919) % data.len().max(1);
    let patch = text_bytes(seed + 77_777, 120);
    let end = (at + 80).min(data.len());
    data.splice(at..end, patch);
    std::fs::write(&p, data)
}

/// Applies turn `turn` (1..=[`TURNS`]) to `root` and returns what it changed.
pub fn edit_heavy_turn(root: &Path, turn: u64) -> std::io::Result<Vec<Change>> {
    let mut changes = Vec::new();
    for k in 0..3 {
        let seed = turn * 10 + k;
        let rel = format!("src/pkg{}/mod{}.rs", (seed * 13) % 20, (seed * 7) % 20);
        if root.join(&rel).exists() {
            edit(root, &rel, seed)?;
            changes.push(Change::Modified(PathBuf::from(rel)));
        }
    }
    std::fs::OpenOptions::new()
        .append(true)
        .open(root.join("agent.log"))?
        .write_all(&text_bytes(turn + 500, 600))?;
    changes.push(Change::Modified(PathBuf::from("agent.log")));
    if turn.is_multiple_of(4) {
        let rel = format!("src/pkg{}/new_{turn}.rs", turn % 20);
        std::fs::write(root.join(&rel), text_bytes(turn + 1000, 3_000))?;
        changes.push(Change::Created(PathBuf::from(rel)));
    }
    if turn.is_multiple_of(6) {
        let rel = format!("src/pkg{}/mod19.rs", turn % 20);
        if root.join(&rel).exists() {
            std::fs::remove_file(root.join(&rel))?;
            changes.push(Change::Deleted(PathBuf::from(rel)));
        }
    }
    if turn.is_multiple_of(10) {
        let from = format!("src/pkg{}", turn / 10);
        let to = format!("src/renamed{}", turn / 10);
        std::fs::rename(root.join(&from), root.join(&to))?;
        changes.push(Change::Renamed {
            from: from.into(),
            to: to.into(),
        });
    }
    if turn.is_multiple_of(5) {
        std::fs::create_dir_all(root.join("target"))?;
        std::fs::write(root.join("target/app"), random_bytes(turn, 200_000))?;
        changes.push(Change::Created(PathBuf::from("target")));
    }
    Ok(changes)
}
