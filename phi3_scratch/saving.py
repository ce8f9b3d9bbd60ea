"""Saving a model or a tokenizer: whole files, renamed into place, in an order that never mixes two.

A model save writes three files:
- config.json, in the official format, with its "quantization";
- generation_config.json, with the stop ids;
- model.safetensors, every weight (a tied head once; a quantized matrix as its integers and scales).

Each is written under a hidden temporary name in the same folder, flushed to disk, then renamed.
A rename is atomic: a reader sees the old file or the new one, never half of one.

Three renames are still three moments, so a save interrupted between two could leave a mix.
A record says what belongs together:
- every save draws a save id;
- the id goes into model.safetensors' metadata, config.json and generation_config.json (SAVE_KEY);
- the loader refuses weights that carry an id unless both JSON files carry the same one.

Weights without an id (written by transformers, or anything else) load as always.
The renames run in this order, and after each the folder loads the old model, the new one, or
is refused as incomplete:

    1. model.safetensors          an old index still wins: old model; else old config: refused
    2. the old index is removed   the old config does not carry the new id: refused
    3. generation_config.json     refused, until
    4. config.json                the new model
    5. the old shards are removed they were unreachable since step 2

Nothing else in the folder is touched: tokenizer files, a README and the user's files stay.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

from safetensors import SafetensorError

from .errors import Phi3Error

SAVE_KEY = "phi3_scratch_save"  # the save id, in config.json, generation_config.json and the weights
INDEX = "model.safetensors.index.json"
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # the shard names transformers and the hub use
TEMP_PREFIX = ".phi3_scratch-"  # our temporary files: hidden, and recognisable after a killed save
TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")


def save_model(model, folder: str | Path) -> None:
    """Write the model's checkpoint into `folder`, replacing whatever checkpoint was there."""
    from safetensors.torch import save_file

    folder = writable_folder(folder, "save_pretrained")
    save = uuid.uuid4().hex
    config = model.config
    settings = config.to_dict()
    settings["torch_dtype"] = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")  # as saved
    generation = {"eos_token_id": config.stop_token_ids, "bos_token_id": config.bos_token_id,
                  "pad_token_id": config.pad_token_id, **config.generation_defaults}
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the embedding, stored once
    stale = old_weight_files(folder)  # read before anything changes

    def weights(path: Path) -> None:
        save_file(state, str(path), metadata={SAVE_KEY: save})
        fsync(path)

    temps = write_all(folder, {
        "model.safetensors": weights,
        "generation_config.json": json_writer({**generation, SAVE_KEY: save}),
        "config.json": json_writer({**settings, SAVE_KEY: save}),
    })
    os.replace(temps["model.safetensors"], folder / "model.safetensors")
    remove(folder / INDEX)
    os.replace(temps["generation_config.json"], folder / "generation_config.json")
    os.replace(temps["config.json"], folder / "config.json")
    for name in stale:
        remove(folder / name)
    sync_folder(folder)


def save_tokenizer(files: dict[str, bytes], folder: str | Path) -> None:
    """Write a tokenizer's files into `folder`; other tokenizer files there are removed.

    A tokenizer.json left from another tokenizer would win in transformers: so it goes.
    """
    folder = writable_folder(folder, "Tokenizer.save_pretrained")
    temps = write_all(folder, {name: bytes_writer(data) for name, data in files.items()})
    for name, temp in temps.items():
        os.replace(temp, folder / name)
    for name in set(TOKENIZER_NAMES) - set(files):
        remove(folder / name)
    sync_folder(folder)


# ------------------------------------------------------------------------------ file helpers


def writable_folder(folder, where: str) -> Path:
    """`folder` as a Path, made if missing; a Phi3Error if it is a file or cannot be made."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise Phi3Error(f"{where}: {folder} is a file; expected a folder to write the files into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Phi3Error(f"{where}: the folder {folder} cannot be made ({e.strerror or e})") from None
    for stale in folder.glob(TEMP_PREFIX + "*"):  # left by a save that was killed
        remove(stale)
    return folder


def write_all(folder: Path, writers: dict) -> dict[str, Path]:
    """Each file written and flushed under a temporary name: {final name: temporary path}.

    If any write fails (no permission, a full disk), every temporary file goes and nothing changed.
    """
    temps = {}
    try:
        for name, write in writers.items():
            temps[name] = folder / f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}"
            write(temps[name])
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        for temp in temps.values():
            remove(temp)
        raise Phi3Error(f"could not write {folder / name} ({getattr(e, 'strerror', None) or e}); "
                        f"the folder {folder} is as it was") from None
    return temps


def json_writer(data: dict):
    return bytes_writer((json.dumps(data, indent=2) + "\n").encode())


def bytes_writer(data: bytes):
    def write(path: Path) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return write


def fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def sync_folder(folder: Path) -> None:
    """Flush the folder's entries too: the renames themselves survive a power cut."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # some systems cannot open a folder; the files themselves are flushed
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def old_weight_files(folder: Path) -> list[str]:
    """Shards that only an index could reach: those the index names, and stray ones of the hub's names."""
    named = []
    if (folder / INDEX).is_file():
        try:
            named = list(json.loads((folder / INDEX).read_text()).get("weight_map", {}).values())
        except (ValueError, AttributeError, OSError):
            named = []  # an unreadable index: only the standard names below go
    stray = [p.name for p in folder.iterdir() if SHARD.fullmatch(p.name)]
    return sorted({name for name in named + stray if isinstance(name, str) and "/" not in name
                   and name != "model.safetensors" and name.endswith(".safetensors")})


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
