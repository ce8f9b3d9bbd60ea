"""The command outputs that README.md, docs/CLI.md and docs/WALKTHROUGH.md show, run and written back.

    python scripts/readme_outputs.py            # rerun every example, rewrite its block in the docs
    python scripts/readme_outputs.py --check    # only compare; exit 1 and show the differences

In the docs, an example is a fenced block right after a marker line `<!-- output: NAME -->`; its
first line is the command (`$ phi3-scratch ...`), the rest what the command printed (stdout only;
the loading lines on stderr are left out). Each runs in a fresh process, offline, on the built-in
tiny model (or on no weights at all: `arch` of a family model), from an empty working folder.

tests/test_readme.py runs the same comparison, so the docs cannot drift from the code. What a run
cannot repeat is not compared: times and speeds (lines marked as timed below have their numbers
masked) and, in the docs, lines a block elides with a lone `...`. Other numbers must agree to within
two units of their last printed digit (CPUs round the last bit of a float differently).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "CLI.md", ROOT / "docs" / "WALKTHROUGH.md"]
MARKER = re.compile(r"^( *)<!-- output: ([\w-]+) -->\n\1```[^\n]*\n(.*?)^\1```\n", re.M | re.S)
NUMBER = re.compile(r"-?\d+\.(\d+)(?:e([+-]\d+))?")
TIMED = re.compile(r"median|tokens/s|faster|\d+\.\d+ s\b")  # lines whose numbers are clock readings


@dataclass
class Example:
    argv: list[str]
    stdin: str | None = None
    checked: bool = True  # False: every line is a timing (the JSON of bench --vs-transformers)
    saves: str | None = None  # a file the command writes, copied to this path of the repo when rewriting

    def command(self) -> str:
        line = "phi3-scratch " + shlex.join(self.argv)
        typed = self.stdin.replace("\n", "\\n") if self.stdin else None  # as printf reads it
        return f"$ printf '{typed}' | {line}" if self.stdin else f"$ {line}"

    def run(self, keep: bool = False) -> str:
        """The command line, then what it prints on stdout (or on stderr, if it fails).

        keep: copy the file the command writes (`saves`) into the repo."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        with tempfile.TemporaryDirectory() as folder:
            done = subprocess.run([sys.executable, "-m", "phi3_scratch", *self.argv], input=self.stdin or "",
                                  capture_output=True, text=True, cwd=folder, env=env, timeout=600)
            if keep and self.saves and done.returncode == 0:
                shutil.copy(Path(folder) / self.argv[self.argv.index("--out") + 1], ROOT / self.saves)
        printed = done.stdout if done.returncode == 0 or done.stdout else done.stderr
        return self.command() + "\n" + printed.rstrip("\n") + "\n"


TINY = ["--model", "tiny"]
EXAMPLES = {
    "tour": Example(["tour", *TINY]),
    "generate": Example(["generate", "What does the KV cache do?", "--chat", *TINY]),
    "generate-plain": Example(["generate", "Each decoder layer", *TINY, "--max-new-tokens", "60"]),
    "generate-sampled": Example(["generate", "The KV cache", *TINY, "--max-new-tokens", "60", "--temperature",
                                 "1.2", "--top-p", "0.95", "--seed", "2"]),
    "chat": Example(["chat", *TINY],
                    stdin="What is RMSNorm?\nWhy is it computed in fp32?\n/reset\n/exit\n"),
    "arch": Example(["arch", *TINY]),
    "arch-mini": Example(["arch", "--model", "microsoft/Phi-3-mini-4k-instruct"]),
    "next-token": Example(["next-token", "The attention probabilities", *TINY, "--top-k", "5"]),
    "bench": Example(["bench", "The KV cache", *TINY]),
    "bench-compile": Example(["bench", "The KV cache", *TINY, "--compile"]),
    "bench-vs-transformers": Example(["bench", "The KV cache", *TINY, "--vs-transformers", "--runs", "3"],
                                     checked=False),
    "step": Example(["step", "The KV cache", *TINY, "--top-k", "4"], stdin="\n1\nq\n"),
    "lens": Example(["lens", "What is the sliding window?", "--chat", *TINY]),
    "lens-all": Example(["lens", "The KV cache", *TINY, "--all-positions"]),
    "attention": Example(["attention", "The KV cache keeps keys", *TINY, "--layer", "all", "--out",
                          "attention-all.png"], saves="docs/img/attention-all.png"),
    "compare": Example(["compare", *TINY]),
    "error-empty": Example(["generate", "", *TINY]),
    "error-zero": Example(["generate", "hi", *TINY, "--max-new-tokens", "0"]),
    "error-offline": Example(["generate", "hi"]),
}


def unindent(block: str, indent: str) -> str:
    return "".join(line.removeprefix(indent) for line in block.splitlines(keepends=True))


def shown_blocks() -> list[tuple[Path, str, str]]:
    """(doc, example name, block text without its indentation) for every marked block of the docs."""
    return [(doc, m.group(2), unindent(m.group(3), m.group(1))) for doc in DOCS for m in MARKER.finditer(doc.read_text())]


def same_line(shown: str, printed: str) -> bool:
    if TIMED.search(printed):  # clock readings: any number, in columns as wide as it takes
        shown, printed = " ".join(NUMBER.sub("N", shown).split()), " ".join(NUMBER.sub("N", printed).split())
    if NUMBER.sub("N", shown) != NUMBER.sub("N", printed):
        return False
    for a, b in zip(NUMBER.finditer(shown), NUMBER.finditer(printed)):
        unit = 10.0 ** (int(a.group(2) or 0) - len(a.group(1)))  # one unit of the last printed digit
        # 1e-05 notation is for differences (compare's table): noise below 1e-5 is no difference
        tolerance = max(2 * unit, 1e-5 if a.group(2) else 0.0)
        if abs(float(a.group()) - float(b.group())) > tolerance + 1e-12:
            return False
    return True


def differences(shown: str, printed: str) -> list[str]:
    """Where `shown` (a doc block, `...` lines eliding any run of lines) disagrees with `printed`."""
    expected, actual = shown.rstrip("\n").split("\n"), printed.rstrip("\n").split("\n")
    i = 0
    for n, line in enumerate(expected):
        if line.strip() == "...":
            following = expected[n + 1] if n + 1 < len(expected) else None
            while i < len(actual) and (following is None or not same_line(following, actual[i])):
                i += 1
            continue
        if i >= len(actual):
            return [f"shown line {n + 1} {line!r}: the command printed nothing more"]
        if not same_line(line, actual[i]):
            return [f"shown line {n + 1}: {line!r}", f"printed now:    {actual[i]!r}"]
        i += 1
    if i < len(actual):
        return [f"the command printed more: {actual[i]!r} (end the block with '...' to elide it)"]
    return []


def elided(shown: str, printed: str) -> str:
    """The new output, keeping a block's `...` elisions: each skips up to the line shown after it."""
    if "..." not in [line.strip() for line in shown.split("\n")]:
        return printed
    kept, actual, i = [], printed.rstrip("\n").split("\n"), 0
    expected = shown.rstrip("\n").split("\n")
    for n, line in enumerate(expected):
        if line.strip() != "...":
            if i < len(actual):
                kept.append(actual[i])
                i += 1
            continue
        following = expected[n + 1] if n + 1 < len(expected) else None
        skip = i
        while skip < len(actual) and (following is None or not same_line(following, actual[skip])):
            skip += 1
        if following is not None and skip == len(actual):  # the line after the elision is gone: keep all
            continue
        kept.append(line)
        i = skip
    kept += actual[i:]
    return "\n".join(kept) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = parser.parse_args(argv)
    failed = 0
    for doc in DOCS:
        text = doc.read_text()
        for m in list(MARKER.finditer(text)):
            indent, name, shown = m.group(1), m.group(2), unindent(m.group(3), m.group(1))
            if name not in EXAMPLES:
                print(f"{doc.name}: block {name!r} names no example of {Path(__file__).name}", file=sys.stderr)
                failed += 1
                continue
            printed = EXAMPLES[name].run(keep=not args.check)
            problems = differences(shown, printed) if EXAMPLES[name].checked else []
            print(f"{doc.name}: {name}: {'ok' if not problems else 'differs'}", file=sys.stderr)
            for line in problems:
                print(f"    {line}", file=sys.stderr)
            failed += bool(problems)
            if not args.check:
                new = "".join(indent + line if line.strip() else line
                              for line in elided(shown, printed).splitlines(keepends=True))
                text = text.replace(m.group(0), m.group(0).replace(m.group(3), new), 1)
        if not args.check:
            doc.write_text(text)
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
