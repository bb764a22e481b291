"""Every CLI error the README lists under "Errors" is one line on stderr and exit 2, with no traceback; and the
input quirks that used to end in one (a CSV with a byte-order mark, the README's task file on a causal LM)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from indexer.cli import main as raee_index
from indexer.cli import quiet_progress
from indexer.evaluate import main as raee_eval
from service.admin import main as raee_admin
from service.server import main as raee_serve
from tests.tiny import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory, sst2_like):
    base = tmp_path_factory.mktemp("cli-errors")
    bert = save_checkpoint("bert-mlm", base / "bert")
    (base / "empty").mkdir()
    no_tokenizer = base / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((bert / name).read_bytes())
    unknown_arch = base / "unknown-arch"
    unknown_arch.mkdir()
    for f in bert.iterdir():
        (unknown_arch / f.name).write_bytes(f.read_bytes())
    config = json.loads((bert / "config.json").read_text())
    (unknown_arch / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    (base / "bad.yaml").write_text("stores: [a\n")
    (base / "list.yaml").write_text("- port\n")
    (base / "unk-task.yaml").write_text('name: t\nlabels: [negative, positive]\ntemplate: "{x} It was{mask}."\n'
                                        "label_words: [good, zebra]\n")
    store = base / "store"
    assert raee_index(["build", "--task", "sst2", "--train", str(sst2_like), "--out", str(store), "--backbone",
                       str(bert), "--limit", "60", "--key", "prefix:1", "--no-progress", "--objective", "best"]) == 0
    return {"base": base, "bert": str(bert), "store": str(store), "train": str(sst2_like)}


# (command, arguments with {base}/{bert}/{store}/{train} filled in, what the one line says)
ERRORS = [
    ("raee-index", "build --task sst2 --train {train} --out {base}/s1 --backbone {base}/empty",
     "holds no config.json, so it is not a transformers checkpoint"),
    ("raee-index", "build --task sst2 --train {train} --out {base}/s2 --backbone {base}/no-tokenizer",
     "holds no tokenizer files"),
    ("raee-index", "build --task sst2 --train {train} --out {base}/s3 --backbone {base}/unknown-arch",
     "pass --kind"),
    ("raee-index", "build --task {base}/unk-task.yaml --train {train} --out {base}/s4 --backbone {bert}",
     "label word 'zebra' is unknown to this tokenizer"),
    ("raee-index", "build --task sst2 --train {train} --out {base}/s5 --backbone {bert} --text-column body",
     "needs fields 'body' and 'label'"),
    ("raee-index", "inspect {base}/empty", "not an exit store"),
    ("raee-index", "export --backbone {bert} --prefix-layers 9", "--prefix-layers: 9 is not a layer"),
    ("raee-index", "build --task sst2 --train {train} --out {base}/s6 --backbone {bert} --key auto:1",
     "auto needs two or more prefix layers"),
    ("raee-index", "build --task sst2 --train {train} --out {base}/s7 --backbone {bert} --key auto --shard 0/2",
     "a shard is calibrated only when merged"),
    ("raee-index", "tune --task sst2 --train {train} --backbone {bert} --depth-budget 1.5",
     "depth budget must lie in (0, 1]"),
    ("raee-eval", "--store {store} --test {train} --backbone {base}/empty", "holds no config.json"),
    ("raee-eval", "--store {store} --test {train} --label-column y", "needs fields 'text' and 'y'"),
    ("raee-eval", "--store {store} --store {store} --test {train}", "give one --test per --store"),
    ("raee-serve", "--config {base}/missing.yaml", "--config {base}/missing.yaml: No such file or directory"),
    ("raee-serve", "--config /dev/zero", "--config /dev/zero: not a regular file"),
    ("raee-serve", "--config {base}/bad.yaml", "not valid YAML at line 2"),
    ("raee-serve", "--config {base}/list.yaml", "expected a mapping of settings"),
    ("raee-serve", "--store {store} --admin flase", "admin must be true or false, got 'flase'"),
    ("raee-serve", "--store {store} --max-batch many", "max_batch must be an int, got 'many'"),
    ("raee-serve", "--store {store} --max-wait-ms inf", "max_wait_ms must be a number of milliseconds from 0 to"),
    ("raee-serve", "--store {base}/empty", "not an exit store"),
    ("raee-serve", "--store {store} --backbone {base}/empty", "holds no config.json"),
    ("raee-admin", "classify --task sst2 --policy bogus good", "policy 'bogus' is not one of"),
    ("raee-admin", "classify --task sst2 --policy calibrated:best good", "cannot be sent to a server"),
    ("raee-admin", "classify --task sst2 --policy " + "x" * 300 + " good", "a policy of 300 characters;"),
    ("raee-admin", "--token-file {base}/missing reload --task sst2 --store x", "No such file or directory"),
    ("raee-admin", "--tls-ca {base}/missing.pem info", "No such file or directory ({base}/missing.pem)"),
    ("raee-admin", "--tls-ca /dev/zero info", "not a regular file (/dev/zero)"),  # read whole: never endless
    ("raee-admin", "--token-file /dev/zero reload --task sst2 --store x", "--token-file /dev/zero: not a regular file"),
    ("raee-admin", "--address no-such-host.invalid:50051 rollout --every-address --task sst2 --version latest",
     "no replica answers: no-such-host.invalid does not resolve"),
]
MAINS = {"raee-index": raee_index, "raee-eval": raee_eval, "raee-serve": raee_serve, "raee-admin": raee_admin}


@pytest.mark.parametrize("command, arguments, message", ERRORS, ids=[f"{c} {a[:40]}" for c, a, _ in ERRORS])
def test_each_documented_cli_error_is_one_line_and_exit_2(files, command, arguments, message, capsys):
    argv = [part.format(**files) for part in arguments.split()]
    assert MAINS[command](argv) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith(command)]  # beside log lines
    assert len(ours) == 1 and "error:" in ours[0], err
    assert message.format(**files) in ours[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("arguments, message", [
    ("--timeout -1 info", "must be a number of seconds above 0"), ("--timeout nan info", "above 0"),
    ("wait --for -5", "above 0"), ("wait --for inf", "above 0"),
    ("--address 127.0.0.1:99999 info", "not HOST:PORT with a port in 1..65535"),  # gRPC would dial 34463
    ("rollout --task sst2 --version latest --address host", "not HOST:PORT")])
def test_raee_admin_refuses_numbers_out_of_range(arguments, message, capsys):
    with pytest.raises(SystemExit) as exited:
        raee_admin(arguments.split())
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and message in err[-1], err


def test_the_readme_lists_every_walked_error():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Errors", 1)[1].split("\n## ", 1)[0]
    for command, _, message in ERRORS:
        assert command in section
    assert "exit 2" in section


def test_a_plot_without_matplotlib_fails_before_the_store_is_written(files, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = files["base"] / "plotless"
    assert raee_index(["build", "--task", "sst2", "--train", files["train"], "--out", str(out), "--backbone",
                       files["bert"], "--plot", str(files["base"] / "p.png"), "--no-progress"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not out.exists()
    assert raee_eval(["--store", files["store"], "--test", files["train"], "--plot", "x.png"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_a_csv_with_a_byte_order_mark_reads(tmp_path):
    from raee.data import read_examples
    from raee.tasks import BUILTIN_TASKS
    path = tmp_path / "excel.csv"
    path.write_text("text,label\ngood film,positive\nawful,negative\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    examples = read_examples(path, BUILTIN_TASKS["sst2"])
    assert [(e.text, e.label) for e in examples] == [("good film", 1), ("awful", 0)]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_text('{"text": "good", "label": 1}\n', encoding="utf-8-sig")
    assert read_examples(jsonl, BUILTIN_TASKS["sst2"])[0].text == "good"


def test_the_readme_task_file_serves_every_kind(tmp_path, capsys):
    import yaml

    from raee.kinds import KINDS
    from raee.tasks import TaskDefinition
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Your own task is a YAML or JSON file:\n\n```yaml\n", 1)[1].split("```", 1)[0]
    task = TaskDefinition.from_dict(yaml.safe_load(block))
    for kind in KINDS:
        prompting = task.prompting(kind, "[MASK]")
        assert "{x}" in prompting.template, kind
    assert task.prompting("causal-lm").template == "{x} This is"  # the masked template, cut before its mask
    # end to end on a tiny causal LM (its vocabulary lacks "spam": label words it knows)
    spec = yaml.safe_load(block) | {"label_words": ["good", "bad"]}
    (tmp_path / "spam.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "spam.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in
                                                 [("good film", "ham"), ("dull plot", "spam")] * 10))
    gpt2 = save_checkpoint("gpt2", tmp_path / "gpt2")
    assert raee_index(["build", "--task", str(tmp_path / "spam.yaml"), "--train", str(tmp_path / "spam.jsonl"),
                       "--out", str(tmp_path / "store"), "--backbone", str(gpt2), "--no-progress",
                       "--objective", "best"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("tty, no_progress, expected", [(True, False, False), (True, True, True),
                                                        (False, False, True)])
def test_progress_bars_only_on_a_terminal(monkeypatch, tty, no_progress, expected):
    from transformers.utils import logging as transformers_logging
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    args = argparse.Namespace(no_progress=no_progress)
    transformers_logging.enable_progress_bar()
    quiet_progress(args)
    assert args.no_progress is expected
    assert transformers_logging.is_progress_bar_enabled() is not expected
    transformers_logging.enable_progress_bar()


def test_raee_eval_reads_other_columns(files, tmp_path, capsys):
    renamed = tmp_path / "renamed.jsonl"
    rows = [json.loads(line) for line in Path(files["train"]).read_text().splitlines()[:30]]
    renamed.write_text("".join(json.dumps({"body": r["text"], "y": r["label"]}) + "\n" for r in rows))
    assert raee_eval(["--store", files["store"], "--test", str(renamed), "--text-column", "body",
                      "--label-column", "y", "--policies", "full", "--timing-sample", "0", "--no-progress",
                      "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 30
