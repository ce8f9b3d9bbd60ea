"""Attention pictures: the maps are the trace's probabilities, and the figure draws exactly them."""

import sys

import numpy as np
import pytest
import torch

import phi3_scratch as p3
from phi3_scratch.plotting import attention_figure, attention_maps, save_attention_png
from phi3_scratch.tracing import trace

T = 12  # longer than tiny-window's sliding window of 8, so the band shows


@pytest.fixture(scope="module")
def traced(checkpoints):
    """(trace, labels) of one 12-token forward through tiny-window (2 layers, 4 heads, window 8)."""
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    ids = torch.randint(3, 256, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), trace(model) as t:
        model(ids)
    return t, [f"t{i}" for i in ids[1].tolist()]


def drawn(fig) -> list[torch.Tensor]:
    """The matrix each heatmap holds, in grid order (the colorbar's axes hold no image)."""
    return [torch.from_numpy(np.asarray(ax.images[0].get_array())) for ax in fig.axes if ax.images]


def test_one_head_is_the_traced_probabilities_causal_rows_summing_to_one(traced):
    t, _ = traced
    [(title, m)] = attention_maps(t, layer=1, head=3, row=1)
    assert title == "layer 1, head 3"
    assert m.dtype == torch.float32 and m.device.type == "cpu" and m.shape == (T, T)
    assert torch.equal(m, t["layers.1.attn_probs"][1, 3])
    torch.testing.assert_close(m.sum(-1), torch.ones(T))
    assert (m.triu(1) == 0).all(), "a query sees no later key"
    assert (m.tril(-8) == 0).all(), "nor a key 8 or more positions back (sliding window 8)"


def test_every_head_of_a_layer_and_every_layers_head_mean(traced):
    t, _ = traced
    heads = attention_maps(t, layer=0)
    assert [title for title, _ in heads] == [f"layer 0, head {h}" for h in range(4)]
    for h, (_, m) in enumerate(heads):
        assert torch.equal(m, t["layers.0.attn_probs"][0, h])
        torch.testing.assert_close(m.sum(-1), torch.ones(T))
        assert (m.triu(1) == 0).all()
    means = attention_maps(t, layer="all")
    assert [title for title, _ in means] == ["layer 0, mean of 4 heads", "layer 1, mean of 4 heads"]
    for i, (_, m) in enumerate(means):
        torch.testing.assert_close(m, t.layers[i]["attn_probs"][0].mean(0))
        torch.testing.assert_close(m.sum(-1), torch.ones(T))


def test_figure_draws_exactly_the_maps_and_the_png_is_figsize_times_dpi(traced, tmp_path):
    t, labels = traced
    maps = attention_maps(t, layer=1, row=1)
    fig = attention_figure(maps, labels, labels)
    images = drawn(fig)
    assert len(images) == len(maps) == 4
    for (title, m), image, ax in zip(maps, images, [ax for ax in fig.axes if ax.images]):
        assert torch.equal(image, m) and ax.get_title() == title
        assert ax.images[0].get_cmap().name == "viridis" and ax.images[0].get_clim() == (0.0, 1.0)
        assert [x.get_text() for x in ax.get_xticklabels()] == labels
    w_in, h_in = fig.get_size_inches()
    assert w_in <= 20 and h_in <= 20
    out = tmp_path / "new" / "folder" / "heads.png"
    size = save_attention_png(fig, out, dpi=50)
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert size == (round(w_in * 50), round(h_in * 50))
    import matplotlib.image

    assert matplotlib.image.imread(out).shape[:2] == (size[1], size[0])


def test_all_layers_grid_and_long_sequences_label_every_kth_token(traced):
    t, labels = traced
    fig = attention_figure(attention_maps(t, layer="all"), labels, labels, width_in=6)
    assert len(drawn(fig)) == 2 and fig.get_size_inches()[0] == 6
    # 100 tokens: at most 40 labels per axis, every 3rd one.
    many = [f"w{i}" for i in range(100)]
    fig = attention_figure([("uniform", torch.full((100, 100), 0.01))], many, many)
    ax = fig.axes[0]
    assert [x.get_text() for x in ax.get_xticklabels()] == many[::3]
    assert len(ax.get_yticklabels()) == 34


@pytest.mark.parametrize("args, message", [
    (dict(layer=2), r"layer must be an integer in 0\.\.1, got 2"),
    (dict(layer=-1), r"layer must be an integer in 0\.\.1, got -1"),
    (dict(layer="last"), r"layer must be an integer in 0\.\.1 or 'all', got 'last'"),
    (dict(layer=0, head=4), r"head must be an integer in 0\.\.3, got 4"),
    (dict(layer="all", head=0), r"head must be None when layer='all'.*got 0"),
    (dict(layer=0, row=2), r"row must be an integer in 0\.\.1, got 2"),
])
def test_bad_layer_head_or_row(traced, args, message):
    with pytest.raises(p3.Phi3Error, match=message):
        attention_maps(traced[0], **args)


def test_bad_labels_and_output_paths(traced, tmp_path):
    t, labels = traced
    maps = attention_maps(t, layer=0, head=0)
    with pytest.raises(p3.Phi3Error,
                       match=r"must have shape \(len\(query_labels\), len\(key_labels\)\) = \(11, 12\), got "
                             r"\(12, 12\)"):
        attention_figure(maps, labels[:11], labels)
    fig = attention_figure(maps, labels, labels)
    with pytest.raises(p3.Phi3Error,
                       match=r"out must be a file name ending in \.png \(attention.png, say\), got "
                             r"'.*heads\.jpg'"):
        save_attention_png(fig, tmp_path / "heads.jpg")
    with pytest.raises(p3.Phi3Error, match=r"ending in \.png \(attention.png, say\), got '.png'"):
        save_attention_png(fig, ".png")  # a hidden file with no name before its suffix
    for width in (float("inf"), 1e6, True, 0):
        with pytest.raises(p3.Phi3Error, match=r"width_in must be a number of inches in \(0, 100\] or None"):
            attention_figure(maps, labels, labels, width_in=width)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(p3.Phi3Error, match=r"cannot write the attention picture '.*a_file/sub/heads\.png'"):
        save_attention_png(fig, tmp_path / "a_file" / "sub" / "heads.png")


def test_without_matplotlib_the_error_says_how_to_install_it(traced, monkeypatch):
    t, labels = traced
    maps = attention_maps(t, layer=0, head=0)  # needs torch only
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    with pytest.raises(p3.Phi3Error,
                       match=r"attention pictures need matplotlib: pip install 'phi3-scratch\[plot\]' \(or "
                             r"pip install matplotlib\)"):
        attention_figure(maps, labels, labels)


def test_dollar_signs_in_token_labels_are_drawn_as_text(tmp_path):
    """The real Phi-3 vocabulary has "$$" pieces; matplotlib would read them as mathtext."""
    from phi3_scratch.plotting import attention_figure, save_attention_png

    matrix = torch.tril(torch.ones(3, 3)) / torch.arange(1, 4)[:, None]
    fig = attention_figure([("t", matrix)], ["$$", "▁pay", "$"], ["$$", "▁pay", "$"])
    assert save_attention_png(fig, tmp_path / "dollars.png")[0] > 0
