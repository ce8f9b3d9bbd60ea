"""The `phi3-scratch` commands, run against the built-in tiny checkpoint (`--model tiny`)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import phi3_scratch as p3
import phi3_scratch.cli as cli
from phi3_scratch.cli import anatomy, common, inside, text, timing
from phi3_scratch.cli import main
from phi3_scratch.loading import TINY
from phi3_scratch.tokenizer import Tokenizer

OFFLINE = {"HF_HUB_OFFLINE": "1"}  # with an empty Hugging Face cache (HF_HOME), nothing can be fetched


@pytest.fixture(scope="session")
def tiny():
    """The built-in tiny checkpoint's folder (phi3_scratch/data/tiny), as a path like any other."""
    return TINY


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def patch_cli(monkeypatch, name: str, value) -> None:
    """Set `name` to `value` in every module of phi3_scratch.cli that has it: each imports what it uses."""
    for module in (cli, anatomy, common, inside, text, timing):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, value)


def recording(monkeypatch):
    """Wrap the CLI's stream_tokens so a test sees the ids it produced."""
    seen, real = [], common.stream_tokens

    def wrapped(*args, **kwargs):
        for token in real(*args, **kwargs):
            seen.append(int(token[0]))
            yield token

    monkeypatch.setattr(common, "stream_tokens", wrapped)
    return seen


def test_generate_prints_only_the_new_text_of_p3_generate(tiny, capsys, monkeypatch):
    seen = recording(monkeypatch)
    code, out, err = run(capsys, "generate", "The KV cache", "--model", tiny, "--max-new-tokens", 30)
    assert code == 0 and "loaded" in err and "parameters" in err
    model, tok = p3.Phi3ForCausalLM.from_pretrained(tiny), Tokenizer.from_pretrained(tiny)
    ids = torch.tensor([tok.encode("The KV cache")])
    stops = sorted(set(model.config.stop_token_ids) | set(tok.stop_ids))
    new = p3.generate(model, ids, 30, eos_token_id=stops)[0, ids.shape[1]:].tolist()
    assert seen == new  # the same ids as the API
    new = new[:-1] if new and new[-1] in stops else new
    assert out == tok.decode(new, skip_special_tokens=True) + "\n"  # and only their text


def test_generate_with_chat_template_and_no_cache_agree(tiny, capsys):
    _, cached, _ = run(capsys, "generate", "What does generate do?", "--chat", "--model", tiny,
                       "--max-new-tokens", 20)
    _, uncached, _ = run(capsys, "generate", "What does generate do?", "--chat", "--no-cache", "--model",
                         tiny, "--max-new-tokens", 20)
    assert cached == uncached and len(cached) > 1


def test_sampling_is_reproducible_for_a_seed(tiny, capsys):
    args = ["generate", "The", "--model", tiny, "--max-new-tokens", 25, "--temperature", 1.5, "--top-p", 0.95]
    first = run(capsys, *args, "--seed", 3)[1]
    assert run(capsys, *args, "--seed", 3)[1] == first
    assert run(capsys, *args, "--seed", 4)[1] != first


def test_next_token_table_puts_the_argmax_first(tiny, capsys):
    code, out, _ = run(capsys, "next-token", "The model", "--model", tiny, "--top-k", 5)
    assert code == 0
    model, tok = p3.Phi3ForCausalLM.from_pretrained(tiny), Tokenizer.from_pretrained(tiny)
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("The model")]))[0, -1]
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)]
    assert len(rows) == 5
    assert int(rows[0][1]) == int(logits.argmax())
    assert [int(r[1]) for r in rows] == logits.topk(5).indices.tolist()
    assert float(rows[0][-2]) == pytest.approx(logits.max().item(), abs=1e-3)


def test_bench_reports_both_runs(tiny, capsys):
    code, out, _ = run(capsys, "bench", "The", "--model", tiny, "--max-new-tokens", 10, "--runs", 2)
    assert code == 0
    assert re.search(r"with KV cache\s+median\s+[\d.]+ s\s+[\d.]+ tokens/s", out)
    assert re.search(r"without cache\s+median\s+[\d.]+ s\s+[\d.]+ tokens/s", out)
    assert re.search(r"the cache is [\d.]+x faster", out)


def test_bench_with_compile_adds_the_compiled_row(tiny, capsys):
    torch._dynamo.reset()
    code, out, _ = run(capsys, "bench", "The", "--model", tiny, "--max-new-tokens", 8, "--runs", 1,
                       "--compile")
    assert code == 0
    assert re.search(r"cache, compiled\s+median\s+[\d.]+ s\s+[\d.]+ tokens/s", out)


def test_bench_vs_transformers_prints_json_for_both(tiny, capsys):
    code, out, _ = run(capsys, "bench", "The KV cache", "--model", tiny, "--vs-transformers",
                       "--max-new-tokens", 3, "--runs", 1, "--prefill", 8)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    impls = {r["impl"] for r in rows if r["measure"] == "decode_cached"}
    assert {"phi3_scratch", "phi3_scratch-compiled", "transformers-eager", "transformers-sdpa"} <= impls
    prompt = len(Tokenizer.from_pretrained(tiny).encode("The KV cache"))
    assert f"a random prompt of {prompt} tokens" in out and all(r["config"] == str(tiny) for r in rows)


def test_bench_vs_transformers_takes_the_tokenizer_flag(tiny, capsys, tmp_path):
    """A checkpoint saved without its tokenizer, as every command does, takes --tokenizer."""
    p3.Phi3ForCausalLM.from_pretrained(tiny).save_pretrained(tmp_path)
    code, out, err = run(capsys, "bench", "The KV cache", "--model", tmp_path, "--tokenizer", "tiny",
                         "--vs-transformers", "--max-new-tokens", 2, "--runs", 1, "--prefill")
    assert code == 0, err
    prompt = len(Tokenizer.from_pretrained(tiny).encode("The KV cache"))
    assert f"a random prompt of {prompt} tokens" in out


def test_generate_with_compile_or_sdpa_prints_the_eager_text(tiny, capsys):
    args = ["generate", "What does generate do?", "--model", tiny, "--max-new-tokens", 20]
    eager = run(capsys, *args)[1]
    assert run(capsys, *args, "--attention", "sdpa")[1] == eager
    torch._dynamo.reset()
    assert run(capsys, *args, "--compile")[1] == eager


def test_arch_counts_every_parameter(tiny, capsys):
    code, out, _ = run(capsys, "arch", "--model", tiny)
    model = p3.Phi3ForCausalLM.from_pretrained(tiny)
    assert code == 0 and "(qkv_proj): Linear" in out and "(gate_up_proj): Linear" in out
    assert re.search(rf"total\s+{sum(p.numel() for p in model.parameters()):,}", out)
    c = model.config
    assert (f"{2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4 / 1024:.1f}"
            " KiB per token") in out


def test_arch_of_a_quantized_checkpoint_refuses_another_method(tiny, capsys, tmp_path):
    p3.Phi3ForCausalLM.from_pretrained(tiny, quantize="int4").save_pretrained(tmp_path)
    code, out, _ = run(capsys, "arch", "--model", tmp_path)
    assert code == 0 and "Int4Linear" in out
    code, _, err = run(capsys, "arch", "--model", tmp_path, "--quantize", "int8")  # as generate refuses it
    assert code == 2 and err == (f"error: {tmp_path}: the checkpoint is quantized as int4; "
                                 "it cannot be loaded as int8\n")


def test_chat_keeps_history_and_resets(tiny, capsys, monkeypatch):
    lines = iter(["What does generate do?", "And sample?", "/reset", "What does generate do?", "/exit"])
    prompts = []
    monkeypatch.setattr("builtins.input", lambda prompt="": prompts.append(prompt) or next(lines))
    seen = []
    real_encode = Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode",
                        lambda self, text, **kw: seen.append(text) or real_encode(self, text, **kw))
    code, out, err = run(capsys, "chat", "--model", tiny, "--max-new-tokens", 15)
    assert code == 0 and out.count("assistant> ") == 3 and "forgotten" in err
    chats = [t for t in seen if "<|user|>" in t]
    # the first reply + the new prompt
    assert chats[1].count("<|user|>") == 2 and chats[1].count("<|assistant|>") == 2
    assert chats[2] == chats[0]  # after /reset the conversation starts over


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "", "--model", "{tiny}"], "error: PROMPT is empty"),
        (["generate", "hi", "--model", "{tiny}", "--max-new-tokens", "0"],
         "error: argument -n/--max-new-tokens/--max-tokens: expected a positive integer, got '0'"),
        (["generate", "hi", "--model", "no-such-model"], "error: checkpoint folder no-such-model not found"),
        (["generate", "hi", "--model", "{no_tokenizer}"], "tokenizer.model"),
        (["generate", "hi", "--model", "{tiny}", "--temperature", "-1"],
         "error: --temperature must be a finite number >= 0"),
        (["generate", "hi", "--model", "{tiny}", "--compile", "--no-cache"],
         "error: --compile compiles the cached decode step; it cannot be combined with --no-cache"),
        (["generate", "hi", "--model", "{tiny}", "--attention", "flash"],
         "argument --attention: invalid choice"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(tiny, tmp_path, capsys, argv, message):
    import shutil

    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny / f, no_tokenizer)
    argv = [a.format(tiny=tiny, no_tokenizer=no_tokenizer) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    _, err = capsys.readouterr()
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and message in err


def run_module(*argv, env=None, pythonpath=None, cwd=None) -> subprocess.CompletedProcess:
    """`python -m phi3_scratch ARGV` in a fresh process, offline, with an empty Hugging Face cache."""
    env = {**os.environ, **OFFLINE, **(env or {})}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-m", "phi3_scratch", *map(str, argv)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_tour_on_the_built_in_tiny_model_trains_nothing(tmp_path):
    """The README's main command, as a user runs it: offline, from an empty cache, nothing to train."""
    done = run_module("tour", "--model", "tiny", env={"HF_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    for heading in ("1. Load", "2. Generate", "3. Architecture", "4. Next token", "5. KV cache"):
        assert f"== {heading}" in done.stdout
    assert "train" not in done.stderr and not any(tmp_path.iterdir())  # nothing trained, nothing downloaded
    model, tok = p3.Phi3ForCausalLM.from_pretrained("tiny"), Tokenizer.from_pretrained("tiny")
    ids = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user",
                                                             "content": timing.TOUR_PROMPT}]))])
    new = p3.generate(model, ids, 200,
                      eos_token_id=sorted(set(model.config.stop_token_ids) | set(tok.stop_ids)))
    answer = tok.decode(new[0, ids.shape[1]:], skip_special_tokens=True)
    assert f"only the new text ==\n{answer}\n" in done.stdout


def test_a_comment_in_the_model_changes_nothing_the_tiny_model_prints(tmp_path):
    """The tiny model ships as weights: editing the package's source does not retrain or change it."""
    import shutil

    package = Path(p3.__file__).parent
    copy = tmp_path / "copy"
    shutil.copytree(package, copy / "phi3_scratch", ignore=shutil.ignore_patterns("__pycache__"))
    model_py = copy / "phi3_scratch" / "model.py"
    source = model_py.read_text()
    edited = source.replace('"""y = weight', '"""(A learner\'s note.) y = weight').replace(
        "class Phi3MLP(", "# A learner's comment.\nclass Phi3MLP(")
    assert edited != source
    model_py.write_text(edited)
    args = ("generate", "What does the KV cache do?", "--chat", "--model", "tiny", "--max-new-tokens", 60)
    original, edited = run_module(*args, cwd=tmp_path), run_module(*args, pythonpath=copy, cwd=tmp_path)
    assert original.returncode == edited.returncode == 0, edited.stderr
    assert str(copy) in edited.stderr  # the edited copy really ran
    assert edited.stdout == original.stdout and len(original.stdout) > 20


def test_arch_of_a_family_model_needs_no_download(tmp_path):
    """`arch` builds the model on the meta device from the family data: offline, no weights, no files."""
    done = run_module("arch", "--model", "microsoft/Phi-3-mini-4k-instruct", env={"HF_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert re.search(r"^total\s+3,821,079,552$", done.stdout, re.M)  # PHI3_REFERENCE: Phi-3-mini's count
    assert "(qkv_proj): Linear(in_features=3072, out_features=9216, bias=False)" in done.stdout
    assert "(0-31): 32 x Phi3DecoderLayer" in done.stdout
    assert "KV cache: 384.0 KiB per token (2 x 32 layers x 32 kv heads x 96 x 2 B)" in done.stdout  # bf16
    assert "weights: 7.642 GB" in done.stdout and not any(tmp_path.iterdir())
    done = run_module("arch", "--model", "phi-4", "--dtype", "fp32", env={"HF_HOME": str(tmp_path)})
    assert re.search(r"^total\s+14,659,507,200$", done.stdout, re.M) and "in torch.float32" in done.stdout


def test_chat_survives_a_too_long_message_and_ctrl_c(tiny, capsys, monkeypatch):
    lines = iter(["word " * 300, "What does generate do?", "What does sample do?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    real, calls = common.stream_tokens, []

    def interrupt_first_reply(*args, **kwargs):
        calls.append(1)
        for n, token in enumerate(real(*args, **kwargs)):
            if len(calls) == 1 and n == 3:
                raise KeyboardInterrupt
            yield token

    monkeypatch.setattr(common, "stream_tokens", interrupt_first_reply)
    code, out, err = run(capsys, "chat", "--model", tiny, "--max-new-tokens", 15)
    assert code == 0
    assert "error: that message is" in err and "Try a shorter one" in err
    assert "[reply stopped]" in err and out.count("assistant> ") == 2


def test_ctrl_c_stops_cleanly_and_keeps_the_text(tiny, capsys, monkeypatch):
    real = common.stream_tokens

    def interrupted(*args, **kwargs):
        for n, token in enumerate(real(*args, **kwargs)):
            if n == 5:
                raise KeyboardInterrupt
            yield token

    monkeypatch.setattr(common, "stream_tokens", interrupted)
    code, out, err = run(capsys, "generate", "The KV cache", "--model", tiny, "--max-new-tokens", 30)
    model, tok = p3.Phi3ForCausalLM.from_pretrained(tiny), Tokenizer.from_pretrained(tiny)
    ids = torch.tensor([tok.encode("The KV cache")])
    first5 = p3.generate(model, ids, 5, eos_token_id=[])[0, ids.shape[1]:].tolist()
    assert code == 130 and err.rstrip().endswith("[stopped]")
    assert out.startswith(tok.decode(first5, skip_special_tokens=True))


def test_repo_id_that_is_neither_local_nor_reachable(capsys, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    code, out, err = run(capsys, "arch", "--model", "someone/no-such-model")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "there is no local folder 'someone/no-such-model', and it could not be downloaded" in err


def test_step_walks_with_enter_numbers_and_q(tiny, capsys, monkeypatch):
    answers = iter(["", "2", "x", "", "q"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    code, out, err = run(capsys, "step", "The model", "--model", tiny, "--top-k", 4)
    assert code == 0 and "expected Enter, q or a number 0..3, got 'x'" in err
    tables = [[int(line.split()[1]) for line in block.splitlines()[1:] if line.strip().startswith("[")]
              for block in out.split("position ")[1:]]
    chosen = [tables[0][0], tables[1][2], tables[2][0]]  # Enter, "2", ("x" asks again), Enter
    assert out.strip().endswith(f"3 tokens chosen: {chosen}")
    model, tok = p3.Phi3ForCausalLM.from_pretrained(tiny), Tokenizer.from_pretrained(tiny)
    stepper = p3.Stepper(model, tok.encode("The model"), top_k=4)
    assert [c.token_id for c in stepper.record().candidates] == tables[0]


def test_lens_shows_every_layer_and_ends_at_the_prediction(tiny, capsys):
    code, out, _ = run(capsys, "lens", "The model", "--model", tiny)
    model, tok = p3.Phi3ForCausalLM.from_pretrained(tiny), Tokenizer.from_pretrained(tiny)
    with torch.no_grad():
        final = int(model(torch.tensor([tok.encode("The model")]))[0, -1].argmax())
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+ ", line)]
    assert code == 0 and len(rows) == model.config.num_hidden_layers
    assert int(rows[-1][1]) == final and f"prediction is {final}" in out
    code, out, _ = run(capsys, "lens", "The model", "--model", tiny, "--all-positions")
    assert code == 0 and len(out.strip().splitlines()) == 2 + model.config.num_hidden_layers


def test_attention_writes_the_picture(tiny, capsys, tmp_path):
    out_file = tmp_path / "att.png"
    code, out, _ = run(capsys, "attention", "The model", "--model", tiny, "--layer", "all", "--out", out_file)
    assert code == 0 and out_file.stat().st_size > 0
    assert re.search(r"\(\d+x\d+ pixels\): layer 0, mean of 4 heads, .*layer 3, mean of 4 heads", out)
    code, _, err = run(capsys, "attention", "The model", "--model", tiny, "--layer", "first", "--out",
                       out_file)
    assert code == 2 and "--layer must be a layer number or 'all', got 'first'" in err


def test_compare_command_prints_the_table(tiny, capsys):
    code, out, _ = run(capsys, "compare", "--model", tiny, "--prompt", "The model")
    assert code == 0
    assert re.search(r"^embed\s", out, re.M) and re.search(r"^layers\.3\.residual\s", out, re.M)
    assert "all within" in out
    # int8 against transformers' fp32: tensors above the tolerance,
    # and the exit status says so, as diff's does
    code, out, err = run(capsys, "compare", "--model", tiny, "--prompt", "The model", "--quantize", "int8")
    assert code == 1 and "<-- first above" in out and "this model's matrices are int8" in err


def test_compare_refuses_a_checkpoint_saved_quantized(tiny, capsys, tmp_path):
    """transformers would read its integers as weights and drop the scales: a table of garbage."""
    p3.Phi3ForCausalLM.from_pretrained(tiny, quantize="int8").save_pretrained(tmp_path)
    code, out, err = run(capsys, "compare", "--model", tmp_path, "--tokenizer", "tiny")
    assert code == 2 and out == ""
    assert err.startswith(f"error: compare: {tmp_path} is a checkpoint saved int8, which transformers cannot "
                          "read")


def test_step_stops_when_there_is_no_room_left(tiny, capsys, monkeypatch):
    monkeypatch.setattr("builtins.input", lambda prompt="": "")  # always Enter
    code, out, _ = run(capsys, "step", "The model", "--model", tiny, "--max-new-tokens", 2)
    assert code == 0 and "(no room left" in out and "2 tokens chosen" in out


# ------------------------------------------------------------------ the habits of other CLIs


def test_prompt_as_argument_option_or_stdin(tiny, capsys, monkeypatch):
    import io

    base = ["generate", "--model", tiny, "-n", 12]
    positional = run(capsys, base[0], "Each decoder layer", *base[1:])[1]
    assert run(capsys, *base, "-p", "Each decoder layer")[1] == positional
    # as `echo ... |` sends it: the newline goes
    monkeypatch.setattr("sys.stdin", io.StringIO("Each decoder layer\n"))
    assert run(capsys, base[0], "-", *base[1:])[1] == positional
    monkeypatch.setattr("sys.stdin", io.StringIO("1\n"))
    code, _, err = run(capsys, "step", "-", "--model", tiny)  # its choices come from standard input
    assert code == 2 and "step reads its choices from standard input" in err
    code, _, err = run(capsys, base[0], "x", *base[1:], "-p", "y")
    assert code == 2 and "the prompt was given twice" in err
    code, _, err = run(capsys, "next-token", "--model", tiny)
    assert code == 2 and "next-token needs a PROMPT: as an argument, with -p, or '-'" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("The model"))  # compare's --prompt reads '-' too
    assert run(capsys, "compare", "--model", tiny, "--prompt", "-")[1] == \
        run(capsys, "compare", "--model", tiny, "--prompt", "The model")[1]
    code, _, err = run(capsys, "generate", "hi", "--model", "")
    assert code == 2 and err == ("error: --model is empty: give a checkpoint folder, "
                                 "a Hugging Face repo id or 'tiny'\n")


@pytest.mark.parametrize("flag", ["-n", "--max-tokens", "--max-new-tokens"])
def test_max_tokens_aliases(tiny, capsys, monkeypatch, flag):
    asked = []
    real = common.stream_tokens
    monkeypatch.setattr(common, "stream_tokens",
                        lambda model, ids, n, *a, **k: asked.append(n) or real(model, ids, n, *a, **k))
    assert run(capsys, "generate", "The", "--model", tiny, flag, 7)[0] == 0
    assert asked == [7]  # the decode loop was asked for 7 new tokens (it may stop sooner)


def test_sampling_flags_without_temperature_sample_at_1(tiny, capsys):
    code, implied, err = run(capsys, "generate", "The", "--model", tiny, "-n", 25, "--top-p", 0.95, "--seed",
                             3)
    assert code == 0 and "--top-p, --seed only matter when sampling" in err and "--temperature 1.0" in err
    explicit = run(capsys, "generate", "The", "--model", tiny, "-n", 25, "--top-p", 0.95, "--seed", 3,
                   "--temperature", 1.0)[1]
    assert implied == explicit


def test_explicit_temperature_0_is_greedy_and_says_it_ignores_the_sampling_flags(tiny, capsys):
    code, out, err = run(capsys, "generate", "The", "--model", tiny, "-n", 25, "--seed", 3, "--temperature",
                         0)
    assert code == 0 and "--temperature 0 is greedy, which ignores --seed" in err
    assert out == run(capsys, "generate", "The", "--model", tiny, "-n", 25)[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and re.fullmatch(r"phi3-scratch \S+.*\n", capsys.readouterr().out)


def test_chat_commands_history_and_ctrl_c_at_the_prompt(tiny, capsys, monkeypatch):
    readline = pytest.importorskip("readline")
    typed = iter(["/help", "/x", KeyboardInterrupt, "What is RMSNorm?", "/clear", "/bye", "never read"])

    def fake_input(prompt=""):
        line = next(typed)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt  # Ctrl-C while typing: the line is dropped, the chat goes on
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    before = readline.get_current_history_length()
    code, out, err = run(capsys, "chat", "--model", tiny, "-n", 10)
    assert code == 0 and out.count("assistant> ") == 1
    assert err.count("/help this list") >= 3  # at the start, for /help, and for the unknown /x
    assert "unknown command /x" in err and "(conversation forgotten)" in err
    added = [readline.get_history_item(i) for i in range(before + 1,
                                                         readline.get_current_history_length() + 1)]
    assert "What is RMSNorm?" in added  # the Up arrow brings it back


def test_tokenizer_flag_for_a_checkpoint_without_tokenizer_files(tiny, tmp_path, capsys):
    import shutil

    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny / name, tmp_path / name)
    code, _, err = run(capsys, "generate", "hi", "--model", tmp_path, "-n", 3)
    assert code == 2 and "tokenizer.model not found" in err
    code, out, _ = run(capsys, "generate", "Each decoder layer", "--model", tmp_path, "--tokenizer", tiny,
                       "-n", 12)
    assert code == 0 and out == run(capsys, "generate", "Each decoder layer", "--model", tiny, "-n", 12)[1]


def test_a_large_cpu_load_says_its_memory_and_suggests_bf16(tmp_path, capsys):
    from phi3_scratch import family

    (tmp_path / "config.json").write_text(
        json.dumps(family.official_config("microsoft/Phi-3-mini-4k-instruct")))
    args = cli.build_parser().parse_args(["arch", "--model", str(tmp_path), "--device", "cpu"])
    config = p3.Phi3Config.from_pretrained(tmp_path)  # as load() read it
    common.say_memory(args, config)
    assert ("the weights take 15.3 GB of memory in float32 on the CPU; --dtype bf16 halves it, "
            "--quantize int8 takes about a quarter of fp32, int4 a sixth (fastest with --compile)"
            in capsys.readouterr().err)
    args.dtype = "bf16"
    common.say_memory(args, config)
    assert "7.6 GB of memory in bfloat16 on the CPU; --quantize int8" in capsys.readouterr().err
    args.quantize = "int8"
    common.say_memory(args, config)
    err = capsys.readouterr().err
    assert "3.9 GB of memory in bfloat16" in err and "--quantize" not in err
    args.quantize = "int4"
    common.say_memory(args, config)
    err = capsys.readouterr().err
    assert "2.2 GB of memory in bfloat16" in err and "--quantize" not in err
    assert config.quantization is None  # read, not changed: load() goes on with it


@pytest.mark.skipif(torch.backends.mps.is_available(),
                    reason="this machine has an Apple GPU: mps is no mistake")
def test_device_mps_is_refused_before_loading(capsys, monkeypatch):
    patch_cli(monkeypatch, "load", lambda args: pytest.fail("the device must be checked before loading"))
    code, _, err = run(capsys, "generate", "hi", "--model", "tiny", "--device", "mps")
    assert code == 2 and err.strip() == ("error: --device mps: this machine has no Apple GPU that torch can "
                                         "use "
                                         f"(torch {torch.__version__}); use --device cpu")


def test_tour_on_a_real_checkpoint_follows_the_notebook(tiny, capsys, monkeypatch):
    """Any checkpoint but the tiny model gets the notebook's prompts, sent as the notebook sends them."""
    seen, real_encode = [], Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode",
                        lambda self, text, **kw: seen.append(text) or real_encode(self, text, **kw))
    code, out, _ = run(capsys, "tour", "--model", tiny, "-n", 5, "--runs", 1)  # a folder: not `--model tiny`
    assert code == 0 and "as it is (no chat template), greedy, 5 new tokens" in out
    for prompt in timing.NOTEBOOK_PROMPTS.values():
        assert prompt in seen  # raw: no <|user|> around it
    assert "100 new tokens after" in out  # the notebook's timing: 100 new tokens


@pytest.mark.parametrize("leave", ["/quit", "/exit"])
def test_chat_leaves_on_quit_and_exit(tiny, capsys, monkeypatch, leave):
    typed = iter([leave, "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    code, out, _ = run(capsys, "chat", "--model", tiny)
    assert code == 0 and "assistant> " not in out and next(typed) == "never read"


def test_flags_are_checked_before_anything_loads(capsys, monkeypatch):
    patch_cli(monkeypatch, "load", lambda args: pytest.fail("a bad flag must be refused before loading"))
    code, _, err = run(capsys, "generate", "hi", "--model", "tiny", "--dtype", "int3")
    assert code == 2 and err.startswith("error: --dtype int3: not a dtype this model runs in; expected bf16, "
                                        "fp16 or fp32")
    code, _, err = run(capsys, "generate", "hi", "--model", "tiny", "--device", "tpu")
    assert code == 2 and err.startswith("error: --device tpu: not a device this model runs on; expected cpu, "
                                        "cuda")
    code, _, err = run(capsys, "generate", "hi", "--model", "tiny", "--top-p", "2")
    # and no note about sampling first
    assert code == 2 and err == "error: --top-p must be in (0, 1], got 2.0\n"
    code, _, err = run(capsys, "compare", "--model", "tiny", "--tolerance", "nan")
    assert code == 2 and err == "error: --tolerance must be a positive number, got nan\n"
    # --layer and --head against the model's config, before its weights load
    code, _, err = run(capsys, "attention", "hi", "--model", "tiny", "--layer", "9")
    assert code == 2 and err == "error: --layer 9: the model has 4 layers, 0..3\n"
    code, _, err = run(capsys, "attention", "hi", "--model", "tiny", "--layer", "1", "--head", "4")
    assert code == 2 and err == "error: --head 4: the model has 4 heads a layer, 0..3\n"
    # str.isdigit() takes it
    code, _, err = run(capsys, "attention", "hi", "--model", "tiny", "--layer", "\u00b2")
    assert code == 2 and err == "error: --layer must be a layer number or 'all', got '\u00b2'\n"
    code, _, err = run(capsys, "attention", "hi", "--model", "tiny", "--layer", "all", "--head", "1")
    assert code == 2 and err.startswith("error: --head goes with one layer: --layer all draws")
    code, _, err = run(capsys, "bench", "hi", "--model", "tiny", "--prefill", "64")
    assert code == 2 and err == ("error: --prefill times a forward pass against transformers': "
                                 "it goes with --vs-transformers\n")
    code, _, err = run(capsys, "attention", "hi", "--model", "tiny", "--out", "att.jpg")
    assert code == 2 and "out must be a file name ending in .png (attention.png, say), got 'att.jpg'" in err
    patch_cli(monkeypatch, "model_folder",
              lambda args: pytest.fail("a bad flag must be refused before loading"))
    code, _, err = run(capsys, "bench", "hi", "--model", "tiny", "--vs-transformers", "--quantize", "int8",
                       "--compile")
    assert code == 2 and err.startswith("error: bench --vs-transformers times every variant itself") and \
        err.endswith("drop --quantize, --compile\n")
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "generate", "hi", "--model", "tiny", "--device", "cuda")
        assert code == 2 and err.startswith("error: --device cuda: this machine has no CUDA GPU") and \
            "--device cpu" in err


@pytest.mark.parametrize("command", ["generate", "chat", "step", "tour", "bench", "bench --vs-transformers"])
def test_more_new_tokens_than_positions_is_refused_before_the_weights_load(capsys, monkeypatch, command):
    patch_cli(monkeypatch, "model_folder", lambda args: pytest.fail("refused before the weights load"))
    monkeypatch.setattr(Tokenizer, "from_pretrained",
                        lambda *a: pytest.fail("refused before the tokenizer loads"))
    command, *flags = command.split()
    prompt = [] if command in ("chat", "tour") else ["hi"]
    # the tiny model has 512 positions
    code, _, err = run(capsys, command, *prompt, "--model", "tiny", "-n", 513, *flags)
    assert code == 2 and err == ("error: --max-new-tokens 513: more new tokens than the model has "
                                 "positions (512), prompt included\n")


def test_a_repo_id_fetches_its_tokenizer_before_the_weights(capsys, monkeypatch):
    """A repo whose tokenizer cannot be read fails in seconds, before gigabytes of weights download."""
    fetched = []

    def refuse(path_or_repo_id):
        fetched.append(("tokenizer", str(path_or_repo_id)))
        raise p3.Phi3Error(f"{path_or_repo_id}: no readable tokenizer")

    monkeypatch.setattr(Tokenizer, "from_pretrained", staticmethod(refuse))
    patch_cli(monkeypatch, "model_config",
              lambda args: fetched.append(("config", args.model)) or p3.Phi3Config.from_pretrained(TINY))
    patch_cli(monkeypatch, "model_folder", lambda args: fetched.append(("weights", args.model)))
    code, _, err = run(capsys, "generate", "hi", "--model", "someone/some-model")
    assert code == 2 and "no readable tokenizer" in err
    assert fetched == [("config", "someone/some-model"), ("tokenizer", "someone/some-model")]  # no weights


def test_a_folder_without_a_checkpoint_or_without_a_tokenizer_is_named(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "hi", "--model", str(tmp_path))
    assert code == 2 and err == (f"error: {tmp_path / 'config.json'} not found: "
                                 "a Phi-3 checkpoint folder must contain config.json\n")
    # weights and config, no tokenizer
    p3.Phi3ForCausalLM.from_pretrained("tiny").save_pretrained(tmp_path / "saved")
    code, _, err = run(capsys, "generate", "hi", "--model", str(tmp_path / "saved"), "-n", "2")
    assert code == 2 and "tokenizer.model not found" in err and \
        "--tokenizer DIR (or a repo id, or 'tiny')" in err
    code, out, _ = run(capsys, "generate", "hi", "--model", str(tmp_path / "saved"), "--tokenizer", "tiny",
                       "-n", "2")
    assert code == 0 and out.strip()
    small = tmp_path / "small"  # a 256-word model: the tiny tokenizer's 1,011 ids do not fit it
    p3.Phi3ForCausalLM(p3.Phi3Config.from_dict({**json.loads((TINY / "config.json").read_text()),
                                                "vocab_size": 256, "pad_token_id": 0})).save_pretrained(small)
    code, _, err = run(capsys, "generate", "hi", "--model", str(small), "--tokenizer", "tiny", "-n", "2")
    assert code == 2 and err == ("error: --tokenizer tiny has 1011 ids, more than the model's vocabulary "
                                 "of 256: they were not made for each other\n")


def test_the_progress_bar_writes_one_line_when_stderr_is_no_terminal(capsys):
    """tqdm's bar: in a log file, its first state and its last, on one line."""
    code, _, err = run(capsys, "generate", "hi", "--model", "tiny", "-n", "1")
    bars = [line for line in err.split("\n") if "weights [" in line]  # split("\n"): splitlines cuts at \r too
    assert code == 0 and bars == ["\r  weights [" + " " * 30 + "] 0/27 tensors"
                                  "\r  weights [" + "█" * 30 + "] 27/27 tensors"]


def test_dtype_names_in_any_case_and_auto(tiny, capsys, tmp_path):
    """--dtype BF16 is bf16; auto is the checkpoint's own dtype, on the CPU too, as the notebook's
    torch_dtype="auto" (the default on the CPU is fp32)."""
    _, _, err = run(capsys, "next-token", "The", "--model", tiny, "--dtype", "BF16")
    assert "torch.bfloat16" in err
    p3.Phi3ForCausalLM.from_pretrained(tiny, dtype="bf16").save_pretrained(tmp_path)  # a bf16 checkpoint
    for name in os.listdir(tiny):  # and the tiny model's tokenizer
        if name.startswith("tokenizer"):
            (tmp_path / name).write_bytes((Path(tiny) / name).read_bytes())
    _, _, err = run(capsys, "next-token", "The", "--model", tmp_path, "--dtype", "auto")
    assert "torch.bfloat16" in err
    _, _, err = run(capsys, "next-token", "The", "--model", tmp_path)
    assert "torch.float32" in err
    assert p3.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                   torch_dtype="auto").lm_head.weight.dtype == torch.bfloat16
    code, _, err = run(capsys, "generate", "hi", "--model", tmp_path, "--dtype", "INT3")
    assert code == 2 and err.startswith("error: --dtype INT3: not a dtype")


def test_a_prompt_refused_before_the_first_token_prints_nothing(tiny, capsys):
    code, out, err = run(capsys, "generate", "cache " * 600, "--model", tiny, "-n", 5)  # 512 positions
    assert code == 2 and out == "" and "more than the model's max_position_embeddings 512" in err


def test_a_closed_pipe_ends_the_output_quietly(tmp_path):
    """`phi3-scratch tour --model tiny | head -3`: no 'error: Broken pipe', the status SIGPIPE gives."""
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path)}
    tool = subprocess.Popen([sys.executable, "-m", "phi3_scratch", "tour", "--model", "tiny"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = tool.stdout.readline()
    tool.stdout.close()  # what head does after its lines
    err = tool.stderr.read()
    tool.wait(timeout=300)
    assert first.startswith("== 1. Load")
    assert "Broken pipe" not in err and "error" not in err and "Traceback" not in err, err
    assert tool.returncode == 141


def test_the_tour_times_the_cache_after_a_warm_up_over_five_runs(capsys, monkeypatch):
    calls = []
    real = timing.generate
    monkeypatch.setattr(timing, "generate", lambda model, ids, n, **kw: calls.append((n, kw)) or real(model,
                                                                                                      ids, n,
                                                                                                      **kw))
    code, out, _ = run(capsys, "tour", "--model", "tiny")
    assert code == 0 and "50 new tokens after a 10-token prompt, 5 runs each" in out
    warm_ups = calls[:2]  # one short untimed run of each way, then 5 timed runs of each
    assert [kw["use_cache"] for _, kw in warm_ups] == [True, False] and all(n < 50 for n, _ in warm_ups)
    assert [n for n, _ in calls[2:]] == [50] * 10
    assert re.search(r"with KV cache   median .*\(runs: (\d\.\d{3}, ){4}\d\.\d{3}\)", out)


def test_one_sampling_flag_without_temperature_matters(tiny, capsys):
    code, _, err = run(capsys, "generate", "The", "--model", tiny, "-n", 3, "--top-k", 5)
    assert code == 0 and "note: --top-k only matters when sampling" in err


def test_bench_vs_transformers_without_transformers_is_refused_before_its_header(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    code, out, err = run(capsys, "bench", "hi", "--model", "tiny", "--vs-transformers")
    assert code == 2 and out == ""
    assert err == ("error: bench --vs-transformers runs transformers beside this model, and transformers is "
                   "not "
                   "installed: pip install transformers\n")


def test_a_missing_tokenizer_folder_is_named_as_the_tokenizer_folder(capsys):
    code, out, err = run(capsys, "generate", "hi", "--model", "tiny", "--tokenizer", "/nonexistent")
    assert code == 2 and out == ""
    assert err == ("error: tokenizer folder /nonexistent not found "
                   "(and it is not a Hugging Face repo id like 'org/name')\n")
