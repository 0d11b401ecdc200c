"""prelu.torch.param_groups, init_he_prelu_ and clamp_slopes_."""

import math

import pytest
import torch
from torch import nn

import prelu.torch as pt


class Net(nn.Module):
    """Every kind of parameter param_groups sorts, and a shared one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.PReLU(4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 8)
        self.ln = nn.LayerNorm(8)
        self.shared = nn.PReLU()
        self.head = nn.Linear(8, 8)
        self.tied = nn.Linear(8, 8)
        self.tied.weight = self.head.weight
        self.scale = nn.Parameter(torch.ones(1))


def test_param_groups_cover_every_parameter_once():
    net = Net()
    decay, no_decay = pt.param_groups(net, 0.01)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in net.parameters()}
    want_decay = {id(p) for p in (net.conv.weight, net.fc.weight, net.head.weight, net.scale)}
    assert {id(p) for p in decay["params"]} == want_decay
    torch.optim.AdamW(pt.param_groups(net, 0.01), lr=1e-3)
    with pytest.raises(ValueError, match="weight_decay"):
        pt.param_groups(net, -1.0)


def test_param_groups_of_a_model_without_decayed_parameters():
    groups = pt.param_groups(nn.PReLU(), 0.1)
    assert [len(g["params"]) for g in groups] == [0, 1]
    torch.optim.SGD(groups, lr=0.1)


@pytest.mark.parametrize(
    "act,a",
    [(nn.PReLU(512, init=0.25), 0.25), (nn.LeakyReLU(0.2), 0.2), (nn.ReLU(), 0.0)],
)
def test_he_init_variance_on_a_wide_layer(act, a):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2048, 512), nn.Dropout(0.1), act, nn.Linear(512, 10))
    head = net[3].weight.detach().clone()
    assert pt.init_he_prelu_(net) is net
    w = net[0].weight.detach().double()
    want = 2.0 / (2048 * (1.0 + a * a))
    assert w.var().item() == pytest.approx(want, rel=0.02)
    assert abs(w.mean().item()) < 0.01 * math.sqrt(want)
    assert torch.count_nonzero(net[0].bias) == 0
    # No activation after the head: left as it was.
    assert torch.equal(net[3].weight, head)


def test_he_init_reads_each_layers_own_activation():
    torch.manual_seed(0)
    prelu = nn.PReLU(64)
    with torch.no_grad():
        prelu.weight.copy_(torch.linspace(0.0, 1.0, 64))  # mean 0.5
    net = nn.Sequential(
        nn.Conv2d(16, 64, 3),
        nn.BatchNorm2d(64),
        prelu,
        nn.Conv2d(64, 64, 3, groups=4),
        nn.LeakyReLU(0.5),
    )
    pt.init_he_prelu_(net)
    for layer, fan_in in ((net[0], 16 * 9), (net[3], 16 * 9)):
        want = 2.0 / (fan_in * 1.25)
        assert layer.weight.detach().double().var().item() == pytest.approx(want, rel=0.03)


def test_he_init_refuses_a_lazy_layer():
    with pytest.raises(ValueError, match="lazy"):
        pt.init_he_prelu_(nn.Sequential(nn.LazyLinear(4), nn.ReLU()))


def test_clamp_slopes_in_place():
    net = nn.Sequential(nn.Linear(3, 3), nn.PReLU(3), nn.PReLU())
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([-1.0, 0.5, 2.0]))
        net[2].weight.fill_(-0.2)
    before = net[0].weight.detach().clone()
    assert pt.clamp_slopes_(net, 0.01) is net
    assert net[1].weight.tolist() == pytest.approx([0.01, 0.5, 2.0])
    assert net[2].weight.tolist() == pytest.approx([0.01])
    assert torch.equal(net[0].weight, before)
    pt.clamp_slopes_(net, 0.0, max=1.0)
    assert net[1].weight.tolist() == pytest.approx([0.01, 0.5, 1.0])
    assert net[1].weight.requires_grad and net[1].weight.grad is None
    with pytest.raises(ValueError, match="min <= max"):
        pt.clamp_slopes_(net, 1.0, max=0.0)
