"""Assembles the C files in bpf/ into the one translation unit BCC compiles.

BCC rewrites map method calls (`pods.lookup(&k)`) only in the text it was given, not in
files reached through #include, and turns only functions of that text into programs.
So our own quoted includes are inlined here (each once, with #line markers so compiler
errors still name the right file); system includes stay as they are.
"""
import os
import pathlib
import re

_PACKAGE = pathlib.Path(__file__).resolve().parent.parent
# Installed (wheel, container image): the sources ship inside the package as
# interceptor/bpf (pyproject maps the repo's bpf/ there); in a checkout they sit beside
# the package.
# INTERCEPTOR_BPF_DIR: another tree of sources (development; the upgrade tests build a
# changed datapath this way).
BPF_DIR = pathlib.Path(os.environ["INTERCEPTOR_BPF_DIR"]) if os.environ.get("INTERCEPTOR_BPF_DIR") else \
    next((d for d in (_PACKAGE / "bpf", _PACKAGE.parent / "bpf") if (d / "lib" / "maps.h").exists()),
         _PACKAGE / "bpf")

# One file per hook family; all share lib/maps.h, so they are compiled together.
HOOK_FILES = ("sock_connect.c", "sock_dns.c", "sockopt.c", "sockops.c", "sk_msg.c", "sk_lookup.c",
              "xdp_ingress.c")

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def assemble(files=HOOK_FILES, bpf_dir=BPF_DIR):
    seen = set()
    out = []

    def inline(path):
        path = path.resolve()
        if path in seen:
            return
        seen.add(path)
        rel = path.relative_to(bpf_dir.parent)
        out.append(f'#line 1 "{rel}"')
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            m = _LOCAL_INCLUDE.match(line)
            if m:
                inline(path.parent / m.group(1))
                out.append(f'#line {lineno + 1} "{rel}"')
            else:
                out.append(line)

    for name in files:
        inline(bpf_dir / name)
    return "\n".join(out) + "\n"


def capacity_flags(map_sizes):
    """-D flags that set the capacities an operator chose (abi.MAP_CAPACITY); the
    header's defaults hold for the rest."""
    from interceptor.abi import MAP_CAPACITY
    return [f"-D{MAP_CAPACITY[name]}={size}" for name, size in sorted((map_sizes or {}).items())]


def compile_flags(host_netns_cookie, map_sizes=None):
    """Every flag BCC compiles the datapath with: the loader's and an upgrade's, alike."""
    return [f"-DHOST_NETNS_COOKIE={host_netns_cookie}"] + capacity_flags(map_sizes)


def datapath_version(map_sizes=None, files=HOOK_FILES, bpf_dir=BPF_DIR):
    """Which datapath this is: a digest of the one translation unit BCC compiles (map
    layouts included, through abi.h and maps.h) and of the capacities chosen for it. Two
    builds with equal versions load the same programs and maps, so an agent of either
    adopts the other's; any other version is upgraded in place (maps migrated)."""
    import hashlib
    digest = hashlib.sha256(assemble(files, bpf_dir).encode())
    for flag in capacity_flags(map_sizes):
        digest.update(b"\0" + flag.encode())
    return digest.hexdigest()[:12]
