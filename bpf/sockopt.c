/* cgroup getsockopt at the cgroup2 root: answers SO_ORIGINAL_DST (SOL_IP) and
 * IP6T_SO_ORIGINAL_DST (SOL_IPV6) on a proxy's accepted socket with the destination the
 * app asked for, so unmodified proxies (Envoy, HAProxy) work without NAT. The answer for
 * a redirected connection is kept on the asking socket itself (proxy_orig, see
 * sockops.c), so it holds however long the proxy takes to ask and whether or not the app
 * is still there; a connection delivered unchanged (sk_lookup) is answered with its own
 * address, as conntrack would. */
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

/* Writes the answer for the level asked (0: this address cannot be given at that
 * level, an IPv6 destination asked for at SOL_IP). */
static __always_inline int write_answer(struct bpf_sockopt *ctx, int level,
					const struct addr16 *a, __u16 port)
{
	void *optval = ctx->optval, *end = ctx->optval_end;
	if (level == IC_SOL_IP) {
		struct ic_sockaddr_in *sin = optval;
		if (!addr_is_v4mapped(a) || (void *)(sin + 1) > end)
			return 0;
		sin->family = IC_AF_INET;
		sin->port = bpf_htons(port);
		sin->addr = a->w[3];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		ctx->optlen = sizeof(*sin);
	} else {
		struct ic_sockaddr_in6 *sin6 = optval;
		if ((void *)(sin6 + 1) > end)
			return 0;
		sin6->family = IC_AF_INET6;
		sin6->port = bpf_htons(port);
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
	ctx->retval = 0;
	return 1;
}

/* A connected TCP socket of an enrolled pod with no redirect record, which the kernel
 * could not answer (no conntrack entry): its own local address is its original
 * destination, as conntrack says of a connection it never rewrote. That is every inbound
 * connection sk_lookup delivered, which keeps its destination. Not on the outbound
 * capture port: a connection there always was rewritten, and answering the port itself
 * would send the proxy to itself. */
static __always_inline int answer_own_address(struct bpf_sockopt *ctx, int level,
					      struct bpf_sock *sk, struct pod_config *cfg)
{
	/* connected, whatever the peer has done since (a client that sent and half-closed
	 * is in CLOSE_WAIT by the time the proxy asks) */
	__u32 state = sk->state;
	if (ctx->retval == 0 || sk->protocol != IPPROTO_TCP || state == BPF_TCP_LISTEN ||
	    state == BPF_TCP_CLOSE || state == BPF_TCP_SYN_SENT)
		return 0;
	__u16 port = sk->src_port;
	if (port == cfg->outbound_port)
		return 0;
	struct addr16 local;
	addr_of_sock(sk, &local);
	return write_answer(ctx, level, &local, port);
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
	if (cookie == HOST_NETNS_COOKIE)
		return 1;
	/* handed over by sock_ops when this (the proxy's accepted) socket was established.
	 * Answered even when the pod has been removed since (a DEL, an unload): the record
	 * exists only on a socket sock_ops marked while the pod was enrolled, and a proxy
	 * left without the answer connects to itself. Counted only for an enrolled pod:
	 * a removed pod's counters must not come back. */
	struct orig_dst *orig = proxy_orig.sk_storage_get(sk, 0, 0);
	struct pod_config *cfg = pod_lookup(cookie);
	if (!orig) {
		if (!cfg)
			return 1;
		if (answer_own_address(ctx, level, sk, cfg))
			count(cookie, REASON_ORIG_DST_OWN_ADDRESS, 0);
		else if (ctx->retval != 0)
			count(cookie, REASON_ORIG_DST_UNKNOWN, 0);
		return 1;
	}
	/* the kernel may have failed (no conntrack) or "succeeded" with the un-NATed
	 * tuple; either way this answer is the one that counts */
	if (write_answer(ctx, level, (struct addr16 *)orig->addr, orig->port) && cfg)
		count(cookie, REASON_ORIG_DST_ANSWERED, 0);
	return 1;
}
