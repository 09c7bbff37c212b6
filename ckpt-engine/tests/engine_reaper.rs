//! The subreaper: orphans of sandboxes are reaped, children someone waits for are left alone.
//! (Own test binary: it makes the whole test process a child subreaper.)

use std::time::Duration;

use ckpt_engine::engine::{Reaper, become_subreaper};

/// Proves an orphan reparented to the subreaper is reaped after two sweeps, while a child whose
/// owner waits for it promptly keeps its exit status for the owner.
#[test]
fn orphans_are_reaped_and_owned_children_are_not_stolen() {
    become_subreaper().unwrap();
    // The shell exits at once; its background `sleep` becomes our orphan.
    let out = std::process::Command::new("/bin/sh")
        .args(["-c", "sleep 0.1 & echo $!"])
        .output()
        .unwrap();
    let orphan: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut reaper = Reaper::new();
    assert!(
        reaper.sweep().is_empty(),
        "first sight of a zombie is not enough"
    );
    let reaped = reaper.sweep();
    assert!(
        reaped.contains(&orphan),
        "orphan {orphan} reaped: {reaped:?}"
    );
    // A child whose owner waits within a sweep interval keeps its exit status for the owner.
    let mut prompt = std::process::Command::new("/bin/sh")
        .args(["-c", "exit 5"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut fresh = Reaper::new();
    assert!(fresh.sweep().is_empty());
    assert_eq!(
        prompt.wait().unwrap().code(),
        Some(5),
        "owner still gets the status"
    );
    assert!(!std::path::Path::new(&format!("/proc/{orphan}")).exists());
}
