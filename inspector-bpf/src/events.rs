//! Pure translation of kernel events into tracker operations and notes.

use crate::abi::{self, RawEvent, nr};
use crate::fs_tracker::FsOp;
use crate::paths::{self, IgnoredPrefixes};

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const AT_EMPTY_PATH: u64 = 0x1000;
const AT_REMOVEDIR: u64 = 0x200;
const RENAME_NOREPLACE: u64 = 1;
const RENAME_EXCHANGE: u64 = 2;
const LINKAT_SYMLINK_FOLLOW: u64 = 0x400;

/// What one event means for the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A file-system operation (paths relative to the sandbox root).
    Fs(FsOp),
    /// File content identified by (user-space dev, ino) was written (mmap invalidation input).
    Written {
        dev: u64,
        ino: u64,
    },
    /// A writable shared mapping of a file: later writes need no syscalls.
    SharedWritableMap {
        dev: u64,
        ino: u64,
        path: String,
    },
    /// The dirty set may be incomplete, with the reason.
    Incomplete(String),
    /// io_uring use: writes may bypass the traced syscalls.
    IoUring(String),
    /// Another process's memory was written (ptrace poke, process_vm_writev).
    ProcessMemoryWrite {
        target: u32,
        reason: String,
    },
    /// A socket started listening.
    Listen(String),
    Fork {
        parent: u32,
        child: u32,
    },
    Exec {
        tgid: u32,
        filename: String,
    },
    Exit {
        tgid: u32,
    },
}

fn name(nr: u32) -> &'static str {
    match nr {
        nr::WRITE => "write",
        nr::OPEN => "open",
        nr::OPENAT => "openat",
        nr::OPENAT2 => "openat2",
        nr::CREAT => "creat",
        nr::TRUNCATE => "truncate",
        nr::UNLINK => "unlink",
        nr::UNLINKAT => "unlinkat",
        nr::RENAME => "rename",
        nr::RENAMEAT => "renameat",
        nr::RENAMEAT2 => "renameat2",
        nr::LINK => "link",
        nr::LINKAT => "linkat",
        nr::MKDIR => "mkdir",
        nr::MKDIRAT => "mkdirat",
        nr::RMDIR => "rmdir",
        nr::MMAP => "mmap",
        _ => "syscall",
    }
}

/// Translates one event; `prefixes` drop paths that never count.
pub fn translate(ev: &RawEvent, prefixes: &IgnoredPrefixes) -> Vec<Effect> {
    let h = &ev.header;
    let mut out = Vec::new();
    match h.kind {
        abi::EV_FORK => out.push(Effect::Fork {
            parent: h.tgid,
            child: h.ret as u32,
        }),
        abi::EV_EXEC => out.push(Effect::Exec {
            tgid: h.tgid,
            filename: ev.a_raw.clone(),
        }),
        abi::EV_EXIT => out.push(Effect::Exit { tgid: h.tgid }),
        abi::EV_SYSCALL => syscall(ev, prefixes, &mut out),
        _ => out.push(Effect::Incomplete(format!("unknown event kind {}", h.kind))),
    }
    out
}

/// The path of A or B as (absolute path, truncated).
fn path_a(ev: &RawEvent) -> String {
    paths::assemble(&ev.a_components, &ev.a_raw)
}
fn path_b(ev: &RawEvent) -> String {
    paths::assemble(&ev.b_components, &ev.b_raw)
}

fn syscall(ev: &RawEvent, prefixes: &IgnoredPrefixes, out: &mut Vec<Effect>) {
    let h = &ev.header;
    let who = format!("pid {} ({})", h.tgid, ev.comm());
    let a_trunc = h.flags & abi::F_A_TRUNC != 0;
    let b_trunc = h.flags & abi::F_B_TRUNC != 0;
    let a = path_a(ev);
    let keep = |p: &str| !prefixes.is_ignored(p);
    let rel = paths::relative;
    match h.sysnr {
        nr::OPEN
        | nr::OPENAT
        | nr::OPENAT2
        | nr::CREAT
        | nr::OPEN_BY_HANDLE_AT
        | nr::WRITE
        | nr::PWRITE64
        | nr::WRITEV
        | nr::PWRITEV
        | nr::PWRITEV2
        | nr::SENDFILE
        | nr::COPY_FILE_RANGE
        | nr::SPLICE
        | nr::FALLOCATE
        | nr::FTRUNCATE
        | nr::FCHMOD
        | nr::FCHOWN
        | nr::FSETXATTR
        | nr::FREMOVEXATTR
        | nr::MMAP
        | nr::IOCTL
        | nr::UTIMENSAT
            if ev.a_raw.is_empty() =>
        {
            let dev = abi::kernel_dev_to_user(h.dev);
            let is_meta = matches!(
                h.sysnr,
                nr::FCHMOD | nr::FCHOWN | nr::FSETXATTR | nr::FREMOVEXATTR | nr::UTIMENSAT
            ) || (h.sysnr == nr::IOCTL
                && h.arg1 != abi::FICLONE
                && h.arg1 != abi::FICLONERANGE);
            if !is_meta && h.sysnr != nr::MMAP {
                out.push(Effect::Written { dev, ino: h.ino });
            }
            if h.nlink == 0 {
                // An unlinked or O_TMPFILE inode: no name, so no persistent file effect (yet).
                return;
            }
            if !keep(&a) {
                return;
            }
            if a_trunc {
                out.push(Effect::Incomplete(format!(
                    "{who}: path of {} not captured completely",
                    name(h.sysnr)
                )));
                return;
            }
            let path = rel(&a);
            let created = h.flags & abi::F_CREATED != 0;
            if h.sysnr == nr::MMAP {
                out.push(Effect::SharedWritableMap {
                    dev,
                    ino: h.ino,
                    path: path.clone(),
                });
                out.push(Effect::Fs(FsOp::Write { path }));
            } else if created {
                out.push(Effect::Fs(FsOp::Create { path }));
            } else if is_meta {
                out.push(Effect::Fs(FsOp::Meta { path }));
            } else {
                if h.nlink > 1 && h.mode & S_IFMT == S_IFREG {
                    out.push(Effect::Incomplete(format!(
                        "{who}: wrote {path}, which has {} hard links",
                        h.nlink
                    )));
                }
                out.push(Effect::Fs(FsOp::Write { path }));
            }
        }
        nr::IO_URING_SETUP | nr::IO_URING_ENTER | nr::IO_URING_REGISTER => {
            out.push(Effect::IoUring(format!(
                "{who}: {} (io_uring may write files without traced syscalls)",
                match h.sysnr {
                    nr::IO_URING_SETUP => "io_uring_setup",
                    nr::IO_URING_ENTER => "io_uring_enter",
                    _ => "io_uring_register",
                }
            )));
        }
        nr::PTRACE | nr::PROCESS_VM_WRITEV => {
            out.push(Effect::ProcessMemoryWrite {
                target: h.arg1 as u32,
                reason: format!("{who} wrote the memory of pid {}", h.arg1 as u32),
            });
        }
        nr::LISTEN => out.push(Effect::Listen(format!(
            "{who} listens on fd {}",
            h.arg0 as i32
        ))),
        nr::BIND => {
            let family = (h.arg1 & 0xffff) as u16;
            if family == libc::AF_INET as u16 || family == libc::AF_INET6 as u16 {
                let port = u16::from_be(((h.arg1 >> 16) & 0xffff) as u16);
                out.push(Effect::Listen(format!("{who} bound port {port}")));
            }
        }
        nr::CONNECT | nr::ACCEPT | nr::ACCEPT4 => {}
        nr::RENAME | nr::RENAMEAT | nr::RENAMEAT2 => {
            let b = path_b(ev);
            if a_trunc || b_trunc {
                out.push(Effect::Incomplete(format!(
                    "{who}: rename paths not captured completely"
                )));
                return;
            }
            match (keep(&a), keep(&b)) {
                (true, true) => out.push(Effect::Fs(FsOp::Rename {
                    from: rel(&a),
                    to: rel(&b),
                    noreplace: h.arg0 & RENAME_NOREPLACE != 0,
                    exchange: h.arg0 & RENAME_EXCHANGE != 0,
                })),
                (true, false) => out.push(Effect::Fs(FsOp::Remove { path: rel(&a) })),
                (false, true) => {
                    out.push(Effect::Fs(FsOp::Write { path: rel(&b) }));
                }
                (false, false) => {}
            }
        }
        nr::LINK | nr::LINKAT => {
            let b = path_b(ev);
            if b_trunc || (a_trunc && !ev.a_raw.is_empty()) {
                out.push(Effect::Incomplete(format!(
                    "{who}: link paths not captured completely"
                )));
                return;
            }
            if !keep(&b) {
                return;
            }
            // linkat(fd, "", ..., AT_EMPTY_PATH) or a /proc/self/fd link materialises an
            // anonymous (O_TMPFILE) inode: a new file, not a second name of a tracked one.
            let anonymous = (h.arg0 & AT_EMPTY_PATH != 0 && ev.a_raw.is_empty())
                || (h.arg0 & LINKAT_SYMLINK_FOLLOW != 0 && a.starts_with("/proc/"));
            let from = if anonymous || !keep(&a) {
                None
            } else {
                Some(rel(&a))
            };
            out.push(Effect::Fs(FsOp::Link { from, to: rel(&b) }));
        }
        _ => {
            // Path-based single-path calls.
            if a_trunc {
                out.push(Effect::Incomplete(format!(
                    "{who}: path of syscall {} not captured completely",
                    h.sysnr
                )));
                return;
            }
            if !keep(&a) {
                return;
            }
            let path = rel(&a);
            let op = match h.sysnr {
                nr::TRUNCATE => FsOp::Write { path },
                nr::UNLINK | nr::RMDIR => FsOp::Remove { path },
                nr::UNLINKAT => {
                    let _ = h.arg0 & AT_REMOVEDIR;
                    FsOp::Remove { path }
                }
                nr::MKDIR | nr::MKDIRAT | nr::MKNOD | nr::MKNODAT | nr::SYMLINK | nr::SYMLINKAT => {
                    FsOp::Create { path }
                }
                nr::CHMOD
                | nr::FCHMODAT
                | nr::FCHMODAT2
                | nr::CHOWN
                | nr::LCHOWN
                | nr::FCHOWNAT
                | nr::SETXATTR
                | nr::LSETXATTR
                | nr::REMOVEXATTR
                | nr::LREMOVEXATTR
                | nr::SETXATTRAT
                | nr::REMOVEXATTRAT
                | nr::UTIME
                | nr::UTIMES
                | nr::FUTIMESAT
                | nr::UTIMENSAT => FsOp::Meta { path },
                other => {
                    out.push(Effect::Incomplete(format!(
                        "{who}: unexpected syscall {other}"
                    )));
                    return;
                }
            };
            out.push(Effect::Fs(op));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::EventHeader;

    fn ev(sysnr: u32, a_comp: &[&str], a_raw: &str, b_comp: &[&str], b_raw: &str) -> RawEvent {
        RawEvent {
            header: EventHeader {
                kind: abi::EV_SYSCALL,
                sysnr,
                tgid: 5,
                nlink: 1,
                mode: S_IFREG,
                ..Default::default()
            },
            a_components: a_comp.iter().map(|s| s.to_string()).collect(),
            a_raw: a_raw.into(),
            b_components: b_comp.iter().map(|s| s.to_string()).collect(),
            b_raw: b_raw.into(),
        }
    }

    fn fs(v: Vec<Effect>) -> Vec<FsOp> {
        v.into_iter()
            .filter_map(|e| {
                if let Effect::Fs(op) = e {
                    Some(op)
                } else {
                    None
                }
            })
            .collect()
    }

    /// Relative paths resolve against the captured cwd/dirfd; /proc and /dev never count.
    #[test]
    fn path_calls() {
        let p = IgnoredPrefixes::default();
        assert_eq!(
            fs(translate(&ev(nr::MKDIR, &["w", "tmp"], "a/b", &[], ""), &p)),
            vec![FsOp::Create {
                path: "tmp/w/a/b".into()
            }]
        );
        assert_eq!(
            fs(translate(&ev(nr::UNLINKAT, &[], "/etc/x", &[], ""), &p)),
            vec![FsOp::Remove {
                path: "etc/x".into()
            }]
        );
        assert!(fs(translate(&ev(nr::UNLINK, &[], "/dev/shm/x", &[], ""), &p)).is_empty());
        assert_eq!(
            fs(translate(&ev(nr::RENAME, &["w"], "a", &["w"], "b"), &p)),
            vec![FsOp::Rename {
                from: "w/a".into(),
                to: "w/b".into(),
                noreplace: false,
                exchange: false
            }]
        );
    }

    /// fd writes: regular named files count; unlinked inodes only feed mmap invalidation.
    #[test]
    fn fd_calls() {
        let p = IgnoredPrefixes::default();
        let mut e = ev(nr::WRITE, &["f", "w"], "", &[], "");
        assert_eq!(
            fs(translate(&e, &p)),
            vec![FsOp::Write { path: "w/f".into() }]
        );
        e.header.nlink = 0;
        let effects = translate(&e, &p);
        assert!(fs(effects.clone()).is_empty());
        assert!(effects.iter().any(|x| matches!(x, Effect::Written { .. })));
        let mut o = ev(nr::OPENAT, &["n", "w"], "", &[], "");
        o.header.flags = abi::F_CREATED;
        assert_eq!(
            fs(translate(&o, &p)),
            vec![FsOp::Create { path: "w/n".into() }]
        );
        let mut t = ev(nr::WRITE, &["f"], "", &[], "");
        t.header.flags = abi::F_A_TRUNC;
        assert!(matches!(translate(&t, &p)[1], Effect::Incomplete(_)));
    }

    /// O_TMPFILE + linkat(AT_EMPTY_PATH) is a creation without a source name.
    #[test]
    fn tmpfile_link() {
        let p = IgnoredPrefixes::default();
        let mut e = ev(nr::LINKAT, &["w"], "", &["w"], "final");
        e.header.arg0 = AT_EMPTY_PATH;
        assert_eq!(
            fs(translate(&e, &p)),
            vec![FsOp::Link {
                from: None,
                to: "w/final".into()
            }]
        );
    }
}
