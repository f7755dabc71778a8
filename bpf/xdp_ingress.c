/* The ingress filter on each enrolled pod's own interface (inside its network
 * namespace), judging every packet entering the pod before the stack does. One verdict,
 * compiled for two hooks: XDP (xdp_ingress) and tc ingress (tc_ingress, a cls_bpf
 * filter in direct-action mode). On a veth tc is the default: generic XDP must give
 * every skb a linear copy with headroom (bulk TCP into a pod paid for it), and each
 * distinct XDP program attached or detached rebuilds the kernel's XDP dispatcher and
 * waits out an RCU grace period (5-20 ms of every pod start and stop). tc works on the
 * skb as it is. XDP stays for other drivers and when a pod asks for it.
 *
 * Neither XDP nor (before Linux 6.15) tc has a netns-cookie helper, and ifindexes repeat
 * across namespaces, so the program cannot tell by itself whose interface it runs on.
 * Each pod gets a stub of its own, xdp_pod or tc_pod, loaded by enroll from a saved copy
 * with the pod's cookie in place of XDP_COOKIE_PLACEHOLDER (interceptor/xdp.py); the stub
 * puts the cookie in a per-CPU slot (xdp_cookie_slot) or skb->cb and tail-calls the
 * hook's filter, which the loader verified once. Not the XDP metadata: some kernel
 * builds refuse bpf_xdp_adjust_meta to every XDP program. (A full copy per pod took the verifier ~45 ms at every pod
 * start; the stub takes well under one.)
 *
 * Verdicts, in order:
 *   non-IP (ARP, LLDP, ...)                        pass   ingress_passed_non_ip
 *   truncated or inconsistent IP/L4 headers        drop   ingress_dropped_malformed
 *   non-first fragment                              pass   ingress_passed_fragment
 *     (it carries no L4 header; without its first fragment, which is judged, it can
 *      never be reassembled. A TCP fragment at offset 8 bytes (RFC 1858) is dropped.)
 *   to a protected port (TCP, UDP, SCTP)            drop   ingress_dropped_protected_port
 *   matching a deny rule                            drop   ingress_dropped_denied
 *   pod has allow rules, no allow rule matches, and
 *     the packet opens a flow (TCP SYN without ACK, or UDP to a port below the pod's
 *     ephemeral range)                              drop   ingress_dropped_not_allowed
 *   otherwise                                       pass   ingress_passed
 * Allow-only judges flow openings only, because XDP keeps no state: replies to the
 * pod's own connections (and ICMP errors such as "fragmentation needed") must pass. */
#include "lib/helpers.h"
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>

#define IC_ETH_P_8021Q 0x8100
#define IC_ETH_P_8021AD 0x88A8
#define IC_IPPROTO_HOPOPTS 0
#define IC_IPPROTO_ROUTING 43
#define IC_IPPROTO_FRAGMENT 44
#define IC_IPPROTO_AH 51
#define IC_IPPROTO_DSTOPTS 60
#define IC_IPPROTO_SCTP 132
#define IC_IP_MF 0x2000
#define IC_IP_OFFSET 0x1fff
#define IC_TCP_FLAG_SYN 0x02
#define IC_TCP_FLAG_ACK 0x10

struct ic_vlan_hdr {
	__be16 tci;
	__be16 encapsulated_proto;
};

struct ic_ipv6_opt_hdr {
	__u8 nexthdr;
	__u8 hdrlen;
};

struct ic_ipv6_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;	/* offset in 8-byte units << 3 | flags */
	__be32 identification;
};

/* What the filter needs to know about one packet. */
struct ingress_pkt {
	struct addr16 src;
	__u32 cidr_kind;	/* CIDR_INGRESS_V4 or _V6 */
	__u8 proto;
	__u8 has_port;
	__u8 opens_tcp;		/* SYN without ACK */
	__u8 pad;
	__u16 dport;		/* host order */
};

enum parse_result {
	PARSED,
	NOT_IP,
	MALFORMED,
	LATER_FRAGMENT,
};

/* Reads the transport header at l4 (TCP needs its full 20 bytes: its flags are judged).
 * A first fragment too short for that is malformed (RFC 1858 tiny fragments). */
static __always_inline int parse_l4(void *l4, void *end, struct ingress_pkt *p)
{
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > end)
			return MALFORMED;
		p->dport = bpf_ntohs(th->dest);
		p->has_port = 1;
		__u8 flags = ((__u8 *)th)[13];
		p->opens_tcp = (flags & (IC_TCP_FLAG_SYN | IC_TCP_FLAG_ACK)) == IC_TCP_FLAG_SYN;
	} else if (p->proto == IPPROTO_UDP || p->proto == IC_IPPROTO_SCTP) {
		/* both start with source port, destination port */
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > end)
			return MALFORMED;
		p->dport = bpf_ntohs(uh->dest);
		p->has_port = 1;
	}
	return PARSED;
}

static __always_inline int parse_ipv4(void *pos, void *end, struct ingress_pkt *p)
{
	struct iphdr *ip = pos;
	if ((void *)(ip + 1) > end)
		return MALFORMED;
	__u32 hlen = ip->ihl * 4;
	if (ip->version != 4 || hlen < sizeof(*ip) || bpf_ntohs(ip->tot_len) < hlen)
		return MALFORMED;
	if (pos + hlen > end)	/* options run past the packet */
		return MALFORMED;
	addr_set_v4(&p->src, ip->saddr);
	p->cidr_kind = CIDR_INGRESS_V4;
	p->proto = ip->protocol;
	__u16 frag = bpf_ntohs(ip->frag_off);
	if (frag & IC_IP_OFFSET) {
		if (p->proto == IPPROTO_TCP && (frag & IC_IP_OFFSET) == 1)
			return MALFORMED;	/* would overwrite the first fragment's TCP flags */
		return LATER_FRAGMENT;
	}
	return parse_l4(pos + hlen, end, p);
}

static __always_inline int parse_ipv6(void *pos, void *end, struct ingress_pkt *p)
{
	struct ipv6hdr *ip6 = pos;
	if ((void *)(ip6 + 1) > end)
		return MALFORMED;
	if (ip6->version != 6)
		return MALFORMED;
	__builtin_memcpy(&p->src, &ip6->saddr, 16);
	p->cidr_kind = CIDR_INGRESS_V6;
	__u8 next = ip6->nexthdr;
	pos = ip6 + 1;

#pragma unroll
	for (int i = 0; i < XDP_MAX_EXT_HEADERS; i++) {
		if (next == IC_IPPROTO_HOPOPTS || next == IC_IPPROTO_ROUTING ||
		    next == IC_IPPROTO_DSTOPTS || next == IC_IPPROTO_AH) {
			struct ic_ipv6_opt_hdr *h = pos;
			if ((void *)(h + 1) > end)
				return MALFORMED;
			__u8 this = next;
			next = h->nexthdr;
			/* AH counts 4-byte units minus 2, the others 8-byte units minus 1 */
			if (this == IC_IPPROTO_AH)
				pos += ((__u32)h->hdrlen + 2) * 4;
			else
				pos += ((__u32)h->hdrlen + 1) * 8;
		} else if (next == IC_IPPROTO_FRAGMENT) {
			struct ic_ipv6_frag_hdr *f = pos;
			if ((void *)(f + 1) > end)
				return MALFORMED;
			next = f->nexthdr;
			__u16 off = bpf_ntohs(f->frag_off) >> 3;
			if (off) {
				p->proto = next;
				if (next == IPPROTO_TCP && off == 1)
					return MALFORMED;
				return LATER_FRAGMENT;
			}
			pos = f + 1;
		} else {
			p->proto = next;
			return parse_l4(pos, end, p);
		}
	}
	/* more extension headers than we walk: refusing is safer than guessing */
	return MALFORMED;
}

/* pos..end: the frame from its Ethernet header. */
static __always_inline int parse(void *pos, void *end, struct ingress_pkt *p)
{
	struct ethhdr *eth = pos;
	if ((void *)(eth + 1) > end)
		return NOT_IP;	/* a runt frame: the stack's business, not policy's */
	__u16 type = bpf_ntohs(eth->h_proto);
	pos = eth + 1;
#pragma unroll
	for (int i = 0; i < XDP_MAX_VLAN_TAGS; i++) {
		if (type != IC_ETH_P_8021Q && type != IC_ETH_P_8021AD)
			break;
		struct ic_vlan_hdr *vh = pos;
		if ((void *)(vh + 1) > end)
			return MALFORMED;
		type = bpf_ntohs(vh->encapsulated_proto);
		pos = vh + 1;
	}
	if (type == ETH_P_IP)
		return parse_ipv4(pos, end, p);
	if (type == ETH_P_IPV6)
		return parse_ipv6(pos, end, p);
	return NOT_IP;
}

static __always_inline __u8 rule_bits(struct ingress_rule_key *key, __u8 proto, __u16 port)
{
	key->proto = proto;
	key->port = port;
	__u8 *bits = ingress_rules.lookup(key);
	return bits ? *bits : 0;
}

/* MATCH_* bits of every rule that applies to this packet: the source's most specific
 * prefix gives a set (holding the rules of wider prefixes too), then the four
 * {proto|any, port|any} combinations. */
static __always_inline __u8 policy_match(__u64 cookie, struct ingress_pkt *p)
{
	struct cidr_key src = {};
	src.prefixlen = CIDR_KEY_FIXED_BITS + 128;
	src.kind = p->cidr_kind;
	src.netns_cookie = cookie;
	__builtin_memcpy(src.addr, &p->src, 16);
	__u32 *set = ingress_sources.lookup(&src);
	if (!set)
		return 0;
	struct ingress_rule_key key = {};
	key.netns_cookie = cookie;
	key.source_set = *set;
	__u8 match = rule_bits(&key, p->proto, 0) | rule_bits(&key, 0, 0);
	if (p->has_port)
		match |= rule_bits(&key, p->proto, p->dport) | rule_bits(&key, 0, p->dport);
	return match;
}

static __always_inline int opens_flow(struct ingress_pkt *p, struct xdp_pod_config *cfg)
{
	if (p->proto == IPPROTO_TCP)
		return p->opens_tcp;
	if (p->proto == IPPROTO_UDP)
		return p->dport < cfg->ephemeral_low;
	return 0;
}

/* The reason for a parsed packet; the REASON_INGRESS_DROPPED_* ones drop it. */
static __always_inline __u32 policy_reason(__u64 cookie, struct xdp_pod_config *cfg,
					   struct ingress_pkt *p)
{
	if (p->has_port && port_listed(cookie, p->dport, PORT_PROTECTED))
		return REASON_INGRESS_DROPPED_PROTECTED_PORT;
	__u8 match = policy_match(cookie, p);
	if (match & MATCH_DENY)
		return REASON_INGRESS_DROPPED_DENIED;
	if ((cfg->flags & XDP_F_ALLOW_ONLY) && !(match & MATCH_ALLOW) && opens_flow(p, cfg))
		return REASON_INGRESS_DROPPED_NOT_ALLOWED;
	return REASON_INGRESS_PASSED;
}

/* The verdict on one frame, for either hook: its reason (counted here) and whether
 * it is dropped. */
static __always_inline int judge(__u64 cookie, struct xdp_pod_config *cfg, int parsed,
				 struct ingress_pkt *p, __u64 bytes)
{
	__u32 reason;
	switch (parsed) {
	case NOT_IP:
		reason = REASON_INGRESS_PASSED_NON_IP;
		break;
	case MALFORMED:
		reason = REASON_INGRESS_DROPPED_MALFORMED;
		break;
	case LATER_FRAGMENT:
		reason = REASON_INGRESS_PASSED_FRAGMENT;
		break;
	default:
		reason = policy_reason(cookie, cfg, p);
	}
	count(cookie, reason, bytes);
	return reason == REASON_INGRESS_DROPPED_MALFORMED ||
	       reason == REASON_INGRESS_DROPPED_PROTECTED_PORT ||
	       reason == REASON_INGRESS_DROPPED_DENIED ||
	       reason == REASON_INGRESS_DROPPED_NOT_ALLOWED;
}

int xdp_pod(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *slot = xdp_cookie_slot.lookup(&zero);
	if (!slot)
		return XDP_PASS;
	*slot = XDP_COOKIE_PLACEHOLDER;
	xdp_main.call(ctx, 0);
	/* only while the loader replaces xdp_ingress: pass, as without a filter */
	*slot = 0;
	return XDP_PASS;
}

int xdp_ingress(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *slot = xdp_cookie_slot.lookup(&zero);
	if (!slot)
		return XDP_PASS;
	__u64 cookie = *slot;
	*slot = 0;	/* read once: a frame not handed on by a stub finds no cookie */
	if (!cookie)
		return XDP_PASS;	/* not reached through a pod's stub */
	struct xdp_pod_config *cfg = xdp_pods.lookup(&cookie);
	if (!cfg)
		return XDP_PASS;	/* being removed: no counters re-created */
	void *pos = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ingress_pkt p = {};
	int parsed = parse(pos, end, &p);
	return judge(cookie, cfg, parsed, &p, end - pos) ? XDP_DROP : XDP_PASS;
}

/* tc: the cookie travels in skb->cb[0..1] (tc's scratch space, kept across a tail
 * call); one 8-byte store, so the placeholder stays one 64-bit immediate. */
int tc_pod(struct __sk_buff *skb)
{
	*(__u64 *)&skb->cb[0] = XDP_COOKIE_PLACEHOLDER;
	tc_main.call(skb, 0);
	return TC_ACT_UNSPEC;	/* only while the loader replaces tc_ingress */
}

int tc_ingress(struct __sk_buff *skb)
{
	__u64 cookie = *(__u64 *)&skb->cb[0];
	struct xdp_pod_config *cfg = xdp_pods.lookup(&cookie);
	if (!cfg)
		return TC_ACT_UNSPEC;	/* being removed, or not reached through a stub */
	struct ingress_pkt p = {};
	int parsed = parse((void *)(long)skb->data, (void *)(long)skb->data_end, &p);
	if (parsed == MALFORMED && skb->data_end - skb->data < skb->len) {
		/* the headers may go on past the skb's linear part (rare: the stack and GRO
		 * keep them linear): judge malformed only on the whole frame, as XDP sees it */
		if (bpf_skb_pull_data(skb, skb->len))
			return TC_ACT_UNSPEC;
		__builtin_memset(&p, 0, sizeof(p));
		parsed = parse((void *)(long)skb->data, (void *)(long)skb->data_end, &p);
	}
	return judge(cookie, cfg, parsed, &p, skb->len) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}
