"""Loading a checkpoint: from a folder or a Hugging Face repo id, straight onto the device.

The steps, and why:
1. Find the folder. A local path is used as it is; "tiny" is the small model that ships inside
   this package (data/tiny, made by scripts/train_tiny.py); otherwise the name is a Hugging Face
   repo id, and huggingface-hub downloads only the files this project reads (config, generation
   config, safetensors, tokenizer), into its usual cache.
2. Read config.json (both on-disk formats, see config.py).
3. Build the model on the "meta" device: every parameter has a shape and a dtype but no storage,
   so building a 14B model costs no memory at all.
4. Open each safetensors file memory-mapped. For each tensor:
   - check its name and shape against the model;
   - move it to the target device and dtype;
   - check that it holds no NaN or infinity (its smallest and largest values tell);
   - put it in place.
   The only copy that ever exists is the final one.
   On the CPU with an unchanged dtype, the parameter even stays a view of the mapped file.

Only safetensors are read. They hold raw numbers and a JSON header: loading one cannot run code,
unlike the pickle files (`pytorch_model.bin`) that older checkpoints ship, which are refused.
Nothing outside the checkpoint folder is read, whatever file names its index holds.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path, PurePath

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import Phi3Config, read_json
from .errors import Phi3Error, warn
from .checks import check_attention_kernel
from .quantize import check_method, method_to_load, quantized_names, swap_in, use_quantized_modules
from .saving import SAVE_KEY

HUB_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
]
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TINY = Path(__file__).parent / "data" / "tiny"  # `--model tiny`: see scripts/train_tiny.py


TOKENIZER_FILES = [f for f in HUB_FILES if "safetensors" not in f]
CONFIG_FILES = ["config.json", "generation_config.json"]


def resolve_checkpoint(path_or_repo_id: str | Path, files: list[str] = HUB_FILES,
                       what: str = "checkpoint folder") -> Path:
    """A local folder as it is, or the local snapshot of a Hugging Face repo (downloaded if needed).

    `files`: the name patterns to download (the tokenizer asks for TOKENIZER_FILES: no weights).
    `what`: the folder's name in an error ("tokenizer folder" for the tokenizer).
    """
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise Phi3Error(f"expected a checkpoint folder, a Hugging Face repo id or 'tiny' (a str or path), "
                        f"got {type(path_or_repo_id).__name__}")
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if name == "tiny":
        return TINY
    if path.exists():
        raise Phi3Error(f"{name} is a file; expected a {what} or a repo id")
    if not REPO_ID.match(name):
        raise Phi3Error(f"{what} {name} not found (and it is not a Hugging Face repo id like 'org/name')")
    return _download(name, files)


def _download(repo_id: str, files: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=files))
    except RepositoryNotFoundError:
        raise Phi3Error(
            f"{repo_id!r} is neither a local folder nor a Hugging Face repo that can be read "
            "(check the name, or log in with `hf auth login` for a gated repo)"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise Phi3Error(
            f"there is no local folder {repo_id!r}, and it could not be downloaded as a Hugging Face repo "
            f"({type(e).__name__}): no network, or offline mode, and no complete copy in the local cache. "
            "Download it on a machine with a network (`hf download " + repo_id + "`) and pass the local "
            "folder instead, e.g. from_pretrained('/path/to/" + repo_id.split("/")[-1] + "')"
        ) from None


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise Phi3Error(f"device {device!r} is not a torch device; "
                        "expected 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise Phi3Error(f"device {str(device)!r} is not supported; expected 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Phi3Error(
            f"device {str(device)!r} was asked for, but this machine has no CUDA GPU that torch can use "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); use device='cpu'"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise Phi3Error(
            f"device {str(device)!r} was asked for, but this machine has no Apple GPU that torch can use "
            f"(torch {torch.__version__}, torch.backends.mps.is_available() is False); use device='cpu'"
        )
    return device


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device,
                  checkpoint_dtype: torch.dtype) -> torch.dtype:
    """None means the checkpoint's own dtype (bf16 for Phi-3) on a GPU and float32 on the CPU; "auto",
    as transformers' torch_dtype="auto", the checkpoint's own dtype everywhere."""
    if dtype is None:
        return checkpoint_dtype if device.type in ("cuda", "mps") else torch.float32
    if dtype == "auto":
        return checkpoint_dtype
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise Phi3Error(f"dtype {dtype!r} is not supported; "
                    f"expected one of {sorted(DTYPES)}, 'auto' or a torch float dtype")


def weight_files(folder: Path) -> list[str]:
    """The checkpoint's safetensors files: the shards its index names, or model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:  # TypeError: a JSON list, not an object
            raise Phi3Error(f"{index} is not a safetensors index "
                            f"(expected an object with a 'weight_map'): {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise Phi3Error(f"{index}: weight_map must map tensor names to shard file names, "
                            f"got {weight_map!r:.200}")
        files = sorted(set(weight_map.values()))
        if not files:
            raise Phi3Error(f"{index} names no shard: its weight_map is empty")
        for file in files:
            parts = PurePath(file).parts
            if not parts or PurePath(file).is_absolute() or ".." in parts:
                raise Phi3Error(f"{index} names the shard {file!r}, which is outside the checkpoint folder; "
                                "expected a file name inside it, like 'model-00001-of-00002.safetensors'")
            if not (folder / file).is_file():
                raise Phi3Error(f"shard {folder / file} is named in {index} but is missing")
        return files
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles:
        raise Phi3Error(
            f"{folder} holds only pickle weights ({', '.join(pickles)}). phi3_scratch loads safetensors "
            "only, because unpickling a checkpoint can run arbitrary code. Convert it once in a trusted "
            "environment (load it with transformers, then save_pretrained(..., safe_serialization=True))"
        )
    raise Phi3Error(f"{folder} has no model.safetensors or model.safetensors.index.json")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise Phi3Error(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def check_save_record(folder: Path, weight_files: list[str]) -> None:
    """Refuse a checkpoint whose files come from different saves (an interrupted save_pretrained).

    Weights that carry no save id are not checked: transformers and the hub write none.
    """
    ids = set()
    for name in weight_files:
        with _open(folder / name) as f:
            ids.add((f.metadata() or {}).get(SAVE_KEY))
    saved = ids - {None}
    if not saved:
        return
    records = {name: read_json(folder / name).get(SAVE_KEY)
               for name in ("config.json", "generation_config.json") if (folder / name).is_file()}
    if len(ids) > 1 or any(record not in saved for record in records.values()):
        found = ", ".join(f"{name} {record or 'none'}" for name, record in records.items())
        raise Phi3Error(f"checkpoint {folder} is incomplete: "
                        f"its weights are from save {'/'.join(sorted(saved))}, "
                        f"but the save ids of {found} differ. A save_pretrained was interrupted: save again")


def checkpoint_dtype(folder: Path, files: list[str]) -> torch.dtype:
    """The dtype of the checkpoint's first floating-point tensor (a quantized checkpoint's are its scales)."""
    first = folder / files[0]
    with _open(first) as f:
        names = list(f.keys())
        codes = [(name, f.get_slice(name).get_dtype()) for name in names]
    for name, code in codes:
        if code in ("I8", "U8"):  # a quantized checkpoint's int8 or packed int4 weights
            continue
        if code not in SAFETENSORS_DTYPES:
            raise Phi3Error(f"{first}: tensor {name} has dtype {code}; expected one of "
                            f"{sorted(SAFETENSORS_DTYPES)} (or I8/U8, in a quantized checkpoint)")
        return SAFETENSORS_DTYPES[code]
    return torch.float32


def load_model(cls, path_or_repo_id, device="cpu", dtype=None, progress=None, attention="eager",
               quantize=None) -> nn.Module:
    """progress, if given, is called as progress(tensors_done, tensors_total) after each tensor;
    attention is "eager" or "sdpa" (Phi3ForCausalLM.set_attention); quantize "int8" or "int4" quantizes each
    matrix as it is loaded (quantize.py), so the full-precision weights never all exist at once."""
    check_attention_kernel(attention)  # before minutes of loading
    check_method(quantize)
    if progress is not None and not callable(progress):
        raise Phi3Error(f"progress must be a function progress(done, total) or None, got {progress!r:.60}")
    device = resolve_device(device)
    folder = resolve_checkpoint(path_or_repo_id)
    config = Phi3Config.from_pretrained(folder)
    files = weight_files(folder)
    check_save_record(folder, files)  # an interrupted save_pretrained is refused, not half loaded
    dtype = resolve_dtype(dtype, device, checkpoint_dtype(folder, files))
    saved = config.quantization  # a checkpoint saved quantized holds integer weights and their scales
    quantize = method_to_load(quantize, saved, folder)

    with torch.device("meta"):
        model = cls(config)  # shapes only, no storage
        if quantize:
            use_quantized_modules(model, quantize, dtype)
    to_quantize = {f"{name}.weight" for name in quantized_names(model)} if quantize and not saved else set()
    expected = {name: p.shape for name, p in model.named_parameters()}  # tied lm_head appears once
    for name in to_quantize:  # the file holds the full matrix (out, in), not the quantized module's tensors
        module_name = name.removesuffix(".weight")
        module = model.get_submodule(module_name)
        for param_name, _ in module.named_parameters():
            del expected[f"{module_name}.{param_name}"]
        expected[name] = (module.out_features, module.in_features)
    loaded: set[str] = set()
    stored_head = None  # a tied checkpoint's own copy of the head, if it has one: compared at the end
    total = len(expected)
    for file in files:
        path = folder / file
        with _open(path) as f:
            names = list(f.keys())
        for name in names:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                # Some exports store the tied head too (Phi-4-mini): see keep_a_different_head.
                stored_head = path
                continue
            if name not in expected:
                raise Phi3Error(f"{path}: unexpected tensor {name!r}, "
                                "which a Phi-3 model with this config does not have")
            if name in loaded:  # which copy is meant? refuse rather than let the later file win
                raise Phi3Error(f"{path}: tensor {name!r} was already loaded "
                                "from another file of this checkpoint")
            # The file is opened (memory-mapped) again for each tensor: once the tensor is on the
            # GPU, closing the file takes its pages out of this process, so host memory holds
            # about one tensor at a time, not a whole shard.
            with _open(path) as f:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(expected[name]):
                    raise Phi3Error(
                        f"{path}: tensor {name!r} has shape {shape}, "
                        f"but config.json implies {tuple(expected[name])}"
                    )
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError) as e:
                    raise Phi3Error(f"{path}: tensor {name!r} could not be read "
                                    f"(truncated file?): {e}") from None
            # Floating point becomes the model's dtype; a saved quantized model's integers stay as they are.
            # The meta model's dtype: int8 or uint8 where integers go.
            meta_dtype = model.get_parameter(name).dtype
            want = dtype if meta_dtype.is_floating_point or name in to_quantize else meta_dtype
            if tensor.dtype != want and not (tensor.is_floating_point() and want.is_floating_point):
                quantization = f" (quantization: {saved})" if saved else ""
                raise Phi3Error(f"{path}: tensor {name!r} has dtype {tensor.dtype}, "
                                f"but config.json{quantization} implies {want}")
            placed = tensor.to(device=device, dtype=want)
            check_finite(placed, path, name, tensor.dtype)
            del tensor  # on a GPU load: the host copy goes now
            if name in to_quantize:  # quantized on the device; the full-precision matrix goes at once
                model.get_submodule(name.removesuffix(".weight")).set_weight(placed)
            else:
                set_parameter(model, name, placed)
            del placed
            loaded.add(name)
            if progress:
                progress(len(loaded), total)
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise Phi3Error(f"checkpoint {folder} is missing {len(missing)} tensor(s): {shown}")

    finish_meta_model(model, device)
    if stored_head is not None:
        keep_a_different_head(model, stored_head, dtype, quantize)
    config.quantization = quantize
    return model.set_attention(attention).eval()


def check_finite(tensor: torch.Tensor, path: Path, name: str, stored: torch.dtype) -> None:
    """Refuse a weight holding NaN or infinity (a damaged file, or a value too large for the dtype it
    was converted to): every logit would be NaN, and greedy decoding would repeat token 0 without a
    word. Its smallest and largest values carry a NaN or an infinity if it has one: one read."""
    if not tensor.is_floating_point():
        return
    lo, hi = torch.stack([tensor.amin(), tensor.amax()]).float().tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        converted = "" if tensor.dtype == stored else \
            f" once converted from {stored} to {tensor.dtype} (largest {torch.finfo(tensor.dtype).max:g})"
        raise Phi3Error(f"{path}: tensor {name!r} holds NaN or infinite values{converted}: "
                        f"min {lo}, max {hi}")


def keep_a_different_head(model: nn.Module, path: Path, dtype: torch.dtype, quantize: str | None) -> None:
    """A checkpoint whose config ties the head to the embedding but which also stores lm_head.weight.

    A copy equal to the embedding changes nothing: the head stays tied. A different one (a fine-tune
    saved without untying its config, say) is the head the checkpoint was trained with: it is used,
    untied, with a warning, as transformers does. Compared block by block, so that no second copy
    of a 200,064-row embedding (Phi-4-mini) is ever made on the device.
    """
    embedding = model.model.embed_tokens.weight  # (V, H), loaded
    with _open(path) as f:
        head = f.get_slice("lm_head.weight")
        shape = tuple(head.get_shape())
        if shape != tuple(embedding.shape):
            raise Phi3Error(f"{path}: tensor 'lm_head.weight' has shape {shape}, but config.json implies "
                            f"{tuple(embedding.shape)}")
        rows = 4096
        if all(torch.equal(head[i : i + rows].to(embedding.device, embedding.dtype), embedding[i : i + rows])
               for i in range(0, shape[0], rows)):
            return
        stored = f.get_tensor("lm_head.weight")
    tensor = stored.to(device=embedding.device, dtype=dtype)
    check_finite(tensor, path, "lm_head.weight", stored.dtype)  # as every other tensor is checked
    del stored
    warn(f"{path}: config.json ties the head to the embedding (tie_word_embeddings), "
         f"but this checkpoint also stores an lm_head.weight that differs from it: "
         f"the stored head is used, untied, as in transformers")
    model.config.tie_word_embeddings = False
    if quantize:  # an untied head is quantized like the layers' matrices (quantize.quantized_names)
        swap_in(model, "lm_head", quantize, dtype)[1].set_weight(tensor)
    else:
        set_parameter(model, "lm_head.weight", tensor)


def finish_meta_model(model: nn.Module, device: torch.device) -> None:
    """What a model built on the meta device still needs once set_parameter has given it every
    weight: a tied head pointed at the embedding again, and the rotary tables (computed, not loaded)
    made on the device."""
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config, device=device)


def set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make `tensor` itself (no copy) the parameter called `name`,
    e.g. model.layers.0.mlp.down_proj.weight."""
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight as loaded (a quantized matrix counts its integers, scales and offsets)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
