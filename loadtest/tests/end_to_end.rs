//! End to end with the real binaries: the demo through `crab`, a smoke-sized `bench proxy`
//! (direct, crab, nginx, hyper-peer), and the `fake-llm` server CLI.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use common::*;

/// The demo drives three agents through crab and crab reports exactly the script's 5 turns
/// per sandbox (the demo exits non-zero otherwise).
#[test]
fn demo_runs_through_crab() {
    let crab = crab_bin();
    let Some(()) = require(
        "demo_runs_through_crab",
        crab.is_some(),
        "crab binary not built (set CRAB_BIN)",
    ) else {
        return;
    };
    let out = Command::new(loadtest_bin())
        .args(["demo", "--tool-ms", "20", "--time-scale", "0.3", "--crab"])
        .arg(crab.unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    assert!(out.status.success(), "demo failed: {stderr}");
    assert!(stdout.contains("demo ok"), "{stdout}");
    assert_eq!(
        stdout
            .matches("turns seen by crab: 5 (script: 5) ok")
            .count(),
        3,
        "{stdout}"
    );
}

/// A smoke-sized proxy benchmark completes, writes its JSON report, has rows for all paths,
/// no failed requests, and sees paced streams forwarded chunk by chunk through every path.
#[test]
fn bench_proxy_smoke() {
    let crab = crab_bin();
    let Some(()) = require(
        "bench_proxy_smoke",
        crab.is_some(),
        "crab binary not built (set CRAB_BIN)",
    ) else {
        return;
    };
    let nginx = Path::new("/usr/sbin/nginx").is_file();
    let Some(()) = require(
        "bench_proxy_smoke",
        nginx,
        "/usr/sbin/nginx missing (apt install nginx-light)",
    ) else {
        return;
    };
    let out_dir = tempfile::Builder::new()
        .prefix("crab-test-bench-")
        .tempdir()
        .unwrap();
    let out = Command::new(loadtest_bin())
        .args([
            "bench",
            "proxy",
            "--requests",
            "100",
            "--duration",
            "300ms",
            "--rounds",
            "2",
        ])
        .args([
            "--concurrency",
            "1,16",
            "--chunk-delay-ms",
            "10",
            "--paced-chunks",
            "6",
            "--crab",
        ])
        .arg(crab.unwrap())
        .arg("--out")
        .arg(out_dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.path().join("proxy-bench.json")).unwrap())
            .unwrap();
    for section in ["latency", "stream_ttfb", "chunking", "throughput"] {
        let rows = report[section].as_array().unwrap();
        for path in ["direct", "crab", "nginx", "hyper"] {
            assert!(
                rows.iter().any(|r| r["path"] == path),
                "{section} lacks {path}"
            );
        }
        for r in rows {
            assert_eq!(r["errors"], 0, "{section}: {r}");
        }
    }
    for r in report["chunking"].as_array().unwrap() {
        assert_eq!(r["chunk_by_chunk"], true, "{r}");
    }
    let crab_res = report["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["path"] == "crab")
        .unwrap();
    assert!(crab_res["peak_rss_mib"].as_f64().unwrap() > 0.0);
}

/// `loadtest fake-llm` serves real HTTP on the given address until killed.
#[test]
fn fake_llm_cli_serves() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(loadtest_bin())
        .args([
            "fake-llm",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--chunks",
            "3",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let mut line = String::new();
    BufReader::new(child.0.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("text/event-stream"));
    assert!(resp.contains("data: [DONE]"));
    assert_eq!(
        resp.matches("\"content\":").count(),
        4,
        "role chunk + 3 content chunks: {resp}"
    );
}
