//! Inspector API behaviour with real cgroups: descendants count, reset and unwatch, ignore
//! scopes, errors. Needs root.

mod common;

use common::{TestSandbox, inspector, prerequisites};
use inspector_bpf::{Decision, FileChange, IgnoreRule, IgnoreScope, InspectorError};

fn rel(sb: &TestSandbox, p: &str) -> String {
    format!("{}{p}", sb.rel_prefix())
}

/// A process in a child cgroup of the sandbox's cgroup is attributed to the sandbox.
#[test]
fn descendant_cgroups_count() {
    if !prerequisites("descendant_cgroups_count") {
        return;
    }
    let sb = TestSandbox::new(|_| {});
    let child = sb.cgroup.path().join("inner");
    std::fs::create_dir(&child).unwrap();
    let script = format!(
        "echo $$ > {}/cgroup.procs && echo x > nested.txt",
        child.display()
    );
    assert_eq!(sb.sh(&script), 0);
    let eff = inspector().status(&sb.id).unwrap();
    assert_eq!(eff.decision, Decision::FsOnly, "{:?}", eff.reasons);
    assert_eq!(
        eff.files,
        vec![FileChange::Created {
            path: rel(&sb, "nested.txt")
        }]
    );
}

/// reset() makes the current state the baseline; status() is repeatable until then.
#[test]
fn reset_starts_a_new_window() {
    if !prerequisites("reset_starts_a_new_window") {
        return;
    }
    let sb = TestSandbox::new(|_| {});
    assert_eq!(sb.sh("echo 1 > a.txt"), 0);
    let first = inspector().status(&sb.id).unwrap();
    let again = inspector().status(&sb.id).unwrap();
    assert_eq!(
        first.files, again.files,
        "status without reset reports the same window"
    );
    inspector().reset(&sb.id).unwrap();
    assert_eq!(inspector().status(&sb.id).unwrap().decision, Decision::Skip);
    assert_eq!(sb.sh("rm a.txt"), 0);
    let eff = inspector().status(&sb.id).unwrap();
    assert_eq!(
        eff.files,
        vec![FileChange::Deleted {
            path: rel(&sb, "a.txt")
        }]
    );
}

/// Scope `all` drops a process's file effects; scope `process-only` keeps them.
#[test]
fn ignore_scopes() {
    if !prerequisites("ignore_scopes") {
        return;
    }
    let all = TestSandbox::new(|s| {
        s.ignore.push(IgnoreRule {
            pid: None,
            comm: Some("touch".into()),
            exe: None,
            scope: IgnoreScope::All,
        })
    });
    assert_eq!(all.sh("touch ignored.txt"), 0);
    let eff = inspector().status(&all.id).unwrap();
    assert_eq!(eff.decision, Decision::Skip, "{:?}", eff.reasons);
    let po = TestSandbox::new(|s| {
        s.ignore.push(IgnoreRule {
            pid: None,
            comm: Some("touch".into()),
            exe: None,
            scope: IgnoreScope::ProcessOnly,
        })
    });
    assert_eq!(po.sh("touch counted.txt"), 0);
    let eff = inspector().status(&po.id).unwrap();
    assert_eq!(
        eff.files,
        vec![FileChange::Created {
            path: rel(&po, "counted.txt")
        }]
    );
}

/// Configured prefixes never count; neither do other sandboxes' changes.
#[test]
fn prefixes_and_isolation() {
    if !prerequisites("prefixes_and_isolation") {
        return;
    }
    let a = TestSandbox::new(|_| {});
    let b = TestSandbox::new(|_| {});
    let dir = a.dir.clone();
    let c = TestSandbox::new(move |s| {
        s.ignored_prefixes
            .push(dir.join("cache").to_string_lossy().into_owned())
    });
    assert_eq!(a.sh("mkdir cache"), 0);
    inspector().reset(&a.id).unwrap();
    let script = format!("echo x > {}/cache/blob", a.dir.display());
    assert_eq!(c.sh(&script), 0);
    assert_eq!(inspector().status(&c.id).unwrap().decision, Decision::Skip);
    assert_eq!(b.sh("echo x > mine.txt"), 0);
    assert_eq!(
        inspector().status(&a.id).unwrap().decision,
        Decision::Skip,
        "a saw nothing of its own"
    );
    assert_eq!(
        inspector().status(&b.id).unwrap().decision,
        Decision::FsOnly
    );
}

/// Unknown sandboxes are errors; a sandbox cannot be watched twice.
#[test]
fn api_errors() {
    if !prerequisites("api_errors") {
        return;
    }
    assert!(matches!(
        inspector().status("crab-test-nope"),
        Err(InspectorError::UnknownSandbox { .. })
    ));
    let sb = TestSandbox::new(|_| {});
    let spec = inspector_bpf::SandboxSpec::new(sb.id.clone(), sb.cgroup.path(), "/");
    assert!(matches!(
        inspector().watch(spec),
        Err(InspectorError::AlreadyWatched { .. })
    ));
}
