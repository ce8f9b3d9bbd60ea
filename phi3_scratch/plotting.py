"""Attention heatmaps: what each query token looked at, drawn from a trace.

    with p3.trace(model) as t:
        model(input_ids)
    maps = attention_maps(t, layer=2)               # one (T, S) matrix per head of layer 2
    fig = attention_figure(maps, tokens, tokens)    # one heatmap per map, in a grid
    save_attention_png(fig, "attention/layer2.png")

How to read one heatmap:
- Row q is a query: the token whose new vector is being computed. Column k is a key: a token it
  may read from. The colour of cell (q, k) is softmax(q . k / sqrt(hd))[k], the share of token k's
  value vector that goes into token q's output. Each row is a probability distribution: it sums
  to 1, so a row with one bright cell reads one token, and a dim row spreads over many.
- The causal triangle: a token never sees the future, so everything above the diagonal is 0
  (dark). Row 0 can only look at itself and is always one bright cell. With a KV cache the rows
  are the new tokens only and the columns are every cached token plus the new ones (S > T), so
  the triangle is shifted right by the cache length.
- The sliding window band (Phi-3-mini-4k, window W): query q sees only keys q-W+1..q.
  Once the sequence is longer than W, the bright area is a band of width W along the diagonal,
  with zeros to its lower left as well.
- GQA heads: with 8 query heads over 4 kv heads, query heads h and h' with h // 2 == h' // 2 read
  the same keys. Their maps still differ, because their queries differ, but they often look alike.
- Common patterns:
  - a bright first column: an "attention sink", spare probability parked on the first token;
  - a bright diagonal: the token itself; the diagonal just below it: the previous token;
  - stripes down a column: a token many queries come back to.

Colours: every map uses one fixed scale, 0 (dark) to 1 (yellow), with one shared colorbar, also
for the mean of a layer's heads (itself a distribution per row: the mean of rows that sum to 1
sums to 1). The same colour therefore means the same probability in every panel, at the price of
diffuse rows looking uniformly dark.

matplotlib is optional (pip install 'phi3-scratch[plot]') and imported only when a figure is made.
Figures are drawn with matplotlib.figure.Figure on an Agg canvas, never through pyplot, so no
window opens and the backend a user has chosen is left alone.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import Phi3Error, is_integer, is_number

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_LABELS = 40  # at most this many token labels per axis; longer sequences label every k-th token
MAX_SIDE_IN = 20.0  # figure size bound, inches, each side
MAX_WIDTH_IN = 100.0  # the largest width_in a caller may ask for (10,000 pixels at 100 dpi)


def need_matplotlib():
    """matplotlib's Figure and Agg canvas classes, imported on first use, or the install message."""
    try:
        import matplotlib  # noqa: F401  (fails first, and clearly, when matplotlib is absent)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise Phi3Error("attention pictures need matplotlib: pip install 'phi3-scratch[plot]' "
                        "(or pip install matplotlib)") from e
    return Figure, FigureCanvasAgg


def _check_index(name: str, value, count: int) -> int:
    if not is_integer(value) or not 0 <= value < count:
        raise Phi3Error(f"{name} must be an integer in 0..{count - 1}, got {value!r}")
    return value


def attention_maps(t, layer: int | str, head: int | None = None,
                   row: int = 0) -> list[tuple[str, torch.Tensor]]:
    """(title, probabilities (T, S) fp32 on the CPU) for each map to draw, from batch row `row`.

    layer=i, head=h: that head alone; layer=i, head=None: every head of layer i;
    layer="all": one map per layer, the mean over its heads.
    """
    num_layers = len(t.layers)
    if layer == "all":
        if head is not None:
            raise Phi3Error("head must be None when layer='all' (each map is the mean of a layer's heads), "
                            f"got {head!r}")
        layers = list(range(num_layers))
    else:
        if isinstance(layer, str):
            raise Phi3Error(f"layer must be an integer in 0..{num_layers - 1} or 'all', got {layer!r}")
        layers = [_check_index("layer", layer, num_layers)]
    maps = []
    for i in layers:
        probs = t.layers[i].get("attn_probs")  # (B, nH, T, S)
        if probs is None:
            raise Phi3Error(f"the trace holds no attn_probs for layer {i}: "
                            "run the model inside `with trace(model)` "
                            f"(a trace made with only=... keeps them if 'attn_probs' is among its names)")
        probs = probs.detach().to(device="cpu", dtype=torch.float32, copy=True)
        b = _check_index("row", row, probs.shape[0])
        if layer == "all":
            maps.append((f"layer {i}, mean of {probs.shape[1]} heads", probs[b].mean(0)))  # (T, S)
        elif head is None:
            maps += [(f"layer {i}, head {h}", probs[b, h]) for h in range(probs.shape[1])]
        else:
            h = _check_index("head", head, probs.shape[1])
            maps.append((f"layer {i}, head {h}", probs[b, h]))
    return maps


def _ticks(labels: list[str]) -> tuple[list[int], list[str]]:
    """Every label, or every k-th one when there are more than MAX_LABELS."""
    step = math.ceil(len(labels) / MAX_LABELS)
    positions = list(range(0, len(labels), step))
    return positions, [labels[p].replace("$", r"\$") for p in positions]  # "$$" would start mathtext


def _quarter(inches: float) -> float:
    """Rounded to a quarter inch (exact in binary, so inches * dpi is a whole number of pixels)."""
    return max(1.0, round(inches * 4) / 4)


def attention_figure(maps: list[tuple[str, torch.Tensor]], query_labels: list[str], key_labels: list[str],
                     width_in: float | None = None) -> Figure:
    """One heatmap per map (x = keys, y = queries) in a grid of ceil(sqrt(n)) columns, one colorbar.

    The size grows with the number of maps and tokens, at most MAX_SIDE_IN inches a side; width_in
    sets the width and scales the height with it. Chosen sizes are whole quarter inches, so the
    PNG is exactly figsize * dpi pixels.
    """
    Figure, FigureCanvasAgg = need_matplotlib()
    if not maps:
        raise Phi3Error("maps must hold at least one (title, matrix) pair, got an empty list")
    T, S = len(query_labels), len(key_labels)
    for title, matrix in maps:
        if tuple(matrix.shape) != (T, S):
            raise Phi3Error(f"map {title!r} must have shape (len(query_labels), len(key_labels)) = {(T, S)}, "
                            f"got {tuple(matrix.shape)}")
    if width_in is not None and not (is_number(width_in) and 0 < width_in <= MAX_WIDTH_IN):
        raise Phi3Error(f"width_in must be a number of inches in (0, {MAX_WIDTH_IN:g}] or None, "
                        f"got {width_in!r}")

    cols = math.ceil(math.sqrt(len(maps)))
    rows = math.ceil(len(maps) / cols)
    panel_w = min(max(0.25 * S + 1.5, 3.0), 8.0)  # inches: a quarter inch per token plus room for labels
    panel_h = min(max(0.25 * T + 1.5, 3.0), 8.0)
    width, height = cols * panel_w + 1.0, rows * panel_h + 0.5  # + the colorbar, + the shared axis labels
    scale = min(1.0, MAX_SIDE_IN / width, MAX_SIDE_IN / height) if width_in is None else width_in / width
    figsize = (_quarter(width * scale) if width_in is None else float(width_in), _quarter(height * scale))

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: savefig renders with Agg, no pyplot involved
    x_pos, x_text = _ticks(key_labels)
    y_pos, y_text = _ticks(query_labels)
    axes = []
    for n, (title, matrix) in enumerate(maps):
        ax = fig.add_subplot(rows, cols, n + 1)
        image = ax.imshow(matrix.detach().float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0,
                          interpolation="nearest", aspect="auto")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x_pos, x_text, rotation=90, fontsize=7)
        ax.set_yticks(y_pos, y_text, fontsize=7)
        axes.append(ax)
    fig.colorbar(image, ax=axes, label="attention probability", shrink=0.9)
    fig.supxlabel("key: the token read from", fontsize=9)
    fig.supylabel("query: the token reading", fontsize=9)
    return fig


def check_png_path(out: str | Path, name: str = "out") -> Path:
    """`out` as a Path, if it names a .png file (checked before anything is computed, by the CLI too,
    which calls it --out)."""
    path = Path(out)
    if path.suffix.lower() != ".png" or not path.stem:
        raise Phi3Error(f"the attention picture is written as PNG: {name} must be a file name ending in .png "
                        f"(attention.png, say), got {str(out)!r}")
    return path


def save_attention_png(fig: Figure, out: str | Path, dpi: int = 100) -> tuple[int, int]:
    """Write `fig` as a PNG at `out` (making its folder) and return the file's (width, height) in pixels."""
    out = check_png_path(out)
    if not is_integer(dpi) or dpi <= 0:
        raise Phi3Error(f"dpi must be a positive integer, got {dpi!r}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi, format="png")
    except OSError as e:
        raise Phi3Error(f"cannot write the attention picture {str(out)!r}: {e.strerror or e}") from e
    # A PNG starts with an 8-byte signature, then the IHDR chunk: length, b"IHDR", width, height.
    with out.open("rb") as f:
        header = f.read(24)
    if header[12:16] != b"IHDR":
        raise Phi3Error(f"{str(out)!r} was written but is not a PNG (no IHDR chunk at byte 12)")
    width, height = struct.unpack(">II", header[16:24])
    return width, height
