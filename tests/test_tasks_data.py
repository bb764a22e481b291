"""Task definitions (built-in and from files) and reading labelled data."""

from __future__ import annotations

import json

import pytest

from raee.data import read_examples
from raee.errors import DataError, TaskError
from raee.tasks import BUILTIN_TASKS, LabelWords, TaskDefinition, Verbalizations, load_task


def test_eight_builtin_tasks_with_every_kind():
    assert set(BUILTIN_TASKS) == {"sst2", "sst5", "mr", "cr", "mpqa", "subj", "trec", "cola"}
    for task in BUILTIN_TASKS.values():
        for kind in ("masked-lm", "causal-lm", "encoder-decoder"):
            assert len(task.head_spec(kind).words) == task.num_labels
            assert "{x}" in task.template_for(kind)
        assert len(task.head_spec("sentence-encoder").groups) == task.num_labels
    assert BUILTIN_TASKS["cola"].metric == "mcc"
    assert BUILTIN_TASKS["sst2"].template_for("masked-lm") == "{x} It was{mask}."
    assert BUILTIN_TASKS["trec"].template_for("masked-lm") == "{mask}:{x}"


def test_generating_kinds_use_the_reference_code_strings():
    """The RAEE reference scripts' Llama and T5 prompts (the same strings for both), whitespace-stripped at the end
    because each label word is read as its own space-prefixed token."""
    cola = BUILTIN_TASKS["cola"].prompting("causal-lm")
    assert cola.template == "Is the sentence '{x}' grammatically acceptable? Print no or yes. The answer is"
    assert cola.head == LabelWords(("no", "yes"))
    trec = BUILTIN_TASKS["trec"].prompting("encoder-decoder")
    assert trec.template.startswith("Print the category for the sentence '{x}': Description, Entity")
    assert trec.head.words == ("Description", "Entity", "Expression", "Human", "Location", "Number")
    assert BUILTIN_TASKS["subj"].prompting("causal-lm").template == (
        "What is the subjectivity of the sentence '{x}'? Print subjective or objective. The answer is")
    assert BUILTIN_TASKS["sst5"].prompting("encoder-decoder").template == (
        "What is the sentiment of the sentence '{x}'? Print terrible, bad, okay, good or great. The answer is")


def test_prompting_fills_the_mask_and_gives_the_head_spec():
    prompting = BUILTIN_TASKS["sst2"].prompting("masked-lm", "<mask>")
    assert prompting.prompts(["a fine film"]) == ["a fine film It was<mask>."]
    assert prompting.head == LabelWords(("terrible", "great"))
    encoder = BUILTIN_TASKS["sst2"].prompting("sentence-encoder")
    assert encoder.prompts(["a fine film"]) == ["a fine film"] and isinstance(encoder.head, Verbalizations)
    with pytest.raises(TaskError, match="needs a mask token"):
        BUILTIN_TASKS["sst2"].prompting("masked-lm")


def test_task_round_trips_through_its_dict():
    task = BUILTIN_TASKS["sst5"]
    assert TaskDefinition.from_dict(task.to_dict()) == task


def test_user_task_from_yaml(tmp_path):
    path = tmp_path / "spam.yaml"
    path.write_text("name: spam\nlabels: [ham, spam]\ntemplate: '{x} This is{mask}.'\n"
                    "label_words: [fine, spam]\nverbalizers: ['This is a normal message.', "
                    "['This is spam.', 'This is an advert.']]\nmetric: mcc\n")
    task = load_task(path)
    assert task.labels == ("ham", "spam") and task.metric == "mcc"
    # one template holding {mask}: the masked-lm one, and cut before the mask, the generating kinds'
    assert task.templates == {"masked-lm": "{x} This is{mask}.", "causal-lm": "{x} This is",
                              "encoder-decoder": "{x} This is"}
    trec_like = TaskDefinition.from_dict({"name": "t", "labels": ["a", "b"], "template": "{mask}: {x}"})
    assert set(trec_like.templates) == {"masked-lm"}  # no text before the mask: nothing to cut
    assert task.head_spec("masked-lm") == LabelWords(("fine", "spam")) == task.head_spec("causal-lm")
    assert task.verbalizers[1] == ("This is spam.", "This is an advert.")


def test_user_task_from_json_with_per_kind_templates(tmp_path):
    spec = {"name": "q", "labels": ["no", "yes"],
            "template": {"masked-lm": "{x}?{mask}", "causal-lm": "Q: {x} A:"},
            "label_words": {"masked-lm": ["No", "Yes"], "causal-lm": ["no", "yes"]}}
    path = tmp_path / "q.json"
    path.write_text(json.dumps(spec))
    assert load_task(path).template_for("causal-lm") == "Q: {x} A:"


def test_one_template_without_a_mask_serves_the_generating_kinds(tmp_path):
    """The README's task-file example style, as one string: it must not reach a causal LM with a {mask} in it."""
    task = TaskDefinition.from_dict({"name": "q", "labels": ["no", "yes"], "template": "Q: {x} A:",
                                     "label_words": ["no", "yes"]})
    assert set(task.templates) == {"causal-lm", "encoder-decoder"}
    with pytest.raises(TaskError, match="no template for masked-lm"):
        task.prompting("masked-lm", "[MASK]")


@pytest.mark.parametrize("spec, message", [
    ({"name": "a", "labels": ["x"]}, "at least two"),
    ({"name": "a", "labels": ["x", "y"], "metric": "f1"}, "metric"),
    ({"name": "a", "labels": ["x", "y"], "template": "no slot"}, "no {x}"),
    ({"name": "a", "labels": ["x", "y"], "label_words": ["one"]}, "1 masked-lm label words for 2"),
    ({"name": "a", "labels": ["x", "y"], "colour": "red"}, "unknown task field"),
    ({"name": "a", "labels": ["x", "y"], "template": {"causal-lm": "{x} is{mask}"}}, "only masked-lm"),
    ({"name": "a", "labels": ["x", "y"], "template": {"rnn": "{x}"}}, "kind 'rnn' is not one of"),
])
def test_invalid_task_definitions_say_why(spec, message):
    with pytest.raises(TaskError, match=message):
        TaskDefinition.from_dict(spec)


def test_unknown_task_lists_the_builtins():
    with pytest.raises(TaskError, match="sst2"):
        load_task("nope")


def test_jsonl_labels_by_name_or_index(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good", "label": "positive"}\n\n{"text": "bad", "label": 0}\n')
    examples = read_examples(path, BUILTIN_TASKS["sst2"])
    assert [(e.text, e.label, e.line) for e in examples] == [("good", 1, 1), ("bad", 0, 3)]


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_tables_with_named_columns(tmp_path, suffix, sep):
    path = tmp_path / f"d{suffix}"
    path.write_text(f"sentence{sep}gold\ngood film{sep}positive\nbad{sep}0\n")
    examples = read_examples(path, BUILTIN_TASKS["sst2"], text_column="sentence", label_column="gold")
    assert [(e.label, e.line) for e in examples] == [(1, 2), (0, 3)]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok", "label": "positive"}\n{"text": " ", "label": "positive"}\n', r"d.jsonl:2: empty text"),
    ('{"text": "ok", "label": "great"}\n', r"d.jsonl:1: unknown label 'great'"),
    ('{"text": "ok", "label": 7}\n', r"d.jsonl:1: unknown label 7"),
    ('{"text": "ok"\n', r"d.jsonl:1: not valid JSON"),
    ('{"words": "ok", "label": 1}\n', r"d.jsonl:1: needs fields"),
])
def test_bad_rows_name_their_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_examples(path, BUILTIN_TASKS["sst2"])
