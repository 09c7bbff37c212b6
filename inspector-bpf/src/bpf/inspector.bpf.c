// SPDX-License-Identifier: GPL-2.0
/* Kernel side of the Crab inspector: which file-system, process and socket effects do the
 * processes of watched cgroups have?
 *
 * Shape (libbpf-bootstrap style): raw tracepoints on sys_exit (one program switching on the
 * syscall number: only successful calls matter, and the arguments are still in pt_regs) and on
 * sched_process_fork/exec/exit; an in-kernel filter on watched cgroup v2 ids (and their
 * descendants); one ring buffer with batched wakeups; per-CPU produced/dropped counters per
 * sandbox slot that user space reads for its sync barrier.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "crab_event.h"

char LICENSE[] SEC("license") = "GPL";

#define AT_FDCWD -100
#define O_WRONLY 01
#define O_RDWR 02
#define O_TRUNC 01000
#define O_CREAT 0100
#define S_IFMT 0170000
#define S_IFREG 0100000
#define S_IFDIR 0040000
#define S_IFLNK 0120000
#define FMODE_CREATED (1U << 20)
#define MAP_SHARED 0x01
#define PROT_WRITE 0x2

/* Wake the reader only when this much data waits; user space drains periodically anyway. */
const volatile __u64 wakeup_bytes = 256 * 1024;

/* cgroup v2 id → sandbox slot. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
} watched SEC(".maps");

/* crab_config[0] = bit mask of cgroup levels that hold a watched cgroup; [1] = write-dedup epoch. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} crab_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 32 * 1024 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CRAB_MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} produced SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CRAB_MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} dropped SEC(".maps");

/* Scratch space: an event is far larger than the 512-byte BPF stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct crab_event);
} scratch SEC(".maps");

/* Per-CPU "scratch in use" flag: a program preempted while filling `scratch` must not have its
 * event overwritten by another one on the same CPU; the second one counts a drop instead. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} scratch_busy SEC(".maps");

/* (tgid, dev, ino) → epoch of the last reported write: repeated writes to one file by one
 * process within a window are reported once (the file is dirty already). */
struct write_key {
	__u32 tgid;
	__u32 pad;
	__u64 dev;
	__u64 ino;
};
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct write_key);
	__type(value, __u64);
} recent_writes SEC(".maps");

/* Raw tracepoint arguments, read without CO-RE: `args` is a flexible array that relocations
 * cannot describe. */
static __always_inline __u64 raw_arg(struct bpf_raw_tracepoint_args *ctx, int i)
{
	return ((__u64 *)ctx)[i];
}

static __always_inline __u32 *lookup_slot(void)
{
	__u64 cg = bpf_get_current_cgroup_id();
	__u32 *slot = bpf_map_lookup_elem(&watched, &cg);
	if (slot)
		return slot;
	__u32 k = 0;
	__u64 *mask = bpf_map_lookup_elem(&crab_config, &k);
	if (!mask || !*mask)
		return 0;
	__u64 m = *mask;
	/* Descendant cgroups count for their sandbox: check the ancestors at the watched levels. */
	for (int level = 1; level < 16; level++) {
		if (!(m & (1ULL << level)))
			continue;
		__u64 anc = bpf_get_current_ancestor_cgroup_id(level);
		slot = bpf_map_lookup_elem(&watched, &anc);
		if (slot)
			return slot;
	}
	return 0;
}

static __always_inline void count(void *map, __u32 slot)
{
	__u64 *c = bpf_map_lookup_elem(map, &slot);
	/* Atomic even per CPU: a preempted program on the same CPU must not lose a count, or
	 * the barrier could return before an event is consumed. */
	if (c)
		__sync_fetch_and_add(c, 1);
}

static __always_inline struct file *fd_file(struct task_struct *task, long fd)
{
	struct files_struct *files = BPF_CORE_READ(task, files);
	struct fdtable *fdt = BPF_CORE_READ(files, fdt);
	unsigned int max = BPF_CORE_READ(fdt, max_fds);
	if (fd < 0 || fd >= max)
		return 0;
	struct file **arr = BPF_CORE_READ(fdt, fd);
	struct file *f = 0;
	bpf_probe_read_kernel(&f, sizeof(f), &arr[fd]);
	return f;
}

/* The write position in e->data lives in e->pad (a map value), not in a register: the verifier
 * does not track map contents, so loop states stay equal and the walk verifies in linear time.
 * submit() zeroes it before the event leaves. */
#define CURSOR(e) ((e)->pad)

/* Writes the dentry components of (dentry, vfsmnt) child-first into e->data at the cursor, up to
 * the task's root. Returns 0 when complete, 1 when truncated. */
static __noinline int walk_path(struct crab_event *e, struct dentry *dentry, struct vfsmount *vfsmnt)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct dentry *root_d = BPF_CORE_READ(task, fs, root.dentry);
	struct vfsmount *root_m = BPF_CORE_READ(task, fs, root.mnt);
	struct mount *mnt = container_of(vfsmnt, struct mount, mnt);
	for (int i = 0; i < CRAB_MAX_COMPONENTS; i++) {
		if (dentry == root_d && vfsmnt == root_m)
			return 0;
		struct dentry *mnt_root = BPF_CORE_READ(vfsmnt, mnt_root);
		struct dentry *parent = BPF_CORE_READ(dentry, d_parent);
		if (dentry == mnt_root || dentry == parent) {
			struct mount *mp = BPF_CORE_READ(mnt, mnt_parent);
			/* The global root or a detached tree: the path is complete as far as it goes. */
			if (dentry != mnt_root || mnt == mp)
				return 0;
			/* Cross the mount point into the parent mount. */
			dentry = BPF_CORE_READ(mnt, mnt_mountpoint);
			mnt = mp;
			vfsmnt = (struct vfsmount *)__builtin_preserve_access_index(&mp->mnt);
			continue;
		}
		__u32 o = CURSOR(e);
		if (o >= CRAB_DATA_WINDOW)
			return 1;
		const unsigned char *name = BPF_CORE_READ(dentry, d_name.name);
		long n = bpf_probe_read_kernel_str(&e->data[o & (CRAB_DATA_WINDOW - 1)], CRAB_NAME_MAX,
						   name);
		if (n <= 0)
			return 1;
		CURSOR(e) = o + n;
		dentry = parent;
	}
	return 1;
}

static __always_inline int walk_fs_path(struct crab_event *e, struct path *p)
{
	struct dentry *d = BPF_CORE_READ(p, dentry);
	struct vfsmount *m = BPF_CORE_READ(p, mnt);
	return walk_path(e, d, m);
}

/* Path argument at user address `upath`, relative to `dirfd`: captures the raw string (str 1 or
 * 3) and, when it is relative, the base directory (str 0 or 2). `which` is 0 for A, 1 for B. */
static __noinline int capture_path_arg(struct crab_event *e, long dirfd, const char *upath,
				       int which)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	int trunc = 0;
	char first = 0;
	bpf_probe_read_user(&first, 1, upath);
	__u32 base_start = CURSOR(e);
	if (first != '/' && upath) {
		struct path p;
		if (dirfd == AT_FDCWD) {
			BPF_CORE_READ_INTO(&p, task, fs, pwd);
		} else {
			struct file *f = fd_file(task, dirfd);
			if (!f)
				trunc = 1;
			else
				BPF_CORE_READ_INTO(&p, f, f_path);
		}
		if (!trunc)
			trunc = walk_fs_path(e, &p);
	} else {
		e->flags |= which ? CRAB_F_B_ABSOLUTE : CRAB_F_A_ABSOLUTE;
	}
	__u32 raw_start = CURSOR(e);
	__u32 base_len = raw_start - base_start;
	__u32 raw_len = 0;
	if (raw_start < CRAB_DATA_WINDOW && upath) {
		long n = bpf_probe_read_user_str(&e->data[raw_start & (CRAB_DATA_WINDOW - 1)],
						 CRAB_RAW_MAX, upath);
		if (n > 0) {
			raw_len = n;
			CURSOR(e) = raw_start + n;
		} else {
			trunc = 1;
		}
	} else if (upath) {
		trunc = 1;
	}
	if (which) {
		e->str_len[2] = base_len;
		e->str_len[3] = raw_len;
	} else {
		e->str_len[0] = base_len;
		e->str_len[1] = raw_len;
	}
	if (trunc)
		e->flags |= which ? CRAB_F_B_TRUNC : CRAB_F_A_TRUNC;
	return 0;
}

/* The object of an fd operation: identity (dev, ino, nlink, mode) and its path as str 0. */
static __noinline int capture_fd_object(struct crab_event *e, struct file *f)
{
	struct inode *inode = BPF_CORE_READ(f, f_inode);
	e->dev = BPF_CORE_READ(inode, i_sb, s_dev);
	e->ino = BPF_CORE_READ(inode, i_ino);
	e->nlink = BPF_CORE_READ(inode, i_nlink);
	e->mode = BPF_CORE_READ(inode, i_mode);
	struct path p;
	BPF_CORE_READ_INTO(&p, f, f_path);
	__u32 start = CURSOR(e);
	if (walk_fs_path(e, &p))
		e->flags |= CRAB_F_A_TRUNC;
	e->str_len[0] = CURSOR(e) - start;
	return 0;
}

static __always_inline struct crab_event *new_event(__u32 kind, __u32 slot)
{
	__u32 k = 0;
	__u64 *busy = bpf_map_lookup_elem(&scratch_busy, &k);
	if (!busy)
		return 0;
	if (__sync_lock_test_and_set(busy, 1)) {
		count(&dropped, slot);
		return 0;
	}
	struct crab_event *e = bpf_map_lookup_elem(&scratch, &k);
	if (!e) {
		*busy = 0;
		return 0;
	}
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	e->kind = kind;
	e->sysnr = 0;
	e->tgid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->slot = slot;
	e->flags = 0;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->ts_ns = bpf_ktime_get_ns();
	e->ret = 0;
	e->arg0 = e->arg1 = e->arg2 = 0;
	e->dev = e->ino = 0;
	e->nlink = e->mode = e->ppid = 0;
	e->str_len[0] = e->str_len[1] = e->str_len[2] = e->str_len[3] = 0;
	e->pad = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	return e;
}

static __always_inline void release_scratch(void)
{
	__u32 k = 0;
	__u64 *busy = bpf_map_lookup_elem(&scratch_busy, &k);
	if (busy)
		*(volatile __u64 *)busy = 0;
}

static __always_inline int submit(struct crab_event *e)
{
	__u32 slot = e->slot;
	__u64 size = CRAB_HEADER_SIZE + (__u64)CURSOR(e);
	CURSOR(e) = 0;
	if (size > sizeof(*e))
		size = sizeof(*e);
	/* Batched wakeups: waking the reader per event costs microseconds per syscall. */
	__u64 flags = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= wakeup_bytes
			      ? BPF_RB_FORCE_WAKEUP
			      : BPF_RB_NO_WAKEUP;
	if (bpf_ringbuf_output(&events, e, size, flags)) {
		count(&dropped, slot);
		return -1;
	}
	count(&produced, slot);
	return 0;
}

enum op_class {
	CRAB_OP_NONE,
	CRAB_OP_OPEN,
	CRAB_OP_FD_WRITE,
	CRAB_OP_FD_META,
	CRAB_OP_PATH1,
	CRAB_OP_PATH2,
	CRAB_OP_MMAP,
	CRAB_OP_SOCKET,
	CRAB_OP_IO_URING,
	CRAB_OP_PROC_MEM,
	CRAB_OP_IOCTL,
};

static __always_inline int classify(long nr)
{
	switch (nr) {
	case CRAB_NR_open:
	case CRAB_NR_openat:
	case CRAB_NR_openat2:
	case CRAB_NR_creat:
	case CRAB_NR_open_by_handle_at:
		return CRAB_OP_OPEN;
	case CRAB_NR_write:
	case CRAB_NR_pwrite64:
	case CRAB_NR_writev:
	case CRAB_NR_pwritev:
	case CRAB_NR_pwritev2:
	case CRAB_NR_sendfile:
	case CRAB_NR_copy_file_range:
	case CRAB_NR_splice:
	case CRAB_NR_fallocate:
	case CRAB_NR_ftruncate:
		return CRAB_OP_FD_WRITE;
	case CRAB_NR_ioctl:
		return CRAB_OP_IOCTL;
	case CRAB_NR_fchmod:
	case CRAB_NR_fchown:
	case CRAB_NR_fsetxattr:
	case CRAB_NR_fremovexattr:
		return CRAB_OP_FD_META;
	case CRAB_NR_truncate:
	case CRAB_NR_unlink:
	case CRAB_NR_unlinkat:
	case CRAB_NR_rmdir:
	case CRAB_NR_mkdir:
	case CRAB_NR_mkdirat:
	case CRAB_NR_mknod:
	case CRAB_NR_mknodat:
	case CRAB_NR_chmod:
	case CRAB_NR_fchmodat:
	case CRAB_NR_fchmodat2:
	case CRAB_NR_chown:
	case CRAB_NR_lchown:
	case CRAB_NR_fchownat:
	case CRAB_NR_setxattr:
	case CRAB_NR_lsetxattr:
	case CRAB_NR_removexattr:
	case CRAB_NR_lremovexattr:
	case CRAB_NR_setxattrat:
	case CRAB_NR_removexattrat:
	case CRAB_NR_utime:
	case CRAB_NR_utimes:
	case CRAB_NR_futimesat:
	case CRAB_NR_utimensat:
	case CRAB_NR_symlink:
	case CRAB_NR_symlinkat:
		return CRAB_OP_PATH1;
	case CRAB_NR_rename:
	case CRAB_NR_renameat:
	case CRAB_NR_renameat2:
	case CRAB_NR_link:
	case CRAB_NR_linkat:
		return CRAB_OP_PATH2;
	case CRAB_NR_mmap:
		return CRAB_OP_MMAP;
	case CRAB_NR_bind:
	case CRAB_NR_listen:
	case CRAB_NR_connect:
	case CRAB_NR_accept:
	case CRAB_NR_accept4:
		return CRAB_OP_SOCKET;
	case CRAB_NR_io_uring_setup:
	case CRAB_NR_io_uring_enter:
	case CRAB_NR_io_uring_register:
		return CRAB_OP_IO_URING;
	case CRAB_NR_ptrace:
	case CRAB_NR_process_vm_writev:
		return CRAB_OP_PROC_MEM;
	}
	return CRAB_OP_NONE;
}

static __noinline int handle_open(struct crab_event *e, struct pt_regs *regs, long nr,
				  long ret)
{
	__u64 flags;
	switch (nr) {
	case CRAB_NR_open:
		flags = PT_REGS_PARM2_CORE_SYSCALL(regs);
		break;
	case CRAB_NR_creat:
		flags = O_WRONLY | O_TRUNC | 0100;
		break;
	case CRAB_NR_openat2: {
		/* struct open_how starts with the u64 flags. */
		__u64 f = 0;
		bpf_probe_read_user(&f, sizeof(f), (void *)PT_REGS_PARM3_CORE_SYSCALL(regs));
		flags = f;
		break;
	}
	default: /* openat, open_by_handle_at */
		flags = PT_REGS_PARM3_CORE_SYSCALL(regs);
		break;
	}
	/* Only creation and truncation change a file at open time (O_TRUNC truncates even with
	 * O_RDONLY on Linux, and O_CREAT|O_RDONLY creates). */
	if (!(flags & (O_CREAT | O_TRUNC)))
		return 1;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct file *f = fd_file(task, ret);
	if (!f)
		return 1;
	unsigned int fmode = BPF_CORE_READ(f, f_mode);
	int created = (fmode & FMODE_CREATED) != 0;
	/* Opening for write changes nothing by itself; creation and truncation do. */
	if (!created && !(flags & O_TRUNC))
		return 1;
	if (created)
		e->flags |= CRAB_F_CREATED;
	e->arg0 = flags;
	capture_fd_object(e, f);
	return 0;
}

static __noinline int handle_fd(struct crab_event *e, long fd, int is_write)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct file *f = fd_file(task, fd);
	if (!f)
		return 1;
	struct inode *inode = BPF_CORE_READ(f, f_inode);
	__u32 mode = BPF_CORE_READ(inode, i_mode);
	__u32 type = mode & S_IFMT;
	if (is_write) {
		/* Pipes, sockets, ttys and devices hold no file state. */
		if (type != S_IFREG)
			return 1;
		struct write_key key = {};
		key.tgid = e->tgid;
		key.dev = BPF_CORE_READ(inode, i_sb, s_dev);
		key.ino = BPF_CORE_READ(inode, i_ino);
		__u32 ek = 1;
		__u64 *epoch = bpf_map_lookup_elem(&crab_config, &ek);
		__u64 cur = epoch ? *epoch : 0;
		__u64 *seen = bpf_map_lookup_elem(&recent_writes, &key);
		if (seen && *seen == cur)
			return 1;
		bpf_map_update_elem(&recent_writes, &key, &cur, BPF_ANY);
	} else if (type != S_IFREG && type != S_IFDIR && type != S_IFLNK) {
		return 1;
	}
	e->arg0 = fd;
	capture_fd_object(e, f);
	return 0;
}

static __noinline int handle_path1(struct crab_event *e, struct pt_regs *regs, long nr)
{
	long dirfd = AT_FDCWD;
	const char *p;
	switch (nr) {
	case CRAB_NR_unlinkat:
	case CRAB_NR_mkdirat:
	case CRAB_NR_mknodat:
	case CRAB_NR_fchmodat:
	case CRAB_NR_fchmodat2:
	case CRAB_NR_fchownat:
	case CRAB_NR_futimesat:
	case CRAB_NR_setxattrat:
	case CRAB_NR_removexattrat:
		dirfd = (int)PT_REGS_PARM1_CORE_SYSCALL(regs);
		p = (const char *)PT_REGS_PARM2_CORE_SYSCALL(regs);
		e->arg0 = PT_REGS_PARM3_CORE_SYSCALL(regs); /* unlinkat: AT_REMOVEDIR */
		break;
	case CRAB_NR_utimensat:
		dirfd = (int)PT_REGS_PARM1_CORE_SYSCALL(regs);
		p = (const char *)PT_REGS_PARM2_CORE_SYSCALL(regs);
		if (!p) /* futimens(fd): the object is dirfd itself. */
			return handle_fd(e, dirfd, 0);
		break;
	case CRAB_NR_symlink:
		p = (const char *)PT_REGS_PARM2_CORE_SYSCALL(regs);
		break;
	case CRAB_NR_symlinkat:
		dirfd = (int)PT_REGS_PARM2_CORE_SYSCALL(regs);
		p = (const char *)PT_REGS_PARM3_CORE_SYSCALL(regs);
		break;
	default:
		p = (const char *)PT_REGS_PARM1_CORE_SYSCALL(regs);
		break;
	}
	capture_path_arg(e, dirfd, p, 0);
	return 0;
}

static __noinline int handle_path2(struct crab_event *e, struct pt_regs *regs, long nr)
{
	long dfd_a = AT_FDCWD, dfd_b = AT_FDCWD;
	const char *a, *b;
	if (nr == CRAB_NR_rename || nr == CRAB_NR_link) {
		a = (const char *)PT_REGS_PARM1_CORE_SYSCALL(regs);
		b = (const char *)PT_REGS_PARM2_CORE_SYSCALL(regs);
	} else {
		dfd_a = (int)PT_REGS_PARM1_CORE_SYSCALL(regs);
		a = (const char *)PT_REGS_PARM2_CORE_SYSCALL(regs);
		dfd_b = (int)PT_REGS_PARM3_CORE_SYSCALL(regs);
		b = (const char *)PT_REGS_PARM4_CORE_SYSCALL(regs);
		e->arg0 = PT_REGS_PARM5_CORE_SYSCALL(regs); /* renameat2 / linkat flags */
	}
	capture_path_arg(e, dfd_a, a, 0);
	capture_path_arg(e, dfd_b, b, 1);
	return 0;
}

static __always_inline void fill_sys_exit(struct crab_event *e, struct pt_regs *regs, long nr,
					  long ret, int cls)
{
	e->sysnr = nr;
	e->ret = ret;
	int skip = 0;
	switch (cls) {
	case CRAB_OP_OPEN:
		skip = handle_open(e, regs, nr, ret);
		break;
	case CRAB_OP_FD_WRITE: {
		long fd = PT_REGS_PARM1_CORE_SYSCALL(regs);
		if (nr == CRAB_NR_copy_file_range || nr == CRAB_NR_splice)
			fd = PT_REGS_PARM3_CORE_SYSCALL(regs);
		if (ret == 0 && nr != CRAB_NR_ftruncate && nr != CRAB_NR_fallocate)
			return;
		skip = handle_fd(e, (int)fd, 1);
		break;
	}
	case CRAB_OP_FD_META:
		skip = handle_fd(e, (int)PT_REGS_PARM1_CORE_SYSCALL(regs), 0);
		break;
	case CRAB_OP_IOCTL: {
		/* File-changing ioctls: reflink clones into the fd (content), inode flags (metadata). */
		__u32 cmd = PT_REGS_PARM2_CORE_SYSCALL(regs);
		int fd = PT_REGS_PARM1_CORE_SYSCALL(regs);
		if (cmd == CRAB_FICLONE || cmd == CRAB_FICLONERANGE)
			skip = handle_fd(e, fd, 1);
		else if (cmd == CRAB_FS_IOC_SETFLAGS || cmd == CRAB_FS_IOC_FSSETXATTR)
			skip = handle_fd(e, fd, 0);
		else
			return;
		e->arg1 = cmd;
		break;
	}
	case CRAB_OP_PATH1:
		skip = handle_path1(e, regs, nr);
		break;
	case CRAB_OP_PATH2:
		skip = handle_path2(e, regs, nr);
		break;
	case CRAB_OP_MMAP: {
		__u64 prot = PT_REGS_PARM3_CORE_SYSCALL(regs);
		__u64 mflags = PT_REGS_PARM4_CORE_SYSCALL(regs);
		long fd = (int)PT_REGS_PARM5_CORE_SYSCALL(regs);
		/* Only shared writable file mappings can change files without further syscalls. */
		if (!(mflags & MAP_SHARED) || !(prot & PROT_WRITE) || fd < 0)
			return;
		skip = handle_fd(e, fd, 0);
		e->arg1 = prot;
		e->arg2 = mflags;
		break;
	}
	case CRAB_OP_SOCKET: {
		e->arg0 = PT_REGS_PARM1_CORE_SYSCALL(regs);
		if (nr == CRAB_NR_bind || nr == CRAB_NR_connect) {
			/* sockaddr: family (u16) and, for inet, the port (u16, network order). */
			__u32 head = 0;
			bpf_probe_read_user(&head, sizeof(head),
					    (void *)PT_REGS_PARM2_CORE_SYSCALL(regs));
			e->arg1 = head;
		}
		break;
	}
	case CRAB_OP_IO_URING:
		e->arg0 = PT_REGS_PARM1_CORE_SYSCALL(regs);
		break;
	case CRAB_OP_PROC_MEM: {
		__u64 a0 = PT_REGS_PARM1_CORE_SYSCALL(regs);
		if (nr == CRAB_NR_ptrace) {
			/* PTRACE_POKETEXT/POKEDATA/POKEUSER/SETREGS/SETFPREGS/SETREGSET write the tracee. */
			if (!(a0 == 4 || a0 == 5 || a0 == 6 || a0 == 13 || a0 == 15 || a0 == 0x4205))
				return;
			e->arg1 = PT_REGS_PARM2_CORE_SYSCALL(regs);
		} else {
			e->arg1 = a0;
		}
		e->arg0 = a0;
		break;
	}
	}
	if (!skip)
		submit(e);
}


SEC("raw_tp/sys_exit")
int crab_sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
	struct pt_regs *regs = (struct pt_regs *)raw_arg(ctx, 0);
	long ret = raw_arg(ctx, 1);
	long nr = BPF_CORE_READ(regs, orig_ax);
	int cls = classify(nr);
	if (cls == CRAB_OP_NONE || ret < 0)
		return 0;
	if (cls == CRAB_OP_IOCTL) {
		/* ioctl is hot system-wide: filter on the command before any map lookup. */
		__u32 cmd = PT_REGS_PARM2_CORE_SYSCALL(regs);
		if (cmd != CRAB_FICLONE && cmd != CRAB_FICLONERANGE && cmd != CRAB_FS_IOC_SETFLAGS &&
		    cmd != CRAB_FS_IOC_FSSETXATTR)
			return 0;
	}
	__u32 *slotp = lookup_slot();
	if (!slotp)
		return 0;
	struct crab_event *e = new_event(CRAB_EV_SYSCALL, *slotp);
	if (!e)
		return 0;
	fill_sys_exit(e, regs, nr, ret, cls);
	release_scratch();
	return 0;
}

SEC("raw_tp/sched_process_fork")
int crab_fork(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *child = (struct task_struct *)raw_arg(ctx, 1);
	__u32 pid = BPF_CORE_READ(child, pid);
	__u32 tgid = BPF_CORE_READ(child, tgid);
	if (pid != tgid) /* a new thread, not a new process */
		return 0;
	__u32 *slotp = lookup_slot();
	if (!slotp)
		return 0;
	struct crab_event *e = new_event(CRAB_EV_FORK, *slotp);
	if (!e)
		return 0;
	e->ret = tgid;
	submit(e);
	release_scratch();
	return 0;
}

SEC("raw_tp/sched_process_exec")
int crab_exec(struct bpf_raw_tracepoint_args *ctx)
{
	struct linux_binprm *bprm = (struct linux_binprm *)raw_arg(ctx, 2);
	__u32 *slotp = lookup_slot();
	if (!slotp)
		return 0;
	struct crab_event *e = new_event(CRAB_EV_EXEC, *slotp);
	if (!e)
		return 0;
	const char *fname = BPF_CORE_READ(bprm, filename);
	long n = bpf_probe_read_kernel_str(&e->data[0], CRAB_RAW_MAX, fname);
	CURSOR(e) = n > 0 ? n : 0;
	e->str_len[1] = CURSOR(e);
	submit(e);
	release_scratch();
	return 0;
}

SEC("raw_tp/sched_process_exit")
int crab_exit(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *p = (struct task_struct *)raw_arg(ctx, 0);
	__u32 pid = BPF_CORE_READ(p, pid);
	__u32 tgid = BPF_CORE_READ(p, tgid);
	if (pid != tgid)
		return 0;
	__u32 *slotp = lookup_slot();
	if (!slotp)
		return 0;
	struct crab_event *e = new_event(CRAB_EV_EXIT, *slotp);
	if (!e)
		return 0;
	e->ret = BPF_CORE_READ(p, exit_code);
	submit(e);
	release_scratch();
	return 0;
}
