"""`arch` and `next-token`: the module tree with its sizes, and one forward pass body then head."""

from __future__ import annotations

import torch

from .common import count, encode_prompt, load, meta_model
from ..loading import weight_bytes


def cmd_arch(args, model=None) -> None:
    """The module tree and sizes; without a loaded model, from the config alone (no weights read)."""
    model = model or meta_model(args)
    c = model.config
    print(model)
    layers = model.model.layers
    parts = {
        "embed_tokens": model.model.embed_tokens.weight.numel(),
        "attention (qkv_proj, o_proj)": sum(count(layer.self_attn) for layer in layers),
        "mlp (gate_up_proj, down_proj)": sum(count(layer.mlp) for layer in layers),
        "norms": sum(p.numel() for n, p in model.named_parameters() if "norm" in n),
        "lm_head": 0 if c.tie_word_embeddings else count(model.lm_head),
    }
    total = count(model)
    print(f"\n{'part':34s}{'parameters':>16s}{'share':>8s}")
    for name, n in parts.items():
        note = "  (tied: the embedding matrix)" if name == "lm_head" and c.tie_word_embeddings else ""
        print(f"{name:34s}{n:>16,}{n / total:>8.1%}{note}")
    print(f"{'total':34s}{total:>16,}")
    element = model.model.embed_tokens.weight.element_size()  # the KV cache's dtype, the model's
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * element  # k and v
    size = weight_bytes(model)
    kind = f" ({c.quantization} matrices, scales and the rest)" if c.quantization else ""
    print(f"\nweights: {size / 1e9:.3f} GB ({size / 2**30:.3f} GiB) in "
          f"{model.model.embed_tokens.weight.dtype}{kind}")
    print(f"KV cache: {per_token / 1024:.1f} KiB per token (2 x {c.num_hidden_layers} layers x "
          f"{c.num_key_value_heads} kv heads x {c.head_dim} x {element} B); "
          f"{per_token * c.max_position_embeddings / 2**30:.3f} GiB "
          f"for all {c.max_position_embeddings} positions")


def cmd_next_token(args, loaded=None) -> None:
    model, tokenizer = loaded or load(args)
    ids = encode_prompt(tokenizer, args.prompt, args.chat, model.lm_head.weight.device)
    with torch.no_grad():
        hidden = model.model(ids)  # the body: (1, T, hidden)
        logits = model.lm_head(hidden[:, -1]).float()[0]  # the head, last position only: (V,)
    probs = logits.softmax(-1)
    top = logits.topk(min(args.top_k, logits.numel()))
    print(f"hidden state {tuple(hidden.shape)} -> logits {tuple(logits.shape)}; "
          f"argmax: {int(logits.argmax())}")
    print(f"{'rank':>4s} {'id':>7s}  {'token':20s}{'logit':>9s}{'prob':>9s}")
    for rank, (value, token) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        print(f"{rank:>4d} {token:>7d}  "
              f"{tokenizer.id_to_piece(token)!r:20s}{value:>9.3f}{probs[token].item():>9.2%}")
