"""Map panels (dbc_fast.engine.visualize) on real images: layout at a readable size, boxes and mask contour
where they belong, text outside the pictures; `dbc-fast visualize` and `predict --draw` write them."""
import numpy as np
import pytest
import torch
from PIL import Image

import dbc_fast
from dbc_fast.cli import main
from dbc_fast.data import build_dataset
from dbc_fast.data.images import load_image
from dbc_fast.engine import checkpoint as ckpt_lib
from dbc_fast.engine.visualize import GT_COLOUR, MASK_COLOUR, PRED_COLOUR, _GAP, _original_annotations, render_panel
from dbc_fast.metrics import extract_boxes, map_to_original

pytestmark = pytest.mark.usefixtures("one_thread")


def _picture_rows(px, x, width):
    """Rows of the panel whose span [x, x + width) is picture (almost no pure-white pixel), not text strip."""
    white = (px[:, x:x + width] == 255).all(-1).mean(1)
    return np.flatnonzero(white < 0.1)


def _is(pixels, colour):
    return (np.abs(pixels.astype(int) - colour).max(-1) <= 1)


def test_panel_layout_boxes_and_mask_contour_on_voc(shared_data):
    dataset = build_dataset("voc-seg", str(shared_data / "voc2012-seg-sample.tar"), "val", img_size=224)
    sample = dataset.samples[0]
    image = load_image(sample.path)
    gt_boxes, mask = _original_annotations(sample, image)
    w, h = image.size
    # a map that is the object itself (its mask at 14x14): its box is the mask's box
    fg = ((mask != 0) & (mask != 255)).astype(np.float32)
    small = torch.from_numpy(np.array(Image.fromarray(fg).resize((14, 14), Image.BILINEAR)))
    maps = {"map_a": small, "map_c": 1 - small, "map": small}
    panel, boxes = render_panel(image, maps, 0.2, "title", gt_boxes, mask, panel_size=256)
    scale = 256 / min(w, h)
    pw, ph = round(w * scale), round(h * scale)
    assert panel.size[0] == 4 * pw + 5 * _GAP and panel.size[1] > ph  # image + three maps, text strips
    assert set(boxes) == {"map_a", "map_c", "map"}
    expected = np.asarray(extract_boxes(map_to_original(small, w, h), 0.2)).reshape(-1, 4)[0]
    assert boxes["map"] == [float(v) for v in expected]
    px = np.asarray(panel)
    rows = _picture_rows(px, _GAP, pw)
    top = rows[0]
    assert len(rows) == ph and rows[-1] == top + ph - 1  # one block of picture rows, text above and below
    picture = px[top:top + ph, _GAP:_GAP + pw]
    assert (px[top - 1, _GAP:_GAP + pw] == 255).all() and (px[top + ph, _GAP:_GAP + pw] == 255).all()
    # ground truth in red and the mask outline in cyan on the image panel; no predicted box there
    x0, y0, x1, y1 = (int(round(v * scale)) for v in gt_boxes[0])
    x1, y1 = (int(round((v + 1) * scale)) - 1 for v in gt_boxes[0][2:])
    edges = np.concatenate([picture[y0:y1 + 1, x1], picture[y0, x0:x1 + 1]])  # right and top edges
    assert _is(edges, GT_COLOUR).mean() > 0.5  # the mask outline is drawn over it in places
    assert _is(picture, MASK_COLOUR).sum() > 100 and not _is(picture, PRED_COLOUR).any()
    # the final map's panel: its predicted box in green along the box's left edge
    final = px[top:top + ph, _GAP + 3 * (pw + _GAP):_GAP + 3 * (pw + _GAP) + pw]
    bx0, by0, bx1, by1 = (int(round(v * scale)) for v in boxes["map"])
    column = final[by0 + 3:int(round((boxes["map"][3] + 1) * scale)) - 3, bx0]
    assert _is(column, PRED_COLOUR).mean() > 0.9


def test_small_image_upscaled_to_a_readable_panel(shared_data):
    sample = build_dataset("tiny-imagenet", str(shared_data / "tiny-imagenet-mini.tar.gz"), "val", img_size=64).samples[0]
    image = load_image(sample.path)
    assert image.size == (64, 64)
    panel, _ = render_panel(image, {"map": torch.rand(4, 4, generator=torch.Generator().manual_seed(0))})
    assert panel.size[0] >= 2 * 256 and panel.size[1] > 256
    px = np.asarray(panel)
    rows = _picture_rows(px, _GAP, 256)
    assert len(rows) == 256
    # the original, upscaled 4x (LANCZOS), fills a 256 x 256 picture
    picture = px[rows[0]:rows[0] + 256, _GAP:_GAP + 256]
    reference = np.asarray(image.resize((256, 256), Image.LANCZOS))
    assert np.array_equal(picture, reference)


def test_visualize_command_and_predict_draw(shared_data, tmp_path, user_error):
    data = shared_data / "voc2012-seg-sample.tar"
    names = build_dataset("voc-seg", str(data), "val", img_size=64).class_names
    torch.manual_seed(0)
    model = dbc_fast.create_model("conformer_tiny_patch16", len(names), method="dbc")
    checkpoint = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "config": ckpt_lib.model_config(model, 64, names, "voc-seg"),
                "epoch": 2}, checkpoint)
    rc = main(["visualize", "--dataset", "voc-seg", "--data", str(data), "--checkpoint", str(checkpoint),
               "--device", "cpu", "--indices", "0", "5", "--out", str(tmp_path / "panels")])
    assert rc == 0
    files = sorted(p.name for p in (tmp_path / "panels").iterdir())
    assert len(files) == 2 and files[0].startswith("00000_") and files[1].startswith("00005_")
    assert all(f.endswith("_epoch2.png") for f in files)
    for f in files:
        panel = Image.open(tmp_path / "panels" / f)
        assert panel.size[1] > 256 and panel.size[0] >= 4 * 256
    assert "has 153 images" in user_error(main, ["visualize", "--dataset", "voc-seg", "--data", str(data),
                                                 "--checkpoint", str(checkpoint), "--device", "cpu", "--indices",
                                                 "999", "--out", str(tmp_path / "bad")])
