//! `crab inspect` in-process: one JSON object per turn from a persistent shell. Needs root.

mod common;

use common::prerequisites;
use inspector_bpf::cli::{InspectArgs, run_with};

/// Turn 1 creates a file (fs), turn 2 changes only the shell's state (process), turn 3 reads.
#[test]
fn inspect_turns_json() {
    if !prerequisites("inspect_turns_json") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("crab-test-{}-cli", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let input = format!(
        "echo x > {d}/made.txt\nexport FOO=1\ncat {d}/made.txt\n",
        d = dir.display()
    );
    let args = InspectArgs {
        json: true,
        turns: true,
        ignore_comm: vec![],
        ignore_prefix: vec![],
        command: vec![],
    };
    let mut out = Vec::new();
    let code = run_with(args, &mut input.as_bytes(), &mut out).unwrap();
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    // The persistent bash is tracked like any process: it ran in every turn.
    assert_eq!(lines[0]["decision"], "full", "{}", lines[0]);
    assert_eq!(
        lines[0]["files"][0]["path"],
        format!("{}/made.txt", dir.to_string_lossy().trim_start_matches('/'))
    );
    assert_eq!(lines[1]["decision"], "process_only", "{}", lines[1]);
    assert_eq!(lines[2]["decision"], "process_only", "{}", lines[2]);
    assert_eq!(lines[2]["turn"], 3);
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `--ignore-comm bash`, the shell's own state does not count; read-only turns skip.
#[test]
fn inspect_turns_ignoring_the_shell() {
    if !prerequisites("inspect_turns_ignoring_the_shell") {
        return;
    }
    let input = "cd /\nls >/dev/null\n";
    let args = InspectArgs {
        json: true,
        turns: true,
        ignore_comm: vec!["bash".into()],
        ignore_prefix: vec![],
        command: vec![],
    };
    let mut out = Vec::new();
    run_with(args, &mut input.as_bytes(), &mut out).unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert_eq!(l["decision"], "skip", "{l}");
    }
}

/// A single command: exit status passes through, effects are printed once.
#[test]
fn inspect_single_command() {
    if !prerequisites("inspect_single_command") {
        return;
    }
    let args = InspectArgs {
        json: true,
        turns: false,
        ignore_comm: vec![],
        ignore_prefix: vec![],
        command: vec!["sh".into(), "-c".into(), "exit 3".into()],
    };
    let mut out = Vec::new();
    let code = run_with(args, &mut &b""[..], &mut out).unwrap();
    assert_eq!(code, 3);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["decision"], "skip", "{v}");
}
