/* Every map of the datapath, declared once. The loader pins each one under
 * /sys/fs/bpf/interceptor/maps/<name>; enroll and status open the pins through libbpf.
 * Layouts and sizes come from abi.h (generated from interceptor/abi.py). */
#ifndef INTERCEPTOR_MAPS_H
#define INTERCEPTOR_MAPS_H

#include "abi.h"

/* Enrolled pods by network-namespace cookie. Writer: enroll. Readers: every hook. */
BPF_HASH(pods, __u64, struct pod_config, MAX_PODS);

/* Pod addresses (v4-mapped) -> netns cookie. Writer: enroll. Readers: sk_lookup (which
 * pod a connection is for: sk_lookup has no netns-cookie helper), sock_ops (is the peer
 * on this node), connect (is the destination the pod itself). */
BPF_HASH(pod_addrs, struct pod_addr_key, __u64, MAX_POD_ADDRS);

/* Per-pod port lists (PORT_* kinds). Writer: enroll. Readers: connect, sk_lookup. */
BPF_HASH(port_rules, struct port_key, __u8, MAX_PORT_RULES);

/* Per-pod owner lists (OWNER_* kinds): proxy uids/gids beyond pod_config's first, and
 * Istio's outbound owner users and groups. Writer: enroll. Reader: connect, sendmsg. */
BPF_HASH(owner_rules, struct owner_key, __u8, MAX_OWNER_RULES);

/* Per-pod outbound CIDR lists (CIDR_* kinds), longest-prefix match.
 * Writer: enroll. Reader: connect. */
BPF_F_TABLE("lpm_trie", struct cidr_key, __u8, cidr_rules, MAX_CIDRS, BPF_F_NO_PREALLOC);

/* Proxy inbound listeners. Writer: sock_ops (on listen()). Reader: sk_lookup.
 * BCC's BPF_SOCKHASH has no lookup() method, and sk_lookup needs one. */
struct inbound_listeners_table_t {
	struct listener_key key;
	int leaf;
	void *(*lookup)(struct listener_key *);
	int (*delete)(struct listener_key *);
	int (*sock_hash_update)(void *, void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/sockhash")))
struct inbound_listeners_table_t inbound_listeners = { .max_entries = MAX_LISTENERS };
BPF_ANNOTATE_KV_PAIR(inbound_listeners, struct listener_key, int);

/* Same-host sockets eligible for bypass, keyed by their own tuple.
 * Writer: sock_ops (on established). Reader: sk_msg (finds the peer). */
BPF_SOCKHASH(bypass_socks, struct sock_tuple, MAX_BYPASS_SOCKETS);

/* Original destination of a redirected connect, on the app's socket itself.
 * Writer: connect. Readers: sock_ops (copies it into redirected), getpeername. */
BPF_SK_STORAGE(connect_orig, struct orig_dst);

/* Live redirected connections by the app socket's tuple. Writer: sock_ops (insert on
 * connect, delete on close). Readers: sock_ops (hands the record to the proxy's accepted
 * socket), status. */
BPF_TABLE("lru_hash", struct sock_tuple, struct orig_dst, redirected, MAX_REDIRECTED_SOCKETS);

/* Original destination on the proxy's accepted socket of a redirected outbound
 * connection: its lifetime is that of the socket that asks, not of the app's socket,
 * which may be gone before the proxy asks. Writer: sock_ops (passive established).
 * Reader: getsockopt (SO_ORIGINAL_DST). */
BPF_SK_STORAGE(proxy_orig, struct orig_dst);

/* Counters by {pod, reason}. Writers: every hook. Reader: status, metrics. */
BPF_PERCPU_HASH(stats, struct stat_key, struct stat_value, MAX_STAT_KEYS);

/* The ingress filter, entry 0, one array per hook (a program array holds programs of
 * one type). Writer: loader. Readers: each pod's stub, xdp_pod or tc_pod, which
 * tail-calls it with the pod's netns cookie (in xdp_cookie_slot, in skb->cb). */
BPF_PROG_ARRAY(xdp_main, 1);
BPF_PROG_ARRAY(tc_main, 1);

/* The pod's netns cookie on its way from an XDP stub to xdp_ingress, index 0, one slot
 * per CPU: the stub writes it and tail-calls at once, the filter reads and clears it, on
 * the same CPU with nothing in between. (XDP metadata did this before; some kernel
 * builds refuse bpf_xdp_adjust_meta, and a map lookup every XDP program may use.)
 * Writer: xdp_pod. Reader: xdp_ingress. */
BPF_PERCPU_ARRAY(xdp_cookie_slot, __u64, 1);

/* Ingress filter settings per pod. Writer: enroll, `interceptor policy`.
 * Reader: the pod's XDP program. */
BPF_HASH(xdp_pods, __u64, struct xdp_pod_config, MAX_XDP_PODS);

/* Ingress policy sources: {CIDR_INGRESS_V4|V6, pod, prefix} -> source set id, longest
 * prefix wins; each set already holds the rules of every wider prefix (computed by
 * interceptor/ingress_policy.py). Writer: enroll, policy. Reader: XDP. */
BPF_F_TABLE("lpm_trie", struct cidr_key, __u32, ingress_sources, MAX_INGRESS_SOURCES,
	    BPF_F_NO_PREALLOC);

/* Ingress policy rules: {pod, source set, proto|0, port|0} -> MATCH_* bits.
 * Writer: enroll, policy. Reader: XDP. */
BPF_HASH(ingress_rules, struct ingress_rule_key, __u8, MAX_INGRESS_RULES);

/* Node-wide switches, index 0. Writer: loader. Readers: sock_ops. */
BPF_ARRAY(settings, struct node_settings, 1);

#endif
