"""Conformer backbone: official layout, official numerics, timm registration, load_pretrained and its errors.

The official fixtures were made from pengzhiliang/Conformer's conformer.py by
tests/fixtures/make_official_fixture.py (the official code itself is not in this repository).
"""
import importlib.util
import json
import pathlib
import warnings

import pytest
import timm
import torch

import dbc_fast
from dbc_fast.models.conformer import ARCH_CONFIGS, Attention, Conformer, build_conformer
from dbc_fast.models.timm_registry import register_timm_models

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
PARAM_COUNTS = {  # with 1000 classes (DESIGN.md; the official models)
    "conformer_tiny_patch16": 23_524_704,
    "conformer_small_patch16": 37_673_424,
    "conformer_base_patch16": 83_289_136,
}


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_official_fixture", FIXTURES / "make_official_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OFFICIAL = _fixture_module()


def _meta(arch, **kw):
    with torch.device("meta"):
        return build_conformer(arch, **kw)


def _fake_checkpoint(path, shapes):
    # right keys and shapes with one stored element per tensor (expand keeps the file tiny)
    torch.save({"model": {k: torch.zeros(1).expand(s) if s else torch.zeros(()) for k, s in shapes.items()}}, path)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def official_keys():
    return json.loads((FIXTURES / "conformer_official_keys.json").read_text())


@pytest.fixture(scope="module")
def official_tiny_file(tmp_path_factory):
    """The deterministic official-format tiny checkpoint the fixture logits were computed with."""
    shapes = {k: v.shape for k, v in _meta("conformer_tiny_patch16").state_dict().items()}
    sd = OFFICIAL.deterministic_state_dict(shapes)
    path = tmp_path_factory.mktemp("ckpt") / "conformer_tiny_patch16_official.pth"
    torch.save({"model": sd}, path)
    return path, sd


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_state_dict_layout_matches_official(arch, official_keys):
    model = _meta(arch)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == official_keys[arch]["state_dict"]  # same keys, same order, same shapes
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == official_keys[arch]["num_params"]
    if arch in PARAM_COUNTS:
        assert n_params == PARAM_COUNTS[arch]


def test_logits_equal_official_implementation(official_tiny_file):
    path, _ = official_tiny_file
    model = build_conformer("conformer_tiny_patch16", num_classes=1000)
    dbc_fast.load_pretrained(model, path)
    model.eval()
    with torch.no_grad():
        conv_logits, trans_logits = model(OFFICIAL.fixture_input())
    ref = torch.load(FIXTURES / "conformer_official_tiny_logits.pt")
    assert ref["conv_logits"].std() > 1 and ref["trans_logits"].std() > 0.5  # the fixture is not degenerate
    torch.testing.assert_close(conv_logits, ref["conv_logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(trans_logits, ref["trans_logits"], rtol=1e-4, atol=1e-4)


def test_cls_attention_row_matches_full_attention():
    torch.manual_seed(0)
    attn = Attention(48, num_heads=6, qkv_bias=True).double()
    x = torch.randn(3, 1 + 20, 48, dtype=torch.float64, requires_grad=True)
    out, row = attn(x, need_cls_attn=True)
    b, n, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, 6, c // 6).permute(2, 0, 3, 1, 4)
    probs = ((q @ k.transpose(-2, -1)) * (c // 6) ** -0.5).softmax(-1)  # [b, heads, n, n]
    full = attn.proj((probs @ v).transpose(1, 2).reshape(b, n, c))
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(row, probs[:, :, 0].mean(1).to(row.dtype))
    assert row.shape == (3, 21)
    grad, = torch.autograd.grad(row[:, 1:].pow(2).sum(), attn.qkv.weight)
    assert grad.abs().sum() > 0  # the attention row is differentiable
    assert attn(x)[1] is None


def test_attention_gradients_match_the_sliced_official_formulation():
    """q, k, v come from one unbind of qkv: input and weight gradients equal the official three-slice version."""
    torch.manual_seed(1)
    attn = Attention(48, num_heads=6, qkv_bias=True).double()
    x = torch.randn(2, 1 + 15, 48, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 16, 48, dtype=torch.float64)
    params = (x, attn.qkv.weight, attn.qkv.bias, attn.proj.weight)
    got = torch.autograd.grad((attn(x)[0] * w).sum(), params)
    b, n, c = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, 6, c // 6).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    probs = ((q @ k.transpose(-2, -1)) * (c // 6) ** -0.5).softmax(-1)
    want = torch.autograd.grad((attn.proj((probs @ v).transpose(1, 2).reshape(b, n, c)) * w).sum(), params)
    for a, r in zip(got, want):
        assert r.abs().sum() > 0
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_timm_create_model(arch):
    assert arch in timm.list_models("conformer_*")
    with torch.device("meta"):
        model = timm.create_model(arch, num_classes=1000)
    assert isinstance(model, Conformer)
    assert model.pretrained_cfg["classifier"] == ("conv_cls_head", "trans_cls_head")
    assert [list(v.shape) for v in model.state_dict().values()] == \
        [list(v.shape) for v in _meta(arch).state_dict().values()]


def test_timm_pretrained_file_and_load_pretrained_reinit_heads(official_tiny_file):
    path, sd = official_tiny_file
    model = timm.create_model("conformer_tiny_patch16", num_classes=10)
    heads_before = model.conv_cls_head.weight.clone()
    with pytest.warns(UserWarning, match="re-initialised conv_cls_head"):
        dbc_fast.load_pretrained(model, path)
    torch.testing.assert_close(model.trans_patch_conv.weight, sd["trans_patch_conv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.conv_cls_head.weight, heads_before, rtol=0, atol=0)
    assert model.trans_cls_head.weight.shape == (10, 384)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert isinstance(out, tuple) and len(out) == 2  # the official (conv_logits, trans_logits) pair
    assert out[0].shape == (2, 10) and out[1].shape == (2, 10)
    # the same file through timm's own pretrained path (unwraps {"model": ...})
    timm_model = timm.create_model("conformer_tiny_patch16", pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(path)))
    for key in ("conv1.weight", "conv_trans_12.trans_block.attn.qkv.weight", "trans_cls_head.weight"):
        torch.testing.assert_close(timm_model.state_dict()[key], sd[key], rtol=0, atol=0)


def test_load_pretrained_layouts(official_tiny_file, tmp_path):
    path, sd = official_tiny_file
    # bare state_dict with a DDP prefix, and the mmpretrain layout
    renames = [(".norm1.", ".ln1."), (".norm2.", ".ln2."), (".mlp.fc1.", ".ffn.layers.0.0."),
               (".mlp.fc2.", ".ffn.layers.1.")]
    mm = {}
    for k, v in sd.items():
        if k.startswith(("conv_cls_head", "trans_cls_head")):
            mm["head." + k] = v
            continue
        if k.startswith("trans_1.") or ".trans_block." in k:
            for old, new in renames:
                k = k.replace(old, new)
        mm["backbone." + k] = v
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ddp.pth")
    torch.save({"state_dict": mm, "meta": {"epoch": 3}}, tmp_path / "mm.pth")
    for name in ("ddp.pth", "mm.pth"):
        with torch.device("meta"):
            model = build_conformer("conformer_tiny_patch16", num_classes=1000)
        model = model.to_empty(device="cpu")
        dbc_fast.load_pretrained(model, tmp_path / name)
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], sd[k]) for k in sd), name


def test_load_pretrained_wrong_variant_errors(official_keys, tmp_path):
    shapes = {arch: dict((k, s) for k, s in official_keys[arch]["state_dict"]) for arch in ARCH_CONFIGS}
    small32 = tmp_path / "small32.pth"
    _fake_checkpoint(small32, shapes["conformer_small_patch32"])
    small16 = tmp_path / "small16.pth"
    _fake_checkpoint(small16, shapes["conformer_small_patch16"])

    with pytest.raises(ValueError) as err:  # Ti model, S/32 checkpoint
        dbc_fast.load_pretrained(_meta("conformer_tiny_patch16"), small32)
    text = str(err.value)
    assert "does not match conformer_tiny_patch16" in text and "shape mismatch" in text
    assert "conv_1.bn1.bias: checkpoint [64] vs model [16]" in text
    assert "looks like conformer_small_patch32" in text

    with pytest.raises(ValueError) as err:  # patch 32 model, patch 16 checkpoint: one tensor differs
        dbc_fast.load_pretrained(_meta("conformer_small_patch32"), small16)
    text = str(err.value)
    assert "1 shape mismatch" in text
    assert "trans_patch_conv.weight: checkpoint [384, 64, 4, 4] vs model [384, 64, 8, 8]" in text
    assert "looks like conformer_small_patch16" in text

    partial = dict(shapes["conformer_tiny_patch16"])
    dropped = [k for k in partial if k.startswith("conv_trans_12.")]
    for k in dropped:
        del partial[k]
    partial["extra.weight"] = [3]
    _fake_checkpoint(tmp_path / "partial.pth", partial)
    with pytest.raises(ValueError) as err:
        dbc_fast.load_pretrained(_meta("conformer_tiny_patch16"), tmp_path / "partial.pth")
    text = str(err.value)
    assert f"{len(dropped)} key(s) missing" in text and "1 unexpected key(s)" in text and "extra.weight" in text


def test_load_pretrained_rejects_non_checkpoints(tmp_path):
    model = _meta("conformer_tiny_patch16")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        dbc_fast.load_pretrained(model, tmp_path / "notes.txt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "scalars.pth")
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        dbc_fast.load_pretrained(model, tmp_path / "scalars.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        dbc_fast.load_pretrained(model, tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError):
        dbc_fast.load_pretrained(model, tmp_path / "missing.pth")


def test_backbone_input_checks():
    model = _meta("conformer_tiny_patch16")
    with pytest.raises(ValueError, match="3 channels"):
        model.forward_features(torch.empty(1, 1, 64, 64, device="meta"))
    with pytest.raises(ValueError, match="4 dims"):
        model.forward_features(torch.empty(3, 64, 64, device="meta"))
    with pytest.raises(ValueError, match="multiples of 16"):
        model.forward_features(torch.empty(1, 3, 72, 64, device="meta"))
    with pytest.raises(ValueError, match="unknown Conformer arch"):
        build_conformer("conformer_huge_patch16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # registering again (e.g. a second import path) is a silent no-op
        assert register_timm_models() == []
