"""The CPU kernels (cpu_kernels.py, cpu_kernels.c): the same products as torch, and the fallback.

- fp32: linear_f32 equals F.linear to float rounding, for any shape (tails of rows and inputs).
- int8: linear_int8 is Q8_0's product: x rounded to int8 in blocks of 32, exactly as a torch
  reference rounds it, times the int8 weights and their scales.
- With AVX-512 VNNI, a prompt's int8 product is a GEMM: the same sums as one row at a time.
- Each branch of the C file (AVX-512 VNNI, AVX2, plain C loops) gives the same sums.
- Decoding through them keeps int8's argmax agreement with fp32 on the tiny model (98.2%).
- compile=True on the CPU runs them, and its tokens equal eager decoding's.
- Without a C compiler, everything falls back to torch's products, saying why.
"""

import ctypes
import subprocess

import pytest
import torch
import torch.nn.functional as F

import phi3_scratch as p3
from phi3_scratch import cpu_kernels
from phi3_scratch.quantize import Int8Linear

from .conftest import train_tiny

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"the CPU kernels are not available here: {cpu_kernels.why_not}")

# (rows of x, n outputs, k inputs): one row (decode), a short prompt, tails of 4 rows and 16/32 inputs,
# and prompts (with AVX-512 VNNI, the GEMM: tails of its 4-row tiles, 32-row panels and 4-input steps)
SHAPES = [(1, 8, 64), (1, 7, 33), (3, 13, 100), (16, 5, 64), (2, 1, 17), (1, 96, 3072), (4, 130, 1024),
          (40, 45, 100), (33, 33, 31), (35, 17, 65), (64, 96, 3072)]


def q8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Q8_0's product in float64: each block of 32 inputs of x rounded to int8 with its max |x| / 127."""
    k = x.shape[-1]
    blocks = F.pad(x, (0, -k % 32)).view(*x.shape[:-1], -1, 32)  # (..., k / 32, 32)
    s = blocks.abs().amax(-1, keepdim=True) / 127
    # x times 1 / s, in float32 as the kernel does it (x / s differs in the last bit now and then,
    # which moves a value next to a half across it); round half to even, as lrintf
    xq = torch.where(s > 0, torch.round(blocks * (1 / s)), 0.0)
    x_rounded = (xq * s).flatten(-2)[..., :k]
    return (x_rounded.double() @ q.double().T * scale.double()).float()


@pytest.mark.parametrize("m, n, k", SHAPES)
def test_linear_f32_equals_torch_linear(m, n, k):
    x, w = torch.randn(m, k), torch.randn(n, k)
    torch.testing.assert_close(cpu_kernels.linear_f32(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m, n, k", SHAPES)
def test_linear_int8_is_q8_0_of_x_times_the_int8_weights(m, n, k):
    x = torch.randn(m, k) * torch.linspace(0.01, 10, k)  # blocks of very different size
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) * 0.01
    expected = q8_reference(x, q, scale)
    got = cpu_kernels.linear_int8(x, q, scale)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    # and not the weight-only product: x itself was rounded (the difference is far above float rounding)
    weight_only = (x.double() @ q.double().T * scale.double()).float()
    assert (got - weight_only).abs().max() > 1e-4 * weight_only.abs().max()


def test_an_all_zero_block_of_x_gives_zero_not_nan():
    x = torch.zeros(1, 64)
    x[0, 40] = 3.0  # the first block is all zero: its scale is 0
    q = torch.ones(4, 64, dtype=torch.int8)
    assert cpu_kernels.linear_int8(x, q, torch.ones(4)).tolist() == [[3.0] * 4]


def build_branch(tmp_path, name: str, flags: list[str]) -> ctypes.CDLL:
    lib_path = tmp_path / f"{name}.so"
    command = ["cc", "-O2", *flags, "-shared", "-fPIC", str(cpu_kernels.SOURCE), "-o", str(lib_path), "-lm"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return ctypes.CDLL(str(lib_path))


def cpu_has(flag: str) -> bool:
    return flag in cpu_kernels.cpu_name().split()


@pytest.mark.parametrize("branch, flags, needs", [
    ("plain", [], None),  # x86-64's baseline has no AVX2: the #else branch
    ("avx2", ["-mavx2", "-mfma"], "avx2"),
])
def test_each_branch_of_the_c_file_gives_the_sums_of_the_native_one(tmp_path, branch, flags, needs):
    """The library in use is built for this CPU (-march=native: AVX-512 VNNI, AVX2 or plain);
    each other branch, built on its own, gives the same numbers, one row or a prompt's 40."""
    if needs and not cpu_has(needs):
        pytest.skip(f"this CPU has no {needs}: the {branch} branch cannot run here")
    lib = build_branch(tmp_path, branch, flags)
    assert lib.p3_int8_gemm() == 0  # the GEMM is AVX-512 VNNI's only
    for m in (3, 40):
        x, w = torch.randn(m, 100), torch.randn(13, 100)
        q, scale = torch.randint(-127, 128, (13, 100), dtype=torch.int8), torch.rand(13)
        y, y8 = torch.empty(m, 13), torch.empty(m, 13)
        args = [ctypes.c_int64(m), ctypes.c_int64(13), ctypes.c_int64(100)]
        lib.p3_linear_f32(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(w.data_ptr()),
                          ctypes.c_void_p(y.data_ptr()), *args)
        assert lib.p3_linear_int8(*(ctypes.c_void_p(t.data_ptr()) for t in (x, q, scale, y8)), *args) == 0
        if m <= cpu_kernels.MAX_ROWS:
            torch.testing.assert_close(y, cpu_kernels.linear_f32(x, w), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(y8, cpu_kernels.linear_int8(x, q, scale), rtol=1e-5, atol=1e-5)


def test_the_int8_gemm_gives_the_sums_of_one_row_at_a_time():
    """With AVX-512 VNNI, 8 rows of x or more go through the GEMM (w repacked in panels of 16
    rows, w + 128 as unsigned bytes, corrected): the numbers of the one-row dot products."""
    if not cpu_kernels.int8_gemm():
        pytest.skip("this CPU has no AVX-512 VNNI: prompts keep MKL's fp32 matmul")
    torch.manual_seed(0)
    for m, n, k in [(8, 32, 64), (37, 50, 203), (256, 64, 3072)]:
        x = torch.randn(m, k) * torch.linspace(0.01, 10, k)
        q, scale = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n)
        rows = torch.cat([cpu_kernels.linear_int8(x[i: i + 1], q, scale) for i in range(m)])
        # the same int32 sums of each block, added up in another order: float rounding apart
        assert (cpu_kernels.linear_int8(x, q, scale) - rows).abs().max() <= 1e-6 * rows.abs().max()


def test_fits_takes_a_few_contiguous_fp32_rows_on_the_cpu_and_nothing_else():
    w = torch.randn(8, 64)
    assert cpu_kernels.fits(torch.randn(1, 1, 64), w)
    assert cpu_kernels.fits(torch.randn(cpu_kernels.MAX_ROWS, 64), w)
    assert not cpu_kernels.fits(torch.randn(cpu_kernels.MAX_ROWS + 1, 64), w)  # a prefill: MKL's matmul
    q = torch.zeros(8, 64, dtype=torch.int8)  # int8 prompts: the GEMM, with AVX-512 VNNI
    assert cpu_kernels.fits(torch.randn(cpu_kernels.MAX_ROWS + 1, 64), q) == cpu_kernels.int8_gemm()
    assert not cpu_kernels.fits(torch.randn(1, 64).bfloat16(), w)
    assert not cpu_kernels.fits(torch.randn(64, 2).t(), w)  # not contiguous
    assert not cpu_kernels.fits(torch.randn(1, 32), w)  # the wrong width
    assert not cpu_kernels.fits(torch.randn(1, 64, requires_grad=True), w)  # a gradient is wanted
    with torch.no_grad():
        assert cpu_kernels.fits(torch.randn(1, 64, requires_grad=True), w)


@pytest.mark.parametrize("gemm", [True, False])
def test_int8_linear_runs_the_kernel_for_a_decode_step_and_for_a_prompt_where_it_is_faster(monkeypatch, gemm):
    """A prompt's product is the int8 GEMM with AVX-512 VNNI; without it (a CPU without VNNI, or
    made so here), the weight-only product on MKL's fp32 matmul (faster there than int8 pairs)."""
    if gemm and not cpu_kernels.int8_gemm():
        pytest.skip("this CPU has no AVX-512 VNNI: prompts keep MKL's fp32 matmul")
    monkeypatch.setattr(cpu_kernels, "_gemm", gemm)
    torch.manual_seed(0)
    layer = Int8Linear(64, 8)
    layer.set_weight(torch.randn(8, 64))
    q, scale = layer.weight, layer.scale
    one, many = torch.randn(1, 1, 64), torch.randn(40, 64)
    with torch.no_grad():
        assert torch.equal(layer(one), cpu_kernels.linear_int8(one, q, scale))
        if gemm:
            assert torch.equal(layer(many), cpu_kernels.linear_int8(many, q, scale))
        else:
            torch.testing.assert_close(layer(many), F.linear(many, q.float()) * scale)  # weight-only


@pytest.fixture(scope="module")
def corpus_ids():
    script = train_tiny()
    tok = p3.Tokenizer.from_pretrained("tiny")
    return torch.tensor([tok.encode(" ".join(script.read_corpus(script.CORPUS)[0][:40]))[:512]])


def test_decoding_through_the_int8_kernel_keeps_the_argmax_agreement(corpus_ids, report):
    """Teacher-forced one token at a time through the KV cache, as decoding runs: every product is
    then a one-row linear_int8. The bound is what the weight-only product measures (test_quantize)."""
    full = p3.Phi3ForCausalLM.from_pretrained("tiny")
    quantized = p3.Phi3ForCausalLM.from_pretrained("tiny", quantize="int8")
    calls = count_calls()
    with torch.inference_mode():
        expected = full(corpus_ids)
        cache = quantized.new_cache(1, max_len=corpus_ids.shape[1])
        got = torch.cat([quantized(corpus_ids[:, t: t + 1], cache) for t in range(corpus_ids.shape[1])], 1)
    layers = quantized.config.num_hidden_layers
    assert calls["int8"] == corpus_ids.shape[1] * (4 * layers + 1)  # every matrix, every position
    agree = (expected.argmax(-1) == got.argmax(-1)).float().mean().item()
    diff, scale = (expected - got).abs().max().item(), expected.abs().max().item()
    report(f"int8 through linear_int8 (Q8_0 activations), tiny model, {corpus_ids.shape[1]} positions "
           f"one at a time: argmax agreement {agree:.1%}, max |logit diff| {diff:.3f} "
           f"(max |logit| {scale:.1f})")
    assert agree >= 0.982 and diff <= 0.05 * scale


def count_calls() -> dict:
    """Counts of the kernels' C calls from here on (the ctypes library wrapped, for this test), and
    under "modes" how many torch function modes were active at each call."""
    calls = {"f32": 0, "int8": 0, "modes": []}
    lib = cpu_kernels._lib

    class Counting:
        def p3_linear_f32(self, *args):
            calls["f32"] += 1
            calls["modes"].append(torch._C._len_torch_function_stack())
            return lib.p3_linear_f32(*args)

        def p3_linear_int8(self, *args):
            calls["int8"] += 1
            calls["modes"].append(torch._C._len_torch_function_stack())
            return lib.p3_linear_int8(*args)

    cpu_kernels._lib = Counting()  # restore_library puts the real one back
    return calls


@pytest.fixture(autouse=True)
def restore_library():
    lib = cpu_kernels._lib
    yield
    cpu_kernels._lib = lib


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_compiled_decoding_on_the_cpu_runs_the_kernels_and_gives_eager_tokens(quantize):
    torch._dynamo.reset()
    model = p3.Phi3ForCausalLM.from_pretrained("tiny", quantize=quantize)
    prompt = torch.tensor([[1, 45, 496, 173, 170, 299]])
    eager = p3.generate(model, prompt, 12, eos_token_id=[])
    calls = count_calls()
    compiled = p3.generate(model, prompt, 12, eos_token_id=[], compile=True)
    steps = 11 * (4 * model.config.num_hidden_layers + 1)  # the decode steps' products
    assert calls["int8" if quantize else "f32"] >= steps
    assert compiled.tolist() == eager.tolist()
    # fast_linear is entered inside the compiled step (compiled.cpu_decode_step), not around it:
    # the steps' products run with no torch function mode, whose Python cost is ~10 us a product
    assert calls["modes"][-steps:] == [0] * steps


def test_without_a_c_compiler_every_product_is_torch_s_saying_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PHI3_SCRATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    assert not cpu_kernels.available()
    assert "no-such-compiler" in cpu_kernels.why_not
    assert not cpu_kernels.fits(torch.randn(1, 64), torch.randn(8, 64))
    with pytest.raises(p3.Phi3Error, match="CPU kernels are not available: could not run the C compiler"):
        cpu_kernels.linear_f32(torch.randn(1, 64), torch.randn(8, 64))
    model = p3.Phi3ForCausalLM.from_pretrained("tiny", quantize="int8")
    prompt = torch.tensor([[1, 45, 496]])
    assert p3.generate(model, prompt, 4, eos_token_id=[]).shape == (1, 7)  # torch's products


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("PHI3_SCRATCH_KERNELS", "0")
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    assert not cpu_kernels.available() and cpu_kernels.why_not == "PHI3_SCRATCH_KERNELS=0"
