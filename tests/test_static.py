"""The code as text (no root, no kernel): every Python file of the project passes
pyflakes, so a name used but never defined (a constant dropped in a cleanup while a
command still uses it) fails here rather than in front of a user running `make demo`."""
import io
import pathlib

from pyflakes import api
from pyflakes.reporter import Reporter

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("interceptor", "tests", "vm", "scripts") for p in (ROOT / d).rglob("*.py")) + \
    [ROOT / "vm" / "guest" / "usr" / "local" / "lib" / "interceptor-vm" / "run"]


def test_every_python_file_passes_pyflakes():
    out, err = io.StringIO(), io.StringIO()
    problems = sum(api.checkPath(str(path), Reporter(out, err)) for path in SOURCES)
    assert problems == 0, out.getvalue() + err.getvalue()


# The harness: pods in network namespaces and crafted packets (lab, selfcheck, demo,
# bench, Envoy's sidecar shape), with its own extra (pyproject.toml: harness).
HARNESS = ("lab", "selfcheck", "demo", "envoy_sidecar", "bench")
BLOCK = ("import sys\n"
         "class Block:\n"
         "    def find_spec(self, name, path=None, target=None):\n"
         "        if name.split('.')[0] in ('pyroute2', 'scapy'):\n"
         "            raise ImportError(f'No module named {name!r}', name=name)\n"
         "sys.meta_path.insert(0, Block())\n"
         "sys.path.insert(0, %r)\n" % str(ROOT))


def _python(code):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_what_a_node_runs_imports_nothing_of_the_harness():
    """Every module outside the harness imports without pyroute2 and scapy: the agent's
    image installs the wheel without the harness extra."""
    runtime = sorted(p.stem for p in (ROOT / "interceptor").glob("*.py")
                     if p.stem not in HARNESS and p.stem != "__init__")
    r = _python("import importlib\n"
                f"for m in {runtime!r}:\n"
                "    importlib.import_module('interceptor.' + m)\n")
    assert r.returncode == 0, r.stderr[-1500:]


def test_a_harness_command_without_the_harness_extra_says_what_to_install():
    r = _python("from interceptor import cli\ncli._harness('selfcheck', 'selfcheck')\n")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "needs the harness extra" in r.stderr and "pip install 'interceptor[harness]'" in r.stderr
