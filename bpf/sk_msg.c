/* sk_msg verdict on bypass_socks: a message sent on a same-host socket goes straight
 * into the receive queue of the peer socket, skipping the TCP/IP stack. Sockets only
 * enter bypass_socks from enrolled pods (sock_ops), so no pod check is needed here. */
#include "lib/tuple.h"

int msg_redirect(struct sk_msg_md *msg)
{
	__u64 cookie = bpf_get_netns_cookie(msg);
	struct sock_tuple self = {}, peer = {};
	TUPLE_FROM_CTX(msg, &self);
	tuple_qualify(&self, cookie);
	tuple_peer(&self, &peer);

	__u32 size = msg->size;
	long verdict = bypass_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	if (verdict == SK_PASS) {
		count(cookie, REASON_BYPASS_MSG_REDIRECTED, size);
	} else {
		/* peer not (yet) in the map, e.g. another node: take the normal path */
		count(cookie, REASON_BYPASS_MSG_NO_PEER, size);
	}
	return SK_PASS;
}
