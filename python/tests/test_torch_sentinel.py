"""prelu.torch.Sentinel: counts against hand computations, prelu's line
format and alarm rules."""

import json
import math
import os

import pytest
import torch
from torch import nn

import prelu.torch as pt
from prelu import _prelu

# The field order of prelu's LayerReport and EpochMetrics (src/analyses/sentinel.rs,
# src/run/metrics.rs).
LAYER_FIELDS = [
    "layer",
    "kind",
    "channels",
    "negative_share",
    "negative_share_per_channel",
    "dead",
    "linear",
    "stuck",
    "idle",
    "slopes",
    "slope_classes",
    "slope_grad",
    "weight_grad_norm",
    "slope_grad_norm",
    "act_mean",
    "act_var",
]
EPOCH_FIELDS = [
    "kind",
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "seconds",
    "samples_per_s",
    "slopes",
]


def lines(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def tiny():
    """Linear(2, 3) with hand-set weights, then PReLU(3) at 0.25."""
    lin = nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        lin.bias.copy_(torch.tensor([0.0, 0.0, -10.0]))
    return nn.Sequential(lin, nn.PReLU(3))


X = torch.tensor([[1.0, -2.0], [-1.0, 3.0], [2.0, 1.0], [-3.0, -1.0]])


def test_counts_match_a_hand_computation(tmp_path):
    # Pre-activations: channel 0 is 1, -1, 2, -3; channel 1 is -2, 3, 1, -1;
    # channel 2 is -11, -8, -7, -14 (never positive: dead, slope 0.25 so not stuck).
    m = tiny()
    s = pt.Sentinel(m, tmp_path)
    m(X).sum().backward()
    layers, alarms = s.epoch_end(1)
    s.close()
    r = layers[0]
    assert list(r) == LAYER_FIELDS
    assert (r["layer"], r["kind"], r["channels"]) == ("1", "prelu", 3)
    assert r["negative_share_per_channel"] == [0.5, 0.5, 1.0]
    assert r["negative_share"] == 8 / 12
    assert (r["dead"], r["linear"], r["stuck"], r["idle"]) == ([2], [], [], [])
    assert r["slopes"] == [0.25, 0.25, 0.25]
    # Outputs y: 1, -.25, 2, -.75 | -.5, 3, 1, -.25 | -2.75, -2, -1.75, -3.5.
    mean = -4.75 / 12
    assert r["act_mean"] == pytest.approx(mean)
    assert r["act_var"] == pytest.approx(42.8125 / 12 - mean * mean)
    # d sum(y) / d a_c = sum of the negative inputs of channel c.
    assert r["slope_grad"] == pytest.approx([4.0, 3.0, 40.0])
    assert r["slope_grad_norm"] == pytest.approx(math.sqrt(1625.0))
    # dL/dW: [[2, -0.5], [0.5, 3.25], [-0.25, 0.25]].
    assert r["weight_grad_norm"] == pytest.approx(math.sqrt(15.1875))
    assert alarms == []
    written = lines(tmp_path)
    assert [line["kind"] for line in written] == ["epoch", "sentinel"]
    assert list(written[0]) == EPOCH_FIELDS
    assert written[0]["slopes"] == [{"layer": "1", "mean": 0.25, "min": 0.25, "max": 0.25}]
    assert written[0]["step"] == 1
    assert written[1]["layers"] == json.loads(json.dumps(layers))


def test_channels_are_dim_1_and_a_vector_is_one_channel(tmp_path):
    act = nn.PReLU(2)
    s = pt.Sentinel(act, tmp_path)
    # (N=2, C=2, H=1, W=2): channel 0 holds 1, -1, -2, -3; channel 1 holds 2, 0, 4, 5.
    x = torch.tensor([[[[1.0, -1.0]], [[2.0, 0.0]]], [[[-2.0, -3.0]], [[4.0, 5.0]]]])
    act(x)
    r = s.epoch_end(1)[0][0]
    s.close()
    assert r["layer"] == "act"
    assert r["negative_share_per_channel"] == [0.75, 0.0]
    assert r["linear"] == [1] and r["dead"] == []
    relu = nn.ReLU()
    s = pt.Sentinel(relu, tmp_path / "vec")
    relu(torch.tensor([-1.0, 2.0, -3.0, 0.0]))
    r = s.epoch_end(1)[0][0]
    s.close()
    assert (r["channels"], r["negative_share_per_channel"], r["kind"]) == (1, [0.5], "relu")


def test_in_place_relu_is_counted_before_it_overwrites_its_input(tmp_path):
    m = nn.Sequential(nn.Identity(), nn.ReLU(inplace=True))
    s = pt.Sentinel(m, tmp_path)
    m(torch.tensor([[-1.0, 2.0], [-3.0, 4.0]]))
    r = s.epoch_end(1)[0][0]
    s.close()
    assert r["negative_share_per_channel"] == [1.0, 0.0]
    assert r["dead"] == [0] and r["linear"] == [1]
    assert r["act_mean"] == pytest.approx(6.0 / 4)


def test_only_training_passes_count_and_epochs_reset(tmp_path):
    m = tiny()
    s = pt.Sentinel(m, tmp_path)
    m(X)
    m.eval()
    m(X)
    m(X)
    r1 = s.epoch_end(1)[0][0]
    m.train()
    r2 = s.epoch_end(2)[0][0]
    s.close()
    assert r1["negative_share"] == 8 / 12
    # Nothing seen in epoch 2: no shares, nothing dead or linear.
    assert (r2["negative_share"], r2["dead"], r2["linear"]) == (0.0, [], [])
    assert lines(tmp_path)[2]["step"] == 1


def test_dead_and_stuck_alarms_use_prelus_messages(tmp_path):
    relu = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    with torch.no_grad():
        relu[0].bias.copy_(torch.tensor([0.0, 0.0, -100.0]))
        relu[0].weight.copy_(torch.eye(3, 2))
    s = pt.Sentinel(relu, tmp_path / "relu")
    relu(X)
    alarms = s.epoch_end(1)[1]
    s.close()
    assert alarms == [
        {"epoch": 1, "layer": "1", "kind": "dead-units", "message": "1: 1 of 3 units (33.3%) are dead (never positive)"}
    ]
    m = tiny()
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor([0.25, 0.25, 0.001]))
    s = pt.Sentinel(m, tmp_path / "prelu")
    m(X)
    alarms = s.epoch_end(1)[1]
    s.close()
    assert [a["message"] for a in alarms] == ["1: 1 of 3 units (33.3%) are stuck (never positive, |slope| < 0.01)"]
    assert lines(tmp_path / "prelu")[2] == {"kind": "alarm", "alarm": alarms[0]}


def test_non_positive_slopes_raise_once_per_channel(tmp_path):
    act = nn.PReLU(3)
    with torch.no_grad():
        act.weight.copy_(torch.tensor([0.25, -0.5, 0.0]))
    s = pt.Sentinel(act, tmp_path)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    act(x)
    first = s.epoch_end(1)[1]
    act(x)
    second = s.epoch_end(2)[1]
    s.close()
    assert first == [
        {
            "epoch": 1,
            "layer": "act",
            "kind": "non-positive-slope",
            "message": "act: slope(s) <= 0 at channel(s) 1, 2 (a = -0.500, 0.000); 2 of 3 slopes are now <= 0: "
            "the layer is not invertible there; 1 clearly negative (< -0.05): non-monotone, |x|-like units",
            "channels": [1, 2],
        }
    ]
    assert second == []
    written = [line for line in lines(tmp_path) if line["kind"] == "alarm"]
    assert written == [{"kind": "alarm", "alarm": first[0]}]


def test_idle_slopes_after_idle_epochs(tmp_path):
    act = nn.PReLU(2)
    s = pt.Sentinel(act, tmp_path)
    x = torch.ones(4, 2)
    act(x)
    assert s.epoch_end(1)[1] == []
    act(x)
    layers, alarms = s.epoch_end(2)
    s.close()
    assert layers[0]["idle"] == [0, 1]
    assert [a["message"] for a in alarms] == [
        "act: 2 slope(s) idle for 2 epochs in a row (negative share < 0.5% or zero gradient)"
    ]


def counts(norm, out_sum=0.0):
    """One ReLU layer's epoch counts, as the Python side hands them to the library."""
    return {
        "negative": [1],
        "positive": [True],
        "count": 2,
        "out_sum": out_sum,
        "out_sum_sq": 1.0,
        "slopes": [],
        "slope_abs": [],
        "slope_norm_sum": None,
        "slope_steps": 1,
        "weight_norm_sum": norm,
        "weight_steps": 1,
    }


def test_gradient_flow_and_non_finite_rules_are_the_librarys():
    run = _prelu.SentinelRun([("a", "relu"), ("b", "relu")], "{}")
    epoch = {"step": 1}
    _, out = run.epoch_end(3, [counts(1e-5), counts(1.0, out_sum=float("nan"))], epoch)
    out = json.loads(out)
    assert [x["kind"] for x in out] == ["non-finite", "vanishing-gradient"]
    assert out[1] == {
        "epoch": 3,
        "layer": "model",
        "kind": "vanishing-gradient",
        "message": "first-layer gradient norm is 1.00e-5 x the last layer's: gradients vanish towards the input",
    }
    run = _prelu.SentinelRun([("a", "relu"), ("b", "relu")], "{}")
    _, out = run.epoch_end(4, [counts(1e5), counts(1.0)], epoch)
    assert json.loads(out)[0]["kind"] == "exploding-gradient"
    with pytest.raises(_prelu.PreluError, match="1 layers' counts for 2 layers"):
        run.epoch_end(5, [counts(1.0)], epoch)
    bad = dict(counts(1.0), positive=[True, False])
    with pytest.raises(_prelu.PreluError, match="1 negative counts but 2 positive flags"):
        run.epoch_end(5, [bad, counts(1.0)], epoch)


def test_epoch_metrics_and_config(tmp_path):
    m = tiny()
    opt = torch.optim.SGD(pt.param_groups(m, 1e-4), lr=0.05, momentum=0.9)
    s = pt.Sentinel(m, tmp_path, optimizer=opt, config={"epochs": 3, "batch_size": 4}, alarms={"dead_share": 0.5})
    m(X)
    s.epoch_end(1, train_loss=0.5, test_acc=torch.tensor(0.75), seconds=2.0)
    s.close()
    e = lines(tmp_path)[0]
    assert (e["lr"], e["train_loss"], e["test_acc"], e["train_acc"]) == (0.05, 0.5, 0.75, None)
    assert e["samples_per_s"] == 2.0
    text = (tmp_path / "config.toml").read_text()
    assert 'optimizer = "sgd"\nlr = 0.05\nmomentum = 0.9\nweight_decay = 0.0001\n' in text
    assert "epochs = 3\nbatch_size = 4\n" in text and "dead_share = 0.5\n" in text
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads(text)
    assert cfg["model"] == "pytorch:Sequential"
    assert cfg["alarms"] == s.cfg and s.cfg["dead_share"] == 0.5


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="no nn.PReLU"):
        pt.Sentinel(nn.Linear(2, 2), tmp_path / "none")
    with pytest.raises(ValueError, match="alarms: unknown field `dead`"):
        pt.Sentinel(tiny(), tmp_path / "bad", alarms={"dead": 1})
    with pytest.raises(ValueError, match="alarms: dead_share must be in"):
        pt.Sentinel(tiny(), tmp_path / "bad", alarms={"dead_share": 2})
    with pytest.raises(ValueError, match="config: unknown field `layers`"):
        pt.Sentinel(tiny(), tmp_path / "bad", config={"layers": 3})
    with pytest.raises(ValueError, match="model must stay `pytorch:NAME`"):
        pt.Sentinel(tiny(), tmp_path / "bad", config={"model": "mlp"})
    s = pt.Sentinel(tiny(), tmp_path / "run")
    with pytest.raises(ValueError, match="epoch must be"):
        s.epoch_end(-1)
    with pytest.raises(TypeError, match="unknown metrics"):
        s.epoch_end(1, accuracy=0.5)
    s.close()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pt.Sentinel(tiny(), tmp_path / "run")
    pt.Sentinel(tiny(), tmp_path / "run", overwrite=True).close()
    assert lines(tmp_path / "run") == []


def test_close_removes_the_hooks(tmp_path):
    m = tiny()
    with pt.Sentinel(m, tmp_path) as s:
        pass
    m(X).sum().backward()
    assert all(w.neg is None and w.slope_abs is None for w in s.watches)
    with pytest.raises(RuntimeError, match="after close"):
        s.epoch_end(1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_counts_on_cuda_without_host_syncs(tmp_path):
    m = tiny().cuda()
    s = pt.Sentinel(m, tmp_path)
    x = X.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            m(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert s.watches[0].neg.device.type == "cuda"
    r = s.epoch_end(1)[0][0]
    s.close()
    assert r["negative_share_per_channel"] == [0.5, 0.5, 1.0]
    assert r["slope_grad"] == pytest.approx([4.0, 3.0, 40.0])


def test_with_an_optimizer_gradients_are_read_before_each_step(tmp_path):
    m = tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    s = pt.Sentinel(m, tmp_path, optimizer=opt)
    assert all(len(w.handles) == 1 for w in s.watches)  # no gradient hooks
    # Two backward passes accumulate into one step: read once, as their sum.
    m(X).sum().backward()
    m(X).sum().backward()
    opt.step()
    r = s.epoch_end(1)[0][0]
    s.close()
    assert r["slope_grad"] == pytest.approx([8.0, 6.0, 80.0])
    assert r["slope_grad_norm"] == pytest.approx(2 * math.sqrt(1625.0))
    assert r["weight_grad_norm"] == pytest.approx(2 * math.sqrt(15.1875))
    assert r["negative_share_per_channel"] == [0.5, 0.5, 1.0]


def test_the_model_key_stays_a_pytorch_name(tmp_path):
    with pytest.raises(ValueError, match="pytorch:NAME"):
        pt.Sentinel(tiny(), tmp_path, config={"model": "mlp"})
    pt.Sentinel(tiny(), tmp_path, config={"model": "pytorch:tiny"}).close()
    assert 'model = "pytorch:tiny"' in (tmp_path / "config.toml").read_text()


def test_the_bool_count_path_gives_the_same_counts(tmp_path, monkeypatch):
    # Channels of 2^24 elements or more (and devices other than the CPU) sum bool masks.
    from prelu import _sentinel

    monkeypatch.setattr(_sentinel, "_EXACT_F32", 1)
    test_counts_match_a_hand_computation(tmp_path)


def conv_reports(tmp_path, name, x, channels_last=False):
    """Layer reports of a small conv net (PReLU and an in-place ReLU) over
    two training passes of ``x``."""
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU(4), nn.Conv2d(4, 5, 1), nn.ReLU(inplace=True))
    if channels_last:
        m, x = m.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    s = pt.Sentinel(m, tmp_path / name)
    for _ in range(2):
        m(x).sum().backward()
    layers, _ = s.epoch_end(1)
    s.close()
    return layers


def test_the_librarys_counter_gives_pytorchs_counts(tmp_path, monkeypatch):
    # Dense float32 CPU tensors (NCHW or channels-last) are counted by the
    # library's kernel; anything else by PyTorch's reductions. Same reports.
    from prelu import _sentinel

    x = torch.randn(6, 3, 9, 7, generator=torch.Generator().manual_seed(6))
    fast = conv_reports(tmp_path, "fast", x)
    last = conv_reports(tmp_path, "last", x, channels_last=True)
    monkeypatch.setattr(_sentinel, "_cpu_inner", lambda x: None)
    slow = conv_reports(tmp_path, "slow", x)
    for a, b, c in zip(fast, last, slow):
        for k in ("negative_share_per_channel", "dead", "linear", "channels"):
            assert a[k] == b[k] == c[k], k
        assert a["slope_grad"] == c["slope_grad"] and b["slope_grad"] == pytest.approx(c["slope_grad"], rel=1e-5)
        for k in ("act_mean", "act_var"):
            assert a[k] == pytest.approx(c[k], rel=1e-5) and b[k] == pytest.approx(c[k], rel=1e-5), k
    assert fast[1]["kind"] == "relu" and 0 < fast[0]["negative_share"] < 1


def test_a_bad_buffer_is_refused_not_read():
    c = _prelu.Counter(2)
    with pytest.raises(_prelu.PreluError, match="not a float32 buffer"):
        c.add(0, None, 4, 1, False)
    with pytest.raises(_prelu.PreluError, match="not whole channels"):
        c.add(4096, None, 3, 1, False)
    with pytest.raises(_prelu.PreluError, match="channels"):
        _prelu.Counter(0)
    t = torch.tensor([-1.0, 2.0, 0.0, -3.0])
    c.add(t.data_ptr(), t.data_ptr(), 4, 1, False)
    # Channels alternate (inner 1): channel 0 holds -1, 0; channel 1 holds 2, -3.
    assert c.take() == ([1, 1], [0, 1], 4, -2.0, 14.0)
    assert c.take() == ([0, 0], [0, 0], 0, 0.0, 0.0)


def test_empty_batches_and_other_widths_are_not_counted(tmp_path):
    relu = nn.ReLU()
    s = pt.Sentinel(relu, tmp_path)
    relu(torch.zeros(0, 3))
    relu(torch.tensor([[1.0, -1.0, 2.0]]))
    with pytest.warns(UserWarning, match="got 2 channels after 3"):
        relu(torch.ones(4, 2))
    relu(torch.ones(4, 2))
    r = s.epoch_end(1)[0][0]
    s.close()
    assert (r["channels"], r["negative_share_per_channel"], r["dead"]) == (3, [0.0, 1.0, 0.0], [1])


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_every_counts_every_nth_training_pass(tmp_path, with_optimizer):
    m = tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    s = pt.Sentinel(m, tmp_path, optimizer=opt if with_optimizer else None, every=2)
    for i in range(5):
        opt.zero_grad()
        # Passes 0, 2, 4 count (X); passes 1, 3 would make every channel positive.
        m(X if i % 2 == 0 else torch.full((4, 2), 50.0)).sum().backward()
        opt.step()
    r = s.epoch_end(1)[0][0]
    s.close()
    assert r["negative_share_per_channel"] == [0.5, 0.5, 1.0] and r["dead"] == [2]
    assert r["slope_grad"] == pytest.approx([4.0, 3.0, 40.0])
    assert lines(tmp_path)[0]["step"] == 5
    with pytest.raises(ValueError, match="every"):
        pt.Sentinel(tiny(), tmp_path / "x", every=0)
