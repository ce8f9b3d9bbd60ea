"""int8 weight-only quantization (quantize.py): close to the full-precision model, saved and reloaded exactly.

The bound: on the tiny model, teacher-forced over 512 tokens of its corpus, the int8 model's
argmax agrees with the float32 model's at >= 95% of positions and no logit moves by more than 5%
of the largest logit (measured: 98.2% and 0.40 of 25.7).
"""

import pytest
import torch

import phi3_scratch as p3
from phi3_scratch.quantize import Int8Linear, quantize_int8, quantize_model

from .conftest import train_tiny


@pytest.fixture(scope="module")
def corpus_ids():
    script = train_tiny()
    tok = p3.Tokenizer.from_pretrained("tiny")
    return torch.tensor([tok.encode(" ".join(script.read_corpus(script.CORPUS)[0][:40]))[:512]])


def test_quantize_int8_is_symmetric_per_output_channel():
    torch.manual_seed(0)
    w = torch.randn(6, 10) * torch.tensor([0.01, 0.1, 1, 10, 100, 0.0])[:, None]  # rows of very different size
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (6,)
    assert q.abs().max() <= 127 and (q.abs().amax(1)[:5] == 127).all()  # each row's largest weight -> +-127
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-12).all()  # rounding error
    assert (q[5] == 0).all()  # an all-zero row stays zero


def test_int8_logits_stay_close_to_full_precision(corpus_ids, report):
    full = p3.Phi3ForCausalLM.from_pretrained("tiny")
    int8 = p3.Phi3ForCausalLM.from_pretrained("tiny", quantize="int8")
    assert isinstance(int8.model.layers[0].mlp.down_proj, Int8Linear) and int8.lm_head.weight.dtype == torch.int8
    assert int8.model.embed_tokens.weight.dtype == torch.float32  # the embedding stays
    with torch.no_grad():
        a, b = full(corpus_ids), int8(corpus_ids)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    diff, scale = (a - b).abs().max().item(), a.abs().max().item()
    report(f"int8 tiny model, {corpus_ids.shape[1]} teacher-forced positions: argmax agreement {agree:.1%}, "
           f"max |logit diff| {diff:.3f} (max |logit| {scale:.1f})")
    assert agree >= 0.95 and diff <= 0.05 * scale


def test_quantizing_while_loading_equals_quantizing_after(corpus_ids):
    loaded = p3.Phi3ForCausalLM.from_pretrained("tiny", quantize="int8")
    after = quantize_model(p3.Phi3ForCausalLM.from_pretrained("tiny"))
    with torch.no_grad():
        assert torch.equal(loaded(corpus_ids), after(corpus_ids))


def test_a_saved_int8_checkpoint_reloads_to_the_same_logits(tmp_path, corpus_ids):
    int8 = p3.Phi3ForCausalLM.from_pretrained("tiny", quantize="int8")
    int8.save_pretrained(tmp_path)
    again = p3.Phi3ForCausalLM.from_pretrained(tmp_path)  # config.json says int8: no argument needed
    assert again.config.quantization == "int8" and again.lm_head.weight.dtype == torch.int8
    with torch.no_grad():
        assert torch.equal(again(corpus_ids), int8(corpus_ids))
    full_size = (p3.loading.TINY / "model.safetensors").stat().st_size
    assert (tmp_path / "model.safetensors").stat().st_size < 0.4 * full_size  # fp32 -> int8 + scales
    assert p3.generate(again, corpus_ids[:, :8], 12, eos_token_id=[]).tolist() == \
        p3.generate(int8, corpus_ids[:, :8], 12, eos_token_id=[]).tolist()


def test_compiled_one_row_product_equals_the_eager_one():
    """Compiled, Int8Linear writes a one-row product as multiply-and-sum (one reduction reading int8);
    eagerly, as a matmul on the converted matrix. Both give the same numbers, to float rounding."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = Int8Linear(96, 40)
    layer.weight.data, layer.scale.data = quantize_int8(torch.randn(40, 96))
    compiled = torch.compile(layer, fullgraph=True)
    for shape in [(1, 1, 96), (1, 96), (3, 96), (2, 5, 96)]:  # one row (the reduction), several rows (the matmul)
        x = torch.randn(shape)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    graphs = []  # the traced graphs, by a backend that records them and runs them as they are

    def record(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes})
        return gm.forward

    torch._dynamo.reset()
    traced = torch.compile(layer, backend=record, fullgraph=True)
    traced(torch.randn(1, 1, 96)), traced(torch.randn(3, 96))
    one_row, rows = (" ".join(g) for g in graphs)
    assert "sum" in one_row and "linear" not in one_row and "linear" in rows
    torch._dynamo.reset()


def test_compiled_int8_decoding_gives_the_eager_tokens(corpus_ids):
    torch._dynamo.reset()
    int8 = p3.Phi3ForCausalLM.from_pretrained("tiny", quantize="int8")
    eager = p3.generate(int8, corpus_ids[:, :6], 10, eos_token_id=[])
    assert torch.equal(p3.generate(int8, corpus_ids[:, :6], 10, eos_token_id=[], compile=True), eager)
    torch._dynamo.reset()


def test_quantize_errors(tmp_path):
    with pytest.raises(p3.Phi3Error, match=r"quantize must be None or one of \['int8'\], got 'int4'"):
        p3.Phi3ForCausalLM.from_pretrained("tiny", quantize="int4")
    config = p3.Phi3ForCausalLM.from_pretrained("tiny").config.to_dict()
    with pytest.raises(p3.Phi3Error, match="quantization must be null or 'int8', got 'fp4'"):
        p3.Phi3Config.from_dict({**config, "quantization": "fp4"})


def test_cli_quantize_flag(capsys):
    from phi3_scratch.cli import main

    assert main(["generate", "What is RMSNorm?", "--chat", "--model", "tiny", "--quantize", "int8", "-n", "12"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("RMSNorm") and "loaded 1,049,728 parameters" in err
    assert main(["arch", "--model", "microsoft/Phi-3-mini-4k-instruct", "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert "Int8Linear(in_features=3072, out_features=9216, int8 per output channel)" in out
    assert "total                                3,821,079,552" in out and "weights: 3.922 GB" in out
