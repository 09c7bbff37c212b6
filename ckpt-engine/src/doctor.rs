//! `crab doctor`: every host prerequisite of Crab, checked, with a fix for each missing one.
//!
//! Checks are independent and never fail hard: each yields a [`Check`] (name, ok, detail,
//! fix). Pure parsing (versions) is separate from probing and unit-tested.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::process::ProcessConfig;

/// One prerequisite's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Short name (`kernel-btf`, `criu`, ...).
    pub name: &'static str,
    /// True when the prerequisite is met.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// How to fix it (empty when ok).
    pub fix: String,
}

fn check(name: &'static str, ok: bool, detail: impl Into<String>, fix: &str) -> Check {
    Check {
        name,
        ok,
        detail: detail.into(),
        fix: if ok { String::new() } else { fix.to_string() },
    }
}

/// Runs `program args` and returns (success, stdout+stderr).
fn probe(program: &Path, args: &[&str]) -> (bool, String) {
    match Command::new(program).args(args).output() {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            (o.status.success(), s.trim().to_string())
        }
        Err(e) => (false, e.to_string()),
    }
}

/// Parses `major.minor[.patch]` out of a version line.
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|w| w.contains('.'))
        .find_map(|w| {
            let mut it = w.split('.').map(|p| p.parse::<u32>().ok());
            let major = it.next()??;
            let minor = it.next()??;
            let patch = it.next().flatten().unwrap_or(0);
            Some((major, minor, patch))
        })
}

/// Runs every check. `process` names CRIU and runc as the engine would find them.
pub fn run_checks(process: &ProcessConfig) -> Vec<Check> {
    let mut out = Vec::new();
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    out.push(check(
        "kernel-btf",
        btf,
        if btf {
            "/sys/kernel/btf/vmlinux present"
        } else {
            "/sys/kernel/btf/vmlinux missing"
        },
        "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (the inspector's CO-RE programs need it)",
    ));
    let tracefs = Path::new("/sys/kernel/tracing/events").exists();
    out.push(check(
        "tracefs",
        tracefs,
        if tracefs {
            "/sys/kernel/tracing mounted"
        } else {
            "/sys/kernel/tracing/events missing"
        },
        "mount -t tracefs nodev /sys/kernel/tracing",
    ));
    let cgroup = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .find(|p| {
            Path::new(p).join("cgroup.procs").exists()
                && Path::new(p).join("cgroup.controllers").exists()
        });
    out.push(check(
        "cgroup-v2",
        cgroup.is_some(),
        match cgroup {
            Some(p) => format!("cgroup v2 at {p}"),
            None => "no cgroup v2 hierarchy".to_string(),
        },
        "mount -t cgroup2 none /sys/fs/cgroup/unified (hybrid) or boot with systemd.unified_cgroup_hierarchy=1",
    ));
    out.extend(criu_checks(process));
    let runc = crate::sys::find_program(&process.runc);
    out.push(match &runc {
        Some(p) => {
            let (ok, text) = probe(p, &["--version"]);
            let v = text.lines().next().unwrap_or("").to_string();
            check(
                "runc",
                ok,
                format!("{} ({v})", p.display()),
                "apt-get install runc",
            )
        }
        None => check("runc", false, "runc not found", "apt-get install runc"),
    });
    for (name, tool, fix) in [
        ("btrfs-progs", "mkfs.btrfs", "apt-get install btrfs-progs"),
        (
            "busybox",
            "busybox",
            "apt-get install busybox-static (the tiny test image)",
        ),
        (
            "debootstrap",
            "debootstrap",
            "apt-get install debootstrap (crab image build)",
        ),
    ] {
        let p = crate::sys::find_program(tool);
        out.push(check(
            name,
            p.is_some(),
            p.map_or(format!("{tool} not found"), |p| p.display().to_string()),
            fix,
        ));
    }
    let loop_ok = Path::new("/dev/loop-control").exists();
    out.push(check(
        "loop-devices",
        loop_ok,
        if loop_ok {
            "/dev/loop-control present"
        } else {
            "/dev/loop-control missing"
        },
        "modprobe loop (the btrfs pool is a loop-mounted file unless the state dir is on btrfs)",
    ));
    let clang = ["clang-19", "clang"]
        .iter()
        .find_map(|c| crate::sys::find_program(c));
    out.push(check(
        "clang",
        clang.is_some(),
        clang.map_or("clang not found".to_string(), |p| p.display().to_string()),
        "apt-get install clang-19 libbpf-dev (builds the inspector's BPF programs)",
    ));
    out
}

fn criu_checks(process: &ProcessConfig) -> Vec<Check> {
    const FIX: &str =
        "run the bootstrap script (builds CRIU 4.1.1 into /usr/local/sbin), or set CRAB_CRIU";
    let Some(criu) = process.resolve_criu() else {
        return vec![check("criu", false, "criu not found", FIX)];
    };
    let (_, text) = probe(&criu, &["--version"]);
    let version = parse_version(&text);
    let new_enough = version.is_some_and(|v| v >= (4, 0, 0));
    let detail = match version {
        Some((a, b, c)) => format!("{} version {a}.{b}.{c}", criu.display()),
        None => format!("{}: unknown version ({text})", criu.display()),
    };
    let mut out = vec![check(
        "criu",
        new_enough,
        detail,
        "CRIU >= 4.0 is needed on this kernel (3.17 fails on the vDSO): run the bootstrap script",
    )];
    let (ok, text) = probe(&criu, &["check"]);
    let last = text.lines().last().unwrap_or("").to_string();
    out.push(check(
        "criu-check",
        ok && text.contains("Looks good"),
        last,
        FIX,
    ));
    out
}

/// Human rendering: one line per check, fixes indented below failures.
pub fn render_human(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        s.push_str(&format!(
            "[{}] {:<12} {}\n",
            if c.ok { " ok " } else { "FAIL" },
            c.name,
            c.detail
        ));
        if !c.ok {
            s.push_str(&format!("       fix: {}\n", c.fix));
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    s.push_str(&if failed == 0 {
        "all prerequisites met\n".to_string()
    } else {
        format!("{failed} prerequisite(s) missing\n")
    });
    s
}

/// JSON rendering: `{"ok": bool, "checks": [...]}`.
pub fn render_json(checks: &[Check]) -> String {
    serde_json::json!({
        "ok": checks.iter().all(|c| c.ok),
        "checks": checks,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("Version: 4.1.1"), Some((4, 1, 1)));
        assert_eq!(parse_version("runc version 1.1.5+ds1"), Some((1, 1, 5)));
        assert_eq!(parse_version("Version: 3.17"), Some((3, 17, 0)));
        assert_eq!(parse_version("no version"), None);
        assert!(parse_version("Version: 3.17").unwrap() < (4, 0, 0));
    }

    #[test]
    fn rendering_shows_fixes_only_for_failures() {
        let checks = vec![
            check("a", true, "fine", "never shown"),
            check("b", false, "missing", "install b"),
        ];
        let h = render_human(&checks);
        assert!(h.contains("[ ok ] a"));
        assert!(h.contains("[FAIL] b"));
        assert!(h.contains("fix: install b"));
        assert!(!h.contains("never shown"));
        let j: serde_json::Value = serde_json::from_str(&render_json(&checks)).unwrap();
        assert_eq!(j["ok"], false);
        assert_eq!(j["checks"][1]["fix"], "install b");
        assert_eq!(j["checks"][0]["fix"], "");
    }

    /// On a host set up by the bootstrap every check passes; elsewhere the checks still run
    /// and every failure carries a fix.
    #[test]
    fn real_checks_run_and_failures_have_fixes() {
        let checks = run_checks(&ProcessConfig::default());
        assert!(checks.len() >= 10);
        for c in &checks {
            assert!(c.ok || !c.fix.is_empty(), "{c:?}");
        }
        eprintln!("{}", render_human(&checks));
    }
}
