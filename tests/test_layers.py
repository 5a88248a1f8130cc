"""Shoal's packages import only downward: no package-level import cycles.

Lazy imports inside functions count too: a cycle hidden in a function body is
still a cycle in the design.
"""

from __future__ import annotations

import ast
import pathlib

import shoal

ROOT = pathlib.Path(shoal.__file__).parent

#: From the bottom up; a package may import only from packages listed before it.
LAYERS = [
    "_errors", "_config", "_config_text", "_deploy_config", "_json", "_transport", "_seam",
    "_observe", "_router", "_api", "_replica", "_oip", "_proxy", "_runtime", "_controller",
    "_dashboard", "_instance", "serve",
]  # fmt: skip


def _package_imports() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        package = path.relative_to(ROOT).with_suffix("").parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if module and module.startswith("shoal."):
                target = module.split(".")[1]
                if target != package:
                    edges.setdefault(package, set()).add(target)
    return edges


def test_core_packages_import_only_lower_layers() -> None:
    edges = _package_imports()
    wrong = [
        f"{package} imports {target}"
        for package in LAYERS
        for target in sorted(edges.get(package, ()))
        if target in LAYERS and LAYERS.index(target) > LAYERS.index(package)
    ]
    assert wrong == []


def test_no_package_level_import_cycle() -> None:
    edges = _package_imports()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return [*path, node, target]
            if target not in state:
                cycle = visit(target, [*path, node])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for package in sorted(edges):
        if package not in state:
            assert visit(package, []) is None


def test_the_driver_imports_no_http_server_or_yaml_before_it_deploys() -> None:
    """``shoal run MODULE:APP`` imports these before its replicas start; the HTTP server
    (uvicorn, for the proxy process and later the admin API) and PyYAML (config files
    only) would cost its cold start tens of milliseconds (``python -m bench.startup``)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import shoal._cli.embedded, shoal._instance.api, shoal._instance.build\n"
        "import shoal._runtime.process.runtime, shoal.serve\n"
        "print(sorted({'uvicorn', 'yaml', 'click', 'websockets'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
