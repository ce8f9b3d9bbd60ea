"""The Phi-3 decoder, top to bottom, in the order a token flows through it:

    Phi3ForCausalLM
    ├── model: Phi3Model
    │   ├── embed_tokens        token id -> vector (plain lookup, no scaling)
    │   ├── layers: N x Phi3DecoderLayer
    │   │   ├── input_layernorm             RMSNorm
    │   │   ├── self_attn: Phi3Attention    qkv_proj (fused) -> rotary -> GQA softmax -> o_proj
    │   │   ├── post_attention_layernorm    RMSNorm
    │   │   └── mlp: Phi3MLP                gate_up_proj (fused) -> silu(gate) * up -> down_proj
    │   ├── norm                RMSNorm
    │   └── rotary_emb          cos/sin tables (computed, not loaded)
    └── lm_head                 vector -> one logit per vocabulary entry

Module names equal the checkpoint's tensor names (`model.layers.0.self_attn.qkv_proj.weight`),
so loading is a plain name-to-tensor copy. Shapes in comments use
B batch, T new tokens, S keys attended (cached + new), H hidden, nH query heads, nKV key/value
heads, hd head_dim, I intermediate size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import Phi3Config
from .errors import Phi3Error
from .rotary import Phi3RotaryEmbedding, apply_rotary


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

    GQA: nH query heads share nKV key/value heads, kv_groups = nH / nKV queries per kv head.
    Query head h reads kv head h // kv_groups. With nH = 8, nKV = 2:

        q heads   0 1 2 3 | 4 5 6 7
        kv head      0    |    1

    Instead of copying each kv head kv_groups times, the query heads are viewed as
    (nKV, kv_groups) so one kv head broadcasts over its group.
    """

    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.kv_groups = config.kv_groups
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_split = (q_size, kv_size, kv_size)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)  # weight (H, nH*hd)
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=False)  # (nH*hd + 2*nKV*hd, H)
        self.kernel = "eager"  # or "sdpa": see Phi3ForCausalLM.set_attention

    def forward(
        self,
        x: torch.Tensor,  # (B, T, H), already normed
        cos: torch.Tensor,  # (B, T, rotary_dim)
        sin: torch.Tensor,
        mask: torch.Tensor,  # (B, T, S) fp32, additive: 0 where allowed, most negative finite value elsewhere
        cache: KVCache | None,
        trace=None,  # a tracing.Records: receives q, k, v and the attention probabilities
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)  # (B, T, nH*hd), (B, T, nKV*hd) x2
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nH, T, hd)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nKV, T, hd)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nKV, T, hd)

        # Rotate q and k by their positions BEFORE caching: cached keys never need rotating again.
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if trace is not None:
            trace.record(q=q, k=k, v=v)  # after rotary; the new positions only
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nKV, S, hd): earlier positions + these

        if self.kernel == "sdpa" and trace is None:
            # The same softmax(q k^T / sqrt(hd) + mask) v in one fused torch kernel (on a GPU the
            # memory-efficient one, which takes a mask): the (T, S) probabilities are never stored.
            # That kernel wants as many kv heads as query heads, so each kv head is repeated for
            # its group. The mask, in q's dtype, keeps a finite "most negative" value: see the fp16 note below.
            if self.kv_groups > 1:
                k = k.repeat_interleave(self.kv_groups, dim=1)  # (B, nH, S, hd): head h reads kv head h // groups
                v = v.repeat_interleave(self.kv_groups, dim=1)
            mask = mask[:, None].clamp(min=torch.finfo(q.dtype).min / 2).to(q.dtype)  # (B, 1, T, S)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nH, T, hd)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

        q = q.view(B, self.num_kv_heads, self.kv_groups, T, self.head_dim)  # (B, nKV, groups, T, hd)
        k, v = k[:, :, None], v[:, :, None]  # (B, nKV, 1, S, hd): broadcast over the group
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5  # (B, nKV, groups, T, S)
        # The mask is added in fp32, where the softmax runs anyway: in fp16, score + most negative
        # value would overflow to -inf, and a row of padding with every key masked would give NaN.
        scores = scores.float() + mask[:, None, None]  # (B, nKV, groups, T, S), mask broadcast over heads
        probs = F.softmax(scores, dim=-1).to(q.dtype)  # (B, nKV, groups, T, S), rows sum to 1
        if trace is not None:
            trace.record(attn_probs=probs.reshape(B, self.num_heads, T, -1))  # (B, nH, T, S): what was used
        out = probs @ v  # (B, nKV, groups, T, hd)
        out = out.reshape(B, self.num_heads, T, self.head_dim)  # (B, nH, T, hd), head h = g*groups + r
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # heads side by side
        return self.o_proj(out)  # (B, T, H)


class Phi3MLP(nn.Module):
    """down_proj(up * silu(gate)), with gate and up from one fused matmul, gate first."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)  # (2I, H)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)  # (H, I)
        self.activation_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.down_proj(up * self.activation_fn(gate))  # (B, T, H)


class Phi3DecoderLayer(nn.Module):
    """Pre-norm residual block: h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.self_attn = Phi3Attention(config, layer_idx)
        self.mlp = Phi3MLP(config)
        self.input_layernorm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, mask, cache, trace=None):
        x = self.input_layernorm(h)  # (B, T, H)
        attn_out = self.self_attn(x, cos, sin, mask, cache, trace)  # (B, T, H)
        h_mid = h + attn_out  # the residual stream after attention
        x_mid = self.post_attention_layernorm(h_mid)
        mlp_out = self.mlp(x_mid)  # (B, T, H)
        h_out = h_mid + mlp_out
        if trace is not None:  # see tracing.py
            trace.record(input_norm=x, attn_out=attn_out, attn_residual=h_mid, post_attn_norm=x_mid,
                         mlp_out=mlp_out, residual=h_out)
        return h_out


class Phi3Model(nn.Module):
    """The body: embeddings, the decoder layers and the final norm. Returns hidden states."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # (V, H)
        self.layers = nn.ModuleList(Phi3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Phi3RotaryEmbedding(config)
        self.trace = None  # set by tracing.trace(model): where forward records its intermediates

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,  # (B, S): 1 real token, 0 padding
    ) -> torch.Tensor:
        B, T = check_input_ids(input_ids, self.config.vocab_size)
        past = 0
        if cache is not None:
            cache.check_room(B, T)
            past = cache.length
        if past + T > self.config.max_position_embeddings:
            raise Phi3Error(
                f"sequence of {past + T} positions ({past} cached + {T} new) is longer than the "
                f"model's max_position_embeddings {self.config.max_position_embeddings}"
            )
        positions = position_ids(B, T, past, attention_mask, input_ids.device)  # (B, T)
        mask = causal_mask(T, past, attention_mask, self.config.sliding_window, B, input_ids.device)  # (B, T, S)

        trace = self.trace  # a tracing.Trace while `with p3.trace(model)` is active, else None
        h = self.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rotary_emb(positions, h.dtype)  # (B, T, rotary_dim) each
        if trace is not None:
            trace.record(embed=h, positions=positions, mask=mask)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, None if trace is None else trace.layers[i])  # (B, T, H)
        if cache is not None:
            cache.advance(T)
        h = self.norm(h)  # (B, T, H)
        if trace is not None:
            trace.record(final_norm=h)
        return h


class Phi3ForCausalLM(nn.Module):
    """The body plus the head: logits over the vocabulary for every position."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # (V, H)
        if config.tie_word_embeddings:  # Phi-4-mini: the head reuses the embedding matrix
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,  # (B, cache length + T)
    ) -> torch.Tensor:
        logits = self.lm_head(self.model(input_ids, cache, attention_mask))  # (B, T, V)
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

    def new_cache(self, batch_size: int = 1, *, max_len: int) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` positions."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise Phi3Error(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(max_len, int) or not 0 < max_len <= self.config.max_position_embeddings:
            raise Phi3Error(
                f"max_len must be in 1..max_position_embeddings={self.config.max_position_embeddings}, "
                f"got {max_len}"
            )
        weight = self.lm_head.weight
        c = self.config
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim,
                       dtype=weight.dtype, device=weight.device)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, progress=None,
                        attention: str = "eager") -> "Phi3ForCausalLM":
        """Load a checkpoint (a local folder or a Hugging Face repo id); see phi3_scratch.loading."""
        from .loading import load_model

        return load_model(cls, path_or_repo_id, device=device, dtype=dtype, progress=progress, attention=attention)


# --------------------------------------------------------------------------- inputs and masks


def check_attention_kernel(kernel) -> None:
    if kernel not in ("eager", "sdpa"):
        raise Phi3Error(f"attention must be 'eager' or 'sdpa', got {kernel!r}")


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> tuple[int, int]:
    """Refuse input the model cannot run, with the reason; returns (B, T).

    Checking the id range reads two numbers back from the device: on a GPU that is a sync per
    call, the price of a clear error instead of an index error deep inside the embedding.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise Phi3Error(f"input_ids must be a 2-D LongTensor (batch, tokens), got {shape}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise Phi3Error(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise Phi3Error(f"input_ids is empty: shape {(B, T)}; give at least one token per row")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise Phi3Error(f"token id {bad} is outside the vocabulary: expected ids in 0..{vocab_size - 1}")
    return B, T


def position_ids(B: int, T: int, past: int, attention_mask: torch.Tensor | None, device) -> torch.Tensor:
    """The position of each new token, (B, T).

    Without padding a token's position is its index in the sequence. With left padding, each
    row counts only its real tokens: position = cumsum(mask) - 1, and padding gets 0.
    """
    if attention_mask is None:
        return torch.arange(past, past + T, device=device).expand(B, T)
    check_attention_mask(attention_mask, (B, past + T), "(batch, cached + new tokens)")
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)


def check_attention_mask(mask, shape: tuple[int, int], meaning: str) -> None:
    if not isinstance(mask, torch.Tensor):
        raise Phi3Error(f"attention_mask must be a tensor of 0 and 1, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise Phi3Error(f"attention_mask must have shape {meaning} = {shape}, got {tuple(mask.shape)}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
        raise Phi3Error(f"attention_mask must hold only 0 (padding) and 1 (real token) as integers or bools, "
                        f"got dtype {mask.dtype} with values {mask.unique().tolist()[:6]}")


def causal_mask(T: int, past: int, attention_mask: torch.Tensor | None, window: int | None,
                B: int, device) -> torch.Tensor:
    """Additive fp32 attention mask (B, T, S), S = past + T: 0 where a query may look, else -inf-like.

    Query i sits in slot q = past + i and may see key slot k when
        k <= q             causal: never the future
        k >  q - window    sliding window: the last `window` keys, itself included
        mask[k] == 1       not padding
    Left padding shifts slots and positions by the same amount, so a window counted in slots is
    the same window counted in positions.
    """
    q = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
    return slot_mask(q, past + T, attention_mask, window, B)


def slot_mask(q: torch.Tensor, S: int, attention_mask: torch.Tensor | None, window: int | None,
              B: int) -> torch.Tensor:
    """causal_mask for queries in the slots q (T, 1) over S key slots: (B, T, S).

    The compiled decode step (compiled.py) calls it with q held in a device tensor."""
    T, device = q.shape[0], q.device
    k = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = k <= q  # (T, S)
    if window is not None:
        allowed = allowed & (k > q - window)
    allowed = allowed.expand(B, T, S)  # (B, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]  # padded keys are never seen
    zeros = torch.zeros(allowed.shape, device=device)
    return zeros.masked_fill(~allowed, torch.finfo(torch.float32).min)  # (B, T, S)
