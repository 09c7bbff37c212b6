//! Child processes the harness drives (the real `crab` binary, nginx, `hyper-peer`) and their
//! /proc stats.
//!
//! Every child is owned by a guard that terminates it (SIGTERM, then SIGKILL) on drop, so an
//! early error or a panic never leaves a daemon behind.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use nix::{sys::signal::Signal, unistd::Pid};

/// A free 127.0.0.1 port (bound then released; the small race is acceptable on a test host).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Raises the soft open-file limit to the hard one (1000 concurrent streams need ~4000 fds).
pub fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Where the `crab` binary is: `--crab`, else `$CRAB_BIN`, else `crab` next to this binary
/// (e.g. `target/release/crab`), else `target/release/crab` under the current directory.
pub fn find_crab(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("CRAB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join("crab"));
        // `target/debug/loadtest` → also try `target/release/crab`.
        if let Some(target) = dir.parent() {
            candidates.push(target.join("release/crab"));
        }
    }
    candidates.push(PathBuf::from("target/release/crab"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "crab binary not found (tried {candidates:?}); pass --crab PATH or set CRAB_BIN"
            )
        })
}

/// A child process killed on drop, and on an interrupt of the harness ([`crate::interrupt`]).
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    on_interrupt: crate::interrupt::Cleanup,
}

impl ChildGuard {
    pub fn new(name: &str, child: Child) -> ChildGuard {
        ChildGuard {
            name: name.to_string(),
            on_interrupt: end_on_interrupt(name, child.id()),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// `Some(status)` if the child already exited.
    pub fn try_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status if it exited.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let _doing = self.on_interrupt.disarm();
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(name = %self.name, "did not exit after SIGTERM; killing");
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

pub use ckpt_engine::process::proctree::start_time;
use ckpt_engine::process::proctree::still_alive;

/// Registers the end of process `pid` (named `name`; [`terminate`], 3 s of grace) for an
/// interrupt of the harness.
pub fn end_on_interrupt(name: &str, pid: u32) -> crate::interrupt::Cleanup {
    let start = start_time(pid);
    crate::interrupt::on_interrupt(format!("{name} (pid {pid})"), move || {
        // Gone already at registration: nothing to end.
        if let Some(start) = start {
            terminate(pid, start, Duration::from_secs(3));
        }
    })
}

/// Ends process `pid` if it is still the one started at `start`: SIGTERM, up to `grace` to
/// exit, then SIGKILL. For processes this one does not wait for (an interrupt's clean-up, a
/// helper left by a killed run).
pub fn terminate(pid: u32, start: u64, grace: Duration) {
    let alive = || still_alive(pid, start);
    if !alive() {
        return;
    }
    let target = Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(target, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive() {
        let _ = nix::sys::signal::kill(target, Signal::SIGKILL);
    }
}

/// Last `n` lines of a log file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running `crab serve`.
pub struct CrabProcess {
    pub guard: ChildGuard,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
    pub binary: PathBuf,
}

impl CrabProcess {
    /// Spawns `crab serve` in front of `upstream` with its state in `state_dir`, and waits until
    /// `GET /healthz` on the admin listener answers 200.
    pub async fn spawn(
        binary: &Path,
        upstream: &str,
        state_dir: &Path,
    ) -> anyhow::Result<CrabProcess> {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        fs::create_dir_all(state_dir)?;
        let log = state_dir.join("crab.log");
        let logf = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(binary)
            .args([
                "serve",
                "--listen",
                &listen.to_string(),
                "--upstream",
                upstream,
            ])
            .args(["--admin", &admin.to_string(), "--state-dir"])
            .arg(state_dir)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        let mut guard = ChildGuard::new("crab", child);
        let url = format!("http://{admin}/healthz");
        let client = crate::client::new_client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = guard.try_exited() {
                bail!(
                    "crab exited during startup ({status}); log {}:\n{}",
                    log.display(),
                    tail(&log, 20)
                );
            }
            let probe =
                tokio::time::timeout(Duration::from_secs(1), crate::client::get(&client, &url))
                    .await;
            if matches!(probe, Ok(Ok(ref r)) if r.status == 200) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "crab did not become healthy at {url} within 20 s; log:\n{}",
                    tail(&log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(CrabProcess {
            guard,
            listen,
            admin,
            log,
            binary: binary.to_path_buf(),
        })
    }

    /// `http://127.0.0.1:P`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.listen)
    }
}

/// A peer proxy of the proxy benchmark, listening on `listen`: nginx, or `hyper-peer` (crab's
/// HTTP stack without crab's work).
pub struct PeerProcess {
    pub name: &'static str,
    pub guard: ChildGuard,
    pub listen: SocketAddr,
}

/// nginx's binary (Debian's nginx-light).
pub const NGINX_BIN: &str = "/usr/sbin/nginx";

impl PeerProcess {
    /// Writes `dir/nginx.conf` proxying to `upstream` (host:port) and starts nginx in the
    /// foreground as our child; waits until it accepts connections.
    pub async fn nginx(upstream: SocketAddr, dir: &Path) -> anyhow::Result<PeerProcess> {
        if !Path::new(NGINX_BIN).is_file() {
            bail!("{NGINX_BIN} not found: install the Debian package nginx-light");
        }
        fs::create_dir_all(dir.join("logs"))?;
        let port = free_port()?;
        let listen: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let d = dir.display();
        let conf = format!(
            r#"# Plain streaming reverse proxy for `loadtest bench proxy` (generated).
worker_processes auto;
worker_rlimit_nofile 16384;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy_temp;
    fastcgi_temp_path {d}/fastcgi_temp;
    uwsgi_temp_path {d}/uwsgi_temp;
    scgi_temp_path {d}/scgi_temp;
    client_max_body_size 64m;
    keepalive_requests 1000000;
    upstream fake_llm {{
        server {upstream};
        keepalive 1024;
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen} backlog=4096;
        location / {{
            proxy_pass http://fake_llm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"#
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf)?;
        let mut cmd = Command::new(NGINX_BIN);
        cmd.arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"]);
        Self::start(
            "nginx",
            cmd,
            listen,
            &dir.join("logs/stderr.log"),
            &[dir.join("logs/error.log")],
        )
        .await
    }

    /// Starts `hyper-peer` (built next to this binary) in front of `upstream` (a base URL).
    pub async fn hyper(upstream: &str, dir: &Path) -> anyhow::Result<PeerProcess> {
        let bin = std::env::current_exe()?.with_file_name("hyper-peer");
        if !bin.is_file() {
            bail!(
                "{} not found: build it with `cargo build --release -p loadtest`",
                bin.display()
            );
        }
        fs::create_dir_all(dir)?;
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut cmd = Command::new(bin);
        cmd.arg("--listen")
            .arg(listen.to_string())
            .arg("--upstream")
            .arg(upstream);
        Self::start("hyper-peer", cmd, listen, &dir.join("stderr.log"), &[]).await
    }

    /// Spawns `cmd` (output to `log`) and waits until it accepts connections on `listen`.
    async fn start(
        name: &'static str,
        mut cmd: Command,
        listen: SocketAddr,
        log: &Path,
        more_logs: &[PathBuf],
    ) -> anyhow::Result<PeerProcess> {
        let logf = fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        let mut guard = ChildGuard::new(name, child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(listen).await.is_err() {
            if let Some(status) = guard.try_exited() {
                let more: Vec<String> = more_logs.iter().map(|l| tail(l, 20)).collect();
                bail!(
                    "{name} exited ({status}):\n{}\n{}",
                    tail(log, 20),
                    more.join("\n")
                );
            }
            if Instant::now() > deadline {
                bail!("{name} did not listen on {listen} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        Ok(PeerProcess {
            name,
            guard,
            listen,
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.listen)
    }
}

/// CPU time and peak memory of a process (and optionally its live children).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcStats {
    /// utime + stime (+ cutime + cstime), seconds.
    pub cpu_seconds: f64,
    /// The kernel's part of it: stime (+ cstime), seconds.
    pub sys_seconds: f64,
    /// VmHWM summed over the process and its children, bytes.
    pub peak_rss_bytes: u64,
}

/// Reads `/proc/PID/stat` and `/proc/PID/status`; with `children`, adds every live process
/// whose parent is `pid` (nginx workers) — their CPU is not in the master's cutime until
/// they exit.
pub fn proc_stats(pid: u32, children: bool) -> ProcStats {
    let mut pids = vec![pid];
    if children {
        let entries = fs::read_dir("/proc").into_iter().flatten().flatten();
        pids.extend(
            entries
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
                .filter(|p| stat_fields(*p).is_some_and(|f| f.ppid == pid)),
        );
    }
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let mut s = ProcStats::default();
    for p in pids {
        if let Some(f) = stat_fields(p) {
            s.cpu_seconds += (f.utime + f.stime + f.cutime + f.cstime) as f64 / tick;
            s.sys_seconds += (f.stime + f.cstime) as f64 / tick;
        }
        s.peak_rss_bytes += vm_hwm(p).unwrap_or(0);
    }
    s
}

struct StatFields {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

fn stat_fields(pid: u32) -> Option<StatFields> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses `/proc/PID/stat` (pure). The command name may contain spaces and parentheses, so
/// fields are counted after the last `)`: state is field 3, ppid 4, utime 14 .. cstime 17.
fn parse_stat(text: &str) -> Option<StatFields> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i - 3).and_then(|s| s.parse::<u64>().ok());
    Some(StatFields {
        ppid: n(4)? as u32,
        utime: n(14)?,
        stime: n(15)?,
        cutime: n(16)?,
        cstime: n(17)?,
    })
}

fn vm_hwm(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fields are counted after the last ')' so odd command names do not shift them.
    #[test]
    fn parses_stat_with_odd_comm() {
        let line =
            "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0 100 1000 10";
        let f = parse_stat(line).unwrap();
        assert_eq!(f.ppid, 1);
        assert_eq!((f.utime, f.stime, f.cutime, f.cstime), (250, 50, 7, 3));
    }

    /// Our own process has CPU time and a peak RSS.
    #[test]
    fn reads_own_stats() {
        let s = proc_stats(std::process::id(), false);
        assert!(s.peak_rss_bytes > 0);
        assert!(s.cpu_seconds >= 0.0);
    }
}
