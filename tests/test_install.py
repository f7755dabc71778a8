"""interceptor as a wheel installs it: built from a copy of the source (nothing is
written into the checkout), installed into a fresh virtualenv, run from there."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from interceptor.datapath import node_state
from interceptor.ops import loader

pytestmark = pytest.mark.kernel
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A virtualenv holding only the wheel (the BCC bindings from Debian's site packages,
    the other dependencies borrowed from the project's venv, so no network is needed)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("interceptor", "bpf"):
        shutil.copytree(os.path.join(ROOT, name), src / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp / "dist").glob("interceptor-*.whl"))
    venv = tmp / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([venv / "bin" / "pip", "install", "-q", "--no-deps", "--no-index",
                    "--disable-pip-version-check", str(wheel)], check=True)
    site = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "borrowed-deps.pth"), "w") as f:
        f.write(sysconfig.get_path("purelib") + "\n")
    return venv


def run(venv, *argv):
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], capture_output=True, text=True,
                          cwd="/")


def test_the_wheel_carries_the_c_sources_and_loads_from_them(installed):
    loader.unload()
    try:
        where = run(installed, "python", "-c", "import interceptor.datapath.bpf_source as b; print(b.BPF_DIR)")
        assert where.stdout.strip().startswith(str(installed)), where
        r = run(installed, "interceptor", "load", "--mode", "ebpf")
        assert r.returncode == 0, r.stderr
        report = json.loads(run(installed, "interceptor", "status", "-o", "json").stdout)
        assert report["node"]["loaded"] and report["node"]["mode"] == "ebpf" and not report["errors"]
        r = run(installed, "interceptor-cni")
        assert r.returncode != 0 and json.loads(r.stdout)["code"] in (4, 7)     # no CNI_COMMAND
        assert run(installed, "interceptor", "unload").returncode == 0
        assert not node_state.is_loaded()
    finally:
        loader.unload()
