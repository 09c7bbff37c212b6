//! What a checkpoint's tree hash costs when little changed: the incremental hash of a fresh
//! read-only btrfs snapshot of a tree (its inodes not yet cached, as at a real checkpoint)
//! against the index of the previous snapshot, driven by the dirty set of the real
//! `btrfs send --no-data -p` between the two, as the btrfs backend does.
//!
//! `cargo run --release -p ckpt-engine --example tree_hash_bench -- TREE SCRATCH [ROUNDS]`
//! copies TREE (e.g. an unpacked root filesystem) into a new subvolume under SCRATCH (a
//! directory on btrfs; as root), then per round writes one file under `work/`, snapshots the
//! tree and hashes the snapshot. The subvolumes are deleted at the end.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ckpt_engine::fs::send_stream;
use ckpt_engine::fs::tree_hash::{Dirty, hash_tree};
use ckpt_engine::pool;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (tree, scratch) = match (args.get(1), args.get(2)) {
        (Some(t), Some(s)) => (PathBuf::from(t), PathBuf::from(s)),
        _ => return Err("usage: tree_hash_bench TREE SCRATCH [ROUNDS]".into()),
    };
    let rounds: usize = args.get(3).map_or(Ok(20), |r| r.parse())?;
    let src = scratch.join("bench-src");
    pool::create_subvolume(&src)?;
    let mut made = vec![src.clone()];
    let result = run(&tree, &scratch, &src, rounds, &mut made);
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
    let first = scratch.join("bench-0");
    pool::snapshot_subvolume(src, &first, true)?;
    made.push(first.clone());
    let (mut index, _) = hash_tree(&first, None, &Dirty::All)?;
    let mut prev = first;
    std::fs::create_dir_all(src.join("work"))?;
    let mut micros = Vec::new();
    for r in 1..=rounds {
        std::fs::write(
            src.join("work").join(format!("turn-{r}")),
            format!("turn {r}"),
        )?;
        let snap = scratch.join(format!("bench-{r}"));
        pool::snapshot_subvolume(src, &snap, true)?;
        made.push(snap.clone());
        let out = std::process::Command::new("btrfs")
            .args(["send", "-q", "--no-data", "-p"])
            .arg(&prev)
            .arg(&snap)
            .output()?;
        let dirty = send_stream::parse(&out.stdout)?.dirty;
        let t = Instant::now();
        let (next, stats) = hash_tree(&snap, Some(&index), &dirty)?;
        micros.push(t.elapsed().as_micros());
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
    micros.sort_unstable();
    println!(
        "incremental hash of a fresh snapshot, one file written: p50 {} µs, min {} µs, max {} µs ({rounds} rounds)",
        micros[micros.len() / 2],
        micros[0],
        micros[micros.len() - 1]
    );
    Ok(())
}
