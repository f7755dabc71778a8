"""The protobuf wire format, for the handful of CRI messages the agent exchanges
(interceptor/agent/cri.py). Field numbers come from the public CRI API definition
(k8s.io/cri-api, package runtime.v1). A few dozen lines instead of generated code and
the protobuf runtime: the agent only builds small requests and reads a few fields.

A message is built as a list of (field number, value) pairs: int (varint), str/bytes
(length-delimited), a nested list (a sub-message), or a dict (a map<string, string>).
Parsing gives {field number: [raw values]}, nested messages parsed on demand.
"""
VARINT, LEN = 0, 2


def _varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode(fields):
    out = bytearray()
    for number, value in fields:
        if value is None:
            continue
        if isinstance(value, int):       # bool too
            out += _varint(number << 3 | VARINT) + _varint(int(value))
        elif isinstance(value, dict):          # map<string, string>: repeated entries
            for k, v in value.items():
                entry = encode([(1, k), (2, v)])
                out += _varint(number << 3 | LEN) + _varint(len(entry)) + entry
        else:
            data = encode(value) if isinstance(value, list) else \
                (value.encode() if isinstance(value, str) else bytes(value))
            out += _varint(number << 3 | LEN) + _varint(len(data)) + data
    return bytes(out)


def _read_varint(buf, i):
    n = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def decode(buf):
    """{field number: [value, ...]}: ints for varints, bytes for length-delimited."""
    out = {}
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, i = _read_varint(buf, i)
        elif wire == LEN:
            length, i = _read_varint(buf, i)
            value, i = bytes(buf[i:i + length]), i + length
        elif wire == 1:
            value, i = bytes(buf[i:i + 8]), i + 8
        elif wire == 5:
            value, i = bytes(buf[i:i + 4]), i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def first(msg, number, default=None):
    values = msg.get(number)
    return values[0] if values else default


def text(msg, number):
    return first(msg, number, b"").decode()


def string_map(msg, number):
    out = {}
    for entry in msg.get(number, []):
        e = decode(entry)
        out[text(e, 1)] = text(e, 2)
    return out
