//! The event ABI shared with the kernel programs, mirrored from `src/bpf/crab_event.h`.
//!
//! The header is a `#[repr(C)]` struct whose size and field offsets are asserted at compile time
//! (the C side asserts the same numbers with `_Static_assert`). Events are parsed field by field at
//! those offsets from the ring-buffer bytes, so no `unsafe` casts are needed.

use std::mem::{offset_of, size_of};

/// Fixed-size header of every event (`struct crab_event` without `data`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EventHeader {
    pub kind: u32,
    pub sysnr: u32,
    pub tgid: u32,
    pub tid: u32,
    pub slot: u32,
    pub flags: u32,
    pub cgroup_id: u64,
    pub ts_ns: u64,
    pub ret: i64,
    pub arg0: u64,
    pub arg1: u64,
    pub arg2: u64,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u32,
    pub mode: u32,
    pub ppid: u32,
    pub str_len: [u16; 4],
    pub comm: [u8; 16],
    pub pad: u32,
}

/// Size of the header; string data follows it.
pub const HEADER_SIZE: usize = 128;
/// Capacity of the data area in the kernel's event struct.
pub const DATA_MAX: usize = 4096;
/// Number of sandbox slots the per-CPU counters hold.
pub const MAX_SLOTS: u32 = 1024;

const _: () = assert!(size_of::<EventHeader>() == HEADER_SIZE);
const _: () = assert!(offset_of!(EventHeader, cgroup_id) == 24);
const _: () = assert!(offset_of!(EventHeader, ret) == 40);
const _: () = assert!(offset_of!(EventHeader, dev) == 72);
const _: () = assert!(offset_of!(EventHeader, nlink) == 88);
const _: () = assert!(offset_of!(EventHeader, str_len) == 100);
const _: () = assert!(offset_of!(EventHeader, comm) == 108);

pub const EV_SYSCALL: u32 = 1;
pub const EV_FORK: u32 = 2;
pub const EV_EXEC: u32 = 3;
pub const EV_EXIT: u32 = 4;

pub const F_A_TRUNC: u32 = 0x1;
pub const F_B_TRUNC: u32 = 0x2;
pub const F_CREATED: u32 = 0x4;
pub const F_A_ABSOLUTE: u32 = 0x8;
pub const F_B_ABSOLUTE: u32 = 0x10;

/// ioctl commands that change files (same as `crab_event.h`).
pub const FICLONE: u64 = 0x40049409;
pub const FICLONERANGE: u64 = 0x4020940d;

/// x86_64 syscall numbers hooked by the kernel side (same list as `crab_event.h`).
pub mod nr {
    pub const WRITE: u32 = 1;
    pub const OPEN: u32 = 2;
    pub const MMAP: u32 = 9;
    pub const IOCTL: u32 = 16;
    pub const PWRITE64: u32 = 18;
    pub const WRITEV: u32 = 20;
    pub const SENDFILE: u32 = 40;
    pub const CONNECT: u32 = 42;
    pub const ACCEPT: u32 = 43;
    pub const BIND: u32 = 49;
    pub const LISTEN: u32 = 50;
    pub const TRUNCATE: u32 = 76;
    pub const FTRUNCATE: u32 = 77;
    pub const RENAME: u32 = 82;
    pub const MKDIR: u32 = 83;
    pub const RMDIR: u32 = 84;
    pub const CREAT: u32 = 85;
    pub const LINK: u32 = 86;
    pub const UNLINK: u32 = 87;
    pub const SYMLINK: u32 = 88;
    pub const CHMOD: u32 = 90;
    pub const FCHMOD: u32 = 91;
    pub const CHOWN: u32 = 92;
    pub const FCHOWN: u32 = 93;
    pub const LCHOWN: u32 = 94;
    pub const PTRACE: u32 = 101;
    pub const UTIME: u32 = 132;
    pub const MKNOD: u32 = 133;
    pub const SETXATTR: u32 = 188;
    pub const LSETXATTR: u32 = 189;
    pub const FSETXATTR: u32 = 190;
    pub const REMOVEXATTR: u32 = 197;
    pub const LREMOVEXATTR: u32 = 198;
    pub const FREMOVEXATTR: u32 = 199;
    pub const UTIMES: u32 = 235;
    pub const OPENAT: u32 = 257;
    pub const MKDIRAT: u32 = 258;
    pub const MKNODAT: u32 = 259;
    pub const FCHOWNAT: u32 = 260;
    pub const FUTIMESAT: u32 = 261;
    pub const UNLINKAT: u32 = 263;
    pub const RENAMEAT: u32 = 264;
    pub const LINKAT: u32 = 265;
    pub const SYMLINKAT: u32 = 266;
    pub const FCHMODAT: u32 = 268;
    pub const SPLICE: u32 = 275;
    pub const UTIMENSAT: u32 = 280;
    pub const FALLOCATE: u32 = 285;
    pub const ACCEPT4: u32 = 288;
    pub const PWRITEV: u32 = 296;
    pub const OPEN_BY_HANDLE_AT: u32 = 304;
    pub const PROCESS_VM_WRITEV: u32 = 311;
    pub const RENAMEAT2: u32 = 316;
    pub const COPY_FILE_RANGE: u32 = 326;
    pub const PWRITEV2: u32 = 328;
    pub const IO_URING_SETUP: u32 = 425;
    pub const IO_URING_ENTER: u32 = 426;
    pub const IO_URING_REGISTER: u32 = 427;
    pub const OPENAT2: u32 = 437;
    pub const FCHMODAT2: u32 = 452;
    pub const SETXATTRAT: u32 = 463;
    pub const REMOVEXATTRAT: u32 = 466;
}

/// A parsed event: the header and its (up to four) strings.
#[derive(Debug, Clone, Default)]
pub struct RawEvent {
    pub header: EventHeader,
    /// Dentry components (child first) of path A's object or base directory.
    pub a_components: Vec<String>,
    /// Path A's raw user string.
    pub a_raw: String,
    pub b_components: Vec<String>,
    pub b_raw: String,
}

/// Why an event could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AbiError {
    /// event of {len} bytes is shorter than its header
    #[error("event of {len} bytes is shorter than its header")]
    Short { len: usize },
    /// event strings ({needed} bytes) overrun the event ({len} bytes)
    #[error("event strings ({needed} bytes) overrun the event ({len} bytes)")]
    Overrun { needed: usize, len: usize },
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_ne_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

fn split_components(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|&c| c == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&c| c == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl RawEvent {
    /// Parses one ring-buffer record.
    pub fn parse(b: &[u8]) -> Result<Self, AbiError> {
        if b.len() < HEADER_SIZE {
            return Err(AbiError::Short { len: b.len() });
        }
        macro_rules! f32 {
            ($f:ident) => {
                u32_at(b, offset_of!(EventHeader, $f))
            };
        }
        macro_rules! f64 {
            ($f:ident) => {
                u64_at(b, offset_of!(EventHeader, $f))
            };
        }
        let so = offset_of!(EventHeader, str_len);
        let str_len = [
            u16_at(b, so),
            u16_at(b, so + 2),
            u16_at(b, so + 4),
            u16_at(b, so + 6),
        ];
        let co = offset_of!(EventHeader, comm);
        let mut comm = [0u8; 16];
        comm.copy_from_slice(&b[co..co + 16]);
        let header = EventHeader {
            kind: f32!(kind),
            sysnr: f32!(sysnr),
            tgid: f32!(tgid),
            tid: f32!(tid),
            slot: f32!(slot),
            flags: f32!(flags),
            cgroup_id: f64!(cgroup_id),
            ts_ns: f64!(ts_ns),
            ret: f64!(ret) as i64,
            arg0: f64!(arg0),
            arg1: f64!(arg1),
            arg2: f64!(arg2),
            dev: f64!(dev),
            ino: f64!(ino),
            nlink: f32!(nlink),
            mode: f32!(mode),
            ppid: f32!(ppid),
            str_len,
            comm,
            pad: 0,
        };
        let needed = HEADER_SIZE + str_len.iter().map(|&l| l as usize).sum::<usize>();
        if needed > b.len() {
            return Err(AbiError::Overrun {
                needed,
                len: b.len(),
            });
        }
        let mut o = HEADER_SIZE;
        let mut take = |l: u16| {
            let s = &b[o..o + l as usize];
            o += l as usize;
            s
        };
        let a_c = take(str_len[0]);
        let a_r = take(str_len[1]);
        let b_c = take(str_len[2]);
        let b_r = take(str_len[3]);
        Ok(Self {
            header,
            a_components: split_components(a_c),
            a_raw: c_string(a_r),
            b_components: split_components(b_c),
            b_raw: c_string(b_r),
        })
    }

    /// The process name (`comm`) of the calling task.
    pub fn comm(&self) -> String {
        c_string(&self.header.comm)
    }
}

/// Converts a kernel `dev_t` (major << 20 | minor) to the user-space encoding `stat` reports.
pub fn kernel_dev_to_user(dev: u64) -> u64 {
    let major = (dev >> 20) as u32;
    let minor = (dev & 0xfffff) as u32;
    libc::makedev(major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(strings: [&[u8]; 4]) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&EV_SYSCALL.to_ne_bytes());
        b[4..8].copy_from_slice(&nr::RENAME.to_ne_bytes());
        for (i, s) in strings.iter().enumerate() {
            b[100 + 2 * i..102 + 2 * i].copy_from_slice(&(s.len() as u16).to_ne_bytes());
        }
        b[108..112].copy_from_slice(b"mv\0\0");
        for s in strings {
            b.extend_from_slice(s);
        }
        b
    }

    /// Strings are split at their declared lengths and components at NULs.
    #[test]
    fn parses_strings() {
        let b = event([b"x\0tmp\0", b"a\0", b"", b"/abs/b\0"]);
        let e = RawEvent::parse(&b).unwrap();
        assert_eq!(e.header.sysnr, nr::RENAME);
        assert_eq!(e.a_components, vec!["x", "tmp"]);
        assert_eq!(e.a_raw, "a");
        assert!(e.b_components.is_empty());
        assert_eq!(e.b_raw, "/abs/b");
        assert_eq!(e.comm(), "mv");
    }

    /// A record whose lengths overrun its size is rejected, not read out of bounds.
    #[test]
    fn rejects_overrun() {
        let mut b = event([b"x\0", b"", b"", b""]);
        b.truncate(HEADER_SIZE + 1);
        assert!(matches!(RawEvent::parse(&b), Err(AbiError::Overrun { .. })));
        assert!(matches!(
            RawEvent::parse(&b[..10]),
            Err(AbiError::Short { len: 10 })
        ));
    }

    #[test]
    fn dev_conversion() {
        let user = kernel_dev_to_user((8 << 20) | 1);
        assert_eq!(libc::major(user), 8);
        assert_eq!(libc::minor(user), 1);
    }
}
