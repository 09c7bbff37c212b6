//! Per-sandbox networks: a veth pair from the host into the container's network namespace, on
//! a /30 of its own, so an agent inside can reach Crab's listener on the host side address.
//!
//! Sandbox `i` (allocated per sandbox, stored in its record) gets the /30 at `base + 4*i`: the
//! host end is `.1`, the sandbox end (`eth0`, default route via the host end) is `.2`. The host
//! interface is named `crab` + 10 hex digits of the sandbox name's hash (IFNAMSIZ is 16). The
//! pair disappears with the namespace when the container stops; it is re-attached on start.

use std::net::Ipv4Addr;

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
