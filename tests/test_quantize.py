"""Weight-only quantization (quantize.py): close to the full-precision model, saved and reloaded exactly.

The bounds: on the tiny model, teacher-forced over 512 tokens of its corpus, the int8 model's
argmax agrees with the float32 model's at >= 95% of positions and no logit moves by more than 5%
of the largest logit (measured: 98.2% and 0.40 of 25.7 weight-only; 98.4% and 0.72 on a CPU with
AVX-512 VNNI, whose int8 GEMM rounds x to Q8_0's blocks too); int4's (groups of 128) at >= 75% and
25% (measured: 81.6% and 4.87). A 1M-parameter model trained to peaked logits is harsh on 4 bits:
these bounds catch a broken packing or scale (a few percent agreement), not a good int4.
"""

import pytest
import torch

import phi3_scratch as p3
from phi3_scratch import cpu_kernels
from phi3_scratch.quantize import (GROUP, LINEAR, Int4Linear, Int8Linear, quantize_int4, quantize_int8,
                                   quantize_model)

from .conftest import train_tiny


@pytest.fixture(scope="module")
def corpus_ids():
    script = train_tiny()
    tok = p3.Tokenizer.from_pretrained("tiny")
    return torch.tensor([tok.encode(" ".join(script.read_corpus(script.CORPUS)[0][:40]))[:512]])


def test_quantize_int8_is_symmetric_per_output_channel():
    torch.manual_seed(0)
    # rows of very different size
    w = torch.randn(6, 10) * torch.tensor([0.01, 0.1, 1, 10, 100, 0.0])[:, None]
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (6,)
    assert q.abs().max() <= 127 and (q.abs().amax(1)[:5] == 127).all()  # each row's largest weight -> +-127
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-12).all()  # rounding error
    assert (q[5] == 0).all()  # an all-zero row stays zero


def test_quantize_int4_packs_two_numbers_a_byte_in_groups_of_128():
    torch.manual_seed(0)
    w = torch.randn(3, 2 * GROUP) * torch.tensor([0.01, 1.0, 100.0])[:, None]
    w[2, GROUP:] = 5.0  # a constant group
    packed, scale, offset = quantize_int4(w)
    assert (packed.dtype == torch.uint8 and packed.shape == (3, GROUP)
            and scale.shape == offset.shape == (3, 2))
    groups = w.view(3, 2, GROUP)
    # byte j: j, 64 + j
    n = torch.cat([packed.view(3, 2, GROUP // 2) & 15, packed.view(3, 2, GROUP // 2) >> 4], -1)
    # min -> 0, max -> 15
    assert n.min() == 0 and n.max() == 15 and (n.view(3, 2, GROUP)[:, 0].amax(-1) == 15).all()
    torch.testing.assert_close(offset, groups.amin(-1))
    rebuilt = n.float() * scale[..., None] + offset[..., None]  # (3, 2, 128)
    assert ((rebuilt - groups).abs() <= scale[..., None] / 2 + 1e-6).all()  # rounding error
    assert (rebuilt[2, 1] == 5.0).all()  # a constant group comes back exactly


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_multiplies_by_the_rebuilt_weights(dtype):
    """Int4Linear(x) is x @ w^T for w = n * scale + offset, rebuilt from the packed bytes by hand;
    also for an all-zero row and a group of negative weights only."""
    torch.manual_seed(0)
    w = torch.randn(5, 2 * GROUP)
    w[3] = 0.0
    w[4, :GROUP] = -w[4, :GROUP].abs() - 1
    layer = Int4Linear(2 * GROUP, 5, dtype=dtype)
    layer.set_weight(w.to(dtype))
    packed = layer.weight.view(5, 2, GROUP // 2).long()
    n = torch.cat([packed % 16, packed // 16], -1).double()  # (5, 2, 128): inputs 0..63, then 64..127
    rebuilt = (n * layer.scale.double()[..., None] + layer.offset.double()[..., None]).view(5, 2 * GROUP)
    assert (rebuilt[3] == 0).all() and (rebuilt[4, :GROUP] < 0).all()
    assert ((rebuilt - w.to(dtype).double()).abs().view(5, 2, GROUP)
            <= layer.scale.double()[..., None] / 2 * 1.001).all()
    for shape in [(1, 1, 2 * GROUP), (3, 2 * GROUP), (2, 4, 2 * GROUP)]:
        x = torch.randn(shape).to(dtype)
        expected = x.double() @ rebuilt.T
        # bf16: its rounding
        tolerance = 1e-4 if dtype == torch.float32 else 0.01 * expected.abs().max().item()
        assert (layer(x).double() - expected).abs().max() <= tolerance


@pytest.mark.parametrize("method, linear, agree_at_least, diff_at_most", [
    ("int8", Int8Linear, 0.95, 0.05), ("int4", Int4Linear, 0.75, 0.25)])
def test_quantized_logits_stay_close_to_full_precision(corpus_ids, report, method, linear, agree_at_least,
                                                       diff_at_most):
    full = p3.Phi3ForCausalLM.from_pretrained("tiny")
    quantized = p3.Phi3ForCausalLM.from_pretrained("tiny", quantize=method)
    assert (isinstance(quantized.model.layers[0].mlp.down_proj, linear)
            and isinstance(quantized.lm_head, linear))
    assert quantized.model.embed_tokens.weight.dtype == torch.float32  # the embedding stays
    with torch.no_grad():
        a, b = full(corpus_ids), quantized(corpus_ids)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    diff, scale = (a - b).abs().max().item(), a.abs().max().item()
    report(f"{method} tiny model, {corpus_ids.shape[1]} teacher-forced positions: argmax agreement "
           f"{agree:.1%}, max |logit diff| {diff:.3f} (max |logit| {scale:.1f})")
    assert agree >= agree_at_least and diff <= diff_at_most * scale


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantizing_while_loading_equals_quantizing_after(corpus_ids, method):
    from safetensors import safe_open

    calls = []
    loaded = p3.Phi3ForCausalLM.from_pretrained("tiny", quantize=method,
                                                progress=lambda *done: calls.append(done))
    with safe_open(p3.loading.TINY / "model.safetensors", framework="pt") as f:
        in_file = len(list(f.keys()))
    assert calls[-1] == (in_file, in_file)  # the progress counts the file's tensors, not the quantized ones
    after = quantize_model(p3.Phi3ForCausalLM.from_pretrained("tiny"), method)
    with torch.no_grad():
        assert torch.equal(loaded(corpus_ids), after(corpus_ids))


@pytest.mark.parametrize("method, weight_dtype, size_at_most", [("int8", torch.int8, 0.4),
                                                                ("int4", torch.uint8, 0.26)])
def test_a_saved_quantized_checkpoint_reloads_to_the_same_logits(tmp_path, corpus_ids, method, weight_dtype,
                                                                 size_at_most):
    quantized = p3.Phi3ForCausalLM.from_pretrained("tiny", quantize=method)
    quantized.save_pretrained(tmp_path)
    again = p3.Phi3ForCausalLM.from_pretrained(tmp_path)  # config.json says how: no argument needed
    assert again.config.quantization == method and again.lm_head.weight.dtype == weight_dtype
    with torch.no_grad():
        assert torch.equal(again(corpus_ids), quantized(corpus_ids))
    full_size = (p3.loading.TINY / "model.safetensors").stat().st_size
    # fp32 -> int8 + scales: 0.35 of the file; int4 + scales and offsets: 0.25 (the fp32 embedding stays)
    assert (tmp_path / "model.safetensors").stat().st_size < size_at_most * full_size
    assert p3.generate(again, corpus_ids[:, :8], 12, eos_token_id=[]).tolist() == \
        p3.generate(quantized, corpus_ids[:, :8], 12, eos_token_id=[]).tolist()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_compiled_one_row_product_equals_the_eager_one(method):
    """Compiled, a quantized linear writes a one-row product as multiply-and-sum (one reduction
    reading the packed weights); eagerly, as a matmul on the converted matrix. Both give the same
    numbers, to float rounding. On the CPU, int8's one-row product is the CPU kernel's, compiled or
    not (test_cpu_kernels.py)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    n_in = 2 * GROUP
    layer = quantized_layer(method, torch.randn(40, n_in))
    compiled = torch.compile(layer, fullgraph=True)
    # one row (the reduction), several (the matmul)
    for shape in [(1, 1, n_in), (1, n_in), (3, n_in), (2, 5, n_in)]:
        x = torch.randn(shape)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-4)
    graphs = []  # the traced graphs, by a backend that records them and runs them as they are

    def record(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes})
        return gm.forward

    torch._dynamo.reset()
    traced = torch.compile(layer, backend=record, fullgraph=True)
    traced(torch.randn(1, 1, n_in)), traced(torch.randn(3, n_in))
    one_row, rows = (" ".join(g) for g in graphs)
    if method == "int8" and cpu_kernels.available():
        assert "phi3_scratch.linear_int8" in one_row and "phi3_scratch.linear_int8" in rows
    else:
        assert "sum" in one_row and "linear" not in one_row and "linear" in rows
    torch._dynamo.reset()


def quantized_layer(method: str, w: torch.Tensor):
    layer = LINEAR[method](w.shape[1], w.shape[0])
    layer.set_weight(w)
    return layer


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_compiled_quantized_decoding_gives_the_eager_tokens(corpus_ids, method):
    torch._dynamo.reset()
    quantized = p3.Phi3ForCausalLM.from_pretrained("tiny", quantize=method)
    eager = p3.generate(quantized, corpus_ids[:, :6], 10, eos_token_id=[])
    assert torch.equal(p3.generate(quantized, corpus_ids[:, :6], 10, eos_token_id=[], compile=True), eager)
    torch._dynamo.reset()


def test_quantize_errors(tmp_path, checkpoints):
    with pytest.raises(p3.Phi3Error, match=r"quantize must be None or one of \['int8', 'int4'\], got 'fp4'"):
        p3.Phi3ForCausalLM.from_pretrained("tiny", quantize="fp4")
    config = p3.Phi3ForCausalLM.from_pretrained("tiny").config.to_dict()
    with pytest.raises(p3.Phi3Error, match="quantization must be null or 'int8' or 'int4', got 'fp4'"):
        p3.Phi3Config.from_dict({**config, "quantization": "fp4"})
    int8 = p3.Phi3ForCausalLM.from_pretrained("tiny", quantize="int8")
    with pytest.raises(p3.Phi3Error, match="the model is quantized as int8; it cannot be quantized as int4"):
        quantize_model(int8, "int4")
    int8.save_pretrained(tmp_path / "int8")
    with pytest.raises(p3.Phi3Error,
                       match="the checkpoint is quantized as int8; it cannot be loaded as int4"):
        p3.Phi3ForCausalLM.from_pretrained(tmp_path / "int8", quantize="int4")
    # an int8 checkpoint with one matrix stored as uint8
    from safetensors.torch import load_file, save_file

    file = tmp_path / "int8" / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.1.mlp.down_proj.weight"] = (
        tensors["model.layers.1.mlp.down_proj.weight"].view(torch.uint8))
    save_file(tensors, file)
    with pytest.raises(p3.Phi3Error,
                       match=r"tensor 'model.layers.1.mlp.down_proj.weight' has dtype torch.uint8, "
                             r"but config.json \(quantization: int8\) implies torch.int8"):
        p3.Phi3ForCausalLM.from_pretrained(tmp_path / "int8")
    # a checkpoint whose config.json says int4 but which holds int8 weights
    (tmp_path / "int8" / "config.json").write_text(
        (tmp_path / "int8" / "config.json").read_text().replace('"int8"', '"int4"'))
    with pytest.raises(p3.Phi3Error,
                       match=r"int8/model.safetensors: tensor 'lm_head.scale' has shape \(1024,\), "
                             r"but config.json implies \(1024, 1\)"):
        p3.Phi3ForCausalLM.from_pretrained(tmp_path / "int8")
    # int4's groups of 128 inputs: a matrix of another width is refused, by name
    folder, _ = checkpoints("Phi-3-mini-4k-instruct")  # hidden_size 64
    with pytest.raises(p3.Phi3Error,
                       match="model.layers.0.self_attn.qkv_proj: int4 quantizes groups of 128 inputs; "
                             "in_features 64 is not a multiple of 128"):
        p3.Phi3ForCausalLM.from_pretrained(folder, quantize="int4")
    # a full-precision checkpoint with one matrix stored as integers: refused, not quantized as numbers
    folder = tmp_path / "full"
    p3.Phi3ForCausalLM.from_pretrained("tiny").save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = (
        tensors["model.layers.0.mlp.down_proj.weight"].to(torch.int8))
    save_file(tensors, folder / "model.safetensors")
    for quantize in (None, "int8", "int4"):
        with pytest.raises(p3.Phi3Error,
                           match=r"tensor 'model.layers.0.mlp.down_proj.weight' has dtype torch.int8, "
                                 r"but config.json implies torch.float32"):
            p3.Phi3ForCausalLM.from_pretrained(folder, quantize=quantize)


@pytest.mark.parametrize("method, line, size", [
    ("int8", "Int8Linear(in_features=3072, out_features=9216, int8 per output channel)", "weights: 3.922 GB"),
    ("int4", "Int4Linear(in_features=3072, out_features=9216, int4 in groups of 128)", "weights: 2.175 GB")])
def test_cli_quantize_flag(capsys, method, line, size):
    from phi3_scratch.cli import main

    assert main(["generate", "What is RMSNorm?", "--chat", "--model", "tiny", "--quantize", method,
                 "-n", "12"]) == 0
    out, err = capsys.readouterr()
    assert "loaded 1,049,728 parameters" in err and f"{method} matrices" in err
    assert out.startswith("RMSNorm")  # the corpus answer begins as it does in float32
    assert main(["arch", "--model", "microsoft/Phi-3-mini-4k-instruct", "--quantize", method]) == 0
    out = capsys.readouterr().out
    assert line in out and "total                                3,821,079,552" in out and size in out
