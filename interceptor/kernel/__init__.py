"""Kernel access, knowing nothing of pods or plans: libc and libbpf through ctypes,
netlink, mounts, network namespaces (and their cookies), the inbound listeners'
sockets, and REDIRECT rules through nft/iptables. Imports only the package's base
(paths, abi, store)."""
