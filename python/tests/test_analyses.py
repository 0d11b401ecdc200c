"""stability, attack and sculpt from Python against PyTorch's own numbers,
and how results show in a notebook (_repr_html_)."""

import numpy as np
import pytest
import torch
from torch import nn

import prelu
from prelu import _display
from nets import Mlp, ResNet, randomize


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return randomize(ResNet())


@pytest.fixture(scope="module")
def images():
    return torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def torch_fgsm_acc(module, x, y, eps):
    """FGSM as prelu defines it, in PyTorch: clip(x + eps sign(grad of the mean CE), 0, 1)."""
    x = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(module(x), y).backward()
    adv = (x + eps * x.grad.sign()).clamp(0, 1)
    with torch.no_grad():
        return (module(adv).argmax(1) == y).float().mean().item()


def test_attack_gives_pytorchs_clean_and_fgsm_accuracy(resnet, images):
    model = prelu.from_torch(resnet, images[:2])
    with torch.no_grad():
        y = resnet(images).argmax(1)
    # Half the labels are the model's own predictions, half shifted: a clean accuracy of 0.5.
    y[::2] = (y[::2] + 1) % 10
    r = prelu.attack(model, images, y, eps=[0.02, 0.05], method="fgsm")
    assert r["examples"] == 32 and r["clean_acc"] == pytest.approx(0.5)
    for row in r["results"]:
        want = torch_fgsm_acc(resnet, images, y, row["eps"])
        # One example may sit on a decision boundary within float rounding.
        assert abs(row["fgsm_acc"] - want) <= 1 / 32 + 1e-9, row
        assert row["pgd_acc"] is None
    both = prelu.attack(model, images, y, eps=[0.05], steps=3)["results"][0]
    assert 0.0 <= both["pgd_acc"] <= 0.5 and both["fgsm_minus_pgd"] == pytest.approx(both["fgsm_acc"] - both["pgd_acc"])
    with pytest.raises(ValueError, match="needs labels"):
        prelu.attack(model, images, None)
    with pytest.raises(ValueError, match="method"):
        prelu.attack(model, images, y, method="cw")


def test_stability_reports_every_weight_layer_before_an_activation(resnet, images):
    model = prelu.from_torch(resnet, images[:2])
    s = prelu.stability(model, images)
    prelus = [n for n, m in resnet.named_modules() if isinstance(m, nn.PReLU)]
    assert s["examples"] == 32
    assert [l["layer"] for l in s["layers"]] == prelus
    for l in s["layers"]:
        slopes = dict(resnet.named_modules())[l["layer"]].weight.detach()
        assert l["slope"] == pytest.approx(slopes.mean().item(), abs=1e-6)
        feeding = dict(resnet.named_modules())[l["weights"]]
        assert l["channels"] == feeding.weight.shape[0]


def test_sculpt_prunes_dead_units_and_keeps_the_outputs():
    torch.manual_seed(3)
    net = randomize(Mlp())
    with torch.no_grad():
        # Units 0..3 never positive (a large negative BatchNorm shift) and
        # with slope 0: dead, prunable.
        net.bn.bias[:4] = -50.0
        net.act.weight[:4] = 0.0
    x = torch.rand(64, 12, generator=torch.Generator().manual_seed(4))
    model = prelu.from_torch(net, x[:2])
    sculpted, report = prelu.sculpt(model, x, return_report=True)
    layer = report["layers"][0]
    assert layer["channels_before"] == 16 and layer["pruned"] == 4 and layer["channels_after"] == 12
    assert report["max_output_diff"] < 1e-4
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(sculpted(x), want, rtol=1e-4, atol=1e-4)
    assert "<table>" in report._repr_html_()


def test_results_show_as_escaped_tables(resnet, images):
    model = prelu.from_torch(resnet, images[:2])
    d = prelu.diagnose(model, images)
    page = d._repr_html_()
    assert "<h4>prelu diagnose</h4>" in page and "<th>negative_share</th>" in page
    assert isinstance(d, dict) and d["examples"] == 32
    hostile = _display.table_html("<x>", {"name": "<script>alert(1)</script>", "layers": [{"layer": "a&b"}]})
    assert "<script>" not in hostile and "&lt;script&gt;" in hostile and "a&amp;b" in hostile
    m = model._repr_html_()
    assert "<th>input</th>" in m and "conv1" in m


def test_a_run_report_shows_inline(tmp_path):
    import prelu.torch as pt

    m = nn.Sequential(nn.Linear(4, 6), nn.PReLU(6), nn.Linear(6, 2))
    opt = torch.optim.SGD(pt.param_groups(m, 1e-4), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    s = pt.Sentinel(m, tmp_path / "run", optimizer=opt)
    for epoch in (1, 2):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        s.epoch_end(epoch, train_loss=loss.item())
    rep = prelu.report(tmp_path / "run")
    assert rep.html.startswith("<!DOCTYPE html>") and "<svg" in rep.html
    frame = s._repr_html_()
    assert frame.startswith("<iframe srcdoc=") and "<svg" not in frame and "&lt;svg" in frame
    s.close()
    rep.save(tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == rep.html
    with pytest.raises(prelu.PreluError, match="no run folder given|not found|does not exist|no such"):
        prelu.report(tmp_path / "missing")
