"""Values operators give (enroll options, CNI config keys, annotations, policy rules):
ports, port lists and CIDR lists. Errors are ValueErrors that name the setting.
Standard library only: the CNI plugin parses its configuration on every ADD."""
import ipaddress


def _split(values):
    if isinstance(values, str):
        values = values.split(",")
    return [str(v).strip() for v in values if str(v).strip()]


def parse_port(value, what):
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{what}: {port} is not in 1-65535")
    return port


def parse_ports(values, what):
    return sorted({parse_port(v, what) for v in _split(values)})


def parse_cidrs(values, what):
    """'*' means every address of both families."""
    out = []
    for v in _split(values):
        if v == "*":
            out += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
            continue
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ValueError(f"{what}: {v!r} is not a CIDR") from None
    return sorted(set(out), key=lambda n: (n.version, n.network_address, n.prefixlen))
