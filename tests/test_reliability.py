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


# ----------------------------------------------------------------------------------- locking / overwrite


def test_a_locked_run_folder_refuses_a_second_training(shared_data, tmp_path, monkeypatch):
    from dbc_fast.engine.train import lock_run_dir

    use_stand_in(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    held = lock_run_dir(str(out))  # a training writing to this folder holds this lock
    try:
        with pytest.raises(SystemExit, match="another training is writing to this folder"):
            stand_in_run(shared_data, out)
        assert sorted(p.name for p in out.iterdir()) == []  # nothing written, nothing interleaved
    finally:
        os.close(held)
    assert stand_in_run(shared_data, out) == 0  # released: the folder is free again


def test_a_finished_run_is_not_replaced_without_resume_or_overwrite(shared_data, tmp_path, monkeypatch):
    use_stand_in(monkeypatch)
    out = tmp_path / "run"
    assert stand_in_run(shared_data, out, "--seed", "1") == 0
    best = (out / "best.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"already holds a run \(last.pt, best.pt, metrics.jsonl\): pass --resume"):
        stand_in_run(shared_data, out, "--seed", "2")
    assert (out / "best.pt").read_bytes() == best
    with pytest.raises(SystemExit, match="pass one of them"):
        stand_in_run(shared_data, out, "--resume", "--overwrite")
    assert stand_in_run(shared_data, out, "--seed", "2", "--overwrite") == 0
    assert (out / "best.pt").read_bytes() != best
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]  # only the new run's epochs


# -------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_saves_at_the_step_reached_and_prints_the_resume_command(signame, code, shared_data, tmp_path,
                                                                        monkeypatch, capsys):
    use_stand_in(monkeypatch)
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    settings = ["--epochs", "2", "--max-steps-per-epoch", "3", "--val-split", "none", "--log-every", "5"]
    assert cli_main(common_args(mini(shared_data), full, *settings)) == 0
    capsys.readouterr()
    # the signal arrives after the 4th step: epoch 2, step 1
    rc = cli_main(common_args(mini(shared_data), stopped, *settings, "--debug-signal-after-steps", "4",
                              "--debug-signal", signame))
    assert rc == code
    printed = capsys.readouterr().out
    assert f"{signame}: stopped at epoch 2, step 1 (global step 4); saved {stopped / 'last.pt'}" in printed
    command = printed.split("Resume with:\n")[1].strip().splitlines()[0]
    state = torch.load(stopped / "last.pt", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 1, 4)
    tokens = shlex.split(command)
    assert tokens[0] == "dbc-fast" and tokens[-1] == "--resume" and "--debug-signal-after-steps" not in tokens
    assert cli_main(tokens[1:]) == 0  # the printed command finishes the run ...
    a = torch.load(full / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(stopped / "last.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # ... as if never stopped
    assert [r["train"] for r in read_jsonl(full / "metrics.jsonl")] == \
        [r["train"] for r in read_jsonl(stopped / "metrics.jsonl")]


def write_broken_image(path, keep_header: bool):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2] if keep_header else b"not an image")  # half a JPEG: opens, fails to decode


def test_unreadable_validation_image_is_found_before_training(shared_data, tmp_path, monkeypatch, capsys):
    from dbc_fast.data import build_dataset

    use_stand_in(monkeypatch)
    data = copy_mini(shared_data, tmp_path)
    bad = build_dataset("tiny-imagenet", data, "val", img_size=32).samples[1].path
    write_broken_image(bad, keep_header=False)
    out = tmp_path / "run"
    rc = cli_main(common_args(data, out, "--epochs", "1", "--max-steps-per-epoch", "1", "--limit-val-images", "4"))
    assert rc == 1
    assert f"{bad}: val (validation) image cannot be read: UnidentifiedImageError" in capsys.readouterr().err
    assert not (out / "last.pt").exists()


def test_validation_failing_mid_run_keeps_the_trained_epoch(shared_data, tmp_path, monkeypatch, capsys):
    from dbc_fast.data import build_dataset

    use_stand_in(monkeypatch)
    data = copy_mini(shared_data, tmp_path)
    bad = build_dataset("tiny-imagenet", data, "val", img_size=32).samples[1].path
    write_broken_image(bad, keep_header=True)  # passes the up-front check, fails when decoded
    out = tmp_path / "run"
    rc = cli_main(common_args(data, out, "--epochs", "2", "--max-steps-per-epoch", "2", "--limit-val-images", "4"))
    assert rc == 1 and os.path.basename(bad) in capsys.readouterr().err
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 0, 2)


# ---------------------------------------------------------------------------------- resume with changes


def test_resume_with_new_epochs_and_lr_follows_the_new_schedule_from_the_restored_step(shared_data, tmp_path,
                                                                                      monkeypatch, capsys):
    use_stand_in(monkeypatch)
    short, extended, fresh = tmp_path / "short", tmp_path / "extended", tmp_path / "fresh"
    assert stand_in_run(shared_data, short) == 0
    os.rename(short, extended)  # a finished 2-epoch run at 5e-4, extended to 4 epochs at 1e-3
    assert cli_main(common_args(mini(shared_data), extended, "--epochs", "4", "--max-steps-per-epoch", "2",
                                "--val-split", "none", "--lr", "1e-3", "--resume")) == 0
    out = capsys.readouterr().out
    assert "--epochs 4 (was 2), --lr 0.001 (was 0.0005)" in out and "recomputed" in out
    assert cli_main(common_args(mini(shared_data), fresh, "--epochs", "4", "--max-steps-per-epoch", "2",
                                "--val-split", "none", "--lr", "1e-3")) == 0
    lr_extended = [r["lr"] for r in read_jsonl(extended / "metrics.jsonl")]
    lr_fresh = [r["lr"] for r in read_jsonl(fresh / "metrics.jsonl")]
    assert lr_extended[2:] == lr_fresh[2:]  # epochs 3-4 at the new schedule's LR for their steps
    assert min(lr_extended[2:]) > 1e-5  # not stuck at the old schedule's minimum


def test_resume_with_another_arch_is_one_line_naming_both(shared_data, tmp_path, monkeypatch):
    use_stand_in(monkeypatch)
    out = tmp_path / "run"
    assert stand_in_run(shared_data, out) == 0
    with pytest.raises(SystemExit) as e:
        stand_in_run(shared_data, out, "--epochs", "3", "--arch", "conformer_small_patch16", "--resume")
    message = str(e.value)
    assert "conformer_tiny_patch16/dbc" in message and "--arch conformer_small_patch16" in message
    assert len(message.splitlines()) == 1


# ------------------------------------------------------------------------------------------------ NaN


@pytest.mark.parametrize("save_every", ["0", "1"])
def test_nan_stop_names_an_existing_checkpoint_with_finite_weights(save_every, shared_data, tmp_path, monkeypatch,
                                                                   capsys):
    # Call 3 (epoch 2, step 1) has a finite loss but a NaN gradient: the update breaks the weights; the NaN shows
    # at the next loss check (or at the next checkpoint, whose weights are checked before writing).
    use_stand_in(monkeypatch, nan_grad_at_call=3)
    out = tmp_path / "run"
    rc = stand_in_run(shared_data, out, "--epochs", "3", "--save-every-steps", save_every)
    assert rc == 3
    err = capsys.readouterr().err
    named = err.split("the last good checkpoint is ")[1].split(" ")[0]
    assert named == str(out / "last.pt")
    state = torch.load(named, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_before_any_checkpoint_says_there_is_none(shared_data, tmp_path, monkeypatch, capsys):
    use_stand_in(monkeypatch, nan_at_call=1)
    out = tmp_path / "run"
    assert stand_in_run(shared_data, out) == 3
    assert "no checkpoint was written yet, so there is nothing to resume" in capsys.readouterr().err
    assert not (out / "last.pt").exists()


# ---------------------------------------------------------------------------------------------- text files


def test_utf8_byte_order_marks_in_list_and_annotation_files_are_dropped(shared_data, tmp_path):
    from dbc_fast.data import build_dataset

    want = build_dataset("tiny-imagenet", mini(shared_data), "val", img_size=32)
    data = copy_mini(shared_data, tmp_path)
    for f in (data / "wnids.txt", data / "val" / "val_annotations.txt"):  # as a Windows editor saves them
        f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    got = build_dataset("tiny-imagenet", data, "val", img_size=32)
    assert got.class_names == want.class_names and "\ufeff" not in got.class_names[0]
    assert [(os.path.basename(s.path), s.label) for s in got.samples] == \
        [(os.path.basename(s.path), s.label) for s in want.samples]


# ---------------------------------------------------------------------------------------- option values


@pytest.mark.parametrize("argv, option", [
    (["predict", "--topk", "0"], "--topk"),
    (["predict", "--batch-size", "0"], "--batch-size"),
    (["predict", "--img-size=-64"], "--img-size"),
    (["predict", "--cam-threshold", "5"], "--cam-threshold"),
    (["train", "--img-size", "0"], "--img-size"),
    (["train", "--img-size", "64.5"], "--img-size"),
    (["train", "--lr=-1e-3"], "--lr"),
    (["train", "--num-workers", "-1"], "--num-workers"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--cam-threshold", "5"], "--cam-threshold"),
    (["train", "--max-skipped-fraction", "2"], "--max-skipped-fraction"),
    (["eval", "--batch-size", "0"], "--batch-size"),
    (["eval", "--sweep-interval", "1"], "--sweep-interval"),
    (["export", "--checkpoint", "x.pt", "--out", "m.ts", "--topk", "0"], "--topk"),
])
def test_impossible_option_values_stop_at_parse_time_in_one_line(argv, option, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"argument {option}" in err, err


def test_output_that_cannot_be_written_is_refused_before_any_work(shared_data, tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    for argv in (["eval", "--dataset", "tiny-imagenet", "--data", str(mini(shared_data)), "--checkpoint", "x.pt",
                  "--out", str(a_file)],
                 common_args(mini(shared_data), a_file / "run"),
                 ["predict", "--checkpoint", "x.pt", "--images", str(tmp_path), "--out", str(a_file)],
                 ["export", "--checkpoint", "x.pt", "--out", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "argument --out" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_device_cuda_without_cuda_is_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["predict", "--device", "cuda"])
    assert e.value.code == 2 and "torch sees no CUDA device" in capsys.readouterr().err


def test_yaml_non_integer_image_size_is_refused(tmp_path):
    from dbc_fast.cli import parse

    cfg = tmp_path / "run.yaml"
    cfg.write_text("img-size: 64.5\n")
    with pytest.raises(SystemExit, match=r"img-size: 64.5 is not valid \(64.5 is not an integer\)"):
        parse(["train", "--config", str(cfg)])
    cfg.write_text("img-size: 64.0\n")
    assert parse(["train", "--config", str(cfg)])[1].img_size == 64


# ------------------------------------------------------------------------------- evaluation of a broken model


def test_invalid_box_has_no_iou():
    from dbc_fast.metrics import iou_matrix

    assert iou_matrix([[0, 0, 9, 9]], [[0, 0, 4, 9]])[0, 0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"invalid box \[5, 0, 2, 9\]"):
        iou_matrix([[5, 0, 2, 9]], [[0, 0, 9, 9]])


def test_nonfinite_maps_stop_evaluation_unless_allowed_and_are_counted(shared_data, tmp_path, monkeypatch, capsys):
    import dbc_fast
    from dbc_fast.engine.evaluate import NonFiniteMaps
    from test_engine import StandInModel

    use_stand_in(monkeypatch)
    run = tmp_path / "run"
    assert cli_main(common_args(mini(shared_data), run, "--epochs", "1", "--max-steps-per-epoch", "1",
                                "--val-split", "none")) == 0

    class BrokenMaps(StandInModel):  # every second image's map is NaN
        def forward(self, images, labels=None, map_classes=None):
            out = super().forward(images, labels, map_classes)
            m = out["map"].clone()
            m[::2] = float("nan")
            return {**out, "map": m}

    monkeypatch.setattr(dbc_fast, "create_model", lambda arch, n, method="dbc", pretrained=None, **o:
                        BrokenMaps(arch, n, method, **o))
    argv = ["eval", "--dataset", "tiny-imagenet", "--data", str(mini(shared_data)), "--checkpoint",
            str(run / "last.pt"), "--img-size", "32", "--device", "cpu", "--num-workers", "0", "--limit-images", "6",
            "--batch-size", "3", "--maps", "M", "--no-progress", "--out", str(tmp_path / "eval")]
    with pytest.raises(NonFiniteMaps, match="2 of 3 M maps in a batch hold NaN/inf values"):
        cli_main(argv)
    assert not (tmp_path / "eval" / "metrics.json").exists()
    assert cli_main(argv + ["--allow-nonfinite-maps"]) == 0
    report = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert report["metrics"]["M"]["nonfinite_maps"] == 4  # images 0 and 2 of each batch of 3
    assert "4 of 6 M maps held NaN/inf values" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ worker errors


def test_loader_worker_error_arrives_as_the_original_one_line_message(shared_data, tmp_path):
    from dbc_fast.data import DatasetError, build_dataset
    from dbc_fast.data.loader import build_loader

    data = copy_mini(shared_data, tmp_path)
    dataset = build_dataset("tiny-imagenet", data, "val", img_size=32)
    bad = dataset.samples[2].path
    write_broken_image(bad, keep_header=False)
    loader = build_loader(dataset, 4, train=False, device="cpu", num_workers=1)
    with pytest.raises(DatasetError) as e:
        for _ in loader:
            pass
    assert str(e.value).startswith(f"{bad}: ") and len(str(e.value).splitlines()) == 1, str(e.value)
