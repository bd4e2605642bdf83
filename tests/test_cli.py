"""The command line: train -> eval -> predict on real data, YAML configs and their precedence, errors."""
import json
import os
import pathlib
import re

import pytest
import torch
from PIL import Image

from dbc_fast.cli import COMMANDS, main, parse
from dbc_fast.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    """One epoch of one step of the real DBC Conformer-Ti at 32x32, validated on 4 val images."""
    out = tmp_path_factory.mktemp("cli_run")
    data = shared_data / "tiny-imagenet-mini.tar.gz"
    rc = main(["train", "--dataset", "tiny-imagenet", "--data", str(data), "--img-size", "32", "--batch-size", "2",
               "--epochs", "1", "--max-steps-per-epoch", "1", "--limit-val-images", "4", "--device", "cpu",
               "--num-workers", "0", "--ops-backend", "eager", "--no-progress", "--out", str(out)])
    assert rc == 0
    return out, data


def test_train_writes_checkpoints_and_metrics(trained):
    out, _ = trained
    state = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    config = state["config"]
    assert config["arch"] == "conformer_tiny_patch16" and config["method"] == "dbc"
    assert config["num_classes"] == 10 and len(config["class_names"]) == 10 and config["img_size"] == 32
    assert state["epoch"] == 1 and state["step"] == 0 and state["global_step"] == 1
    (record,) = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert record["epoch"] == 1 and record["train_images"] == 2 and record["val_split"] == "val"
    assert set(record["val"]) >= {"top1_cls", "top5_cls", "gt_known_loc", "top1_loc", "top5_loc"}
    assert record["val"]["count"] == 4
    assert record["best"] == {"top1_loc": record["val"]["top1_loc"], "epoch": 1}
    assert torch.isfinite(torch.tensor(record["train"]["loss"]))


def test_eval_prints_every_figure_and_matches_training_validation(trained, tmp_path, capsys):
    out, data = trained
    rc = main(["eval", "--dataset", "tiny-imagenet", "--data", str(data), "--checkpoint", str(out / "best.pt"),
               "--img-size", "32", "--device", "cpu", "--num-workers", "0", "--limit-images", "4",
               "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.load(open(tmp_path / "metrics.json"))
    assert report["split"] == "val" and report["images"] == 4
    metrics = report["metrics"]
    assert set(metrics) == {"M", "M_a", "M_c"}
    for name, figures in metrics.items():
        for key, label in (("gt_known_loc", "GT-known Loc"), ("top1_loc", "Top-1 Loc"), ("top5_loc", "Top-5 Loc"),
                           ("MaxBoxAccV2", "MaxBoxAccV2"), ("best_top1_loc", "Top-1 Loc, best threshold")):
            assert 0 <= figures[key] <= 100
            assert f"{label} ({name}): {figures[key]:.2f}" in printed
        assert figures["MaxBoxAccV2"] == pytest.approx(
            (figures["MaxBoxAcc@30"] + figures["MaxBoxAcc@50"] + figures["MaxBoxAcc@70"]) / 3)
        assert figures["best_gt_known_loc"] >= figures["gt_known_loc"]  # the sweep includes 0.2
    # the same checkpoint, images and threshold as the training run's validation: the same numbers
    (record,) = [json.loads(line) for line in open(out / "metrics.jsonl")]
    for key in ("top1_cls", "top5_cls", "gt_known_loc", "top1_loc", "top5_loc"):
        assert metrics["M"][key] == record["val"][key]


def test_predict_writes_json_in_original_pixels_and_drawings(trained, tmp_path, capsys):
    out, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    # two real photos at different sizes: a Tiny ImageNet val image, and the same upscaled to 96x80
    from dbc_fast.data import build_dataset
    sample = build_dataset("tiny-imagenet", trained[1], "val", img_size=32).samples[0]
    Image.open(sample.path).convert("RGB").save(images / "a.jpg")
    Image.open(sample.path).convert("RGB").resize((96, 80)).save(images / "b.png")
    rc = main(["predict", "--checkpoint", str(out / "last.pt"), "--images", str(images), "--device", "cpu",
               "--out", str(tmp_path / "pred"), "--draw"])
    assert rc == 0
    result = json.load(open(tmp_path / "pred" / "predictions.json"))
    names = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["config"]["class_names"]
    assert result["img_size"] == 32
    by_file = {os.path.basename(p["file"]): p for p in result["predictions"]}
    assert set(by_file) == {"a.jpg", "b.png"}
    for fname, (w, h) in (("a.jpg", (64, 64)), ("b.png", (96, 80))):
        p = by_file[fname]
        assert p["image_size"] == [w, h]
        assert 0 <= p["class_index"] < 10 and p["class_name"] == names[p["class_index"]]
        assert 0 < p["score"] <= 1 and p["topk"][0]["class_index"] == p["class_index"]
        x0, y0, x1, y1 = p["box"]
        assert 0 <= x0 <= x1 <= w - 1 and 0 <= y0 <= y1 <= h - 1
        drawing = Image.open(p["drawing"])
        # the image beside M_a, M_c and M, each upscaled to a shorter side of 256 px, text strips around
        assert drawing.format == "PNG" and drawing.size[0] >= 4 * round(w * 256 / min(w, h))
        assert drawing.size[1] > 256
    assert "a.jpg:" in capsys.readouterr().out


def test_yaml_config_and_command_line_precedence(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: cub\ndata: /somewhere\nbatch-size: 8\nlr: 0.001\nepochs: 3\nchannels_last: true\n"
                   "betas: [0.8, 0.9]\n")
    _, args = parse(["train", "--config", str(cfg), "--lr", "0.002", "--out", "x"])
    assert (args.dataset, args.data, args.batch_size, args.epochs) == ("cub", "/somewhere", 8, 3)
    assert args.lr == 0.002  # the command line wins over the file
    assert args.channels_last is True and list(args.betas) == [0.8, 0.9]
    assert args.weight_decay == 5e-4 and args.img_size == 224  # built-in defaults stay where neither sets them
    cfg.write_text("resume: true\n")
    assert parse(["train", "--config", str(cfg)])[1].resume == "auto"  # as a bare --resume
    cfg.write_text("maps: [M, M_c]\nsweep-interval: 0\n")
    _, eval_args = parse(["eval", "--config", str(cfg)])
    assert eval_args.maps == ["M", "M_c"] and eval_args.sweep_interval == 0
    _, plain = parse(["train", "--lr", "0.002"])
    assert plain.batch_size == 64 and plain.dataset is None


@pytest.mark.parametrize("text, message", [
    ("batch-size: 8\nbatch-sise: 9\n", "unknown option 'batch-sise'"),
    ("dataset: coco\n", "'coco' is not one of"),
    ("lr: fast\n", "lr: 'fast' is not valid"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_config_file_names_file_and_key(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(UserError) as e:
        parse(["train", "--config", str(cfg)])
    assert message in str(e.value) and str(cfg) in str(e.value)


def test_shipped_configs_are_valid():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert {c.name for c in configs} >= {"quickstart.yaml", "quickstart_eval.yaml", "cub_dbc_tiny.yaml", "ilsvrc_dbc_small.yaml",
                                         "tiny_imagenet_dbc.yaml"}
    for cfg in configs:
        command = "eval" if cfg.stem.endswith("_eval") else "train"
        # --device cpu on the command line overrides a config's cuda (refused at parse time without CUDA)
        device = [] if torch.cuda.is_available() else ["--device", "cpu"]
        _, args = parse([command, "--config", str(cfg), *device])
        assert args.dataset and args.data and args.out, cfg


def test_missing_required_options_and_unknown_command(capsys, user_error):
    assert re.search("train: error: missing required option.*--dataset", user_error(main, ["train", "--out", "x"]))
    assert re.search("missing required option.*--checkpoint",
                     user_error(main, ["eval", "--dataset", "cub", "--data", "x", "--out", "y"]))
    with pytest.raises(SystemExit):
        main(["fly"])
    assert "unknown command 'fly'" in capsys.readouterr().err
    assert set(COMMANDS) == {"train", "eval", "predict", "export", "bench-loader", "profile", "visualize"}
    assert re.search("missing required option.*--checkpoint",
                     user_error(main, ["visualize", "--dataset", "cub", "--data", "x", "--out", "y"]))


def test_train_on_a_mask_set_validates_with_mask_metrics_and_draws_panels(shared_data, tmp_path):
    """voc-seg trains like any dataset (image labels from the masks) and validates on its val split."""
    out = tmp_path / "voc"
    rc = main(["train", "--dataset", "voc-seg", "--data", str(shared_data / "voc2012-seg-sample.tar"), "--img-size", "32",
               "--batch-size", "2", "--epochs", "1", "--max-steps-per-epoch", "1", "--limit-val-images", "4",
               "--device", "cpu", "--num-workers", "0", "--ops-backend", "eager", "--no-progress", "--out", str(out),
               "--visualize", "2"])
    assert rc == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["epoch"] == 1 and record["val_split"] == "val"
    assert "PxAP" in json.dumps(record["val"])
    # --visualize: the first 2 validation images drawn after the epoch, panels at a readable size
    panels = sorted((out / "panels").glob("*.png"))
    assert [p.name.split("_")[0] for p in panels] == ["00000", "00001"]
    assert all(p.name.endswith("_epoch1.png") for p in panels)
    with Image.open(panels[0]) as im:
        assert min(im.size) >= 256 and im.size[0] > 3 * im.size[1]  # image + M_a + M_c + M side by side
