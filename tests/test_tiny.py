"""The built-in tiny model: what ships, and the script that rebuilds it."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import phi3_scratch as p3
from phi3_scratch.loading import TINY

from .conftest import ROOT, train_tiny


def test_the_shipped_model_was_trained_on_the_committed_corpus():
    training = json.loads((TINY / "training.json").read_text())
    corpus = ROOT / "scripts" / training["corpus"]
    assert hashlib.sha256(corpus.read_bytes()).hexdigest() == training["corpus_sha256"]
    assert training["final_loss"] < training["first_loss"] / 10  # it has learned its corpus
    size = sum(f.stat().st_size for f in TINY.iterdir())
    assert size < 8 * 2**20, f"the tiny model is {size / 2**20:.1f} MiB; it ships in the package"


def test_the_tiny_model_answers_a_corpus_question_in_the_chat_template():
    """Greedy, in the chat template, it gives the corpus's answer word for word: what the tour shows."""
    script = train_tiny()
    answers = dict(script.read_corpus(script.CORPUS)[1])
    model, tok = p3.Phi3ForCausalLM.from_pretrained("tiny"), p3.Tokenizer.from_pretrained("tiny")
    question = "What does the KV cache do?"
    ids = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))])
    out = p3.generate(model, ids, 120, eos_token_id=tok.stop_ids)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == answers[question]


def test_train_tiny_writes_a_loadable_checkpoint_and_its_hashes(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny.py"), "--out", str(tmp_path),
                           "--steps", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    hashes = dict(re.findall(r"^([0-9a-f]{64})\s+[\d,]+ B\s+(\S+)$", done.stdout, re.M))
    names = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer.model", "tokenizer_config.json", "training.json"}
    assert {Path(p).name for p in hashes.values()} == names
    for digest, path in hashes.items():
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest
    model, tok = p3.Phi3ForCausalLM.from_pretrained(tmp_path), p3.Tokenizer.from_pretrained(tmp_path)
    assert model.config.vocab_size % 64 == 0 and tok.encode("<|end|>") == [tok.vocab_size - 4]
    assert json.loads((tmp_path / "training.json").read_text())["steps"] == 3


def test_the_shipped_tokenizer_json_is_the_one_its_tokenizer_model_makes(tmp_path):
    """tokenizer.json (for transformers' AutoTokenizer) is not stale: train_tiny.py --tokenizer-json
    writes the same file again from the shipped tokenizer.model and tokenizer_config.json."""
    import tokenizers  # noqa: F401  (building tokenizer.json needs it; the test extra installs it)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(TINY / name, tmp_path / name)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny.py"), "--out", str(tmp_path),
                           "--tokenizer-json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (json.loads((tmp_path / "tokenizer.json").read_text())
            == json.loads((TINY / "tokenizer.json").read_text()))


def test_transformers_autotokenizer_reads_the_tiny_folder_as_ours_does():
    """The tiny folder loads in transformers as it ships: the same ids, text and chat prompt as ours.
    (Runs of spaces are left out: there tokenizer.json may split differently from sentencepiece, as
    Phi-3's own files do; test_tokenizer.py checks those.)"""
    import transformers
    from .test_tokenizer import CORPUS, has_space_run

    theirs, ours = transformers.AutoTokenizer.from_pretrained(str(TINY)), p3.Tokenizer.from_pretrained("tiny")
    texts = [t for t in CORPUS if not has_space_run(t)]
    texts += ["<|user|>\nWhat does the KV cache do?<|end|>\n<|assistant|>", "What does the KV cache do?"]
    assert [theirs.encode(t, add_special_tokens=False) for t in texts] == [ours.encode(t) for t in texts]
    ids = ours.encode(CORPUS[0] + CORPUS[3])
    assert theirs.decode(ids) == ours.decode(ids)
    chat = [{"role": "user", "content": "What does the KV cache do?"}]
    assert theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(chat, add_generation_prompt=True)
