"""A pod: its settings (podspec, every setting once: default, parser, CNI key,
annotation), its ingress policy, its record and journal on disk (podrecord) and the
problems verify can find in it. Imports the layers below (datapath, kernel, base)."""
