"""Values operators give (enroll options, CNI config keys, annotations, policy rules):
ports, port lists and CIDR lists. Errors are ValueErrors saying what is wrong with the
value; the caller names the setting (interceptor/pod/podspec.py). Standard library only:
the CNI plugin parses its configuration on every ADD."""
import ipaddress


def _split(values):
    """A list from a list, a comma-separated string or a single number; anything else
    (an object, a boolean, nesting) is an error, not a crash."""
    if isinstance(values, str):
        values = values.split(",")
    elif isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    elif not isinstance(values, (list, tuple)):
        raise ValueError(f"{values!r} is not a list or a comma-separated string")
    out = []
    for v in values:
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            raise ValueError(f"{v!r} is not a single value")
        if str(v).strip():
            out.append(str(v).strip())
    return out


def words(values):
    """A list of names, from a list or a comma-separated string."""
    return _split(values)


def port(value):
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{value!r} is not a port number")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a port number") from None
    if not 1 <= number <= 65535:
        raise ValueError(f"{number} is not in 1-65535")
    return number


# A port list is expanded to single ports (the hooks look each one up in a hash map,
# port_rules, 65,536 entries for every pod of the node): a bound keeps one pod's range
# from filling it.
MAX_LISTED_PORTS = 16384


def ports(values):
    """Sorted, without duplicates. An item may be a range, LOW-HIGH (as Linkerd's
    skip-ports take)."""
    out = set()
    for v in _split(values):
        low, sep, high = str(v).partition("-")
        if not sep:
            out.add(port(v))
            continue
        first, last = port(low.strip()), port(high.strip())
        if first > last:
            raise ValueError(f"{v!r}: the range's low end is above its high end")
        out.update(range(first, last + 1))
        if len(out) > MAX_LISTED_PORTS:
            raise ValueError(f"more than {MAX_LISTED_PORTS} ports")
    if len(out) > MAX_LISTED_PORTS:
        raise ValueError(f"more than {MAX_LISTED_PORTS} ports")
    return sorted(out)


def cidrs(values):
    """'*' means every address of both families. Sorted, without duplicates."""
    out = []
    for v in _split(values):
        if v == "*":
            out += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
            continue
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ValueError(f"{v!r} is not a CIDR") from None
    return sorted(set(out), key=lambda n: (n.version, n.network_address, n.prefixlen))


def parse_port(value, what):
    """port(), with the error naming what the value is."""
    try:
        return port(value)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
