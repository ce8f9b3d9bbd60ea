"""Loading never holds two copies of the weights (measured on a ~270 MB checkpoint, in a fresh process)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "load_memory.py"
pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                reason="needs Linux /proc to read peak memory")


def run(*args) -> dict:
    out = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_never_doubles_memory(tmp_path, dtype, report):
    run("make", tmp_path, "--dtype", dtype)
    ours = run("measure", tmp_path)
    report(f"load memory, {dtype} checkpoint -> float32: peak growth {ours['peak_over_weights']}x "
           f"the weights ({ours['weights_bytes'] / 2**20:.0f} MiB)")
    # One copy plus the loader's working memory; a second copy would be 1.5x or more.
    assert ours["peak_over_weights"] < 1.3, ours
    if dtype == "float32":  # the measurement does see a second copy when there is one
        naive = run("measure", tmp_path, "--naive")
        report("load memory, allocate-then-copy loader: "
               f"peak growth {naive['peak_over_weights']}x the weights")
        assert naive["peak_over_weights"] > 1.4, naive
