"""Map capacities an operator sets at load time (`--map-size MAP=N`, repeatable).

The defaults are abi.py's; a node that outgrows one (more pods, more concurrent
connections) is resized in place by `interceptor upgrade --map-size` or by an agent
started with other sizes: the upgrade migrates the map's entries (migrate.py)."""
from interceptor.abi import MAP_CAPACITY

# A prealloc'd hash of 16M entries already costs gigabytes of kernel memory.
LARGEST = 1 << 24


class MapSizeError(ValueError):
    pass


def parse(items):
    """["pods=8192", ...] -> {"pods": 8192}; MapSizeError names what is wrong."""
    sizes = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise MapSizeError(f"{item!r}: expected MAP=ENTRIES")
        if name not in MAP_CAPACITY:
            raise MapSizeError(f"{name!r} is not a map with a settable size "
                               f"(one of: {', '.join(sorted(MAP_CAPACITY))})")
        if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= LARGEST:
            raise MapSizeError(f"{item!r}: the size must be a whole number from 1 to {LARGEST}")
        sizes[name] = int(value)
    return sizes
