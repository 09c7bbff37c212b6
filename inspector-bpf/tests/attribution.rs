//! Socket attribution with the real kernel hook: a process of a watched sandbox (or of a child
//! cgroup of it, or in its own network namespace behind a veth) connects to a listener owned by
//! the test; `attribute(peer, local)` of the accepted socket names the sandbox. Connections from
//! unwatched cgroups, from an unwatched sandbox or already closed ones are not attributed.
//! Needs root.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{TestSandbox, inspector, prerequisites};
use inspector_bpf::cgroup::{self, ScratchCgroup};

/// The common prerequisites plus an attached socket hook.
fn attribution_prerequisites(test: &str) -> bool {
    if !prerequisites(test) {
        return false;
    }
    if inspector().attribution_enabled() {
        return true;
    }
    let reason = inspector()
        .socket_attribution()
        .disabled_reason()
        .unwrap_or("unknown")
        .to_string();
    if std::env::var("CRAB_TEST_STRICT").as_deref() == Ok("1") {
        panic!("{test}: socket attribution is disabled: {reason} (CRAB_TEST_STRICT=1)");
    }
    eprintln!("skipped: {test}: socket attribution is disabled: {reason}");
    false
}

/// A client process holding one connection open until the test's side closes it; killed on drop.
struct Client {
    child: Child,
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bash script that connects to `addr` and waits for the other side to close.
fn client_script(addr: SocketAddr) -> String {
    format!(
        "exec 3<>/dev/tcp/{}/{} || exit 3; read -r -u 3 _; exit 0",
        addr.ip(),
        addr.port()
    )
}

/// A command that runs `program` inside the cgroup directory `cg` (not necessarily a scratch
/// cgroup's own directory).
fn in_cgroup(cg: &Path, program: &str) -> Command {
    let mut c = Command::new("/bin/sh");
    c.arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
        .arg(cg)
        .arg(program);
    c
}

/// An accepted connection: the client, the accepted stream and its (peer, local) addresses.
struct Accepted {
    client: Client,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
}

impl Accepted {
    /// Closes both sides and waits for the client to exit.
    fn close(mut self) {
        drop(self.stream);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.client.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Spawns `cmd` (which must connect to `listener`) and accepts its connection.
fn accept_from(mut cmd: Command, listener: &TcpListener) -> Accepted {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut client = Client {
        child: cmd.spawn().expect("spawn the client"),
    };
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).unwrap();
                let local = stream.local_addr().unwrap();
                return Accepted {
                    client,
                    stream,
                    peer,
                    local,
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if let Ok(Some(status)) = client.child.try_wait() {
            let mut err = String::new();
            if let Some(mut s) = client.child.stderr.take() {
                let _ = s.read_to_string(&mut err);
            }
            panic!("the client exited ({status}) before connecting: {err}");
        }
        assert!(Instant::now() < deadline, "no connection within 10 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Polls `attribute` until it returns `None` (the record is dropped when the client's socket
/// closes); false if it still answers after 5 s.
fn forgotten(peer: SocketAddr, local: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if inspector().attribute(peer, local).is_none() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A process in the sandbox's cgroup connecting over IPv4 loopback is attributed to the sandbox
/// (with its own cgroup id recorded); once the connection is closed it no longer is.
#[test]
fn loopback_ipv4_connection_from_sandbox_is_attributed() {
    if !attribution_prerequisites("loopback_ipv4_connection_from_sandbox_is_attributed") {
        return;
    }
    let sb = TestSandbox::new(|_| {});
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cmd = sb.cgroup.command("bash");
    cmd.arg("-c").arg(client_script(addr));
    let acc = accept_from(cmd, &listener);
    assert_eq!(
        inspector().attribute(acc.peer, acc.local).as_deref(),
        Some(sb.id.as_str()),
        "peer {} local {}",
        acc.peer,
        acc.local
    );
    // Idempotent: a second lookup answers the same.
    assert_eq!(
        inspector().attribute(acc.peer, acc.local).as_deref(),
        Some(sb.id.as_str())
    );
    assert_eq!(
        inspector()
            .socket_attribution()
            .connecting_cgroup(acc.peer, acc.local),
        Some(cgroup::cgroup_id(sb.cgroup.path()).unwrap())
    );
    // The process that called connect(): the client itself (it exec'd in place).
    assert_eq!(
        inspector()
            .socket_attribution()
            .attribute_process(acc.peer, acc.local),
        Some((sb.id.clone(), acc.client.child.id()))
    );
    // The reversed tuple is a different connection.
    assert_eq!(inspector().attribute(acc.local, acc.peer), None);
    let n = 10_000;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(inspector().attribute(acc.peer, acc.local));
    }
    eprintln!(
        "attribute(): {:.2} us per lookup (hit)",
        t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    );
    let (peer, local) = (acc.peer, acc.local);
    acc.close();
    assert!(
        forgotten(peer, local),
        "the record of a closed connection must be dropped"
    );
}

/// IPv6 loopback; a dual-stack listener that sees an IPv4 client as `::ffff:127.0.0.1`; an IPv6
/// client socket connecting to `::ffff:127.0.0.1` that an IPv4 listener sees as `127.0.0.1`.
#[test]
fn ipv6_and_dual_stack_connections_are_attributed() {
    if !attribution_prerequisites("ipv6_and_dual_stack_connections_are_attributed") {
        return;
    }
    let sb = TestSandbox::new(|_| {});
    let v6 = match TcpListener::bind("[::1]:0") {
        Ok(l) => l,
        Err(e) if std::env::var("CRAB_TEST_STRICT").as_deref() == Ok("1") => {
            panic!("ipv6_and_dual_stack_connections_are_attributed: no IPv6 loopback: {e}")
        }
        Err(e) => {
            eprintln!(
                "skipped: ipv6_and_dual_stack_connections_are_attributed: no IPv6 loopback: {e}"
            );
            return;
        }
    };
    let mut cmd = sb.cgroup.command("bash");
    cmd.arg("-c").arg(client_script(v6.local_addr().unwrap()));
    let acc = accept_from(cmd, &v6);
    assert!(acc.peer.is_ipv6());
    assert_eq!(
        inspector().attribute(acc.peer, acc.local).as_deref(),
        Some(sb.id.as_str()),
        "peer {} local {}",
        acc.peer,
        acc.local
    );
    acc.close();

    let dual = TcpListener::bind("[::]:0").unwrap();
    let port = dual.local_addr().unwrap().port();
    let mut cmd = sb.cgroup.command("bash");
    cmd.arg("-c")
        .arg(client_script(SocketAddr::from(([127, 0, 0, 1], port))));
    let acc = accept_from(cmd, &dual);
    assert_eq!(
        acc.peer.to_string(),
        format!("[::ffff:127.0.0.1]:{}", acc.peer.port())
    );
    assert_eq!(
        inspector().attribute(acc.peer, acc.local).as_deref(),
        Some(sb.id.as_str()),
        "peer {} local {}",
        acc.peer,
        acc.local
    );
    acc.close();

    let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = v4.local_addr().unwrap().port();
    // bash opens an AF_INET6 socket for a v4-mapped target.
    let script = format!("exec 3<>/dev/tcp/::ffff:127.0.0.1/{port} || exit 3; read -r -u 3 _");
    let mut cmd = sb.cgroup.command("bash");
    cmd.arg("-c").arg(script);
    let acc = accept_from(cmd, &v4);
    assert!(acc.peer.is_ipv4());
    assert_eq!(
        inspector().attribute(acc.peer, acc.local).as_deref(),
        Some(sb.id.as_str()),
        "peer {} local {}",
        acc.peer,
        acc.local
    );
    acc.close();
}

/// Connections from the test process itself and from an unwatched cgroup are not attributed,
/// while a sandbox is watched.
#[test]
fn connections_from_outside_watched_cgroups_are_not_attributed() {
    if !attribution_prerequisites("connections_from_outside_watched_cgroups_are_not_attributed") {
        return;
    }
    let _sb = TestSandbox::new(|_| {});
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();

    let own = TcpStream::connect(addr).unwrap();
    listener.set_nonblocking(false).unwrap();
    let (accepted, peer) = listener.accept().unwrap();
    assert_eq!(peer, own.local_addr().unwrap());
    assert_eq!(
        inspector().attribute(peer, accepted.local_addr().unwrap()),
        None
    );

    let unwatched =
        ScratchCgroup::create(&format!("crab-attr-unwatched-{}", std::process::id())).unwrap();
    let mut cmd = unwatched.command("bash");
    cmd.arg("-c").arg(client_script(addr));
    let acc = accept_from(cmd, &listener);
    assert_eq!(inspector().attribute(acc.peer, acc.local), None);
    acc.close();
}

/// A process in a child cgroup of the sandbox's cgroup is attributed to the sandbox; the record
/// carries the child cgroup's id.
#[test]
fn child_cgroup_connection_is_attributed_to_the_sandbox() {
    if !attribution_prerequisites("child_cgroup_connection_is_attributed_to_the_sandbox") {
        return;
    }
    let sb = TestSandbox::new(|_| {});
    let child = sb.cgroup.path().join("inner").join("deeper");
    std::fs::create_dir_all(&child).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = in_cgroup(&child, "bash");
    cmd.arg("-c")
        .arg(client_script(listener.local_addr().unwrap()));
    let acc = accept_from(cmd, &listener);
    assert_eq!(
        inspector().attribute(acc.peer, acc.local).as_deref(),
        Some(sb.id.as_str())
    );
    assert_eq!(
        inspector()
            .socket_attribution()
            .connecting_cgroup(acc.peer, acc.local),
        Some(cgroup::cgroup_id(&child).unwrap())
    );
    acc.close();
}

/// After `unwatch`, neither an open connection of the sandbox nor a new one is attributed.
#[test]
fn unwatch_stops_attribution() {
    if !attribution_prerequisites("unwatch_stops_attribution") {
        return;
    }
    let sb = TestSandbox::new(|_| {});
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cmd = sb.cgroup.command("bash");
    cmd.arg("-c").arg(client_script(addr));
    let before = accept_from(cmd, &listener);
    assert_eq!(
        inspector().attribute(before.peer, before.local).as_deref(),
        Some(sb.id.as_str())
    );
    inspector().unwatch(&sb.id).unwrap();
    assert_eq!(inspector().attribute(before.peer, before.local), None);
    let mut cmd = sb.cgroup.command("bash");
    cmd.arg("-c").arg(client_script(addr));
    let after = accept_from(cmd, &listener);
    assert_eq!(inspector().attribute(after.peer, after.local), None);
    before.close();
    after.close();
}

static NETNS_SEQ: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace joined to the host by a veth pair (`host` address on the host side,
/// `inner` in the namespace, a /30); both are deleted on drop.
struct NetNs {
    name: String,
    host_if: String,
    host: std::net::Ipv4Addr,
    inner: std::net::Ipv4Addr,
}

impl NetNs {
    fn create() -> Result<Self, String> {
        Self::sweep_stale();
        let pid = std::process::id();
        let n = NETNS_SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("crabattr-{pid}-{n}");
        let host_if = format!("ca{pid}h{n}");
        let peer_if = format!("ca{pid}p{n}");
        let base = [10, 213, (pid % 250) as u8, ((n % 60) * 4) as u8];
        let host = std::net::Ipv4Addr::new(base[0], base[1], base[2], base[3] + 1);
        let inner = std::net::Ipv4Addr::new(base[0], base[1], base[2], base[3] + 2);
        let _ = ip(&["link", "del", &host_if]);
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = Self {
            name,
            host_if,
            host,
            inner,
        };
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
        ])?;
        ip(&["link", "set", &peer_if, "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{host}/30"), "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{inner}/30"),
            "dev",
            &peer_if,
        ])?;
        ip(&["-n", &ns.name, "link", "set", &peer_if, "up"])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Deletes namespaces left by a killed earlier run (their veth pairs go with them).
    fn sweep_stale() {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let Some(rest) = name.strip_prefix("crabattr-") else {
                continue;
            };
            let alive = rest
                .split('-')
                .next()
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A sandbox process in its own network namespace connects through a veth to the host side's
/// address: the connection is still attributed to the sandbox.
#[test]
fn connection_from_a_sandbox_netns_over_veth_is_attributed() {
    const TEST: &str = "connection_from_a_sandbox_netns_over_veth_is_attributed";
    if !attribution_prerequisites(TEST) {
        return;
    }
    let ns = match NetNs::create() {
        Ok(ns) => ns,
        Err(e) if std::env::var("CRAB_TEST_STRICT").as_deref() == Ok("1") => {
            panic!("{TEST}: cannot create a network namespace with a veth: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {TEST}: cannot create a network namespace with a veth: {e}");
            return;
        }
    };
    let sb = TestSandbox::new(|_| {});
    let listener = TcpListener::bind((ns.host, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cmd = sb.cgroup.command("ip");
    cmd.args([
        "netns",
        "exec",
        &ns.name,
        "bash",
        "-c",
        &client_script(addr),
    ]);
    let acc = accept_from(cmd, &listener);
    assert_eq!(acc.peer.ip(), std::net::IpAddr::V4(ns.inner));
    assert_eq!(
        inspector().attribute(acc.peer, acc.local).as_deref(),
        Some(sb.id.as_str()),
        "peer {} local {}",
        acc.peer,
        acc.local
    );
    // The same connection from an unwatched process would not be: unwatch and look again.
    inspector().unwatch(&sb.id).unwrap();
    assert_eq!(inspector().attribute(acc.peer, acc.local), None);
    acc.close();
}

/// When the hook cannot attach (here: a cgroup directory that does not exist), attribution is
/// disabled with a reason naming it, and file tracking keeps working.
#[test]
fn a_failed_hook_attach_leaves_the_inspector_working() {
    if !prerequisites("a_failed_hook_attach_leaves_the_inspector_working") {
        return;
    }
    let missing =
        std::path::PathBuf::from(format!("/nonexistent/crab-attr-{}", std::process::id()));
    let config = inspector_bpf::InspectorConfig {
        cgroup_root: Some(missing.clone()),
        ..inspector_bpf::InspectorConfig::default()
    };
    let own = inspector_bpf::Inspector::new(config).expect("the inspector loads without the hook");
    assert!(!own.attribution_enabled());
    let reason = own.socket_attribution().disabled_reason().unwrap();
    assert!(reason.contains(&missing.display().to_string()), "{reason}");

    let id = format!("crab-attr-nohook-{}", std::process::id());
    let cg = ScratchCgroup::create(&id).unwrap();
    let dir = tempfile::tempdir().unwrap();
    own.watch(inspector_bpf::SandboxSpec::new(id.clone(), cg.path(), "/"))
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let script = format!(
        "echo x > {}/f.txt && {}",
        dir.path().display(),
        client_script(listener.local_addr().unwrap())
    );
    let mut cmd = cg.command("bash");
    cmd.arg("-c").arg(script);
    let acc = accept_from(cmd, &listener);
    assert_eq!(own.attribute(acc.peer, acc.local), None);
    let eff = own.status(&id).unwrap();
    let created = inspector_bpf::FileChange::Created {
        path: format!(
            "{}/f.txt",
            dir.path().to_string_lossy().trim_start_matches('/')
        ),
    };
    assert_eq!(eff.files, vec![created], "{:?}", eff.reasons);
    acc.close();
    own.unwatch(&id).unwrap();
}
