"""docs/WALKTHROUGH.md cannot drift from the code: its debugger session is replayed, its names resolve.

The pdb session runs the walkthrough's own script under `python -m pdb`, feeds it the session's
commands, and checks that every line the walkthrough shows pdb printing (values, shapes, the
source lines it stops on) comes out, in order. When the code moves, the session still stops at
the same functions; when it changes, this test fails and the walkthrough gets updated.
"""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "WALKTHROUGH.md"


def block(marker: str) -> str:
    (text,) = re.findall(rf"<!-- {marker} -->\n```[^\n]*\n(.*?)```", DOC.read_text(), re.S)
    return text


def test_the_pdb_session_replays(tmp_path):
    (tmp_path / "decode.py").write_text(block("pdb-script"))
    session = block("pdb-session").splitlines()
    commands = [line.removeprefix("(Pdb) ") for line in session if line.startswith("(Pdb) ")]
    assert any(c.startswith("break phi3_scratch.") for c in commands)  # breakpoints by qualified name
    done = subprocess.run([sys.executable, "-m", "pdb", "decode.py"],
                          input="\n".join(commands + ["quit"]) + "\n",
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    shown = [line for line in session if not line.startswith("(Pdb) ")]
    assert len(shown) > 10
    at = 0
    for line in shown:
        found = done.stdout.find(line, at)
        assert found >= 0, f"the walkthrough shows {line!r}, which pdb did not print " \
                           f"(after position {at}):\n{done.stdout[at:at + 2000]}"
        at = found + len(line)
    assert "Error" not in done.stdout, done.stdout


def test_the_walkthrough_names_code_by_qualified_name_only():
    text = DOC.read_text()
    assert not re.search(r"\w\.py:\d+|\bl\. \d+|line \d+", text), \
        "a file:line reference drifts when code moves"
    names = set(re.findall(r"phi3_scratch(?:\.\w+)+", text))
    assert len(names) > 15
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue
        for attr in parts[cut:]:
            assert hasattr(obj, attr), f"the walkthrough names {name}, which does not exist"
            obj = getattr(obj, attr)
