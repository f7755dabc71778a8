"""The node agent (the DaemonSet), a front end: agent (adopt, load or upgrade the
datapath, keep the CNI chain, reconcile pods, serve /readyz and /metrics), cri and
protowire (containerd's CRI, for pods that started while the agent was away), dirwatch
(inotify on the CNI conf dir) and metrics (the Prometheus collector, also served by
`interceptor metrics`). Imports cni/ and everything below."""
