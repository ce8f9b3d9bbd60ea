"""The outputs README.md and docs/WALKTHROUGH.md show are what the commands print now.

Each marked block (`<!-- output: NAME -->`) is rerun by scripts/readme_outputs.py, in a fresh process,
offline, and compared line by line; times and speeds are masked, and a `...` line elides. After a
change that moves an output, `bash scripts/readme_outputs.sh` rewrites the blocks.
"""

import importlib.util
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


@pytest.mark.parametrize("doc, name, shown", [b for b in BLOCKS if readme_outputs.EXAMPLES[b[1]].checked],
                         ids=[f"{doc.name}:{name}" for doc, name, _ in BLOCKS if readme_outputs.EXAMPLES[name].checked])
def test_shown_output_is_what_the_command_prints(doc, name, shown):
    example = readme_outputs.EXAMPLES[name]
    assert shown.startswith(example.command() + "\n"), f"{doc.name} shows another command for {name!r}"
    problems = readme_outputs.differences(shown, example.run())
    assert not problems, f"{doc.name}, block {name!r} is stale (bash scripts/readme_outputs.sh rewrites it):\n" + \
        "\n".join(problems)


def test_the_comparison_masks_times_and_nothing_else():
    differences = readme_outputs.differences
    assert differences("with KV cache   median    0.067 s", "with KV cache   median    0.091 s") == []
    assert differences("median    0.324 s     308.3 tokens/s", "median    1.043 s      95.9 tokens/s") == []
    assert differences("   1     415  '▁'   13.661   89.40%", "   1     415  '▁'   13.662   89.41%") == []
    assert differences("   1     415  '▁'   13.661", "   1     415  '▁'   13.681") != []  # a logit moved
    assert differences("   1     415  '▁'", "   1     416  '▁'") != []  # another token
    assert differences("a\n...\nz", "a\nb\nc\nz") == [] and differences("a\n...\nz", "a\nb\nc") != []
    assert differences("a\nb", "a\nb\nc") != []  # a block must end where the output ends, or say '...'


def test_the_api_session_in_the_readme_runs_as_shown():
    """Every `>>>` line of README.md, run by doctest: the shown results are what the API returns now."""
    import doctest

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    test = doctest.DocTestParser().get_doctest(readme, {}, "README.md", "README.md", 0)
    assert len(test.examples) > 10
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
