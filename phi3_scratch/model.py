"""The Phi-3 decoder, top to bottom, in the order this file defines it:

    Phi3ForCausalLM
    ├── model: Phi3Model
    │   ├── embed_tokens        token id -> vector (plain lookup, no scaling)
    │   ├── layers: N x Phi3DecoderLayer
    │   │   ├── input_layernorm             Phi3RMSNorm
    │   │   ├── self_attn: Phi3Attention    qkv_proj (fused) -> rotary -> GQA softmax -> o_proj
    │   │   ├── post_attention_layernorm    Phi3RMSNorm
    │   │   └── mlp: Phi3MLP                gate_up_proj (fused) -> silu(gate) * up -> down_proj
    │   ├── norm                Phi3RMSNorm
    │   └── rotary_emb          cos/sin tables (computed, not loaded; rotary.py)
    └── lm_head                 vector -> one logit per vocabulary entry

Start at Phi3ForCausalLM.forward, the one forward pass that everything runs: a user's
`model(input_ids)`, generate (every prefill and decode step), the Stepper, traces, and, compiled,
`compile=True`. (The notebook's body-then-head cell, `next-token` and the logit lens call its two
halves themselves: Phi3Model.forward, then lm_head.) After the classes come the helpers they
call: the input checks (once per call, at the edge), the positions and the attention mask (one
place for both), and the attention kernels. Module names equal the checkpoint's tensor names
(`model.layers.0.self_attn.qkv_proj.weight`), so loading is a plain name-to-tensor copy.

Shapes in comments use: B batch, T new tokens, S key slots attended (cached + new; with a static
cache, all of its slots), H hidden size, nH query heads, nKV key/value heads, groups = nH / nKV,
hd head_dim, I intermediate size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import Phi3Config
from .errors import Phi3Error, is_integer, type_name
from .rotary import Phi3RotaryEmbedding, apply_rotary


class Phi3ForCausalLM(nn.Module):
    """The body plus the head: logits over the vocabulary for every position (or the last few)."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # weight (V, H)
        if config.tie_word_embeddings:  # Phi-4-mini: the head reuses the embedding matrix
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,  # (B, cached + T): 1 real token, 0 left padding
        logits_to_keep: int = 0,
        check: bool = True,
    ) -> torch.Tensor:
        """Logits (B, T, V); logits_to_keep=n: only the last n positions', (B, n, V) (0 keeps all).

        Generation asks for the last position only: for a long prompt, logits at every position
        would cost T x V numbers (6 GB in bf16 for 100k tokens of Phi-3's 32064-word vocabulary).
        check=False skips the input checks: generate validated its input once, before its loop.
        """
        if not is_integer(logits_to_keep) or logits_to_keep < 0:
            raise Phi3Error(f"logits_to_keep must be an integer >= 0 (0 keeps every position), got {logits_to_keep!r}")
        hidden = self.model(input_ids, cache, attention_mask, check)  # (B, T, H)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]  # (B, n, H)
        logits = self.lm_head(hidden)  # (B, T or n, V)
        if self.model.trace is not None:
            self.model.trace.record(logits=logits)
        return logits

    def set_attention(self, kernel: str) -> "Phi3ForCausalLM":
        """Choose how attention is computed, in every layer; returns the model.

        "eager" (the default) writes every step out: scores, mask, softmax, weighted sum, the code
        to read and step through. "sdpa" hands the same maths to torch's fused
        scaled_dot_product_attention: faster for long inputs, the same logits to rounding. A
        trace (tracing.py) always runs the eager code, to record the attention probabilities.
        """
        check_attention_kernel(kernel)
        for layer in self.model.layers:
            layer.self_attn.kernel = kernel
        return self

    def new_cache(self, batch_size: int = 1, *, max_len: int, static: bool = False) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` positions (cache.py)."""
        if not is_integer(batch_size) or batch_size < 1:
            raise Phi3Error(f"batch_size must be a positive integer, got {batch_size!r} ({type_name(batch_size)})")
        if not is_integer(max_len) or not 0 < max_len <= self.config.max_position_embeddings:
            raise Phi3Error(
                f"max_len must be an integer in 1..max_position_embeddings={self.config.max_position_embeddings}, "
                f"got {max_len!r} ({type_name(max_len)})"
            )
        weight = self.model.embed_tokens.weight  # the model's dtype (a quantized head's is not)
        c = self.config
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim,
                       dtype=weight.dtype, device=weight.device, static=static)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, progress=None,
                        attention: str = "eager", quantize: str | None = None) -> "Phi3ForCausalLM":
        """Load a checkpoint (a local folder, a Hugging Face repo id, or "tiny"); see loading.py.

        quantize="int8": int8 weights, one scale per output channel; "int4": 4-bit weights, a scale and
        an offset per group of 128 inputs (quantize.py)."""
        from .loading import load_model

        return load_model(cls, path_or_repo_id, device=device, dtype=dtype, progress=progress, attention=attention,
                          quantize=quantize)

    def save_pretrained(self, folder) -> None:
        """Write config.json, generation_config.json and model.safetensors (a quantized model as it is).

        Whatever checkpoint the folder held is replaced; other files stay (saving.py)."""
        from .saving import save_model

        save_model(self, folder)


class Phi3Model(nn.Module):
    """The body: embeddings, the decoder layers and the final norm. Returns hidden states."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # weight (V, H)
        self.layers = nn.ModuleList(Phi3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Phi3RotaryEmbedding(config)
        self.trace = None  # set by tracing.trace(model): where forward records its intermediates

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,  # (B, cached + T): 1 real token, 0 left padding
        check: bool = True,
    ) -> torch.Tensor:
        if check:
            check_inputs(self.config, input_ids, cache, attention_mask, self.embed_tokens.weight)
        B, T = input_ids.shape
        device = input_ids.device
        if cache is None:
            slots, S = torch.arange(T, device=device), T  # (T,): the new tokens fill slots 0..T-1
        else:
            slots, S = cache.slots(T, device), cache.key_slots(T)  # after the cached positions
        real = cache.real if cache is not None and cache.static else attention_mask  # (B, S) or None
        positions, mask = positions_and_mask(slots, S, real, self.config.sliding_window, B)  # (B, T), (B, T, S)

        trace = self.trace  # a tracing.Trace while `with p3.trace(model)` is active, else None
        h = self.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rotary_emb(positions, h.dtype)  # (B, T, rotary_dim) each
        if trace is not None:
            trace.clear()  # a trace holds one forward pass: this one
            trace.record(embed=h, positions=positions, mask=mask)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, slots, None if trace is None else trace.layers[i])  # (B, T, H)
        if cache is not None:
            cache.advance(T)
        h = self.norm(h)  # (B, T, H)
        if trace is not None:
            trace.record(final_norm=h)
        return h


class Phi3DecoderLayer(nn.Module):
    """Pre-norm residual block: h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.self_attn = Phi3Attention(config, layer_idx)
        self.mlp = Phi3MLP(config)
        self.input_layernorm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, mask, cache, slots, trace=None):
        x = self.input_layernorm(h)  # (B, T, H)
        attn_out = self.self_attn(x, cos, sin, mask, cache, slots, trace)  # (B, T, H)
        h_mid = h + attn_out  # the residual stream after attention
        x_mid = self.post_attention_layernorm(h_mid)  # (B, T, H)
        mlp_out = self.mlp(x_mid)  # (B, T, H)
        h_out = h_mid + mlp_out
        if trace is not None:  # see tracing.py
            trace.record(input_norm=x, attn_out=attn_out, attn_residual=h_mid, post_attn_norm=x_mid,
                         mlp_out=mlp_out, residual=h_out)
        return h_out


class Phi3RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), the mean taken over the hidden channels.

    The normalisation runs in fp32 and is cast back to the input dtype BEFORE the weight
    multiplies it: in bf16 the other order rounds differently and drifts from the reference.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))  # (H,)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # (B, T, H)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (B, T, H)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"({self.weight.shape[0]},), eps={self.eps}"


class Phi3Attention(nn.Module):
    """Causal self-attention with one fused q|k|v projection and grouped-query heads (GQA).

    GQA: nH query heads share nKV key/value heads, groups = nH / nKV queries per kv head.
    Query head h reads kv head h // groups. With nH = 8, nKV = 2:

        q heads   0 1 2 3 | 4 5 6 7
        kv head      0    |    1

    The softmax(q k^T / sqrt(hd) + mask) v itself is one of the kernels at the end of this file,
    chosen by `kernel` (see Phi3ForCausalLM.set_attention): eager_attention, the one to read.
    """

    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_split = (q_size, kv_size, kv_size)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)  # weight (H, nH*hd)
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=False)  # weight (nH*hd + 2*nKV*hd, H)
        self.kernel = "eager"  # a key of ATTENTION_KERNELS

    def forward(
        self,
        x: torch.Tensor,  # (B, T, H), already normed
        cos: torch.Tensor,  # (B, T, rotary_dim)
        sin: torch.Tensor,
        mask: torch.Tensor,  # (B, T, S) fp32, additive: 0 where allowed, most negative finite value elsewhere
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,  # (T,): the cache slots of the new tokens (with a cache)
        trace=None,  # a tracing.Records: receives q, k, v and the attention probabilities
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)  # (B, T, nH*hd), (B, T, nKV*hd) x2
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nH, T, hd): one row per head
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nKV, T, hd)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nKV, T, hd)

        # Rotate q and k by their positions BEFORE caching: cached keys never need rotating again.
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if trace is not None:
            trace.record(q=q, k=k, v=v)  # after rotary; the new positions only
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, slots)  # (B, nKV, S, hd): earlier positions + these

        attention = ATTENTION_KERNELS["eager" if trace is not None else self.kernel]
        out = attention(q, k, v, mask, trace)  # (B, nH, T, hd)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, nH*hd): heads side by side
        return self.o_proj(out)  # (B, T, H)


class Phi3MLP(nn.Module):
    """down_proj(up * silu(gate)), with gate and up from one fused matmul, gate first."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)  # weight (2I, H)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)  # weight (H, I)
        self.activation_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.down_proj(up * self.activation_fn(gate))  # (B, T, H)


# --------------------------------------------------------------------- checks, at the edge


def check_inputs(config: Phi3Config, input_ids, cache: KVCache | None, attention_mask, weight: torch.Tensor) -> None:
    """Refuse input the model cannot run, with the reason: once per public call, never per decode step.

    Checking the id range and the mask's values reads a few numbers back from the device: on a GPU
    each is a wait for the GPU, the price of a clear error instead of an index error deep inside
    the embedding. generate pays it once, before its loop, and then calls forward with check=False.
    """
    B, T = check_input_ids(input_ids, config.vocab_size)
    check_on_device(weight.device, input_ids=input_ids, attention_mask=attention_mask)
    past = 0
    if cache is not None:
        check_cache(cache, config, weight)
        cache.check_room(B, T)
        if cache.static:
            if attention_mask is not None:
                raise Phi3Error("a static cache keeps its own padding mask (cache.real); pass attention_mask=None")
            return
        past = cache.length
        if attention_mask is None and cache.padded:
            raise Phi3Error(f"the cache holds a left-padded batch: pass attention_mask of shape (batch, cached + new) "
                            f"= {(B, past + T)} on every call, or the padded keys would be attended to")
    if past + T > config.max_position_embeddings:
        raise Phi3Error(
            f"sequence of {past + T} positions ({past} cached + {T} new) is longer than the "
            f"model's max_position_embeddings {config.max_position_embeddings}"
        )
    if attention_mask is not None:
        pads = check_attention_mask(attention_mask, (B, past + T), "(batch, cached + new tokens)")
        if cache is not None:  # remember padding: a later call without the mask would not see it
            cache.padded = cache.padded or pads


def as_causal_lm(model, where: str) -> Phi3ForCausalLM:
    """The Phi3ForCausalLM a tool runs: `model` itself, or the one a notebook model wraps (notebook.py)."""
    inner = getattr(model, "causal_lm", model)  # p3.AutoModelForCausalLM's model keeps the plain one there
    if not isinstance(inner, Phi3ForCausalLM):
        hint = " (the body, model.model: pass the whole model)" if isinstance(model, Phi3Model) else ""
        raise Phi3Error(f"{where}: model must be this package's Phi3ForCausalLM (p3.Phi3ForCausalLM.from_pretrained), "
                        f"got {type_name(model)}{hint}")
    return inner


def check_on_device(device: torch.device, **tensors) -> None:
    """Each tensor given (None: not given) on the model's device, or an error saying where to move it."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != device:
            raise Phi3Error(f"{name} is on {t.device} but the model is on {device}: move it with .to({str(device)!r})")


def check_cache(cache, config: Phi3Config, weight: torch.Tensor) -> None:
    """A KVCache made for this model: its layers, kv heads, head size, dtype and device."""
    if not isinstance(cache, KVCache):
        raise Phi3Error(f"cache must be a KVCache (model.new_cache(batch_size, max_len=...)), got {type(cache).__name__}")
    keys = cache.keys[0]
    have = (len(cache.keys), keys.shape[1], keys.shape[3], str(keys.dtype), str(keys.device))
    want = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim, str(weight.dtype), str(weight.device))
    if have != want:
        fields = "(layers, kv heads, head size, dtype, device)"
        raise Phi3Error(f"the cache does not fit this model: its {fields} are {have}, the model's {want}; "
                        f"make it with model.new_cache(batch_size, max_len=...)")


def check_input_ids(input_ids: torch.Tensor, vocab_size: int, name: str = "input_ids") -> tuple[int, int]:
    """(B, T) of a 2-D tensor of ids in the vocabulary; a Phi3Error saying what is wrong otherwise, calling
    the tensor by the caller's name for it (the Stepper's is prompt_ids)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise Phi3Error(f"{name} must be a 2-D LongTensor (batch, tokens), got {shape}")
    B, T = input_ids.shape
    if B == 0 or T == 0:  # before the dtype: torch.tensor([[]]) is a float tensor
        raise Phi3Error(f"{name} is empty: shape {(B, T)}; give at least one token per row")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise Phi3Error(f"{name} must hold integer token ids, got dtype {input_ids.dtype}")
    lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one read from the device for both
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise Phi3Error(f"token id {bad} is outside the vocabulary: expected ids in 0..{vocab_size - 1}")
    return B, T


def check_attention_mask(mask, shape: tuple[int, int], meaning: str) -> bool:
    """Refuse a mask of another type, shape or values; return whether it pads (one read of the device)."""
    if not isinstance(mask, torch.Tensor):
        raise Phi3Error(f"attention_mask must be a tensor of 0 and 1, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise Phi3Error(f"attention_mask must have shape {meaning} = {shape}, got {tuple(mask.shape)}")
    valid = pads = False  # a float or complex mask is refused without reading it
    if not (mask.dtype.is_floating_point or mask.dtype.is_complex):
        valid, pads = torch.stack([((mask == 0) | (mask == 1)).all(), (mask == 0).any()]).tolist()
    if not valid:
        raise Phi3Error(f"attention_mask must hold only 0 (padding) and 1 (real token) as integers or bools, "
                        f"got dtype {mask.dtype} with values {mask.unique().tolist()[:6]}")
    return pads


def check_attention_kernel(kernel) -> None:
    if kernel not in ATTENTION_KERNELS:
        raise Phi3Error(f"attention must be {' or '.join(map(repr, ATTENTION_KERNELS))}, got {kernel!r}")


# ---------------------------------------------------------- positions and the attention mask


def positions_and_mask(slots: torch.Tensor, S: int, real: torch.Tensor | None, window: int | None,
                       B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary position of each new token (B, T) and the additive attention mask (B, T, S).

    slots (T,): where the new tokens sit among the S key slots (after the cached ones); a tensor,
    so that a compiled step can take it from the device. real (B, S): False at left padding (None:
    no padding). A token's position is the number of real tokens before it, so padding shifts
    nothing: position = cumsum(real) - 1 at its slot (padding itself gets 0). Query slot q may see
    key slot k when

        k <= q             causal: never the future
        k >  q - window    sliding window: the last `window` keys, itself included
        real[k]            not padding

    Left padding shifts slots and positions by the same amount, so a window counted in slots is
    the same window counted in positions.
    """
    if real is None:
        real = torch.ones(B, S, dtype=torch.bool, device=slots.device)
    real = real.bool()  # (B, S)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0).index_select(1, slots)  # (B, T)
    q, k = slots[:, None], torch.arange(S, device=slots.device)[None, :]  # (T, 1), (1, S)
    allowed = k <= q  # (T, S)
    if window is not None:
        allowed = allowed & (k > q - window)
    allowed = allowed[None] & real[:, None, :]  # (B, T, S): padded keys are never seen
    zeros = torch.zeros(allowed.shape, dtype=torch.float32, device=slots.device)
    return positions, zeros.masked_fill(~allowed, torch.finfo(torch.float32).min)  # (B, T), (B, T, S)


# ------------------------------------------------------------------------- attention kernels


def eager_attention(q, k, v, mask, trace=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v, written out; q (B, nH, T, hd), k and v (B, nKV, S, hd).

    GQA without copying: the query heads are viewed as (nKV, groups), so each kv head broadcasts
    over the query heads of its group.
    """
    B, nH, T, hd = q.shape
    nKV = k.shape[1]
    q = q.view(B, nKV, nH // nKV, T, hd)  # (B, nKV, groups, T, hd)
    k, v = k[:, :, None], v[:, :, None]  # (B, nKV, 1, S, hd): broadcast over the group
    scores = (q @ k.transpose(-1, -2)) * hd**-0.5  # (B, nKV, groups, T, S)
    # The mask is added in fp32, where the softmax runs anyway: in fp16, score + most negative
    # value would overflow to -inf, and a row of padding with every key masked would give NaN.
    scores = scores.float() + mask[:, None, None]  # (B, nKV, groups, T, S), mask broadcast over heads
    probs = F.softmax(scores, dim=-1).to(q.dtype)  # (B, nKV, groups, T, S), rows sum to 1
    if trace is not None:
        trace.record(attn_probs=probs.reshape(B, nH, T, -1))  # (B, nH, T, S): what was used
    out = probs @ v  # (B, nKV, groups, T, hd)
    return out.reshape(B, nH, T, hd)  # (B, nH, T, hd), head h = kv head h // groups


def sdpa_attention(q, k, v, mask, trace=None) -> torch.Tensor:
    """The same maths in torch's fused scaled_dot_product_attention: the (T, S) probabilities are
    never stored. That kernel (on a GPU the memory-efficient one, which takes a mask) wants as
    many kv heads as query heads, so each kv head is repeated for its group. The mask, in q's
    dtype, keeps a finite "most negative" value: see the fp16 note in eager_attention."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (B, nH, S, hd): head h reads kv head h // groups
        v = v.repeat_interleave(groups, dim=1)
    # Half the dtype's most negative number: score + mask stays finite in fp16 (-65504 plus a negative
    # score would be -inf, and a row with every key masked would give NaN).
    mask = mask[:, None].clamp(min=torch.finfo(q.dtype).min / 2).to(q.dtype)  # (B, 1, T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nH, T, hd)


ATTENTION_KERNELS = {"eager": eager_attention, "sdpa": sdpa_attention}
