//! Socket attribution: which watched sandbox opened a TCP connection that the proxy accepted?
//!
//! Kernel side (`bpf/attribution.bpf.c`, its own object): a `sockops` program attached (as a
//! bpf_link, beside any other programs) to a cgroup v2 directory (default: the hierarchy root)
//! records, at `connect()`, the connection's 4-tuple as the connecting side sees it with the
//! caller's cgroup id, the watched cgroup it is in (itself or its innermost watched ancestor)
//! and the caller's process id, and forgets it when the socket closes. The map is an LRU, so it is bounded even if a close is
//! missed.
//!
//! User side: [`SocketAttribution`] keeps the map handles and the watched cgroup id → sandbox id
//! table; a lookup is one map read plus one small hash-map read under a short lock, never a
//! `/proc` scan. The accepting side's `(peer, local)` is the connecting side's `(local, remote)`,
//! so the key is built from it directly ([`conn_key`]). IPv4 is keyed as IPv4-mapped IPv6 on both
//! sides, so a dual-stack listener (which sees `::ffff:a.b.c.d`) finds IPv4 clients.
//!
//! Invariants: a load or attach failure only disables attribution (reason logged once, the
//! inspector keeps working); a sandbox maps only while watched (entries of an unwatched cgroup
//! resolve to `None`); a connection whose addresses are rewritten between the two sides (NAT,
//! another proxy) is not attributed.

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use aya::programs::{CgroupAttachMode, SockOps};
use aya::{Ebpf, EbpfLoader};

use crate::error::InspectorError;

static ATTR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/attribution.bpf.o"));

/// Size of the map key (`struct conn_key` in the C program).
pub const KEY_LEN: usize = 40;

/// Deepest cgroup level the kernel checks for watched ancestors (as the tracepoint filter).
pub const MAX_LEVEL: u32 = 15;

/// Map key bytes: `local` and `remote` as the *connecting* side sees them.
pub type ConnKey = [u8; KEY_LEN];

/// An address as the 16 bytes the kernel side stores: IPv6 as is, IPv4 as `::ffff:a.b.c.d`.
pub fn canonical_ip(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The key of a connection from the connecting side's `local` address to `remote`: both
/// addresses in network order ([`canonical_ip`]), both ports in host order, 4 zero bytes.
pub fn conn_key(local: SocketAddr, remote: SocketAddr) -> ConnKey {
    let mut k = [0u8; KEY_LEN];
    k[0..16].copy_from_slice(&canonical_ip(local.ip()));
    k[16..32].copy_from_slice(&canonical_ip(remote.ip()));
    k[32..34].copy_from_slice(&local.port().to_ne_bytes());
    k[34..36].copy_from_slice(&remote.port().to_ne_bytes());
    k
}

/// The key under which the kernel recorded the connection that an accepting socket sees as
/// `peer -> local`.
pub fn key_for_accepted(peer: SocketAddr, local: SocketAddr) -> ConnKey {
    conn_key(peer, local)
}

/// Bit mask of the cgroup levels that hold a watched cgroup (levels 1..=[`MAX_LEVEL`]).
pub fn level_mask(levels: impl IntoIterator<Item = u32>) -> u64 {
    levels
        .into_iter()
        .filter(|l| (1..=MAX_LEVEL).contains(l))
        .fold(0, |m, l| m | (1u64 << l))
}

/// A recorded connection (`struct conn_value`): `[cgroup id of the caller, watched cgroup id,
/// the caller's process id]`.
type ConnValue = [u64; 3];

struct Owner {
    sandbox: String,
    level: u32,
}

/// The loaded and attached hook.
struct Hook {
    /// Owns the program and its cgroup link: dropping it detaches the hook.
    _bpf: Ebpf,
    conns: BpfHashMap<MapData, ConnKey, ConnValue>,
    watched: BpfHashMap<MapData, u64, u32>,
    levels: Array<MapData, u64>,
    /// Watched cgroup id → the sandbox that watches it.
    owners: HashMap<u64, Owner>,
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> InspectorError {
    move |source| InspectorError::Map { map, source }
}

impl Hook {
    fn load(cgroup: &Path) -> Result<Self, InspectorError> {
        const PROG: &str = "crab_sock_attr";
        let mut bpf = EbpfLoader::new().load(ATTR_OBJECT)?;
        let cg = File::open(cgroup).map_err(|source| InspectorError::Io {
            op: "open",
            path: cgroup.into(),
            source,
        })?;
        let program: &mut SockOps = bpf
            .program_mut(PROG)
            .ok_or(InspectorError::MissingProgram { program: PROG })?
            .try_into()
            .map_err(|source| InspectorError::Program {
                program: PROG,
                source,
            })?;
        program.load().map_err(|source| InspectorError::Program {
            program: PROG,
            source,
        })?;
        // On kernels >= 5.7 aya attaches through a bpf_link, which always coexists with other
        // programs on the cgroup (another inspector, systemd, a CNI) and takes no attach flags
        // (`AllowMultiple` would make the kernel refuse it with EINVAL); `Single` means none.
        program
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|source| InspectorError::Program {
                program: PROG,
                source,
            })?;
        let mut take = |name: &'static str| {
            bpf.take_map(name)
                .ok_or(InspectorError::MissingMap { map: name })
        };
        let conns = BpfHashMap::try_from(take("attr_conns")?).map_err(map_err("attr_conns"))?;
        let watched =
            BpfHashMap::try_from(take("attr_watched")?).map_err(map_err("attr_watched"))?;
        let levels = Array::try_from(take("attr_levels")?).map_err(map_err("attr_levels"))?;
        Ok(Self {
            _bpf: bpf,
            conns,
            watched,
            levels,
            owners: HashMap::new(),
        })
    }

    fn store_levels(&mut self) -> Result<(), InspectorError> {
        let mask = level_mask(self.owners.values().map(|o| o.level));
        self.levels.set(0, mask, 0).map_err(map_err("attr_levels"))
    }
}

/// `error: cause: cause...` (the aya errors keep the errno in their sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// The socket-attribution hook, or why it is unavailable.
pub struct SocketAttribution {
    hook: Result<Mutex<Hook>, String>,
}

impl SocketAttribution {
    /// Loads the hook and attaches it to the cgroup v2 directory `cgroup`; a failure disables
    /// attribution with a warning (logged here, once).
    pub fn load(cgroup: &Path) -> Self {
        match Hook::load(cgroup) {
            Ok(hook) => {
                tracing::info!(cgroup = %cgroup.display(), "eBPF socket attribution attached");
                Self {
                    hook: Ok(Mutex::new(hook)),
                }
            }
            Err(e) => {
                let reason = format!(
                    "attaching the sockops hook to {} failed: {}",
                    cgroup.display(),
                    error_chain(&e)
                );
                tracing::warn!(
                    "eBPF socket attribution disabled ({reason}); connections are not \
                     attributed to sandboxes by cgroup"
                );
                Self { hook: Err(reason) }
            }
        }
    }

    /// No hook, for `reason` (the caller logs it).
    pub fn disabled(reason: impl Into<String>) -> Self {
        Self {
            hook: Err(reason.into()),
        }
    }

    /// Whether the hook is attached.
    pub fn enabled(&self) -> bool {
        self.hook.is_ok()
    }

    /// Why the hook is not attached (`None` when it is).
    pub fn disabled_reason(&self) -> Option<&str> {
        self.hook.as_ref().err().map(String::as_str)
    }

    fn lock(&self) -> Option<MutexGuard<'_, Hook>> {
        self.hook
            .as_ref()
            .ok()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Attributes connections from `cgroup_id` (at `level` below the v2 root) and its
    /// descendants to `sandbox`. A no-op when disabled; a map error is returned (the caller
    /// decides whether it is fatal).
    pub fn watch(&self, sandbox: &str, cgroup_id: u64, level: u32) -> Result<(), InspectorError> {
        let Some(mut hook) = self.lock() else {
            return Ok(());
        };
        hook.watched
            .insert(cgroup_id, 1, 0)
            .map_err(map_err("attr_watched"))?;
        hook.owners.insert(
            cgroup_id,
            Owner {
                sandbox: sandbox.to_string(),
                level,
            },
        );
        hook.store_levels()
    }

    /// Stops attributing connections from `cgroup_id`; recorded ones resolve to `None` from now.
    pub fn unwatch(&self, cgroup_id: u64) -> Result<(), InspectorError> {
        let Some(mut hook) = self.lock() else {
            return Ok(());
        };
        hook.owners.remove(&cgroup_id);
        let _ = hook.watched.remove(&cgroup_id);
        hook.store_levels()
    }

    /// The sandbox whose cgroup opened the connection that the accepting side sees as
    /// `peer -> local`, if it is watched and still open.
    pub fn attribute(&self, peer: SocketAddr, local: SocketAddr) -> Option<String> {
        let hook = self.lock()?;
        let [_cgroup, watched, _pid] = hook.conns.get(&key_for_accepted(peer, local), 0).ok()?;
        hook.owners.get(&watched).map(|o| o.sandbox.clone())
    }

    /// [`attribute`](Self::attribute), with the process id (host pid namespace) of the process
    /// that called `connect()`: inside a sandbox, its agent.
    pub fn attribute_process(&self, peer: SocketAddr, local: SocketAddr) -> Option<(String, u32)> {
        let hook = self.lock()?;
        let [_cgroup, watched, pid] = hook.conns.get(&key_for_accepted(peer, local), 0).ok()?;
        let sandbox = hook.owners.get(&watched)?.sandbox.clone();
        Some((sandbox, u32::try_from(pid).ok()?))
    }

    /// The cgroup id of the process that opened the connection `peer -> local`, when it was
    /// recorded (i.e. that process was in a watched cgroup at `connect()`).
    pub fn connecting_cgroup(&self, peer: SocketAddr, local: SocketAddr) -> Option<u64> {
        let hook = self.lock()?;
        let [cgroup, _watched, _pid] = hook.conns.get(&key_for_accepted(peer, local), 0).ok()?;
        Some(cgroup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

    #[test]
    fn ipv4_is_keyed_as_ipv4_mapped() {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(
            canonical_ip(ip),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]
        );
        let v6 = "2001:db8::1".parse::<Ipv6Addr>().unwrap();
        assert_eq!(canonical_ip(IpAddr::V6(v6)), v6.octets());
    }

    #[test]
    fn key_layout_matches_the_c_struct() {
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let remote: SocketAddr = "127.0.0.2:8080".parse().unwrap();
        let k = conn_key(local, remote);
        assert_eq!(&k[10..16], &[0xff, 0xff, 127, 0, 0, 1]);
        assert_eq!(&k[26..32], &[0xff, 0xff, 127, 0, 0, 2]);
        assert_eq!(u16::from_ne_bytes([k[32], k[33]]), 40000);
        assert_eq!(u16::from_ne_bytes([k[34], k[35]]), 8080);
        assert_eq!(&k[36..40], &[0, 0, 0, 0]);
    }

    #[test]
    fn accepted_side_swaps_nothing_peer_is_the_connecting_local() {
        let peer: SocketAddr = "10.0.0.2:51000".parse().unwrap();
        let local: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        assert_eq!(key_for_accepted(peer, local), conn_key(peer, local));
        assert_ne!(key_for_accepted(peer, local), conn_key(local, peer));
    }

    #[test]
    fn dual_stack_listener_finds_ipv4_clients() {
        let peer4: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let local4: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let mapped = |a: SocketAddr| -> SocketAddr {
            let IpAddr::V4(v4) = a.ip() else {
                unreachable!()
            };
            SocketAddr::V6(SocketAddrV6::new(v4.to_ipv6_mapped(), a.port(), 0, 0))
        };
        assert_eq!(
            key_for_accepted(mapped(peer4), mapped(local4)),
            key_for_accepted(peer4, local4)
        );
    }

    #[test]
    fn ports_and_addresses_distinguish_keys() {
        let a: SocketAddr = "[::1]:40000".parse().unwrap();
        let b: SocketAddr = "[::1]:40001".parse().unwrap();
        let c: SocketAddr = "[::2]:40000".parse().unwrap();
        let s: SocketAddr = "[::1]:8080".parse().unwrap();
        assert_ne!(conn_key(a, s), conn_key(b, s));
        assert_ne!(conn_key(a, s), conn_key(c, s));
        // ::1 and 127.0.0.1 are different addresses.
        let v4: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert_ne!(conn_key(a, s), conn_key(v4, s));
    }

    #[test]
    fn level_mask_keeps_levels_the_kernel_checks() {
        assert_eq!(level_mask([]), 0);
        assert_eq!(level_mask([1, 3, 3]), 0b1010);
        assert_eq!(level_mask([0, 16, 64, 2]), 0b100);
        assert_eq!(level_mask([MAX_LEVEL]), 1 << MAX_LEVEL);
    }
}
