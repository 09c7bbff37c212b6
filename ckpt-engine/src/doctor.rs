//! `crab doctor`: every host prerequisite of Crab, checked, with a fix for each missing one,
//! and advice on host settings that make checkpoints cost more than they need to.
//!
//! Checks are independent and never fail hard: each yields a [`Check`] (name, ok, detail,
//! fix). An advisory check that is not met is a warning: Crab works, slower. Pure parsing
//! (versions) and judging (host tables) are separate from probing and unit-tested.

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
    /// A tuning rather than a prerequisite: when not met Crab works, at a cost `detail` says.
    pub advisory: bool,
}

fn check(name: &'static str, ok: bool, detail: impl Into<String>, fix: &str) -> Check {
    Check {
        name,
        ok,
        detail: detail.into(),
        fix: if ok { String::new() } else { fix.to_string() },
        advisory: false,
    }
}

fn advice(name: &'static str, ok: bool, detail: impl Into<String>, fix: &str) -> Check {
    Check {
        advisory: true,
        ..check(name, ok, detail, fix)
    }
}

/// Host-wide kernel tables that process checkpoints may walk whole, whatever the sandbox
/// holds. Listing TCP sockets (CRIU's, and Crab's for the connections a checkpoint closes)
/// walks the TCP established hash, which namespaces share with the host unless the namespace
/// that creates them sets `tcp_child_ehash_entries`: Crab makes sandbox namespaces from a
/// namespace of its own that does ([`crate::network::from_sandbox_parent`]), which needs a
/// kernel >= 6.1 (an advisory check). A stock CRIU also dumps a network namespace's conntrack
/// entries by walking every bucket of the host's conntrack hash, twice per dump (12 ms per
/// walk at 262,144 buckets on a 2-vCPU VM); Crab's CRIU build skips that for a namespace
/// without entries (`criu-4.1.1-netns-conntrack-empty.patch`). Both settings are recorded
/// (evaluation reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct HostTables {
    /// `net.netfilter.nf_conntrack_buckets`; `None` without conntrack.
    pub conntrack_buckets: Option<u64>,
    /// `net.ipv4.tcp_child_ehash_entries`; `None` on kernels without it (before 6.1).
    pub tcp_child_ehash_entries: Option<u64>,
}

impl HostTables {
    /// Reads the two settings from `/proc/sys`.
    pub fn read() -> Self {
        let value = |p: &str| {
            std::fs::read_to_string(p)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        };
        HostTables {
            conntrack_buckets: value("/proc/sys/net/netfilter/nf_conntrack_buckets"),
            tcp_child_ehash_entries: value("/proc/sys/net/ipv4/tcp_child_ehash_entries"),
        }
    }

    /// The advisory check of the sandboxes' TCP table. Pure. The cost quoted was measured on
    /// a 2-vCPU VM: one read of `/proc/net/tcp` in a namespace sharing the host's TCP table
    /// took 4.5 ms (0.2 ms with a table of its own).
    pub fn checks(&self) -> Vec<Check> {
        let table = crate::network::SANDBOX_SOCKET_TABLE;
        let ehash = match self.tcp_child_ehash_entries {
            Some(_) => advice(
                "tcp-netns-table",
                true,
                format!(
                    "Crab gives each sandbox network namespace TCP and UDP tables of its own \
                     ({table} buckets)"
                ),
                "",
            ),
            None => advice(
                "tcp-netns-table",
                false,
                "kernel without tcp_child_ehash_entries (before 6.1): sandbox network \
                 namespaces share the host's TCP table, and every listing of a sandbox's \
                 sockets at a checkpoint walks all of it (4.5 ms per walk on a 24 GiB VM)",
                "a kernel >= 6.1",
            ),
        };
        vec![ehash]
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
    out.extend(HostTables::read().checks());
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

/// True when every prerequisite (advisory checks aside) is met.
pub fn all_met(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.ok || c.advisory)
}

/// Human rendering: one line per check, fixes indented below failures and warnings.
pub fn render_human(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        let tag = match (c.ok, c.advisory) {
            (true, _) => " ok ",
            (false, true) => "warn",
            (false, false) => "FAIL",
        };
        s.push_str(&format!("[{tag}] {:<15} {}\n", c.name, c.detail));
        if !c.ok {
            s.push_str(&format!("       fix: {}\n", c.fix));
        }
    }
    let failed = checks.iter().filter(|c| !c.ok && !c.advisory).count();
    let warned = checks.iter().filter(|c| !c.ok && c.advisory).count();
    s.push_str(&match (failed, warned) {
        (0, 0) => "all prerequisites met\n".to_string(),
        (0, w) => format!("all prerequisites met; {w} tuning(s) advised\n"),
        (f, _) => format!("{f} prerequisite(s) missing\n"),
    });
    s
}

/// JSON rendering: `{"ok": bool, "checks": [...]}` (`ok` ignores advisory checks).
pub fn render_json(checks: &[Check]) -> String {
    serde_json::json!({
        "ok": all_met(checks),
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

    #[test]
    fn an_unmet_tuning_warns_without_failing() {
        let mut checks = vec![check("a", true, "fine", "")];
        checks.extend(
            HostTables {
                conntrack_buckets: Some(262_144),
                tcp_child_ehash_entries: None,
            }
            .checks(),
        );
        assert!(all_met(&checks));
        let h = render_human(&checks);
        assert!(h.contains("[warn] tcp-netns-table"), "{h}");
        assert!(h.contains("fix: a kernel >= 6.1"), "{h}");
        assert!(h.contains("1 tuning(s) advised"), "{h}");
        // Crab's CRIU does not walk the conntrack hash of a sandbox without entries.
        assert!(!h.contains("conntrack"), "{h}");
        let j: serde_json::Value = serde_json::from_str(&render_json(&checks)).unwrap();
        assert_eq!(j["ok"], true);
        assert_eq!(j["checks"][1]["advisory"], true);
        assert_eq!(j["checks"][1]["ok"], false);
    }

    #[test]
    fn sandboxes_get_their_own_table_whatever_the_host_setting() {
        for ehash in [0, 1024] {
            let tables = HostTables {
                conntrack_buckets: Some(262_144),
                tcp_child_ehash_entries: Some(ehash),
            };
            let checks = tables.checks();
            assert!(
                checks
                    .iter()
                    .all(|c| c.ok && c.advisory && c.fix.is_empty())
            );
            assert!(checks[0].detail.contains("of its own"), "{checks:?}");
        }
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
