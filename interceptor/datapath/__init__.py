"""The datapath's definitions: the plan (which mechanism serves each capability), the
programs and the maps (each map's layout and capacity, read through maps.Maps), how
the C sources are assembled and compiled into a Build, the per-pod stubs' templates,
map migration, and the node state that records what was loaded. Imports kernel/ and
the base."""
