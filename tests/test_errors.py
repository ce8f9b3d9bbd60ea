"""Bad input: every mistake gets a Phi3Error that names what is wrong, expected and actual."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import phi3_scratch as p3


@pytest.fixture
def folder(checkpoints, tmp_path):
    """A private copy of a sharded tiny checkpoint, safe to damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints("tiny-window")[0], dst)
    return dst


@pytest.fixture
def single_file(folder, tmp_path):
    """The same weights in one model.safetensors."""
    dst = tmp_path / "single"
    dst.mkdir()
    shutil.copy(folder / "config.json", dst)
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    save_file(tensors, dst / "model.safetensors")
    return dst


def shards(folder):
    return sorted(folder.glob("model-*.safetensors"))


def test_missing_folder():
    with pytest.raises(p3.Phi3Error, match="checkpoint folder /no/such/folder not found"):
        p3.Phi3ForCausalLM.from_pretrained("/no/such/folder")


def test_missing_config_json(folder):
    (folder / "config.json").unlink()
    with pytest.raises(p3.Phi3Error,
                       match=f"{folder / 'config.json'} not found: a Phi-3 checkpoint folder must contain "
                             "config.json"):
        p3.Phi3ForCausalLM.from_pretrained(folder)


def test_config_of_another_architecture(folder):
    d = json.loads((folder / "config.json").read_text())
    d.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(p3.Phi3Error, match="expected model_type 'phi3'.*got model_type 'llama'"):
        p3.Phi3ForCausalLM.from_pretrained(folder)


def test_unknown_rope_type(folder):
    d = json.loads((folder / "config.json").read_text())
    d["rope_parameters"]["rope_type"] = "yarn2"
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(p3.Phi3Error, match="unknown rope type 'yarn2'"):
        p3.Phi3ForCausalLM.from_pretrained(folder)


def test_shard_named_in_index_but_missing(folder):
    gone = shards(folder)[1]
    gone.unlink()
    with pytest.raises(p3.Phi3Error,
                       match=f"shard {gone} is named in .*model.safetensors.index.json but is missing"):
        p3.Phi3ForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_an_index_that_names_a_file_outside_the_folder_is_refused(folder, tmp_path, where):
    """Loading reads nothing outside the checkpoint folder, whatever its index names."""
    outside = tmp_path / "outside.safetensors"  # a real, readable shard, but not the checkpoint's
    shutil.copy(shards(folder)[0], outside)
    index = folder / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    name = str(outside) if where == "absolute" else "../outside.safetensors"
    first = shards(folder)[0].name
    d["weight_map"] = {k: (name if v == first else v) for k, v in d["weight_map"].items()}
    index.write_text(json.dumps(d))
    shards(folder)[0].unlink()
    with pytest.raises(p3.Phi3Error,
                       match=rf"names the shard '{name}', which is outside the checkpoint folder"):
        p3.Phi3ForCausalLM.from_pretrained(folder)
    d["weight_map"] = {k: 7 for k in d["weight_map"]}
    index.write_text(json.dumps(d))
    with pytest.raises(p3.Phi3Error, match="weight_map must map tensor names to shard file names"):
        p3.Phi3ForCausalLM.from_pretrained(folder)


def test_truncated_safetensors(folder):
    shard = shards(folder)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(p3.Phi3Error, match=f"{shard} is not a readable safetensors file"):
        p3.Phi3ForCausalLM.from_pretrained(folder)


def test_corrupt_safetensors(folder):
    shard = shards(folder)[-1]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}!!" + bytes(100))
    with pytest.raises(p3.Phi3Error, match=f"{shard} is not a readable safetensors file"):
        p3.Phi3ForCausalLM.from_pretrained(folder)


def test_tensor_shape_disagrees_with_config(folder):
    d = json.loads((folder / "config.json").read_text())
    d["intermediate_size"] = 100  # the checkpoint's MLP is 96 wide
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(p3.Phi3Error,
                       match=r"tensor 'model.layers.0.mlp.\w+_proj.weight' has shape \((192, 64|64, 96)\), "
                             r"but config.json implies \((200, 64|64, 100)\)"):
        p3.Phi3ForCausalLM.from_pretrained(folder)


def test_missing_tensors(single_file):
    tensors = load_file(single_file / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, single_file / "model.safetensors")
    with pytest.raises(p3.Phi3Error, match="is missing 1 tensor\\(s\\): model.norm.weight"):
        p3.Phi3ForCausalLM.from_pretrained(single_file)


def test_unexpected_tensor(single_file):
    tensors = load_file(single_file / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary.inv_freq"] = torch.ones(8)
    save_file(tensors, single_file / "model.safetensors")
    with pytest.raises(p3.Phi3Error, match="unexpected tensor 'model.layers.0.self_attn.rotary.inv_freq'"):
        p3.Phi3ForCausalLM.from_pretrained(single_file)


def test_single_file_checkpoint_loads(single_file, checkpoints):
    ids = torch.randint(0, 256, (1, 9))
    sharded = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    assert torch.equal(p3.Phi3ForCausalLM.from_pretrained(single_file)(ids), sharded(ids))


def test_pickle_checkpoints_are_refused(tmp_path, folder):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(p3.Phi3Error,
                       match=r"holds only pickle weights \(pytorch_model.bin\).*safetensors only, because "
                             r"unpickling"):
        p3.Phi3ForCausalLM.from_pretrained(pickled)


def test_token_ids_outside_the_vocabulary(checkpoints):
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    with pytest.raises(p3.Phi3Error, match=r"token id 256 is outside the vocabulary: expected ids in 0..255"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(p3.Phi3Error, match=r"token id -1 is outside the vocabulary"):
        p3.generate(model, torch.tensor([[-1, 5]]), 3)
    with pytest.raises(p3.Phi3Error,
                       match=r"input_ids must be a 2-D LongTensor \(batch, tokens\), got \(3,\)"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(p3.Phi3Error, match="must hold integer token ids, got dtype torch.float32"):
        model(torch.tensor([[1.0, 2.0]]))


def test_empty_prompt(checkpoints):
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    with pytest.raises(p3.Phi3Error, match=r"input_ids is empty: shape \(1, 0\)"):
        p3.generate(model, torch.zeros(1, 0, dtype=torch.long), 5)


def test_prompt_plus_new_tokens_longer_than_the_model_or_cache(checkpoints):
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])  # 64 positions
    with pytest.raises(p3.Phi3Error,
                       match=r"prompt of 61 tokens \+ max_new_tokens=5 - 1 \(the last new token is not fed "
                                           r"back\) = 65 positions, more than the model's "
                                           r"max_position_embeddings 64"):
        p3.generate(model, torch.ones(1, 61, dtype=torch.long), 5)
    with pytest.raises(p3.Phi3Error,
                       match="sequence of 65 positions .* longer than the model's "
                             "max_position_embeddings 64"):
        model(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(p3.Phi3Error, match="max_new_tokens must be a positive integer, got 0"):
        p3.generate(model, torch.ones(1, 3, dtype=torch.long), 0)
    with pytest.raises(p3.Phi3Error, match="pad on the left, not the right"):
        p3.generate(model, torch.ones(2, 3, dtype=torch.long), 2, attention_mask=torch.tensor([[1, 1, 1],
                                                                                               [1, 1, 0]]))


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="this machine has a CUDA GPU, so asking for one is no mistake")
def test_cuda_without_a_gpu(folder):
    with pytest.raises(p3.Phi3Error, match="device 'cuda' was asked for, but this machine has no CUDA GPU"):
        p3.Phi3ForCausalLM.from_pretrained(folder, device="cuda")


def test_bad_device_and_dtype(folder):
    with pytest.raises(p3.Phi3Error, match="device 'gpu0' is not a torch device"):
        p3.Phi3ForCausalLM.from_pretrained(folder, device="gpu0")
    with pytest.raises(p3.Phi3Error, match="dtype 'float8' is not supported"):
        p3.Phi3ForCausalLM.from_pretrained(folder, dtype="float8")


def test_repo_id_while_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(p3.Phi3Error,
                       match=r"no local folder 'microsoft/Phi-3-mini-4k-instruct', and it could not be "
                             r"downloaded.*pass the local folder instead"):
        p3.Phi3ForCausalLM.from_pretrained("microsoft/Phi-3-mini-4k-instruct")


def test_dtype_choice(folder):
    assert p3.Phi3ForCausalLM.from_pretrained(folder).lm_head.weight.dtype == torch.float32  # CPU default
    model = p3.Phi3ForCausalLM.from_pretrained(folder, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.new_cache(1, max_len=4).keys[0].dtype == torch.bfloat16
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_stop_ids_outside_the_vocabulary(checkpoints, tmp_path):
    """Stop tokens that no token can match: generation would silently never stop."""
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(p3.Phi3Error, match=r"eos_token_id: \[99999\] outside the vocabulary, 0..255"):
        p3.generate(model, ids, 5, eos_token_id=99999)
    model.config.stop_token_ids = [2, -1]
    with pytest.raises(p3.Phi3Error, match=r"the model's stop ids \(config.stop_token_ids\): \[-1\] outside"):
        p3.generate(model, ids, 5)


def test_bad_attention_mask_stop_ids_and_sampling_arguments(checkpoints):
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(p3.Phi3Error, match="attention_mask must be a tensor of 0 and 1, got list"):
        model(ids, attention_mask=[[1, 1, 1], [1, 1, 1]])
    with pytest.raises(p3.Phi3Error,
                       match=r"attention_mask must hold only 0 \(padding\) and 1 .* values \[1, 2\]"):
        model(ids, attention_mask=torch.tensor([[1, 1, 1], [2, 1, 1]]))
    with pytest.raises(p3.Phi3Error,
                       match=r"attention_mask must have shape \(batch, cached \+ new tokens\) = \(2, 3\), "
                             r"got \(2, 4\)"):
        model(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(p3.Phi3Error, match="attention_mask must have shape the shape of input_ids"):
        p3.generate(model, ids, 2, attention_mask=torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(p3.Phi3Error,
                       match="eos_token_id must be None, a token id or a list of token ids, got '2'"):
        p3.generate(model, ids, 2, eos_token_id="2")
    with pytest.raises(p3.Phi3Error, match="temperature must be a finite number >= 0 .* got '0.5'"):
        p3.generate(model, ids, 2, temperature="0.5")
    with pytest.raises(p3.Phi3Error,
                       match="seed must be an integer in -2\\*\\*63..2\\*\\*64 - 1 .* or None, got 'x'"):
        p3.generate(model, ids, 2, temperature=1.0, seed="x")
    with pytest.raises(p3.Phi3Error, match="batch_size must be a positive integer, got 0"):
        model.new_cache(0, max_len=4)
    with pytest.raises(p3.Phi3Error,
                       match=r"max_len must be an integer in 1..max_position_embeddings=64, got 10.5 "
                             r"\(float\)"):
        model.new_cache(1, max_len=10.5)
    with pytest.raises(p3.Phi3Error, match=r"batch_size must be a positive integer, got True \(bool\)"):
        model.new_cache(True, max_len=4)
    with pytest.raises(p3.Phi3Error, match=r"max_len must be an integer .* got tensor\(5\) \(torch.Tensor\)"):
        model.new_cache(1, max_len=torch.tensor(5))
    with pytest.raises(p3.Phi3Error, match="compile must be True or False, got 'no'"):
        p3.generate(model, ids, 2, compile="no")
    with pytest.raises(p3.Phi3Error, match="all_positions must be True or False, got 'no'"):
        p3.logit_lens(model, ids, all_positions="no")
    with pytest.raises(p3.Phi3Error, match=r"trace\(only=...\) is empty"):
        with p3.trace(model, only=set()):
            pass


def test_device_that_is_not_cpu_or_cuda(folder):
    with pytest.raises(p3.Phi3Error,
                       match="device 'meta' is not supported; expected 'cpu', 'cuda', 'cuda:N' or 'mps'"):
        p3.Phi3ForCausalLM.from_pretrained(folder, device="meta")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_attention_heads", 0, "num_attention_heads must be a positive integer, got 0"),
        ("hidden_size", "64", "hidden_size must be a positive integer, got '64'"),
        ("sliding_window", "8", "sliding_window must be null or an integer >= 1, got '8'"),
        ("num_key_value_heads", 3, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        ("sliding_window", True, "sliding_window must be null or an integer >= 1, got True"),
        ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false, got 'false'"),
        ("eos_token_id", "2", "eos_token_id must be null, a token id or a list of token ids, got '2'"),
        ("pad_token_id", -1, "pad_token_id must be null, a token id or a list of token ids, got -1"),
        ("rope_parameters", "longrope", "rope_parameters must be null or an object, got 'longrope'"),
        ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": ["a"] * 8,
                             "long_factor": [1.0] * 8},
         r"longrope short_factor must hold positive numbers, got \['a'"),
    ],
)
def test_config_values_are_checked(folder, field, value, message):
    d = json.loads((folder / "config.json").read_text())
    d[field] = value
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(p3.Phi3Error, match=f"config {folder / 'config.json'}: {message}"):
        p3.Phi3ForCausalLM.from_pretrained(folder)


def test_tied_checkpoint_that_also_stores_the_head(checkpoints, tmp_path):
    """Some exports of tied models (Phi-4-mini) also write lm_head.weight: the embedding is used, as in
    transformers."""
    src, hf = checkpoints("tiny-longrope")
    shutil.copy(src / "config.json", tmp_path)
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(shard))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors")
    seen = []
    model = p3.Phi3ForCausalLM.from_pretrained(tmp_path,
                                               progress=lambda done, total: seen.append((done, total)))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert seen[-1][0] == seen[-1][1]  # the progress count reaches its total


def test_tied_checkpoint_that_stores_a_different_head_uses_it_untied(checkpoints, tmp_path):
    """A config that ties the head, and a stored lm_head.weight that is not the embedding (a fine-tune
    saved without untying its config): transformers uses the stored head, untied, and so does this model."""
    import transformers

    src, _ = checkpoints("tiny-longrope")  # tied
    shutil.copy(src / "config.json", tmp_path)
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(shard))
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.warns(UserWarning,
                      match="also stores an lm_head.weight that differs from it: the stored head is used"):
        model = p3.Phi3ForCausalLM.from_pretrained(tmp_path)
    assert model.lm_head.weight is not model.model.embed_tokens.weight and \
        not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])
    theirs = transformers.Phi3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.warns(UserWarning, match="the stored head is used"):  # quantized like any untied head
        quantized = p3.Phi3ForCausalLM.from_pretrained(tmp_path, quantize="int8")
    quantized.save_pretrained(tmp_path / "int8")
    again = p3.Phi3ForCausalLM.from_pretrained(tmp_path / "int8")  # saved untied: no warning, the same logits
    assert torch.equal(again(ids), quantized(ids)) and type(again.lm_head).__name__ == "Int8Linear"
    tensors["lm_head.weight"][0, 0] = float("nan")  # the stored head is checked as every other tensor is
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(p3.Phi3Error, match="tensor 'lm_head.weight' holds NaN or infinite values"):
        p3.Phi3ForCausalLM.from_pretrained(tmp_path)


def test_a_cache_filled_with_padding_needs_the_mask_on_every_call(checkpoints):
    """Without the mask, the next call would attend to the padded keys and shift every position."""
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    ids, mask = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]), torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    cache = model.new_cache(2, max_len=8)
    model(ids, cache, mask)
    with pytest.raises(p3.Phi3Error,
                       match=r"the cache holds a left-padded batch: pass attention_mask of shape "
                                           r"\(batch, cached \+ new\) = \(2, 5\) on every call"):
        model(torch.tensor([[11], [12]]), cache)
    grown = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    assert model(torch.tensor([[11], [12]]), cache, grown).shape == (2, 1, model.config.vocab_size)
    cache.reset()  # an emptied cache forgets the padding; refilled without any, it needs no mask
    model(ids, cache, torch.ones_like(mask))
    assert model(torch.tensor([[11], [12]]), cache).shape == (2, 1, model.config.vocab_size)


def test_a_static_cache_that_is_full_says_so(checkpoints):
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    cache = model.new_cache(1, max_len=4, static=True)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache)
        with pytest.raises(p3.Phi3Error,
                           match=r"KV cache full: it holds 3 of max_len=4 positions and 2 more were given"):
            model(torch.tensor([[4, 5]]), cache)


@pytest.mark.parametrize("keep", [-1, 1.5])
def test_logits_to_keep_must_be_a_count(checkpoints, keep):
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    with pytest.raises(p3.Phi3Error,
                       match=rf"logits_to_keep must be an integer >= 0 \(0 keeps every position\), "
                             rf"got {keep}"):
        model(torch.tensor([[1, 2, 3]]), logits_to_keep=keep)


def test_trace_only_takes_the_names_a_trace_records(checkpoints):
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    with pytest.raises(p3.Phi3Error,
                       match=r"trace\(only=...\): \['layers.0.q'\] are not names a trace records"):
        with p3.trace(model, only={"layers.0.q"}):
            pass


def test_stepper_refuses_fractional_ids(checkpoints):
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    with pytest.raises(p3.Phi3Error, match="prompt_ids must hold integer token ids, got dtype torch.float32"):
        p3.Stepper(model, [1.7, 2.2])


def test_a_tensor_in_two_shards_is_refused(folder):
    """Which copy is meant? The later file silently winning would load whichever came last."""
    shards = sorted(folder.glob("*.safetensors"))
    first, second = load_file(shards[0]), load_file(shards[1])
    name = next(iter(first))
    save_file({**second, name: torch.zeros_like(first[name])}, shards[1])
    with pytest.raises(p3.Phi3Error,
                       match=f"tensor '{name}' was already loaded from another file of this checkpoint"):
        p3.Phi3ForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("value, dtype, says", [
    (float("nan"), None, "holds NaN or infinite values: min nan, max nan"),
    (float("inf"), "int8", "holds NaN or infinite values: min .*, max inf"),  # before it is quantized
    (1e6, "fp16", "holds NaN or infinite values once converted from torch.float32 to torch.float16 "
                  "\\(largest 65504\\): min .*, max inf"),
])
def test_a_weight_with_nan_or_infinity_is_refused(folder, value, dtype, says):
    """Every logit would be NaN and greedy decoding would repeat token 0: the file (or the dtype asked
    for) is named instead."""
    shard, tensors = next((s, load_file(s)) for s in sorted(folder.glob("*.safetensors"))
                          if any(n.endswith("down_proj.weight") for n in load_file(s)))
    name = next(n for n in tensors if n.endswith("down_proj.weight"))
    tensors[name][1, 2] = value
    save_file(tensors, shard)
    options = {"quantize": dtype} if dtype == "int8" else {"dtype": dtype}
    with pytest.raises(p3.Phi3Error, match=f"{shard}: tensor '{name}' {says}"):
        p3.Phi3ForCausalLM.from_pretrained(folder, **options)


def test_an_index_that_is_no_object(folder):
    (folder / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(p3.Phi3Error,
                       match="is not a safetensors index \\(expected an object with a 'weight_map'\\)"):
        p3.Phi3ForCausalLM.from_pretrained(folder)


def test_a_cache_made_for_another_model_is_refused(checkpoints):
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    ids = torch.tensor([[1, 2]])
    other = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0],
                                               dtype="bf16").new_cache(1, max_len=8)
    with pytest.raises(p3.Phi3Error,
                       match=r"the cache does not fit this model: its \(layers, kv heads, head size, dtype, "
                                           r"device\) are \(2, 4, 16, 'torch.bfloat16', 'cpu'\), the model's "
                                           r"\(2, 4, 16, "
                                           r"'torch.float32', 'cpu'\)"):
        model(ids, other)
    with pytest.raises(p3.Phi3Error,
                       match=r"cache must be a KVCache \(model.new_cache\(batch_size, max_len=...\)\), got "
                             r"bool"):
        model(ids, True)


def test_inputs_on_another_device_than_the_model(checkpoints):
    """CPU ids for a model on a GPU failed deep inside the embedding; the meta device stands in for the
    GPU."""
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    ids = torch.tensor([[1, 2]])
    with pytest.raises(p3.Phi3Error,
                       match=r"attention_mask is on meta but the model is on cpu: move it with .to\('cpu'\)"):
        p3.generate(model, ids, 3, attention_mask=torch.ones(1, 2, dtype=torch.long, device="meta"))
    with pytest.raises(p3.Phi3Error, match=r"attention_mask is on meta but the model is on cpu"):
        model(ids, attention_mask=torch.ones(1, 2, dtype=torch.long, device="meta"))


def test_stepper_misuse(checkpoints):
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    with pytest.raises(p3.Phi3Error, match=r"prompt_ids must be token ids, not text: encode it first"):
        p3.Stepper(model, "The KV cache")
    with pytest.raises(p3.Phi3Error,
                       match=r"prompt_ids must be a list of token ids or a tensor: expected sequence"):
        p3.Stepper(model, [[1, 2, 3], [1, 2]])
    with pytest.raises(p3.Phi3Error, match=r"tokenizer must be a p3.Tokenizer .* or None, got str"):
        p3.Stepper(model, [1, 2], tokenizer="tiny")
    with pytest.raises(p3.Phi3Error, match="top_k must be a positive integer, got True"):
        p3.Stepper(model, [1, 2], top_k=True)
    with pytest.raises(p3.Phi3Error, match=r"input_ids is empty: shape \(1, 0\)"):
        p3.generate(model, torch.tensor([[]]), 3)  # a float tensor, but its emptiness is the mistake


def test_from_pretrained_arguments_of_the_wrong_kind(checkpoints):
    with pytest.raises(p3.Phi3Error,
                       match=r"expected a checkpoint folder, a Hugging Face repo id or 'tiny' \(a str or "
                             r"path\), got NoneType"):
        p3.Phi3ForCausalLM.from_pretrained(None)
    with pytest.raises(p3.Phi3Error, match=r"expected a checkpoint folder, .* got NoneType"):
        p3.Tokenizer.from_pretrained(None)
    with pytest.raises(p3.Phi3Error,
                       match=r"progress must be a function progress\(done, total\) or None, got 5"):
        p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0], progress=5)


def test_pipeline_takes_a_folder_name_as_transformers_does():
    generator = p3.pipeline("text-generation", model="tiny", max_new_tokens=3)  # its tokenizer too
    assert len(generator("The KV cache")[0]["generated_text"]) > len("The KV cache")
    with pytest.raises(p3.Phi3Error,
                       match=r"model= and tokenizer= must be a model and a tokenizer .* got int"):
        p3.pipeline("text-generation", model=3, tokenizer="tiny")


def test_true_is_no_count(checkpoints):
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    with pytest.raises(p3.Phi3Error, match="max_new_tokens must be a positive integer, got True"):
        p3.generate(model, torch.tensor([[1, 2]]), True)
    with pytest.raises(p3.Phi3Error, match="token_id must be in 0..255, got True"):
        p3.Stepper(model, [1, 2]).choose(True)
