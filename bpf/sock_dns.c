/* DNS over UDP, without NAT: a query the pod sends with an address (sendto, sendmsg) is
 * sent to the DNS proxy on loopback instead (cgroup sendmsg4/6), and an answer from the
 * DNS proxy is shown to the app as from the nameserver it asked (recvmsg4/6), which is
 * what a resolver checks before it takes an answer. Connected sockets are connect's
 * (sock_connect.c): their answers arrive from the proxy the socket is connected to, and
 * recvmsg shows them the same way. The verdict, and so who is left alone (the proxy's
 * own queries above all), is lib/outbound.h's.
 *
 * The nameserver asked is kept on the socket (connect_orig): a socket that asks two
 * nameservers at once sees both answers as from the one it asked last. Resolvers ask
 * one at a time, and the C library's connects. */
#include "lib/outbound.h"

static __always_inline int handle_sendmsg(struct bpf_sock_addr *ctx, struct addr16 *dst,
					  int user_family)
{
	/* every datagram of every namespace passes here: the port first, it is cheapest */
	if (ctx->type != IC_SOCK_DGRAM || bpf_ntohs((__u16)ctx->user_port) != DNS_SERVER_PORT)
		return 1;
	__u64 cookie = bpf_get_netns_cookie(ctx);
	struct pod_config *cfg = pod_lookup(cookie);
	return cfg ? udp_to_dns_proxy(ctx, cookie, cfg, dst, user_family) : 1;
}

int sendmsg4(struct bpf_sock_addr *ctx)
{
	struct addr16 dst;
	addr_set_v4(&dst, ctx->user_ip4);
	return handle_sendmsg(ctx, &dst, IC_AF_INET);
}

int sendmsg6(struct bpf_sock_addr *ctx)
{
	struct addr16 dst;
	addr_set_v6(&dst, CTX_LOAD32(ctx->user_ip6[0]), CTX_LOAD32(ctx->user_ip6[1]),
		    CTX_LOAD32(ctx->user_ip6[2]), CTX_LOAD32(ctx->user_ip6[3]));
	return handle_sendmsg(ctx, &dst, IC_AF_INET6);
}

/* An answer from the DNS proxy (loopback, its port) on a socket whose query went there:
 * the nameserver asked, else nothing to restore. */
static __always_inline struct orig_dst *dns_query_of(struct bpf_sock_addr *ctx, struct addr16 *src)
{
	if (ctx->type != IC_SOCK_DGRAM || bpf_ntohs((__u16)ctx->user_port) != DNS_PORT ||
	    !addr_is_loopback(src))
		return 0;
	struct orig_dst *orig = connect_orig.sk_storage_get(ctx->sk, 0, 0);
	if (!orig || orig->proxy_port != DNS_PORT)
		return 0;
	return orig;
}

int recvmsg4(struct bpf_sock_addr *ctx)
{
	struct addr16 src;
	addr_set_v4(&src, ctx->user_ip4);
	struct orig_dst *orig = dns_query_of(ctx, &src);
	return orig ? restore_address4(ctx, orig, REASON_DNS_ANSWER_RESTORED) : 1;
}

int recvmsg6(struct bpf_sock_addr *ctx)
{
	struct addr16 src;
	addr_set_v6(&src, CTX_LOAD32(ctx->user_ip6[0]), CTX_LOAD32(ctx->user_ip6[1]),
		    CTX_LOAD32(ctx->user_ip6[2]), CTX_LOAD32(ctx->user_ip6[3]));
	struct orig_dst *orig = dns_query_of(ctx, &src);
	return orig ? restore_address6(ctx, orig, REASON_DNS_ANSWER_RESTORED) : 1;
}
