"""Where the CNI plugin and configuration live on a node, by default. Kept free of
imports: the CLI reads these when it starts, before `bench` has chosen its own pin and
state directories (interceptor.paths reads those from the environment when imported)."""
BIN_DIR = "/opt/cni/bin"
CONF_DIR = "/etc/cni/net.d"
CHAIN_NAME = "00-interceptor.conflist"     # the agent's chained copy; sorts before the primary's
