"""What the node still holds of interceptor, counted outside its own bookkeeping: pins,
node and pod state, and our programs and their links as the kernel lists them (bpftool).
`selfcheck` and the tests use it to prove that unload leaves nothing behind."""
import json
import os
import subprocess
import time
from dataclasses import dataclass, field

from interceptor import paths
from interceptor.pod import podrecord


def bpftool(*args):
    return json.loads(subprocess.run(["bpftool", "-j", *args], check=True,
                                     capture_output=True, text=True).stdout.strip() or "[]")


def live_objects():
    """(programs, links) of ours still known to the kernel. Programs are ours by name
    (the kernel keeps 15 characters: every name in programs.py fits)."""
    from interceptor.datapath.programs import PROGRAMS
    ours = {p.name for p in PROGRAMS}
    progs = [p for p in bpftool("prog", "show") if p.get("name") in ours]
    prog_ids = {p["id"] for p in progs}
    links = [link for link in bpftool("link", "show") if link.get("prog_id") in prog_ids]
    return progs, links


def wait_gone(timeout=5):
    """live_objects(), polled: the kernel frees a program a little after its last
    reference goes."""
    deadline = time.monotonic() + timeout
    while True:
        progs, links = live_objects()
        if not progs and not links or time.monotonic() > deadline:
            return progs, links
        time.sleep(0.1)


@dataclass
class Residue:
    paths: list = field(default_factory=list)      # pins and state files still present
    records: list = field(default_factory=list)    # pod records (netns cookies)
    programs: list = field(default_factory=list)   # "name (id N)"
    links: list = field(default_factory=list)      # "link N (prog N)"

    @property
    def empty(self):
        return not (self.paths or self.records or self.programs or self.links)

    def describe(self):
        parts = [f"{what}: {', '.join(map(str, items))}" for what, items in
                 (("paths", self.paths), ("pod records", self.records),
                  ("programs", self.programs), ("links", self.links)) if items]
        return "; ".join(parts) or "nothing left"


def after_unload(timeout=5):
    """What an unload left behind (empty when it left nothing)."""
    progs, links = wait_gone(timeout)
    return Residue(
        paths=[p for p in (paths.PIN_ROOT, paths.NODE_STATE, paths.POD_STATE) if os.path.exists(p)],
        records=sorted(podrecord.all_records()),
        programs=[f"{p['name']} (id {p['id']})" for p in progs],
        links=[f"link {link['id']} (prog {link['prog_id']})" for link in links])
