"""What proves and measures the datapath, never what a node runs: lab (pods in network
namespaces), envoy_sidecar (Envoy as Istio configures a sidecar), selfcheck, demo and
bench/. Needs the `harness` extra (pyroute2, scapy), so the agent's image carries
neither; only cli.py imports it, lazily. Nothing below imports it."""
