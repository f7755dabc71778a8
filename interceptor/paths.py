"""Where interceptor keeps things on a node. One place, so that load, enroll, status and
unload agree, and tests can see exactly what must be gone after unload."""
import os
import pathlib

BPFFS = pathlib.Path("/sys/fs/bpf")
PIN_ROOT = pathlib.Path(os.environ.get("INTERCEPTOR_PIN_ROOT", BPFFS / "interceptor"))
PIN_MAPS = PIN_ROOT / "maps"
PIN_PROGS = PIN_ROOT / "progs"
PIN_LINKS = PIN_ROOT / "links"          # node-wide cgroup attachments
PIN_PODS = PIN_ROOT / "pods"            # PIN_PODS/<netns cookie>/<link>: per-netns attachments

RUN_DIR = pathlib.Path(os.environ.get("INTERCEPTOR_RUN_DIR", "/run/interceptor"))
OWN_CGROUP2 = RUN_DIR / "cgroup2"       # mounted only when no cgroup2 mount exists
NODE_STATE = RUN_DIR / "node.json"
POD_STATE = RUN_DIR / "pods"            # POD_STATE/<netns cookie>.json
LOCK = RUN_DIR / "lock"


def pod_pin_dir(cookie):
    return PIN_PODS / str(cookie)


def pod_state_file(cookie):
    return POD_STATE / f"{cookie}.json"
