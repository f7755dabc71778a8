"""The CNI plugin, a front end: plugin (the request's commands: VERSION, ADD, DEL,
CHECK, GC, STATUS), config (the request decoded once: which pod, which settings),
defaults (the kubelet's directories), install (the plugin file and its chaining by
hand), chain (the agent's chained copy of the primary's configuration), front (builds
front.c, the static executable the plugin is installed as), server (the node agent's
end of front.c's socket). `python -m interceptor.cni` runs the plugin."""
