/* A TCP socket's tuple as seen from itself (struct sock_tuple), from the sock_ops or
 * sk_msg context. Both contexts name the fields alike; ports differ in byte order:
 * local_port is host order, remote_port is network order shifted into the upper half
 * on little-endian (so bpf_ntohl() yields the host-order port). */
#ifndef INTERCEPTOR_TUPLE_H
#define INTERCEPTOR_TUPLE_H

#include "helpers.h"

#define TUPLE_FROM_CTX(ctx, t)                                                         \
	do {                                                                            \
		if ((ctx)->family == IC_AF_INET) {                                      \
			addr_set_v4((t)->local, (ctx)->local_ip4);                      \
			addr_set_v4((t)->remote, (ctx)->remote_ip4);                    \
		} else {                                                                \
			addr_set_v6((t)->local, CTX_LOAD32((ctx)->local_ip6[0]),        \
				    CTX_LOAD32((ctx)->local_ip6[1]),                    \
				    CTX_LOAD32((ctx)->local_ip6[2]),                    \
				    CTX_LOAD32((ctx)->local_ip6[3]));                   \
			addr_set_v6((t)->remote, CTX_LOAD32((ctx)->remote_ip6[0]),      \
				    CTX_LOAD32((ctx)->remote_ip6[1]),                   \
				    CTX_LOAD32((ctx)->remote_ip6[2]),                   \
				    CTX_LOAD32((ctx)->remote_ip6[3]));                  \
		}                                                                       \
		(t)->local_port = (ctx)->local_port;                                    \
		(t)->remote_port = bpf_ntohl((ctx)->remote_port);                       \
	} while (0)

/* Tuples with a loopback end repeat in every namespace, so they are qualified by the
 * netns; pod addresses are unique on the node, so other pairs are not (both ends of a
 * cross-namespace pair must compute the same key). Either end counts, so both ends of
 * a pair decide alike: the proxy's inbound hop from 127.0.0.6 to its pod's address has
 * a loopback end on one side only. */
static __always_inline void tuple_qualify(struct sock_tuple *t, __u64 cookie)
{
	t->netns_cookie = addr_is_loopback(t->remote) || addr_is_loopback(t->local) ? cookie : 0;
}

/* The tuple the other end of this connection computes for itself. */
static __always_inline void tuple_peer(const struct sock_tuple *t, struct sock_tuple *p)
{
	__builtin_memcpy(p->local, t->remote, 16);
	__builtin_memcpy(p->remote, t->local, 16);
	p->local_port = t->remote_port;
	p->remote_port = t->local_port;
	p->netns_cookie = t->netns_cookie;
	p->pad = 0;
}

#endif
