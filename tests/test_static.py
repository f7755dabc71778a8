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
