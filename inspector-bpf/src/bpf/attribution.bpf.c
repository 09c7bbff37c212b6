// SPDX-License-Identifier: GPL-2.0
/* Socket attribution: which watched sandbox opened this TCP connection?
 *
 * One `sockops` program attached (as a bpf_link, beside any other programs) to a cgroup v2
 * directory, by default the hierarchy root, so it sees the TCP sockets of every process below it:
 * - BPF_SOCK_OPS_TCP_CONNECT_CB runs in the connect() caller's context with the local address
 *   and port already chosen. When the caller's cgroup is watched, or descends from a watched
 *   cgroup, the connection's 4-tuple as the connecting side sees it is recorded with the caller's
 *   cgroup id, the watched cgroup's id and the caller's process id, and the socket asks for
 *   state callbacks.
 * - BPF_SOCK_OPS_STATE_CB with the new state TCP_CLOSE forgets the tuple, so a recorded tuple
 *   always belongs to a live connection (a later connection reusing it cannot inherit it).
 * The map is an LRU: even if a close is missed, entries cannot grow without bound.
 *
 * Key layout (shared with `attribution.rs`, 40 bytes): both addresses as 16 bytes in network
 * order, IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d), then the two ports in host order, then 4
 * zero bytes. Kept in its own object so that a load or attach failure here never affects the
 * file/process tracepoints.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10

struct conn_key {
	__u32 local_ip[4];  /* connecting side's local address, network order */
	__u32 remote_ip[4]; /* the address it connected to */
	__u16 local_port;   /* host order */
	__u16 remote_port;  /* host order */
	__u32 pad;
};
_Static_assert(sizeof(struct conn_key) == 40, "conn_key layout is shared with attribution.rs");

struct conn_value {
	__u64 cgroup_id;  /* cgroup v2 id of the process that called connect() */
	__u64 watched_id; /* the watched cgroup: that cgroup or its nearest watched ancestor */
	__u64 tgid;       /* its process id (thread-group id) in the initial pid namespace */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct conn_key);
	__type(value, struct conn_value);
} attr_conns SEC(".maps");

/* Watched cgroup v2 ids (value unused). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
} attr_watched SEC(".maps");

/* attr_levels[0] = bit mask of the cgroup levels that hold a watched cgroup. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} attr_levels SEC(".maps");

/* The watched cgroup holding the current task (itself or the innermost watched ancestor), or 0. */
static __always_inline __u64 watched_cgroup(void)
{
	__u64 cg = bpf_get_current_cgroup_id();
	if (bpf_map_lookup_elem(&attr_watched, &cg))
		return cg;
	__u32 k = 0;
	__u64 *mask = bpf_map_lookup_elem(&attr_levels, &k);
	if (!mask || !*mask)
		return 0;
	__u64 m = *mask;
	for (int level = 15; level >= 1; level--) {
		if (!(m & (1ULL << level)))
			continue;
		__u64 anc = bpf_get_current_ancestor_cgroup_id(level);
		if (anc && bpf_map_lookup_elem(&attr_watched, &anc))
			return anc;
	}
	return 0;
}

/* The 4-tuple of the socket as its own side sees it; -1 for a family other than IPv4/IPv6.
 * Every context field is loaded unconditionally, before any branch: loads of one field in two
 * branches get merged by clang into one load at a computed offset, which the verifier rejects
 * for context pointers. */
static __always_inline int fill_key(struct bpf_sock_ops *ctx, struct conn_key *k)
{
	__u32 family = ctx->family;
	__u32 l4 = ctx->local_ip4, r4 = ctx->remote_ip4;
	__u32 l6[4] = {ctx->local_ip6[0], ctx->local_ip6[1], ctx->local_ip6[2], ctx->local_ip6[3]};
	__u32 r6[4] = {ctx->remote_ip6[0], ctx->remote_ip6[1], ctx->remote_ip6[2],
		       ctx->remote_ip6[3]};
	__u32 lport = ctx->local_port, rport = ctx->remote_port;
	__builtin_memset(k, 0, sizeof(*k));
	if (family == AF_INET) {
		k->local_ip[2] = bpf_htonl(0xffff);
		k->local_ip[3] = l4;
		k->remote_ip[2] = bpf_htonl(0xffff);
		k->remote_ip[3] = r4;
	} else if (family == AF_INET6) {
		/* A dual-stack socket talking IPv4 already holds IPv4-mapped addresses here. */
		for (int i = 0; i < 4; i++) {
			k->local_ip[i] = l6[i];
			k->remote_ip[i] = r6[i];
		}
	} else {
		return -1;
	}
	k->local_port = (__u16)lport;
	/* remote_port holds the network-order port in its upper half on little endian. */
	k->remote_port = (__u16)bpf_ntohl(rport);
	return 0;
}

SEC("sockops")
int crab_sock_attr(struct bpf_sock_ops *ctx)
{
	struct conn_key k;
	switch (ctx->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB: {
		__u64 watched = watched_cgroup();
		if (!watched || fill_key(ctx, &k))
			break;
		struct conn_value v = {
			.cgroup_id = bpf_get_current_cgroup_id(),
			.watched_id = watched,
			.tgid = bpf_get_current_pid_tgid() >> 32,
		};
		bpf_map_update_elem(&attr_conns, &k, &v, BPF_ANY);
		bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	}
	case BPF_SOCK_OPS_STATE_CB:
		/* args[1] is the new state; only sockets recorded above asked for this callback. */
		if (ctx->args[1] == BPF_TCP_CLOSE && !fill_key(ctx, &k))
			bpf_map_delete_elem(&attr_conns, &k);
		break;
	default:
		break;
	}
	return 1;
}
