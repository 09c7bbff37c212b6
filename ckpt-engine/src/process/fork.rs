//! A fork's OCI runtime config, derived from the checkpointed sandbox's config.
//!
//! CRIU restores the process tree with the namespaces, mounts and cgroup layout of the
//! original; runc supplies the root filesystem, the cgroup and (for a namespace given by path)
//! the network. A fork therefore differs from the original only in those three places: its own
//! rootfs (a writable snapshot of the checkpoint's filesystem snapshot), its own cgroup and,
//! when the original joined a network namespace by path, its own network namespace.

use std::path::Path;

use serde_json::Value;

/// What a fork changes in the original config.
#[derive(Debug, Clone, Default)]
pub struct ForkOverrides<'a> {
    /// The fork's root filesystem (absolute).
    pub rootfs: Option<&'a Path>,
    /// The fork's cgroup path (`linux.cgroupsPath`); `None` keeps runc's default (derived from
    /// the container id) or removes an explicit original path so the fork never shares it.
    pub cgroups_path: Option<&'a str>,
    /// The fork's network namespace path; required when the original joined one by path.
    pub netns_path: Option<&'a Path>,
    /// The fork's hostname; `None` keeps the original's.
    pub hostname: Option<&'a str>,
}

/// Why a config cannot be forked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForkConfigError {
    /// the config is not an OCI runtime config object
    #[error("not an OCI runtime config: {what}")]
    NotOci {
        /// What is missing.
        what: &'static str,
    },
    /// the original joins a network namespace by path and no new one was given
    #[error("the original joins network namespace {path}; a fork needs its own")]
    SharedNetns {
        /// The original's namespace path.
        path: String,
    },
}

/// Returns the fork's config.
pub fn derive_fork_config(
    original: &Value,
    o: &ForkOverrides<'_>,
) -> Result<Value, ForkConfigError> {
    let mut c = original.clone();
    let obj = c
        .as_object_mut()
        .ok_or(ForkConfigError::NotOci { what: "object" })?;
    if let Some(rootfs) = o.rootfs {
        let root = obj
            .get_mut("root")
            .and_then(Value::as_object_mut)
            .ok_or(ForkConfigError::NotOci { what: "root" })?;
        root.insert(
            "path".into(),
            Value::String(rootfs.to_string_lossy().into_owned()),
        );
    }
    if let Some(h) = o.hostname {
        obj.insert("hostname".into(), Value::String(h.to_string()));
    }
    let linux = obj
        .get_mut("linux")
        .and_then(Value::as_object_mut)
        .ok_or(ForkConfigError::NotOci { what: "linux" })?;
    match o.cgroups_path {
        Some(p) => {
            linux.insert("cgroupsPath".into(), Value::String(p.to_string()));
        }
        None => {
            linux.remove("cgroupsPath");
        }
    }
    if let Some(namespaces) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
        for ns in namespaces.iter_mut() {
            let Some(ns) = ns.as_object_mut() else {
                continue;
            };
            if ns.get("type").and_then(Value::as_str) != Some("network") {
                continue;
            }
            let Some(old) = ns.get("path").and_then(Value::as_str).map(str::to_string) else {
                continue;
            };
            let new = o
                .netns_path
                .ok_or(ForkConfigError::SharedNetns { path: old })?;
            ns.insert(
                "path".into(),
                Value::String(new.to_string_lossy().into_owned()),
            );
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn original(netns: Option<&str>) -> Value {
        let mut net = json!({"type": "network"});
        if let Some(p) = netns {
            net["path"] = json!(p);
        }
        json!({
            "ociVersion": "1.0.2",
            "root": {"path": "/pool/sandboxes/a", "readonly": false},
            "hostname": "a",
            "linux": {
                "cgroupsPath": "/crab/a",
                "namespaces": [{"type": "pid"}, net, {"type": "mount"}]
            }
        })
    }

    #[test]
    fn fork_gets_its_own_rootfs_cgroup_and_netns() {
        let f = derive_fork_config(
            &original(Some("/run/netns/crab-a")),
            &ForkOverrides {
                rootfs: Some(Path::new("/pool/sandboxes/b")),
                cgroups_path: Some("/crab/b"),
                netns_path: Some(Path::new("/run/netns/crab-b")),
                hostname: Some("b"),
            },
        )
        .unwrap();
        assert_eq!(f["root"]["path"], "/pool/sandboxes/b");
        assert_eq!(f["root"]["readonly"], false);
        assert_eq!(f["linux"]["cgroupsPath"], "/crab/b");
        assert_eq!(f["linux"]["namespaces"][1]["path"], "/run/netns/crab-b");
        assert_eq!(f["linux"]["namespaces"][0], json!({"type": "pid"}));
        assert_eq!(f["hostname"], "b");
    }

    #[test]
    fn fork_never_shares_the_original_cgroup_or_netns() {
        let f = derive_fork_config(&original(None), &ForkOverrides::default()).unwrap();
        assert!(f["linux"].get("cgroupsPath").is_none());
        assert_eq!(f["linux"]["namespaces"][1], json!({"type": "network"}));
        let e = derive_fork_config(
            &original(Some("/run/netns/crab-a")),
            &ForkOverrides::default(),
        );
        assert_eq!(
            e,
            Err(ForkConfigError::SharedNetns {
                path: "/run/netns/crab-a".into()
            })
        );
        assert!(derive_fork_config(&json!([1]), &ForkOverrides::default()).is_err());
    }
}
