/* GENERATED from interceptor/abi.py by `make abi`: do not edit by hand. */
#ifndef INTERCEPTOR_ABI_H
#define INTERCEPTOR_ABI_H

#define PROXY_UID 1337
#define PROXY_GID 1337
#define OUTBOUND_PORT 15001
#define INBOUND_PORT 15006
#define HBONE_PORT 15008
#define INBOUND_SOURCE_V4_INT 2130706438
#define INBOUND_SOURCE_V6_LAST_WORD 6
#ifndef MAX_PODS
#define MAX_PODS 4096
#endif
#ifndef MAX_POD_ADDRS
#define MAX_POD_ADDRS 16384
#endif
#ifndef MAX_CIDRS
#define MAX_CIDRS 65536
#endif
#ifndef MAX_PORT_RULES
#define MAX_PORT_RULES 65536
#endif
#ifndef MAX_REDIRECTED_SOCKETS
#define MAX_REDIRECTED_SOCKETS 65536
#endif
#ifndef MAX_BYPASS_SOCKETS
#define MAX_BYPASS_SOCKETS 65536
#endif
#ifndef MAX_LISTENERS
#define MAX_LISTENERS 8192
#endif
#ifndef MAX_STAT_KEYS
#define MAX_STAT_KEYS 65536
#endif
#ifndef MAX_OWNER_RULES
#define MAX_OWNER_RULES 16384
#endif
#define POD_F_PASSTHROUGH 1
#define POD_F_BYPASS 2
#define POD_F_OUT_PORTS_INCLUDE 4
#define POD_F_IN_PORTS_INCLUDE 8
#define POD_F_BYPASS_OUTBOUND 16
#define POD_F_BYPASS_MESH 32
#define POD_F_BYPASS_INBOUND 64
#define POD_F_MORE_PROXY_IDS 128
#define POD_F_USERS_INCLUDE 256
#define POD_F_USERS_EXCLUDE 512
#define POD_F_GROUPS_INCLUDE 1024
#define POD_F_GROUPS_EXCLUDE 2048
#define POD_F_DNS 4096
#define POD_F_DNS_ALL 8192
#define POD_F_LOOPBACK_INCLUDED 16384
#define POD_F_EXCLUDE_IFACES 32768
#define POD_F_HOST_LOOPBACK 65536
#define IFACE_EXCLUDED 1
#define IFACE_KEPT 2
#define DNS_PORT 15053
#define DNS_SERVER_PORT 53
#define NODE_F_BYPASS 1
#define CIDR_KEY_FIXED_BITS 96
#define DIR_OUTBOUND 1
#define DIR_INBOUND 2
#define CONN_F_ESTABLISHED 1
#define CONN_F_BYPASSED 2
#ifndef MAX_INGRESS_SOURCES
#define MAX_INGRESS_SOURCES 65536
#endif
#ifndef MAX_INGRESS_RULES
#define MAX_INGRESS_RULES 65536
#endif
#ifndef MAX_XDP_PODS
#define MAX_XDP_PODS 4096
#endif
#define XDP_MAX_VLAN_TAGS 2
#define XDP_MAX_EXT_HEADERS 6
#define XDP_COOKIE_PLACEHOLDER 0x1c0ffee0deadbeefULL
#define XDP_F_ALLOW_ONLY 1
#define MATCH_DENY 1
#define MATCH_ALLOW 2

#define PORT_OUT_INCLUDE 1
#define PORT_OUT_EXCLUDE 2
#define PORT_IN_INCLUDE 3
#define PORT_IN_EXCLUDE 4
#define PORT_PROTECTED 5
#define PORT_IN_EXCLUDE_IFINDEX 6

#define CIDR_OUT_INCLUDE 1
#define CIDR_OUT_EXCLUDE 2
#define CIDR_INGRESS_V4 3
#define CIDR_INGRESS_V6 4
#define CIDR_DNS_SERVER 5
#define CIDR_IFACE_ROUTE 6
#define CIDR_HOST_LOOPBACK 7

#define OWNER_PROXY_UID 1
#define OWNER_PROXY_GID 2
#define OWNER_USER_INCLUDE 3
#define OWNER_USER_EXCLUDE 4
#define OWNER_GROUP_INCLUDE 5
#define OWNER_GROUP_EXCLUDE 6

#define REASON_OUT_REDIRECTED 1
#define REASON_OUT_SKIP_PROXY_OWNER 2
#define REASON_OUT_SKIP_LOOPBACK 3
#define REASON_OUT_SKIP_LOCAL_POD 4
#define REASON_OUT_SKIP_EXCLUDED_PORT 5
#define REASON_OUT_SKIP_EXCLUDED_CIDR 6
#define REASON_OUT_SKIP_NOT_INCLUDED 7
#define REASON_OUT_PASSTHROUGH_NO_PROXY 8
#define REASON_OUT_REJECTED_NO_PROXY 9
#define REASON_ORIG_DST_ANSWERED 10
#define REASON_ORIG_DST_UNKNOWN 11
#define REASON_PEERNAME_RESTORED 12
#define REASON_IN_STEERED 13
#define REASON_IN_SKIP_EXCLUDED_PORT 14
#define REASON_IN_SKIP_LOCAL 15
#define REASON_IN_PASSTHROUGH_NO_PROXY 16
#define REASON_IN_REJECTED_NO_PROXY 17
#define REASON_BYPASS_SOCKET_ADDED 18
#define REASON_BYPASS_MSG_REDIRECTED 19
#define REASON_BYPASS_MSG_NO_PEER 20
#define REASON_ORIG_DST_RECORD_FAILED 21
#define REASON_INGRESS_PASSED 22
#define REASON_INGRESS_PASSED_NON_IP 23
#define REASON_INGRESS_PASSED_FRAGMENT 24
#define REASON_INGRESS_DROPPED_PROTECTED_PORT 25
#define REASON_INGRESS_DROPPED_DENIED 26
#define REASON_INGRESS_DROPPED_NOT_ALLOWED 27
#define REASON_INGRESS_DROPPED_MALFORMED 28
#define REASON_OUT_REFUSED_PROXY_LOOP 29
#define REASON_LISTENER_RECORD_FAILED 30
#define REASON_ORIG_DST_OWN_ADDRESS 31
#define REASON_OUT_SELF_TO_INBOUND 32
#define REASON_OUT_SKIP_INBOUND_SOURCE 33
#define REASON_OUT_DNS_REDIRECTED 34
#define REASON_OUT_SKIP_OWNER_FILTER 35
#define REASON_OUT_SKIP_EXCLUDED_INTERFACE 36
#define REASON_OUT_SKIP_MARK 37
#define REASON_IN_SKIP_EXCLUDED_INTERFACE 38
#define REASON_OUT_REROUTED 39
#define REASON_DNS_ANSWER_RESTORED 40
#define REASON_DNS_ZONE 41
#define REASON_MAX 42

struct pod_config {
	__u32 proxy_uid;
	__u32 proxy_gid;
	__u16 outbound_port;
	__u16 inbound_port;
	__u32 flags;
	__u32 skip_mark;
	__u32 skip_mark_mask;
};
_Static_assert(sizeof(struct pod_config) == 24, "pod_config layout differs from interceptor/abi.py");

struct pod_addr_key {
	__u8 addr[16];
};
_Static_assert(sizeof(struct pod_addr_key) == 16, "pod_addr_key layout differs from interceptor/abi.py");

struct port_key {
	__u64 netns_cookie;
	__u16 port;
	__u8 kind;
	__u8 pad[5];
};
_Static_assert(sizeof(struct port_key) == 16, "port_key layout differs from interceptor/abi.py");

struct owner_key {
	__u64 netns_cookie;
	__u32 id;
	__u32 kind;
};
_Static_assert(sizeof(struct owner_key) == 16, "owner_key layout differs from interceptor/abi.py");

struct cidr_key {
	__u32 prefixlen;
	__u32 kind;
	__u64 netns_cookie;
	__u8 addr[16];
};
_Static_assert(sizeof(struct cidr_key) == 32, "cidr_key layout differs from interceptor/abi.py");

struct listener_key {
	__u64 netns_cookie;
	__u32 family;
	__u32 pad;
};
_Static_assert(sizeof(struct listener_key) == 16, "listener_key layout differs from interceptor/abi.py");

struct sock_tuple {
	__u64 netns_cookie;
	__u8 local[16];
	__u8 remote[16];
	__u16 local_port;
	__u16 remote_port;
	__u32 pad;
};
_Static_assert(sizeof(struct sock_tuple) == 48, "sock_tuple layout differs from interceptor/abi.py");

struct orig_dst {
	__u8 addr[16];
	__u16 port;
	__u16 family;
	__u8 direction;
	__u8 flags;
	__u16 proxy_port;
	__u64 netns_cookie;
	__u64 created_ns;
};
_Static_assert(sizeof(struct orig_dst) == 40, "orig_dst layout differs from interceptor/abi.py");

struct stat_key {
	__u64 netns_cookie;
	__u32 reason;
	__u32 pad;
};
_Static_assert(sizeof(struct stat_key) == 16, "stat_key layout differs from interceptor/abi.py");

struct stat_value {
	__u64 count;
	__u64 bytes;
};
_Static_assert(sizeof(struct stat_value) == 16, "stat_value layout differs from interceptor/abi.py");

struct node_settings {
	__u32 flags;
};
_Static_assert(sizeof(struct node_settings) == 4, "node_settings layout differs from interceptor/abi.py");

struct xdp_pod_config {
	__u32 flags;
	__u16 ephemeral_low;
	__u16 pad;
};
_Static_assert(sizeof(struct xdp_pod_config) == 8, "xdp_pod_config layout differs from interceptor/abi.py");

struct ingress_rule_key {
	__u64 netns_cookie;
	__u32 source_set;
	__u16 port;
	__u8 proto;
	__u8 pad;
};
_Static_assert(sizeof(struct ingress_rule_key) == 16, "ingress_rule_key layout differs from interceptor/abi.py");

#endif
