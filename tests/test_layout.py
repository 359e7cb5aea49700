"""The code base's shape, checked on the source with ``ast`` (no project module is executed here, except the
run-mode registry for the config check):

* imports run one way: utils -> (data_loaders, generate_dataset.models, nn) -> (pruning, training) -> stages
  -> entry scripts (main/main.py, main_imagenet/main_imagenet.py, generate_dataset/generate.py, benchmarks/),
  and no project module imports another in a circle;
* no run mode (a module of the stages.RUNS table) imports another, the pipeline excepted;
* no import inside a function, except the few allow-listed optional or slow dependencies;
* the run modes the configs list are exactly the stages registry's, and every package is installed by setup.py.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

import stages
from helpers import CONFIG_DIR, REPO
from stages import pipeline

# Project packages, bottom layer first: a module may import its own layer and the layers below, never above.
LAYERS = {
    "utils": 0,
    "data_loaders": 1, "generate_dataset.models": 1, "generate_dataset": 1, "nn": 1,
    "pruning": 2, "training": 2,
    "stages": 3,
}
ENTRY_LAYER = 4
ENTRY_SCRIPTS = ("main/main.py", "main_imagenet/main_imagenet.py", "main/convert_release.py", "generate_dataset/generate.py",
                 "setup.py")
TOP_LEVEL = {"utils", "data_loaders", "generate_dataset", "nn", "pruning", "training", "stages"}
# Imports allowed inside functions: optional (torch_scatter) or slow to import and needed by one code path only
# (matplotlib for plots, scikit-learn for the digits dataset). Each such import carries a comment saying why.
LAZY_ALLOWED = {"torch_scatter", "matplotlib", "sklearn"}


def project_files() -> list[Path]:
    skip = {".venv", "outputs", "data", "data_models", "multirun", ".git", "__pycache__"}
    return sorted(p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)
                  and "egg-info" not in str(p))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


FILES = project_files()
MODULES = {module_name(p): p for p in FILES if p.relative_to(REPO).parts[0] in TOP_LEVEL}


def layer_of(path: Path) -> int:
    rel = path.relative_to(REPO).as_posix()
    if rel in ENTRY_SCRIPTS or rel.startswith("benchmarks/"):
        return ENTRY_LAYER
    if rel.startswith("tests/"):
        return ENTRY_LAYER + 1
    name = module_name(path)
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, project module) for every import statement of ``path`` that names a project module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import submodule` depends on the submodule, not on the package's __init__
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in TOP_LEVEL:
                while target and target not in MODULES:  # `import a.b.c` of an attribute path: its module
                    target = target.rpartition(".")[0]
                if target:
                    found.append((node.lineno, target))
    return found


def test_no_package_is_named_main_and_setup_installs_every_package():
    assert not (REPO / "main" / "__init__.py").exists(), "main/main.py would shadow a package named main"
    packages = sorted(module_name(p.parent / "__init__.py") for p in FILES if p.name == "__init__.py"
                      and p.relative_to(REPO).parts[0] in TOP_LEVEL)
    setup = ast.parse((REPO / "setup.py").read_text())
    listed = next(ast.literal_eval(k.value) for node in ast.walk(setup) if isinstance(node, ast.Call)
                  for k in node.keywords if k.arg == "packages")
    assert sorted(listed) == packages


def test_imports_follow_the_layer_order():
    wrong = []
    for path in FILES:
        mine = layer_of(path)
        for line, target in project_imports(path):
            theirs = layer_of(MODULES[target])
            if theirs > mine:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {target} (layer {theirs} > {mine})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {name: {t for _l, t in project_imports(path)} - {name} for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    cycles = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_imports_inside_functions():
    wrong = []
    for path in FILES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or "."]
                else:
                    continue
                bad = [n for n in names if n.split(".")[0] not in LAZY_ALLOWED]
                if bad:
                    wrong.append(f"{path.relative_to(REPO)}:{node.lineno} in {function.name}(): import {bad}")
    assert not wrong, "imports inside functions (move them to the top of the module):\n" + "\n".join(wrong)


def test_the_layer_test_sees_the_layers():
    """The checks above are not vacuous: the stages import the layers below them, an entry script the stages."""
    assert {layer_of(MODULES[t]) for _l, t in project_imports(MODULES["stages.final"])} == {0, 1, 2, 3}
    assert ("stages.final" in {t for _l, t in project_imports(MODULES["stages.pipeline"])})
    assert [t for _l, t in project_imports(REPO / "main" / "main.py")] == ["stages", "utils.distributed"]
    assert layer_of(REPO / "generate_dataset" / "generate.py") == ENTRY_LAYER
    assert layer_of(MODULES["generate_dataset.models.registry"]) == 1


# ----------------------------------------------------------------------------------------------
# Run modes: the registry, the configs, the pipeline
# ----------------------------------------------------------------------------------------------
def run_mode_modules() -> set[str]:
    """The modules that hold the run modes: those of the functions in the ``stages.RUNS`` table."""
    return {fn.__module__ for fn in stages.RUNS.values()}


def test_no_run_mode_imports_another():
    """Run modes share code through modules that are not run modes (stages.common, stages.ddp, stages.artifacts
    ...), never by importing each other, and those shared modules import no run mode either (which would let one
    run mode reach another through them). The pipeline, which chains the run modes, and the registry are the
    exceptions."""
    modes = run_mode_modules()
    assert {"stages.meta_train", "stages.select", "stages.final", "stages.pipeline"} <= modes  # the table is read
    exempt = {"stages", "stages.pipeline"}
    wrong = []
    for name in sorted(n for n in MODULES if n.startswith("stages.") and n not in exempt):
        for line, target in project_imports(MODULES[name]):
            if target in modes and target != name:
                wrong.append(f"{MODULES[name].relative_to(REPO)}:{line} imports run mode {target}")
    assert not wrong, "a stage module imports a run mode (share the code through a non-run-mode module):\n" + \
        "\n".join(wrong)
    # not vacuous: the check sees the pipeline's imports of the run modes it chains
    assert {"stages.meta_train", "stages.select", "stages.final"} <= {t for _l, t in
                                                                       project_imports(MODULES["stages.pipeline"])}


def configured_run_modes() -> set[str]:
    """The run modes configs/main.yaml lists in the comment above ``run:``."""
    text = (CONFIG_DIR / "main.yaml").read_text()
    block = re.search(r"# Run modes \(stages/__init__\.py RUNS.*?\n((?:#   .*\n)+)run:", text)
    assert block, "configs/main.yaml lost its list of run modes above `run:`"
    return {m.strip() for line in block.group(1).splitlines() for m in line.lstrip("# ").split("|") if m.strip()}


def test_configs_list_exactly_the_registered_run_modes():
    assert configured_run_modes() == set(stages.RUNS)
    values = {}
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, dict) and "run" in data and not isinstance(data["run"], dict):
            values[path.relative_to(CONFIG_DIR).as_posix()] = data["run"]
    assert {"main.yaml", "imagenet.yaml"} <= set(values)
    unknown = {path: run for path, run in values.items() if run not in stages.RUNS}
    assert not unknown, f"configs name run modes the registry does not know: {unknown}"
    assert values["imagenet.yaml"] in stages.DDP_RUNS  # the torchrun entry's default works under torchrun


def test_registry_is_explicit_and_consistent():
    assert stages.DDP_RUNS <= set(stages.RUNS) and stages.HELP not in stages.RUNS
    assert all(callable(fn) and fn.__module__.startswith("stages.") for fn in stages.RUNS.values())
    for name, fn in pipeline.CHAINED_RUNS.items():
        assert stages.RUNS[name] is fn, name
    with pytest.raises(stages.UnknownRunError, match="valid modes: analyse"):
        stages.get_run("nope")
