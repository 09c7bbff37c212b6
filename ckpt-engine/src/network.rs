//! Per-sandbox networks: a veth pair from the host into the container's network namespace, on
//! a /30 of its own, so an agent inside can reach Crab's listener on the host side address.
//!
//! Sandbox `i` (allocated per sandbox, stored in its record) gets the /30 at `base + 4*i`: the
//! host end is `.1`, the sandbox end (`eth0`, default route via the host end) is `.2`. The host
//! interface is named `crab` + 10 hex digits of the sandbox name's hash (IFNAMSIZ is 16). The
//! pair disappears with the namespace when the container stops; it is re-attached on start.
//!
//! Socket tables of their own: a new network namespace shares the host's TCP established hash
//! (and UDP hash) unless the namespace that creates it sets `tcp_child_ehash_entries`
//! (`udp_child_hash_entries`). Every listing of a sandbox's sockets at a process checkpoint
//! (CRIU's `sock_diag` dumps, Crab's read of the connections a checkpoint closes) walks the whole
//! shared table: a host's table is sized by its memory (4.5 ms per walk on a 24 GiB VM, 0.2 ms
//! with a table of its own). Crab does not change the host's setting; it keeps a *parent*
//! namespace of its own with both set ([`SANDBOX_SOCKET_TABLE`]) and runs the commands that
//! create a sandbox's namespace — `runc run` and `runc restore` (CRIU makes the restored
//! namespace) — from a thread that joined it ([`from_sandbox_parent`]). The kernel sizes a new
//! namespace's tables from the creating task's namespace; nothing else of the parent is used
//! (the veth pairs are made from the host's namespace, by pid).

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::sys::{self, ToolError};

/// Number of /30 networks in the /16 above `base`.
pub const MAX_NETWORKS: u32 = 1 << 14;

/// A sandbox's network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxNet {
    /// Allocation index.
    pub index: u32,
    /// Host-side interface name.
    pub host_if: String,
    /// Host-side address (what the sandbox connects to for Crab's listener).
    pub host_ip: Ipv4Addr,
    /// The sandbox's address on `eth0`.
    pub sandbox_ip: Ipv4Addr,
}

/// The network of allocation `index` for sandbox `name` under `base` (a /16). Pure.
pub fn plan(name: &str, index: u32, base: Ipv4Addr) -> SandboxNet {
    let start = u32::from(base) + 4 * (index % MAX_NETWORKS);
    let hash = blake3::hash(name.as_bytes()).to_hex();
    SandboxNet {
        index,
        host_if: format!("crab{}", &hash[..10]),
        host_ip: Ipv4Addr::from(start + 1),
        sandbox_ip: Ipv4Addr::from(start + 2),
    }
}

/// The lowest index not in `used`. Pure.
pub fn allocate(used: &[u32]) -> Option<u32> {
    (0..MAX_NETWORKS).find(|i| !used.contains(i))
}

/// Creates the veth pair into the network namespace of `pid` and configures both ends.
pub fn attach(net: &SandboxNet, pid: u32) -> Result<(), ToolError> {
    // A stale host end (crashed engine) would make `add` fail.
    let _ = sys::run("ip", &["link", "del", &net.host_if]);
    let host = format!(
        "link add {host} type veth peer name eth0 netns {pid}\n\
         addr add {hip}/30 dev {host}\n\
         link set {host} up\n",
        host = net.host_if,
        hip = net.host_ip,
    );
    sys::run_with_input("ip", &["-batch", "-"], Some(host.as_bytes()))?;
    let inside = format!(
        "link set lo up\naddr add {sip}/30 dev eth0\nlink set eth0 up\nroute add default via {hip}\n",
        sip = net.sandbox_ip,
        hip = net.host_ip,
    );
    let pid = pid.to_string();
    sys::run_with_input(
        "nsenter",
        &["-t", pid.as_str(), "-n", "ip", "-batch", "-"],
        Some(inside.as_bytes()),
    )?;
    Ok(())
}

/// Brings the loopback interface of the network namespace of `pid` up (the kernel then gives
/// it 127.0.0.1 and ::1). A CRIU restore recreates the namespace with `lo` down and without
/// addresses, so services restored or started afterwards could not reach each other on
/// localhost.
pub fn loopback_up(pid: u32) -> Result<(), ToolError> {
    let pid = pid.to_string();
    sys::run(
        "nsenter",
        &["-t", pid.as_str(), "-n", "ip", "link", "set", "lo", "up"],
    )?;
    Ok(())
}

/// Buckets of the TCP established hash and of the UDP hash of each sandbox's network
/// namespace (the kernel rounds up to a power of two; UDP takes 256 to 65,536).
pub const SANDBOX_SOCKET_TABLE: u32 = 1024;

/// The namespace sandbox namespaces are made from (see the module documentation); `None` where
/// it could not be made (not root, a kernel before 6.1): sandboxes then share the host's tables.
fn sandbox_parent() -> Option<&'static OwnedFd> {
    static PARENT: OnceLock<Option<OwnedFd>> = OnceLock::new();
    PARENT
        .get_or_init(|| match make_parent() {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::info!(
                    error = %e,
                    "sandbox network namespaces share the host's socket tables"
                );
                None
            }
        })
        .as_ref()
}

/// Makes the parent namespace on a thread of its own (`unshare` and `/proc/sys/net` act on the
/// calling thread) and keeps a handle of it.
fn make_parent() -> std::io::Result<OwnedFd> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            let size = SANDBOX_SOCKET_TABLE.to_string();
            std::fs::write("/proc/sys/net/ipv4/tcp_child_ehash_entries", &size)?;
            // Since 6.2; a table of its own for UDP is a bonus.
            let _ = std::fs::write("/proc/sys/net/ipv4/udp_child_hash_entries", &size);
            Ok(std::fs::File::open("/proc/thread-self/ns/net")?.into())
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("thread panicked")))
    })
}

/// Runs `f` on a thread that joined the sandbox parent namespace, so that processes `f` starts
/// create their network namespaces from it. Without a parent namespace `f` runs here; if it
/// cannot be joined, `f` runs in the host's namespace all the same (logged). Only for commands
/// that make a sandbox's namespace and use no network themselves (`runc run`, `runc restore`).
pub fn from_sandbox_parent<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let Some(parent) = sandbox_parent() else {
        return f();
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Err(e) = nix::sched::setns(parent, nix::sched::CloneFlags::CLONE_NEWNET) {
                tracing::warn!(error = %e, "cannot join the sandbox parent network namespace");
            }
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_are_disjoint_slash30s_with_short_interface_names() {
        let base = Ipv4Addr::new(10, 231, 0, 0);
        let a = plan("sbx", 0, base);
        assert_eq!(
            (a.host_ip, a.sandbox_ip),
            (Ipv4Addr::new(10, 231, 0, 1), Ipv4Addr::new(10, 231, 0, 2))
        );
        let b = plan("sbx-with-a-very-long-name-indeed", 70, base);
        assert_eq!(b.host_ip, Ipv4Addr::new(10, 231, 1, 25));
        assert!(b.host_if.len() <= 15);
        assert_ne!(a.host_if, b.host_if);
        assert_eq!(allocate(&[0, 1, 3]), Some(2));
    }
}
