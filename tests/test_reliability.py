"""Reliability under faults and bad input, by class of problem, on real data (tiny-imagenet-mini):
no checkpoint runs code, evaluation checks identity, a run folder is locked and never silently replaced,
signals keep a resumable checkpoint, resume follows changed options, a NaN stop names a finite checkpoint,
impossible options stop at parse time, BOMs are harmless, and a broken model's maps are not hidden.

The training loop is exercised with the small stand-in model of test_engine.py (the loop is under test).
"""
import json
import os
import shlex
import sys

import numpy as np
import pytest
import torch

from dbc_fast.cli import main as cli_main
from dbc_fast.errors import UserError
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


def test_eval_refuses_data_whose_classes_differ_from_the_checkpoint_by_name(shared_data, tmp_path, monkeypatch,
                                                                          user_error):
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

    assert (f"in another order: class 0 is '{wnids[1]}' in the data but '{wnids[0]}' in the checkpoint"
            in user_error(evaluate, data))
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


def test_a_locked_run_folder_refuses_a_second_training(shared_data, tmp_path, monkeypatch, user_error):
    from dbc_fast.engine.run_dir import lock_run_dir

    use_stand_in(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    held = lock_run_dir(str(out))  # a training writing to this folder holds this lock
    try:
        assert "another training is writing to this folder" in user_error(stand_in_run, shared_data, out)
        assert sorted(p.name for p in out.iterdir()) == []  # nothing written, nothing interleaved
    finally:
        os.close(held)
    assert stand_in_run(shared_data, out) == 0  # released: the folder is free again


def test_a_finished_run_is_not_replaced_without_resume_or_overwrite(shared_data, tmp_path, monkeypatch, user_error):
    use_stand_in(monkeypatch)
    out = tmp_path / "run"
    assert stand_in_run(shared_data, out, "--seed", "1") == 0
    best = (out / "best.pt").read_bytes()
    assert "already holds a run (last.pt, best.pt, metrics.jsonl): pass --resume" in \
        user_error(stand_in_run, shared_data, out, "--seed", "2")
    assert (out / "best.pt").read_bytes() == best
    assert "pass one of them" in user_error(stand_in_run, shared_data, out, "--resume", "--overwrite")
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


def test_resume_with_another_arch_is_one_line_naming_both(shared_data, tmp_path, monkeypatch, user_error):
    use_stand_in(monkeypatch)
    out = tmp_path / "run"
    assert stand_in_run(shared_data, out) == 0
    message = user_error(stand_in_run, shared_data, out, "--epochs", "3", "--arch", "conformer_small_patch16",
                         "--resume")
    assert "conformer_tiny_patch16/dbc" in message and "--arch conformer_small_patch16" in message


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
    with pytest.raises(UserError, match=r"img-size: 64.5 is not valid \(64.5 is not an integer\)"):
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


# ------------------------------------------------------------------------------------------------ progress


def progress_args(args):
    return [a for a in args if a != "--no-progress"]


def test_progress_off_a_terminal_is_plain_lines_with_rate_and_eta(shared_data, tmp_path, monkeypatch, capsys):
    # captured stderr is not a terminal, as a log file: no carriage-return bar, a line per interval (0 s here)
    use_stand_in(monkeypatch)
    monkeypatch.setenv("DBC_FAST_PROGRESS_SECONDS", "0")
    out = tmp_path / "run"
    assert cli_main(progress_args(common_args(mini(shared_data), out, "--epochs", "1", "--max-steps-per-epoch", "3",
                                              "--limit-val-images", "4"))) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    steps = [ln for ln in lines if ln.startswith("epoch 1/1: ")]
    assert [ln.split(" ")[2] for ln in steps] == ["1/3", "2/3", "3/3", "3/3"]  # per step, then the last line
    assert all(" step/s, ETA " in ln for ln in steps[:3]) and ", took " in steps[-1] and "loss=" in steps[-1]
    assert cli_main(["eval", "--dataset", "tiny-imagenet", "--data", str(mini(shared_data)), "--checkpoint",
                     str(out / "last.pt"), "--img-size", "32", "--device", "cpu", "--num-workers", "0",
                     "--limit-images", "4", "--batch-size", "2", "--out", str(tmp_path / "eval")]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(" ")[1] for ln in lines if ln.startswith("evaluating: ")] == ["1/2", "2/2", "2/2"]
    assert ", took " in lines[-1] or any(ln.startswith("evaluating: 2/2 batch, ") and ", took " in ln for ln in lines)

    # the default interval is 30 s: a short run prints only each part's last line
    monkeypatch.delenv("DBC_FAST_PROGRESS_SECONDS")
    assert cli_main(progress_args(common_args(mini(shared_data), tmp_path / "run2", "--epochs", "1",
                                              "--max-steps-per-epoch", "3", "--val-split", "none"))) == 0
    steps = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("epoch 1/1: ")]
    assert len(steps) == 1 and steps[0].startswith("epoch 1/1: 3/3 step, ") and ", took " in steps[0]


class FakeTerminal:
    """A stderr that says it is a terminal, keeping what is written (bars included)."""

    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


def box_outside_training_data(shared_data, tmp_path):
    """A copy of the mini set whose first training image's box lies wholly outside its 64x64 image."""
    from dbc_fast.data import build_dataset

    data = copy_mini(shared_data, tmp_path)
    sample = build_dataset("tiny-imagenet", data, "train", img_size=32).samples[0]
    boxes_file = os.path.join(os.path.dirname(os.path.dirname(sample.path)),
                              os.path.basename(os.path.dirname(os.path.dirname(sample.path))) + "_boxes.txt")
    lines = open(boxes_file).read().splitlines()
    name = os.path.basename(sample.path)
    assert lines[0].split("\t")[0] == name
    lines[0] = f"{name}\t70\t10\t90\t58"
    open(boxes_file, "w").write("\n".join(lines) + "\n")
    return data, sample.path


def test_warnings_during_a_terminal_bar_print_on_their_own_line(shared_data, tmp_path, monkeypatch):
    use_stand_in(monkeypatch)
    data, bad = box_outside_training_data(shared_data, tmp_path)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli_main(progress_args(common_args(data, tmp_path / "run", "--epochs", "1", "--limit-train-images", "4",
                                              "--val-split", "none"))) == 0
    text = terminal.text
    assert "epoch 1/1: " in text and "%|" in text  # a tqdm bar was drawn
    (line,) = [ln for ln in text.replace("\r", "\n").split("\n") if "wholly outside" in ln]
    assert "%|" not in line  # no piece of a bar before or after it
    assert line.split("dbc-fast train: warning: ")[1].startswith(
        f"{bad}: box(es) [[70.0, 10.0, 90.0, 58.0]] lie wholly outside the 64x64 image: dropped")


# ---------------------------------------------------------------------------------------- dataset warnings


def test_a_training_box_wholly_outside_its_image_is_said_not_counted_as_unreadable(shared_data, tmp_path,
                                                                                 monkeypatch, capsys):
    from dbc_fast.data import DatasetError, build_dataset

    use_stand_in(monkeypatch)
    data, bad = box_outside_training_data(shared_data, tmp_path)
    out = tmp_path / "run"
    assert cli_main(common_args(data, out, "--epochs", "1", "--limit-train-images", "4", "--val-split", "none")) == 0
    (record,) = read_jsonl(out / "metrics.jsonl")
    assert record["skipped_images"] == 0 and record["train_images"] == 4  # the image trains on its label
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dbc-fast train: warning: ")]
    assert f"dbc-fast train: warning: {bad}: box(es) [[70.0, 10.0, 90.0, 58.0]] lie wholly outside the 64x64 image: " \
           f"dropped (training uses the image's label, not its boxes)" in warnings
    assert not [m for m in warnings if "unreadable" in m or "skipped" in m]

    # evaluation needs the box: there it stops, saying so
    with pytest.raises(DatasetError, match=r"lie wholly outside the 64x64 image") as e:
        build_dataset("tiny-imagenet", data, "train", img_size=32)[0]
    assert e.value.path == bad


def test_a_class_without_images_gets_one_warning_naming_it(shared_data, tmp_path):
    import shutil
    import warnings

    from dbc_fast.data import build_dataset

    data = copy_mini(shared_data, tmp_path)
    names = [ln.strip() for ln in open(data / "wnids.txt")]
    for gone in (names[1], names[4]):
        shutil.rmtree(data / "train" / gone / "images")
        (data / "train" / gone / "images").mkdir()
        (data / "train" / gone / f"{gone}_boxes.txt").write_text("")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_dataset("tiny-imagenet", data, "train", img_size=32, train=True)
    said = [str(w.message) for w in caught if "no images" in str(w.message)]
    assert said == [f"tiny-imagenet train: 2 of 10 classes have no images: {names[1]}, {names[4]}"]
    assert ds.num_classes == 10 and {s.label for s in ds.samples} == set(range(10)) - {1, 4}
    with warnings.catch_warnings(record=True) as caught:  # the full set: nothing to say
        warnings.simplefilter("always")
        build_dataset("tiny-imagenet", mini(shared_data), "train", img_size=32, train=True)
    assert not [w for w in caught if "no images" in str(w.message)]


# ------------------------------------------------------------------------------------------ large images


@pytest.fixture(scope="module")
def raccoon_photo(tmp_path_factory, shared_data):
    """A real photo (650x417) and the same photo upscaled to 6000x3849 (23 megapixels), as JPEGs."""
    import tarfile

    from PIL import Image

    folder = tmp_path_factory.mktemp("raccoon")
    with tarfile.open(shared_data / "raccoon.tar") as tar:
        member = tar.getmember("raccoon/images/raccoon-1.jpg")
        (folder / "raccoon-1.jpg").write_bytes(tar.extractfile(member).read())
    photo = Image.open(folder / "raccoon-1.jpg").convert("RGB")
    photo.resize((6000, 3849), Image.BILINEAR).save(folder / "large.jpg", quality=90)
    return folder / "raccoon-1.jpg", folder / "large.jpg"


@pytest.fixture(scope="module")
def tiny_model_checkpoint(tmp_path_factory):
    import dbc_fast
    from dbc_fast.engine.checkpoint import model_config, save_atomic

    torch.manual_seed(0)
    model = dbc_fast.create_model("conformer_tiny_patch16", 3, method="cls")
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_atomic({"model": model.state_dict(), "config": model_config(model, 64, ["a", "b", "c"], "test")}, str(path))
    return path


def test_predict_refuses_an_image_above_the_pixel_limit_in_one_line(raccoon_photo, tiny_model_checkpoint, tmp_path,
                                                                    capsys):
    _, large = raccoon_photo
    argv = ["predict", "--checkpoint", str(tiny_model_checkpoint), "--images", str(large), "--device", "cpu",
            "--out", str(tmp_path / "out")]
    assert cli_main(argv + ["--max-megapixels", "20"]) == 1
    assert capsys.readouterr().err == (f"dbc-fast predict: error: {large}: the image is 6000x3849 = 23.1 megapixels, "
                                       f"above the 20-megapixel limit (raise it with --max-megapixels)\n")
    assert not (tmp_path / "out").exists()  # refused before any work
    assert cli_main(argv) == 0  # the default limit is 64 megapixels
    (record,) = json.load(open(tmp_path / "out" / "predictions.json"))["predictions"]
    assert record["image_size"] == [6000, 3849]


def test_a_large_jpeg_is_decoded_reduced_and_boxed_in_original_pixels(raccoon_photo, tiny_model_checkpoint):
    from PIL import Image

    from dbc_fast.engine.checkpoint import load_model
    from dbc_fast.data.images import load_image_reduced as _load
    from dbc_fast.engine.predict import image_tensor as _to_tensor
    from dbc_fast.metrics import box_in_original, extract_boxes, map_to_original

    small, large = raccoon_photo
    reduced, size, region = _load(str(large), 4 * 64)
    assert size == (6000, 3849) and reduced.size == (750, 482)  # DCT scaling 1/8, still >= 256 on each side
    assert region == (0, 0, 750, 3849 / 8)  # the last row holds 1/8 of a row of the original
    full = Image.open(large).convert("RGB")
    difference = (_to_tensor(full, 64) - _to_tensor(reduced, 64, region)).abs() * 0.225 * 255  # in grey levels
    assert float(difference.max()) <= 3.01 and float(difference.mean()) < 0.2  # the full decode's input, nearly
    same, size, region = _load(str(small), 4 * 64)  # 417 < 2 x 256: decoded at full size
    assert same.size == size == (650, 417) and region == (0, 0, 650, 417)

    # the box from the full-size map, computed in bands of rows, is extract_boxes' box to the pixel
    model, _ = load_model(str(tiny_model_checkpoint), device=torch.device("cpu"))
    with torch.no_grad():
        maps = model(torch.stack([_to_tensor(reduced, 64), _to_tensor(same, 64)]))["map"].float()
    for m, (w, h) in [(maps[0], (6000, 3849)), (maps[1], (650, 417)), (maps[1] ** 3, (650, 417)),
                      (torch.zeros_like(maps[1]), (650, 417))]:
        for threshold in (0.2, 0.5, 0.8):
            want = np.asarray(extract_boxes(map_to_original(m, w, h), threshold)).reshape(-1, 4)[0].tolist()
            assert box_in_original(m, w, h, threshold, band_rows=37) == want
