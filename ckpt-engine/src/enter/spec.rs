//! The pure half of entering a container: the process `runc exec` would start, read from the
//! bundle's OCI `config.json` ([`ProcessSpec`]), capability and rlimit names, which
//! namespaces to join, the environment and where the program is looked up. No I/O.

use std::str::FromStr;

use serde::Deserialize;

use super::EnterError;

/// Capability sets as bit masks (bit *n* = capability number *n*).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

/// The process `runc exec` starts in a container, from the bundle's `config.json`: the spec's
/// `process` with the command's own arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub caps: CapSets,
    /// (resource, soft, hard).
    pub rlimits: Vec<(i32, u64, u64)>,
    pub no_new_privileges: bool,
}

#[derive(Deserialize)]
struct OciConfig {
    process: OciProcess,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciProcess {
    #[serde(default)]
    user: OciUser,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default = "root_dir")]
    cwd: String,
    #[serde(default)]
    capabilities: Option<OciCaps>,
    #[serde(default)]
    rlimits: Vec<OciRlimit>,
    #[serde(default)]
    no_new_privileges: bool,
    #[serde(default)]
    apparmor_profile: Option<String>,
    #[serde(default)]
    selinux_label: Option<String>,
    #[serde(default)]
    terminal: bool,
}

fn root_dir() -> String {
    "/".into()
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct OciUser {
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
    #[serde(default)]
    additional_gids: Vec<u32>,
    #[serde(default)]
    umask: Option<u32>,
}

#[derive(Deserialize, Default)]
struct OciCaps {
    #[serde(default)]
    bounding: Vec<String>,
    #[serde(default)]
    effective: Vec<String>,
    #[serde(default)]
    permitted: Vec<String>,
    #[serde(default)]
    inheritable: Vec<String>,
    #[serde(default)]
    ambient: Vec<String>,
}

#[derive(Deserialize)]
struct OciRlimit {
    #[serde(rename = "type")]
    kind: String,
    hard: u64,
    soft: u64,
}

/// The mask of capability names (`CAP_CHOWN`, …); an unknown name is an error.
pub fn cap_mask(names: &[String]) -> Result<u64, EnterError> {
    let mut mask = 0u64;
    for n in names {
        let cap = caps::Capability::from_str(n)
            .map_err(|_| EnterError::Spec(format!("unknown capability {n:?}")))?;
        mask |= 1u64 << cap.index();
    }
    Ok(mask)
}

/// The resource number of an rlimit name (`RLIMIT_NOFILE`, …).
pub fn rlimit_resource(name: &str) -> Option<i32> {
    Some(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    } as i32)
}

impl ProcessSpec {
    /// The `process` of an OCI `config.json`. Refused (so that nothing weaker than runc's
    /// process starts): a terminal, an AppArmor profile, an SELinux label or a umask — what
    /// runc would apply and this entry does not. Pure.
    pub fn from_config(json: &[u8]) -> Result<ProcessSpec, EnterError> {
        let cfg: OciConfig = serde_json::from_slice(json)
            .map_err(|e| EnterError::Spec(format!("config.json: {e}")))?;
        let p = cfg.process;
        let unsupported = [
            (p.terminal, "a terminal"),
            (
                p.apparmor_profile.is_some_and(|s| !s.is_empty()),
                "an AppArmor profile",
            ),
            (
                p.selinux_label.is_some_and(|s| !s.is_empty()),
                "an SELinux label",
            ),
            (p.user.umask.is_some(), "a umask"),
        ];
        if let Some((_, what)) = unsupported.iter().find(|(set, _)| *set) {
            return Err(EnterError::Spec(format!("{what} is not supported")));
        }
        let c = p.capabilities.unwrap_or_default();
        let caps = CapSets {
            bounding: cap_mask(&c.bounding)?,
            effective: cap_mask(&c.effective)?,
            permitted: cap_mask(&c.permitted)?,
            inheritable: cap_mask(&c.inheritable)?,
            ambient: cap_mask(&c.ambient)?,
        };
        let rlimits = p
            .rlimits
            .iter()
            .map(|r| {
                rlimit_resource(&r.kind)
                    .map(|res| (res, r.soft, r.hard))
                    .ok_or_else(|| EnterError::Spec(format!("unknown rlimit {:?}", r.kind)))
            })
            .collect::<Result<_, _>>()?;
        if !p.cwd.starts_with('/') {
            return Err(EnterError::Spec(format!("cwd {:?} is not absolute", p.cwd)));
        }
        Ok(ProcessSpec {
            env: p.env,
            cwd: p.cwd,
            uid: p.user.uid,
            gid: p.user.gid,
            additional_gids: p.user.additional_gids,
            caps,
            rlimits,
            no_new_privileges: p.no_new_privileges,
        })
    }
}

/// Namespace kinds (their `/proc/PID/ns` names) and `setns` flags, user namespaces apart.
const NAMESPACES: [(&str, libc::c_int); 7] = [
    ("mnt", libc::CLONE_NEWNS),
    ("uts", libc::CLONE_NEWUTS),
    ("ipc", libc::CLONE_NEWIPC),
    ("net", libc::CLONE_NEWNET),
    ("pid", libc::CLONE_NEWPID),
    ("cgroup", libc::CLONE_NEWCGROUP),
    ("time", libc::CLONE_NEWTIME),
];

/// The `setns` flags for the namespaces in which `theirs` differs from `ours` (each an inode
/// number per kind, `None` when the kernel has no such kind). A user namespace of its own is
/// not entered (credentials would change meaning): an error. Pure.
pub fn namespace_flags(
    ours: impl Fn(&str) -> Option<u64>,
    theirs: impl Fn(&str) -> Option<u64>,
) -> Result<libc::c_int, EnterError> {
    if ours("user") != theirs("user") {
        return Err(EnterError::Spec(
            "the container has a user namespace of its own".into(),
        ));
    }
    Ok(NAMESPACES
        .iter()
        .filter(|(kind, _)| ours(kind) != theirs(kind))
        .fold(0, |flags, (_, flag)| flags | flag))
}

/// The environment `runc exec` gives: the spec's, then `--env` (a later value wins).
pub fn environment(spec_env: &[String], extra: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut set = |kv: String| {
        let key = kv
            .split_once('=')
            .map_or(kv.as_str(), |(k, _)| k)
            .to_string();
        out.retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != key);
        out.push(kv);
    };
    for kv in spec_env {
        set(kv.clone());
    }
    for (k, v) in extra {
        set(format!("{k}={v}"));
    }
    out
}

/// Where `execvp` would look for `program` given the container's environment. Pure.
pub fn program_candidates(program: &str, env: &[String]) -> Vec<String> {
    if program.contains('/') {
        return vec![program.to_string()];
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            format!("{}/{program}", dir.trim_end_matches('/'))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/sh"],
            "env": ["PATH=/usr/bin:/bin", "HOME=/root"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_AUDIT_WRITE"],
                "effective": ["CAP_CHOWN", "CAP_KILL"],
                "permitted": ["CAP_CHOWN", "CAP_KILL", "CAP_AUDIT_WRITE"],
                "ambient": ["CAP_KILL"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"}
    }"#;

    #[test]
    fn the_spec_is_the_config_process() {
        let s = ProcessSpec::from_config(CONFIG.as_bytes()).unwrap();
        assert_eq!(s.env, ["PATH=/usr/bin:/bin", "HOME=/root"]);
        assert_eq!(s.cwd, "/");
        assert_eq!((s.uid, s.gid), (0, 0));
        // CAP_CHOWN 0, CAP_KILL 5, CAP_AUDIT_WRITE 29.
        assert_eq!(s.caps.bounding, 1 | 1 << 5 | 1 << 29);
        assert_eq!(s.caps.effective, 1 | 1 << 5);
        assert_eq!(s.caps.permitted, 1 | 1 << 5 | 1 << 29);
        assert_eq!(s.caps.inheritable, 0);
        assert_eq!(s.caps.ambient, 1 << 5);
        assert_eq!(s.rlimits, [(libc::RLIMIT_NOFILE as i32, 512, 1024)]);
        assert!(s.no_new_privileges);
    }

    #[test]
    fn crabs_own_container_spec_is_accepted() {
        let spec = crate::runc::oci_spec("h", std::path::Path::new("/rootfs"), "/crab/x");
        let s = ProcessSpec::from_config(spec.to_string().as_bytes()).unwrap();
        // The capabilities runc gave a command in a crab sandbox (CapBnd a80425fb).
        assert_eq!(s.caps.bounding, 0xa804_25fb);
        assert_eq!(s.caps.effective, 0xa804_25fb);
    }

    #[test]
    fn what_runc_would_apply_and_this_cannot_is_refused() {
        let with = |from: &str, to: &str| CONFIG.replace(from, to);
        for (cfg, what) in [
            (
                with("\"terminal\": false", "\"terminal\": true"),
                "terminal",
            ),
            (
                with(
                    "\"noNewPrivileges\"",
                    "\"apparmorProfile\": \"x\", \"noNewPrivileges\"",
                ),
                "AppArmor",
            ),
            (
                with(
                    "\"noNewPrivileges\"",
                    "\"selinuxLabel\": \"x\", \"noNewPrivileges\"",
                ),
                "SELinux",
            ),
            (with("\"gid\": 0}", "\"gid\": 0, \"umask\": 18}"), "umask"),
            (with("CAP_KILL\"]", "CAP_NOPE\"]"), "CAP_NOPE"),
            (with("RLIMIT_NOFILE", "RLIMIT_NOPE"), "RLIMIT_NOPE"),
            (with("\"cwd\": \"/\"", "\"cwd\": \"rel\""), "absolute"),
            ("{\"process\": 3}".to_string(), "config.json"),
        ] {
            let err = ProcessSpec::from_config(cfg.as_bytes()).unwrap_err();
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn the_environment_is_the_specs_with_later_values_winning() {
        let spec = ["PATH=/bin".to_string(), "HOME=/root".into(), "A=1".into()];
        let extra = [
            ("A".to_string(), "2".to_string()),
            ("B".into(), "x=y".into()),
        ];
        assert_eq!(
            environment(&spec, &extra),
            ["PATH=/bin", "HOME=/root", "A=2", "B=x=y"]
        );
        assert_eq!(environment(&spec, &[]), spec);
    }

    #[test]
    fn programs_are_looked_up_along_the_containers_path() {
        let env = ["HOME=/".to_string(), "PATH=/usr/bin:/bin/::/opt".into()];
        assert_eq!(
            program_candidates("ls", &env),
            ["/usr/bin/ls", "/bin/ls", "./ls", "/opt/ls"]
        );
        assert_eq!(program_candidates("./run.sh", &env), ["./run.sh"]);
        assert_eq!(program_candidates("/bin/sh", &env), ["/bin/sh"]);
        // No PATH: the default of the container spec.
        assert_eq!(program_candidates("sh", &[]).len(), 6);
    }

    #[test]
    fn only_namespaces_that_differ_are_joined() {
        let ours = |k: &str| Some(k.len() as u64);
        let theirs = |k: &str| match k {
            "mnt" | "pid" | "net" => Some(100),
            k => Some(k.len() as u64),
        };
        assert_eq!(
            namespace_flags(ours, theirs).unwrap(),
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWNET
        );
        assert_eq!(namespace_flags(ours, ours).unwrap(), 0);
        // A kind the kernel lacks on both sides is equal.
        let no_time = |k: &str| (k != "time").then_some(1);
        assert_eq!(namespace_flags(no_time, no_time).unwrap(), 0);
        let own_user = |k: &str| Some(if k == "user" { 9 } else { 1 });
        let err = namespace_flags(|_| Some(1), own_user).unwrap_err();
        assert!(err.to_string().contains("user namespace"), "{err}");
    }
}
