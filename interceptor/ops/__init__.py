"""Operations on a node, each one entry point: doctor and capabilities (what this kernel
accepts, the plan chosen), loader (load, unload), upgrade (new programs in place,
repair), enrollment (a pod's pieces applied as a journal, undone in reverse), policy,
status and counters, residue (what unload must leave behind: nothing), map sizes and
operation counts. Imports pieces/ and everything below."""
