"""Weight decay groups of the trainer's optimizer (timm's create_optimizer_v2): the class token, biases and
norm weights without decay, every other weight with it, for the real Conformer-Ti DBC model."""
from types import SimpleNamespace

import pytest
import torch

import dbc_fast
from dbc_fast.engine.train import build_optimizer


@pytest.mark.parametrize("method", ["dbc", "tscam"])
def test_class_token_out_of_weight_decay(method):
    model = dbc_fast.create_model("conformer_tiny_patch16", 10, method=method)
    assert model.no_weight_decay() == {"backbone.cls_token"}
    assert model.backbone.cls_token.ndim == 3  # not 1-d: only no_weight_decay() keeps it out
    args = SimpleNamespace(lr=5e-4, weight_decay=5e-4, opt_eps=1e-8, betas=(0.9, 0.99))
    optimizer = build_optimizer(model, args, torch.device("cpu"))
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert len(decay_of) == len(names)  # every parameter in exactly one group
    assert decay_of[id(names["backbone.cls_token"])] == 0.0
    for name, param in names.items():
        expected = 0.0 if name == "backbone.cls_token" or param.ndim <= 1 else 5e-4
        assert decay_of[id(param)] == expected, name
    assert any(decay == 5e-4 for decay in decay_of.values())
