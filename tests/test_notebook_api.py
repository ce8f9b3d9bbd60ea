"""The transformers API past the notebook: chat messages, sampling, apply_chat_template, beside transformers.

Each test runs the same calls with `transformers` and with `phi3_scratch` on one checkpoint both load
(the tiny model as it ships, or a copy of it with a generation_config.json that samples).
- Greedy: the texts and ids are equal.
- Sampled: both draw from torch's global generator after one torch.manual_seed. The same probabilities
  and the same draws give the same tokens, so the sampled outputs are compared too.
"""

import json
import shutil
import warnings

import pytest
import torch

import phi3_scratch as p3
from phi3_scratch.loading import TINY

CHAT = [
    {"role": "system", "content": "You are kind."},
    {"role": "user", "content": "The KV cache"},
    {"role": "assistant", "content": "holds the keys."},
    {"role": "user", "content": "And the values?"},
]


def load(library, folder=TINY):
    """A library's tokenizer, model and text-generation pipeline for `folder`."""
    lib = pytest.importorskip("transformers") if library == "transformers" else p3
    tokenizer = lib.AutoTokenizer.from_pretrained(str(folder))
    model = lib.AutoModelForCausalLM.from_pretrained(str(folder))
    return tokenizer, model, lib.pipeline("text-generation", model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def both():
    return {name: load(name) for name in ("transformers", "phi3_scratch")}


def run(both, call):
    """call(tokenizer, model, generator) with each library, seeded alike: (theirs, ours)."""
    out = []
    for name in ("transformers", "phi3_scratch"):
        torch.manual_seed(0)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' own notices
            out.append(call(*both[name]))
    return out


def test_a_chat_gets_the_template_and_comes_back_with_the_assistants_message(both):
    theirs, ours = run(both, lambda t, m, g: g(CHAT, max_new_tokens=6, do_sample=False))
    assert ours == theirs
    (record,) = ours
    assert record["generated_text"][:4] == CHAT and record["generated_text"][4]["role"] == "assistant"
    assert record["generated_text"][4]["content"]  # some new text


def test_a_chat_with_return_full_text_false_gives_the_new_text_as_a_string(both):
    theirs, ours = run(both, lambda t, m, g: g(CHAT[:2], max_new_tokens=6, do_sample=False,
                                               return_full_text=False))
    assert ours == theirs and isinstance(ours[0]["generated_text"], str)


def test_a_chat_ending_with_an_assistant_message_is_continued_in_it(both):
    prefilled = [*CHAT[:2], {"role": "assistant", "content": "It is"}]
    theirs, ours = run(both, lambda t, m, g: g(prefilled, max_new_tokens=5, do_sample=False))
    assert ours == theirs
    messages = ours[0]["generated_text"]
    assert (len(messages) == 3 and messages[2]["content"].startswith("It is")
            and messages[2]["content"] != "It is")
    # Forced off: a new assistant message after the prefilled one.
    theirs, ours = run(both, lambda t, m, g: g(prefilled, max_new_tokens=5, do_sample=False,
                                               continue_final_message=False))
    assert ours == theirs and len(ours[0]["generated_text"]) == 4


@pytest.mark.parametrize("inputs", [["The KV cache", "Hello"], [CHAT[:2], CHAT]])
def test_a_list_of_prompts_or_chats_gives_a_list_of_results(both, inputs):
    theirs, ours = run(both, lambda t, m, g: g(inputs, max_new_tokens=3, do_sample=False))
    assert ours == theirs and len(ours) == 2 and all(len(r) == 1 for r in ours)


def test_the_pipeline_samples_by_default_as_transformers_does(both):
    # transformers 5.24's text-generation pipeline samples at temperature 0.7 unless told otherwise.
    theirs, ours = run(both, lambda t, m, g: g("The KV cache", max_new_tokens=8))
    assert ours == theirs
    greedy = run(both, lambda t, m, g: g("The KV cache", max_new_tokens=8, do_sample=False))[1]
    assert ours != greedy  # seed 0 draws another continuation here than the argmax
    again = run(both, lambda t, m, g: g("The KV cache", max_new_tokens=8))[1]
    assert again == ours  # the same seed, the same draw


@pytest.mark.parametrize("settings", [
    dict(do_sample=True, temperature=1.3, top_k=5, top_p=0.9),
    dict(do_sample=True, top_k=0, temperature=0.5),
    dict(do_sample=True, num_return_sequences=3, max_new_tokens=4),
])
def test_sampling_settings_per_call_match_transformers(both, settings):
    theirs, ours = run(both, lambda t, m, g: g(CHAT[:2], **{"max_new_tokens": 6, **settings}))
    assert ours == theirs
    assert len(ours) == settings.get("num_return_sequences", 1)


def test_settings_at_construction_and_per_call_override(both):
    def call(tokenizer, model, lib_generator):
        lib = p3 if isinstance(model, p3.notebook.NotebookModel) else pytest.importorskip("transformers")
        generator = lib.pipeline("text-generation", model=model, tokenizer=tokenizer, max_new_tokens=7,
                                 do_sample=False, return_full_text=False)
        return generator("The KV cache"), generator("The KV cache", max_new_tokens=2, return_full_text=True)
    theirs, ours = run(both, call)
    assert ours == theirs
    seven, two = ours
    assert len(seven[0]["generated_text"]) > len(two[0]["generated_text"]) - len("The KV cache")
    assert two[0]["generated_text"].startswith("The KV cache")


def test_do_sample_false_with_a_temperature_is_greedy_and_warns(both):
    tokenizer, model, generator = both["phi3_scratch"]
    greedy = generator("The KV cache", max_new_tokens=6, do_sample=False)
    with pytest.warns(UserWarning, match=r"temperature=0.5: do_sample is False, so generation is greedy"):
        tempered = generator("The KV cache", max_new_tokens=6, do_sample=False, temperature=0.5)
    assert tempered == greedy
    theirs, ours = run(both, lambda t, m, g: g("The KV cache", max_new_tokens=6, do_sample=False,
                                               temperature=0.5))
    assert ours == theirs


def test_apply_chat_template_has_transformers_defaults_and_return_types(both):
    calls = {
        "default": lambda t: dict(t.apply_chat_template(CHAT, add_generation_prompt=True)),
        "tensors": lambda t: {k: v.tolist()
                              for k, v in t.apply_chat_template(CHAT, return_tensors="pt").items()},
        "text": lambda t: t.apply_chat_template(CHAT, tokenize=False),
        "prompt text": lambda t: t.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
        "ids": lambda t: t.apply_chat_template(CHAT, return_dict=False),
        "id tensor": lambda t: t.apply_chat_template(CHAT, return_dict=False, return_tensors="pt").tolist(),
        "continue": lambda t: t.apply_chat_template(CHAT[:3], continue_final_message=True, tokenize=False),
        "batch": lambda t: t.apply_chat_template([CHAT, CHAT[:2]], return_dict=False),
    }
    for name, call in calls.items():
        theirs, ours = call(both["transformers"][0]), call(both["phi3_scratch"][0])
        assert ours == theirs, name
    encoding = both["phi3_scratch"][0].apply_chat_template(CHAT, return_tensors="pt")
    assert (encoding.input_ids.shape == encoding["attention_mask"].shape
            == (1, len(calls["ids"](both["phi3_scratch"][0]))))
    assert encoding.to("cpu").input_ids.device.type == "cpu"


def test_apply_chat_template_unpacks_into_model_generate(both):
    def call(tokenizer, model, generator):
        inputs = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).to(model.device)
        greedy = model.generate(**inputs, max_new_tokens=5)
        sampled = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=10, num_return_sequences=2)
        return greedy.tolist(), sampled.tolist()
    theirs, ours = run(both, call)
    assert ours == theirs
    greedy, sampled = ours
    assert len(greedy) == 1 and len(sampled) == 2 and len(sampled[0]) == len(greedy[0])


def test_the_checkpoints_generation_config_sets_the_sampling_defaults(tmp_path):
    folder = tmp_path / "sampling"
    shutil.copytree(TINY, folder)
    settings = json.loads((folder / "generation_config.json").read_text())
    settings.update(do_sample=True, temperature=0.6, top_k=4, max_new_tokens=5)
    (folder / "generation_config.json").write_text(json.dumps(settings))
    libs = {name: load(name, folder) for name in ("transformers", "phi3_scratch")}
    ids = libs["phi3_scratch"][0]("The KV cache", return_tensors="pt").input_ids
    theirs, ours = run(libs, lambda t, m, g: (m.generate(ids).tolist(), g("The KV cache")))
    assert ours == theirs
    assert len(ours[0][0]) == ids.shape[1] + 5  # max_new_tokens from the file
    assert p3.Phi3ForCausalLM.from_pretrained(folder).config.generation_defaults == \
        {"do_sample": True, "temperature": 0.6, "top_k": 4, "max_new_tokens": 5}
    # A save keeps them, where transformers reads them too.
    p3.Phi3ForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert {k: saved[k] for k in ("do_sample", "temperature", "top_k", "max_new_tokens")} == \
        {"do_sample": True, "temperature": 0.6, "top_k": 4, "max_new_tokens": 5}


def test_a_bad_sampling_value_in_generation_config_names_the_file(tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(TINY, folder)
    settings = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**settings, "do_sample": True, "top_p": 3}))
    model = p3.AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(p3.Phi3Error, match=r"top_p=3 \(from the checkpoint's generation_config.json\): "
                                           r"expected a number in \(0, 1\]"):
        model.generate(torch.tensor([[1, 400]]))


def test_the_pipeline_takes_the_plain_model_and_tokenizer(both):
    plain = p3.Phi3ForCausalLM.from_pretrained("tiny"), p3.Tokenizer.from_pretrained("tiny")
    generator = p3.pipeline("text-generation", model=plain[0], tokenizer=plain[1])
    ours = generator(CHAT, max_new_tokens=4, do_sample=False)
    theirs, _ = run(both, lambda t, m, g: g(CHAT, max_new_tokens=4, do_sample=False))
    assert ours == theirs


def test_arguments_it_does_not_implement_are_refused_by_name(both):
    tokenizer, model, generator = both["phi3_scratch"]
    ids = torch.tensor([[1, 400, 401]])
    refusals = [
        (lambda: generator("Hi", stop_sequence="x"), r"generator\(...\): stop_sequence='x' is not supported"),
        (lambda: p3.pipeline("text-generation", model=model, tokenizer=tokenizer, device=0),
         r"pipeline: device=0 is not supported"),
        (lambda: model.generate(ids, repetition_penalty=1.2),
         r"model.generate: repetition_penalty=1.2 is not"),
        (lambda: tokenizer.apply_chat_template(CHAT, padding=True),
         r"apply_chat_template\(...\): padding=True"),
        (lambda: generator({"role": "user"}),
         r"generator\(inputs\): expected a prompt string, a list of messages"),
        (lambda: generator("Hi", return_full_text="no"), r"return_full_text must be True or False"),
        (lambda: model.generate(ids, num_return_sequences=2), r"num_return_sequences=2: greedy decoding"),
        (lambda: model.generate(ids, do_sample=True, temperature=0),
         r"temperature=0: expected a finite number > 0"),
        (lambda: model.generate(ids, do_sample="yes"), r"do_sample='yes': expected True or False"),
        (lambda: model.generate(ids, top_k=-1, do_sample=True), r"top_k=-1: expected an integer >= 0"),
        (lambda: model.generate(ids.tolist()), r"model.generate: input_ids must be a tensor of token ids"),
        (lambda: tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, continue_final_message=True),
         r"add_generation_prompt=True and continue_final_message=True contradict each other"),
        (lambda: tokenizer.apply_chat_template([CHAT, CHAT[:2]], return_tensors="pt"),
         r"the conversations are \[\d+, \d+\] tokens long; return_tensors='pt' needs one length"),
    ]
    for call, message in refusals:
        with pytest.raises(p3.Phi3Error, match=message):
            call()
