"""The language protocol: instruction data, the multiple-choice scorer against lm-eval's HF model,
the harness model `mambapeft`, `mambapeft eval`, the "language" task, and every bad input."""
import json
import logging
import os
import tempfile

os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="mambapeft-test-datasets-"))

import pytest  # noqa: E402
import torch  # noqa: E402

from mambapeft.cli import DEFAULT_MODEL, main  # noqa: E402
from mambapeft.language import data  # noqa: E402
from mambapeft.language import multiple_choice as mc  # noqa: E402
from mambapeft.models import MambaForCausalLM  # noqa: E402
from mambapeft.models.checkpoint import load_tokenizer  # noqa: E402

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def tiny():
    return MambaForCausalLM.from_pretrained(DEFAULT_MODEL).eval()


def sums(n, seed=0, reverse=True):
    g = torch.Generator().manual_seed(seed)
    ab = torch.randint(0, 50, (n, 2), generator=g).tolist()
    return [{"instruction": f"{a}+{b}=", "input": "", "output": str(a + b)[::-1] if reverse else str(a + b)}
            for a, b in ab]


def write_task(folder, n=12, seed=1, name="rsum"):
    """An lm-eval YAML task whose JSON lines data the test writes: the reversed sum against the forward
    sum and one more wrong answer (the shipped model knows forward sums)."""
    rows = []
    for r in sums(n, seed):
        a, b = map(int, r["instruction"][:-1].split("+"))
        choices = [str(a + b)[::-1], str(a + b), str(a + b + 1)]
        rows.append({"q": f"{a}+{b}", "choices": choices, "label": 0})
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}='\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return folder / f"{name}.yaml"


# ---- instruction data ----------------------------------------------------------------------------
def test_alpaca_template_with_and_without_input():
    with_input = data.prompt({"instruction": "Pick one.", "input": "a or b", "output": "a"})
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nPick one.\n\n### Input:\na or b\n\n### Response:\n")
    without = data.prompt({"instruction": "Pick one.", "input": "", "output": "a"})
    assert "### Input" not in without and without.endswith("### Instruction:\nPick one.\n\n### Response:\n")


def test_json_list_and_json_lines_read_the_same(tmp_path):
    recs = sums(5)
    (tmp_path / "a.json").write_text(json.dumps(recs, indent=1))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert data.read_records(tmp_path / "a.json") == data.read_records(tmp_path / "b.jsonl") == recs


def test_labels_on_response_only_or_everything_and_eos(tok):
    rec = {"instruction": "12+7=", "input": "", "output": "91"}
    (ids, labels), = data.tokenize([rec], tok, "none", cutoff=64)
    assert ids == tok("12+7=91")["input_ids"] + [tok.eos_token_id]
    assert labels == [-100] * 5 + ids[5:]
    (ids2, labels2), = data.tokenize([rec], tok, "none", cutoff=64, train_on_inputs=True)
    assert ids2 == ids and labels2 == ids


def test_cutoff_truncates_or_drops_and_says_so(tok, caplog):
    recs = [{"instruction": "1+1=", "output": "2"}, {"instruction": "12345+12345=", "output": "54642"}]
    with caplog.at_level(logging.WARNING):
        items = data.tokenize(recs, tok, "none", cutoff=14)
    assert [len(i) for i, _ in items] == [6, 14] and items[1][0] == tok.encode("12345+12345=54")
    assert "1 of 2 records are longer than the cutoff of 14 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(data.tokenize(recs, tok, "none", cutoff=14, overlong="drop")) == 1
    assert "dropped 1 of 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):   # the prompt alone fills the cutoff: nothing to learn
        assert len(data.tokenize(recs, tok, "none", cutoff=12)) == 1
    assert "leaving no response token" in caplog.text


def test_validation_split_is_seeded_and_disjoint():
    items = [([i, i + 1], [i, i + 1]) for i in range(50)]
    train, val = data.split(items, 10, seed=3)
    assert len(val) == 10 and len(train) == 40 and not set(map(str, train)) & set(map(str, val))
    assert data.split(items, 10, seed=3) == (train, val) and data.split(items, 10, seed=4)[1] != val


def test_padded_batch_loss_equals_each_record_alone(tok, tiny):
    """Right padding with the mask: the batch's summed loss is the sum of each record's own loss."""
    from mambapeft.language.task import LanguageTask
    items = data.tokenize(sums(4) + [{"instruction": "1+2=", "output": "3"}], tok, "none", cutoff=64)
    batch = data.collate(items, tok.pad_token_id)
    assert batch["attention_mask"].sum(1).tolist() == [len(i) for i, _ in items]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    task = LanguageTask.__new__(LanguageTask)
    total, count = task.loss(tiny, batch)
    alone = [task.loss(tiny, data.collate([it], tok.pad_token_id)) for it in items]
    assert int(count) == sum(int(n) for _, n in alone)
    torch.testing.assert_close(total, sum(s for s, _ in alone), rtol=1e-5, atol=1e-5)
    rounded = data.collate(items, tok.pad_token_id, multiple=16)   # lengths rounded up (pad_to_multiple_of)
    assert rounded["input_ids"].shape[1] % 16 == 0 and rounded["input_ids"].shape[1] >= batch["input_ids"].shape[1]
    torch.testing.assert_close(task.loss(tiny, rounded)[0], total, rtol=1e-5, atol=1e-5)


def test_the_loss_drops_the_mask_of_right_padding_unless_a_method_places_tokens_by_it(tok, tiny, monkeypatch):
    """Right padding changes nothing the causal loss sees, so the task leaves the mask out (the CUDA path
    then takes its fused kernels: below, with kernel_fakes' torch stand-ins, every mixer call is fused).
    Infix affix tokens sit between chunks of each row's real length: there the mask stays, and it
    matters."""
    from kernel_fakes import install

    from mambapeft.language.task import LanguageTask
    from mambapeft.models import mixer_cuda
    from mambapeft.models.mixer import MambaMixer
    from mambapeft.ops import mamba_inner
    from mambapeft.peft import PeftConfig, get_peft_model
    items = data.tokenize(sums(4) + [{"instruction": "1+2=", "output": "3"}], tok, "none", cutoff=64)
    batch = data.collate(items, tok.pad_token_id)
    task = LanguageTask.__new__(LanguageTask)
    seen = []
    forward = MambaForCausalLM.forward
    monkeypatch.setattr(MambaForCausalLM, "forward",
                        lambda self, ids, attention_mask=None, **kw: seen.append(attention_mask) or
                        forward(self, ids, attention_mask=attention_mask, **kw))
    for methods, kept in (({"lora_X": {}}, False), ({"affix": {"position": "infix"}}, True)):
        torch.manual_seed(0)
        model = get_peft_model(MambaForCausalLM.from_pretrained(DEFAULT_MODEL), PeftConfig(methods)).eval()
        with torch.no_grad():
            for p in model.method_of:
                p.add_(torch.randn_like(p) * 0.1)
        seen.clear()
        total, _ = task.loss(model, batch)
        assert (seen[-1] is not None) == kept, methods
        masked = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        bare = model(batch["input_ids"], labels=batch["labels"]).loss
        count = (batch["labels"][:, 1:] != -100).sum()
        torch.testing.assert_close(total, masked * count, rtol=1e-5, atol=1e-5)
        assert torch.allclose(masked, bare, rtol=1e-5, atol=1e-6) != kept, "the mask should matter just for infix"
    install(monkeypatch)
    calls = []
    inner = mamba_inner.mamba_inner
    monkeypatch.setattr(mamba_inner, "mamba_inner", lambda *a, **k: calls.append(1) or inner(*a, **k))
    monkeypatch.setattr(MambaMixer, "forward", lambda self, h, mask=None, state=None:
                        mixer_cuda.forward(self, self.compose(), h, mask, state))
    model = get_peft_model(MambaForCausalLM.from_pretrained(DEFAULT_MODEL), PeftConfig({"lora_X": {}}))
    task.loss(model, batch)
    assert len(calls) == model.config.num_hidden_layers, "every mixer should take the fused route"


@pytest.mark.parametrize("content, expected", [
    (b"", "empty file"),
    (b"  \n", "empty file"),
    (b"[]", "no records"),
    (b'[{"instruction": "a", "output": "b"},]', "invalid JSON at line 1"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "a"', "line 2: invalid JSON"),
    (b'\xff\xfe{"instruction"', "not valid UTF-8 (byte 0)"),
    (b'[{"instruction": "a", "output": "b"}, ["a", "b"]]', "record 1: expected an object"),
    (b'[{"instruction": "a", "output": "b"}, {"instruction": "a"}]', "record 1: field 'output': missing"),
    (b'{"instruction": "a", "output": "b"}\n\n{"instruction": 3, "output": "b"}',
     "line 3 (record 1): field 'instruction': expected a string, got int"),
])
def test_bad_instruction_files_are_one_line_errors(tmp_path, content, expected):
    path = tmp_path / "d.json"
    path.write_bytes(content)
    with pytest.raises(data.DataError) as e:
        data.read_records(path)
    assert str(e.value).startswith(f"{path}: ") and expected in str(e.value) and "\n" not in str(e.value)


# ---- the multiple-choice scorer ------------------------------------------------------------------
def test_encode_pair_moves_trailing_spaces_and_uses_the_prefix_for_empty_context(tok):
    assert mc.encode_pair(tok, "1+2= ", "3", 0) == (tok.encode("1+2="), tok.encode(" 3"))
    assert mc.encode_pair(tok, "", "34", 0) == ([0], tok.encode("34"))


def test_batch_size_and_padding_change_no_score(tmp_path, tok, tiny):
    task = mc.load_task(str(write_task(tmp_path, n=9)))
    pairs = [mc.encode_pair(tok, c, k, 0) for _, args in mc.documents(task) for c, k in args]
    ref = mc.score(tiny, pairs, batch_size=1)
    for bs in (2, 5, 64):
        got = mc.score(tiny, pairs, batch_size=bs)
        assert [g for _, g in got] == [g for _, g in ref]
        torch.testing.assert_close(torch.tensor([s for s, _ in got]), torch.tensor([s for s, _ in ref]),
                                   rtol=1e-5, atol=1e-5)
    long = (tok.encode("12+34+56+78+90="), tok.encode("1234567890"))   # much longer: pads every other row
    padded = mc.score(tiny, [long] + pairs, batch_size=64)[1:]
    torch.testing.assert_close(torch.tensor([s for s, _ in padded]), torch.tensor([s for s, _ in ref]),
                               rtol=1e-5, atol=1e-5)
    by_bs = [mc.evaluate(tiny, tok, [task], batch_size=bs) for bs in (1, 4, 64)]
    assert by_bs[0] == by_bs[1] == by_bs[2]


def test_scores_equal_lm_eval_hf_model_with_transformers_mamba(tmp_path, tok, tiny):
    """lm-eval's own HF backend on transformers' MambaForCausalLM, same weights: same log-likelihoods,
    greedy flags, rolling log-likelihoods and generations as our scorer and harness model."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from mambapeft.language.harness import MambaPeftLM
    task = mc.load_task(str(write_task(tmp_path, n=6)))
    task.build_all_requests(rank=0, world_size=1)
    hf = HFLM(pretrained=DEFAULT_MODEL, backend="causal", device="cpu", batch_size=3)
    ours = MambaPeftLM(model=tiny, tokenizer=tok, batch_size=4)
    theirs, mine = hf.loglikelihood(task.instances), ours.loglikelihood(task.instances)
    assert [g for _, g in mine] == [g for _, g in theirs]
    torch.testing.assert_close(torch.tensor([s for s, _ in mine]), torch.tensor([s for s, _ in theirs]),
                               rtol=1e-4, atol=1e-4)
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(["12+7=19\n3+4=7", "5"])]
    torch.testing.assert_close(torch.tensor(ours.loglikelihood_rolling(rolling)),
                               torch.tensor(hf.loglikelihood_rolling(rolling)), rtol=1e-4, atol=1e-4)
    gen = [Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 4}), i)
           for i, c in enumerate(["12+7=", "3+4=", "40+41="])]
    assert ours.generate_until(gen) == hf.generate_until(gen)


def test_acc_and_acc_norm_follow_the_harness_definition(tmp_path, tok, tiny, monkeypatch):
    """acc: argmax of the log-likelihoods; acc_norm: argmax of log-likelihood / len(choice) in characters
    (lm-eval 0.4.13's process_results), averaged over documents."""
    task = mc.load_task(str(write_task(tmp_path, n=10)))
    docs = mc.documents(task)
    flat = mc.score(tiny, [mc.encode_pair(tok, c, k, 0) for _, a in docs for c, k in a])
    acc, acc_norm, at = [], [], 0
    for doc, args in docs:
        lls = [s for s, _ in flat[at:at + len(args)]]
        at += len(args)
        acc.append(max(range(len(lls)), key=lambda i: (lls[i], -i)) == doc["label"])
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        acc_norm.append(max(range(len(norm)), key=lambda i: (norm[i], -i)) == doc["label"])
    res = mc.evaluate(tiny, tok, [task])["rsum"]
    assert res == {"acc": sum(acc) / len(acc), "acc_norm": sum(acc_norm) / len(acc_norm), "n": 10}


def test_winogrande_style_choices_in_the_context(tmp_path, tok, tiny):
    """Tasks whose choices are contexts (doc_to_text gives the gold index) score one continuation."""
    (tmp_path / "w.jsonl").write_text("".join(json.dumps({"s": f"{a}+{b}=_", "o1": str(a), "o2": str(a + b)}) + "\n"
                                              for a, b in [(1, 2), (3, 4), (10, 20)]))
    (tmp_path / "w.yaml").write_text(
        f"task: wino\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path}/w.jsonl\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: 1\n"
        "doc_to_choice: \"{{[s.split('_')[0] ~ o1, s.split('_')[0] ~ o2]}}\"\ndoc_to_target: \"{{'\\n'}}\"\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    task = mc.load_task(str(tmp_path / "w.yaml"))
    docs = mc.documents(task)
    assert docs[0][1] == [("1+2=1", "\n"), ("1+2=3", "\n")]
    assert mc.evaluate(tiny, tok, [task])["wino"]["n"] == 3


# ---- commands and the harness --------------------------------------------------------------------
def test_eval_command_and_the_harness_give_the_same_accuracy_with_an_adapter(tmp_path, capsys):
    from mambapeft.language.harness import load
    from mambapeft.peft import PeftConfig, get_peft_model
    yaml = write_task(tmp_path, n=8)
    peft = get_peft_model(MambaForCausalLM.from_pretrained(DEFAULT_MODEL), PeftConfig({"lora_X": {"r": 4}}))
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)   # an adapter that changes the scores
    peft.save_pretrained(tmp_path / "adapter")
    assert main(["eval", "--adapter", str(tmp_path / "adapter"), "--tasks", str(yaml),
                 "--output", str(tmp_path / "ours"), "--batch-size", "3"]) == 0
    ours = json.loads((tmp_path / "ours" / "results.json").read_text())["results"]["rsum"]
    assert "| rsum | 8 |" in (tmp_path / "ours" / "results.md").read_text()
    assert main(["lm-eval", "--model", "mambapeft", "--model_args",
                 f"pretrained={DEFAULT_MODEL},adapter={tmp_path / 'adapter'},dtype=float32", "--log_samples",
                 "--tasks", str(yaml), "--batch_size", "5", "--output_path", str(tmp_path / "harness")]) == 0
    harness = json.loads(next((tmp_path / "harness").rglob("results_*.json")).read_text())["results"]["rsum"]
    assert (harness["acc,none"], harness["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])
    samples = sorted((json.loads(line) for line in next((tmp_path / "harness").rglob("samples_rsum_*.jsonl"))
                      .read_text().splitlines()), key=lambda s: s["doc_id"])
    through_harness = torch.tensor([float(r[0][0]) for s in samples for r in s["resps"]])
    task = mc.load_task(str(yaml))
    tok = load_tokenizer(DEFAULT_MODEL)
    pairs = [mc.encode_pair(tok, c, k, 0) for _, args in mc.documents(task) for c, k in args]
    with_adapter = torch.tensor([s for s, _ in mc.score(load(DEFAULT_MODEL, tmp_path / "adapter")[0], pairs)])
    base = torch.tensor([s for s, _ in mc.score(MambaForCausalLM.from_pretrained(DEFAULT_MODEL).eval(), pairs)])
    torch.testing.assert_close(through_harness, with_adapter, rtol=1e-5, atol=1e-5)
    assert (with_adapter - base).abs().max() > 0.1   # the adapter was loaded, not silently skipped


def test_a_misspelt_model_arg_is_a_one_line_error(tmp_path, capsys):
    yaml = write_task(tmp_path, n=2)
    assert main(["lm-eval", "--model", "mambapeft", "--model_args", f"pretrained={DEFAULT_MODEL},adaptr=x",
                 "--tasks", str(yaml)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "mambapeft: error: --model_args: unknown setting 'adaptr'; expected pretrained, adapter, dtype, tokenizer, max_length"


def test_paper_task_from_a_data_directory(tmp_path, tiny, tok):
    """A paper task (boolq) run from NAME/SPLIT.jsonl rows in the hub data set's format."""
    (tmp_path / "boolq").mkdir()
    rows = [{"passage": "12+7=19", "question": "is 12+7 19", "label": 1, "idx": 0},
            {"passage": "3+4=7", "question": "is 3+4 8", "label": 0, "idx": 1}]
    (tmp_path / "boolq" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = mc.load_task("boolq", tmp_path)
    assert [a for _, a in mc.documents(task)][0] == [("12+7=19\nQuestion: is 12+7 19?\nAnswer:", " no"),
                                                    ("12+7=19\nQuestion: is 12+7 19?\nAnswer:", " yes")]
    assert mc.evaluate(tiny, tok, [task])["boolq"]["n"] == 2


@pytest.mark.parametrize("args, expected", [
    (["--tasks", "{d}/nope.yaml"], "{d}/nope.yaml: task file not found"),
    (["--tasks", "{d}/bad.yaml"], "{d}/bad.yaml: dataset_kwargs.data_files: missing.jsonl: file not found"),
    (["--tasks", "{d}/gen.yaml"], "output_type: expected multiple_choice"),
    (["--tasks", "{d}/broken.yaml"], "{d}/broken.yaml: not a usable lm-eval task file"),
    (["--tasks", "no_such_task_xyz"], "no_such_task_xyz: expected one of boolq, piqa"),
    (["--tasks", "winogrande", "--data-dir", "{d}"],
     "winogrande: data set allenai/winogrande (winogrande_xl) is not in the local hub cache"),
    (["--tasks", "{d}/rsum.yaml", "--adapter", "{d}/none"], "none: expected an adapter directory"),
    (["--tasks", "{d}/rsum.yaml", "--batch-size", "0"], "--batch-size and --limit"),
])
def test_eval_bad_input_is_one_line_error(tmp_path, capsys, args, expected):
    write_task(tmp_path)
    (tmp_path / "bad.yaml").write_text("task: bad\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                       "    test: missing.jsonl\noutput_type: multiple_choice\ntest_split: test\n")
    (tmp_path / "gen.yaml").write_text("task: gen\ndataset_path: json\noutput_type: generate_until\n")
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    assert main(["eval", *[a.format(d=tmp_path) for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mambapeft: error: ") and expected.format(d=tmp_path) in err[0]
    if "winogrande" in expected:
        assert f"nor in {tmp_path}/winogrande/validation.jsonl" in err[0]


# ---- the "language" task -------------------------------------------------------------------------
def language_section(tmp_path, **kw):
    (tmp_path / "train.json").write_text(json.dumps(sums(96, seed=5)))
    return {"type": "language", "data": str(tmp_path / "train.json"), "template": "none", "cutoff": 16,
            "validation_size": 16, "eval_tasks": [str(write_task(tmp_path, n=16))], "eval_batch_size": 16, **kw}


def test_train_lowers_the_held_out_loss_and_eval_and_the_harness_read_the_adapter(tmp_path, capsys):
    """End to end through `mambapeft train`: the held-out loss falls, the best adapter is saved, and
    `mambapeft eval` and the harness with --model mambapeft load it and report the run's test accuracy."""
    import pickle

    import yaml

    from mambapeft.training.task import build_task
    section = language_section(tmp_path)
    config = {"model": DEFAULT_MODEL, "methods": {"lora_X": {"r": 8, "dropout": 0.0}}, "task": section,
              "training": {"lr": 3e-2, "batch_size": 16, "max_steps": 30, "eval_every": 15, "schedule": "constant",
                           "progress": False},
              "output_dir": str(tmp_path / "run")}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    task = build_task(section)
    base = task.load_model({}).eval()
    pickle.loads(pickle.dumps(task)).collate(task.train_set()[:2])   # what a DataLoader worker gets
    before = task.evaluate(base, "validation")["loss"]
    base_acc = task.evaluate(base, "test")["rsum/acc"]
    assert main(["train", str(tmp_path / "train.yaml")]) == 0
    capsys.readouterr()
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert result["best_validation"]["loss"] < 0.7 * before
    assert (tmp_path / "run" / "best" / "adapter_model.safetensors").is_file()
    acc = result["test"]["rsum/acc"]
    assert acc > base_acc
    assert main(["eval", "--adapter", str(tmp_path / "run" / "best"), "--tasks", str(tmp_path / "rsum.yaml"),
                 "--output", str(tmp_path / "ours")]) == 0
    ours = json.loads((tmp_path / "ours" / "results.json").read_text())["results"]["rsum"]
    assert ours["acc"] == acc
    assert main(["lm-eval", "--model", "mambapeft", "--model_args",
                 f"pretrained={DEFAULT_MODEL},adapter={tmp_path / 'run' / 'best'}",
                 "--tasks", str(tmp_path / "rsum.yaml"), "--output_path", str(tmp_path / "harness")]) == 0
    harness = json.loads(next((tmp_path / "harness").rglob("results_*.json")).read_text())["results"]["rsum"]
    assert harness["acc,none"] == acc


def test_language_task_without_validation_or_tasks_raises_key_error(tmp_path):
    from mambapeft.training.task import build_task
    task = build_task({**language_section(tmp_path), "eval_tasks": []})
    task.load_model({})
    with pytest.raises(KeyError, match="test"):
        task.evaluate(task.load_model({}), "test")


@pytest.mark.parametrize("change, expected", [
    ({"cutof": 3}, "task.cutof: unknown setting"),
    ({"data": None}, "task.data: expected the path"),
    ({"template": "chatml"}, "task.template: expected alpaca or none"),
    ({"cutoff": 1}, "task.cutoff: expected an integer >= 2"),
    ({"metric": "acc", "eval_tasks": []}, "task.metric: expected loss when eval_tasks is empty"),
    ({"metric": "rsum/f1"}, "task.metric: expected loss, acc"),
    ({"metric": "loss", "validation_size": 0}, "validation_size > 0"),
    ({"overlong": "skip"}, "task.overlong: expected truncate or drop"),
    ({"pad_to_multiple_of": 0}, "task.pad_to_multiple_of: expected an integer >= 1"),
])
def test_language_config_errors(tmp_path, change, expected):
    from mambapeft.peft import ConfigError
    from mambapeft.training.task import build_task
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        build_task({**language_section(tmp_path), **change})


def test_a_metric_naming_no_eval_task_fails_before_training(tmp_path):
    from mambapeft.peft import ConfigError
    from mambapeft.training.task import build_task
    task = build_task(language_section(tmp_path, metric="piqa/acc"))
    task.load_model({})
    with pytest.raises(ConfigError, match=r"task.metric: piqa/acc: no task 'piqa' among eval_tasks \(rsum\)"):
        task.train_set()


def test_validation_size_larger_than_the_data_is_a_config_error(tmp_path):
    from mambapeft.peft import ConfigError
    from mambapeft.training.task import build_task
    task = build_task(language_section(tmp_path, validation_size=500))
    task.load_model({})
    with pytest.raises(ConfigError, match=r"validation_size: expected 0 <= n < 96"):
        task.train_set()


def test_a_malformed_record_stops_mambapeft_train_with_one_line(tmp_path, capsys):
    import yaml
    section = language_section(tmp_path)
    recs = sums(20)
    recs[7]["output"] = 12
    (tmp_path / "train.json").write_text(json.dumps(recs))
    config = {"model": DEFAULT_MODEL, "methods": "lora_X", "task": section, "output_dir": str(tmp_path / "run"),
              "training": {"progress": False}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "train.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mambapeft: error: {tmp_path / 'train.json'}: record 7: field 'output': expected a string, got int"]
