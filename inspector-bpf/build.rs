//! Compiles the C eBPF programs under `src/bpf/` with clang (CO-RE) against a `vmlinux.h`
//! generated from the running kernel's BTF: `inspector.bpf.c` (file/process tracepoints) into
//! `$OUT_DIR/inspector.bpf.o` and `attribution.bpf.c` (the socket-attribution `sockops` hook)
//! into `$OUT_DIR/attribution.bpf.o`. Two objects so that one failing to load or attach at run
//! time leaves the other working.
//!
//! Clang: `$CRAB_CLANG`, else `clang-19`, else `clang`. `vmlinux.h`: `$CRAB_VMLINUX_H` if set,
//! else `bpftool btf dump file /sys/kernel/btf/vmlinux format c`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn find_clang() -> String {
    if let Ok(c) = env::var("CRAB_CLANG") {
        return c;
    }
    for candidate in ["clang-19", "clang"] {
        if Command::new(candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return candidate.to_string();
        }
    }
    panic!(
        "inspector-bpf: no clang found to compile the eBPF programs; install the apt packages \
         `clang-19 libbpf-dev bpftool` (or set CRAB_CLANG to a clang with the BPF target)"
    );
}

fn vmlinux_h(out: &Path) -> PathBuf {
    let target = out.join("vmlinux.h");
    if let Ok(given) = env::var("CRAB_VMLINUX_H") {
        std::fs::copy(&given, &target).unwrap_or_else(|e| panic!("copy {given}: {e}"));
        return target;
    }
    let output = Command::new("bpftool")
        .args([
            "btf",
            "dump",
            "file",
            "/sys/kernel/btf/vmlinux",
            "format",
            "c",
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!("inspector-bpf: running bpftool failed ({e}); install the apt package `bpftool`")
        });
    if !output.status.success() || output.stdout.is_empty() {
        panic!(
            "inspector-bpf: `bpftool btf dump file /sys/kernel/btf/vmlinux format c` failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    std::fs::write(&target, &output.stdout).expect("write vmlinux.h");
    target
}

/// The eBPF objects: `src/bpf/<name>.bpf.c` → `$OUT_DIR/<name>.bpf.o`.
const OBJECTS: [&str; 2] = ["inspector", "attribution"];

fn compile(clang: &str, out: &Path, name: &str) {
    let src = PathBuf::from(format!("src/bpf/{name}.bpf.c"));
    let obj = out.join(format!("{name}.bpf.o"));
    let status = Command::new(clang)
        .args([
            "-target",
            "bpf",
            "-mcpu=v3",
            "-g",
            "-O2",
            "-D__TARGET_ARCH_x86",
            "-Wall",
            "-Wno-unused-function",
        ])
        .arg("-I")
        .arg(out)
        .arg("-I")
        .arg("src/bpf")
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .status()
        .unwrap_or_else(|e| panic!("inspector-bpf: running {clang} failed: {e}"));
    if !status.success() {
        panic!(
            "inspector-bpf: {clang} failed to compile {}; needs the apt packages `clang-19 libbpf-dev`",
            src.display()
        );
    }
}

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    for name in OBJECTS {
        println!("cargo:rerun-if-changed=src/bpf/{name}.bpf.c");
    }
    println!("cargo:rerun-if-changed=src/bpf/crab_event.h");
    println!("cargo:rerun-if-env-changed=CRAB_CLANG");
    println!("cargo:rerun-if-env-changed=CRAB_VMLINUX_H");
    let clang = find_clang();
    let _ = vmlinux_h(&out);
    for name in OBJECTS {
        compile(&clang, &out, name);
    }
}
