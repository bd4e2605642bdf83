"""Reliability under faults and bad input, by class of problem, on real data (tiny-imagenet-mini):
no checkpoint runs code, evaluation checks identity, a run folder is locked and never silently replaced,
signals keep a resumable checkpoint, resume follows changed options, a NaN stop names a finite checkpoint,
impossible options stop at parse time, BOMs are harmless, and a broken model's maps are not hidden.

The training loop is exercised with the small stand-in model of test_engine.py (the loop is under test).
"""
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

from dbc_fast.cli import main as cli_main
from test_engine import common_args, read_jsonl, use_stand_in

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mini(shared_data):
    return shared_data / "tiny-imagenet-mini.tar.gz"


def stand_in_run(shared_data, out, *extra):
    """A 2-epoch run of 2 steps each with the stand-in model and no validation: fast."""
    return cli_main(common_args(mini(shared_data), out, "--epochs", "2", "--max-steps-per-epoch", "2",
                                "--val-split", "none", *extra))


# ------------------------------------------------------------------------------------------- security


class Payload:
    """Unpickling this calls os.makedirs(marker): code run from a checkpoint file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture
def evil_checkpoint(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    # a dbc_fast-looking checkpoint whose weights are a pickled call, saved as torch.save saves
    torch.save({"model": Payload(marker), "config": {"arch": "conformer_tiny_patch16"}}, path)
    return path, marker


@pytest.mark.parametrize("command", ["predict", "eval", "resume", "export", "pretrained"])
def test_malicious_checkpoint_is_refused_and_never_runs(command, evil_checkpoint, shared_data, tmp_path, capsys):
    evil, marker = evil_checkpoint
    data = str(mini(shared_data))
    out = str(tmp_path / "out")
    argv = {
        "predict": ["predict", "--checkpoint", str(evil), "--images", os.path.join(ROOT, "README.md"),
                    "--device", "cpu", "--out", out],
        "eval": ["eval", "--dataset", "tiny-imagenet", "--data", data, "--checkpoint", str(evil), "--img-size", "32",
                 "--device", "cpu", "--num-workers", "0", "--no-progress", "--out", out],
        "resume": common_args(data, out, "--epochs", "1", "--resume", str(evil)),
        "export": ["export", "--checkpoint", str(evil), "--out", str(tmp_path / "m.ts")],
        "pretrained": common_args(data, out, "--epochs", "1", "--pretrained", str(evil)),
    }[command]
    rc = cli_main(argv)
    err = capsys.readouterr().err
    assert rc == 1
    assert not marker.exists(), "the checkpoint ran code"
    assert str(evil) in err and "refusing" in err and "os.makedirs" in err
    assert len(err.strip().splitlines()) == 1, err


def test_training_checkpoints_hold_only_tensors_and_plain_types(shared_data, tmp_path, monkeypatch):
    from dbc_fast.engine.checkpoint import load_checkpoint, set_rng_state

    use_stand_in(monkeypatch)
    out = tmp_path / "run"
    assert stand_in_run(shared_data, out, "--save-every-steps", "1") == 0
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)  # no pickled object inside
    assert json.loads(json.dumps(state["config"])) == state["config"]
    assert json.loads(json.dumps(state["train_args"])) == state["train_args"]
    (rng,) = state["rng"]
    assert all(isinstance(rng[k], torch.Tensor) for k in ("python", "numpy", "torch"))
    # the saved RNG states restore the streams exactly
    import random

    import numpy as np

    set_rng_state(rng)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(str(out / "last.pt"))["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


# ------------------------------------------------------------------------------------------- identity


def copy_mini(shared_data, tmp_path):
    from test_engine import copy_tiny_imagenet

    return copy_tiny_imagenet(shared_data, tmp_path)


def test_eval_refuses_data_whose_classes_differ_from_the_checkpoint_by_name(shared_data, tmp_path, monkeypatch):
    use_stand_in(monkeypatch)
    run = tmp_path / "run"
    assert cli_main(common_args(mini(shared_data), run, "--epochs", "1", "--max-steps-per-epoch", "1",
                                "--val-split", "none")) == 0
    data = copy_mini(shared_data, tmp_path)
    wnids = (data / "wnids.txt").read_text().split()
    (data / "wnids.txt").write_text("\n".join([wnids[1], wnids[0], *wnids[2:]]) + "\n")  # same classes, other order

    def evaluate(folder):
        return cli_main(["eval", "--dataset", "tiny-imagenet", "--data", str(folder), "--checkpoint",
                         str(run / "last.pt"), "--img-size", "32", "--device", "cpu", "--num-workers", "0",
                         "--limit-images", "4", "--no-progress", "--no-maxboxacc", "--out", str(tmp_path / "eval")])

    with pytest.raises(SystemExit, match=f"in another order: class 0 is '{wnids[1]}' in the data but "
                                         f"'{wnids[0]}' in the checkpoint"):
        evaluate(data)
    assert not (tmp_path / "eval" / "metrics.json").exists()
    assert evaluate(mini(shared_data)) == 0  # the training data's own order is accepted


def test_duplicate_annotation_line_stops_the_build_naming_file_and_line(shared_data, tmp_path):
    from dbc_fast.data import DatasetError, build_dataset

    data = copy_mini(shared_data, tmp_path)
    annotations = data / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    annotations.write_text("\n".join(lines + [lines[2]]) + "\n")
    with pytest.raises(DatasetError, match=rf"val_annotations.txt, line {len(lines) + 1}: image .* is listed "
                                           rf"twice \(first at .*val_annotations.txt, line 3\)"):
        build_dataset("tiny-imagenet", data, "val", img_size=32)
