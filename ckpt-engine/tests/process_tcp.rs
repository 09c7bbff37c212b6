//! Full checkpoints of sandboxes with TCP sockets, through the `Engine` API: real runc sandboxes
//! with their veth network, real CRIU (with `tcp-close`). Run as root:
//! `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine --test process_tcp`.
//!
//! Needs a CRIU that can dump inet sockets on the running kernel: CRIU 4.1.1 fails on Linux
//! >= 6.16 (`Can't get 1:16 opt`, SO_PASSCRED) unless built with the bootstrap's patch.

mod common;
mod process_support;

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ckpt_engine::fs::ChangeHint;
use ckpt_engine::manifest::CheckpointKind;
use common::{COUNTER_SERVER, assert_reaches_host, counter, sh, unique};
use process_support::{GIB, Lab, process_prerequisites};

/// What the host-side peer saw on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PeerEvent {
    /// A connection arrived and sent this first line.
    Hello(String),
    /// The connection that sent this first line ended (EOF or reset).
    Closed(String),
}

/// A listener on the sandbox's host-side address (what Crab's proxy is to an agent): records
/// each connection's first line and its end.
struct HostPeer {
    port: u16,
    events: Arc<Mutex<Vec<PeerEvent>>>,
    /// Write halves of the open connections by first line, so the test can close one.
    conns: Arc<Mutex<Vec<(String, TcpStream)>>>,
    stop: Arc<AtomicBool>,
}

impl HostPeer {
    fn start(ip: Ipv4Addr) -> HostPeer {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let events = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ev, cs, st) = (events.clone(), conns.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        let (ev, cs) = (ev.clone(), cs.clone());
                        std::thread::spawn(move || serve(conn, ev, cs));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        HostPeer {
            port,
            events,
            conns,
            stop,
        }
    }

    fn events(&self) -> Vec<PeerEvent> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until `event` has been seen `times` times.
    fn wait_for(&self, event: &PeerEvent, times: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.events().iter().filter(|e| *e == event).count();
            if seen >= times {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: waited for {event:?} x{times}; events {:?}",
                self.events()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes the host side of the connection that said `hello`.
    fn close(&self, hello: &str) {
        let mut conns = self.conns.lock().unwrap();
        let i = conns
            .iter()
            .position(|(h, _)| h == hello)
            .unwrap_or_else(|| panic!("no open connection {hello:?}"));
        let (_, conn) = conns.remove(i);
        let _ = conn.shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for HostPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for (_, c) in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn serve(
    conn: TcpStream,
    events: Arc<Mutex<Vec<PeerEvent>>>,
    conns: Arc<Mutex<Vec<(String, TcpStream)>>>,
) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut hello = String::new();
    if reader.read_line(&mut hello).unwrap_or(0) == 0 {
        return;
    }
    let hello = hello.trim().to_string();
    conns.lock().unwrap().push((hello.clone(), conn));
    events.lock().unwrap().push(PeerEvent::Hello(hello.clone()));
    // Until EOF or reset.
    let mut sink = [0u8; 256];
    while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
    events.lock().unwrap().push(PeerEvent::Closed(hello));
}

fn hello(n: u32) -> PeerEvent {
    PeerEvent::Hello(format!("hello {n}"))
}

fn closed(n: u32) -> PeerEvent {
    PeerEvent::Closed(format!("hello {n}"))
}

/// Proves that a sandbox holding an established TCP connection (an agent's keep-alive
/// connection to Crab's proxy) gets a full checkpoint: CRIU dumps it with `tcp-close`, the
/// point is `full` and its note names the closed connection; after the sandbox is killed and
/// restored, the in-memory counters are those of the checkpoint, and the restored connection
/// reads EOF, so the client reconnects (with its restored connection count) and the host sees
/// a new connection. The sandbox's network works again.
#[test]
fn established_connection_is_closed_and_client_reconnects_after_restore() {
    let test = "established_connection_is_closed_and_client_reconnects_after_restore";
    if !process_prerequisites(test) {
        return;
    }
    let lab = Lab::open(4 * GIB);
    let e = lab.engine();
    let name = unique("");
    e.create(&name, None).expect("create sandbox");
    let net = e.info(&name).unwrap().net.expect("sandbox has a network");
    let peer = HostPeer::start(net.host_ip);
    sh(e, &name, "mkfifo /req /keeper.in");
    lab.spawn(&name, COUNTER_SERVER);
    // The keeper holds one connection to the host at a time, numbered by an in-memory counter;
    // when the connection ends (nc reads EOF) it logs that and reconnects.
    lab.spawn(
        &name,
        &format!(
            "c=0; exec 4<>/keeper.in; while :; do c=$((c+1)); echo \"hello $c\" >&4; \
             nc {} {} <&4 >/dev/null 2>&1; echo \"closed $c\" >> /keeper.log; usleep 100000; done",
            net.host_ip, peer.port
        ),
    );
    peer.wait_for(&hello(1), 1, "first connection");
    // One reconnect before the checkpoint: the keeper's counter is 2 at the checkpoint.
    peer.close("hello 1");
    peer.wait_for(&hello(2), 1, "reconnect before the checkpoint");
    for want in 1..=3 {
        assert_eq!(counter(e, &name), want);
    }

    let point = e
        .checkpoint(&name, CheckpointKind::Full, &ChangeHint::Unknown)
        .expect("full checkpoint");
    assert_eq!(
        point.captured,
        CheckpointKind::Full,
        "note: {:?}",
        point.note
    );
    let img = point.process.clone().expect("process image");
    assert_eq!(img.id, point.id);
    let note = point.note.clone().expect("the point says what it closed");
    let conn = format!("{}:", net.sandbox_ip);
    assert!(
        note.starts_with("1 established TCP connection closed by the checkpoint")
            && note.contains(&conn)
            && note.contains(&format!("-> {}:{}", net.host_ip, peer.port)),
        "{note}"
    );
    eprintln!("full checkpoint of a sandbox with a connection: {note}");
    // Live checkpoint: the connection and the counters went on.
    assert!(!peer.events().contains(&closed(2)), "{:?}", peer.events());
    assert_eq!(counter(e, &name), 4);
    peer.close("hello 2");
    peer.wait_for(&hello(3), 1, "reconnect after the checkpoint");

    lab.kill_sandbox(&name);
    peer.wait_for(&closed(3), 1, "the killed sandbox's connection ends");
    let r = e.restore(&name, Some(&point.id)).expect("restore");
    assert_eq!(r.process_image.as_deref(), Some(point.id.as_str()));
    // The restored keeper (counter 2) reads EOF on its restored connection and reconnects as
    // number 3 again: its memory is the checkpoint's.
    peer.wait_for(&hello(3), 2, "reconnect after the restore");
    assert_eq!(
        lab.wait_for(
            &name,
            "cat /keeper.log | tr '\\n' ' '",
            "closed 1 closed 2",
            Duration::from_secs(5)
        ),
        "closed 1 closed 2",
        "the restored connection ended once, in the restored keeper"
    );
    // Requests 1..=3 were served before the checkpoint.
    assert_eq!(counter(e, &name), 4);
    assert_reaches_host(e, &name, "after restoring a sandbox that had a connection");
}

/// Reads the counter a listening server in the sandbox hands out (one line per connection),
/// retrying while the server is between two connections.
fn read_counter(addr: SocketAddr) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut line = String::new();
            BufReader::new(&mut s).read_line(&mut line)?;
            Ok(line)
        })();
        match attempt {
            Ok(line) if !line.trim().is_empty() => {
                return line
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("bad answer {line:?}"));
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "no answer from {addr}: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Proves that the counter server still restores when it serves over a listening TCP socket:
/// the listener is dumped and restored as it was (not closed), the host reaches it over the
/// sandbox's network after the restore, and the count continues from the checkpoint's memory.
/// No connection was open, so the point has no note.
#[test]
fn listening_counter_server_restores() {
    if !process_prerequisites("listening_counter_server_restores") {
        return;
    }
    let lab = Lab::open(4 * GIB);
    let e = lab.engine();
    let name = unique("");
    e.create(&name, None).expect("create sandbox");
    let net = e.info(&name).unwrap().net.expect("sandbox has a network");
    lab.spawn(
        &name,
        "n=0; while :; do n=$((n+1)); echo $n | nc -l -p 8080 >/dev/null; done",
    );
    let addr = SocketAddr::from((net.sandbox_ip, 8080));
    for want in 1..=3 {
        assert_eq!(read_counter(addr), want);
    }
    let listening = |what: &str| {
        assert_eq!(
            lab.wait_for(
                &name,
                "netstat -ltn | grep -c ':8080 '",
                "1",
                Duration::from_secs(5)
            ),
            "1",
            "{what}"
        );
    };
    listening("listening before the checkpoint");
    let point = e
        .checkpoint(&name, CheckpointKind::Full, &ChangeHint::Unknown)
        .expect("full checkpoint");
    assert_eq!(
        point.captured,
        CheckpointKind::Full,
        "note: {:?}",
        point.note
    );
    assert_eq!(point.note, None, "nothing was closed");
    assert_eq!(read_counter(addr), 4);
    assert_eq!(read_counter(addr), 5);
    lab.kill_sandbox(&name);
    e.restore(&name, Some(&point.id)).expect("restore");
    listening("the restored server listens");
    assert_eq!(read_counter(addr), 4, "count continues from the checkpoint");
    assert_eq!(read_counter(addr), 5);
}

/// Proves that sockets no longer degrading does not hide other refusals: a sandbox process
/// holding a host file (outside the sandbox's mounts, handed in like a leaked descriptor) still
/// gets a filesystem-only point whose note carries CRIU's reason, and the sandbox keeps running.
#[test]
fn other_refusals_still_degrade_to_fs_only_with_criu_reason() {
    if !process_prerequisites("other_refusals_still_degrade_to_fs_only_with_criu_reason") {
        return;
    }
    let lab = Lab::open(4 * GIB);
    let e = lab.engine();
    let name = unique("");
    e.create(&name, None).expect("create sandbox");
    sh(e, &name, "mkfifo /req");
    lab.spawn(&name, COUNTER_SERVER);
    assert_eq!(counter(e, &name), 1);
    let host_file = lab.t.state_dir.join("leaked-host-file");
    std::fs::write(&host_file, "host").unwrap();
    let runc = e.runc();
    // fd 3 is handed in with --preserve-fds and inherited by the double-forked child, which
    // the sandbox's init adopts.
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(
            "exec 3<\"$0\"; exec \"$1\" --root \"$2\" exec -d --preserve-fds 1 \"$3\" \
             /bin/sh -c 'sh -c \"exec sleep 1000\" </dev/null >/dev/null 2>&1 &'",
        )
        .arg(&host_file)
        .arg(runc.bin())
        .arg(runc.root())
        .arg(&name)
        .status()
        .unwrap();
    assert!(status.success());
    // Until `runc exec -d`'s outer shell is gone, the refusal may be about that shell (outside
    // the init's tree, or holding the host's `/dev/null` it inherited); wait for the refusal
    // of the leaked file.
    let deadline = Instant::now() + Duration::from_secs(10);
    let point = loop {
        let p = e
            .checkpoint(&name, CheckpointKind::Full, &ChangeHint::Unknown)
            .expect("a refused full checkpoint still publishes");
        if p.note
            .as_deref()
            .is_some_and(|n| n.contains("criu refused") && n.contains("leaked-host-file"))
            || Instant::now() > deadline
        {
            break p;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(point.captured, CheckpointKind::Fs, "note: {:?}", point.note);
    assert!(point.process.is_none());
    let note = point.note.clone().unwrap_or_default();
    assert!(
        note.contains("criu refused the sandbox (UnsupportedFile)")
            && note.contains("leaked-host-file"),
        "{note}"
    );
    assert_eq!(counter(e, &name), 2, "the sandbox kept running");
}

/// Buckets of the TCP established hash of the sandbox's network namespace, as the kernel
/// reports it there (negative: it shares the host's).
fn tcp_table(e: &ckpt_engine::Engine, name: &str) -> i64 {
    let out = sh(e, name, "cat /proc/sys/net/ipv4/tcp_ehash_entries");
    out.trim().parse().unwrap_or_else(|_| panic!("{out:?}"))
}

/// Proves that a sandbox's network namespace has a TCP table of its own (so listing its
/// sockets at a checkpoint does not walk the host's), both as created and as CRIU restores
/// it, without any change to the host's `tcp_child_ehash_entries`; the restored sandbox still
/// reaches the host.
#[test]
fn sandbox_namespaces_get_socket_tables_of_their_own() {
    let test = "sandbox_namespaces_get_socket_tables_of_their_own";
    if !process_prerequisites(test) {
        return;
    }
    let host_setting = || std::fs::read_to_string("/proc/sys/net/ipv4/tcp_child_ehash_entries");
    let before = host_setting().expect("kernel >= 6.1");
    let lab = Lab::open(4 * GIB);
    let e = lab.engine();
    let name = unique("");
    e.create(&name, None).expect("create sandbox");
    let own = i64::from(ckpt_engine::network::SANDBOX_SOCKET_TABLE);
    assert_eq!(tcp_table(e, &name), own, "as created");
    common::keep_busy(e, &name);
    let point = e
        .checkpoint(&name, CheckpointKind::Full, &ChangeHint::Unknown)
        .expect("full checkpoint");
    assert_eq!(point.captured, CheckpointKind::Full);
    lab.kill_sandbox(&name);
    let r = e.restore(&name, Some(&point.id)).expect("restore");
    assert_eq!(r.process_image.as_deref(), Some(point.id.as_str()));
    assert_eq!(tcp_table(e, &name), own, "as restored");
    assert_reaches_host(
        e,
        &name,
        "after restoring a sandbox with a table of its own",
    );
    assert_eq!(
        host_setting().unwrap(),
        before,
        "the host's setting is untouched"
    );
}
