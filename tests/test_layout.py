"""The source's shape: the model files hold the model, and imports run one way."""

import ast
import re
from pathlib import Path

import phi3_scratch
from phi3_scratch import checks, model

PACKAGE = Path(phi3_scratch.__file__).parent
MODEL_FILES = ("config", "model", "rotary", "cache")
NOT_THE_MODEL = {"quantize", "compiled", "benchmark", "tracing", "stepping", "plotting", "notebook",
                 "pipeline", "cli", "profiling", "intervene", "explore", "serve", "cpu_kernels"}


def module_name(path: Path) -> str:
    """'model' for phi3_scratch/model.py, 'cli.common' for phi3_scratch/cli/common.py, 'cli' for its
    __init__."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(module: str) -> set[str]:
    """The package's modules that `module` imports, at the top or inside a function."""
    path = PACKAGE / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = PACKAGE / module.replace(".", "/") / "__init__.py"
    here = module_name(path).split(".")[:-1] if path.name != "__init__.py" else module_name(path).split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[:len(here) - node.level + 1]
            names = [node.module] if node.module else [a.name for a in node.names]
            found |= {".".join([*base, name]) for name in names}
    return {name if (PACKAGE / name.replace(".", "/")).is_dir()
            or (PACKAGE / (name.replace(".", "/") + ".py")).is_file()
            else name.rpartition(".")[0] for name in found} - {module}


def test_model_py_raises_nothing():
    tree = ast.parse((PACKAGE / "model.py").read_text())
    assert not [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Raise)]


def test_the_model_files_import_no_speed_code_tools_or_cli():
    for module in MODEL_FILES:
        assert not imports(module) & NOT_THE_MODEL, (module, imports(module) & NOT_THE_MODEL)


def test_no_two_modules_import_each_other_directly_or_through_a_chain():
    graph = {module_name(path): imports(module_name(path)) for path in PACKAGE.rglob("*.py")
             if module_name(path)}

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d}))
                   for d in graph.get(start, ()))

    assert [m for m in graph if reaches(m, m, {m})] == []


def test_the_attention_kernels_checks_knows_are_the_ones_the_model_has():
    assert tuple(model.ATTENTION) == checks.ATTENTION_KERNELS


def test_the_package_docstring_maps_every_module_once():
    """The reading order and the file map are written once, in phi3_scratch/__init__.py."""
    doc = phi3_scratch.__doc__
    file_map = doc[doc.index("The file map"):]
    named = re.findall(r"\b([a-z_]+)\.py\b", file_map)
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert sorted(named) == modules, "every module of the package once in the file map"
    assert "cli/" in file_map and (PACKAGE / "cli" / "__init__.py").is_file()
    order = re.findall(r"^\d\. ([a-z_]+)\.py", doc, re.M)
    assert order[:2] == ["config", "model"] and all((PACKAGE / f"{m}.py").is_file() for m in order)


def test_no_module_is_over_400_lines():
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in lengths.items() if n > 400} == {}
