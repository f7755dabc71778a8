"""Where interceptor keeps things on a node. One place, so that load, enroll, status and
unload agree, and tests can see exactly what must be gone after unload.

Plain strings and os.path, not pathlib: this module is imported by every CNI call, and
pathlib's imports cost more than the rest of an ADD.
"""
import os

BPFFS = "/sys/fs/bpf"
DEFAULT_PIN_ROOT = os.path.join(BPFFS, "interceptor")
DEFAULT_RUN_DIR = "/run/interceptor"
PIN_ROOT = os.environ.get("INTERCEPTOR_PIN_ROOT", DEFAULT_PIN_ROOT)
PIN_MAPS = os.path.join(PIN_ROOT, "maps")
PIN_PROGS = os.path.join(PIN_ROOT, "progs")
PIN_LINKS = os.path.join(PIN_ROOT, "links")     # node-wide cgroup attachments
PIN_PODS = os.path.join(PIN_ROOT, "pods")       # PIN_PODS/<netns cookie>/<link>: per-netns attachments

RUN_DIR = os.environ.get("INTERCEPTOR_RUN_DIR", DEFAULT_RUN_DIR)
OWN_CGROUP2 = os.path.join(RUN_DIR, "cgroup2")  # mounted only when no cgroup2 mount exists
NODE_STATE = os.path.join(RUN_DIR, "node.json")
POD_STATE = os.path.join(RUN_DIR, "pods")       # POD_STATE/<netns cookie>.json
LOCK = os.path.join(RUN_DIR, "lock")
OPSTATS = os.path.join(RUN_DIR, "opstats.json")   # counts of userspace operations
XDP_TEMPLATE = os.path.join(RUN_DIR, "xdp_template.json")   # written by load, used by enroll
TC_TEMPLATE = os.path.join(RUN_DIR, "tc_template.json")     # likewise, for the tc hook


def map_pin(name):
    return os.path.join(PIN_MAPS, name)


def prog_pin(name):
    return os.path.join(PIN_PROGS, name)


def link_pin(name):
    return os.path.join(PIN_LINKS, name)


def pod_pin_dir(cookie):
    return os.path.join(PIN_PODS, str(cookie))


def pod_link_pin(cookie, name):
    return os.path.join(PIN_PODS, str(cookie), name)


def pod_state_file(cookie):
    return os.path.join(POD_STATE, f"{cookie}.json")


def listdir(path):
    """Entry names of a directory, [] when it does not exist."""
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def pinned_pod_cookies():
    return {int(name) for name in listdir(PIN_PODS) if name.isdigit()}
