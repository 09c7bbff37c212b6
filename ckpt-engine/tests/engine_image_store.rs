//! Process images are written incrementally (`[engine.process] incremental_images`, the
//! default): CRIU dumps into a staging tmpfs and a full checkpoint writes only the memory the
//! sandbox's previous image does not hold. A process holds 16 MB of random data; three full
//! checkpoints, a restore of the middle one whose memory is checked byte for byte (a checksum
//! the restored process computes), a checkpoint after the restore; and the same with the option
//! off. Images are stored zstd-compressed by default (`image_compression`), and each point
//! records what its image takes on disk. Real runc sandbox, real CRIU, real btrfs reflinks
//! and compression. Run as root:
//! `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine --test engine_image_store -- --nocapture`.

mod common;
mod process_support;

use std::time::{Duration, Instant};

use ckpt_engine::fs::compression::Compression;
use ckpt_engine::fs::{ChangeHint, extents};
use ckpt_engine::manifest::{CheckpointKind, RecoveryPoint};
use ckpt_engine::{Engine, EngineConfig};
use common::{TestEngine, file, sh, unique};
use process_support::{GIB, process_prerequisites};

/// Holds ~16 MB of random text in the shell's heap; on SIGUSR1 writes its checksum to `/sum`.
const HOLDER: &str = "x=$(head -c 12000000 /dev/urandom | base64 -w0); \
    trap 'echo \"$x\" | md5sum > /sum.tmp; mv /sum.tmp /sum' USR1; \
    echo $$ > /holder.pid; echo ready > /ready; while :; do sleep 1; done";

fn full(e: &Engine, name: &str) -> RecoveryPoint {
    let p = e
        .checkpoint(name, CheckpointKind::Full, &ChangeHint::Unknown)
        .expect("full checkpoint");
    assert_eq!(p.captured, CheckpointKind::Full, "note {:?}", p.note);
    p
}

fn wait_for_file(e: &Engine, name: &str, path: &str) -> String {
    let started = Instant::now();
    loop {
        if let Some(text) = file(e, name, path) {
            return text;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{path} never appeared"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The checksum of the holder's memory, as the holder computes it now.
fn checksum(e: &Engine, name: &str) -> String {
    sh(e, name, "rm -f /sum; kill -USR1 $(cat /holder.pid)");
    wait_for_file(e, name, "/sum")
}

/// Bytes on disk of a point's own image (written bytes after btrfs compression).
fn disk(p: &RecoveryPoint) -> u64 {
    let image = p.process.as_ref().expect("image");
    image
        .disk_bytes
        .expect("bytes on disk measured (btrfs, root)")
}

/// (image bytes, written bytes) of a point's own image.
fn bytes(p: &RecoveryPoint) -> (u64, u64) {
    let image = p.process.as_ref().expect("image");
    assert_eq!(image.id, p.id, "the point's own image");
    (
        image.image_bytes,
        image.written_bytes.expect("written bytes"),
    )
}

fn start_holder(e: &Engine, name: &str) -> String {
    e.create(name, None).expect("create sandbox");
    e.exec(name, &["/bin/sh".into(), "-c".into(), HOLDER.into()], true)
        .expect("start the holder");
    wait_for_file(e, name, "/ready");
    checksum(e, name)
}

/// Restores `p`, checks the holder's memory is what it was, and returns.
fn restore_and_check(e: &Engine, name: &str, p: &RecoveryPoint, sum: &str) {
    sh(e, name, "rm /ready");
    e.restore(name, Some(&p.id)).expect("restore");
    assert_eq!(file(e, name, "/ready").as_deref(), Some("ready"));
    assert_eq!(
        checksum(e, name),
        sum,
        "the restored memory is the dumped one"
    );
}

#[test]
fn images_write_only_changed_memory_and_restore_exactly() {
    if !process_prerequisites("images_write_only_changed_memory_and_restore_exactly") {
        return;
    }
    let t = TestEngine::open(2 * GIB);
    let e = t.engine();
    assert!(
        EngineConfig::default().process.incremental_images,
        "on by default"
    );
    let name = unique("");
    let sum = start_holder(e, &name);

    let p1 = full(e, &name);
    let p2 = full(e, &name);
    let p3 = full(e, &name);
    let (image1, written1) = bytes(&p1);
    let disk1 = disk(&p1);
    eprintln!("p1: {written1} of {image1} bytes written, {disk1} on disk");
    assert!(image1 > 16_000_000, "the image holds the data: {image1}");
    assert_eq!(written1, image1, "nothing to share with");
    // Base64 text of random bytes: zstd stores about 6 bits of each 8.
    assert!(
        disk1 * 100 < written1 * 85,
        "compressed (zstd by default): {disk1} bytes on disk for {written1} written"
    );
    for p in [&p2, &p3] {
        let (image, written) = bytes(p);
        eprintln!(
            "{}: {written} of {image} bytes written, {} on disk",
            p.id,
            disk(p)
        );
        assert!(image > 16_000_000, "{image}");
        assert!(
            written * 10 < image,
            "under 10% of unchanged memory written: {written} of {image}"
        );
        assert!(disk(p) <= written + 64 * 4096, "shared blocks take no room");
    }
    let totals = e.image_totals().expect("process backend");
    assert_eq!(totals.images, 3, "{totals:?}");
    assert_eq!(
        totals.written,
        [&p1, &p2, &p3].map(|p| bytes(p).1).iter().sum::<u64>()
    );
    assert_eq!(totals.disk, [&p1, &p2, &p3].map(disk).iter().sum::<u64>());
    // Everything the sandbox's points keep, each extent once at its compressed size: the
    // three images take about what the first one stored, not three times their size.
    let meta = e.pool().root().join("meta").join(&name);
    let (logical, on_disk) = extents::tree_usage(&meta).expect("usage");
    eprintln!("{}: {on_disk} bytes on disk for {logical}", meta.display());
    assert!(logical > 3 * image1, "{logical}");
    assert!(
        on_disk >= totals.disk && on_disk < image1,
        "{on_disk} on disk; the images stored {}",
        totals.disk
    );

    // A shared image restores with the same memory, and the next image is written against
    // the restored point's image (not the newest one, whose index is kept).
    restore_and_check(e, &name, &p2, &sum);
    let p4 = full(e, &name);
    assert_eq!(
        p4.parent.as_deref(),
        Some(p2.id.as_str()),
        "after the restore"
    );
    let (image, written) = bytes(&p4);
    eprintln!("p4: {written} of {image} bytes written");
    assert!(written * 10 < image, "{written} of {image}");
    restore_and_check(e, &name, &p4, &sum);
    e.remove(&name).expect("rm");
}

#[test]
fn images_are_written_whole_with_the_option_off() {
    if !process_prerequisites("images_are_written_whole_with_the_option_off") {
        return;
    }
    let t = TestEngine::open_with(2 * GIB, |c| {
        c.process.incremental_images = false;
        c.process.image_compression = Compression::None;
    });
    let e = t.engine();
    let name = unique("");
    let sum = start_holder(e, &name);
    let _p1 = full(e, &name);
    let p2 = full(e, &name);
    let (image, written) = bytes(&p2);
    assert!(image > 16_000_000, "{image}");
    assert_eq!(written, image, "every byte written");
    let files = 64 * 4096;
    assert!(
        disk(&p2) + files >= image && disk(&p2) <= image + files,
        "uncompressed: {} bytes on disk for {image}",
        disk(&p2)
    );
    assert_eq!(e.image_totals().expect("backend").images, 0);
    restore_and_check(e, &name, &p2, &sum);
    e.remove(&name).expect("rm");
}
