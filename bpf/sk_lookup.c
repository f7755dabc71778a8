/* sk_lookup, attached to each enrolled pod's network namespace: a TCP connection that
 * arrives from outside the pod, for any port not excluded, is handed to the proxy's
 * inbound listener. The packet is not rewritten, so the proxy's accepted socket keeps
 * the original destination (getsockname) and no conntrack entry is needed. */
#include "lib/helpers.h"

static __always_inline int no_proxy(__u64 cookie, struct pod_config *cfg)
{
	if (cfg->flags & POD_F_PASSTHROUGH) {
		count(cookie, REASON_IN_PASSTHROUGH_NO_PROXY, 0);
		return SK_PASS;
	}
	/* like a REDIRECT to a closed port: the lookup fails and the SYN gets a RST */
	count(cookie, REASON_IN_REJECTED_NO_PROXY, 0);
	return SK_DROP;
}

/* For status: the connection the proxy is about to accept, keyed by the accepted
 * socket's own tuple. sock_ops marks it established and removes it on close. */
static __always_inline void record_steered(struct bpf_sk_lookup *ctx, __u64 cookie,
					   struct pod_config *cfg, struct addr16 *dst,
					   struct addr16 *src, __u16 port)
{
	struct sock_tuple t = {};
	__builtin_memcpy(t.local, dst, 16);
	__builtin_memcpy(t.remote, src, 16);
	t.local_port = port;
	t.remote_port = bpf_ntohs(ctx->remote_port);
	/* never loopback here (made-inside-the-pod connections are not steered) */
	t.netns_cookie = 0;
	struct orig_dst conn = {};
	__builtin_memcpy(conn.addr, dst, 16);
	conn.port = port;
	conn.family = ctx->family;
	conn.direction = DIR_INBOUND;
	conn.proxy_port = cfg->inbound_port;
	conn.netns_cookie = cookie;
	conn.created_ns = bpf_ktime_get_boot_ns();
	redirected.update(&t, &conn);
}

static __always_inline struct bpf_sock *find_listener(__u64 cookie, __u32 family)
{
	struct listener_key key = {};
	key.netns_cookie = cookie;
	key.family = family;
	struct bpf_sock *sk = inbound_listeners.lookup(&key);
	if (!sk && family == IC_AF_INET) {
		/* a dual-stack IPv6 listener also takes IPv4 */
		key.family = IC_AF_INET6;
		sk = inbound_listeners.lookup(&key);
	}
	return sk;
}

int steer_inbound(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	__u32 family = ctx->family;
	struct addr16 dst;
	if (family == IC_AF_INET)
		addr_set_v4(&dst, ctx->local_ip4);
	else
		addr_set_v6(&dst, CTX_LOAD32(ctx->local_ip6[0]), CTX_LOAD32(ctx->local_ip6[1]),
			    CTX_LOAD32(ctx->local_ip6[2]), CTX_LOAD32(ctx->local_ip6[3]));
	/* which pod: sk_lookup has no netns-cookie helper, but pod addresses are unique */
	__u64 cookie = pod_of_addr(&dst);
	if (!cookie)
		return SK_PASS;
	struct pod_config *cfg = pod_lookup(cookie);
	if (!cfg)
		return SK_PASS;
	struct addr16 src;
	if (family == IC_AF_INET)
		addr_set_v4(&src, ctx->remote_ip4);
	else
		addr_set_v6(&src, CTX_LOAD32(ctx->remote_ip6[0]), CTX_LOAD32(ctx->remote_ip6[1]),
			    CTX_LOAD32(ctx->remote_ip6[2]), CTX_LOAD32(ctx->remote_ip6[3]));
	/* Made inside the pod: the app itself, or the proxy forwarding to the app (from
	 * its inbound source, ::6 included). Judged by the source address: ingress_ifindex
	 * of a connection to the pod's own address is not reliably the loopback's. */
	__u32 ifindex = CTX_LOAD32(ctx->ingress_ifindex);
	if (ifindex == IC_LOOPBACK_IFINDEX || addr_is_loopback(&src) ||
	    addr_is_inbound_source(&src) || pod_of_addr(&src) == cookie) {
		count(cookie, REASON_IN_SKIP_LOCAL, 0);
		return SK_PASS;
	}
	/* an excluded or virtual interface's traffic is never steered (Istio: `-i IF -j
	 * RETURN` ahead of ISTIO_INBOUND); ifindexes of the pod's namespace */
	if ((cfg->flags & POD_F_EXCLUDE_IFACES) &&
	    port_listed(cookie, (__u16)ifindex, PORT_IN_EXCLUDE_IFINDEX)) {
		count(cookie, REASON_IN_SKIP_EXCLUDED_INTERFACE, 0);
		return SK_PASS;
	}
	__u16 port = ctx->local_port;
	int steer;
	if (port == cfg->inbound_port || port == cfg->outbound_port || port == HBONE_PORT)
		steer = 0;
	else if (cfg->flags & POD_F_IN_PORTS_INCLUDE)
		steer = port_listed(cookie, port, PORT_IN_INCLUDE);
	else
		steer = !port_listed(cookie, port, PORT_IN_EXCLUDE);
	if (!steer) {
		count(cookie, REASON_IN_SKIP_EXCLUDED_PORT, 0);
		return SK_PASS;
	}

	struct bpf_sock *sk = find_listener(cookie, family);
	if (!sk)
		return no_proxy(cookie, cfg);
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return no_proxy(cookie, cfg);
	count(cookie, REASON_IN_STEERED, 0);
	record_steered(ctx, cookie, cfg, &dst, &src, port);
	return SK_PASS;
}
