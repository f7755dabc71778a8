/* Outbound capture: cgroup connect4/connect6 send an enrolled pod's TCP connects to its
 * proxy's outbound port on loopback (and the proxy's own connections to its pod over lo
 * to its inbound port, as Istio does), and getpeername4/6 show the app the destination
 * it asked for. Attached once at the cgroup2 root; they act only on enrolled netns. */
#include "lib/helpers.h"

#define OUT_SKIP 0
#define OUT_REDIRECT 1
#define OUT_REFUSE 2
#define OUT_TO_INBOUND 3        /* the proxy's self-call, to its own inbound port */

/* A proxy that found no original destination for an accepted connection falls back to
 * the socket's own address (HAProxy, and Envoy's original-dst cluster, do), which is its
 * own capture port: connecting there would make it accept the connection again and do
 * the same, without end. No redirect ever needs that connection, so it is refused. */
static __always_inline int is_proxy_loop(struct pod_config *cfg, int over_lo, __u16 dst_port)
{
	return over_lo && (dst_port == cfg->outbound_port || dst_port == cfg->inbound_port);
}

/* Over lo (Istio: `-o lo`): to a loopback address or one of the pod's own. */
static __always_inline int goes_over_lo(__u64 cookie, const struct addr16 *dst)
{
	return addr_is_loopback(dst) || pod_of_addr(dst) == cookie;
}

/* The proxy's connection to its own pod over lo (a self-call through its outbound
 * cluster): Istio sends it to the inbound port unless it goes to 127.0.0.1 / ::1 (the
 * proxy's admin and agent traffic) or to HBONE's port. */
static __always_inline int is_self_call(const struct addr16 *dst, __u16 dst_port)
{
	if (dst_port == HBONE_PORT)
		return 0;
	if (addr_is_v4mapped(dst))
		return dst->w[3] != bpf_htonl(0x7f000001);
	return !(dst->w[0] == 0 && dst->w[1] == 0 && dst->w[2] == 0 && dst->w[3] == bpf_htonl(1));
}

/* Is the socket bound to the proxy's inbound source (127.0.0.6, ::6, or v4-mapped
 * 127.0.0.6)? That is the inbound hop to the app, which Istio never redirects. */
static __always_inline int from_inbound_source(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 0;
	struct addr16 src;
	addr_of_sock(sk, &src);
	return addr_is_inbound_source(&src);
}

/* Istio's order (istio-iptables' ISTIO_OUTPUT): from the inbound source over lo; the
 * proxy's uid over lo to its inbound port; the proxy's uid and gid; loopback; the pod
 * itself; excluded port, explicitly included port, excluded CIDR, included CIDR. The
 * proxy's loop to its own capture port is refused before all of them. */
static __always_inline int outbound_verdict(struct bpf_sock_addr *ctx, __u64 cookie,
					    struct pod_config *cfg, const struct addr16 *dst,
					    __u16 dst_port)
{
	__u64 gids = bpf_get_current_uid_gid();
	int proxy_uid = (__u32)gids == cfg->proxy_uid;
	int proxy = proxy_uid || (__u32)(gids >> 32) == cfg->proxy_gid;
	int over_lo = goes_over_lo(cookie, dst);
	if (proxy && is_proxy_loop(cfg, over_lo, dst_port)) {
		count(cookie, REASON_OUT_REFUSED_PROXY_LOOP, 0);
		return OUT_REFUSE;
	}
	if (over_lo && from_inbound_source(ctx)) {
		count(cookie, REASON_OUT_SKIP_INBOUND_SOURCE, 0);
		return OUT_SKIP;
	}
	if (proxy_uid && over_lo && is_self_call(dst, dst_port))
		return OUT_TO_INBOUND;
	if (proxy) {
		count(cookie, REASON_OUT_SKIP_PROXY_OWNER, 0);
		return OUT_SKIP;
	}
	if (addr_is_loopback(dst)) {
		count(cookie, REASON_OUT_SKIP_LOOPBACK, 0);
		return OUT_SKIP;
	}
	if (pod_of_addr(dst) == cookie) {
		count(cookie, REASON_OUT_SKIP_LOCAL_POD, 0);
		return OUT_SKIP;
	}
	if (port_listed(cookie, dst_port, PORT_OUT_EXCLUDE)) {
		count(cookie, REASON_OUT_SKIP_EXCLUDED_PORT, 0);
		return OUT_SKIP;
	}
	if ((cfg->flags & POD_F_OUT_PORTS_INCLUDE) &&
	    port_listed(cookie, dst_port, PORT_OUT_INCLUDE))
		return OUT_REDIRECT;
	if (cidr_listed(cookie, dst, CIDR_OUT_EXCLUDE)) {
		count(cookie, REASON_OUT_SKIP_EXCLUDED_CIDR, 0);
		return OUT_SKIP;
	}
	if (!cidr_listed(cookie, dst, CIDR_OUT_INCLUDE)) {
		count(cookie, REASON_OUT_SKIP_NOT_INCLUDED, 0);
		return OUT_SKIP;
	}
	return OUT_REDIRECT;
}

/* Is anything listening on the proxy's outbound port in this netns? Looked up in the
 * family the redirected connect will land on (v4-mapped lands on IPv4 sockets). */
static __always_inline int proxy_listening(struct bpf_sock_addr *ctx, int v6, __u16 port)
{
	struct bpf_sock_tuple tuple = {};
	__u32 size;
	if (v6) {
		tuple.ipv6.saddr[3] = bpf_htonl(1);
		tuple.ipv6.daddr[3] = bpf_htonl(1);
		tuple.ipv6.dport = bpf_htons(port);
		size = sizeof(tuple.ipv6);
	} else {
		tuple.ipv4.saddr = bpf_htonl(0x7f000001);
		tuple.ipv4.daddr = bpf_htonl(0x7f000001);
		tuple.ipv4.dport = bpf_htons(port);
		size = sizeof(tuple.ipv4);
	}
	struct bpf_sock *sk = bpf_sk_lookup_tcp(ctx, &tuple, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* Shared by connect4 and connect6. Returns 1 (let connect() proceed) except for a
 * proxy's loop to itself (EPERM): a refused interception must look like iptables
 * REDIRECT (ECONNREFUSED), but a loop is refused before it starts. */
static __always_inline int handle_connect(struct bpf_sock_addr *ctx, struct addr16 *dst,
					  int user_family)
{
	if (ctx->type != IC_SOCK_STREAM)
		return 1;
	__u64 cookie = bpf_get_netns_cookie(ctx);
	struct pod_config *cfg = pod_lookup(cookie);
	if (!cfg)
		return 1;

	/* A socket may be disconnected (AF_UNSPEC) and connected again elsewhere: forget
	 * an earlier redirect before deciding anew. */
	if (connect_orig.sk_storage_get(ctx->sk, 0, 0))
		connect_orig.sk_storage_delete(ctx->sk);

	__u16 dst_port = bpf_ntohs((__u16)ctx->user_port);
	int verdict = outbound_verdict(ctx, cookie, cfg, dst, dst_port);
	if (verdict == OUT_REFUSE)
		return 0;
	if (verdict != OUT_REDIRECT && verdict != OUT_TO_INBOUND)
		return 1;
	int self_call = verdict == OUT_TO_INBOUND;
	__u16 proxy_port = self_call ? cfg->inbound_port : cfg->outbound_port;

	int lands_v6 = user_family == IC_AF_INET6 && !addr_is_v4mapped(dst);
	if (!proxy_listening(ctx, lands_v6, proxy_port)) {
		if (cfg->flags & POD_F_PASSTHROUGH) {
			count(cookie, REASON_OUT_PASSTHROUGH_NO_PROXY, 0);
			return 1;
		}
		/* fall through: the connect to the closed port is refused, as with REDIRECT */
		count(cookie, REASON_OUT_REJECTED_NO_PROXY, 0);
	}

	struct orig_dst *orig = connect_orig.sk_storage_get(ctx->sk, 0,
							    BPF_SK_STORAGE_GET_F_CREATE);
	if (!orig) {
		/* Without a record SO_ORIGINAL_DST could not be answered: do not redirect. */
		count(cookie, REASON_ORIG_DST_RECORD_FAILED, 0);
		return 1;
	}
	__builtin_memcpy(orig->addr, dst, 16);
	orig->port = dst_port;
	orig->family = user_family;
	orig->direction = self_call ? DIR_INBOUND : DIR_OUTBOUND;
	orig->flags = 0;
	orig->proxy_port = proxy_port;
	orig->netns_cookie = cookie;
	orig->created_ns = bpf_ktime_get_boot_ns();

	if (self_call) {
		/* the same address (the pod's own, or loopback), the inbound port: the proxy's
		 * inbound listener (a wildcard address) accepts it, as Istio's REDIRECT does */
		ctx->user_port = bpf_htons(proxy_port);
		count(cookie, REASON_OUT_SELF_TO_INBOUND, 0);
		return 1;
	}
	if (user_family == IC_AF_INET) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
	} else if (lands_v6) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	}
	ctx->user_port = bpf_htons(cfg->outbound_port);
	count(cookie, REASON_OUT_REDIRECTED, 0);
	return 1;
}

int connect4(struct bpf_sock_addr *ctx)
{
	struct addr16 dst;
	addr_set_v4(&dst, ctx->user_ip4);
	return handle_connect(ctx, &dst, IC_AF_INET);
}

int connect6(struct bpf_sock_addr *ctx)
{
	struct addr16 dst;
	addr_set_v6(&dst, CTX_LOAD32(ctx->user_ip6[0]), CTX_LOAD32(ctx->user_ip6[1]),
		    CTX_LOAD32(ctx->user_ip6[2]), CTX_LOAD32(ctx->user_ip6[3]));
	return handle_connect(ctx, &dst, IC_AF_INET6);
}

/* The app must keep seeing the destination it connected to. */
static __always_inline struct orig_dst *redirected_peer(struct bpf_sock_addr *ctx)
{
	if (ctx->type != IC_SOCK_STREAM)
		return 0;
	if (!pod_lookup(bpf_get_netns_cookie(ctx)))
		return 0;
	return connect_orig.sk_storage_get(ctx->sk, 0, 0);
}

int getpeername4(struct bpf_sock_addr *ctx)
{
	struct orig_dst *orig = redirected_peer(ctx);
	if (!orig || !addr_is_v4mapped(orig->addr))
		return 1;
	ctx->user_ip4 = ((struct addr16 *)orig->addr)->w[3];
	ctx->user_port = bpf_htons(orig->port);
	count(orig->netns_cookie, REASON_PEERNAME_RESTORED, 0);
	return 1;
}

int getpeername6(struct bpf_sock_addr *ctx)
{
	struct orig_dst *orig = redirected_peer(ctx);
	if (!orig)
		return 1;
	struct addr16 *a = (struct addr16 *)orig->addr;
	ctx->user_ip6[0] = a->w[0];
	ctx->user_ip6[1] = a->w[1];
	ctx->user_ip6[2] = a->w[2];
	ctx->user_ip6[3] = a->w[3];
	ctx->user_port = bpf_htons(orig->port);
	count(orig->netns_cookie, REASON_PEERNAME_RESTORED, 0);
	return 1;
}
