"""Putting a Build's programs in place: the one path load, repair and upgrade share.

Each program the plan loads is pinned (beside its old pin, then renamed over it, so a
pin is never missing) and goes where it runs:
  cgroup   its node-wide link: updated when its pin is there (the hooks never stop),
           created and pinned when it is not (a fresh load, a repair)
  netns    each enrolled pod's sk_lookup link, updated
  tail     slot 0 of its program array (the pods' filter stubs tail-call it)
  sockhash attached to the bypass map when the bypass is on (replaces the old one)
and save_templates keeps the per-pod copies' templates, from which enroll loads each
pod's stub.
Links, not legacy attachments: they coexist with other programs on the same hook
(multi-attach) and go away with their pin, which is what makes unload clean.
"""
import ctypes
import errno
import os

from interceptor import paths
from interceptor.kernel import libbpf
from interceptor.datapath import stubs
from interceptor.datapath.programs import (BYPASS_MAP, CGROUP, NETNS, POD_COPY, PROGRAMS, SOCKHASH,
                                           TAIL, TAIL_MAPS)

SK_LOOKUP_LINK = "sk_lookup"        # a pod's pin of its sk_lookup link (paths.pod_link_pin)


def place(plan, build, map_fds, cgroup):
    """The build's programs that the plan loads, in place; map_fds: {map name: fd} of the
    maps they use (the program arrays and the bypass map among them). Returns how many
    attachments changed."""
    changed = 0
    for d in (paths.PIN_PROGS, paths.PIN_LINKS, paths.PIN_PODS):
        os.makedirs(d, exist_ok=True)
    for prog in PROGRAMS:
        fd = build.programs.get(prog.name)
        if fd is None or not prog.loaded(plan):
            continue
        if prog.scope == CGROUP and prog.needed(plan):
            changed += update_link(paths.link_pin(prog.name), fd) or \
                _create_cgroup_link(paths.link_pin(prog.name), fd, prog, cgroup)
        elif prog.scope == NETNS:
            for cookie in sorted(paths.pinned_pod_cookies()):
                changed += update_link(paths.pod_link_pin(cookie, SK_LOOKUP_LINK), fd)
        elif prog.scope == TAIL:
            libbpf.map_update(map_fds[TAIL_MAPS[prog.name]], ctypes.c_uint32(0), ctypes.c_uint32(fd))
            changed += 1
        elif prog.scope == SOCKHASH and plan.bypass:
            libbpf.prog_attach(fd, map_fds[BYPASS_MAP], prog.attach_type)    # replaces the old
            changed += 1
        _pin_over(fd, paths.prog_pin(prog.name))
    return changed


def save_templates(plan, build):
    """The per-pod programs' templates of this build (for pods enrolled from now on).
    Not part of place(): an upgrade saves them once its migrated maps are caught up, so
    the swap of the running programs and the catch-up stay as close as they can."""
    for prog in PROGRAMS:
        if prog.scope == POD_COPY and prog.needed(plan):
            save_template(build, prog)


def save_template(build, prog):
    """Per-pod programs (the filter's stubs) are loaded by enroll from a saved copy of
    the build's instructions, with each map reference recorded by name. (The build has
    loaded this one for trial already: a verifier rejection changed the plan, not every
    pod start.)"""
    stubs.save_template(stubs.BY_PROG[prog.name], build.insns(prog.name),
                        {fd: name for name, fd in build.map_fds.items()})


def sk_msg_program():
    return next(p for p in PROGRAMS if p.scope == SOCKHASH)


def set_sk_msg(attach, prog_fd=None, map_fd=None):
    """sk_msg attaches to the bypass sockhash itself (legacy attach; it is detached
    explicitly on unload and on switching the bypass off). The fds are opened from the
    pins unless given."""
    prog = sk_msg_program()
    opened = []
    try:
        if prog_fd is None:
            prog_fd = libbpf.obj_get(paths.prog_pin(prog.name))
            opened.append(prog_fd)
        if map_fd is None:
            map_fd = libbpf.obj_get(paths.map_pin(BYPASS_MAP))
            opened.append(map_fd)
        if attach:
            libbpf.prog_attach(prog_fd, map_fd, prog.attach_type)
        else:
            libbpf.prog_detach(prog_fd, map_fd, prog.attach_type)
    finally:
        for fd in opened:
            os.close(fd)


def update_link(pin, prog_fd):
    """1 when the pinned link now runs prog_fd, 0 when there is no such link (or its
    netns or cgroup is gone: nothing to update)."""
    if not os.path.exists(pin):
        return 0
    fd = libbpf.obj_get(pin)
    try:
        libbpf.link_update(fd, prog_fd)
    except OSError as exc:
        if exc.errno == errno.ENOLINK:
            return 0
        raise
    finally:
        os.close(fd)
    return 1


def _create_cgroup_link(pin, prog_fd, prog, cgroup):
    """1 when a link was created and pinned; 0 when its pin is there (a link whose
    cgroup is gone is not replaced elsewhere)."""
    if os.path.exists(pin):
        return 0
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        link = libbpf.link_create(prog_fd, cg_fd, prog.attach_type)
    finally:
        os.close(cg_fd)
    try:
        libbpf.obj_pin(link, pin)
    finally:
        os.close(link)
    return 1


def _pin_over(fd, pin):
    """Pinned beside, then renamed over: the pin is never missing, so a kill here cannot
    leave a load that node_state.is_loaded calls incomplete."""
    staged = pin + "_upgrading"     # bpffs refuses dots
    if os.path.lexists(staged):
        os.unlink(staged)
    libbpf.obj_pin(fd, staged)
    os.replace(staged, pin)
