"""`dbc-fast profile` (paper Table 10): parameters and MACs of the real Conformer-Ti / -S DBC models on CPU,
the MAC count checked against torch's own count of the attention written out as matrix products; memory and
epoch time on CUDA where a GPU is present."""
import json

import pytest
import torch

import dbc_fast
from dbc_fast.cli import main
from dbc_fast.engine import profile


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return dbc_fast.create_model("conformer_tiny_patch16", 200, method="dbc").eval()


def test_params_and_heads(tiny):
    params = profile.count_params(tiny)
    assert round(params / 1e6, 1) == 23.0  # the paper's Table 10 (CUB, 200 classes)
    bigger = dbc_fast.create_model("conformer_tiny_patch16", 1000, method="dbc")
    # 800 more classes: the CNN head (256 features) and the transformer head (384) with their biases
    assert profile.count_params(bigger) - params == 800 * (256 + 1 + 384 + 1)


def test_macs_count_attention_on_cpu(tiny):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    macs = profile.count_macs(tiny, 224, torch.device("cpu"))
    # the reference: attention through PyTorch's math path, i.e. plain matrix products torch counts itself
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        tiny(torch.randn(1, 3, 224, 224))
    assert macs == counter.get_total_flops() // 2
    assert round(macs / 1e9, 1) == 5.2  # the paper's Table 10
    # attention products are a real part of it: 12 blocks x (Q K^T + A V) over 197 tokens of 384 channels
    without = FlopCounterMode(display=False)
    with torch.no_grad(), without:
        tiny(torch.randn(1, 3, 224, 224))
    assert macs - without.get_total_flops() // 2 == 12 * 2 * 197 * 197 * 384


def test_profile_command_on_cpu(tmp_path, capsys):
    out = tmp_path / "profile.json"
    rc = main(["profile", "--arch", "conformer_small_patch16", "--num-classes", "200", "--img-size", "224",
               "--device", "cpu", "--json", str(out)])
    assert rc == 0
    report = json.load(open(out))
    assert report["params"] == profile.count_params(dbc_fast.create_model("conformer_small_patch16", 200))
    assert round(report["params"] / 1e6, 1) == 36.6 and round(report["macs"] / 1e9, 1) == 10.6
    assert report["inference_memory_mb"] is None and report["seconds_per_epoch"] is None  # CPU: not measured
    assert report["paper"]["inference_memory_mb"] == 309.7
    printed = capsys.readouterr().out
    assert "36.6 M" in printed and "10.60 G" in printed and "not measured" in printed
    with pytest.raises(SystemExit) as stop:  # a bad option: argparse's one line, exit 2
        main(["profile", "--img-size", "100", "--device", "cpu"])
    assert stop.value.code == 2 and "--img-size: must be a positive multiple of 32" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="memory and epoch time are measured on CUDA only")
def test_profile_memory_and_epoch_time_on_cuda(tmp_path):
    out = tmp_path / "profile.json"
    assert main(["profile", "--arch", "conformer_tiny_patch16", "--num-classes", "200", "--device", "cuda",
                 "--steps", "3", "--warmup-steps", "1", "--json", str(out)]) == 0
    report = json.load(open(out))
    # the weights are on the device during the forward, so the peak holds them and the activations
    assert report["weights_mb"] < report["inference_memory_mb"] <= report["inference_memory_reserved_mb"]
    assert report["seconds_per_epoch"] == pytest.approx(report["seconds_per_step"] * (5994 // 64))
    assert report["seconds_per_step"] > 0
