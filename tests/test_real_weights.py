"""The whole path on the real Phi-3-mini-4k-instruct weights, when they are on this machine.

Set PHI3_MINI_4K to the checkpoint folder, or have the repo in the Hugging Face cache
(`hf download microsoft/Phi-3-mini-4k-instruct`). Elsewhere the test skips, saying so.
The expected numbers are those of transformers' own integration test for this model.
"""

import json
import os
from pathlib import Path

import pytest
import torch

import phi3_scratch as p3

REPO = "microsoft/Phi-3-mini-4k-instruct"


def real_checkpoint() -> Path | None:
    if os.environ.get("PHI3_MINI_4K"):
        return Path(os.environ["PHI3_MINI_4K"])
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(REPO, local_files_only=True,
                                        allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
    except LocalEntryNotFoundError:  # not in the cache: nothing to test against
        return None
    index = folder / "model.safetensors.index.json"  # a broken index is an error, not a skip
    shards = (set(json.loads(index.read_text())["weight_map"].values()) if index.is_file()
              else {"model.safetensors"})
    needed = {"config.json", "tokenizer.model", *shards}  # a partial download is no checkpoint
    return folder if all((folder / name).is_file() for name in needed) else None


FOLDER = real_checkpoint()


@pytest.mark.skipif(FOLDER is None,
                    reason=f"real weights absent: set PHI3_MINI_4K or download {REPO} (7.6 GB)")
def test_real_phi3_mini_logits_match_transformers_and_the_notebook():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = p3.Phi3ForCausalLM.from_pretrained(FOLDER, device=device, dtype=torch.float32)
    ids = torch.tensor([[1212, 318, 281, 1672, 2643, 290, 428, 318, 257, 1332]], device=device)
    with torch.no_grad():
        logits = model(ids)[0, :2].float().cpu()
    row0 = torch.tensor([8.9005, 8.5380, 12.0361, 9.1562, 7.4068, 10.2581])
    row1 = torch.tensor([18.7090, 18.5701, 19.3660, 21.5171])
    torch.testing.assert_close(logits[0, :6], row0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1, :4], row1, rtol=1e-4, atol=1e-4)
    # The teaching notebook's cell 4: body, then head, on its prompt; it shows 'Harvard'.
    from phi3_scratch.cli.timing import NOTEBOOK_PROMPTS

    tokenizer = p3.AutoTokenizer.from_pretrained(FOLDER)
    input_ids = tokenizer(NOTEBOOK_PROMPTS["next_token"], return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        token_id = model.lm_head(model.model(input_ids))[0, -1].argmax(-1)
    assert tokenizer.decode(token_id) == "Harvard"
