"""from_torch, diagnose, canonicalize and torch_state_dict on PyTorch
networks written as users write them (tests/nets.py)."""

import numpy as np
import pytest
import torch

import prelu
from nets import Mlp, ResNet, Vgg, negative_shares, randomize


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return randomize(ResNet())


@pytest.fixture(scope="module")
def images():
    return torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_the_imported_model_computes_the_module(resnet, images):
    model = prelu.from_torch(resnet, images[:2])
    assert model.input_shape == (3, 16, 16) and model.classes == 10
    with torch.no_grad():
        want = resnet(images).numpy()
    got = model(images)
    assert got.shape == (48, 10)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # numpy in works the same as torch in.
    np.testing.assert_array_equal(model(images.numpy()), got)


def test_the_imported_model_keeps_the_module_names(resnet, images):
    model = prelu.from_torch(resnet, images[:2])
    mine = {k for k in resnet.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(model.state_dict()) == mine
    assert list(model.torch_state_dict()) == list(resnet.state_dict())


def test_diagnose_negative_shares_are_the_hooks(resnet, images):
    model = prelu.from_torch(resnet, images[:2])
    d = prelu.diagnose(model, images)
    want = negative_shares(resnet, images)
    got = {l["layer"]: l["negative_share"] for l in d["layers"]}
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-3), k
    # No labels: no accuracy or loss, as the CLI's null.
    assert d["labels"] is False and d["acc"] is None and d["loss"] is None
    assert d["examples"] == 48
    for key in ("slope_histograms", "alarms", "data", "split", "checkpoint"):
        assert key in d


def test_diagnose_takes_labels_and_data_loaders(resnet, images):
    model = prelu.from_torch(resnet, images[:2])
    labels = torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(2))
    d = prelu.diagnose(model, images, labels)
    assert d["labels"] is True and 0.0 <= d["acc"] <= 1.0 and d["loss"] > 0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=10)
    d2 = prelu.diagnose(model, loader)
    assert d2["examples"] == 48 and d2["acc"] == d["acc"]
    assert [l["negative_share"] for l in d2["layers"]] == [l["negative_share"] for l in d["layers"]]


def test_canonical_state_dict_loads_strictly_into_the_module(resnet, images):
    model = prelu.from_torch(resnet, images[:2])
    canon, report = prelu.canonicalize(model, return_report=True)
    assert len(report["bn"]["folded"]) == 6
    assert report["max_output_diff"] < 1e-4
    sd = canon.torch_state_dict()
    twin = ResNet()
    twin.load_state_dict(sd, strict=True)
    twin.eval()
    with torch.no_grad():
        want, got = resnet(images), twin(images)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    # The folded BatchNorms are identities (the shift of the bias-less conv before them in their bias).
    assert torch.all(sd["bn1.weight"] == 1) and torch.all(sd["bn1.running_mean"] == 0)
    assert torch.allclose(sd["bn1.running_var"], torch.full((8,), 1 - 1e-5))
    assert int(sd["bn1.num_batches_tracked"]) == 7
    # The canonical model itself computes the same function.
    np.testing.assert_allclose(canon(images), want.numpy(), rtol=1e-4, atol=1e-5)


def test_canonicalize_checks_on_given_inputs(resnet, images):
    model = prelu.from_torch(resnet, images[:2])
    canon = prelu.canonicalize(model, images[:8])
    assert isinstance(canon, prelu.Model)
    _, report = prelu.canonicalize(model, images[:8], return_report=True)
    assert report["examples"] == 8


def test_a_sequential_network_with_pools_and_leaky_relu():
    torch.manual_seed(6)
    net = randomize(Vgg(), seed=3)
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    model = prelu.from_torch(net, x[:1])
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(model(x), want, rtol=1e-4, atol=1e-5)
    hooks = negative_shares(net, x)
    d = prelu.diagnose(model, x)
    got = {l["layer"]: l["negative_share"] for l in d["layers"]}
    # The Leaky ReLU is an activation layer of prelu's too; the hooks watch the PReLUs.
    assert set(got) == set(hooks) | {"features.6"}
    for k in hooks:
        assert got[k] == pytest.approx(hooks[k], abs=1e-3), k
    canon, report = prelu.canonicalize(model, x, return_report=True)
    assert len(report["bn"]["folded"]) == 4
    twin = Vgg()
    twin.load_state_dict(canon.torch_state_dict(), strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(twin.eval()(x).numpy(), want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(prelu.to_torch(canon)(x).numpy(), want, rtol=1e-4, atol=1e-5)


def test_a_flat_network_with_biases():
    torch.manual_seed(3)
    net = randomize(Mlp())
    x = torch.rand(20, 12)
    model = prelu.from_torch(net, x[:4])
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(model(x), want, rtol=1e-4, atol=1e-5)
    canon = prelu.canonicalize(model, x)
    twin = Mlp()
    twin.load_state_dict(canon.torch_state_dict(), strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(twin.eval()(x).numpy(), want, rtol=1e-4, atol=1e-5)


def test_from_torch_leaves_the_module_mode(resnet, images):
    net = ResNet().train()
    prelu.from_torch(net, images[:2])
    assert net.training


def test_an_op_prelu_cannot_hold_names_the_op_and_module():
    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.gate = torch.nn.Sigmoid()

        def forward(self, x):
            return self.gate(self.fc(x))

    with pytest.raises(prelu.PreluError, match=r"Sigmoid.*`gate`"):
        prelu.from_torch(Gated(), torch.rand(2, 4))


class PerChannel(torch.nn.Module):
    """A per-channel input normalisation before a conv (padded or not)."""

    def __init__(self, padding):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=padding)
        self.act = torch.nn.PReLU(4)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        mean = torch.tensor([0.4, 0.5, 0.6]).reshape(1, 3, 1, 1)
        std = torch.tensor([0.2, 0.25, 0.3]).reshape(1, 3, 1, 1)
        x = self.act(self.conv((x - mean) / std))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_a_per_channel_normalisation_before_a_padded_conv_is_kept():
    torch.manual_seed(5)
    net = randomize(PerChannel(padding=1))
    x = torch.rand(6, 3, 8, 8)
    model = prelu.from_torch(net, x[:1])
    assert model.graph()["input_norm"]["std"] == pytest.approx([0.2, 0.25, 0.3])
    twin = PerChannel(padding=1)
    twin.load_state_dict(prelu.canonicalize(model, x).torch_state_dict(), strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(twin.eval()(x).numpy(), net(x).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_a_per_channel_normalisation_folded_into_the_first_layer_is_taken_back_out(bias):
    torch.manual_seed(8)
    net = randomize(PerChannel(padding=0))
    if not bias:
        net.conv.bias = None
    x = torch.rand(6, 3, 8, 8)
    model = prelu.from_torch(net, x[:1])
    assert any("folded into `conv`" in n for n in model.notes)
    with torch.no_grad():
        want = net(x).numpy()
    for m in (model, prelu.canonicalize(model, x)):
        twin = PerChannel(padding=0)
        if not bias:
            twin.conv.bias = None
        twin.load_state_dict(m.torch_state_dict(), strict=True)
        with torch.no_grad():
            np.testing.assert_allclose(twin.eval()(x).numpy(), want, rtol=1e-4, atol=1e-5)
