"""phi3_scratch: Microsoft's Phi-3 decoder (Phi3ForCausalLM), written from scratch in PyTorch.

    import phi3_scratch as p3
    model = p3.Phi3ForCausalLM.from_pretrained("microsoft/Phi-3-mini-4k-instruct")
    out = p3.generate(model, input_ids, max_new_tokens=200)

Read in this order (docs/WALKTHROUGH.md's): config.py, model.py, rotary.py, cache.py,
generation.py, loading.py. Then tokenizer.py (bpe.py for Phi-4) and cli.py (the `phi3-scratch` command).

- family.py: the six published configs.
- quantize.py: int8 and int4 weights.
- notebook.py, pipeline.py: the teaching notebook's transformers names.
"""

from .cache import KVCache
from .config import Phi3Config
from .errors import Phi3Error
from . import loading  # noqa: F401  (p3.loading.TINY: the built-in tiny model's folder)
from .decode import greedy_decode
from .generation import generate, stream_tokens
from .model import Phi3ForCausalLM, Phi3Model
from .notebook import AutoModelForCausalLM, AutoTokenizer  # the teaching notebook's names
from .pipeline import pipeline
from .stepping import Stepper, StepRecord
from .tokenizer import Tokenizer
from .tracing import Trace, compare_with_transformers, logit_lens, trace

__all__ = ["AutoModelForCausalLM", "AutoTokenizer", "KVCache", "Phi3Config", "Phi3Error", "Phi3ForCausalLM",
           "Phi3Model", "StepRecord", "Stepper", "Tokenizer", "Trace", "compare_with_transformers",
           "generate", "greedy_decode", "logit_lens", "pipeline", "stream_tokens", "trace"]
