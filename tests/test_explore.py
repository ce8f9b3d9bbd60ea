"""The explore view and the live server, opened in a real browser (headless Chromium, driven by playwright).

- The numbers on the page are the model's: each is read back from the page and compared with the
  tensor the test computes itself (a trace, the logits, the logit lens, p3.intervene).
- No console errors, and no request beyond the page (and, live, its own api/run).
- The controls change what is drawn.
Chromium is Debian's package (`apt-get install chromium`): playwright cannot download browsers here.
Without a browser, or without playwright, the browser tests skip and say which is missing.
"""

import json
import re
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import phi3_scratch as p3
from phi3_scratch.cli import main
from phi3_scratch.explore import explore_data
from phi3_scratch.serve import MAX_BODY, Explorer, make_server

from .conftest import SMALL_ORIGINAL_MAX, scaled_config

PROMPT = "What does the KV cache do?"


@pytest.fixture(scope="module")
def tiny():
    return p3.Phi3ForCausalLM.from_pretrained("tiny"), p3.Tokenizer.from_pretrained("tiny")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install playwright)")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("no Chromium on this machine (apt-get install -y --no-install-recommends chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable)
        yield chromium
        chromium.close()


def open_page(browser, url: str):
    """A page at `url`, with the console errors and the requests it makes recorded."""
    page = browser.new_page(viewport={"width": 1200, "height": 1600})
    page.errors, page.requests = [], []
    page.on("console", lambda m: m.type == "error" and page.errors.append(m.text))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(url)
    return page


def shown_percents(page, table: str) -> list[float]:
    cells = page.locator(f"#{table} tbody tr td:nth-child(4)").all_inner_texts()  # "12.34%"
    return [float(t.rstrip("%")) for t in cells]


class ByteTokenizer:
    """A stand-in tokenizer for the random-weight family models (vocabulary 256): one id a byte."""

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode(errors="replace")

    def id_to_piece(self, i):
        return chr(i) if 32 <= i < 127 else f"<{i}>"

    def apply_chat_template(self, messages):
        return messages[-1]["content"]


def family_model(name: str) -> p3.Phi3ForCausalLM:
    torch.manual_seed(0)
    return p3.Phi3ForCausalLM(p3.Phi3Config.from_dict(scaled_config(name))).eval()


def test_the_exported_file_shows_the_models_numbers(tiny, browser, tmp_path):
    model, tokenizer = tiny
    path = p3.explore(model, tokenizer, PROMPT, chat=True, name="tiny").save(tmp_path / "view.html")
    assert path.stat().st_size < 5_000_000
    page = open_page(browser, path.as_uri())
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]))
    x = torch.tensor([ids])
    with torch.no_grad(), p3.trace(model) as t:
        logits = model(x)[0, -1]
    # the tokens, the template's marked
    shown = [int(i) for i in page.locator("#tokens .tok").evaluate_all("els => els.map(e => e.dataset.id)")]
    assert shown == ids
    specials = page.locator("#tokens .tok.special").all_inner_texts()
    assert [s.split("\n")[0] for s in specials] == ["<|user|>", "<|end|>", "<|assistant|>"]
    # the next token's candidates: percent, as the model computes them
    probs = logits.softmax(-1)
    expected = [round(100 * p, 2) for p in probs.topk(10).values.tolist()]
    assert shown_percents(page, "next") == expected
    # attention: the drawn cells are the trace's probabilities; the controls redraw them
    page.select_option("#layer", "2")
    page.select_option("#head", "3")
    cells = page.locator("#attention rect").evaluate_all(
        "els => els.map(e => [+e.dataset.q, +e.dataset.k, +e.dataset.p])")
    probs = t["layers.2.attn_probs"][0, 3]
    assert len(cells) == len(ids) ** 2
    assert max(abs(probs[q, k].item() - p) for q, k, p in cells) < 1e-4
    page.select_option("#layer", "0")
    assert page.locator("#attention").get_attribute("data-layer") == "0"
    cells_0 = page.locator("#attention rect").evaluate_all("els => els.map(e => +e.dataset.p)")
    assert cells_0 != [p for _, _, p in cells]
    assert max(abs(a - b) for a, b in zip(cells_0, t["layers.0.attn_probs"][0, 3].flatten().tolist())) < 1e-4
    # the logit lens: p3.logit_lens's top token at each layer and position
    lens = p3.logit_lens(model, x, all_positions=True)[:, 0].softmax(-1).max(-1).values  # (L, T)
    shown = page.locator("#lens td").evaluate_all("els => els.map(e => [+e.dataset.layer, +e.dataset.pos, "
                                                  "+e.dataset.prob])")
    assert len(shown) == lens.numel() and max(abs(lens[i, j].item() - p) for i, j, p in shown) < 1e-4
    # the residual stream's norm, after the embedding and each layer
    norms = [t["embed"][0].norm(dim=-1).mean().item()] + \
        [t[f"layers.{i}.residual"][0].norm(dim=-1).mean().item() for i in range(len(model.model.layers))]
    dots = page.locator("#norms circle").evaluate_all("els => els.map(e => +e.dataset.norm)")
    assert max(abs(a - b) for a, b in zip(dots, norms)) < 2e-3 and len(dots) == len(norms)
    # Phi-3's own: the tiny model's window is longer than the prompt, GQA 4 over 2, full rotary
    phi3 = page.locator("#phi3").inner_text()
    assert "256 keys, itself included" in phi3 and "kv head 1 ← query heads 2, 3" in phi3
    assert "the first 32 of 32 channels" in phi3 and "not used: default RoPE" in phi3
    full = f"{len(ids) + 6} / {len(ids) + 6}"  # 6 greedy steps: the cache is full
    assert page.locator("#cache tbody tr").last.inner_text().split("\t")[3] == full
    assert page.errors == [] and page.requests == [path.as_uri()]


@pytest.mark.parametrize("tokens, in_use", [(SMALL_ORIGINAL_MAX - 12, "short"), (SMALL_ORIGINAL_MAX + 8,
                                                                                 "long")])
def test_longrope_and_partial_rotary_panels_on_a_scaled_down_phi4_mini(browser, tmp_path, tokens, in_use):
    model = family_model("Phi-4-mini-instruct")  # LongRoPE, partial rotary 0.75, GQA 3 query heads a kv head
    c = model.config
    view = p3.explore(model, ByteTokenizer(), "x" * tokens, steps=4)
    page = open_page(browser, view.save(tmp_path / "phi4.html").as_uri())
    rows = dict(zip(page.locator("#phi3 th").all_inner_texts(), page.locator("#phi3 td").all_inner_texts()))
    factors = c.rope_short_factor if in_use == "short" else c.rope_long_factor
    assert rows["LongRoPE"].startswith(f"{in_use} factors in use ({tokens} tokens")
    assert ", ".join(f"{round(f, 4):g}" for f in factors[:6]) in rows["LongRoPE"].replace(".0,", ",")
    assert rows["rotary"].startswith(f"the first {c.rotary_dim} of {c.head_dim} channels of each head rotate "
                                     "(75%)")
    groups = "kv head 0 ← query heads 0, 1, 2; kv head 1 ← query heads 3, 4, 5"
    assert rows["grouped-query attention"] == groups
    assert page.errors == []


def test_the_sliding_window_band_on_a_scaled_down_phi3_mini(browser, tmp_path):
    model = family_model("Phi-3-mini-4k-instruct")  # window 8 here
    view = p3.explore(model, ByteTokenizer(), "a prompt longer than the window")
    page = open_page(browser, view.save(tmp_path / "mini.html").as_uri())
    assert page.locator("#window-band").count() == 1
    assert "a query sees its last 8 keys" in page.locator("#attention-note").inner_text()
    cells = page.locator("#attention rect").evaluate_all("els => els.map(e => [+e.dataset.q, +e.dataset.k, "
                                                         "+e.dataset.p])")
    assert all(p == 0 for q, k, p in cells if k <= q - 8)  # outside the window
    assert all(p > 0 for q, k, p in cells if q - 8 < k <= q)


@pytest.fixture
def server(tiny):
    model, tokenizer = tiny
    explorer = Explorer(model, tokenizer, "tiny", PROMPT, chat=True)
    httpd = make_server(explorer, port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", explorer
    httpd.shutdown()
    httpd.server_close()


def post(url: str, body: bytes):
    request = urllib.request.Request(url + "api/run", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_live_page_ablates_a_head_and_shows_what_changes(tiny, browser, server):
    from playwright.sync_api import expect

    url, _ = server
    model, tokenizer = tiny
    page = open_page(browser, url)
    before = shown_percents(page, "next")
    page.select_option("#ablate-kind", "head")
    page.select_option("#ablate-layer", "1")
    page.select_option("#ablate-head", "2")
    page.click("#run")
    expect(page.locator("#status")).to_have_text(re.compile("^ablated"), timeout=60_000)
    ids = torch.tensor([tokenizer.encode(tokenizer.apply_chat_template([{"role": "user",
                                                                         "content": PROMPT}]))])
    with torch.no_grad(), p3.intervene(model, p3.ablate_head(1, 2)):
        probs = model(ids)[0, -1].softmax(-1)
        out = p3.generate(model, ids, 12, eos_token_id=[])
    after = shown_percents(page, "next")
    assert after == [round(100 * p, 2) for p in probs.topk(10).values.tolist()] and after != before
    assert json.loads(page.inner_text("#continuation")) == tokenizer.decode(out[0, ids.shape[1]:].tolist())
    assert page.errors == []
    page.fill("#prompt", "x" * 600)  # past the view's 128 tokens: refused, with the message shown
    page.select_option("#ablate-kind", "none")
    page.click("#run")
    expect(page.locator("#error")).to_have_text(re.compile("."), timeout=60_000)
    assert "a view takes 1.." in page.inner_text("#error")
    assert page.errors == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
    assert all(r.startswith(url) for r in page.requests) and url + "api/run" in page.requests


def test_bad_requests_get_a_4xx_and_the_server_goes_on(server):
    url, _ = server
    assert post(url, b"{not json")[0] == 400
    status, answer = post(url, json.dumps({"prompt": "hi", "ablate": {"kind": "head", "layer": 9,
                                                                      "head": 0}}).encode())
    assert status == 400 and answer["error"] == "ablate: layer 9: the model has 4 layers, 0..3"
    assert post(url, json.dumps({"prompt": "hi", "ablate": {"kind": "head", "layer": 0,
                                                            "head": 4}}).encode())[0] == 400
    assert post(url, json.dumps({"prompt": "x" * 900}).encode())[0] == 400
    assert post(url, json.dumps({"prompt": 3}).encode())[0] == 400
    assert post(url, json.dumps({"prompt": "hi", "temperature": 2}).encode()) == \
        (400, {"error": "unknown fields ['temperature']; expected prompt, chat and ablate"})
    assert post(url, b" " * (MAX_BODY + 1))[0] == 413
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url + "nothing-here", timeout=30)
    assert missing.value.code == 404
    status, answer = post(url, json.dumps({"prompt": "hi"}).encode())
    assert status == 200 and answer["view"]["prompt"] == "hi"  # still serving


def test_concurrent_requests_never_see_each_others_edits(server):
    url, explorer = server
    bodies = [{"prompt": "The KV cache"}, {"prompt": "The KV cache", "ablate": {"kind": "head", "layer": 0,
                                                                                "head": 1}},
              {"prompt": "The KV cache", "ablate": {"kind": "neuron", "layer": 2, "neuron": 5}}] * 3
    alone = [explorer.run(b) for b in bodies[:3]]  # one at a time, no server
    results = [None] * len(bodies)

    def ask(i):
        results[i] = post(url, json.dumps(bodies[i]).encode())[1]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, result in enumerate(results):
        assert result["view"]["next"] == alone[i % 3]["view"]["next"]
    assert alone[0]["view"]["next"] != alone[1]["view"]["next"]  # the ablation does change them
    assert explorer.model.model.probe is None


def test_explore_and_serve_on_the_command_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "v.html"
    assert main(["explore", PROMPT, "--chat", "--model", "tiny", "--out", str(out)]) == 0
    assert out.read_text().count("<script>") == 1 and "wrote" in capsys.readouterr().out
    assert main(["explore", PROMPT, "--model", "tiny", "--out", str(tmp_path / "v.txt")]) == 2
    assert "--out must be a file name ending in .html" in capsys.readouterr().err
    served = []

    class Quick:  # the server, without serving forever
        server_address = ("0.0.0.0", 8123)

        def serve_forever(self):
            served.append(True)

        def server_close(self):
            pass
    monkeypatch.setattr("phi3_scratch.serve.make_server", lambda explorer, host, port: Quick())
    assert main(["serve", "--model", "tiny", "--host", "0.0.0.0", "--port", "8123"]) == 0
    captured = capsys.readouterr()
    assert served and "note: listening on 0.0.0.0, not only on this machine" in captured.err
    assert main(["serve", "--model", "tiny"]) == 0 and "note:" not in capsys.readouterr().err


def test_explore_refuses_what_it_cannot_draw(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(p3.Phi3Error, match=r"explore: the prompt is \d+ tokens; a view takes 1..128"):
        explore_data(model, tokenizer, "x " * 200)
    with pytest.raises(p3.Phi3Error, match=r"give a name ending in .html, got '.*view.png'"):
        p3.explore(model, tokenizer, "hi").save(tmp_path / "view.png")
    view = p3.explore(model, tokenizer, "hi")
    assert view._repr_html_().startswith("<iframe srcdoc=") and "&lt;script&gt;" in view._repr_html_()
    assert Path(view.save(tmp_path / "v.html")).read_text() == view.html
