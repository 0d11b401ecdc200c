"""prelu's diagnostic sentinel for PyTorch models: forward hooks count, per
activation layer and channel, the negative inputs, the largest input and the
output moments on the tensors' own device; an optimiser step pre-hook (or,
without an optimiser, gradient hooks) adds up the PReLU slope gradients and
the gradient norm of the weight layer feeding each activation.
``epoch_end`` merges the counters across ranks (when ``torch.distributed``
is initialised) and hands them to the library (``_prelu.SentinelRun``):
its sentinel rules make the layer reports and alarms, and on rank 0 its
run folder writes ``config.toml`` and the ``metrics.jsonl`` lines, so that
``prelu report RUN`` renders the run as one of prelu's own.

Nothing in a hook reads a value back to the host: the counters stay on the
device until ``epoch_end``, which reads them back once.
"""

import html
import json
import math
import os
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

from . import _display
from . import _modules
from . import _prelu

#: The epoch line's numbers ``epoch_end`` takes (besides ``step``).
EPOCH_FIELDS = ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "samples_per_s")


def _rank():
    """This process's rank (0 without ``torch.distributed``)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


#: Below this many elements per channel, a float32 sum of 0/1 values is exact.
_EXACT_F32 = 2**24


class _Scratch:
    """One float32 buffer per device, shared by the layers of a sentinel
    (grown to the largest input): the 0/1 mask of the negative inputs is
    written into it. The layers run one after another, so one buffer
    serves them all."""

    def __init__(self):
        self.buffers = {}

    def like(self, x):
        """A float32 tensor of ``x``'s shape on its device (contents undefined)."""
        b = self.buffers.get(x.device)
        if b is None or b.numel() < x.numel():
            b = torch.empty(x.numel(), dtype=torch.float32, device=x.device)
            self.buffers[x.device] = b
        return b[: x.numel()].view(x.shape)


def _negatives(x, dims, scratch):
    """How many elements of ``x`` are negative per channel (the dims not in
    ``dims``), on ``x``'s device. On the CPU, where bool sums are several
    times slower than the forward pass, the 0/1 mask goes into the float32
    scratch buffer and is summed as float32 (exact while a channel has
    fewer than 2^24 elements); elsewhere, and for larger channels, the bool
    mask is summed."""
    if x.device.type != "cpu" or x.numel() // x.shape[1] >= _EXACT_F32:
        return (x < 0).sum(dim=dims)
    return torch.lt(x, 0, out=scratch.like(x)).sum(dim=dims)


def _cpu_inner(x):
    """The elements of one channel's run in ``x``'s memory when the
    library's counter can read ``x`` (``[N, C, ...]``, a dense float32 CPU
    tensor): the spatial size for a contiguous tensor, 1 for channels-last;
    else ``None`` (PyTorch's reductions count it)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    if x.is_contiguous():
        return x.numel() // (x.shape[0] * x.shape[1])
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return 1
    return None


def _dense_like(y, x):
    """Whether ``y`` (an output) is a dense float32 CPU tensor of ``x``'s size."""
    dense = y.is_contiguous() or (y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last))
    return y.device.type == "cpu" and y.dtype == torch.float32 and y.numel() == x.numel() and dense


class _Gate:
    """Whether the current training pass is one the sentinel counts."""

    def __init__(self):
        self.active = True


class _Watch:
    """The counters of one watched activation over the current epoch: all
    float64 tensors on the device of the tensors they count (integer counts
    stay exact below 2^53). A channel is never positive when its largest
    input is <= 0, so a running maximum stands for the positive count."""

    def __init__(self, name, act, weight, scratch, gate):
        self.name = name
        self.scratch = scratch
        self.gate = gate
        self.act = act
        self.weight = weight
        self.n_slopes = act.num_parameters if isinstance(act, nn.PReLU) else 0
        # PReLU with a slope per channel knows its channels before any input.
        self.channels = self.n_slopes if self.n_slopes > 1 else None
        self.warned = False
        self.counted = False
        self.handles = []
        self.reset()

    def reset(self):
        """Empties the counters (they are allocated again on the next input's device)."""
        self.neg = self.max = self.out_sum = self.out_sum_sq = None
        self.cpu = None
        self.count = 0
        self.slope_abs = self.slope_norm_sum = self.grad_norm_sum = None
        self.slope_steps = self.grad_steps = 0

    def attach(self, grad_hooks):
        """Registers the forward hooks (a pre-hook counts the input of an
        in-place activation before it is overwritten) and, with
        ``grad_hooks``, the gradient hooks of the slope and feeding weight."""
        if getattr(self.act, "inplace", False):
            self.handles.append(self.act.register_forward_pre_hook(self._pre_hook))
            self.handles.append(self.act.register_forward_hook(self._out_hook))
        else:
            self.handles.append(self.act.register_forward_hook(self._hook))
        if not grad_hooks:
            return
        if self.n_slopes and self.act.weight.requires_grad:
            self.handles.append(self.act.weight.register_hook(self._slope_grad))
        w = self.weight_param()
        if w is not None and w.requires_grad:
            self.handles.append(w.register_hook(self._weight_grad))

    def weight_param(self):
        """The feeding layer's weight, if there is one."""
        w = getattr(self.weight, "weight", None)
        return w if isinstance(w, torch.Tensor) else None

    def detach(self):
        """Removes every hook."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, mod, inputs, output):
        x = self._countable(mod, inputs)
        if x is None:
            return
        inner = _cpu_inner(x)
        if inner is not None and isinstance(output, torch.Tensor) and _dense_like(output, x):
            self._counter().add(x.data_ptr(), output.data_ptr(), x.numel(), inner, torch.get_num_threads() > 1)
            return
        self._count_input(x)
        self._count_output(output)

    def _pre_hook(self, mod, inputs):
        x = self._countable(mod, inputs)
        self.counted = None
        if x is None:
            return
        inner = _cpu_inner(x)
        if inner is not None:
            self._counter().add(x.data_ptr(), None, x.numel(), inner, torch.get_num_threads() > 1)
            self.counted = "cpu"
        else:
            self._count_input(x)
            self.counted = "torch"

    def _out_hook(self, mod, inputs, output):
        counted, self.counted = self.counted, None
        if counted == "cpu" and isinstance(output, torch.Tensor) and _dense_like(output, output):
            self._counter().add_outputs(output.data_ptr(), output.numel())
        elif counted == "cpu":
            self._count_output(output, allocate=True)
        elif counted == "torch":
            self._count_output(output)

    def _countable(self, mod, inputs):
        """A training-mode input to count, as ``[N, C, ...]`` (one channel
        for rank < 2), or ``None`` (not counted: evaluation mode, a pass the
        gate skips, an empty input, or one of another width)."""
        if not (mod.training and self.gate.active and inputs and isinstance(inputs[0], torch.Tensor)):
            return None
        x = inputs[0].detach()
        if x.numel() == 0:
            return None
        if x.dim() < 2:
            x = x.reshape(1, 1, -1)
        c = x.shape[1]
        if self.channels is None:
            self.channels = c
        if c != self.channels:
            if not self.warned:
                warnings.warn(
                    f"prelu sentinel: `{self.name}` got {c} channels after {self.channels}; "
                    "inputs of another width are not counted",
                    stacklevel=3,
                )
                self.warned = True
            return None
        return x

    def _counter(self):
        """The library's counter of this epoch's CPU inputs."""
        if self.cpu is None:
            self.cpu = _prelu.Counter(self.channels)
        return self.cpu

    def _count_input(self, x):
        """Adds an input's negative count and maximum per channel with
        PyTorch's reductions, on its own device."""
        if self.neg is None or self.neg.device != x.device:
            self._allocate(x.device)
        dims = [0, *range(2, x.dim())]
        with torch.no_grad():
            self.neg.add_(_negatives(x, dims, self.scratch))
            torch.maximum(self.max, x.amax(dim=dims), out=self.max)
        self.count += x.numel()

    def _count_output(self, output, allocate=False):
        if allocate and (self.out_sum is None or self.out_sum.device != output.device):
            self._allocate(output.device)
        with torch.no_grad():
            y = output.detach()
            dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
            self.out_sum.add_(y.sum(dtype=dtype))
            n = torch.linalg.vector_norm(y, dtype=dtype)
            self.out_sum_sq.addcmul_(n, n)

    def _allocate(self, device):
        """Counters on ``device`` (keeping what an earlier device counted)."""
        old = (self.neg, self.max, self.out_sum, self.out_sum_sq)
        f64 = {"dtype": torch.float64, "device": device}
        self.neg = torch.zeros(self.channels, **f64)
        self.max = torch.full((self.channels,), -math.inf, **f64)
        self.out_sum = torch.zeros((), **f64)
        self.out_sum_sq = torch.zeros((), **f64)
        if old[0] is not None:
            self.neg += old[0].to(device)
            torch.maximum(self.max, old[1].to(device), out=self.max)
            self.out_sum += old[2].to(device)
            self.out_sum_sq += old[3].to(device)

    def slope_accumulators(self, device):
        """``(|grad| sums per slope, grad norm sum)`` on ``device``."""
        if self.slope_abs is None:
            self.slope_abs = torch.zeros(self.n_slopes, dtype=torch.float64, device=device)
            self.slope_norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        elif self.slope_abs.device != device:
            self.slope_abs, self.slope_norm_sum = self.slope_abs.to(device), self.slope_norm_sum.to(device)
        return self.slope_abs, self.slope_norm_sum

    def weight_accumulator(self, device):
        """The feeding weight's grad norm sum on ``device``."""
        if self.grad_norm_sum is None:
            self.grad_norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        elif self.grad_norm_sum.device != device:
            self.grad_norm_sum = self.grad_norm_sum.to(device)
        return self.grad_norm_sum

    def _slope_grad(self, g):
        if not self.gate.active:
            return
        with torch.no_grad():
            g = g.detach()
            abs_sum, norm_sum = self.slope_accumulators(g.device)
            abs_sum.add_(g.abs().flatten())
            norm_sum.add_(torch.linalg.vector_norm(g))
            self.slope_steps += 1

    def _weight_grad(self, g):
        if not self.gate.active:
            return
        with torch.no_grad():
            self.weight_accumulator(g.device).add_(torch.linalg.vector_norm(g.detach()))
            self.grad_steps += 1

    def pack(self, channels, device):
        """The counters on ``device`` as an int64 vector and a float64 one,
        both summed across ranks: ints are the negative counts, a 0/1 flag
        per channel for a positive input seen, the element count and the
        gradient steps; floats the output moments and gradient sums. What
        PyTorch's reductions counted (on any device) and what the library's
        CPU counter counted are added up here."""
        ints = torch.zeros(2 * channels + 3, dtype=torch.int64, device=device)
        floats = torch.zeros(self.n_slopes + 4, dtype=torch.float64, device=device)
        count = self.count
        if self.neg is not None and self.neg.numel() == channels:
            ints[:channels] = self.neg.to(device=device, dtype=torch.int64)
            ints[channels : 2 * channels] = (self.max.to(device) > 0).to(torch.int64)
        if self.out_sum is not None:
            floats[0] = self.out_sum.to(device)
            floats[1] = self.out_sum_sq.to(device)
        if self.cpu is not None and channels == self.channels:
            neg, pos, n, s, q = self.cpu.take()
            ints[:channels] += torch.tensor(neg, dtype=torch.int64, device=device)
            pos = torch.tensor(pos, dtype=torch.int64, device=device) > 0
            ints[channels : 2 * channels] |= pos.to(torch.int64)
            count += n
            floats[0] += s
            floats[1] += q
        ints[2 * channels :] = torch.tensor([count, self.slope_steps, self.grad_steps], device=device)
        if self.slope_abs is not None and self.slope_abs.numel() == self.n_slopes:
            floats[2 : 2 + self.n_slopes] = self.slope_abs.to(device)
            floats[2 + self.n_slopes] = self.slope_norm_sum.to(device)
        if self.grad_norm_sum is not None:
            floats[3 + self.n_slopes] = self.grad_norm_sum.to(device)
        return ints, floats

    def unpack(self, ints, floats, channels):
        """An epoch's counts from the merged vectors (as lists), as the
        library's ``EpochCounts`` takes them."""
        k, c = self.n_slopes, channels
        slopes = self.act.weight.detach().double().flatten().cpu().tolist() if k else []
        return {
            "negative": ints[:c],
            "positive": [p > 0 for p in ints[c : 2 * c]],
            "count": ints[2 * c],
            "out_sum": floats[0],
            "out_sum_sq": floats[1],
            "slopes": slopes,
            "slope_abs": floats[2 : 2 + k],
            "slope_norm_sum": floats[2 + k] if k else None,
            "slope_steps": ints[2 * c + 1],
            "weight_norm_sum": floats[3 + k] if self.weight is not None else None,
            "weight_steps": ints[2 * c + 2],
        }


def _tally_step(watches):
    """Adds the gradients an optimiser is about to step with (``.grad``:
    after backward, DDP's averaging and AMP's unscaling) to the watches'
    accumulators, with a few multi-tensor ops for all layers together."""
    norm_accs, norms_of, abs_accs, abs_of = [], [], [], []
    for w in watches:
        g = w.act.weight.grad if w.n_slopes else None
        if g is not None:
            abs_sum, norm_sum = w.slope_accumulators(g.device)
            abs_accs.append(abs_sum)
            abs_of.append(g.detach().flatten())
            norm_accs.append(norm_sum)
            norms_of.append(g.detach())
            w.slope_steps += 1
        p = w.weight_param()
        if p is not None and p.grad is not None:
            norm_accs.append(w.weight_accumulator(p.grad.device))
            norms_of.append(p.grad.detach())
            w.grad_steps += 1
    with torch.no_grad():
        if norms_of:
            torch._foreach_add_(norm_accs, torch._foreach_norm(norms_of))
        if abs_of:
            torch._foreach_add_(abs_accs, torch._foreach_abs(abs_of))


class Sentinel:
    """prelu's sentinel on a PyTorch model, writing a prelu run folder.

    ``Sentinel(module, run_dir)`` hooks every ``nn.PReLU``, ``nn.LeakyReLU``
    and ``nn.ReLU`` of ``module`` (a ``DistributedDataParallel`` wrapper is
    looked through), in module order, named by their ``named_modules()``
    paths. Only forward passes in training mode are counted; a module
    applied several times per step counts every application.

    Gradients: per PReLU slope the mean |d loss / d slope|, and the mean L2
    norm of the gradient of the feeding weight layer (the Linear/Conv right
    before the activation in module order). With an ``optimizer`` they are
    read from ``.grad`` just before each ``optimizer.step()`` (a step
    pre-hook: the gradients the step uses, after gradient accumulation,
    DDP's averaging and AMP's unscaling), with a few multi-tensor ops for
    all layers. Without one, hooks on the parameters see every backward
    pass's own gradient (under DDP: the rank's, before averaging).

    Call :meth:`epoch_end` after each epoch (1-based epochs, as prelu
    counts them) and :meth:`close` at the end. ``alarms``: prelu's alarm
    thresholds to change (``dead_share``, ``idle_share``, ``idle_epochs``,
    ``grad_ratio``, ``stuck_slope``, ``slope_tol``); ``optimizer``: where
    gradients are read (above), ``lr`` for the epoch lines and the
    optimiser keys of ``config.toml``; ``config``: more keys of prelu's
    config (``epochs``, ``batch_size``, ``seed``, ...); ``every``: count
    only every ``every``-th training pass of ``module`` and its gradients
    (the cost divides by it; dead then means never positive in the passes
    counted). A ``run_dir`` that already holds ``metrics.jsonl`` is refused
    unless ``overwrite``.
    """

    def __init__(self, module, run_dir, *, alarms=None, optimizer=None, config=None, every=1, overwrite=False):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.every = every
        self.gate = _Gate()
        self.model = _modules.unwrap(module)
        self.run_dir = os.fspath(run_dir)
        self.optimizer = optimizer
        acts = _modules.activations(self.model)
        if not acts:
            raise ValueError("prelu sentinel: the module has no nn.PReLU, nn.LeakyReLU or nn.ReLU to watch")
        feeding = _modules.feeding_weight(self.model)
        scratch = _Scratch()
        self.watches = [_Watch(name or "act", m, feeding.get(id(m)), scratch, self.gate) for name, m in acts]
        self.kinds = [_modules.kind_of(w.act) for w in self.watches]
        self.steps = 0
        self.samples = 0
        self.started = time.perf_counter()
        self.closed = False
        self.run = self._start(alarms or {}, config or {}, overwrite)
        self.cfg = json.loads(self.run.alarms_json())
        step_hook = getattr(optimizer, "register_step_pre_hook", None)
        self.step_handle = step_hook(self._before_step) if step_hook else None
        for w in self.watches:
            w.attach(grad_hooks=self.step_handle is None)
        self.root_handles = [
            self.model.register_forward_pre_hook(self._root_pre_hook),
            self.model.register_forward_hook(self._root_hook),
        ]

    def _start(self, alarms, config, overwrite):
        """The library's side of the run: its rules on every rank, and on
        rank 0 the run folder (created, locked, ``config.toml`` written)."""
        layers = [(w.name, k) for w, k in zip(self.watches, self.kinds)]
        if _rank() != 0:
            return _prelu.SentinelRun(layers, json.dumps(alarms))
        return _prelu.SentinelRun(
            layers,
            json.dumps(alarms),
            self.run_dir,
            json.dumps(self._config(config)),
            self._config_comment(),
            overwrite,
        )

    def _config(self, extra):
        """The ``TrainConfig`` keys this run can tell: the model, the common
        activation kind, the optimiser's, then ``extra``."""
        cfg = {"model": f"pytorch:{type(self.model).__name__}", "sentinel": True}
        kinds = set(self.kinds)
        if len(kinds) == 1:
            cfg["act"] = kinds.pop()
        opt = self.optimizer
        if opt is not None:
            name = {torch.optim.SGD: "sgd", torch.optim.AdamW: "adamw"}.get(type(opt))
            if name:
                cfg["optimizer"] = name
            group = opt.param_groups[0]
            for k in ("lr", "momentum", "weight_decay"):
                if isinstance(group.get(k), (int, float)) and not isinstance(group.get(k), bool):
                    cfg[k] = float(group[k])
        cfg.update(extra)
        return cfg

    def _config_comment(self):
        layers = ", ".join(f"{w.name} ({k})" for w, k in zip(self.watches, self.kinds))
        lines = [
            "A PyTorch run, written by prelu.torch.Sentinel: read it with `prelu report`.",
            "Keys not written here take prelu's defaults, which do not describe this run.",
            f"Watched activations: {layers}",
        ]
        if self.optimizer is not None:
            lines.append(f"Optimizer: {type(self.optimizer).__name__}")
        return lines

    def _root_pre_hook(self, mod, inputs):
        if mod.training:
            self.gate.active = self.steps % self.every == 0

    def _before_step(self, *_):
        if self.gate.active:
            _tally_step(self.watches)

    def _root_hook(self, mod, inputs, output):
        if mod.training:
            self.steps += 1
            if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() >= 1:
                self.samples += inputs[0].shape[0]

    def _device(self):
        """Where the counters meet: the current CUDA device under NCCL,
        else the first counter's device (the CPU if none counted)."""
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        for w in self.watches:
            if w.neg is not None:
                return w.neg.device
        return torch.device("cpu")

    def _merged(self):
        """Every layer's epoch counts, merged across ranks when
        ``torch.distributed`` is initialised; the samples seen."""
        dev = self._device()
        reduce = dist.is_available() and dist.is_initialized()
        channels = torch.tensor([w.channels or 0 for w in self.watches], dtype=torch.int64, device=dev)
        if reduce:
            dist.all_reduce(channels, op=dist.ReduceOp.MAX)
        channels = channels.cpu().tolist()
        packed = [w.pack(c, dev) for w, c in zip(self.watches, channels)]
        ints = torch.cat([p[0] for p in packed] + [torch.tensor([self.samples], device=dev)])
        floats = torch.cat([p[1] for p in packed])
        if reduce:
            dist.all_reduce(ints)
            dist.all_reduce(floats)
        ints, floats = ints.cpu().tolist(), floats.cpu().tolist()
        out, i, f = [], 0, 0
        for w, c in zip(self.watches, channels):
            ni, nf = 2 * c + 3, w.n_slopes + 4
            out.append(w.unpack(ints[i : i + ni], floats[f : f + nf], c))
            if w.channels is None and c > 0:
                w.channels = c
            i, f = i + ni, f + nf
        return out, ints[-1]

    def epoch_end(self, epoch, **metrics):
        """Closes epoch ``epoch`` (1-based): merges the counters (across
        ranks under ``torch.distributed``: every rank must call it), then
        rank 0 appends the ``epoch`` line, the ``sentinel`` line and the
        alarms raised for the first time to ``run_dir/metrics.jsonl``.

        ``metrics``: ``train_loss``, ``train_acc``, ``test_loss``,
        ``test_acc``, ``lr`` (else the optimiser's), ``seconds`` (else the
        time since the last call), ``samples_per_s`` (else the samples of
        the training forward passes over ``seconds``) and ``step`` (else
        the training forward passes so far); what is not known is written
        as null. Returns ``(layers, alarms)``: prelu's layer reports and the
        new alarms, as dicts."""
        if self.closed:
            raise RuntimeError("prelu sentinel: epoch_end after close()")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        unknown = set(metrics) - set(EPOCH_FIELDS) - {"step"}
        if unknown:
            raise TypeError(f"epoch_end: unknown metrics {sorted(unknown)}; expected {EPOCH_FIELDS} or step")
        counts, samples = self._merged()
        values = self._epoch_values(metrics, samples)
        values["step"] = int(metrics.get("step", self.steps))
        for w in self.watches:
            w.reset()
        self.samples = 0
        layers, new = self.run.epoch_end(epoch, counts, values)
        return json.loads(layers), json.loads(new)

    def _epoch_values(self, metrics, samples):
        """The epoch line's numbers: the given ones, else what the sentinel knows."""
        v = {k: metrics.get(k) for k in EPOCH_FIELDS}
        now = time.perf_counter()
        if v["seconds"] is None:
            v["seconds"] = now - self.started
        self.started = now
        if v["samples_per_s"] is None and v["seconds"] and samples:
            v["samples_per_s"] = samples / v["seconds"]
        if v["lr"] is None and self.optimizer is not None:
            v["lr"] = self.optimizer.param_groups[0].get("lr")
        return {k: (None if x is None or not math.isfinite(float(x)) else float(x)) for k, x in v.items()}

    def close(self):
        """Removes the hooks; the run folder stays as written. Idempotent."""
        if self.closed:
            return
        for w in self.watches:
            w.detach()
        for h in self.root_handles:
            h.remove()
        if self.step_handle is not None:
            self.step_handle.remove()
        self.run.close()
        self.closed = True

    def report(self):
        """``prelu report`` of this run's folder (on rank 0, which writes it)."""
        if _rank() != 0:
            raise RuntimeError("prelu sentinel: only rank 0 writes the run folder")
        return _display.Report(self.run_dir)

    def _repr_html_(self):
        try:
            return self.report()._repr_html_()
        except (RuntimeError, ValueError) as e:
            return f"<p>prelu sentinel on {html.escape(self.run_dir)}: {html.escape(str(e))}</p>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
