/* The outbound verdict, shared by connect (TCP, and connected UDP) and sendmsg (UDP):
 * istio-iptables' ISTIO_OUTPUT, rule by rule, in its order (interceptor/kernel/rules.py
 * builds the same list for the rules modes). */
#ifndef INTERCEPTOR_OUTBOUND_H
#define INTERCEPTOR_OUTBOUND_H

#include "helpers.h"

#define OUT_SKIP 0
#define OUT_REDIRECT 1
#define OUT_REFUSE 2
#define OUT_TO_INBOUND 3        /* the proxy's self-call, to its own inbound port */
#define OUT_TO_DNS 4            /* a DNS query, to the DNS proxy */

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

/* 127.0.0.1 or ::1: Istio's `-d 127.0.0.1/32` / `::1/128`, not the whole range. */
static __always_inline int is_loopback_one(const struct addr16 *dst)
{
	if (addr_is_v4mapped(dst))
		return dst->w[3] == bpf_htonl(0x7f000001);
	return dst->w[0] == 0 && dst->w[1] == 0 && dst->w[2] == 0 && dst->w[3] == bpf_htonl(1);
}

/* Loopback never captured: 127.0.0.1 (or host_loopback_cidr) and ::1. */
static __always_inline int host_loopback(__u64 cookie, struct pod_config *cfg, const struct addr16 *dst)
{
	if (addr_is_v4mapped(dst) && (cfg->flags & POD_F_HOST_LOOPBACK))
		return cidr_listed(cookie, dst, CIDR_HOST_LOOPBACK);
	return is_loopback_one(dst);
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

static __always_inline int skip(__u64 cookie, __u32 reason)
{
	count(cookie, reason, 0);
	return OUT_SKIP;
}

/* Istio's order: excluded interface; excluded port; from the inbound source over lo;
 * then per proxy uid, then per gid, over lo: the self-call to the inbound port (not to
 * 127.0.0.1 (host_loopback_cidr) / ::1, HBONE's port, or, by uid with DNS capture,
 * port 53), every other
 * owner left alone unless a loopback range is captured explicitly or it is DNS (the
 * first uid, else gid, decides: istio-iptables' rules return at its `! --uid-owner`);
 * the proxy's owners; owner users and groups; DNS; loopback; excluded CIDR, included
 * port, included CIDR. The proxy's loop to its own capture port is refused before all
 * of them, and a socket carrying skip_mark is never redirected. udp: a datagram or a
 * connected UDP socket, for which only DNS is ever captured. */
static __always_inline int outbound_verdict(struct bpf_sock_addr *ctx, __u64 cookie,
					    struct pod_config *cfg, const struct addr16 *dst,
					    __u16 dst_port, int udp)
{
	__u64 ids = bpf_get_current_uid_gid();
	__u32 uid = (__u32)ids, gid = (__u32)(ids >> 32);
	__u32 flags = cfg->flags;
	int more = flags & POD_F_MORE_PROXY_IDS;
	int first_uid = uid == cfg->proxy_uid;
	int proxy_uid = first_uid || (more && owner_listed(cookie, uid, OWNER_PROXY_UID));
	int proxy_gid = gid == cfg->proxy_gid || (more && owner_listed(cookie, gid, OWNER_PROXY_GID));
	int over_lo = goes_over_lo(cookie, dst);
	int dns53 = (flags & POD_F_DNS) && dst_port == DNS_SERVER_PORT;

	if (!udp && (proxy_uid || proxy_gid) && is_proxy_loop(cfg, over_lo, dst_port)) {
		count(cookie, REASON_OUT_REFUSED_PROXY_LOOP, 0);
		return OUT_REFUSE;
	}
	if (cfg->skip_mark_mask) {
		struct bpf_sock *sk = ctx->sk;
		if (sk && (sk->mark & cfg->skip_mark_mask) == cfg->skip_mark)
			return skip(cookie, REASON_OUT_SKIP_MARK);
	}
	/* connect() has no route yet: the pod's routes through an excluded interface were
	 * recorded at enroll, longest prefix first */
	if (!over_lo && (flags & POD_F_EXCLUDE_IFACES) &&
	    cidr_value(cookie, dst, CIDR_IFACE_ROUTE) == IFACE_EXCLUDED)
		return skip(cookie, REASON_OUT_SKIP_EXCLUDED_INTERFACE);
	if (port_listed(cookie, dst_port, PORT_OUT_EXCLUDE))
		return skip(cookie, REASON_OUT_SKIP_EXCLUDED_PORT);
	if (over_lo && from_inbound_source(ctx))
		return skip(cookie, REASON_OUT_SKIP_INBOUND_SOURCE);
	if (over_lo && !udp) {
		int self_call = !host_loopback(cookie, cfg, dst) && dst_port != HBONE_PORT;
		if (!(flags & POD_F_LOOPBACK_INCLUDED) && !dns53) {
			if (first_uid)
				return self_call ? OUT_TO_INBOUND : skip(cookie, REASON_OUT_SKIP_PROXY_OWNER);
			return skip(cookie, addr_is_loopback(dst) ? REASON_OUT_SKIP_LOOPBACK
								  : REASON_OUT_SKIP_LOCAL_POD);
		}
		if (proxy_uid)
			return self_call && !dns53 ? OUT_TO_INBOUND : skip(cookie, REASON_OUT_SKIP_PROXY_OWNER);
		if (proxy_gid)
			return self_call ? OUT_TO_INBOUND : skip(cookie, REASON_OUT_SKIP_PROXY_OWNER);
	}
	if (proxy_uid || proxy_gid)
		return skip(cookie, REASON_OUT_SKIP_PROXY_OWNER);
	if (((flags & POD_F_USERS_INCLUDE) && !owner_listed(cookie, uid, OWNER_USER_INCLUDE)) ||
	    ((flags & POD_F_USERS_EXCLUDE) && owner_listed(cookie, uid, OWNER_USER_EXCLUDE)) ||
	    ((flags & POD_F_GROUPS_INCLUDE) && !owner_listed(cookie, gid, OWNER_GROUP_INCLUDE)) ||
	    ((flags & POD_F_GROUPS_EXCLUDE) && owner_listed(cookie, gid, OWNER_GROUP_EXCLUDE)))
		return skip(cookie, REASON_OUT_SKIP_OWNER_FILTER);
	if (dns53 && ((flags & POD_F_DNS_ALL) || cidr_listed(cookie, dst, CIDR_DNS_SERVER)))
		return OUT_TO_DNS;
	if (udp)
		return OUT_SKIP;
	if (host_loopback(cookie, cfg, dst))
		return skip(cookie, REASON_OUT_SKIP_LOOPBACK);
	if (cidr_listed(cookie, dst, CIDR_OUT_EXCLUDE))
		return skip(cookie, REASON_OUT_SKIP_EXCLUDED_CIDR);
	if ((flags & POD_F_OUT_PORTS_INCLUDE) && port_listed(cookie, dst_port, PORT_OUT_INCLUDE))
		return OUT_REDIRECT;
	if (!cidr_listed(cookie, dst, CIDR_OUT_INCLUDE))
		return skip(cookie, REASON_OUT_SKIP_NOT_INCLUDED);
	return OUT_REDIRECT;
}

/* Point the socket address at a port of the pod's own proxy on loopback, in the family
 * the socket uses (v4-mapped stays v4-mapped: it lands on an IPv4 socket). */
static __always_inline void to_local_port(struct bpf_sock_addr *ctx, int user_family, int lands_v6,
					  __u16 port)
{
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
	ctx->user_port = bpf_htons(port);
}

/* Keep the destination the app asked for on its socket: getpeername, SO_ORIGINAL_DST
 * (through sock_ops) and DNS answers (recvmsg) restore it from here. */
static __always_inline int remember_destination(struct bpf_sock_addr *ctx, __u64 cookie,
						const struct addr16 *dst, __u16 dst_port,
						int user_family, __u8 direction, __u16 proxy_port)
{
	struct orig_dst *orig = connect_orig.sk_storage_get(ctx->sk, 0,
							    BPF_SK_STORAGE_GET_F_CREATE);
	if (!orig) {
		count(cookie, REASON_ORIG_DST_RECORD_FAILED, 0);
		return 0;
	}
	__builtin_memcpy(orig->addr, dst, 16);
	orig->port = dst_port;
	orig->family = user_family;
	orig->direction = direction;
	orig->flags = 0;
	orig->proxy_port = proxy_port;
	orig->netns_cookie = cookie;
	orig->created_ns = bpf_ktime_get_boot_ns();
	return 1;
}

/* A DNS query on a UDP socket (a datagram sent with an address, or the socket's
 * connect): to the DNS proxy on loopback when the verdict says so, the nameserver asked
 * kept on the socket for its answers (recvmsg) and getpeername. */
static __always_inline int udp_to_dns_proxy(struct bpf_sock_addr *ctx, __u64 cookie,
					    struct pod_config *cfg, const struct addr16 *dst,
					    int user_family)
{
	__u16 dst_port = bpf_ntohs((__u16)ctx->user_port);
	if (!(cfg->flags & POD_F_DNS) || dst_port != DNS_SERVER_PORT)
		return 1;
	if (outbound_verdict(ctx, cookie, cfg, dst, dst_port, 1) != OUT_TO_DNS)
		return 1;
	int lands_v6 = user_family == IC_AF_INET6 && !addr_is_v4mapped(dst);
	if (!remember_destination(ctx, cookie, dst, dst_port, user_family, DIR_OUTBOUND, DNS_PORT))
		return 1;
	to_local_port(ctx, user_family, lands_v6, DNS_PORT);
	count(cookie, REASON_OUT_DNS_REDIRECTED, 0);
	return 1;
}

/* Show the app the address it asked for (getpeername, a DNS answer's source) instead of
 * the proxy's: IPv4 only when it was one. */
static __always_inline int restore_address4(struct bpf_sock_addr *ctx, struct orig_dst *orig, __u32 reason)
{
	if (!addr_is_v4mapped(orig->addr))
		return 1;
	ctx->user_ip4 = ((struct addr16 *)orig->addr)->w[3];
	ctx->user_port = bpf_htons(orig->port);
	count(orig->netns_cookie, reason, 0);
	return 1;
}

static __always_inline int restore_address6(struct bpf_sock_addr *ctx, struct orig_dst *orig, __u32 reason)
{
	struct addr16 *a = (struct addr16 *)orig->addr;
	ctx->user_ip6[0] = a->w[0];
	ctx->user_ip6[1] = a->w[1];
	ctx->user_ip6[2] = a->w[2];
	ctx->user_ip6[3] = a->w[3];
	ctx->user_port = bpf_htons(orig->port);
	count(orig->netns_cookie, reason, 0);
	return 1;
}

#endif
