"""DBC model and baselines: outputs, maps (Eq. 4-7), losses (Eq. 3, 8-13) against a float64 hand computation,
gradient paths, options, checkpoints and input errors. Tiny variant, small inputs (CPU)."""
import importlib.util
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

import dbc_fast
from dbc_fast.models import DEFAULT_OPTIONS, METHODS, create_model
from dbc_fast.models.conformer import Attention

ARCH = "conformer_tiny_patch16"
NUM_CLASSES = 5
FIXTURES = pathlib.Path(__file__).parent / "fixtures"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    """One tiny model per method, built on first use (construction is the slow part on CPU)."""
    cache = {}

    def get(method):
        if method not in cache:
            torch.manual_seed(0)
            cache[method] = create_model(ARCH, NUM_CLASSES, method=method)
        return cache[method]
    return get


def _images(n, h, w, seed=0):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _labels(n):
    return torch.arange(n) % NUM_CLASSES


def _minmax64(x):
    flat = x.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return (x - lo) / (hi - lo)


def _cos64(a, b):
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()


@pytest.mark.parametrize("method", METHODS)
def test_forward_backward_every_method(models, method):
    model = models(method).train()
    sizes = [(2 if method == "dbc" else 1, 224, 224), (2, 64, 96)]
    for n, h, w in sizes:
        model.zero_grad(set_to_none=True)
        out = model(_images(n, h, w), _labels(n))
        assert out["logits"].shape == (n, NUM_CLASSES)
        assert out["map"].shape == (n, h // 16, w // 16)
        assert out["map"].min() >= 0 and out["map"].max() <= 1 and out["map"].isfinite().all()
        for key in ("loss", "loss_cla", "loss_neg", "loss_pos"):
            assert out[key].dim() == 0 and torch.isfinite(out[key]), key
        if method in ("dbc", "cls"):
            assert out["map_a"].shape == out["map_c"].shape == (n, h // 16, w // 16)
        else:
            assert "map_a" not in out and out["loss_neg"] == 0 and out["loss_pos"] == 0
        out["loss"].backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads), "every parameter takes part (DDP without unused parameters)"
        assert all(torch.isfinite(g).all() for g in grads)
        assert model.backbone.conv1.weight.grad.abs().sum() > 0
    if method == "cls":
        assert out["loss"].item() == out["loss_cla"].item()  # contrastive terms are weighted 0
        torch.testing.assert_close(out["map"], out["map_a"])
    if method == "dbc":
        assert out["loss_neg"] > 0 and out["loss_pos"] > 0


def _capture_attention_inputs(model):
    captured, handles = [], []
    for module in model.backbone.modules():
        if isinstance(module, Attention):
            handles.append(module.register_forward_hook(lambda m, args, out: captured.append((m, args[0]))))
    return captured, handles


def _full_attention_cls_row64(module, x):
    """Eq. 4 with the full N x N matrix in float64: class-token row, averaged over heads."""
    x = x.detach().double()
    b, n, c = x.shape
    heads = module.num_heads
    qkv = F.linear(x, module.qkv.weight.double(), module.qkv.bias.double())
    q, k, _ = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    probs = ((q @ k.transpose(-2, -1)) / math.sqrt(c // heads)).softmax(-1)
    return probs[:, :, 0].mean(1)


@pytest.mark.parametrize("negatives", ["cross", "within"])
def test_maps_and_losses_match_float64_hand_computation(models, negatives):
    model = models("dbc").train()
    model.options["negatives"] = negatives
    try:
        captured, handles = _capture_attention_inputs(model)
        try:
            n, h, w = 3, 96, 160
            labels = torch.tensor([0, 4, 2])
            out = model(_images(n, h, w, seed=1), labels, return_features=True)
        finally:
            for handle in handles:
                handle.remove()
    finally:
        model.options["negatives"] = "cross"

    # M_a (Eq. 4-5): mean over the 12 blocks of the class-token row, patch part, h x w, min-max
    assert len(captured) == 12
    rows = torch.stack([_full_attention_cls_row64(m, x) for m, x in captured]).mean(0)
    map_a = _minmax64(rows[:, 1:].reshape(n, h // 16, w // 16))
    torch.testing.assert_close(out["map_a"].double(), map_a, rtol=1e-4, atol=1e-5)

    # M_c (Eq. 6): min-max of a one-channel 3x3 conv over F* (block 11's CNN output, 256 channels for Ti)
    fstar = out["feat_star"].detach().double()
    assert fstar.shape == (n, 256, h // 16, w // 16)
    conv = model.mc_conv
    mc = F.conv2d(fstar, conv.weight.double(), conv.bias.double(), padding=1)[:, 0]
    torch.testing.assert_close(out["map_c"].double(), _minmax64(mc), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["map"].double(), _minmax64(map_a + _minmax64(mc)), rtol=1e-4, atol=1e-5)

    # Eq. 8-12 from the model's own F*, M_a, M_c
    ma, mcn = out["map_a"].detach().double(), out["map_c"].detach().double()
    hw = fstar.shape[2] * fstar.shape[3]
    fc = (fstar * mcn[:, None]).sum((2, 3)) / hw
    bc = (fstar * (1 - mcn[:, None])).sum((2, 3)) / hw
    ft = (fstar * ma[:, None]).sum((2, 3)) / hw
    bt = (fstar * (1 - ma[:, None])).sum((2, 3)) / hw
    eps = 5e-4

    def neg(f, b):
        cos = _cos64(f, b) if negatives == "cross" else torch.diagonal(_cos64(f, b))
        return -torch.log(1 - cos.clamp(eps, 1 - eps)).mean()

    l_neg_c, l_neg_t = neg(fc, bc), neg(ft, bt)
    l_pos = -torch.log(torch.diagonal(_cos64(fc, ft)).clamp(eps, 1 - eps)).mean()
    # Eq. 3: NLL of log((p_t + p_c) / 2)
    p = (out["conv_logits"].detach().double().softmax(1) + out["trans_logits"].detach().double().softmax(1)) / 2
    l_cla = F.nll_loss(p.log(), labels)
    torch.testing.assert_close(out["logits"].detach().double(), p.log(), rtol=1e-5, atol=1e-5)
    for key, ref in (("loss_neg_c", l_neg_c), ("loss_neg_t", l_neg_t), ("loss_neg", l_neg_c + l_neg_t),
                     ("loss_pos", l_pos), ("loss_cla", l_cla),
                     ("loss", l_cla + 0.1 * (l_neg_c + l_neg_t) + 1.0 * l_pos)):
        torch.testing.assert_close(out[key].detach().double(), ref, rtol=2e-4, atol=1e-5, msg=key)


def test_contrastive_gradients_reach_attention_and_mc_conv(models):
    model = models("dbc").train()
    out = model(_images(3, 96, 96, seed=2), _labels(3))
    contrastive = 0.1 * out["loss_neg"] + 1.0 * out["loss_pos"]
    bb = model.backbone
    # F* is block 11's output, so block 12's attention influences the losses only through M_a
    params = [model.mc_conv.weight, bb.conv_trans_12.trans_block.attn.qkv.weight, bb.trans_1.attn.qkv.weight]
    grads = torch.autograd.grad(contrastive, params)
    for param, grad in zip(("mc_conv", "block 12 qkv", "block 1 qkv"), grads):
        assert grad.abs().sum() > 0, param
    # ... and not through the heads: the contrastive terms do not depend on the classifiers
    head_grad = torch.autograd.grad(contrastive, bb.conv_cls_head.weight, allow_unused=True)[0]
    assert head_grad is None or head_grad.abs().sum() == 0


def test_cls_loss_variants_and_backends(models):
    model = models("dbc").eval()
    images, labels = _images(2, 64, 64, seed=3), torch.tensor([1, 3])
    with torch.no_grad():
        ref = model(images, labels)
        conv, trans = ref["conv_logits"].double(), ref["trans_logits"].double()
        try:
            model.options["cls_loss"] = "ce_mean"
            out = model(images, labels)
            expected = (F.cross_entropy(conv, labels) + F.cross_entropy(trans, labels)) / 2
            torch.testing.assert_close(out["loss_cla"].double(), expected, rtol=1e-5, atol=1e-6)
            model.options["cls_loss"] = "logit_sum"
            out = model(images, labels)
            torch.testing.assert_close(out["logits"].double(), conv + trans, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out["loss_cla"].double(), F.cross_entropy(conv + trans, labels),
                                       rtol=1e-5, atol=1e-6)
            model.options["cls_loss"] = "prob_mean"
            model.options["ops_backend"] = "eager"
            out = model(images, labels)
            for key in ("loss", "loss_neg", "loss_pos"):
                torch.testing.assert_close(out[key], ref[key])
        finally:
            model.options.update(cls_loss="prob_mean", ops_backend="auto")
    assert torch.allclose(ref["logits"].exp().sum(1), torch.ones(2))


@pytest.mark.parametrize("method", ["cam", "tscam"])
def test_class_specific_maps(models, method):
    model = models(method).eval()
    images = _images(2, 96, 96, seed=4)
    with torch.no_grad():
        default = model(images)
        predicted = default["logits"].argmax(1)
        chosen = model(images, map_classes=predicted)
        other = model(images, map_classes=(predicted + 1) % NUM_CLASSES)
    torch.testing.assert_close(default["map"], chosen["map"])
    assert not torch.allclose(default["map"], other["map"])
    if method == "cam":
        # CAM by hand: conv classifier weights of the class over the final CNN features, upsampled, min-max
        with torch.no_grad():
            feats = model.backbone.forward_features(images)["conv_feat"].double()
        cam = torch.einsum("nc,nchw->nhw", model.backbone.conv_cls_head.weight[predicted].double(), feats)
        cam = F.interpolate(cam[:, None], size=(6, 6), mode="bilinear", align_corners=False)[:, 0]
        torch.testing.assert_close(default["map"].double(), _minmax64(cam), rtol=1e-4, atol=1e-5)
    else:
        assert isinstance(model.backbone.trans_cls_head, torch.nn.Conv2d)


def test_options_variants_shapes():
    # F* from block 8 (1/8 resolution, M_a upsampled to it), 5x5 M_c conv with sigmoid; patch 32 on meta
    with torch.device("meta"):
        model = create_model(ARCH, 3, fstar_block=8, mc_kernel_size=5, norm="sigmoid")
        out = model(torch.empty(2, 3, 96, 160), torch.zeros(2, dtype=torch.long), return_features=True)
        assert out["map"].shape == (2, 12, 20) and out["feat_star"].shape == (2, 128, 12, 20)
        assert model.mc_conv.weight.shape == (1, 128, 5, 5)
        small32 = create_model("conformer_small_patch32", 3, method="dbc")
        out = small32(torch.empty(2, 3, 96, 160), torch.zeros(2, dtype=torch.long))
        assert out["map_a"].shape == (2, 6, 10)
    model = create_model(ARCH, 3, norm="sigmoid", mc_kernel_size=1)
    with torch.no_grad():  # train mode: BN batch statistics keep the untrained F* at a sane scale
        out = model(_images(2, 64, 64))
    assert ((out["map_c"] > 0) & (out["map_c"] < 1)).all()
    assert out["map_a"].amin((1, 2)).eq(0).all() and out["map_a"].amax((1, 2)).eq(1).all()
    assert model.arch == ARCH and model.method == "dbc" and model.num_classes == 3
    assert set(model.options) == set(DEFAULT_OPTIONS) and model.options["norm"] == "sigmoid"
    assert dbc_fast.list_models() == ["conformer_tiny_patch16", "conformer_small_patch16",
                                      "conformer_small_patch32", "conformer_base_patch16"]


def test_checkpoint_round_trip_and_pretrained(models, tmp_path):
    model = models("dbc").eval()
    torch.save({"model": model.state_dict(), "epoch": 1}, tmp_path / "dbc.pth")
    fresh = create_model(ARCH, NUM_CLASSES, pretrained=str(tmp_path / "dbc.pth")).eval()
    images = _images(2, 64, 96, seed=5)
    with torch.no_grad():
        a, b = model(images), fresh(images)
    for key in ("logits", "map", "map_a", "map_c"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)

    # an official ImageNet checkpoint into a 5-class DBC / TS-CAM model: heads re-initialised, rest loaded
    spec = importlib.util.spec_from_file_location("mof", FIXTURES / "make_official_fixture.py")
    mof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mof)
    sd = mof.deterministic_state_dict({k: v.shape for k, v in models("tscam").backbone.state_dict().items()
                                       if not k.startswith("trans_cls_head")} |
                                      {"trans_cls_head.weight": (1000, 384), "trans_cls_head.bias": (1000,)}
                                      | {"conv_cls_head.weight": (1000, 256), "conv_cls_head.bias": (1000,)})
    torch.save({"model": sd}, tmp_path / "official.pth")
    tscam = models("tscam")
    with pytest.warns(UserWarning, match=r"re-initialised conv_cls_head .*trans_cls_head \(checkpoint \[1000, 384\]"):
        dbc_fast.load_pretrained(tscam, tmp_path / "official.pth")
    assert torch.equal(tscam.backbone.conv_trans_12.trans_block.attn.qkv.weight,
                       sd["conv_trans_12.trans_block.attn.qkv.weight"])
    with pytest.warns(UserWarning, match="re-initialised"):
        dbc_fast.load_pretrained(model, tmp_path / "official.pth")
    assert torch.equal(model.backbone.conv1.weight, sd["conv1.weight"])

    # a DBC checkpoint of another variant / method is refused with the mismatching keys
    with torch.device("meta"):
        cam = create_model(ARCH, NUM_CLASSES, method="cam")
    with pytest.raises(ValueError, match="unexpected key"):
        dbc_fast.load_pretrained(cam, tmp_path / "dbc.pth")


def test_bad_inputs_and_options(models):
    model = models("dbc")
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 96, 112))
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.zeros(1, 1, 96, 96))
    with pytest.raises(ValueError, match="4 dims"):
        model(torch.zeros(3, 96, 96))
    with pytest.raises(ValueError, match="floating point"):
        model(torch.zeros(1, 3, 96, 96, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \[2\]"):
        model(torch.zeros(2, 3, 64, 64), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="map_classes"):
        model(torch.zeros(2, 3, 64, 64), map_classes=torch.zeros(2))
    bad = [
        (dict(arch="resnet50"), "unknown arch"),
        (dict(method="gradcam"), "unknown method"),
        (dict(num_classes=0), "num_classes"),
        (dict(lambda_poss=1.0), "unknown option"),
        (dict(mc_kernel_size=4), "mc_kernel_size"),
        (dict(norm="l2"), "norm"),
        (dict(fstar_block=13), "fstar_block"),
        (dict(lambda_neg=-1.0), "lambda_neg"),
        (dict(negatives="all"), "negatives"),
        (dict(cls_loss="focal"), "cls_loss"),
        (dict(ops_backend="cuda"), "ops_backend"),
        (dict(method="cls", lambda_pos=1.0), "no contrastive losses"),
    ]
    for kwargs, match in bad:
        args = dict(arch=ARCH, num_classes=NUM_CLASSES, method="dbc")
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            with torch.device("meta"):
                create_model(args.pop("arch"), args.pop("num_classes"), **args)


def test_tscam_defaults_to_its_own_loss_and_ranking(shared_data):
    """tscam trains with CE of conv + trans logits and maps/predicts the top-1 of that sum unless cls_loss is set."""
    from dbc_fast.data import build_dataset, collate

    dataset = build_dataset("tiny-imagenet", str(shared_data / "tiny-imagenet-mini.tar.gz"), "val", img_size=64)
    batch = collate([dataset[i] for i in range(4)])
    images, labels = batch["image"], torch.tensor([0, 1, 2, 3])
    assert create_model(ARCH, NUM_CLASSES, method="dbc").options["cls_loss"] == "prob_mean"
    assert create_model(ARCH, NUM_CLASSES, method="tscam", cls_loss="ce_mean").options["cls_loss"] == "ce_mean"
    torch.manual_seed(0)
    own = create_model(ARCH, NUM_CLASSES, method="tscam").eval()
    assert own.options["cls_loss"] == "logit_sum"
    # heads where the two rankings disagree: weights scaled down (untrained eval-mode features are large) and
    # biases conv (5, 2), trans (-2, 2) on classes 0 and 1 give summed logits 3 < 4 (class 1) but mean
    # probabilities ~0.48 > ~0.37 (class 0)
    with torch.no_grad():
        own.backbone.conv_cls_head.weight.mul_(1e-4)
        own.backbone.trans_cls_head.weight.mul_(1e-4)
        own.backbone.conv_cls_head.bias[:2] += torch.tensor([5.0, 2.0])
        own.backbone.trans_cls_head.bias[:2] += torch.tensor([-2.0, 2.0])
    explicit = create_model(ARCH, NUM_CLASSES, method="tscam", cls_loss="prob_mean").eval()
    explicit.load_state_dict(own.state_dict())
    with torch.no_grad():
        out, out_explicit = own(images, labels), explicit(images, labels)
        summed = out["conv_logits"].double() + out["trans_logits"].double()
        torch.testing.assert_close(out["logits"].double(), summed, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["loss_cla"].double(), F.cross_entropy(summed, labels), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_explicit["loss_cla"], F.nll_loss(out_explicit["logits"], labels))
        assert out["logits"].argmax(1).eq(1).all() and out_explicit["logits"].argmax(1).eq(0).all()
        ones, zeros = torch.ones(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
        torch.testing.assert_close(out["map"], own(images, map_classes=ones)["map"])
        torch.testing.assert_close(out_explicit["map"], own(images, map_classes=zeros)["map"])
        assert not torch.allclose(out["map"], out_explicit["map"])
