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
call: the positions and the attention mask (one place for both), and the attention kernels. The
input checks live in checks.py: forward runs them once, on entry. Each named intermediate passes
through a tap, `tap("attn_out", ...)`: `untouched` returns it as it is, unless p3.trace or
p3.intervene is listening. Module names equal the checkpoint's tensor names
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
from .checks import check_attention_kernel, check_inputs, check_logits_to_keep, check_new_cache
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
        if check:
            check_logits_to_keep(logits_to_keep)
        hidden = self.model(input_ids, cache, attention_mask, check)  # (B, T, H)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]  # (B, n, H)
        logits = self.lm_head(hidden)  # (B, T or n, V)
        probe = self.model.probe
        return logits if probe is None else probe("logits", logits)

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
        check_new_cache(self.config, batch_size, max_len)
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

        return load_model(cls, path_or_repo_id, device=device, dtype=dtype, progress=progress,
                          attention=attention, quantize=quantize)

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
        # A tracing.Probe while p3.trace or p3.intervene is active, else None: see `untouched`.
        self.probe = None

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
        # positions (B, T), mask (B, T, S)
        positions, mask = positions_and_mask(slots, S, real, self.config.sliding_window, B)

        probe = self.probe
        tap = untouched if probe is None else probe.begin(positions=positions, mask=mask)  # a new pass
        h = tap("embed", self.embed_tokens(input_ids))  # (B, T, H)
        cos, sin = self.rotary_emb(positions, h.dtype)  # (B, T, rotary_dim) each
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, slots,
                      None if probe is None else probe.layers[i])  # (B, T, H)
        if cache is not None:
            cache.advance(T)
        return tap("final_norm", self.norm(h))  # (B, T, H)


class Phi3DecoderLayer(nn.Module):
    """Pre-norm residual block: h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.self_attn = Phi3Attention(config, layer_idx)
        self.mlp = Phi3MLP(config)
        self.input_layernorm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, mask, cache, slots, probe=None):
        tap = untouched if probe is None else probe  # each tap names a point a trace or an edit can reach
        x = tap("input_norm", self.input_layernorm(h))  # (B, T, H)
        attn_out = tap("attn_out", self.self_attn(x, cos, sin, mask, cache, slots, probe))  # (B, T, H)
        h = tap("attn_residual", h + attn_out)  # the residual stream after attention
        x = tap("post_attn_norm", self.post_attention_layernorm(h))  # (B, T, H)
        mlp_out = tap("mlp_out", self.mlp(x, probe))  # (B, T, H)
        return tap("residual", h + mlp_out)  # (B, T, H): the layer's output


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
        # weight (nH*hd + 2*nKV*hd, H)
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=False)
        self.kernel = "eager"  # a key of ATTENTION

    def forward(
        self,
        x: torch.Tensor,  # (B, T, H), already normed
        cos: torch.Tensor,  # (B, T, rotary_dim)
        sin: torch.Tensor,
        mask: torch.Tensor,  # (B, T, S) fp32, additive: 0 where allowed, most negative finite value elsewhere
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,  # (T,): the cache slots of the new tokens (with a cache)
        probe=None,  # a tracing.Probe: this layer's points (see Phi3DecoderLayer.forward)
    ) -> torch.Tensor:
        tap = untouched if probe is None else probe
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)  # (B, T, nH*hd), (B, T, nKV*hd) x2
        q = tap("q_raw", q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2))  # (B, nH, T, hd)
        k = tap("k_raw", k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2))  # (B, nKV, T, hd)
        v = tap("v", v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2))  # (B, nKV, T, hd)

        # Rotate q and k by their positions BEFORE caching: cached keys never need rotating again.
        q = tap("q", apply_rotary(q, cos, sin))
        k = tap("k", apply_rotary(k, cos, sin))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, slots)  # (B, nKV, S, hd): earlier positions + these

        # A probe that reads or edits the scores or probabilities needs them written out: eager.
        attention = ATTENTION["eager" if probe is not None and probe.eager else self.kernel]
        out = tap("head_out", attention(q, k, v, mask, probe))  # (B, nH, T, hd): each head's output
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, nH*hd): heads joined
        return self.o_proj(out)  # (B, T, H)


class Phi3MLP(nn.Module):
    """down_proj(up * silu(gate)), with gate and up from one fused matmul, gate first."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        # weight (2I, H)
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)  # weight (H, I)
        self.activation_fn = nn.SiLU()

    def forward(self, x: torch.Tensor, probe=None) -> torch.Tensor:
        tap = untouched if probe is None else probe
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.down_proj(tap("mlp_act", up * self.activation_fn(gate)))  # (B, T, I) -> (B, T, H)


def untouched(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tap when no probe is active: every tensor passes on as it is.

    A tap names a point of the forward pass. While p3.trace or p3.intervene is active, the probe
    (tracing.py) is the tap instead: it records the tensor, or returns an edited one.
    """
    return tensor


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


def eager_attention(q, k, v, mask, probe=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v, written out; q (B, nH, T, hd), k and v (B, nKV, S, hd).

    GQA without copying: the query heads are viewed as (nKV, groups), so each kv head broadcasts
    over the query heads of its group.
    """
    B, nH, T, hd = q.shape
    nKV = k.shape[1]
    q = q.view(B, nKV, nH // nKV, T, hd)  # (B, nKV, groups, T, hd)
    k, v = k[:, :, None], v[:, :, None]  # (B, nKV, 1, S, hd): broadcast over the group
    scores = (q @ k.transpose(-1, -2)) * hd**-0.5  # (B, nKV, groups, T, S)
    if probe is not None:  # a probe sees them per query head, (B, nH, T, S)
        scores = probe("scores", scores.reshape(B, nH, T, -1)).reshape(scores.shape)
    # The mask is added in fp32, where the softmax runs anyway: in fp16, score + most negative
    # value would overflow to -inf, and a row of padding with every key masked would give NaN.
    scores = scores.float() + mask[:, None, None]  # (B, nKV, groups, T, S), mask broadcast over heads
    probs = F.softmax(scores, dim=-1).to(q.dtype)  # (B, nKV, groups, T, S), rows sum to 1
    if probe is not None:
        probs = probe("attn_probs", probs.reshape(B, nH, T, -1)).reshape(probs.shape)
    out = probs @ v  # (B, nKV, groups, T, hd)
    return out.reshape(B, nH, T, hd)  # (B, nH, T, hd), head h = kv head h // groups


def sdpa_attention(q, k, v, mask, probe=None) -> torch.Tensor:
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


ATTENTION = {"eager": eager_attention, "sdpa": sdpa_attention}  # checks.ATTENTION_KERNELS names them
