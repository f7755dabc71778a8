"""Per-pod stubs of the ingress filter, one per hook (XDP, tc): the template the loader
saves, and the copy enroll loads for each pod.

Neither hook's program can ask for its network namespace's cookie (tc only since Linux
6.15), and interface indexes repeat across namespaces, so one shared program could not
tell pods apart. Each pod gets its own small stub (xdp_pod or tc_pod in
bpf/xdp_ingress.c) that hands the pod's cookie on and tail-calls the filter the loader
verified once. The loader saves the stub's compiled instructions with a placeholder
constant (and which pinned map each map reference means); enroll patches in the pod's
cookie and the map fds it opened from the pins and loads the result: no compiler, and a
verifier pass over some 10-25 instructions.
"""
import collections
import os

from interceptor import abi, paths, store
from interceptor.kernel import libbpf
from interceptor.datapath.insns import PSEUDO_MAP_FD, imm64s, set_imm64

# hook: "xdp" or "tc"; prog_name: the stub's C function; template: where load saves it.
StubKind = collections.namedtuple("StubKind", "hook prog_name prog_type template")
XDP = StubKind("xdp", "xdp_pod", libbpf.ProgType.XDP, paths.XDP_TEMPLATE)
TC = StubKind("tc", "tc_pod", libbpf.ProgType.SCHED_CLS, paths.TC_TEMPLATE)
KINDS = (XDP, TC)
BY_PROG = {k.prog_name: k for k in KINDS}


class StubError(Exception):
    pass


def save_template(kind, insns, map_names_by_fd):
    """insns: the compiled stub (BCC's dump_func, map references as the loader's fds).
    Records each map reference by name and where the cookie placeholder sits."""
    relocs, cookie_at = [], []
    for i, src, value in imm64s(insns):
        if src == PSEUDO_MAP_FD:
            if value not in map_names_by_fd:
                raise StubError(f"{kind.prog_name}: instruction {i} refers to an unknown map fd {value}")
            relocs.append([i, map_names_by_fd[value]])
        elif src == 0 and value == abi.XDP_COOKIE_PLACEHOLDER:
            cookie_at.append(i)
    if not cookie_at:
        raise StubError(f"the compiled {kind.prog_name} does not contain the cookie placeholder")
    store.write_json(kind.template, {"insns": insns.hex(), "maps": relocs, "cookie_at": cookie_at})


def template_maps():
    """The maps the loaded pods' stubs refer to (each stub holds them itself)."""
    names = set()
    for kind in KINDS:
        template = store.read_json(kind.template)
        if template:
            names |= {name for _, name in template["maps"]}
    return names


def remove_templates():
    for kind in KINDS:
        store.remove(kind.template)


def _instance(template, cookie, map_fds):
    insns = bytearray(bytes.fromhex(template["insns"]))
    for i, name in template["maps"]:
        set_imm64(insns, i, map_fds[name])
    for i in template["cookie_at"]:
        set_imm64(insns, i, cookie)
    return bytes(insns)


def load_for_pod(kind, cookie):
    """A loaded copy of the hook's stub for this pod; returns its fd."""
    template = store.read_json(kind.template)
    if template is None:
        raise StubError(f"no {kind.hook} ingress filter template: the datapath was loaded "
                        "without the ingress filter, or by a version without this hook")
    map_fds = {}
    try:
        for _, name in template["maps"]:
            if name not in map_fds:
                map_fds[name] = libbpf.obj_get(paths.map_pin(name))
        return libbpf.prog_load(kind.prog_type, kind.prog_name, _instance(template, cookie, map_fds))
    finally:
        for fd in map_fds.values():
            os.close(fd)
