/* cgroup getsockopt at the cgroup2 root: answers SO_ORIGINAL_DST (SOL_IP) and
 * IP6T_SO_ORIGINAL_DST (SOL_IPV6) on a proxy's accepted socket with the destination the
 * app asked for, so unmodified proxies (Envoy, HAProxy) work without NAT. */
#include "lib/helpers.h"

struct ic_sockaddr_in {
	__u16 family;
	__u16 port;
	__u32 addr;
	__u8 zero[8];
};

struct ic_sockaddr_in6 {
	__u16 family;
	__u16 port;
	__u32 flowinfo;
	__u32 addr[4];
	__u32 scope_id;
};

/* Find the app socket connected to this proxy socket: its tuple is ours reversed. */
static __always_inline struct orig_dst *lookup_orig(struct bpf_sock *sk, __u64 cookie)
{
	struct sock_tuple app = {};
	if (sk->family == IC_AF_INET) {
		addr_set_v4(app.local, sk->dst_ip4);
		addr_set_v4(app.remote, sk->src_ip4);
	} else {
		addr_set_v6(app.local, CTX_LOAD32(sk->dst_ip6[0]), CTX_LOAD32(sk->dst_ip6[1]),
			    CTX_LOAD32(sk->dst_ip6[2]), CTX_LOAD32(sk->dst_ip6[3]));
		addr_set_v6(app.remote, CTX_LOAD32(sk->src_ip6[0]), CTX_LOAD32(sk->src_ip6[1]),
			    CTX_LOAD32(sk->src_ip6[2]), CTX_LOAD32(sk->src_ip6[3]));
	}
	app.local_port = bpf_ntohs(sk->dst_port);
	app.remote_port = sk->src_port;
	app.netns_cookie = addr_is_loopback(app.remote) ? cookie : 0;
	return redirected.lookup(&app);
}

int getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->optname != IC_SO_ORIGINAL_DST)
		return 1;
	int level = ctx->level;
	if (level != IC_SOL_IP && level != IC_SOL_IPV6)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	__u64 cookie = bpf_get_netns_cookie(ctx);
	if (!pod_lookup(cookie))
		return 1;
	struct orig_dst *orig = lookup_orig(sk, cookie);
	if (!orig) {
		count(cookie, REASON_ORIG_DST_UNKNOWN, 0);
		return 1;
	}
	struct addr16 *a = (struct addr16 *)orig->addr;
	void *optval = ctx->optval, *end = ctx->optval_end;

	if (level == IC_SOL_IP) {
		struct ic_sockaddr_in *sin = optval;
		if (!addr_is_v4mapped(a) || (void *)(sin + 1) > end)
			return 1;
		sin->family = IC_AF_INET;
		sin->port = bpf_htons(orig->port);
		sin->addr = a->w[3];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		ctx->optlen = sizeof(*sin);
	} else {
		struct ic_sockaddr_in6 *sin6 = optval;
		if ((void *)(sin6 + 1) > end)
			return 1;
		sin6->family = IC_AF_INET6;
		sin6->port = bpf_htons(orig->port);
		sin6->flowinfo = 0;
		sin6->addr[0] = a->w[0];
		sin6->addr[1] = a->w[1];
		sin6->addr[2] = a->w[2];
		sin6->addr[3] = a->w[3];
		sin6->scope_id = 0;
		ctx->optlen = sizeof(*sin6);
	}
	/* keep clang from merging the two context stores into one 8-byte store */
	asm volatile("" ::: "memory");
	/* the kernel may have failed (no conntrack) or "succeeded" with the un-NATed
	 * tuple; either way this answer is the one that counts */
	ctx->retval = 0;
	count(cookie, REASON_ORIG_DST_ANSWERED, 0);
	return 1;
}
