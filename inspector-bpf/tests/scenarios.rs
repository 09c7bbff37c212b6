//! The labelled scenario suite: real commands in real cgroups, watched by the real eBPF
//! inspector; each scenario asserts the exact decision and dirty set, and an accuracy table is
//! printed (false negatives must be 0). Needs root (see `common::prerequisites`).

mod common;

use std::time::Duration;

use common::{TestSandbox, inspector, prerequisites};
use inspector_bpf::shell::PersistentShell;
use inspector_bpf::{Decision, IgnoreRule, IgnoreScope};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Setup and turn each run in a fresh `bash -c` in the cgroup.
    Fresh,
    /// Setup and turn run in one persistent bash (tracked like any process).
    Shell,
    /// Like `Shell`, with an ignore rule `comm=bash` scope process-only.
    ShellIgnored,
}

enum Files {
    Exact(Vec<String>),
    /// Must contain these; every entry must lie in the scenario dir.
    Contains(Vec<String>),
}

struct Scenario {
    name: &'static str,
    setup: &'static str,
    turn: &'static str,
    mode: Mode,
    decision: Decision,
    files: Files,
    settle_ms: u64,
}

fn exact(v: &[&str]) -> Files {
    Files::Exact(v.iter().map(|s| s.to_string()).collect())
}

fn sc(
    name: &'static str,
    setup: &'static str,
    turn: &'static str,
    decision: Decision,
    files: Files,
) -> Scenario {
    Scenario {
        name,
        setup,
        turn,
        mode: Mode::Fresh,
        decision,
        files,
        settle_ms: 50,
    }
}

const PRE: &str = "export PATH=/usr/bin:/bin:/usr/sbin:/sbin:/usr/local/bin; export HOME=$PWD; ";

const WHEEL_SETUP: &str = r#"mkdir site-packages && python3 - <<'PY'
import zipfile
with zipfile.ZipFile("mypkg-1.0-py3-none-any.whl", "w") as z:
    for i in range(40):
        z.writestr(f"mypkg/mod{i}.py", f"X = {i}\n")
    z.writestr("mypkg-1.0.dist-info/METADATA", "Name: mypkg\n")
    z.writestr("mypkg-1.0.dist-info/RECORD", "")
PY"#;

fn scenarios() -> Vec<Scenario> {
    use Decision::*;
    let mut wheel = vec![
        "+ site-packages/mypkg".to_string(),
        "+ site-packages/mypkg-1.0.dist-info".to_string(),
    ];
    wheel.push("+ site-packages/mypkg-1.0.dist-info/METADATA".into());
    wheel.push("+ site-packages/mypkg-1.0.dist-info/RECORD".into());
    for i in 0..40 {
        wheel.push(format!("+ site-packages/mypkg/mod{i}.py"));
    }
    let git_setup = "git init -q -b main repo && cd repo && echo a > a && touch -d 2020-01-01 a && git add a && git -c user.name=t -c user.email=t@t commit -qm init && git status >/dev/null";
    vec![
        // Read-only commands.
        sc(
            "cat",
            "echo hello > f.txt",
            "cat f.txt >/dev/null",
            Skip,
            exact(&[]),
        ),
        sc(
            "ls",
            "mkdir d && touch d/x",
            "ls -laR >/dev/null",
            Skip,
            exact(&[]),
        ),
        sc(
            "grep",
            "echo hello > f.txt",
            "grep -r hello . >/dev/null",
            Skip,
            exact(&[]),
        ),
        sc(
            "find",
            "mkdir -p a/b && touch a/b/c.txt",
            "find . -name '*.txt' >/dev/null",
            Skip,
            exact(&[]),
        ),
        sc(
            "python-read",
            "echo hello > f.txt",
            "python3 -c 'print(len(open(\"f.txt\").read()))' >/dev/null",
            Skip,
            exact(&[]),
        ),
        sc(
            "git-status",
            git_setup,
            "cd repo && git status >/dev/null",
            Skip,
            exact(&[]),
        ),
        sc(
            "dev-null-and-proc",
            "",
            "echo x > /dev/null; cat /proc/self/status > /dev/null",
            Skip,
            exact(&[]),
        ),
        // Net-zero file activity.
        sc(
            "tempfile-create-delete",
            "",
            "t=$(mktemp -p .); echo x > $t; rm $t",
            Skip,
            exact(&[]),
        ),
        sc(
            "mkdir-rmdir-same-turn",
            "",
            "mkdir -p t1/t2 && rmdir t1/t2 t1",
            Skip,
            exact(&[]),
        ),
        sc(
            "background-job-finished",
            "",
            "sleep 0.1 & wait",
            Skip,
            exact(&[]),
        ),
        sc(
            "listen-and-close",
            "",
            "python3 -c 'import socket; s=socket.socket(); s.bind((\"127.0.0.1\",0)); s.listen()'",
            Skip,
            exact(&[]),
        ),
        // File changes.
        sc(
            "echo-new-file",
            "",
            "echo hi > new.txt",
            FsOnly,
            exact(&["+ new.txt"]),
        ),
        sc(
            "append",
            "echo hello > f.txt",
            "echo more >> f.txt",
            FsOnly,
            exact(&["~ f.txt"]),
        ),
        sc(
            "sed-i",
            "echo hello > f.txt",
            "sed -i s/hello/bye/ f.txt",
            FsOnly,
            exact(&["~ f.txt"]),
        ),
        sc(
            "mv-file",
            "echo hello > f.txt",
            "mv f.txt g.txt",
            FsOnly,
            exact(&["> f.txt -> g.txt"]),
        ),
        sc(
            "mv-dir",
            "mkdir -p d/sub && echo x > d/sub/x",
            "mv d e",
            FsOnly,
            exact(&["> d -> e"]),
        ),
        sc(
            "mv-dir-then-write",
            "mkdir -p d && echo x > d/x",
            "mv d e && echo y >> e/x",
            FsOnly,
            exact(&["> d -> e", "~ e/x"]),
        ),
        sc(
            "rm-preexisting",
            "echo hello > f.txt",
            "rm f.txt",
            FsOnly,
            exact(&["- f.txt"]),
        ),
        sc(
            "rm-rf-tree",
            "mkdir -p tree/a && echo 1 > tree/a/f",
            "rm -rf tree",
            FsOnly,
            exact(&["- tree", "- tree/a", "- tree/a/f"]),
        ),
        sc(
            "mkdir-p",
            "",
            "mkdir -p a/b/c",
            FsOnly,
            exact(&["+ a", "+ a/b", "+ a/b/c"]),
        ),
        sc(
            "rmdir",
            "mkdir empty",
            "rmdir empty",
            FsOnly,
            exact(&["- empty"]),
        ),
        sc("touch-new", "", "touch n.txt", FsOnly, exact(&["+ n.txt"])),
        sc(
            "touch-existing",
            "echo hello > f.txt",
            "touch f.txt",
            FsOnly,
            exact(&["m f.txt"]),
        ),
        sc(
            "chmod",
            "echo hello > f.txt",
            "chmod 600 f.txt",
            FsOnly,
            exact(&["m f.txt"]),
        ),
        sc(
            "chown",
            "echo hello > f.txt",
            "chown nobody f.txt",
            FsOnly,
            exact(&["m f.txt"]),
        ),
        sc(
            "xattr",
            "echo hello > f.txt",
            "python3 -c 'import os; os.setxattr(\"f.txt\", \"user.crab\", b\"1\")'",
            FsOnly,
            exact(&["m f.txt"]),
        ),
        sc(
            "ln-hard",
            "echo hello > f.txt",
            "ln f.txt hard.txt",
            FsOnly,
            exact(&["+ hard.txt"]),
        ),
        sc(
            "ln-s",
            "echo hello > f.txt",
            "ln -s f.txt sym",
            FsOnly,
            exact(&["+ sym"]),
        ),
        sc(
            "truncate",
            "echo hello > f.txt",
            "truncate -s 0 f.txt",
            FsOnly,
            exact(&["~ f.txt"]),
        ),
        sc(
            "fallocate",
            "echo hello > f.txt",
            "fallocate -l 65536 f.txt",
            FsOnly,
            exact(&["~ f.txt"]),
        ),
        sc(
            "open-rdonly-trunc",
            "echo hello > f.txt",
            "python3 -c 'import os; os.close(os.open(\"f.txt\", os.O_RDONLY|os.O_TRUNC))'",
            FsOnly,
            exact(&["~ f.txt"]),
        ),
        sc(
            "open-rdonly-creat",
            "",
            "python3 -c 'import os; os.close(os.open(\"n.txt\", os.O_RDONLY|os.O_CREAT))'",
            FsOnly,
            exact(&["+ n.txt"]),
        ),
        sc(
            "chattr-ioctl",
            "echo hello > f.txt",
            "chattr +A f.txt",
            FsOnly,
            exact(&["m f.txt"]),
        ),
        sc(
            "dd",
            "",
            "dd if=/dev/zero of=z.bin bs=4k count=4 status=none",
            FsOnly,
            exact(&["+ z.bin"]),
        ),
        sc(
            "cp-r",
            "mkdir -p src/a && echo 1 > src/a/1 && echo 2 > src/2",
            "cp -r src dst",
            FsOnly,
            exact(&["+ dst", "+ dst/2", "+ dst/a", "+ dst/a/1"]),
        ),
        sc(
            "tar-x",
            "mkdir -p t/x && echo 1 > t/x/f && tar cf t.tar t && rm -r t",
            "tar xf t.tar",
            FsOnly,
            exact(&["+ t", "+ t/x", "+ t/x/f"]),
        ),
        sc(
            "new-dir-renamed",
            "",
            "mkdir nd && echo x > nd/f && mv nd fin",
            FsOnly,
            exact(&["+ fin", "+ fin/f"]),
        ),
        sc(
            "o-tmpfile-linkat",
            "",
            "python3 -c 'import os,ctypes; libc=ctypes.CDLL(None, use_errno=True); fd=os.open(\".\", os.O_TMPFILE|os.O_WRONLY, 0o600); os.write(fd, b\"x\"); assert libc.linkat(fd, b\"\", -100, b\"tmpf.txt\", 0x1000) == 0'",
            FsOnly,
            exact(&["+ tmpf.txt"]),
        ),
        sc(
            "python-atomic-replace",
            "echo old > final.txt",
            "python3 -c 'import os; open(\"t.tmp\",\"w\").write(\"x\"); os.replace(\"t.tmp\",\"final.txt\")'",
            FsOnly,
            exact(&["~ final.txt"]),
        ),
        sc(
            "git-commit",
            git_setup,
            "cd repo && echo b > b && git add b && git -c user.name=t -c user.email=t@t commit -qm b",
            FsOnly,
            Files::Contains(vec![
                "+ repo/b".into(),
                "~ repo/.git/index".into(),
                "~ repo/.git/refs/heads/main".into(),
            ]),
        ),
        sc(
            "wheel-install",
            WHEEL_SETUP,
            "python3 -c 'import zipfile; zipfile.ZipFile(\"mypkg-1.0-py3-none-any.whl\").extractall(\"site-packages\")'",
            FsOnly,
            Files::Exact(wheel),
        ),
        sc(
            "shared-mmap-write",
            "echo hello > f.txt",
            "python3 -c 'import mmap; f=open(\"f.txt\",\"r+b\"); m=mmap.mmap(f.fileno(), 0); m[0:1]=b\"J\"; m.flush()'",
            FsOnly,
            exact(&["~ f.txt"]),
        ),
        // Process effects.
        sc(
            "background-server-started",
            "",
            "python3 -m http.server 0 --bind 127.0.0.1 >/dev/null 2>&1 </dev/null &",
            ProcessOnly,
            exact(&[]),
        ),
        sc(
            "long-lived-killed",
            "sleep 1000 >/dev/null 2>&1 </dev/null & echo $! > pid",
            "kill $(cat pid); sleep 0.2",
            ProcessOnly,
            exact(&[]),
        ),
        Scenario {
            settle_ms: 300,
            ..sc(
                "idle-daemon",
                "sleep 1000 >/dev/null 2>&1 </dev/null &",
                "true",
                Skip,
                exact(&[]),
            )
        },
        sc(
            "busy-daemon",
            "(while true; do sleep 0.02; done) >/dev/null 2>&1 </dev/null &",
            "sleep 0.2",
            ProcessOnly,
            exact(&[]),
        ),
        Scenario {
            settle_ms: 300,
            ..sc(
                "mmap-invalidation-replace",
                "cp /bin/sleep ./mysleep && (./mysleep 1000 >/dev/null 2>&1 </dev/null &)",
                "cp /bin/true mysleep.new && mv mysleep.new mysleep",
                Full,
                exact(&["~ mysleep"]),
            )
        },
        Scenario {
            settle_ms: 500,
            ..sc(
                "mmap-invalidation-write",
                "echo data > data.bin && (python3 -c 'import mmap,time; f=open(\"data.bin\",\"rb\"); m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ); time.sleep(1000)' >/dev/null 2>&1 </dev/null &)",
                "echo more >> data.bin",
                Full,
                exact(&["~ data.bin"]),
            )
        },
        sc(
            "io-uring",
            "",
            "python3 -c 'import ctypes; libc=ctypes.CDLL(None); p=ctypes.create_string_buffer(120); assert libc.syscall(425, 4, p) >= 0'",
            Full,
            exact(&[]),
        ),
        // The persistent shell.
        Scenario {
            mode: Mode::Shell,
            ..sc("shell-cd", "mkdir sub", "cd sub", ProcessOnly, exact(&[]))
        },
        Scenario {
            mode: Mode::Shell,
            ..sc("shell-export", "", "export FOO=1", ProcessOnly, exact(&[]))
        },
        Scenario {
            mode: Mode::ShellIgnored,
            ..sc(
                "shell-ignored-read-only",
                "echo hello > f.txt",
                "cat f.txt",
                Skip,
                exact(&[]),
            )
        },
        Scenario {
            mode: Mode::ShellIgnored,
            ..sc(
                "shell-ignored-write",
                "",
                "echo x > w.txt",
                FsOnly,
                exact(&["+ w.txt"]),
            )
        },
        Scenario {
            mode: Mode::ShellIgnored,
            ..sc("shell-ignored-cd", "mkdir sub", "cd sub", Skip, exact(&[]))
        },
    ]
}

struct Outcome {
    name: &'static str,
    expected: Decision,
    actual: Decision,
    files_ok: bool,
    detail: String,
}

fn fs_part(d: Decision) -> bool {
    matches!(d, Decision::FsOnly | Decision::Full)
}
fn proc_part(d: Decision) -> bool {
    matches!(d, Decision::ProcessOnly | Decision::Full)
}

fn run_scenario(s: &Scenario) -> Outcome {
    let sb = TestSandbox::new(|spec| {
        if s.mode == Mode::ShellIgnored {
            spec.ignore.push(IgnoreRule {
                pid: None,
                comm: Some("bash".into()),
                exe: None,
                scope: IgnoreScope::ProcessOnly,
            });
        }
    });
    let mut shell = if s.mode == Mode::Fresh {
        None
    } else {
        Some(PersistentShell::spawn(&sb.cgroup, &sb.dir).expect("persistent shell"))
    };
    let setup = format!("{PRE}{}", s.setup);
    let turn = format!("{PRE}{}", s.turn);
    let st = match shell.as_mut() {
        Some(sh) => sh.run(&setup).expect("setup").status,
        None => sb.sh(&setup),
    };
    assert_eq!(st, 0, "{}: setup failed", s.name);
    std::thread::sleep(Duration::from_millis(s.settle_ms));
    inspector().reset(&sb.id).expect("reset");
    let st = match shell.as_mut() {
        Some(sh) => sh.run(&turn).expect("turn").status,
        None => sb.sh(&turn),
    };
    assert_eq!(st, 0, "{}: turn failed", s.name);
    let eff = inspector().status(&sb.id).expect("status");
    let prefix = sb.rel_prefix();
    let files: Vec<String> = eff
        .files
        .iter()
        .map(|f| {
            f.short()
                .replace(&prefix, "")
                .replace(prefix.trim_end_matches('/'), ".")
        })
        .collect();
    let files_ok = match &s.files {
        Files::Exact(want) => {
            let mut w = want.clone();
            w.sort();
            let mut g = files.clone();
            g.sort();
            w == g
        }
        Files::Contains(want) => {
            want.iter().all(|w| files.contains(w))
                && eff.files.iter().all(|f| f.short().contains(&prefix))
        }
    };
    drop(shell);
    Outcome {
        name: s.name,
        expected: s.decision,
        actual: eff.decision,
        files_ok,
        detail: format!("files {files:?}; reasons {:?}", eff.reasons),
    }
}

/// Runs every labelled scenario against the real inspector, prints the accuracy table and
/// asserts exact decisions and dirty sets (and therefore zero false negatives).
#[test]
fn labelled_scenarios() {
    if !prerequisites("labelled_scenarios") {
        return;
    }
    let all = scenarios();
    assert!(all.len() >= 40, "the suite has at least 40 scenarios");
    // A few worker threads: scenarios are independent (own cgroup, own directory).
    let queue = std::sync::Mutex::new(all.iter().collect::<Vec<_>>());
    let outcomes = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                loop {
                    let Some(sc) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    let o =
                        std::panic::catch_unwind(|| run_scenario(sc)).unwrap_or_else(|e| Outcome {
                            name: sc.name,
                            expected: sc.decision,
                            actual: Decision::Skip,
                            files_ok: false,
                            detail: format!("scenario panicked: {:?}", e.downcast_ref::<String>()),
                        });
                    outcomes.lock().unwrap().push(o);
                }
            });
        }
    });
    let mut outcomes = outcomes.into_inner().unwrap();
    outcomes.sort_by_key(|o| o.name);
    let (mut fn_, mut fp, mut ok) = (0, 0, 0);
    println!(
        "\n{:<28} {:<12} {:<12} {:<6} verdict",
        "scenario", "expected", "actual", "files"
    );
    let mut failures = Vec::new();
    for o in &outcomes {
        let missed = (fs_part(o.expected) && !fs_part(o.actual))
            || (proc_part(o.expected) && !proc_part(o.actual));
        let extra = (!fs_part(o.expected) && fs_part(o.actual))
            || (!proc_part(o.expected) && proc_part(o.actual));
        let verdict = if missed {
            fn_ += 1;
            "FALSE NEGATIVE"
        } else if extra {
            fp += 1;
            "false positive"
        } else if !o.files_ok {
            "dirty set differs"
        } else {
            ok += 1;
            "ok"
        };
        println!(
            "{:<28} {:<12} {:<12} {:<6} {verdict}",
            o.name,
            format!("{:?}", o.expected),
            format!("{:?}", o.actual),
            if o.files_ok { "ok" } else { "DIFF" }
        );
        if verdict != "ok" {
            failures.push(format!(
                "{}: expected {:?}, got {:?}: {}",
                o.name, o.expected, o.actual, o.detail
            ));
        }
    }
    let n = outcomes.len();
    println!(
        "accuracy: {ok}/{n} exact; false negatives {fn_}; false positives {fp} (FPR {:.1}%)",
        100.0 * fp as f64 / n as f64
    );
    assert_eq!(fn_, 0, "false negatives: {failures:#?}");
    assert!(failures.is_empty(), "scenario mismatches: {failures:#?}");
}
