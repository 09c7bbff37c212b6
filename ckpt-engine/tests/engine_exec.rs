//! Commands entering a container sandbox without runc ([`ckpt_engine::enter`], the engine's
//! default `exec = "native"`): the process started is the one `runc exec` starts, exit codes
//! and output come back as from `runc exec`, a paused container is refused with nothing
//! started. Real runc containers on a real loop btrfs pool. Run as root:
//! `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine --test engine_exec`.

mod common;

use std::path::PathBuf;

use ckpt_engine::enter::{self, EnterError};
use ckpt_engine::runc::Runc;
use common::{TestEngine, prerequisites, sh, unique};

const GIB: u64 = 1 << 30;

/// What a command sees of itself: credentials, capability sets, limits, namespaces, cgroups,
/// environment, working directory, descriptors (stdio kinds only: pipe numbers differ).
const PROBE: &str = r#"grep -E '^(Uid|Gid|Groups|Umask|Cap[A-Za-z]+|SigBlk|SigIgn|NoNewPrivs|Seccomp|Seccomp_filters|Cpus_allowed_list|Mems_allowed_list):' /proc/self/status
cat /proc/self/cgroup
for n in cgroup ipc mnt net pid pid_for_children time time_for_children user uts; do echo "$n $(readlink /proc/self/ns/$n)"; done
env | grep -v '^PPID=' | sort
pwd
ulimit -a
cat /proc/self/oom_score_adj /proc/self/loginuid /proc/self/personality
for f in /proc/self/fd/*; do echo "$f $(readlink $f | cut -d: -f1)"; done
hostname
read -r pid comm state ppid pgrp sid tty tpgid flags f10 f11 f12 f13 f14 f15 f16 f17 prio nice rest < /proc/$$/stat
echo "session leader $((sid == pid)), group leader $((pgrp == pid)), parent $ppid, tty $tty, priority $prio, nice $nice""#;

/// A running sandbox on an engine of its own, the engine's runc state root and that runc;
/// `None` (the test skipped) without the prerequisites.
fn sandbox(test: &str) -> Option<(TestEngine, String, PathBuf, Runc)> {
    if !prerequisites(test) {
        return None;
    }
    let t = TestEngine::open(GIB);
    let name = unique("");
    t.engine().create(&name, None).expect("create sandbox");
    let runc_root = t.state_dir.join("runc");
    let runc = Runc::new(t.engine().config().runc.clone().into(), runc_root.clone());
    Some((t, name, runc_root, runc))
}

#[test]
fn native_exec_starts_the_process_runc_exec_starts() {
    let Some((t, name, runc_root, runc)) =
        sandbox("native_exec_starts_the_process_runc_exec_starts")
    else {
        return;
    };
    let e = t.engine();
    let argv = ["/bin/sh".to_string(), "-c".into(), PROBE.into()];

    let by_runc = runc
        .exec(&name, &argv, false, &[], None)
        .expect("runc exec");
    let native = enter::exec(&runc_root, &name, &argv, &[], None).expect("native exec");
    let through_engine = e.exec(&name, &argv, false).expect("engine exec");
    assert_eq!(by_runc.exit_code, 0, "{}", by_runc.stderr);
    assert!(by_runc.stdout.contains("CapBnd:"), "{}", by_runc.stdout);
    assert!(
        by_runc.stdout.contains("NoNewPrivs:\t1"),
        "{}",
        by_runc.stdout
    );
    // Signals: runc passes on what its caller ignores (here the test harness's signal 32);
    // a command entered natively starts with every signal at its default.
    let without_ignored = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with("SigIgn:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        native.stdout.contains("SigIgn:\t0000000000000000"),
        "{}",
        native.stdout
    );
    assert_eq!(
        without_ignored(&native.stdout),
        without_ignored(&by_runc.stdout),
        "stderr: {}",
        native.stderr
    );
    assert_eq!(native.stderr, by_runc.stderr);
    assert_eq!(through_engine.stdout, native.stdout);
    // Not crab's own: the container's namespaces and cgroup.
    let own_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    assert!(!native.stdout.contains(&*own_mnt.to_string_lossy()));
    assert!(
        native.stdout.contains(&format!("0::/crab-test/{name}")),
        "{}",
        native.stdout
    );
    // CRIU dumps a session only with its leader inside the container.
    assert!(
        native
            .stdout
            .contains("session leader 1, group leader 1, parent 0, tty 0"),
        "{}",
        native.stdout
    );

    // --env and --cwd as runc's.
    let env = [("FOO".to_string(), "bar baz".to_string())];
    let pwd = [
        "/bin/sh".to_string(),
        "-c".into(),
        "echo \"$FOO\"; pwd".into(),
    ];
    let a = runc.exec(&name, &pwd, false, &env, Some("/tmp")).unwrap();
    let b = enter::exec(&runc_root, &name, &pwd, &env, Some("/tmp")).unwrap();
    assert_eq!(b.stdout, "bar baz\n/tmp\n");
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn exit_codes_output_and_background_processes() {
    let Some((t, name, ..)) = sandbox("exit_codes_output_and_background_processes") else {
        return;
    };
    let e = t.engine();
    let run = |script: &str| {
        e.exec(
            &name,
            &["/bin/sh".into(), "-c".into(), script.into()],
            false,
        )
        .expect("exec")
    };
    let out = run("echo out; echo err >&2; exit 7");
    assert_eq!(
        (out.exit_code, &*out.stdout, &*out.stderr),
        (7, "out\n", "err\n")
    );
    assert_eq!(run("kill -9 $$").exit_code, 128 + 9);
    // More output than a pipe holds: read while the command runs.
    let big = run("i=0; while [ $i -lt 20000 ]; do echo 0123456789abcdef; i=$((i+1)); done");
    assert_eq!(big.stdout.len(), 20000 * 17);
    // stdin is at EOF at once.
    assert_eq!(run("cat; echo done").stdout, "done\n");
    // A program that is not there: the shell's status, not an engine error.
    let missing = e
        .exec(&name, &["/no/such/program".into()], false)
        .expect("exec of a missing program");
    assert_eq!(missing.exit_code, 127);
    assert!(
        missing.stderr.contains("/no/such/program"),
        "{}",
        missing.stderr
    );

    // A background process of a finished command belongs to the container's init, holds
    // no descriptor of crab's, and the exec returned without waiting for it.
    run("sleep 300 >/dev/null 2>&1 &");
    e.exec(&name, &["sleep".into(), "301".into()], true)
        .expect("detached exec");
    let ps = sh(
        e,
        &name,
        "for p in /proc/[0-9]*; do c=$(tr '\\0' ' ' < $p/cmdline); case \"$c\" in 'sleep 30'*) echo \"$c $(awk '/^PPid/ {print $2}' $p/status) $(ls $p/fd | tr '\\n' ' ')\";; esac; done | sort",
    );
    assert_eq!(ps, "sleep 300  1 0 1 2 \nsleep 301  1 0 1 2 \n", "{ps}");
}

#[test]
fn a_paused_container_is_refused_and_nothing_starts() {
    let Some((t, name, runc_root, runc)) =
        sandbox("a_paused_container_is_refused_and_nothing_starts")
    else {
        return;
    };
    let e = t.engine();
    let runc_verb = |verb: &str| {
        let root = runc_root.to_str().expect("utf-8 state dir");
        ckpt_engine::sys::run(runc.bin(), &["--root", root, verb, name.as_str()])
            .unwrap_or_else(|e| panic!("runc {verb}: {e}"));
    };
    runc_verb("pause");
    let err = enter::exec(
        &runc_root,
        &name,
        &["touch".into(), "/paused".into()],
        &[],
        None,
    )
    .unwrap_err();
    assert!(matches!(err, EnterError::Paused), "{err}");
    runc_verb("resume");
    assert_eq!(sh(e, &name, "ls /paused 2>/dev/null; echo end"), "end\n");

    let err =
        enter::exec(&runc_root, "no-such-container", &["true".into()], &[], None).unwrap_err();
    assert!(matches!(err, EnterError::NotRunning { .. }), "{err}");

    // A step that fails in the new process is named (here the working directory).
    let err = enter::exec(
        &runc_root,
        &name,
        &["true".into()],
        &[],
        Some("/no/such/dir"),
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("chdir container"), "{err}");
}
