"""save_pretrained writes one whole checkpoint or leaves the old one; an interrupted save is refused."""

import errno
import os
import shutil

import pytest
import torch

import phi3_scratch as p3
from phi3_scratch import saving
from phi3_scratch.errors import Phi3Error
from phi3_scratch.loading import TINY

IDS = torch.tensor([[1, 400, 37, 900, 12, 5]])


def logits(folder_or_model) -> torch.Tensor:
    model = folder_or_model
    if not isinstance(model, p3.Phi3ForCausalLM):
        model = p3.Phi3ForCausalLM.from_pretrained(folder_or_model)
    with torch.no_grad():
        return model(IDS)


def changed(model: p3.Phi3ForCausalLM) -> p3.Phi3ForCausalLM:
    """The same shapes, other weights: a mix of the two would load without any shape error."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)
    return model


def transformers_checkpoint(folder, sharded: bool):
    """The tiny model saved by transformers, as the hub holds checkpoints: sharded or in one file."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    hf.save_pretrained(folder, max_shard_size="1MB" if sharded else "1GB")
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    return hf


def test_a_save_over_a_transformers_sharded_checkpoint_loads_what_was_saved(tmp_path):
    hf = transformers_checkpoint(tmp_path, sharded=True)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    (tmp_path / "README.md").write_text("the user's notes")
    shutil.copy(TINY / "tokenizer.model", tmp_path)
    with torch.no_grad():
        assert torch.allclose(logits(tmp_path), hf(IDS).logits, atol=1e-4)  # the old model, before
    new = changed(p3.Phi3ForCausalLM.from_pretrained(tmp_path))
    new.save_pretrained(tmp_path)
    assert torch.equal(logits(tmp_path), logits(new))  # was the old weights: the index won
    assert not (tmp_path / "model.safetensors.index.json").exists() and not any(p.exists() for p in shards)
    assert ((tmp_path / "README.md").read_text() == "the user's notes"
            and (tmp_path / "tokenizer.model").is_file())
    assert not list(tmp_path.glob(".phi3_scratch-*"))  # no temporary file left


@pytest.mark.parametrize("before", ["transformers, one file", "an earlier save of ours"])
def test_a_save_over_another_checkpoint_loads_what_was_saved(tmp_path, before):
    if before == "an earlier save of ours":
        p3.Phi3ForCausalLM.from_pretrained(TINY).save_pretrained(tmp_path)
    else:
        transformers_checkpoint(tmp_path, sharded=False)
    new = changed(p3.Phi3ForCausalLM.from_pretrained(TINY))
    new.save_pretrained(tmp_path)
    assert torch.equal(logits(tmp_path), logits(new))


def test_a_quantized_save_over_a_full_one_and_back(tmp_path):
    full = p3.Phi3ForCausalLM.from_pretrained(TINY)
    full.save_pretrained(tmp_path)
    int8 = p3.Phi3ForCausalLM.from_pretrained(TINY, quantize="int8")
    int8.save_pretrained(tmp_path)
    again = p3.Phi3ForCausalLM.from_pretrained(tmp_path)
    assert again.config.quantization == "int8" and torch.equal(logits(again), logits(int8))
    full.save_pretrained(tmp_path)
    again = p3.Phi3ForCausalLM.from_pretrained(tmp_path)
    assert again.config.quantization is None and torch.equal(logits(again), logits(full))


def test_transformers_loads_our_save_and_a_transformers_save_over_ours_loads_here(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = changed(p3.Phi3ForCausalLM.from_pretrained(TINY))
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(hf(IDS).logits, logits(ours), atol=1e-4)
        for p in hf.parameters():
            p.mul_(0.5)
        hf.save_pretrained(tmp_path)  # its weights carry no save id, its config still carries ours
        assert torch.allclose(logits(tmp_path), hf(IDS).logits, atol=1e-4)


class Killed(BaseException):
    """The process dies here: no except clause of the save runs."""


def kill_at(monkeypatch, step: int) -> list:
    """Make the step-th rename or removal of a save die; returns the steps seen."""
    seen = []
    real_replace, real_remove = saving.os.replace, saving.remove

    def counted(real):
        def call(*args):
            seen.append(args[0])
            if len(seen) == step:
                raise Killed
            return real(*args)
        return call

    monkeypatch.setattr(saving.os, "replace", counted(real_replace))
    monkeypatch.setattr(saving, "remove", counted(real_remove))
    return seen


@pytest.mark.parametrize("before", ["transformers, sharded", "transformers, one file",
                                    "an earlier save of ours"])
def test_a_save_killed_at_any_point_loads_old_or_new_or_is_refused(tmp_path, monkeypatch, before):
    """Never a silent mix: the old model, the new one, or a Phi3Error saying the checkpoint is incomplete."""
    source = tmp_path / "source"
    if before == "an earlier save of ours":
        p3.Phi3ForCausalLM.from_pretrained(TINY).save_pretrained(source)
    else:
        transformers_checkpoint(source, sharded=before.endswith("sharded"))
    old = logits(source)
    new_model = changed(p3.Phi3ForCausalLM.from_pretrained(TINY))
    new = logits(new_model)
    outcomes, step = [], 1
    while True:
        folder = tmp_path / f"killed-{step}"
        shutil.copytree(source, folder)
        with monkeypatch.context() as patch:
            seen = kill_at(patch, step)
            try:
                new_model.save_pretrained(folder)
                finished = True
            except Killed:
                finished = False
        try:
            got = logits(folder)
            outcome = "old" if torch.equal(got, old) else "new" if torch.equal(got, new) else "a mix"
        except Phi3Error as e:
            assert "is incomplete" in str(e) and "interrupted" in str(e), e
            outcome = "refused"
        assert outcome != "a mix", f"killed at step {step} ({seen[-1]}): the folder loads neither model"
        outcomes.append(outcome)
        if finished:
            break
        new_model.save_pretrained(folder)  # saving again mends the folder, leftovers and all
        assert torch.equal(logits(folder), new) and not list(folder.glob(".phi3_scratch-*"))
        step += 1
    assert outcomes[-1] == "new" and "old" in outcomes[:1] and "refused" in outcomes, outcomes


def test_a_save_killed_while_writing_leaves_the_old_model(tmp_path, monkeypatch):
    p3.Phi3ForCausalLM.from_pretrained(TINY).save_pretrained(tmp_path)
    old = logits(tmp_path)

    def dies(path):
        path.write_bytes(b"half a file")
        raise Killed

    monkeypatch.setattr(saving, "json_writer", lambda data: dies)
    with pytest.raises(Killed):
        changed(p3.Phi3ForCausalLM.from_pretrained(TINY)).save_pretrained(tmp_path)
    assert list(tmp_path.glob(".phi3_scratch-*"))  # the temporary files of a killed save stay ...
    assert torch.equal(logits(tmp_path), old)  # ... and change nothing that loads


def test_a_checkpoint_mixed_by_hand_from_two_saves_is_refused(tmp_path):
    p3.Phi3ForCausalLM.from_pretrained(TINY).save_pretrained(tmp_path / "a")
    changed(p3.Phi3ForCausalLM.from_pretrained(TINY)).save_pretrained(tmp_path / "b")
    shutil.copy(tmp_path / "a" / "config.json", tmp_path / "b" / "config.json")
    with pytest.raises(Phi3Error,
                       match=r"checkpoint .*b is incomplete: its weights are from save [0-9a-f]{32}, but"):
        p3.Phi3ForCausalLM.from_pretrained(tmp_path / "b")


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES],
                         ids=["a full disk", "a folder that cannot be written"])
def test_a_failed_write_names_the_file_and_changes_nothing(tmp_path, monkeypatch, error):
    import safetensors.torch

    p3.Phi3ForCausalLM.from_pretrained(TINY).save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fails(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"the first bytes")
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(safetensors.torch, "save_file", fails)
    with pytest.raises(Phi3Error) as raised:
        changed(p3.Phi3ForCausalLM.from_pretrained(TINY)).save_pretrained(tmp_path)
    assert str(raised.value) == (f"could not write {tmp_path / 'model.safetensors'} ({os.strerror(error)}); "
                                 f"the folder {tmp_path} is as it was")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file either


def test_saving_onto_a_file_or_under_one_is_refused_by_name(tmp_path):
    model = p3.Phi3ForCausalLM.from_pretrained(TINY)
    file = tmp_path / "weights.bin"
    file.write_text("not a folder")
    with pytest.raises(Phi3Error, match=f"save_pretrained: {file} is a file; expected a folder"):
        model.save_pretrained(file)
    with pytest.raises(Phi3Error, match=f"save_pretrained: the folder {file / 'sub'} cannot be made"):
        model.save_pretrained(file / "sub")
    assert file.read_text() == "not a folder"


def test_the_tokenizer_saves_files_that_load_here_and_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_text("{}")  # another tokenizer's file: it would win in transformers
    (tmp_path / "notes.txt").write_text("kept")
    tokenizer = p3.Tokenizer.from_pretrained(TINY)
    tokenizer.save_pretrained(tmp_path)
    ours, theirs = (p3.Tokenizer.from_pretrained(tmp_path),
                    transformers.AutoTokenizer.from_pretrained(tmp_path))
    for text in ["The KV cache keeps keys.", "<|user|>\nWhat is RoPE?<|end|>\n<|assistant|>",
                 "  two  spaces"]:
        assert ours.encode(text) == tokenizer.encode(text)
        assert theirs(text).input_ids == tokenizer.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat) == theirs.apply_chat_template(chat, tokenize=False,
                                                                       add_generation_prompt=True)
    assert (tmp_path / "tokenizer.json").read_bytes() == (TINY / "tokenizer.json").read_bytes()
    assert (tmp_path / "notes.txt").read_text() == "kept" and not list(tmp_path.glob(".phi3_scratch-*"))


def test_a_tokenizer_not_read_from_a_folder_cannot_be_saved(tmp_path):
    tokenizer = p3.Tokenizer.from_pretrained(TINY)
    made = p3.Tokenizer(tokenizer._sp, list(tokenizer._added.values()), {})
    with pytest.raises(Phi3Error, match="was not read from a folder"):
        made.save_pretrained(tmp_path)
