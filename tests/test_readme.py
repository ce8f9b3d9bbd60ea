"""The outputs README.md, docs/CLI.md and docs/WALKTHROUGH.md show are what the commands print now.

Each marked block (`<!-- output: NAME -->`) is rerun by scripts/readme_outputs.py, in a fresh process,
offline, and compared line by line; times and speeds are masked, and a `...` line elides. After a
change that moves an output, `bash scripts/readme_outputs.sh` rewrites the blocks.
"""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "readme_outputs.py"
spec = importlib.util.spec_from_file_location("readme_outputs", SCRIPT)
readme_outputs = sys.modules["readme_outputs"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_outputs)

BLOCKS = readme_outputs.shown_blocks()


def test_every_block_names_an_example_and_the_main_ones_are_shown():
    names = [name for _, name, _ in BLOCKS]
    assert set(names) <= set(readme_outputs.EXAMPLES), set(names) - set(readme_outputs.EXAMPLES)
    assert {"tour", "generate", "arch-mini", "next-token", "bench", "step", "compare"} <= set(names)


CHECKED = [b for b in BLOCKS if readme_outputs.EXAMPLES[b[1]].checked]  # the blocks whose lines are compared


@pytest.mark.parametrize("doc, name, shown", CHECKED, ids=[f"{doc.name}:{name}" for doc, name, _ in CHECKED])
def test_shown_output_is_what_the_command_prints(doc, name, shown):
    example = readme_outputs.EXAMPLES[name]
    assert shown.startswith(example.command() + "\n"), f"{doc.name} shows another command for {name!r}"
    problems = readme_outputs.differences(shown, example.run())
    stale = f"{doc.name}, block {name!r} is stale (bash scripts/readme_outputs.sh rewrites it):\n"
    assert not problems, stale + "\n".join(problems)


def test_the_comparison_masks_times_and_nothing_else():
    differences = readme_outputs.differences
    assert differences("with KV cache   median    0.067 s", "with KV cache   median    0.091 s") == []
    assert differences("median    0.324 s     308.3 tokens/s", "median    1.043 s      95.9 tokens/s") == []
    assert differences("   1     415  '▁'   13.661   89.40%", "   1     415  '▁'   13.662   89.41%") == []
    assert differences("   1     415  '▁'   13.661", "   1     415  '▁'   13.681") != []  # a logit moved
    assert differences("   1     415  '▁'", "   1     416  '▁'") != []  # another token
    assert differences("a\n...\nz", "a\nb\nc\nz") == [] and differences("a\n...\nz", "a\nb\nc") != []
    assert differences("a\nb", "a\nb\nc") != []  # a block must end where the output ends, or say '...'


@pytest.mark.parametrize("name, least", [("README.md", 5), ("docs/API.md", 10)])
def test_the_api_sessions_run_as_shown(name, least):
    """Every `>>>` line of README.md and docs/API.md, run by doctest: the results shown are the API's now."""
    import doctest

    text = (Path(__file__).resolve().parents[1] / name).read_text()
    test = doctest.DocTestParser().get_doctest(text, {}, name, name, 0)
    assert len(test.examples) >= least
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_the_readme_is_short_and_starts_with_the_three_commands():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert len(readme) <= 20_000
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in commands  # CPU torch first
    assert commands.index("pip install torch --index-url https://download.pytorch.org/whl/cpu") < \
        commands.index('pip install -e ".[test]"')
    assert "phi3-scratch tour --model tiny" in commands and "python -m pytest" in commands
    for doc in ("docs/CLI.md", "docs/API.md", "docs/SPEED.md", "docs/TOKENIZER.md",
                "notebooks/phi3_notebook.ipynb", "docs/img/architecture.svg"):
        assert f"]({doc}" in readme, f"the README links {doc}"


def test_no_shown_output_holds_a_machines_own_paths():
    for doc, name, shown in BLOCKS:
        assert not re.search(r"/(work|home|root|tmp|Users)/",
                             shown), f"{doc.name}, block {name!r} shows a path"
