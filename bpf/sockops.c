/* sock_ops at the cgroup2 root, for sockets of enrolled pods:
 * - on connect: publish the app socket's original destination by tuple (redirected);
 *   remove it on close;
 * - on the proxy's side of that connection becoming established (its outbound port, or
 *   its inbound port for its own self-call): copy the record onto
 *   the proxy's accepted socket (proxy_orig), where getsockopt(SO_ORIGINAL_DST) reads
 *   it for as long as that socket lives, whenever the app closes;
 * - on listen: register the proxy's inbound listener for sk_lookup to steer to;
 * - on established: mark redirected connections live, put same-host socket pairs in
 *   bypass_socks for sk_msg. */
#include "lib/tuple.h"

static __always_inline void publish_redirect(struct bpf_sock_ops *ops, __u64 cookie)
{
	struct bpf_sock *sk = ops->sk;
	if (!sk)
		return;
	struct orig_dst *orig = connect_orig.sk_storage_get(sk, 0, 0);
	if (!orig)
		return;
	struct sock_tuple t = {};
	TUPLE_FROM_CTX(ops, &t);
	tuple_qualify(&t, cookie);
	if (redirected.update(&t, orig)) {
		count(cookie, REASON_ORIG_DST_RECORD_FAILED, 0);
		return;
	}
	/* ask for state changes so the entry goes when the socket closes */
	bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void forget_redirect(struct bpf_sock_ops *ops, __u64 cookie)
{
	struct sock_tuple t = {};
	TUPLE_FROM_CTX(ops, &t);
	tuple_qualify(&t, cookie);
	redirected.delete(&t);
}

/* The proxy's accepted socket on a capture port, for a connection made inside the pod:
 * the other end is the app's redirected socket (outbound port, or the DNS proxy's for a
 * query over TCP), or the proxy's own self-call (inbound port), whose record sock_ops
 * published on connect. This runs
 * (softirq, on the handshake's last ACK) before the client can see its own FIN
 * acknowledged, so a client that connects and closes at once cannot take the record
 * with it. */
static __always_inline void hand_over_to_proxy(struct bpf_sock_ops *ops, __u64 cookie,
					       struct pod_config *cfg, struct sock_tuple *t)
{
	__u32 port = ops->local_port;
	if (port != cfg->outbound_port && port != cfg->inbound_port &&
	    !(port == DNS_PORT && (cfg->flags & POD_F_DNS)))
		return;
	if (!addr_is_loopback(t->remote) && pod_of_addr(t->remote) != cookie)
		return;
	struct bpf_sock *sk = ops->sk;
	if (!sk)
		return;
	struct sock_tuple app = {};
	tuple_peer(t, &app);
	struct orig_dst *orig = redirected.lookup(&app);
	if (!orig || orig->proxy_port != port)
		return;
	struct orig_dst *held = proxy_orig.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!held) {
		count(cookie, REASON_ORIG_DST_RECORD_FAILED, 0);
		return;
	}
	__builtin_memcpy(held, orig, sizeof(*held));
}

static __always_inline void register_listener(struct bpf_sock_ops *ops, __u64 cookie,
					      struct pod_config *cfg)
{
	if (ops->local_port != cfg->inbound_port)
		return;
	struct listener_key key = {};
	key.netns_cookie = cookie;
	key.family = ops->family;
	/* a statement of its own: BCC's rewrite of map calls breaks inside an if () */
	int err = inbound_listeners.sock_hash_update(ops, &key, BPF_ANY);
	if (err)
		count(cookie, REASON_LISTENER_RECORD_FAILED, 0);
}

/* The leg of a request this same-host pair is (POD_F_BYPASS_* bit), or 0 when its other
 * end is not on this node. Both ends of a pair classify it alike: a pair inside one pod
 * (loopback, or to the pod's own address, as some proxies reach their app) is the
 * outbound leg when either port is the proxy's outbound port, else the inbound leg; a
 * pair between two pods' addresses is the mesh leg. */
static __always_inline __u32 bypass_leg(struct pod_config *cfg, __u64 cookie,
					struct sock_tuple *t)
{
	int in_pod = addr_is_loopback(t->remote);
	if (!in_pod) {
		__u64 owner = pod_of_addr(t->remote);
		if (!owner)
			return 0;
		in_pod = owner == cookie;
	}
	if (!in_pod)
		return POD_F_BYPASS_MESH;
	if (t->local_port == cfg->outbound_port || t->remote_port == cfg->outbound_port)
		return POD_F_BYPASS_OUTBOUND;
	return POD_F_BYPASS_INBOUND;
}

/* Returns 1 when the socket was put in bypass_socks. */
static __always_inline int maybe_bypass(struct bpf_sock_ops *ops, __u64 cookie,
					struct pod_config *cfg, struct sock_tuple *t)
{
	if (!(cfg->flags & (POD_F_BYPASS | POD_F_BYPASS_OUTBOUND | POD_F_BYPASS_MESH |
			    POD_F_BYPASS_INBOUND)) || !node_bypass_enabled())
		return 0;
	/* only pairs whose other end is a socket on this node can be short-circuited, and
	 * only on the legs the pod allows (POD_F_BYPASS: every leg) */
	__u32 leg = bypass_leg(cfg, cookie, t);
	if (!leg || !(cfg->flags & (POD_F_BYPASS | leg)))
		return 0;
	int err = bypass_socks.sock_hash_update(ops, t, BPF_ANY);
	if (err)
		return 0;
	count(cookie, REASON_BYPASS_SOCKET_ADDED, 0);
	return 1;
}

static __always_inline void on_established(struct bpf_sock_ops *ops, __u64 cookie,
					   struct pod_config *cfg)
{
	struct sock_tuple t = {};
	TUPLE_FROM_CTX(ops, &t);
	tuple_qualify(&t, cookie);
	if (ops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		hand_over_to_proxy(ops, cookie, cfg, &t);
	/* a redirected connection (outbound app socket, or the proxy's accepted socket of
	 * a steered inbound one): mark it live, and have its entry removed on close */
	struct orig_dst *conn = redirected.lookup(&t);
	if (conn) {
		conn->flags |= CONN_F_ESTABLISHED;
		bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags |
					       BPF_SOCK_OPS_STATE_CB_FLAG);
	}
	if (maybe_bypass(ops, cookie, cfg, &t) && conn)
		conn->flags |= CONN_F_BYPASSED;
}

int sockops(struct bpf_sock_ops *ops)
{
	__u32 family = ops->family;
	if (family != IC_AF_INET && family != IC_AF_INET6)
		return 1;
	__u64 cookie = bpf_get_netns_cookie(ops);
	struct pod_config *cfg = pod_lookup(cookie);
	if (!cfg)
		return 1;

	switch (ops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		publish_redirect(ops, cookie);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		register_listener(ops, cookie, cfg);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		on_established(ops, cookie, cfg);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (ops->args[1] == IC_TCP_CLOSE)
			forget_redirect(ops, cookie);
		break;
	}
	return 1;
}
