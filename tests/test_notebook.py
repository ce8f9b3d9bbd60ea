"""The teaching notebook (../shared/docs/NOTEBOOK.md), its import line changed to phi3_scratch.

Its five cells run twice, on one checkpoint that both can load (the tiny model as it ships: its
tokenizer.json is what transformers' AutoTokenizer reads): once with `from transformers import ...`, once
with `from phi3_scratch import ...`, nothing else changed. Every result must be equal. The cells
are the notebook's, with its Spanish prompts; the checkpoint folder and device are the only
parameters, and the %%timeit magic of cell 5 runs each call once.
"""

import contextlib
import io
import textwrap

import pytest
import torch

import phi3_scratch as p3
from phi3_scratch.loading import TINY

CELLS = [
    # 1. Load
    """
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(
        MODEL,
        device_map=DEVICE,
        torch_dtype="auto",
        trust_remote_code=False,
    )
    """,
    # 2. Generate: a plain prompt, no chat template
    """
    generator = pipeline(
        "text-generation",
        model=model,
        tokenizer=tokenizer,
        return_full_text=False,
        max_new_tokens=200,
        do_sample=False,
    )
    prompt = "Mandale un mensajito a Juan pidiéndole perdón por haberle pisado el pie en el bondi. Explicale qué pasó, pero sin chamuyo."
    output = generator(prompt)
    print(output[0]['generated_text'])
    """,  # noqa: E501  (the notebook's cell as it is: its long prompt line too)
    # 3. Architecture
    """
    print(model)
    """,
    # 4. The next token: body, then head
    """
    prompt = "La universidad más prestigiosa del mundo es la Universidad de"
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    input_ids = input_ids.to(DEVICE)
    model_output = model.model(input_ids)
    lm_head_output = model.lm_head(model_output[0])
    token_id = lm_head_output[0,-1].argmax(-1)
    word = tokenizer.decode(token_id)
    """,
    # 5. The KV cache (the notebook times each generate with %%timeit -n 1)
    """
    prompt = "Escribe una carta muy larga explicando por qué el asado del domingo se quemó. Describe qué salió mal."
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    input_ids = input_ids.to(DEVICE)
    generation_output = model.generate(input_ids=input_ids, max_new_tokens=100, use_cache=True)
    with_cache = generation_output
    generation_output = model.generate(input_ids=input_ids, max_new_tokens=100, use_cache=False)
    without_cache = generation_output
    """,  # noqa: E501  (the notebook's cell as it is: its long prompt line too)
]


def run_notebook(library: str, folder) -> dict:
    """The five cells with `from {library} import ...`: what they printed per cell, and their variables."""
    namespace = {"MODEL": str(folder), "DEVICE": "cpu"}
    exec(f"from {library} import AutoModelForCausalLM, AutoTokenizer, pipeline", namespace)
    printed = []
    for cell in CELLS:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), torch.no_grad():
            exec(textwrap.dedent(cell), namespace)
        printed.append(out.getvalue())
    return {"printed": printed, **namespace}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    import accelerate  # noqa: F401  (transformers needs it for device_map; the test extra installs it)
    return run_notebook("transformers", TINY), run_notebook("phi3_scratch", TINY)  # the folder as it ships


def test_cell_2_generates_the_same_text(both):
    theirs, ours = both
    assert ours["output"][0]["generated_text"] == theirs["output"][0]["generated_text"]
    assert ours["printed"][1] == theirs["printed"][1] and len(ours["printed"][1]) > 20


def test_cell_3_prints_the_same_linear_and_rmsnorm_lines(both):
    theirs, ours = both
    pick = lambda text: [line for line in text.splitlines() if "Linear(" in line or "RMSNorm(" in line]
    assert pick(ours["printed"][2]) == pick(theirs["printed"][2]) and len(pick(ours["printed"][2])) == 8


def test_cell_4_reads_the_same_next_token_from_the_body_and_the_head(both):
    theirs, ours = both
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert ours["model_output"][0].shape == theirs["model_output"][0].shape  # (batch, tokens, hidden)
    assert torch.allclose(ours["lm_head_output"], theirs["lm_head_output"], atol=1e-4)
    assert int(ours["token_id"]) == int(theirs["token_id"]) and ours["word"] == theirs["word"]


def test_cell_5_generates_the_same_ids_with_and_without_the_cache(both):
    theirs, ours = both
    assert torch.equal(ours["with_cache"], theirs["with_cache"])
    assert torch.equal(ours["without_cache"], theirs["without_cache"])
    assert torch.equal(ours["with_cache"], ours["without_cache"])


def test_the_plain_api_is_unchanged_and_arguments_it_lacks_are_refused():
    model = p3.AutoModelForCausalLM.from_pretrained("tiny")
    assert isinstance(model.causal_lm, p3.Phi3ForCausalLM) and model.lm_head is model.causal_lm.lm_head
    ids = torch.tensor([[1, 400, 401]])
    with torch.no_grad():
        assert torch.equal(model.model(ids)[0], model.causal_lm.model(ids))  # [0]: the hidden states
        assert model.model(ids).last_hidden_state.shape == (1, 3, 128)
    with pytest.raises(p3.Phi3Error, match="num_beams=4 is not supported by phi3_scratch's notebook layer"):
        model.generate(input_ids=ids, num_beams=4)
    with pytest.raises(p3.Phi3Error, match="never runs code from a checkpoint"):
        p3.AutoModelForCausalLM.from_pretrained("tiny", trust_remote_code=True)
    with pytest.raises(p3.Phi3Error, match="'text-generation' pipeline only"):
        p3.pipeline("summarization", model=model, tokenizer=p3.AutoTokenizer.from_pretrained("tiny"))
    with pytest.raises(p3.Phi3Error, match="device_map=.*one device"):
        p3.AutoModelForCausalLM.from_pretrained("tiny", device_map={"": 0})


def test_the_learning_tools_take_the_notebooks_model():
    """trace, the logit lens, the Stepper and generate run the plain model a notebook model wraps
    (a trace used to be set on the wrapper and stay empty); the body alone is refused, by name."""
    model = p3.AutoModelForCausalLM.from_pretrained("tiny")
    plain, ids = model.causal_lm, torch.tensor([[1, 400, 401]])
    with p3.trace(model) as t:
        logits = model(ids).logits
    assert torch.equal(t["logits"], logits) and t["layers.3.residual"].shape == (1, 3, 128)
    assert torch.equal(p3.logit_lens(model, ids), p3.logit_lens(plain, ids))
    assert p3.Stepper(model, [1, 400]).record().argmax == p3.Stepper(plain, [1, 400]).record().argmax
    assert torch.equal(p3.generate(model, ids, 4), p3.generate(plain, ids, 4))
    with pytest.raises(p3.Phi3Error, match=r"trace\(model\): model must be this package's Phi3ForCausalLM .*"
                                           r"got phi3_scratch.model.Phi3Model \(the body, model.model: "
                                           r"pass the whole"):
        with p3.trace(plain.model):
            pass


def test_the_notebook_in_notebooks_runs(tmp_path):
    """notebooks/phi3_notebook.ipynb, executed by a Jupyter kernel, as a learner runs it (the tiny model)."""
    import nbclient
    import nbformat
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "notebooks" / "phi3_notebook.ipynb"
    notebook = nbformat.read(path, as_version=4)
    assert ("from phi3_scratch import AutoModelForCausalLM, AutoTokenizer, pipeline"
            in notebook.cells[1].source)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = {i: cell.get("outputs", [])
               for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
    text = lambda i: "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs[i])
    model, tok = p3.Phi3ForCausalLM.from_pretrained("tiny"), p3.Tokenizer.from_pretrained("tiny")
    ids = torch.tensor([tok.encode("La universidad más prestigiosa del mundo es la Universidad de")])
    with torch.no_grad():
        expected = tok.decode([int(model(ids)[0, -1].argmax())])
    assert text(9).strip() == repr(expected)  # the next token, as the notebook shows it
    assert "(qkv_proj): Linear(in_features=128, out_features=256, bias=False)" in text(7)
    assert "per loop" in text(12) and "per loop" in text(13)  # %%timeit's report
