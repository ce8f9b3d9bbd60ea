"""phi3_scratch: Microsoft's Phi-3 decoder (Phi3ForCausalLM), written from scratch in PyTorch.

    import phi3_scratch as p3
    model = p3.Phi3ForCausalLM.from_pretrained("microsoft/Phi-3-mini-4k-instruct")
    out = p3.generate(model, input_ids, max_new_tokens=200)

Reading order: the core, in this order, each file with what to look for.

1. config.py: Phi3Config, the numbers that fix a model's shape.
   Look at head_dim, kv_groups and rotary_dim, and at from_dict, which reads both on-disk formats.
2. model.py, top to bottom, which is the order of the module tree in its docstring.
   - Phi3ForCausalLM.forward: the body, then the head on the positions it keeps (logits_to_keep).
   - Phi3Model.forward: slots, positions and mask, the embedding, the layers, the final norm.
   - Phi3DecoderLayer.forward: two residual additions, each after an RMSNorm.
   - Phi3RMSNorm.forward: the cast back to the input dtype BEFORE the weight multiplies.
   - Phi3Attention.forward: one fused matmul split into q, k, v; rotary before the cache.
   - Phi3MLP.forward: gate and up from one matmul, gate first.
   - positions_and_mask: who sees whom (causal, sliding window, padding); positions skip padding.
   - eager_attention: the scores, the fp32 mask and softmax, GQA by broadcasting.
3. rotary.py: LongRoPE's per-call choice of factors, made on the device; rotate-half; partial rotary.
4. cache.py: KVCache's slots, update and advance; what static=True changes.
5. decode.py: greedy_decode, the reference loop: prefill, then one token at a time, argmax.
6. generation.py: stream_tokens, the production loop: sampling, stop ids read one step late,
   padding, LongRoPE's cache rebuild in next_logits.
7. checks.py: what a user's call checks, once, before the model runs.

The file map: the core above, then what surrounds it.

- core: config.py, model.py, rotary.py, cache.py, decode.py, generation.py, checks.py.
- plumbing:
  - loading.py: a folder or repo id, a meta-device model, then each safetensors tensor checked and placed.
  - saving.py: save_pretrained for the model and the tokenizer, never a mix of two checkpoints.
  - tokenizer.py, bpe.py, streaming.py: Phi-3's sentencepiece, Phi-4's byte-level BPE, decoding a stream.
  - family.py (and data/): the six published configs. errors.py: Phi3Error and warn.
- learning tools:
  - tracing.py: every intermediate of a forward pass, the logit lens, comparison with transformers.
  - intervene.py: change an activation and see what changes (ablate, patch, steer).
  - explore.py, serve.py: one forward pass drawn in the browser, as a file or live.
  - stepping.py: decode one token at a time, any token forced. plotting.py: attention heatmaps.
  - notebook.py, pipeline.py: the teaching notebook's transformers names.
- speed: compiled.py (compile=True), quantize.py (int8, int4), benchmark.py and profiling.py;
  cpu_kernels.py (and cpu_kernels.c): a decode step's products on every CPU core.
- cli/: the `phi3-scratch` command; its __init__ parses, one module per group of commands.
"""

from .cache import KVCache
from .config import Phi3Config
from .errors import Phi3Error
from . import loading  # noqa: F401  (p3.loading.TINY: the built-in tiny model's folder)
from .decode import greedy_decode
from .explore import explore
from .generation import generate, stream_tokens
from .intervene import ablate_head, ablate_neuron, intervene, patch, steer
from .model import Phi3ForCausalLM, Phi3Model
from .notebook import AutoModelForCausalLM, AutoTokenizer  # the teaching notebook's names
from .pipeline import pipeline
from .stepping import Stepper, StepRecord
from .tokenizer import Tokenizer
from .tracing import Trace, compare_with_transformers, logit_lens, trace

__all__ = ["AutoModelForCausalLM", "AutoTokenizer", "KVCache", "Phi3Config", "Phi3Error", "Phi3ForCausalLM",
           "Phi3Model", "StepRecord", "Stepper", "Tokenizer", "Trace", "compare_with_transformers",
           "ablate_head", "ablate_neuron", "explore", "generate", "greedy_decode", "intervene", "logit_lens",
           "patch", "pipeline", "steer", "stream_tokens", "trace"]
