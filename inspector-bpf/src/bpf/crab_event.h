/* The kernel → user space event ABI of the Crab inspector, defined once.
 *
 * Mirrored by `inspector-bpf/src/abi.rs` (`#[repr(C)] EventHeader`); both sides assert the size and
 * the offsets, so a change here that is not made there fails the build.
 *
 * An event is a fixed 128-byte header followed by `data`: up to four strings, back to back, whose
 * lengths are in `str_len`:
 *   str 0: path A as dentry components, child first, each NUL-terminated (the object of an fd
 *          operation, or the base directory — dirfd or cwd — of a relative path argument);
 *   str 1: path A as the raw user string (NUL-terminated), empty for fd operations;
 *   str 2, str 3: the same for path B (the new name of rename/link/symlink).
 * Component walks stop at the calling process's root directory, so paths are relative to the
 * sandbox root as the sandbox sees it.
 */
#ifndef CRAB_EVENT_H
#define CRAB_EVENT_H

#define CRAB_DATA_MAX 4096
/* Strings start below this offset; masking the start with it keeps every write in bounds. */
#define CRAB_DATA_WINDOW 2048
#define CRAB_NAME_MAX 256
#define CRAB_RAW_MAX 512
#define CRAB_MAX_COMPONENTS 48
#define CRAB_MAX_SLOTS 1024

/* kind */
#define CRAB_EV_SYSCALL 1
#define CRAB_EV_FORK 2
#define CRAB_EV_EXEC 3
#define CRAB_EV_EXIT 4

/* flags */
#define CRAB_F_A_TRUNC 0x1     /* path A could not be captured completely */
#define CRAB_F_B_TRUNC 0x2     /* path B could not be captured completely */
#define CRAB_F_CREATED 0x4     /* open created the file (FMODE_CREATED) */
#define CRAB_F_A_ABSOLUTE 0x8  /* str 1 is absolute: str 0 (base) was not captured */
#define CRAB_F_B_ABSOLUTE 0x10 /* str 3 is absolute: str 2 (base) was not captured */
#define CRAB_F_NO_OBJECT 0x20  /* the fd did not resolve to a file */

/* ioctl commands that change files. */
#define CRAB_FICLONE 0x40049409
#define CRAB_FICLONERANGE 0x4020940d
#define CRAB_FS_IOC_SETFLAGS 0x40086602
#define CRAB_FS_IOC_FSSETXATTR 0x401c5820

/* x86_64 syscall numbers the inspector hooks (mirrored in abi.rs). */
#define CRAB_NR_write 1
#define CRAB_NR_open 2
#define CRAB_NR_mmap 9
#define CRAB_NR_ioctl 16
#define CRAB_NR_pwrite64 18
#define CRAB_NR_writev 20
#define CRAB_NR_sendfile 40
#define CRAB_NR_connect 42
#define CRAB_NR_accept 43
#define CRAB_NR_bind 49
#define CRAB_NR_listen 50
#define CRAB_NR_truncate 76
#define CRAB_NR_ftruncate 77
#define CRAB_NR_rename 82
#define CRAB_NR_mkdir 83
#define CRAB_NR_rmdir 84
#define CRAB_NR_creat 85
#define CRAB_NR_link 86
#define CRAB_NR_unlink 87
#define CRAB_NR_symlink 88
#define CRAB_NR_chmod 90
#define CRAB_NR_fchmod 91
#define CRAB_NR_chown 92
#define CRAB_NR_fchown 93
#define CRAB_NR_lchown 94
#define CRAB_NR_ptrace 101
#define CRAB_NR_utime 132
#define CRAB_NR_mknod 133
#define CRAB_NR_setxattr 188
#define CRAB_NR_lsetxattr 189
#define CRAB_NR_fsetxattr 190
#define CRAB_NR_removexattr 197
#define CRAB_NR_lremovexattr 198
#define CRAB_NR_fremovexattr 199
#define CRAB_NR_utimes 235
#define CRAB_NR_openat 257
#define CRAB_NR_mkdirat 258
#define CRAB_NR_mknodat 259
#define CRAB_NR_fchownat 260
#define CRAB_NR_futimesat 261
#define CRAB_NR_unlinkat 263
#define CRAB_NR_renameat 264
#define CRAB_NR_linkat 265
#define CRAB_NR_symlinkat 266
#define CRAB_NR_fchmodat 268
#define CRAB_NR_splice 275
#define CRAB_NR_utimensat 280
#define CRAB_NR_fallocate 285
#define CRAB_NR_accept4 288
#define CRAB_NR_pwritev 296
#define CRAB_NR_open_by_handle_at 304
#define CRAB_NR_process_vm_writev 311
#define CRAB_NR_renameat2 316
#define CRAB_NR_copy_file_range 326
#define CRAB_NR_pwritev2 328
#define CRAB_NR_io_uring_setup 425
#define CRAB_NR_io_uring_enter 426
#define CRAB_NR_io_uring_register 427
#define CRAB_NR_openat2 437
#define CRAB_NR_fchmodat2 452
#define CRAB_NR_setxattrat 463
#define CRAB_NR_removexattrat 466

struct crab_event {
	__u32 kind;
	__u32 sysnr;
	__u32 tgid;
	__u32 tid;
	__u32 slot;
	__u32 flags;
	__u64 cgroup_id;
	__u64 ts_ns;
	__s64 ret;
	__u64 arg0;
	__u64 arg1;
	__u64 arg2;
	__u64 dev; /* kernel dev_t (major << 20 | minor) of the object of an fd operation */
	__u64 ino;
	__u32 nlink;
	__u32 mode;
	__u32 ppid;
	__u16 str_len[4];
	char comm[16];
	__u32 pad;
	char data[CRAB_DATA_MAX];
};

#define CRAB_HEADER_SIZE 128

_Static_assert(__builtin_offsetof(struct crab_event, cgroup_id) == 24, "abi: cgroup_id");
_Static_assert(__builtin_offsetof(struct crab_event, ret) == 40, "abi: ret");
_Static_assert(__builtin_offsetof(struct crab_event, dev) == 72, "abi: dev");
_Static_assert(__builtin_offsetof(struct crab_event, nlink) == 88, "abi: nlink");
_Static_assert(__builtin_offsetof(struct crab_event, str_len) == 100, "abi: str_len");
_Static_assert(__builtin_offsetof(struct crab_event, comm) == 108, "abi: comm");
_Static_assert(__builtin_offsetof(struct crab_event, data) == CRAB_HEADER_SIZE, "abi: data");
_Static_assert(sizeof(struct crab_event) == CRAB_HEADER_SIZE + CRAB_DATA_MAX, "abi: size");

#endif
