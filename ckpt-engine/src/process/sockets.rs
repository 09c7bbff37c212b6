//! Connected TCP sockets of a dumped process tree: the connections a checkpoint closes.
//!
//! Crab dumps with CRIU's `tcp-close` (see [`super::checkpoint::CRIU_OPTIONS`]): an established
//! connection is dumped without its TCP state and restored as a shut-down socket, so after a
//! restore the process reads EOF (writes fail with `EPIPE`) and must reconnect — which is what
//! an HTTP client with keep-alive does anyway. The peer saw the connection end when the original
//! process died. To say so in the recovery point, the dump's frozen work lists these sockets
//! while the tasks are stopped: every TCP socket held by a process of the tree (by inode, from
//! `/proc/<pid>/fd`) whose state in its network namespace's `/proc/<pid>/net/tcp{,6}` is one
//! CRIU treats as a connection.
//!
//! Invariants: parsing is pure and tolerant (malformed lines are skipped); a socket shared by
//! several processes or fds counts once; listening and closed sockets never count (CRIU restores
//! them as they were).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

/// TCP states (`include/net/tcp_states.h`) CRIU dumps as connections: established, SYN_SENT,
/// FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING.
const CONNECTED_STATES: &[u8] = &[1, 2, 4, 5, 8, 9, 11];

/// One line of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpEntry {
    /// Local address.
    pub local: SocketAddr,
    /// Remote address.
    pub remote: SocketAddr,
    /// Kernel TCP state number.
    pub state: u8,
    /// Socket inode.
    pub inode: u64,
}

impl TcpEntry {
    /// True when CRIU would dump this socket as a connection.
    pub fn is_connected(&self) -> bool {
        CONNECTED_STATES.contains(&self.state)
    }

    /// `local -> remote`, for notes and logs.
    pub fn describe(&self) -> String {
        format!("{} -> {}", self.local, self.remote)
    }
}

/// Parses `/proc/net/tcp` (IPv4) or `/proc/net/tcp6` (IPv6) text; the header and malformed
/// lines are skipped.
pub fn parse_proc_net_tcp(text: &str) -> Vec<TcpEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<TcpEntry> {
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 10 || !f[0].ends_with(':') {
        return None;
    }
    Some(TcpEntry {
        local: parse_addr(f[1])?,
        remote: parse_addr(f[2])?,
        state: u8::from_str_radix(f[3], 16).ok()?,
        inode: f[9].parse().ok()?,
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:port` (IPv6); each 32-bit word is in the
/// kernel's (little-endian) byte order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_le_bytes())
    };
    match ip.len() {
        8 => Some(SocketAddr::new(Ipv4Addr::from(word(0)?).into(), port)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(SocketAddr::new(Ipv6Addr::from(b).into(), port))
        }
        _ => None,
    }
}

/// The inode of a `/proc/<pid>/fd/<n>` link target `socket:[12345]`.
pub fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The connected TCP sockets held by host pids `pids` (read from `proc`, normally `/proc`),
/// each once, sorted by description. Unreadable processes are skipped.
pub fn connected_tcp(proc: &Path, pids: &[u32]) -> Vec<TcpEntry> {
    let mut held = BTreeSet::new();
    // One table per network namespace, read through the first process seen in it.
    let mut tables: BTreeMap<String, Vec<TcpEntry>> = BTreeMap::new();
    for pid in pids {
        let dir = proc.join(pid.to_string());
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            continue;
        };
        let mut any = false;
        for fd in fds.flatten() {
            if let Some(ino) = std::fs::read_link(fd.path())
                .ok()
                .and_then(|t| socket_inode(&t.to_string_lossy()))
            {
                held.insert(ino);
                any = true;
            }
        }
        if !any {
            continue;
        }
        let netns = std::fs::read_link(dir.join("ns/net"))
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("pid {pid}"));
        tables.entry(netns).or_insert_with(|| {
            ["net/tcp", "net/tcp6"]
                .iter()
                .filter_map(|f| std::fs::read_to_string(dir.join(f)).ok())
                .flat_map(|t| parse_proc_net_tcp(&t))
                .collect()
        });
    }
    let mut out: Vec<TcpEntry> = tables
        .into_values()
        .flatten()
        .filter(|e| e.is_connected() && held.contains(&e.inode))
        .collect();
    out.sort_by_key(TcpEntry::describe);
    out.dedup_by_key(|e| e.inode);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines of a real `/proc/net/tcp` and `/proc/net/tcp6` (kernel 6.18).
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:B7D3 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 51337 1 0000000000000000 100 0 0 10 0
   1: 02C8C80A:9C40 01C8C80A:8F3D 01 00000000:00000000 02:000A3F6B 00000000     0        0 77123 2 0000000000000000 20 4 30 10 -1
   2: 02C8C80A:9C42 01C8C80A:8F3D 06 00000000:00000000 03:00001234 00000000     0        0 0 3 0000000000000000
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:D2F0 08 00000000:00000000 00:00000000 00000000     0        0 88001 1 0000000000000000 20 4 0 10 -1
";

    #[test]
    fn parses_ipv4_and_ipv6_lines() {
        let v4 = parse_proc_net_tcp(TCP);
        assert_eq!(v4.len(), 3);
        assert_eq!(v4[0].local, "127.0.0.1:47059".parse().unwrap());
        assert_eq!(v4[0].state, 0x0a);
        assert!(!v4[0].is_connected(), "listener");
        assert_eq!(v4[1].describe(), "10.200.200.2:40000 -> 10.200.200.1:36669");
        assert_eq!(v4[1].inode, 77123);
        assert!(v4[1].is_connected());
        assert!(!v4[2].is_connected(), "TIME_WAIT has no socket");
        let v6 = parse_proc_net_tcp(TCP6);
        assert_eq!(v6.len(), 1);
        assert_eq!(v6[0].local, "[::1]:8080".parse().unwrap());
        assert!(v6[0].is_connected(), "CLOSE_WAIT");
    }

    #[test]
    fn malformed_lines_are_skipped() {
        for bad in [
            "",
            "garbage",
            "   0: 0100007F:ZZZZ 00000000:0000 0A 0 0 0 0 0 1",
            "   0: 0100007F 00000000:0000 0A 0 0 0 0 0 1",
            "   0: 01007F:1F90 00000000:0000 0A 0 0 0 0 0 1",
            "   0: 0100007F:1F90 00000000:0000 0A 0 0 0 0 0 x",
        ] {
            assert!(parse_proc_net_tcp(bad).is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn socket_links_parse() {
        assert_eq!(socket_inode("socket:[77123]"), Some(77123));
        assert_eq!(socket_inode("pipe:[77123]"), None);
        assert_eq!(socket_inode("/tmp/socket:[1]"), None);
    }

    /// This test process's own connection to a local listener is found (and counted once
    /// although two fds hold it); the listener is not.
    #[test]
    fn finds_a_connection_of_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _dup = client.try_clone().unwrap();
        let (_server, _) = listener.accept().unwrap();
        let found = connected_tcp(Path::new("/proc"), &[std::process::id()]);
        let local = client.local_addr().unwrap();
        let mine: Vec<_> = found.iter().filter(|e| e.local == local).collect();
        assert_eq!(mine.len(), 1, "{found:?}");
        assert_eq!(mine[0].remote, listener.local_addr().unwrap());
        assert!(found.iter().all(|e| e.remote.port() != 0), "no listener");
    }
}
