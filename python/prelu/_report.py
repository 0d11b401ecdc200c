"""The sentinel's rules and prelu's file formats, in plain Python (no torch).

This is the half of ``prelu.torch.Sentinel`` that turns an epoch's merged
counts into what prelu writes: a ``LayerReport`` per layer, the alarms a
layer raises, the ``metrics.jsonl`` lines and the run's ``config.toml``.
Definitions, thresholds, field names, their order and the alarm messages
follow the Rust crate (``src/analyses/sentinel.rs``, ``src/run/metrics.rs``,
``src/run/config.rs``), so that ``prelu report`` reads a PyTorch run like
one of its own.
"""

import decimal
import json
import math
import os
import tempfile

#: prelu's default alarm thresholds (``SentinelConfig::default``).
DEFAULT_ALARMS = {
    "dead_share": 0.2,
    "idle_share": 0.005,
    "idle_epochs": 2,
    "grad_ratio": 1e3,
    "stuck_slope": 0.01,
    "slope_tol": 0.05,
}

#: The keys of prelu's ``TrainConfig`` a foreign run may set in its
#: ``config.toml`` (prelu's reader refuses any other key).
CONFIG_KEYS = {
    "data": str,
    "model": str,
    "hidden": list,
    "channels": list,
    "act": str,
    "alpha_init": float,
    "slope_constraint": str,
    "init": str,
    "batch_norm": bool,
    "optimizer": str,
    "lr": float,
    "momentum": float,
    "weight_decay": float,
    "decay_bn": bool,
    "schedule": str,
    "epochs": int,
    "batch_size": int,
    "seed": int,
    "train_limit": int,
    "test_limit": int,
    "log_every": int,
    "bias_init": float,
    "sentinel": bool,
}


def check_alarms(alarms):
    """prelu's thresholds with ``alarms`` (a dict) over them, checked as
    ``SentinelConfig::validate`` checks them; raises ``ValueError``."""
    cfg = dict(DEFAULT_ALARMS)
    for k, v in (alarms or {}).items():
        if k not in cfg:
            raise ValueError(f"unknown alarm threshold `{k}`; expected one of {sorted(cfg)}")
        cfg[k] = int(v) if k == "idle_epochs" else float(v)
    for k in ("dead_share", "idle_share"):
        if not 0.0 <= cfg[k] <= 1.0:
            raise ValueError(f"alarms: {k} must be in [0, 1], got {cfg[k]}")
    if not 1 <= cfg["idle_epochs"] <= 1_000_000:
        raise ValueError(f"alarms: idle_epochs must be in 1..=1000000, got {cfg['idle_epochs']}")
    if not (cfg["grad_ratio"] >= 1.0 and math.isfinite(cfg["grad_ratio"])):
        raise ValueError(f"alarms: grad_ratio must be a finite number >= 1, got {cfg['grad_ratio']}")
    if not (cfg["stuck_slope"] >= 0.0 and math.isfinite(cfg["stuck_slope"])):
        raise ValueError(f"alarms: stuck_slope must be a finite number >= 0, got {cfg['stuck_slope']}")
    if not 0.0 <= cfg["slope_tol"] < 0.5:
        raise ValueError(f"alarms: slope_tol must be in [0, 0.5), got {cfg['slope_tol']}")
    return cfg


# ---------------------------------------------------------------- numbers


def rust_display(v):
    """A float as Rust's ``{}`` writes it: shortest round-trip digits, never
    an exponent, no trailing ``.0`` (``0.01``, ``1``, ``NaN``, ``inf``)."""
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    s = format(decimal.Decimal(repr(v)), "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s


def rust_exp(v, digits):
    """A float as Rust's ``{:.Ne}`` writes it (``1.5e-5``, ``2.00e3``)."""
    v = float(v)
    if not math.isfinite(v):
        return rust_display(v)
    mantissa, exp = f"{v:.{digits}e}".split("e")
    return f"{mantissa}e{int(exp)}"


def rust_fixed(v, digits):
    """A float as Rust's ``{:.N}`` writes it (``0.250``, ``NaN``)."""
    v = float(v)
    return f"{v:.{digits}f}" if math.isfinite(v) else rust_display(v)


def short_num(v):
    """A slope for a message: 3 decimals, or 2 significant digits when tiny."""
    if v != 0.0 and abs(v) < 5e-4:
        return rust_exp(v, 1)
    return rust_fixed(v, 3)


def channel_list(c, most):
    """``0, 4, 7`` (the first ``most``, then ``and N more``)."""
    s = [str(i) for i in c[:most]]
    if len(c) > most:
        s.append(f"and {len(c) - most} more")
    return ", ".join(s)


def json_safe(v):
    """``v`` with every NaN and infinity as ``None``, as serde_json writes them."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def json_line(obj):
    """One ``metrics.jsonl`` line (compact, like serde_json), newline included."""
    return json.dumps(json_safe(obj), separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n"


# ------------------------------------------------------------ the reports


def slope_classes(slopes, tol):
    """The slope classes of ``SlopeClasses::of`` (indices into ``slopes``)."""

    def pick(f):
        return [i for i, a in enumerate(slopes) if f(a)]

    return {
        "negative": pick(lambda a: a < -tol),
        "near_zero": pick(lambda a: abs(a) < tol),
        "near_one": pick(lambda a: abs(a - 1.0) < tol),
        "above_one": pick(lambda a: a > 1.0 + tol),
        "non_invertible": pick(lambda a: not a > 0.0),
    }


def stuck_channels(dead, slopes, stuck_slope):
    """The dead channels whose |slope| is below ``stuck_slope`` (none without
    slopes; a shared slope counts for every channel)."""
    if not slopes:
        return []

    def slope_of(c):
        if len(slopes) == 1:
            return slopes[0]
        return slopes[c] if c < len(slopes) else 0.0

    return [c for c in dead if abs(slope_of(c)) < stuck_slope]


class EpochCounts:
    """One layer's merged statistics of an epoch (plain Python numbers).

    ``negative``: inputs ``x < 0`` per channel; ``max_input``: the largest
    input per channel (a channel is never positive when it is <= 0);
    ``count``: elements seen; ``out_sum``/``out_sum_sq``: sum and sum of
    squares of the outputs; ``slopes``: the PReLU slopes (empty otherwise);
    ``slope_abs``: sum over backward passes of |d loss / d slope| per slope,
    ``slope_norm_sum``/``slope_steps`` its L2 norms and the number of passes;
    ``grad_norm_sum``/``grad_steps``: the same for the feeding weight's
    gradient (``None`` when the layer has no feeding weight)."""

    def __init__(self, **kw):
        self.negative = kw["negative"]
        self.max_input = kw["max_input"]
        self.count = kw["count"]
        self.out_sum = kw["out_sum"]
        self.out_sum_sq = kw["out_sum_sq"]
        self.slopes = kw.get("slopes", [])
        self.slope_abs = kw.get("slope_abs", [])
        self.slope_norm_sum = kw.get("slope_norm_sum", 0.0)
        self.slope_steps = kw.get("slope_steps", 0)
        self.grad_norm_sum = kw.get("grad_norm_sum")
        self.grad_steps = kw.get("grad_steps", 0)


class LayerState:
    """What one layer carries from epoch to epoch: its name, kind and the
    idle streaks of its slopes."""

    def __init__(self, name, kind):
        self.name = name
        self.kind = kind
        self.idle_streak = []

    def report(self, st, cfg):
        """The layer's ``LayerReport`` (a dict in prelu's field order) on the
        epoch's counts ``st``; advances the idle streaks."""
        channels = len(st.negative)
        if len(self.idle_streak) != channels:
            self.idle_streak = [0] * max(channels, 1)
        per_channel = float(max(st.count // max(channels, 1), 1))
        share = [n / per_channel for n in st.negative]
        seen = st.count > 0
        dead = [c for c in range(channels) if seen and st.max_input[c] <= 0]
        linear = [c for c in range(channels) if seen and st.negative[c] == 0]
        slopes = [float(a) for a in st.slopes]
        slope_grad = [s / max(st.slope_steps, 1) for s in st.slope_abs]
        n = float(max(st.count, 1))
        mean = st.out_sum / n
        has_slope = bool(slopes)
        return {
            "layer": self.name,
            "kind": self.kind,
            "channels": channels,
            "negative_share": sum(st.negative) / n,
            "negative_share_per_channel": share,
            "dead": dead,
            "linear": linear,
            "stuck": stuck_channels(dead, slopes, cfg["stuck_slope"]),
            "idle": self._idle(share, len(slopes), slope_grad, st.slope_steps, cfg),
            "slopes": slopes,
            "slope_classes": slope_classes(slopes, cfg["slope_tol"]),
            "slope_grad": slope_grad,
            "weight_grad_norm": (
                st.grad_norm_sum / st.grad_steps if st.grad_norm_sum is not None and st.grad_steps > 0 else None
            ),
            "slope_grad_norm": st.slope_norm_sum / st.slope_steps if has_slope and st.slope_steps > 0 else None,
            "act_mean": mean,
            "act_var": st.out_sum_sq / n - mean * mean,
        }

    def _idle(self, share, n_slopes, slope_grad, steps, cfg):
        """Idle slopes: too few negative inputs or a zero gradient, epoch
        after epoch (a shared slope by the layer's mean share)."""
        channels = len(share)
        idle = []
        if n_slopes == channels and channels > 0:
            for c in range(channels):
                quiet = share[c] < cfg["idle_share"] or (steps > 0 and slope_grad[c] == 0.0)
                self.idle_streak[c] = self.idle_streak[c] + 1 if quiet else 0
                if self.idle_streak[c] >= cfg["idle_epochs"]:
                    idle.append(c)
        elif n_slopes == 1:
            total = sum(share) / max(channels, 1)
            quiet = total < cfg["idle_share"] or (steps > 0 and slope_grad[0] == 0.0)
            self.idle_streak[0] = self.idle_streak[0] + 1 if quiet else 0
            if self.idle_streak[0] >= cfg["idle_epochs"]:
                idle.append(0)
        return idle


# ----------------------------------------------------------------- alarms


class Alarms:
    """The alarm rules of prelu's sentinel; each alarm is raised once per run
    (non-positive slopes once per channel)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.raised = set()

    def check(self, epoch, reports, seen):
        """The alarms raised for the first time at ``epoch`` by the layer
        reports (``seen[i]``: layer ``i`` saw inputs), as prelu's ``Alarm``
        dicts, in prelu's order."""
        out = []
        for r, s in zip(reports, seen):
            self._dead_units(epoch, r, s, out)
            self._idle_slopes(epoch, r, out)
            self._non_positive(epoch, r, out)
            self._non_finite(epoch, r, out)
        self._gradient_flow(epoch, reports, out)
        return out

    def _raise(self, out, epoch, layer, kind, message):
        if (layer, kind, None) not in self.raised:
            self.raised.add((layer, kind, None))
            out.append({"epoch": epoch, "layer": layer, "kind": kind, "message": message})

    def _dead_units(self, epoch, r, seen, out):
        is_prelu = bool(r["slopes"])
        bad = len(r["stuck"]) if is_prelu else len(r["dead"])
        channels = r["channels"]
        if seen and channels > 0 and bad / channels > self.cfg["dead_share"]:
            if is_prelu:
                what = f"stuck (never positive, |slope| < {rust_display(self.cfg['stuck_slope'])})"
            else:
                what = "dead (never positive)"
            pct = rust_fixed(100.0 * bad / channels, 1)
            message = f"{r['layer']}: {bad} of {channels} units ({pct}%) are {what}"
            self._raise(out, epoch, r["layer"], "dead-units", message)

    def _idle_slopes(self, epoch, r, out):
        if not r["idle"]:
            return
        n = self.cfg["idle_epochs"]
        when = "on this pass" if n == 1 else f"for {n} epochs in a row"
        message = (
            f"{r['layer']}: {len(r['idle'])} slope(s) idle {when} (negative share < "
            f"{rust_display(100.0 * self.cfg['idle_share'])}% or zero gradient)"
        )
        self._raise(out, epoch, r["layer"], "idle-slope", message)

    def _non_positive(self, epoch, r, out):
        new = []
        for c in r["slope_classes"]["non_invertible"]:
            key = (r["layer"], "non-positive-slope", c)
            if key not in self.raised:
                self.raised.add(key)
                new.append(c)
        if new:
            out.append(
                {
                    "epoch": epoch,
                    "layer": r["layer"],
                    "kind": "non-positive-slope",
                    "message": self._non_positive_message(r, new),
                    "channels": new,
                }
            )

    def _non_positive_message(self, r, new):
        tol = self.cfg["slope_tol"]
        shown = ", ".join(short_num(r["slopes"][c]) for c in new[:8])
        what = "the shared slope" if len(r["slopes"]) == 1 else f"channel(s) {channel_list(new, 16)}"
        neg = sum(1 for c in new if c in r["slope_classes"]["negative"])
        tail = f"; {neg} clearly negative (< -{rust_display(tol)}): non-monotone, |x|-like units" if neg else ""
        return (
            f"{r['layer']}: slope(s) <= 0 at {what} (a = {shown}{', ...' if len(new) > 8 else ''}); "
            f"{len(r['slope_classes']['non_invertible'])} of {len(r['slopes'])} slopes are now <= 0: "
            f"the layer is not invertible there{tail}"
        )

    def _non_finite(self, epoch, r, out):
        w = r["weight_grad_norm"]
        finite = (
            math.isfinite(r["act_mean"])
            and math.isfinite(r["act_var"])
            and (w is None or math.isfinite(w))
            and all(math.isfinite(a) for a in r["slopes"])
        )
        if not finite:
            message = f"{r['layer']}: NaN or infinity in activations, slopes or gradients"
            self._raise(out, epoch, r["layer"], "non-finite", message)

    def _gradient_flow(self, epoch, reports, out):
        norms = [r["weight_grad_norm"] for r in reports if r["weight_grad_norm"] is not None]
        if len(norms) < 2 or not norms[-1] > 0.0:
            return
        ratio = norms[0] / norms[-1]
        if ratio < 1.0 / self.cfg["grad_ratio"]:
            way, kind = "vanish", "vanishing-gradient"
        elif ratio > self.cfg["grad_ratio"]:
            way, kind = "explode", "exploding-gradient"
        else:
            return
        message = (
            f"first-layer gradient norm is {rust_exp(ratio, 2)} x the last layer's: "
            f"gradients {way} towards the input"
        )
        self._raise(out, epoch, "model", kind, message)


# ---------------------------------------------------------------- lines


def sentinel_line(epoch, layers):
    """``{"kind":"sentinel","epoch":E,"layers":[...]}``."""
    return json_line({"kind": "sentinel", "epoch": epoch, "layers": layers})


def alarm_line(alarm):
    """``{"kind":"alarm","alarm":{...}}`` (``channels`` only when not empty)."""
    a = {k: alarm[k] for k in ("epoch", "layer", "kind", "message")}
    if alarm.get("channels"):
        a["channels"] = alarm["channels"]
    return json_line({"kind": "alarm", "alarm": a})


def slope_summary(layer, slopes):
    """A ``SlopeSummary`` of one PReLU layer's slopes."""
    return {
        "layer": layer,
        "mean": sum(slopes) / len(slopes),
        "min": min(slopes),
        "max": max(slopes),
    }


EPOCH_FIELDS = ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "samples_per_s")


def epoch_line(epoch, step, values, slopes):
    """``{"kind":"epoch",...}``: ``values`` maps the ``EPOCH_FIELDS`` to
    numbers or ``None`` (written as null, which prelu reads as NaN);
    ``slopes``: the ``SlopeSummary`` dicts."""
    obj = {"kind": "epoch", "epoch": epoch, "step": step}
    for k in EPOCH_FIELDS:
        v = values.get(k)
        obj[k] = None if v is None else float(v)
    obj["slopes"] = slopes
    return json_line(obj)


# ---------------------------------------------------------------- config


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"config value {v} cannot be written: prelu's config takes finite numbers")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ValueError(f"config value {v!r} cannot be written as TOML")


def config_toml(config, alarms, comment):
    """The text of a ``config.toml`` prelu's reader accepts: the given
    ``TrainConfig`` keys (checked against ``CONFIG_KEYS``), then the
    ``[alarms]`` table; ``comment`` lines go first, as TOML comments."""
    lines = [f"# {c}" for c in comment]
    for k, v in config.items():
        want = CONFIG_KEYS.get(k)
        if want is None:
            raise ValueError(f"`{k}` is not a key of prelu's config.toml; known keys: {sorted(CONFIG_KEYS)}")
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ValueError(f"config key `{k}` takes a {want.__name__}, got {v!r}")
        if want is int and not 0 <= v <= 2**63 - 1:
            raise ValueError(f"config key `{k}` must be in 0..=2^63-1, got {v}")
        lines.append(f"{k} = {_toml_value(v)}")
    lines.append("")
    lines.append("[alarms]")
    for k in DEFAULT_ALARMS:
        lines.append(f"{k} = {_toml_value(alarms[k])}")
    return "\n".join(lines) + "\n"


def write_atomic(path, text):
    """Writes ``text`` to ``path`` through a temporary file and a rename."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
