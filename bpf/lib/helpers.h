/* Small helpers shared by the hooks: address handling, pod lookup, counters. */
#ifndef INTERCEPTOR_HELPERS_H
#define INTERCEPTOR_HELPERS_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include "maps.h"

/* Only UAPI headers are included (kernel headers cost ~2 s per compile), so the few
 * socket constants needed are defined here. */
#define IC_AF_INET 2
#define IC_AF_INET6 10
#define IC_SOCK_STREAM 1
#define IC_SOCK_DGRAM 2
#define IC_SOL_IP 0
#define IC_SOL_IPV6 41
#define IC_SO_ORIGINAL_DST 80      /* SOL_IP; IP6T_SO_ORIGINAL_DST is the same number */
#define IC_LOOPBACK_IFINDEX 1      /* "lo" is ifindex 1 in every network namespace */
#define IC_TCP_CLOSE 7

/* The loader compiles the init namespace's cookie in, so no map content can ever make a
 * hook act on the host's own sockets. */
#ifndef HOST_NETNS_COOKIE
#error "HOST_NETNS_COOKIE must be defined by the loader"
#endif

/* Context fields must be read as separate 32-bit loads: clang otherwise merges adjacent
 * reads into 8-byte accesses that the verifier rejects (invalid bpf_context access). */
#define CTX_LOAD32(field) (*(volatile __u32 *)&(field))

struct addr16 {
	__u32 w[4];
};

static __always_inline void addr_set_v4(void *out, __u32 be_addr)
{
	__u32 *w = out;
	w[0] = 0;
	w[1] = 0;
	w[2] = bpf_htonl(0x0000ffff);
	w[3] = be_addr;
}

static __always_inline void addr_set_v6(void *out, __u32 a, __u32 b, __u32 c, __u32 d)
{
	__u32 *w = out;
	w[0] = a;
	w[1] = b;
	w[2] = c;
	w[3] = d;
}

static __always_inline int addr_is_v4mapped(const void *in)
{
	const __u32 *w = in;
	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0x0000ffff);
}

/* 127.0.0.0/8 (also v4-mapped) or ::1 */
static __always_inline int addr_is_loopback(const void *in)
{
	const __u32 *w = in;
	if (addr_is_v4mapped(in))
		return (bpf_ntohl(w[3]) >> 24) == 127;
	return w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == bpf_htonl(1);
}

/* A socket's own (local) address, v4-mapped for IPv4 (bpf_sock: every hook that has one). */
static __always_inline void addr_of_sock(struct bpf_sock *sk, struct addr16 *out)
{
	if (sk->family == IC_AF_INET)
		addr_set_v4(out, sk->src_ip4);
	else
		addr_set_v6(out, CTX_LOAD32(sk->src_ip6[0]), CTX_LOAD32(sk->src_ip6[1]),
			    CTX_LOAD32(sk->src_ip6[2]), CTX_LOAD32(sk->src_ip6[3]));
}

/* The proxy's inbound source: 127.0.0.6 (also v4-mapped) or ::6 (see abi.py). */
static __always_inline int addr_is_inbound_source(const void *in)
{
	const __u32 *w = in;
	if (addr_is_v4mapped(in))
		return w[3] == bpf_htonl(INBOUND_SOURCE_V4_INT);
	return w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == bpf_htonl(INBOUND_SOURCE_V6_LAST_WORD);
}

static __always_inline struct pod_config *pod_lookup(__u64 cookie)
{
	if (cookie == HOST_NETNS_COOKIE)
		return 0;
	return pods.lookup(&cookie);
}

/* The netns cookie of the pod that owns addr, or 0. */
static __always_inline __u64 pod_of_addr(const void *addr)
{
	struct pod_addr_key key = {};
	__builtin_memcpy(key.addr, addr, 16);
	__u64 *cookie = pod_addrs.lookup(&key);
	return cookie ? *cookie : 0;
}

static __always_inline int port_listed(__u64 cookie, __u16 port, __u8 kind)
{
	struct port_key key = {};
	key.netns_cookie = cookie;
	key.port = port;
	key.kind = kind;
	return port_rules.lookup(&key) != 0;
}

/* The value of the longest matching prefix of this kind (0: none; entries are never 0). */
static __always_inline __u8 cidr_value(__u64 cookie, const void *addr, __u32 kind)
{
	struct cidr_key key = {};
	key.prefixlen = CIDR_KEY_FIXED_BITS + 128;
	key.kind = kind;
	key.netns_cookie = cookie;
	__builtin_memcpy(key.addr, addr, 16);
	__u8 *value = cidr_rules.lookup(&key);
	return value ? *value : 0;
}

static __always_inline int cidr_listed(__u64 cookie, const void *addr, __u32 kind)
{
	return cidr_value(cookie, addr, kind) != 0;
}

static __always_inline int owner_listed(__u64 cookie, __u32 id, __u32 kind)
{
	struct owner_key key = {};
	key.netns_cookie = cookie;
	key.id = id;
	key.kind = kind;
	return owner_rules.lookup(&key) != 0;
}

static __always_inline void count(__u64 cookie, __u32 reason, __u64 bytes)
{
	struct stat_key key = {};
	key.netns_cookie = cookie;
	key.reason = reason;
	struct stat_value *val = stats.lookup(&key);
	if (!val) {
		struct stat_value zero = {};
		stats.update(&key, &zero);
		val = stats.lookup(&key);
		if (!val)
			return;
	}
	/* per-CPU slot: plain adds are safe */
	val->count += 1;
	val->bytes += bytes;
}

static __always_inline int node_bypass_enabled(void)
{
	int zero = 0;
	struct node_settings *s = settings.lookup(&zero);
	return s && (s->flags & NODE_F_BYPASS);
}

#endif
