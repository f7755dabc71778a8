"""Storms: 50 pods added and deleted at once through the installed CNI plugin, round after
round, while policies are edited live, `status` runs and metrics are scraped. Nothing may
fail and nothing may be left: map entries, pins, links, programs, XDP attachments,
records, files (counted from the kernel and the maps, not from our own bookkeeping).
The figures go to $INTERCEPTOR_RELIABILITY_OUT when it is set (`make reliability`)."""
import collections
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cnihelper import config, installed_plugin, run
from conftest import Background, bpftool, pods_lab, publish_figures
from interceptor import paths
from interceptor.pod import podrecord
from interceptor.datapath.maps import REPORTED, Maps
from interceptor.agent import metrics

pytestmark = pytest.mark.kernel
PODS = int(os.environ.get("INTERCEPTOR_STORM_PODS", 50))
ROUNDS = int(os.environ.get("INTERCEPTOR_STORM_ROUNDS", 10))


def footprint(pods):
    """Everything enrollment can leave, counted where it lives."""
    with Maps() as maps:
        entries = {name: len(getattr(maps, name).keys()) for name in REPORTED}
    progs = [p for p in bpftool("prog", "show") if p.get("name") in ("xdp_pod", "tc_pod")]
    netns_links = [link for link in bpftool("link", "show") if link.get("type") == "netns"]
    xdp_attached = sum("xdp" in subprocess.run(["ip", "-n", pod.netns, "link", "show", "eth0"],
                                               capture_output=True, text=True).stdout for pod in pods)
    tc_attached = sum("clsact" in subprocess.run(["ip", "netns", "exec", pod.netns, "tc", "qdisc", "show",
                                                  "dev", "eth0"], capture_output=True, text=True).stdout
                      for pod in pods)
    # files, not directories: the records' directory stays once made, empty
    run_files = sorted(os.path.relpath(os.path.join(d, f), paths.RUN_DIR)
                       for d, _, files in os.walk(paths.RUN_DIR) for f in files)
    return {"map entries": entries, "pod pins": len(paths.listdir(paths.PIN_PODS)),
            "records": len(podrecord.all_records()), "filter stub programs": len(progs),
            "netns links": len(netns_links), "xdp attachments": xdp_attached,
            "tc clsact qdiscs": tc_attached, "run dir": run_files}


def settled_footprint(pods, expected, timeout=3):
    """The footprint once it equals expected, or the last one after timeout: the kernel
    frees a tc filter's program a grace period after the filter is deleted (RCU work),
    so a DEL can return before bpftool stops listing it."""
    deadline = time.monotonic() + timeout
    while True:
        now = footprint(pods)
        if now == expected or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


class SideLoad(Background):
    """What operators and monitoring do meanwhile: policy edits on the storm's pods,
    `status`, metrics scrapes, each in a loop until stopped. Records every outcome."""

    def __init__(self, pods):
        super().__init__()
        self.pods = pods
        self.outcomes = collections.Counter()
        self.problems = []
        self.threads = [threading.Thread(target=self._loop, args=(fn,)) for fn in
                        (self._policy_edit, self._status, self._scrape)]
        self.i = 0

    def _loop(self, fn):
        while not self.stop.is_set():
            fn()

    def _cli(self, *args):
        return subprocess.run([sys.executable, "-m", "interceptor.cli", *args], capture_output=True, text=True)

    def _policy_edit(self):
        self.i += 1
        pod = self.pods[self.i % len(self.pods)]
        r = self._cli("policy", "set", "--pod", f"storm/{pod.name}", f"deny tcp port {1000 + self.i % 50}")
        if r.returncode == 0:
            self.outcomes["policy edits applied"] += 1
        elif r.returncode == 1 and "no such enrolled pod" in r.stderr and "Traceback" not in r.stderr:
            self.outcomes["policy edits on a pod not enrolled (yet or any more)"] += 1
        else:
            self.problems.append(("policy", r.returncode, r.stderr[-500:]))

    def _status(self):
        r = self._cli("status", "-o", "json")
        if r.returncode in (0, 1) and "Traceback" not in r.stderr:
            json.loads(r.stdout)
            self.outcomes["status runs"] += 1
        else:
            self.problems.append(("status", r.returncode, r.stderr[-500:]))

    def _scrape(self):
        registry = CollectorRegistry()
        registry.register(metrics.DatapathCollector())
        try:
            generate_latest(registry)
            self.outcomes["metrics scrapes"] += 1
        except Exception as exc:        # noqa: BLE001 - any failure is the finding
            self.problems.append(("scrape", repr(exc)))
        time.sleep(0.05)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    return installed_plugin(tmp_path_factory)


def test_a_storm_of_adds_and_dels_with_live_edits_fails_nothing_and_leaves_nothing(
        datapath, plugin, tmp_path):
    log = str(tmp_path / "cni.log")
    figures = collections.Counter()
    with pods_lab("ics", 79) as lab:
        pods = [lab.add_pod(f"p{i}") for i in range(PODS)]
        baseline = footprint(pods)
        failures = []

        def cni(command, pod, round_no):
            env = {"CNI_CONTAINERID": f"storm{round_no}-{pod.name}", "CNI_NETNS": f"/run/netns/{pod.netns}",
                   "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
                   "CNI_ARGS": f"K8S_POD_NAMESPACE=storm;K8S_POD_NAME={pod.name}"}
            rc, doc = run(plugin, log, command, config(ip=str(pod.ipv4)), **env)
            if rc != 0:
                failures.append((command, pod.name, rc, doc))
            return rc

        started = time.monotonic()
        with SideLoad(pods) as side, concurrent.futures.ThreadPoolExecutor(PODS) as pool:
            for round_no in range(ROUNDS):
                for command in ("ADD", "DEL"):
                    rcs = list(pool.map(lambda pod: cni(command, pod, round_no), pods))
                    figures[f"{command}s"] += len(rcs)
                now = settled_footprint(pods, baseline)
                if now != baseline:
                    failures.append(("leftovers after round", round_no, _diff(baseline, now)))
        elapsed = time.monotonic() - started
        after = settled_footprint(pods, baseline)
    figures.update(side.outcomes)
    print(f"storm: {PODS} pods x {ROUNDS} rounds in {elapsed:.1f}s: {dict(figures)}; "
          f"{len(failures)} failures, {len(side.problems)} side-load problems")
    publish_figures({"scenario": "storm", "pods": PODS, "rounds": ROUNDS, "seconds": round(elapsed, 1),
              "tried": dict(figures), "failures": len(failures) + len(side.problems),
              "leftovers": _diff(baseline, after)})
    assert not failures, failures[:5]
    assert not side.problems, side.problems[:5]
    assert after == baseline
    assert figures["policy edits applied"] > 0 and figures["status runs"] > 0 and figures["metrics scrapes"] > 0



def _diff(before, after):
    """What differs between two footprints, flattened: {what: (before, after)}."""
    flat = {}
    for side, fp in (("b", before), ("a", after)):
        for k, v in fp.items():
            for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)]):
                flat.setdefault(f"{k}/{kk}" if kk else k, {})[side] = vv
    return {k: (v.get("b"), v.get("a")) for k, v in flat.items() if v.get("b") != v.get("a")}
