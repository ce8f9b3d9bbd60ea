"""The source's shape: the model files hold the model, and imports run one way."""

import ast
from pathlib import Path

import phi3_scratch
from phi3_scratch import checks, model

PACKAGE = Path(phi3_scratch.__file__).parent
MODEL_FILES = ("config", "model", "rotary", "cache")
NOT_THE_MODEL = {"quantize", "compiled", "benchmark", "tracing", "stepping", "plotting", "notebook", "cli"}


def imports(module: str) -> set[str]:
    """The package's modules that `module` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return found - {module}


def test_model_py_raises_nothing():
    tree = ast.parse((PACKAGE / "model.py").read_text())
    assert not [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Raise)]


def test_the_model_files_import_no_speed_code_tools_or_cli():
    for module in MODEL_FILES:
        assert not imports(module) & NOT_THE_MODEL, (module, imports(module) & NOT_THE_MODEL)


def test_no_two_modules_import_each_other_directly_or_through_a_chain():
    graph = {path.stem: imports(path.stem) for path in PACKAGE.glob("*.py") if path.stem != "__init__"}

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in graph.get(start, ()))

    assert [m for m in graph if reaches(m, m, {m})] == []


def test_the_attention_kernels_checks_knows_are_the_ones_the_model_has():
    assert tuple(model.ATTENTION) == checks.ATTENTION_KERNELS
