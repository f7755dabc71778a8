/* Outbound capture: cgroup connect4/connect6 send an enrolled pod's TCP connects to its
 * proxy's outbound port on loopback (the proxy's own connections to its pod over lo to
 * its inbound port, and DNS over TCP and on connected UDP sockets to the DNS proxy, as
 * Istio does), and getpeername4/6 show the app the destination it asked for. Attached
 * once at the cgroup2 root; they act only on enrolled netns. The verdict is
 * lib/outbound.h's; datagrams sent with an address are sock_dns.c's. */
#include "lib/outbound.h"

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
	int type = ctx->type;
	if (type != IC_SOCK_STREAM && type != IC_SOCK_DGRAM)
		return 1;
	__u64 cookie = bpf_get_netns_cookie(ctx);
	struct pod_config *cfg = pod_lookup(cookie);
	if (!cfg)
		return 1;

	/* A socket may be disconnected (AF_UNSPEC) and connected again elsewhere: forget
	 * an earlier redirect before deciding anew. */
	if (connect_orig.sk_storage_get(ctx->sk, 0, 0))
		connect_orig.sk_storage_delete(ctx->sk);
	/* a connected UDP socket asking a nameserver (the C library's resolver connects):
	 * its answers then come from the DNS proxy it is connected to */
	if (type == IC_SOCK_DGRAM)
		return udp_to_dns_proxy(ctx, cookie, cfg, dst, user_family);

	__u16 dst_port = bpf_ntohs((__u16)ctx->user_port);
	int verdict = outbound_verdict(ctx, cookie, cfg, dst, dst_port, 0);
	if (verdict == OUT_REFUSE)
		return 0;
	if (verdict == OUT_SKIP)
		return 1;
	int self_call = verdict == OUT_TO_INBOUND;
	__u16 proxy_port = self_call ? cfg->inbound_port :
			   verdict == OUT_TO_DNS ? DNS_PORT : cfg->outbound_port;

	int lands_v6 = user_family == IC_AF_INET6 && !addr_is_v4mapped(dst);
	if (!proxy_listening(ctx, lands_v6, proxy_port)) {
		if (cfg->flags & POD_F_PASSTHROUGH) {
			count(cookie, REASON_OUT_PASSTHROUGH_NO_PROXY, 0);
			return 1;
		}
		/* fall through: the connect to the closed port is refused, as with REDIRECT */
		count(cookie, REASON_OUT_REJECTED_NO_PROXY, 0);
	}

	/* Without a record SO_ORIGINAL_DST could not be answered: do not redirect. */
	if (!remember_destination(ctx, cookie, dst, dst_port, user_family,
				  self_call ? DIR_INBOUND : DIR_OUTBOUND, proxy_port))
		return 1;

	if (self_call) {
		/* the same address (the pod's own, or loopback), the inbound port: the proxy's
		 * inbound listener (a wildcard address) accepts it, as Istio's REDIRECT does */
		ctx->user_port = bpf_htons(proxy_port);
		count(cookie, REASON_OUT_SELF_TO_INBOUND, 0);
		return 1;
	}
	to_local_port(ctx, user_family, lands_v6, proxy_port);
	count(cookie, verdict == OUT_TO_DNS ? REASON_OUT_DNS_REDIRECTED : REASON_OUT_REDIRECTED, 0);
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
	int type = ctx->type;
	if (type != IC_SOCK_STREAM && type != IC_SOCK_DGRAM)
		return 0;
	if (!pod_lookup(bpf_get_netns_cookie(ctx)))
		return 0;
	return connect_orig.sk_storage_get(ctx->sk, 0, 0);
}

int getpeername4(struct bpf_sock_addr *ctx)
{
	struct orig_dst *orig = redirected_peer(ctx);
	return orig ? restore_address4(ctx, orig, REASON_PEERNAME_RESTORED) : 1;
}

int getpeername6(struct bpf_sock_addr *ctx)
{
	struct orig_dst *orig = redirected_peer(ctx);
	return orig ? restore_address6(ctx, orig, REASON_PEERNAME_RESTORED) : 1;
}
