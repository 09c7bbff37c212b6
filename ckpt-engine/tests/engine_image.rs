//! Privileged test of `image build` with debootstrap (needs the Debian archive, ~1 min).
//! Run as root: `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine --test engine_image`.

mod common;

use ckpt_engine::fs::ChangeHint;
use ckpt_engine::manifest::CheckpointKind;
use common::{TestEngine, prerequisites, sh, unique};

/// Proves `image build` makes a Debian minbase image with the configured packages (python3,
/// git, make, gcc, libc6-dev) as a read-only base subvolume, that a sandbox from it runs them,
/// that it resolves localhost from its own `/etc/hosts` (debootstrap writes none; without it a
/// lookup waits for a DNS timeout), and that a compile's output survives checkpoint and
/// restore.
#[test]
fn debootstrap_image_runs_python_git_and_gcc() {
    if !prerequisites("debootstrap_image_runs_python_git_and_gcc") {
        return;
    }
    if ckpt_engine::sys::find_program("debootstrap").is_none() {
        if std::env::var("CRAB_TEST_STRICT").as_deref() == Ok("1") {
            panic!("debootstrap not installed (apt install debootstrap)");
        }
        eprintln!("skipped: debootstrap_image_runs_python_git_and_gcc: debootstrap not installed");
        return;
    }
    let t = TestEngine::open(4 << 30);
    let e = t.engine();
    let path = e.build_image("bookworm", false).expect("debootstrap image");
    assert!(
        ckpt_engine::pool::is_readonly(&path).unwrap(),
        "base images are read-only"
    );
    assert_eq!(e.images(), vec!["bookworm".to_string()]);
    let name = unique("");
    e.create(&name, Some("bookworm")).unwrap();
    let v = sh(
        e,
        &name,
        "python3 -c 'print(6*7)' && git --version && make --version | head -1",
    );
    assert!(v.starts_with("42\n"), "{v}");
    let hosts = sh(e, &name, "getent hosts localhost");
    assert!(
        hosts.contains("127.0.0.1") || hosts.contains("::1"),
        "{hosts}"
    );
    sh(
        e,
        &name,
        "mkdir -p /src && cd /src && printf 'int main(){return 3;}\\n' > m.c && gcc -o m m.c",
    );
    let p = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .unwrap();
    sh(e, &name, "rm -rf /src");
    e.restore(&name, Some(&p.id)).unwrap();
    let out = e.exec(&name, &["/src/m".into()], false).unwrap();
    assert_eq!(out.exit_code, 3);
}
