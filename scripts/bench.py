"""Speed and memory side by side with transformers: see phi3_scratch/benchmark.py for what is measured.

    python scripts/bench.py --config small
    python scripts/bench.py --config phi3-mini --device cuda --markdown docs/BENCHMARKS.md
"""

from phi3_scratch.benchmark import main

if __name__ == "__main__":
    main()
