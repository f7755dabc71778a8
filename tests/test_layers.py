"""The package's shape, as the README's Layout section states it: every module sits in a
layer, imports (lazy ones included) go to its own layer or below, the Layout section
names every folder and module there is, and each map is written only by the module
abi.MAPS names. Reads the source; needs neither root nor a kernel."""
import ast
import pathlib
import re

import pytest

from interceptor import abi

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "interceptor"
BASE = "base"       # the package's top-level modules (paths, abi, store): below every layer


def _readme_layout():
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Layout"):text.index("\n## ", text.index("## Layout") + 1)]


def _layers():
    """The README's order, lowest first."""
    order = re.search(r"Layers, lowest first: `([^`]+)`", _readme_layout())
    assert order, "README's Layout section states no layer order"
    return [BASE] + [name.strip() for name in order.group(1).split("<")]


def _modules():
    """{dotted name under interceptor: path} of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


FRONTS = ("cli", "demo")     # the package's top-level entry points: the top layer


def _layer(module):
    head = module.split(".")[0]
    if head in FRONTS:
        return "cli"
    return head if (PACKAGE / head).is_dir() else BASE


def _imports(path, module):
    """(line, imported module) of every import of the package in the file."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "interceptor" or node.module.startswith("interceptor.")):
                source = node.module[len("interceptor."):] if node.module != "interceptor" else ""
            else:
                continue
            for alias in node.names:
                name = f"{source}.{alias.name}" if source else alias.name
                yield node.lineno, name if name in MODULES else source
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("interceptor."):
                    yield node.lineno, alias.name[len("interceptor."):]


def test_every_folder_of_the_package_is_a_layer_the_readme_orders():
    layers = _layers()
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert sorted(set(folders)) == sorted(set(layers) - {BASE, "cli"}), (folders, layers)


def test_imports_go_to_the_same_layer_or_below():
    rank = {name: i for i, name in enumerate(_layers())}
    upward = []
    for module, path in MODULES.items():
        for line, target in _imports(path, module):
            if target and rank[_layer(target)] > rank[_layer(module)]:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {module} ({_layer(module)}) imports "
                              f"{target} ({_layer(target)})")
    assert not upward, "\n".join(upward)


def test_every_import_of_the_package_names_a_module_that_exists():
    """Lazy imports run only on their path: one left behind by a move fails there, at
    run time (pyflakes does not look for modules)."""
    stale = [f"{path.relative_to(ROOT)}:{line}: {target}" for module, path in MODULES.items()
             for line, target in _imports(path, module) if target not in MODULES]
    assert not stale, "\n".join(stale)


def test_the_readme_layout_names_every_module():
    layout = _readme_layout()
    missing = [m for m in MODULES if m and not re.search(rf"\b{re.escape(m.split('.')[-1])}\b", layout)
               and not m.endswith("__main__")]
    assert not missing, f"modules the README's Layout section does not name: {missing}"


# --- one writer per map ----------------------------------------------------------------
WRITES = {"put", "delete", "delete_pod_keys"}      # maps.PinnedMap's writing verbs


def _map_writes():
    """{map name: {module}} of every `<...>.<map>.<verb>(...)` call outside the harness
    (it sets up its own experiments) and migrate (it copies any map by its fds)."""
    names = {m.name for m in abi.MAPS}
    out = {}
    for module, path in MODULES.items():
        if module.startswith("harness") or module == "datapath.migrate":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in WRITES and isinstance(node.func.value, ast.Attribute) and \
                    node.func.value.attr in names:
                out.setdefault(node.func.value.attr, set()).add(module)
    return out


def test_each_map_is_written_only_by_the_module_abi_names():
    writes = _map_writes()
    assert writes, "no map writes found: the check no longer sees them"
    wrong = {name: sorted(modules) for name, modules in writes.items()
             if modules - {abi.MAPS[[m.name for m in abi.MAPS].index(name)].writer}}
    assert not wrong, f"maps written outside their writer (abi.MAPS): {wrong}"


@pytest.mark.parametrize("m", abi.MAPS, ids=lambda m: m.name)
def test_each_named_writer_is_a_module(m):
    assert m.writer is None or m.writer in MODULES
