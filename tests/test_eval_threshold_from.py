"""dbc-fast eval --threshold-from: the best-threshold figures' map thresholds chosen on one split and the
evaluated split reported at them (real Tiny ImageNet / CUB data, a Conformer-Ti checkpoint)."""
import json

import pytest
import torch

import dbc_fast
from dbc_fast.cli import main
from dbc_fast.data import build_dataset, collate
from dbc_fast.engine import checkpoint as ckpt_lib
from dbc_fast.metrics import LocalizationEvaluator

IMG, LIMIT = 32, 12

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_checkpoint(shared_data, tmp_path_factory):
    data = shared_data / "tiny-imagenet-mini.tar.gz"
    names = build_dataset("tiny-imagenet", str(data), "val", img_size=IMG).class_names
    torch.manual_seed(0)
    model = dbc_fast.create_model("conformer_tiny_patch16", len(names), method="dbc")
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"model": model.state_dict(),
                "config": ckpt_lib.model_config(model, IMG, names, "tiny-imagenet")}, path)
    return path, data


def eval_args(data, checkpoint, out, *extra):
    return ["eval", "--dataset", "tiny-imagenet", "--data", str(data), "--checkpoint", str(checkpoint),
            "--img-size", str(IMG), "--device", "cpu", "--num-workers", "0", "--limit-images", str(LIMIT),
            "--maps", "M", "--no-progress", "--out", str(out), *extra]


def test_thresholds_chosen_on_another_split_and_reported_at_them(tiny_checkpoint, tmp_path, capsys):
    path, data = tiny_checkpoint
    assert main(eval_args(data, path, tmp_path / "own")) == 0
    own_printed = capsys.readouterr().out
    assert main(eval_args(data, path, tmp_path / "from_train", "--threshold-from", "train")) == 0
    printed = capsys.readouterr().out
    own = json.load(open(tmp_path / "own" / "metrics.json"))
    report = json.load(open(tmp_path / "from_train" / "metrics.json"))
    assert own["threshold_from"] == "val" and "chosen on val itself" in own_printed
    assert report["split"] == "val" and report["threshold_from"] == "train"
    assert "map thresholds chosen on train (12 images), reported on val" in printed
    picked, figures = report["threshold_split_metrics"]["M"], report["metrics"]["M"]
    for key in ("best_threshold", "best_threshold@30", "best_threshold@50", "best_threshold@70"):
        assert figures[key] == picked[key]
    # figures the threshold choice does not touch are those of the plain evaluation
    for key in ("top1_cls", "gt_known_loc", "top1_loc", "threshold", "count"):
        assert figures[key] == own["metrics"]["M"][key]
    assert figures["MaxBoxAccV2"] <= own["metrics"]["M"]["MaxBoxAccV2"]  # the val optimum bounds any choice
    assert figures["best_gt_known_loc"] <= own["metrics"]["M"]["best_gt_known_loc"]

    # independent counts on the val images at the chosen thresholds: largest-contour Loc, every-contour boxes
    model, _ = ckpt_lib.load_model(str(path))
    dataset = build_dataset("tiny-imagenet", str(data), "val", img_size=IMG)
    batch = collate([dataset[i] for i in range(LIMIT)])
    with torch.no_grad():
        out = model(batch["image"], map_classes=batch["label"])
    loc = LocalizationEvaluator()
    loc.accumulate(out["logits"], batch["label"], out["map"], batch["boxes"], picked["best_threshold"],
                   image_size=IMG)
    direct = loc.compute()
    assert figures["best_gt_known_loc"] == direct["gt_known_loc"]
    assert figures["best_top1_loc"] == direct["top1_loc"]
    accs = []
    for iou in (30, 50, 70):
        boxes = LocalizationEvaluator(iou_threshold=iou, multi_contour=True)
        boxes.accumulate(out["logits"], batch["label"], out["map"], batch["boxes"], picked[f"best_threshold@{iou}"],
                         image_size=IMG)
        accs.append(boxes.compute()["gt_known_loc"])
        assert figures[f"MaxBoxAcc@{iou}"] == pytest.approx(accs[-1])
    assert figures["MaxBoxAccV2"] == pytest.approx(sum(accs) / 3)


def test_threshold_from_errors(tiny_checkpoint, shared_data, tmp_path, capsys, user_error):
    path, data = tiny_checkpoint
    assert "is the evaluated split itself" in user_error(main, eval_args(data, path, tmp_path / "a", "--threshold-from", "val"))
    # the CUB sample has no images of wsolevaluation's val split: said in one line, no traceback
    meta = str(shared_data / "wsolevaluation-metadata.tar.gz")
    names = build_dataset("cub", str(shared_data / "cub-sample.tar.gz"), "test", metadata=meta,
                          check_files=False).class_names
    model = dbc_fast.create_model("conformer_tiny_patch16", len(names), method="dbc")
    cub_ckpt = tmp_path / "cub.pt"
    torch.save({"model": model.state_dict(), "config": ckpt_lib.model_config(model, IMG, names, "cub")}, cub_ckpt)
    rc = main(["eval", "--dataset", "cub", "--data", str(shared_data / "cub-sample.tar.gz"),
               "--metadata", meta, "--missing-images", "skip",
               "--checkpoint", str(cub_ckpt), "--img-size", str(IMG), "--device", "cpu", "--num-workers", "0",
               "--maps", "M", "--no-progress", "--threshold-from", "val", "--out", str(tmp_path / "cub")])
    err = capsys.readouterr().err
    assert rc == 1 and "no images found for cub split 'val'" in err
