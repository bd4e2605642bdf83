"""Export for C++ inference: the box op, TorchScript and AOTInductor files, and the dbc_infer program.

* dbc_fast::largest_box equals dbc_fast.metrics.extract_boxes (wsolevaluation's rules) on real maps:
  the luminance of real photos (many regions, holes, ties) and a model's maps, at many thresholds;
* a seeded conformer_tiny checkpoint exported to TorchScript and to a .pt2 (64x64 input, as the Tiny
  ImageNet images) loads in a fresh Python process that imports only torch and the op library, and
  gives the eager module's logits, maps and boxes on real images (another batch size than at export);
* csrc/example builds with CMake against the venv's libtorch and prints the JSON Python prints for a
  real JPEG and a PNG, with both formats.
The AOTInductor compile (about 2 minutes on 2 busy cores) and the CMake build (about 1 minute, cached
in csrc/example/build) are done once per session.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch
import torch.nn.functional as F

import dbc_fast
from dbc_fast import export as ex
from dbc_fast import ops
from dbc_fast.metrics import extract_boxes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG = 64  # Tiny ImageNet's size; a multiple of 32
THRESHOLD = 0.5  # an untrained model's map at 0.2 often covers the whole image; 0.5 gives varied boxes

pytestmark = pytest.mark.skipif(ops.library_path() is None, reason="the op library dbc_fast/_C.so is not built")


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def op_library():
    return ex.load_op_library()


@pytest.fixture(scope="session")
def real_images(shared_data, tmp_path_factory):
    """Paths of real photos: 6 ILSVRC val JPEGs (227x227), 1 raccoon JPEG (large, not square), 1 PNG."""
    out = tmp_path_factory.mktemp("export_images")
    with tarfile.open(shared_data / "ilsvrc-val-300.tar") as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith(".JPEG")), key=lambda m: m.name)[:6]
        tar.extractall(out, members=members, filter="data")
    jpegs = [str(out / m.name) for m in members]
    with tarfile.open(shared_data / "raccoon.tar") as tar:
        member = tar.getmember("raccoon/images/raccoon-1.jpg")
        tar.extractall(out, members=[member], filter="data")
    raccoon = str(out / member.name)
    from PIL import Image

    png = str(out / "ilsvrc_as.png")
    Image.open(jpegs[-1]).convert("RGB").save(png)  # lossless: the same pixels as the JPEG decodes to
    # other layouts dbc_infer must decode as PIL's convert("RGB") does
    variants = {"rgba.png": Image.open(jpegs[1]).convert("RGBA"), "palette.png": Image.open(jpegs[2]).convert("P"),
                "gray.png": Image.open(jpegs[3]).convert("L"), "gray.jpg": Image.open(jpegs[4]).convert("L")}
    for name, img in variants.items():
        if name == "rgba.png":
            img.putalpha(Image.linear_gradient("L").resize(img.size))  # varied alpha: must be dropped, not composited
        img.save(out / name)
    return {"jpegs": jpegs, "raccoon": raccoon, "png": png, "variants": [str(out / n) for n in variants]}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A seeded, untrained conformer_tiny DBC checkpoint in the trainer's format (10 classes)."""
    from dbc_fast.engine.checkpoint import model_config

    torch.manual_seed(0)
    model = dbc_fast.create_model("conformer_tiny_patch16", 10, method="dbc")
    names = [f"class {i} \"quoted\"" for i in range(10)]  # the C++ JSON must escape them
    path = tmp_path_factory.mktemp("export_ckpt") / "ckpt.pt"
    torch.save({"model": model.state_dict(), "config": model_config(model, IMG, names, "test")}, path)
    return str(path)


@pytest.fixture(scope="session")
def eager_module(checkpoint, op_library):
    model, _ = ex.load_checkpoint_model(checkpoint)
    return ex.InferenceModule(model, (IMG, IMG), cam_threshold=THRESHOLD, topk=3).eval()


@pytest.fixture(scope="session")
def exported(checkpoint, op_library, tmp_path_factory):
    """{format: path}; TorchScript through the CLI entry point (with its built-in check), .pt2 directly."""
    out = tmp_path_factory.mktemp("export_files")
    from dbc_fast.cli import main

    ts = str(out / "model.ts")  # the format follows the name: TorchScript
    assert main(["export", "--checkpoint", checkpoint, "--out", ts, "--cam-threshold", str(THRESHOLD),
                 "--topk", "3"]) == 0
    pt2 = str(out / "model.pt2")
    ex.export_checkpoint(checkpoint, pt2, fmt="aoti", cam_threshold=THRESHOLD, topk=3, batch=2, max_batch=16,
                         inductor_configs={"aot_inductor.compile_wrapper_opt_level": "O0"})
    return {"torchscript": ts, "aoti": pt2}


def _batch(paths):
    return torch.cat([ex.resize_pixels(ex.read_image_uint8(p), (IMG, IMG)) for p in paths])


# ------------------------------------------------------------------------------------------------ box op

def test_largest_box_equals_metrics_extract_boxes_on_real_maps(real_images, op_library):
    # Luminance of real photos as maps: many regions with holes and equal-area ties at high thresholds.
    maps = []
    for path in real_images["jpegs"] + [real_images["raccoon"]]:
        img = ex.read_image_uint8(path).float()
        lum = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None, None]
        maps.append(F.interpolate(lum, size=(96, 128), mode="bilinear", align_corners=False)[0, 0])
    maps = torch.stack(maps)
    checked = 0
    for threshold in (0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.97):
        got = torch.ops.dbc_fast.largest_box(maps, threshold)
        for i in range(len(maps)):
            expected = extract_boxes(maps[i], threshold)[0]
            assert got[i].tolist() == expected.tolist(), f"map {i} at threshold {threshold}"
            checked += 1
    assert checked == 63


def test_largest_box_equals_metrics_on_model_maps_and_edge_cases(eager_module, real_images):
    images = _batch(real_images["jpegs"])
    with torch.no_grad():
        maps = eager_module(images, torch.full((len(images),), -1))[3]
    # the model's 4x4 maps upsampled to 64x64, plus the same maps upsampled to odd, non-square sizes
    model_maps = eager_module.model(((images.float() / 255 - eager_module.mean) / eager_module.std))["map"]
    odd = F.interpolate(model_maps[:, None], size=(37, 53), mode="bicubic", align_corners=False)[:, 0]
    for batch in (maps, odd, odd.double(), odd.half()):
        for threshold in (0.05, 0.2, 0.5, 0.8):
            got = torch.ops.dbc_fast.largest_box(batch, threshold)
            expected = [extract_boxes(m.float() if m.dtype == torch.half else m, threshold)[0].tolist()
                        for m in batch]
            assert got.tolist() == expected
    assert len({tuple(b) for b in torch.ops.dbc_fast.largest_box(maps, THRESHOLD).tolist()}) > 1, "boxes all equal"
    # constant, NaN and empty maps: (0, 0, 0, 0) as wsolevaluation; threshold 1.0 keeps nothing
    special = torch.rand(3, 8, 9)
    special[0] = 0.5
    special[1, 2, 3] = float("nan")
    assert torch.ops.dbc_fast.largest_box(special, 0.3)[:2].tolist() == [[0, 0, 0, 0]] * 2
    assert torch.ops.dbc_fast.largest_box(special, 1.0).tolist() == [[0, 0, 0, 0]] * 3
    assert torch.ops.dbc_fast.largest_box(torch.rand(0, 5, 5), 0.3).shape == (0, 4)


def test_largest_box_bad_input_and_meta(op_library):
    with pytest.raises(RuntimeError, match=r"maps \[n, H, W\]"):
        torch.ops.dbc_fast.largest_box(torch.rand(4, 4), 0.5)
    with pytest.raises(RuntimeError, match="floating-point"):
        torch.ops.dbc_fast.largest_box(torch.zeros(1, 4, 4, dtype=torch.uint8), 0.5)
    meta = torch.ops.dbc_fast.largest_box(torch.empty(5, 7, 9, device="meta"), 0.5)
    assert meta.shape == (5, 4) and meta.dtype == torch.int64


def test_area_semantics_contour_polygon_not_pixel_count(op_library):
    # A 1-pixel-wide line of 9 pixels has contour area 0; a 3x3 square has area 4: the square wins, as
    # with cv2.contourArea, although the line has more pixels.
    m = torch.zeros(1, 12, 12)
    m[0, 1, 0:9] = 1.0
    m[0, 6:9, 6:9] = 1.0
    assert torch.ops.dbc_fast.largest_box(m, 0.5).tolist() == [[6, 6, 9, 9]]
    assert extract_boxes(m[0], 0.5)[0].tolist() == [6, 6, 9, 9]


# ------------------------------------------------------------------------------------------------ exports

_FRESH = textwrap.dedent("""
    import sys, torch
    lib, model_path, inputs_path, out_path = sys.argv[1:5]
    torch.ops.load_library(lib)
    if model_path.endswith(".pt2"):
        model = torch._inductor.aoti_load_package(model_path)
        meta = model.get_metadata()
    else:
        files = {"dbc_fast.img_h": ""}
        model = torch.jit.load(model_path, _extra_files=files)
        meta = {k: v.decode() for k, v in files.items()}
    inputs = torch.load(inputs_path)
    outputs = []
    with torch.no_grad():
        for images, classes in inputs:
            outputs.append([t for t in model(images, classes)])
    assert not any(m == "dbc_fast" or m.startswith("dbc_fast.") for m in sys.modules), "dbc_fast was imported"
    torch.save({"outputs": outputs, "img_h": meta["dbc_fast.img_h"]}, out_path)
""")


@pytest.mark.parametrize("fmt", ["torchscript", "aoti"])
def test_export_in_fresh_process_matches_eager(fmt, exported, eager_module, real_images, op_library, tmp_path):
    images = _batch(real_images["jpegs"] + [real_images["raccoon"], real_images["png"]])  # 8 real images
    classes = torch.tensor([-1, 3, -1, 7, -1, -1, 0, 9])
    inputs = [(images, classes), (images[:1], classes[:1])]  # batch 8 and 1; exported with batch 2
    if fmt == "torchscript":
        inputs.append((images[2:5].float(), classes[2:5]))  # float pixels: one TorchScript file takes both
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "fresh.py"
    script.write_text(_FRESH)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, str(script), op_library, exported[fmt], str(tmp_path / "inputs.pt"),
                          str(tmp_path / "out.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["img_h"] == str(IMG)
    for (imgs, cls), outputs in zip(inputs, got["outputs"]):
        with torch.no_grad():
            expected = eager_module(imgs, cls)
        logits, top_probs, top_classes, maps, boxes, box_classes, box_scores = outputs
        assert logits.shape == (len(imgs), 10) and maps.shape == (len(imgs), IMG, IMG) and boxes.shape == (len(imgs), 4)
        torch.testing.assert_close(logits, expected[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(top_probs, expected[1], atol=1e-5, rtol=1e-4)
        assert torch.equal(top_classes, expected[2])
        torch.testing.assert_close(maps, expected[3], atol=1e-4, rtol=0)
        assert torch.equal(boxes, expected[4]), f"{fmt}: boxes {boxes.tolist()} != eager {expected[4].tolist()}"
        assert torch.equal(box_classes, torch.where(cls >= 0, cls, expected[2][:, 0]))
        torch.testing.assert_close(box_scores, expected[6], atol=1e-5, rtol=1e-4)
        # the boxes are the metrics' boxes of the returned maps
        assert boxes.tolist() == [extract_boxes(m, THRESHOLD)[0].tolist() for m in maps]


@pytest.mark.parametrize("method", ["cam", "tscam"])
def test_class_specific_maps_follow_the_given_class(method, real_images, op_library, tmp_path):
    """cam / tscam: the map (and box) is the given class's, the predicted one's for -1; TorchScript agrees."""
    torch.manual_seed(1)
    model = dbc_fast.create_model("conformer_tiny_patch16", 10, method=method).eval()
    module = ex.InferenceModule(model, (IMG, IMG), cam_threshold=THRESHOLD, topk=3).eval()
    images = _batch(real_images["jpegs"][:2])
    classes = torch.tensor([-1, 3])
    with torch.no_grad():
        out = module(images, classes)
        x = (images.float() / 255 - module.mean) / module.std
        wanted = torch.where(classes >= 0, classes, out[2][:, 0])
        raw = model(x, map_classes=wanted)["map"]
    assert torch.equal(out[5], wanted)
    expected = F.interpolate(raw[:, None], size=(IMG, IMG), mode="bicubic", align_corners=False)[:, 0]
    expected = (expected - expected.amin((1, 2), keepdim=True)) / (
        expected.amax((1, 2), keepdim=True) - expected.amin((1, 2), keepdim=True)).clamp_min(1e-12)
    torch.testing.assert_close(out[3], expected)
    if method == "cam":
        return  # the TorchScript round trip of the two-pass path once (tscam) is enough
    path = str(tmp_path / "model.ts")
    ex.export_torchscript(module, path, ex.metadata_for(module, {}, "uint8", "cpu"),
                          ex.example_inputs(module, 2, "uint8", "cpu"))
    got = ex.ExportedModel(path)(images, classes)
    torch.testing.assert_close(got[3], out[3], atol=1e-4, rtol=0)
    assert torch.equal(got[4], out[4]) and torch.equal(got[5], out[5])


def test_the_format_follows_the_output_name(checkpoint, tmp_path, monkeypatch, user_error):
    """--format auto (the default): a .pt2 name is an AOTInductor package, any other name TorchScript; an explicit
    --format must agree with the name. (The exports themselves are checked above; here only the choice.)"""
    import dbc_fast.cli.export as command
    from dbc_fast.errors import ExportError

    asked = []

    def record(checkpoint, out, fmt, **options):
        asked.append(fmt)
        raise ExportError("stopped after choosing the format")

    monkeypatch.setattr(command, "export_checkpoint", record)
    from dbc_fast.cli import main

    for name in ("m.pt2", "m.ts", "m.pt"):
        user_error(main, ["export", "--checkpoint", checkpoint, "--out", str(tmp_path / name)])
    assert asked == ["aoti", "torchscript", "torchscript"]
    monkeypatch.undo()
    assert "an aoti export must be named *.pt2" in user_error(
        main, ["export", "--checkpoint", checkpoint, "--format", "aoti", "--out", str(tmp_path / "m.ts")])


def test_export_errors(checkpoint, tmp_path, op_library):
    with pytest.raises(ValueError, match="multiple of 32"):
        ex.export_checkpoint(checkpoint, str(tmp_path / "x.ts"), img_size=(64, 70))
    with pytest.raises(ValueError, match="checkpoint not found"):  # CheckpointError
        ex.export_checkpoint(str(tmp_path / "missing.pt"), str(tmp_path / "x.ts"))
    with pytest.raises(ValueError, match=r"named \*\.pt2"):
        ex.export_checkpoint(checkpoint, str(tmp_path / "x.ts"), fmt="aoti")
    with pytest.raises(ValueError, match="unknown format"):
        ex.export_checkpoint(checkpoint, str(tmp_path / "x.onnx"), fmt="onnx")
    not_export = tmp_path / "plain.ts"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(not_export))
    with pytest.raises(ValueError, match="not a dbc-fast export"):
        ex.ExportedModel(str(not_export))


# ------------------------------------------------------------------------------------------------ C++

@pytest.fixture(scope="session")
def dbc_infer():
    """Builds csrc/example (incrementally, in csrc/example/build, under a lock) and returns the binary."""
    # The README's commands: no CUDA toolkit needed, even for a CUDA build of torch (see its CMakeLists.txt).
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake or a C++ compiler is missing: cannot build csrc/example")
    source = os.path.join(ROOT, "csrc", "example")
    build = os.path.join(source, "build")
    os.makedirs(build, exist_ok=True)
    from torch.utils import cmake_prefix_path

    with open(os.path.join(build, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        configure = subprocess.run(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                                    f"-DCMAKE_PREFIX_PATH={cmake_prefix_path}"], capture_output=True, text=True)
        log = configure.stdout + configure.stderr
        if configure.returncode != 0 and ("Could NOT find JPEG" in log or "Could NOT find PNG" in log):
            pytest.skip("libjpeg / libpng development files are missing (Debian: apt-get install libjpeg-dev "
                        "libpng-dev)")
        assert configure.returncode == 0, log[-4000:]
        make = subprocess.run(["cmake", "--build", build, "-j", "2"], capture_output=True, text=True)
        assert make.returncode == 0, (make.stdout + make.stderr)[-4000:]
    binary = os.path.join(build, "dbc_infer")
    assert os.access(binary, os.X_OK)
    return binary


@pytest.mark.parametrize("fmt", ["torchscript", "aoti"])
def test_cpp_example_matches_python(fmt, dbc_infer, exported, eager_module, real_images, op_library):
    model = ex.ExportedModel(exported[fmt])
    for path, given in ((real_images["jpegs"][0], -1), (real_images["raccoon"], -1), (real_images["png"], 4)):
        run = subprocess.run([dbc_infer, exported[fmt], path, "--ops", op_library, "--class", str(given)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        lines = run.stdout.strip().splitlines()
        assert len(lines) == 1, run.stdout
        cpp = json.loads(lines[0])
        py = ex.predict_image(model, path, given_class=given)
        assert (cpp["width"], cpp["height"]) == (py["width"], py["height"])
        assert cpp["class"] == py["class"] and cpp["class_name"] == py["class_name"]
        if given >= 0:
            assert cpp["class"] == given
        assert cpp["score"] == pytest.approx(py["score"], abs=2e-6)
        assert cpp["box"] == pytest.approx(py["box"], abs=1e-3)
        assert [c for c, _ in cpp["topk"]] == [c for c, _ in py["topk"]]
        # the eager module on the Python-preprocessed pixels gives that box too
        images = ex.resize_pixels(ex.read_image_uint8(path), (IMG, IMG))
        with torch.no_grad():
            box = eager_module(images, torch.tensor([given]))[4][0].tolist()
        sx, sy = py["width"] / IMG, py["height"] / IMG
        assert py["box"] == pytest.approx([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy], abs=1e-3)


def test_cpp_example_decodes_like_pil(dbc_infer, exported, real_images, op_library):
    """RGBA (alpha dropped), palette and grayscale PNGs and a grayscale JPEG: the same result as Python."""
    model = ex.ExportedModel(exported["torchscript"])
    for path in real_images["variants"]:
        run = subprocess.run([dbc_infer, exported["torchscript"], path, "--ops", op_library], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        cpp, py = json.loads(run.stdout), ex.predict_image(model, path)
        assert cpp["class"] == py["class"], path
        assert cpp["score"] == pytest.approx(py["score"], abs=2e-6), path
        assert cpp["box"] == pytest.approx(py["box"], abs=1e-3), path


def test_cpp_example_errors(dbc_infer, exported, real_images, op_library, tmp_path):
    no_ops = subprocess.run([dbc_infer, exported["torchscript"], real_images["png"]], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "DBC_FAST_OPS"})
    assert no_ops.returncode == 1 and "dbc_fast::largest_box is not registered" in no_ops.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    run = subprocess.run([dbc_infer, exported["torchscript"], str(bad), "--ops", op_library],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "not a JPEG or PNG" in run.stderr
    run = subprocess.run([dbc_infer, exported["torchscript"]], capture_output=True, text=True)
    assert run.returncode == 2 and "usage" in run.stderr
