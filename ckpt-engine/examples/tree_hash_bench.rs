//! What a checkpoint's tree hash costs when little changed: the incremental hash of a fresh
//! read-only btrfs snapshot of a tree (its inodes not yet cached, as at a real checkpoint)
//! against the index of the previous snapshot, driven by the dirty set of the real
//! `btrfs send --no-data -p` between the two, as the btrfs backend does.
//!
//! `cargo run --release -p ckpt-engine --example tree_hash_bench -- TREE SCRATCH [ROUNDS]`
//! copies TREE (e.g. an unpacked root filesystem) into a new subvolume under SCRATCH (a
//! directory on btrfs; as root), then per round writes one file under `work/`, snapshots the
//! tree and hashes the snapshot. The subvolumes are deleted at the end.
//!
//! With a fourth argument `append`, a 50 MB log under `work/` grows by 1 MiB per round
//! instead, and each round's snapshot is hashed twice, side by side: reading only the log's
//! blocks whose extents changed (what the btrfs backend does), and reading the log whole
//! (an index without block chaining values); the order alternates between rounds.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ckpt_engine::fs::send_stream;
use ckpt_engine::fs::tree_hash::{Dirty, TreeIndex, hash_tree, hash_tree_with};
use ckpt_engine::pool;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (tree, scratch) = match (args.get(1), args.get(2)) {
        (Some(t), Some(s)) => (PathBuf::from(t), PathBuf::from(s)),
        _ => return Err("usage: tree_hash_bench TREE SCRATCH [ROUNDS]".into()),
    };
    let rounds: usize = args.get(3).map_or(Ok(20), |r| r.parse())?;
    let append = args.get(4).is_some_and(|a| a == "append");
    let src = scratch.join("bench-src");
    pool::create_subvolume(&src)?;
    let mut made = vec![src.clone()];
    let result = run(&tree, &scratch, &src, rounds, append, &mut made);
    for p in made.iter().rev() {
        let _ = pool::delete_subvolume(p);
    }
    result
}

fn run(
    tree: &Path,
    scratch: &Path,
    src: &Path,
    rounds: usize,
    append: bool,
    made: &mut Vec<PathBuf>,
) -> Result<(), Box<dyn std::error::Error>> {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(tree.join("."))
        .arg(src)
        .status()?;
    if !status.success() {
        return Err("cp -a failed".into());
    }
    const MIB: usize = 1 << 20;
    let log = src.join("work").join("big.log");
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    if append {
        std::fs::create_dir_all(src.join("work"))?;
        std::fs::write(&log, noise.bytes(50_000_000))?;
    }
    let first = scratch.join("bench-0");
    pool::snapshot_subvolume(src, &first, true)?;
    made.push(first.clone());
    let (mut index, _) = hash_tree(&first, None, &Dirty::All)?;
    let mut prev = first;
    std::fs::create_dir_all(src.join("work"))?;
    let mut micros = Vec::new();
    let mut whole_micros = Vec::new();
    for r in 1..=rounds {
        if append {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(&log)?
                .write_all(&noise.bytes(MIB))?;
        } else {
            std::fs::write(
                src.join("work").join(format!("turn-{r}")),
                format!("turn {r}"),
            )?;
        }
        let snap = scratch.join(format!("bench-{r}"));
        pool::snapshot_subvolume(src, &snap, true)?;
        made.push(snap.clone());
        let out = std::process::Command::new("btrfs")
            .args(["send", "-q", "--no-data", "-p"])
            .arg(&prev)
            .arg(&snap)
            .output()?;
        let dirty = send_stream::parse(&out.stdout)?.dirty;
        let blocked = |index: &TreeIndex| {
            let t = Instant::now();
            let r = hash_tree_with(&snap, Some(index), &dirty, Some(&prev));
            (r, t.elapsed().as_micros())
        };
        let whole = |index: &TreeIndex| {
            let bare = TreeIndex {
                blocks: Default::default(),
                ..index.clone()
            };
            let t = Instant::now();
            let r = hash_tree(&snap, Some(&bare), &dirty);
            (r, t.elapsed().as_micros())
        };
        let ((result, us), other) = if !append {
            (blocked(&index), None)
        } else if r % 2 == 0 {
            let w = whole(&index);
            (blocked(&index), Some(w))
        } else {
            let b = blocked(&index);
            (b, Some(whole(&index)))
        };
        let (next, stats) = result?;
        micros.push(us);
        if let Some((w, w_us)) = other {
            assert_eq!(w?.0.tree_hash, next.tree_hash);
            whole_micros.push(w_us);
        }
        if r == 1 {
            println!("{stats:?}");
            assert_eq!(
                next.tree_hash,
                hash_tree(&snap, None, &Dirty::All)?.0.tree_hash
            );
        }
        index = next;
        prev = snap;
    }
    let summary = |what: &str, micros: &mut Vec<u128>| {
        micros.sort_unstable();
        println!(
            "incremental hash of a fresh snapshot, {what}: p50 {} µs, min {} µs, max {} µs ({rounds} rounds)",
            micros[micros.len() / 2],
            micros[0],
            micros[micros.len() - 1]
        );
    };
    if append {
        summary("50 MB log + 1 MiB, changed blocks read", &mut micros);
        summary("50 MB log + 1 MiB, read whole", &mut whole_micros);
    } else {
        summary("one file written", &mut micros);
    }
    Ok(())
}

/// Bytes that do not compress (xorshift).
struct Noise(u64);

impl Noise {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0 as u8
            })
            .collect()
    }
}
