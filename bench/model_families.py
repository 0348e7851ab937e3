"""Named methods against AdamW, Adam and SGD+momentum on common model families, the same number
of steps each (issue #22's measurement harness).

Families (all CPU, offline, one thread per run; the per-run time is printed per family):

* ``mlp``: 64-128-128-10 ReLU MLP on scikit-learn's 8x8 digits, batch 32, 10 epochs.
* ``cnn``: Conv(1->16)+Conv(16->32)+maxpool+Linear on the digits as 1x8x8 images, batch 32,
  15 epochs.
* ``gru``: a GRU (hidden 64) reading a digit row by row (8 steps of 8 pixels), batch 32,
  15 epochs.
* ``transformer``: a 2-layer TransformerEncoder (d_model 32, 4 heads, feed-forward 64, a learned
  positional embedding owned by the top module) sorting length-8 sequences of 10 tokens; fresh
  batches of 64, 1500 steps; accuracy = whole sequence right.
* ``gpt2``: ``transformers``' GPT2LMHeadModel from a GPT2Config (2 layers, n_embd 64, 4 heads,
  vocabulary 17, tied embeddings, dropout 0, no download) on a copy task: 8 random tokens of 16,
  a separator, the same 8 tokens; loss and accuracy on the copied half (teacher forcing); fresh
  batches of 32, 600 steps; accuracy = held-out token accuracy on the copy.
* ``resnet18_tv``: torchvision's ``resnet18(weights=None, num_classes=10)`` from scratch
  (BatchNorm, train mode) on ``shapes``, a synthetic CIFAR-sized task (3x32x32, 10 classes of
  oriented colour gratings with random phase, frequency, contrast and noise; 2560 train / 1000
  test images), batch 32, 50 steps. Needs torchvision (its own venv, see below).
* ``resnet18_timm``: timm's ``resnet18`` (num_classes=10) on the same task. timm imports
  torchvision, so it runs in the torchvision venv too.
* ``resnet_own``: a ResNet-18 written here, a quarter as wide (BasicBlocks [2, 2, 2, 2] of
  widths 16-128, BatchNorm, torchvision's stem and initialisation: Kaiming-normal fan-out
  convolutions, BN weight 1, no zero-init of the last BN of a block; 0.7 M parameters) on the
  same task; no torchvision needed (what CI can run).
  ``resnet_own_zero``: the same with the last BN of each block zero-initialised (timm's default).
* ``frozen_head``: torchvision's ResNet-18 with random weights, frozen (requires_grad=False,
  BatchNorm in eval mode), only a new Linear(512, 10) head trained, on the same task, batch 32,
  50 steps. ``frozen_head_own``: the same on ``resnet_own``'s backbone (no torchvision).
* ``mnist1d_mlp``, ``mnist1d_cnn``: the ``mnist1d`` package's procedural generator (its default
  arguments, seed 42, generated offline: 4000 train / 1000 test; never the downloaded pickle)
  with a 40-100-100-10 ReLU MLP and a 3-layer 1-D CNN (25 channels), batch 100, 30 epochs.

Optimizers (``--methods``): the named methods with their defaults and the baselines ``AdamW``
(lr 1e-3, torch's defaults), ``Adam`` (lr 1e-3) and ``SGD`` (momentum 0.9, the family's lr:
0.05 everywhere unless overridden with ``--set SGD.lr=...``).

The table gives per family x method the metric (test accuracy %) as mean +- std over the seeds
and the final train loss (mean batch loss over the last 10 % of steps, at least 5), mean +- std.
A run that fails (a keyword the method does not take yet, a missing package) is reported in its
cell and below the table; the rest of the table still runs.

    python bench/model_families.py                          # the existing four families
    python bench/model_families.py --families all --seeds 3 # every family importable here
    python bench/model_families.py --families gpt2 --methods AdamW,Langevin --set \\
        Langevin.tau=1e-8                                   # keywords pass through untouched
    python bench/model_families.py --preset unit            # the unit-mass defaults (GUIDE §1.2)
    python bench/model_families.py --preset paper           # the paper's spiral setting
    python bench/model_families.py --methods LOL --families cnn --seeds 1 \\
        --grid LOL.lr=0.2,0.3 --grid LOL.gamma=1,3          # a coarse sweep (cartesian)
    python bench/model_families.py --signals                # instability signals per group

Environments: torch 2.13.0 with the ``families`` extra (transformers, mnist1d) runs every family
but ``resnet18_tv``, ``resnet18_timm`` and ``frozen_head``; those need torchvision, which does
not import beside torch 2.13.0 here: a second venv with ``pip install torch==2.14.1
torchvision==0.29.1 timm==1.0.31`` and ``pip install --no-build-isolation -e .`` (the engine
does not link libtorch, so the same source builds against either torch).

``--signals`` records what the instability monitor (thermo_ext.stability) looks at, every
``--every`` steps, and prints per group the largest value of each over the run; it also records
per group the candidate divergence signals of bench/divergence.py (RMS of θ, p, the gradient and
the step Δθ, the products g·p and g·Δθ, the thermostat ξ) into the ``--dump``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import thermo_ext as te
from thermo_ext.data import digits, generator
from thermo_ext.stability import StabilityMonitor

# The CNN and the transformer are the examples' (examples/cnn.py, examples/transformer.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from cnn import CNN  # noqa: E402
from transformer import Sorter  # noqa: E402

NAMED = ("Langevin", "LaLa", "AdL", "AdLaLa", "LOL", "Overdamped")
BASELINES = ("AdamW", "Adam", "SGD")
METHODS = BASELINES + NAMED


class MissingPackage(RuntimeError):
    """A family's third-party package is not importable in this environment."""


def _need(module: str, hint: str):
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or torchvision's operator registration failing
        raise MissingPackage(f"{module} is not importable here ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120]}); {hint}") from None


TV_HINT = ("run this family in a torchvision venv: pip install torch==2.14.1 "
           "torchvision==0.29.1 timm==1.0.31, then pip install --no-build-isolation -e . "
           "(bench/model_families.py's docstring, Environments)")


# ============================================================================ families
class GRUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(8, 64, batch_first=True)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        _, h = self.gru(x.view(-1, 8, 8))
        return self.fc(h[-1])


def shuffled_batches(x, y, seed: int, batch: int, steps: int, ragged: bool):
    """``steps`` batches of (x, y), epoch after epoch, each epoch reshuffled by the seed's
    generator; ``ragged=False`` skips an epoch's short last batch."""
    g = generator(seed, "shuffle")
    done = 0
    while True:
        for idx in torch.randperm(len(x), generator=g).split(batch):
            if done == steps:
                return
            if len(idx) < batch and not ragged:
                continue
            done += 1
            yield x[idx], y[idx]


class Family:
    """A model, its data and its training length (the digits and the sorting task)."""

    #: The baseline SGD's learning rate (momentum 0.9).
    sgd_lr = 0.05
    #: Number of classes per prediction (chance loss ln(classes)).
    classes = 10

    def __init__(self, name: str, make: Callable[[], nn.Module], steps: int, batch: int,
                 describe: str, sort: bool = False):
        self.name, self.make, self.steps, self.batch = name, make, steps, batch
        self.describe, self.sort = describe, sort

    def batches(self, seed: int):
        """``steps`` training batches (x, y)."""
        if self.sort:
            g = generator(seed, "sort-train")
            for _ in range(self.steps):
                x = torch.randint(0, 10, (self.batch, 8), generator=g)
                yield x, x.sort(1).values
            return
        (x, y), _ = digits(seed=0)
        yield from shuffled_batches(x, y, seed, self.batch, self.steps, ragged=True)

    def loss(self, out, y):
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def accuracy(self, model) -> float:
        if self.sort:
            x = torch.randint(0, 10, (1000, 8), generator=generator(0, "sort-test"))
            right = (model(x).argmax(-1) == x.sort(1).values).all(1)
        else:
            _, (x, y) = digits(seed=0)
            right = model(x).argmax(-1) == y
        return 100.0 * right.float().mean().item()


class DataFamily(Family):
    """A fixed data set (made once per process by ``data``: ((x, y), (x_test, y_test))),
    shuffled per seed into batches; accuracy on the test set, evaluated in batches."""

    def __init__(self, name: str, make: Callable[[], nn.Module], steps: int, batch: int,
                 describe: str, data: Callable[[], tuple], sgd_lr: float = 0.05):
        super().__init__(name, make, steps, batch, describe)
        self.data, self.sgd_lr = data, sgd_lr

    def batches(self, seed: int):
        (x, y), _ = self.data()
        # (BatchNorm: no ragged last batch)
        yield from shuffled_batches(x, y, seed, self.batch, self.steps, ragged=False)

    @torch.no_grad()
    def accuracy(self, model) -> float:
        _, (x, y) = self.data()
        right = sum(int((model(xb).argmax(-1) == yb).sum())
                    for xb, yb in zip(x.split(250), y.split(250)))
        return 100.0 * right / len(y)


# ---------------------------------------------------------------------------- gpt2 copy task
COPY_LEN, COPY_VOCAB = 8, 16  # tokens 0..15, separator 16
COPY_SEP = COPY_VOCAB


class GPT2Copy(nn.Module):
    """transformers' GPT2LMHeadModel from a config (no download); forward gives the logits."""

    def __init__(self, n_layer: int = 2, n_embd: int = 64, n_head: int = 4):
        super().__init__()
        tf = _need("transformers", "pip install -e '.[families]'")
        tf.logging.set_verbosity_error()
        cfg = tf.GPT2Config(vocab_size=COPY_VOCAB + 1, n_positions=2 * COPY_LEN + 1,
                            n_embd=n_embd, n_layer=n_layer, n_head=n_head, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                            bos_token_id=COPY_SEP, eos_token_id=COPY_SEP)
        self.lm = tf.GPT2LMHeadModel(cfg)
        assert self.lm.lm_head.weight is self.lm.transformer.wte.weight  # tied

    def forward(self, x):
        return self.lm(input_ids=x).logits


def copy_batch(n: int, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets): tokens t, SEP, t (without the last) in; the copied half's tokens as
    the targets of the positions from SEP on (the rest -100, not counted)."""
    t = torch.randint(0, COPY_VOCAB, (n, COPY_LEN), generator=g)
    seq = torch.cat([t, torch.full((n, 1), COPY_SEP), t], 1)
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[:, :COPY_LEN] = -100
    return x, y


class CopyFamily(Family):
    classes = COPY_VOCAB
    sgd_lr = 0.05

    def batches(self, seed: int):
        g = generator(seed, "copy-train")
        for _ in range(self.steps):
            yield copy_batch(self.batch, g)

    def loss(self, out, y):
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1),
                                           ignore_index=-100)

    @torch.no_grad()
    def accuracy(self, model) -> float:
        x, y = copy_batch(1000, generator(0, "copy-test"))
        pred = model(x).argmax(-1)
        mask = y != -100
        return 100.0 * (pred[mask] == y[mask]).float().mean().item()


# ---------------------------------------------------------------------------- image task
@functools.lru_cache(maxsize=None)
def shapes(n_train: int = 2560, n_test: int = 1000):
    """A CIFAR-sized synthetic task, made once (data seed 0): class k is a grating at angle
    k·18° (k = 0..9) with a random frequency (2-5 cycles per image), phase, colour, contrast and
    Gaussian noise (std 0.3); per-channel standardised. ((x, y), (x_test, y_test)), x of shape
    (n, 3, 32, 32)."""
    g = generator(0, "shapes")
    n = n_train + n_test
    y = torch.arange(n) % 10
    y = y[torch.randperm(n, generator=g)]
    angle = y.double() * (math.pi / 10) + 0.05 * torch.randn(n, generator=g, dtype=torch.double)
    freq = 2 + 3 * torch.rand(n, generator=g, dtype=torch.double)  # cycles per image
    phase = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.double)
    r = torch.linspace(-0.5, 0.5, 32, dtype=torch.double)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    proj = (torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy)
    wave = torch.sin(2 * math.pi * freq[:, None, None] * proj + phase[:, None, None])
    contrast = 0.5 + torch.rand(n, generator=g, dtype=torch.double)
    colour = torch.rand(n, 3, generator=g, dtype=torch.double) + 0.2
    x = (contrast[:, None, None, None] * colour[:, :, None, None] * wave[:, None]
         + 0.3 * torch.randn(n, 3, 32, 32, generator=g, dtype=torch.double))
    x = x.float()
    mean, std = x[:n_train].mean((0, 2, 3), keepdim=True), x[:n_train].std((0, 2, 3), keepdim=True)
    x = (x - mean) / std
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, zero_init_last: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))
        if zero_init_last:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class OwnResNet(nn.Module):
    """A ResNet-18 written here: torchvision's architecture (7x7/2 stem + maxpool, BasicBlocks
    [2, 2, 2, 2] of widths 64-512, global average pool, Linear) and its initialisation
    (Kaiming-normal fan-out convolutions, BN weight 1 / bias 0, torch's default Linear), with
    ``zero_init_last`` (timm's default; torchvision's ``zero_init_residual``) as an option and
    ``width`` scaling every channel count."""

    def __init__(self, num_classes: int = 10, zero_init_last: bool = False, width: int = 64):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, w[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        layers, cin = [], w[0]
        for i, cout in enumerate(w):
            layers.append(nn.Sequential(BasicBlock(cin, cout, 1 if i == 0 else 2, False),
                                        BasicBlock(cout, cout, 1, False)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(w[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def features(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean((2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


def tv_resnet18(zero_init_residual: bool = False) -> nn.Module:
    tvm = _need("torchvision.models", TV_HINT)
    return tvm.resnet18(weights=None, num_classes=10, zero_init_residual=zero_init_residual)


def timm_resnet18(zero_init_last: bool = True) -> nn.Module:
    timm = _need("timm", TV_HINT)
    return timm.create_model("resnet18", pretrained=False, num_classes=10,
                             zero_init_last=zero_init_last)


class FrozenHead(nn.Module):
    """A frozen backbone (requires_grad=False, BatchNorm always in eval mode) and a trainable
    Linear head."""

    def __init__(self, backbone: nn.Module, features: Callable, dim: int):
        super().__init__()
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        self._features = features
        self.head = nn.Linear(dim, 10)
        self.backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x):
        with torch.no_grad():
            f = self._features(x)
        return self.head(f)


def frozen_tv() -> nn.Module:
    net = tv_resnet18()
    net.fc = nn.Identity()
    return FrozenHead(net, net, 512)


def frozen_own() -> nn.Module:
    net = OwnResNet(width=16)
    return FrozenHead(net, net.features, 128)


# ---------------------------------------------------------------------------- mnist1d
@functools.lru_cache(maxsize=None)
def mnist1d_data():
    """mnist1d's procedural generator with its default arguments (5000 samples, 80 % train,
    seed 42), made offline (about 10 s); never the downloaded pickle."""
    data = _need("mnist1d.data", "pip install mnist1d==0.0.2.post1 (the families extra)")
    args = data.get_dataset_args()
    d = data.make_dataset(args)
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    lab = lambda a: torch.as_tensor(a, dtype=torch.int64)  # noqa: E731
    return (f(d["x"]), lab(d["y"])), (f(d["x_test"]), lab(d["y_test"]))


class Conv1D(nn.Module):
    """mnist1d's 1-D CNN shape: three convolutions of 25 channels (kernels 5, 3, 3, stride 2)
    and a Linear."""

    def __init__(self, channels: int = 25):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, 2, 1)
        self.conv2 = nn.Conv1d(channels, channels, 3, 2, 1)
        self.conv3 = nn.Conv1d(channels, channels, 3, 2, 1)
        self.fc = nn.Linear(channels * 5, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x.view(-1, 1, 40)))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.flatten(1))


def _digit_steps(epochs: int, batch: int = 32) -> int:
    n_train = 1347  # digits(seed=0): 1797 images, a quarter of each class held out
    return epochs * math.ceil(n_train / batch)


_SHAPES = "shapes (3x32x32 gratings, 10 classes, 2560 train / 1000 test)"
FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family("mlp", lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128),
                                        nn.ReLU(), nn.Linear(128, 10)),
           _digit_steps(10), 32, "64-128-128-10 MLP, digits, batch 32, 10 epochs"),
    Family("cnn", CNN, _digit_steps(15), 32, "Conv16+Conv32+pool+Linear, digits, batch 32, "
                                             "15 epochs"),
    Family("gru", GRUNet, _digit_steps(15), 32, "GRU(8->64) over rows + Linear, digits, batch 32, "
                                                "15 epochs"),
    Family("transformer", Sorter, 1500, 64, "2-layer TransformerEncoder d_model 32, sort length 8, "
                                            "batch 64, 1500 steps, whole-sequence accuracy",
           sort=True),
    CopyFamily("gpt2", GPT2Copy, 600, 32, "transformers GPT2LMHeadModel 2 layers n_embd 64, tied, "
                                          "copy 8 of 16 tokens, batch 32, held-out "
                                          "token accuracy on the copy"),
    DataFamily("resnet18_tv", tv_resnet18, 50, 32, "torchvision resnet18(weights=None), "
               + _SHAPES + ", batch 32", shapes),
    DataFamily("resnet18_timm", timm_resnet18, 50, 32, "timm resnet18, " + _SHAPES
               + ", batch 32", shapes),
    DataFamily("resnet_own", lambda: OwnResNet(width=16), 50, 32,
               "own ResNet-18 width 16 (torchvision's init), " + _SHAPES
               + ", batch 32", shapes),
    DataFamily("frozen_head", frozen_tv, 50, 32, "frozen random torchvision resnet18 (eval BN) + "
               "Linear head, " + _SHAPES + ", batch 32", shapes),
    DataFamily("mnist1d_mlp", lambda: nn.Sequential(nn.Linear(40, 100), nn.ReLU(),
                                                    nn.Linear(100, 100), nn.ReLU(),
                                                    nn.Linear(100, 10)),
               1200, 100, "40-100-100-10 MLP, mnist1d 4000/1000, batch 100, 30 epochs",
               mnist1d_data),
    DataFamily("mnist1d_cnn", Conv1D, 1200, 100, "Conv1d 25x3 + Linear, mnist1d 4000/1000, "
               "batch 100, 30 epochs", mnist1d_data),
    # Variants for the torchvision-vs-timm question (not in the default table).
    DataFamily("resnet_own_zero", lambda: OwnResNet(zero_init_last=True, width=16), 50, 32,
               "own ResNet-18 width 16, last BN of each block zero-initialised, " + _SHAPES
               + ", batch 32", shapes),
    DataFamily("resnet18_tv_zero", lambda: tv_resnet18(zero_init_residual=True), 50, 32,
               "torchvision resnet18(zero_init_residual=True), " + _SHAPES
               + ", batch 32", shapes),
    DataFamily("resnet18_timm_nozero", lambda: timm_resnet18(zero_init_last=False), 50, 32,
               "timm resnet18(zero_init_last=False), " + _SHAPES + ", batch 32",
               shapes),
    DataFamily("frozen_head_own", frozen_own, 50, 32, "frozen random own ResNet-18 (eval BN) + "
               "Linear head, " + _SHAPES + ", batch 32", shapes),
)}
DEFAULT_FAMILIES = ("mlp", "cnn", "gru", "transformer")
#: ``--families all``: the issue's list (the variants are asked for by name).
ALL_FAMILIES = DEFAULT_FAMILIES + ("gpt2", "resnet18_tv", "resnet18_timm", "resnet_own",
                                   "frozen_head", "mnist1d_mlp", "mnist1d_cnn")
TORCHVISION_FAMILIES = ("resnet18_tv", "resnet18_timm", "frozen_head", "resnet18_tv_zero",
                        "resnet18_timm_nozero")


# ============================================================================ runs
def build(method: str, model: nn.Module, hyper: Dict[str, Any], seed: int, preset: Optional[str],
          family: Optional[Family] = None):
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "AdamW":
        return torch.optim.AdamW(params, **{"lr": 1e-3, **hyper})
    if method == "Adam":
        return torch.optim.Adam(params, **{"lr": 1e-3, **hyper})
    if method == "SGD":
        lr = family.sgd_lr if family is not None else 0.05
        return torch.optim.SGD(params, **{"lr": lr, "momentum": 0.9, **hyper})
    kw = dict(hyper)
    if preset is not None:
        kw["preset"] = preset
    return getattr(te, method)(model, seed=seed, **kw)


def _group_sums(params: List[torch.Tensor], others: List[Optional[torch.Tensor]]):
    """Σx² of each tensor in ``params`` and Σx·y with ``others`` (None: 0), in float64."""
    sq = sum(float(t.double().pow(2).sum()) for t in params)
    dot = sum(float((t.double() * o.double()).sum()) for t, o in zip(params, others)
              if o is not None)
    return sq, dot


class Signals:
    """What the instability monitor measures (thermo_ext.stability) and the candidate
    divergence signals (bench/divergence.py), every ``every`` steps (and at step 1) per group.

    The monitor's trace: RMS(θ) and the kinetic temperature Σp²/N; :meth:`maxima` gives the
    largest RMS(θ)/RMS(θ at the first check), kinetic temperature / τ and growth of RMS(θ)
    within the monitor's window. The probes (``probes``, one dict per group and check, taken
    around ``opt.step()`` by :meth:`before` and :meth:`after`): n, the step, the batch loss,
    Σθ², Σp², Σg², Σg·p, ΣΔθ² (Δθ: this step's change of θ), Σg·Δθ (the first-order change of
    the loss this step made), ξ (the thermostat, AdL groups), h, γ, τ; and, before the step,
    the new gradient against the previous step (Σg·Δθ_prev, ΣΔθ_prev²: > 0 when that step
    overshot) and against the momentum before this step's kick (Σg·p_prev, Σp_prev²).
    """

    def __init__(self, every: int):
        self.every = every
        self.trace: list = []
        self.probes: list = []
        # Per parameter tensor (named by model.named_parameters; set ``names`` to id(param) ->
        # name), one dict per check: step, loss and {name: [n, Σθ², ΣΔθ², Σg², ΣΔθ·Δθ_prev,
        # ΣΔθ_prev², Σg·Δθ_prev]} (Δθ_prev: the step before; nan where it was not kept).
        self.layers: list = []
        self.names: Dict[int, str] = {}
        self._before: Optional[List[List[torch.Tensor]]] = None  # θ before a check's step
        self._lead: Optional[List[List[torch.Tensor]]] = None  # θ before the step ahead of it
        self._prev: Optional[List[List[torch.Tensor]]] = None  # Δθ of the step ahead of it
        self._pre: Optional[List[Tuple[float, float, float]]] = None
        self._prev_kept: Optional[List[List[torch.Tensor]]] = None

    def __enter__(self):
        from thermo_ext.stability import StabilityMonitor

        self._saved = StabilityMonitor.every, StabilityMonitor.trace
        StabilityMonitor.every, StabilityMonitor.trace = self.every, self.trace
        return self

    def __exit__(self, *exc):
        from thermo_ext.stability import StabilityMonitor

        StabilityMonitor.every, StabilityMonitor.trace = self._saved

    def _due(self, step: int) -> bool:
        return step == 1 or step % self.every == 0

    @staticmethod
    def _theta(opt) -> List[List[torch.Tensor]]:
        return [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]

    @torch.no_grad()
    def before(self, opt, step: int) -> None:
        """Called after backward, before ``opt.step()``: at a check, the new gradient against
        the previous step's Δθ and against the momentum as it stands (before this step's
        kick): Σg·Δθ_prev, ΣΔθ_prev², Σg·p_prev, Σp_prev²."""
        self._pre = None
        if self._due(step):
            pre = []
            for gi, group in enumerate(opt.param_groups):
                grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                         for p in group["params"]]
                moms = [opt.state.get(p, {}).get("momentum_buffer") for p in group["params"]]
                pp2, gpp = _group_sums([m for m in moms if m is not None], [])[0], \
                    _group_sums(grads, moms)[1]
                if self._prev is not None:
                    dp2, gdp = _group_sums(self._prev[gi], [])[0], \
                        _group_sums(grads, self._prev[gi])[1]
                else:
                    dp2 = gdp = float("nan")
                pre.append((gdp, dp2, gpp, pp2))
            self._pre = pre
        self._prev_kept = self._prev
        self._prev = None
        self._before = self._theta(opt) if self._due(step) else None
        self._lead = self._theta(opt) if self._due(step + 1) else None

    @torch.no_grad()
    def after(self, opt, step: int, loss: float) -> None:
        if self._lead is not None:  # the step ahead of a check: keep its Δθ
            self._prev = [[p.detach() - o for p, o in zip(g["params"], old)]
                          for g, old in zip(opt.param_groups, self._lead)]
            self._lead = None
        if self._before is None:
            return
        rows: Dict[str, List[float]] = {}
        nan = float("nan")
        for gi, (group, old) in enumerate(zip(opt.param_groups, self._before)):
            for pi, (p, o) in enumerate(zip(group["params"], old)):
                name = self.names.get(id(p), "?")
                t = p.detach().double()
                d = t - o.double()
                g = p.grad.double() if p.grad is not None else torch.zeros_like(t)
                prev = self._prev_kept[gi][pi].double() if self._prev_kept is not None else None
                rows[name] = [p.numel(), float(t.pow(2).sum()), float(d.pow(2).sum()),
                              float(g.pow(2).sum()),
                              float((d * prev).sum()) if prev is not None else nan,
                              float(prev.pow(2).sum()) if prev is not None else nan,
                              float((g * prev).sum()) if prev is not None else nan]
        self.layers.append(dict(step=step, loss=loss, rows=rows))
        for gi, (group, old) in enumerate(zip(opt.param_groups, self._before)):
            ps = [p.detach() for p in group["params"]]
            grads = [p.grad for p in group["params"]]
            moms = [opt.state.get(p, {}).get("momentum_buffer") for p in group["params"]]
            deltas = [p - o for p, o in zip(ps, old)]
            theta2, _ = _group_sums(ps, [None] * len(ps))
            p2, _ = _group_sums([m for m in moms if m is not None], [])
            g_list = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, ps)]
            g2, gp = _group_sums(g_list, moms)
            d2, gd = _group_sums(deltas, g_list)
            gdp, dp2, gpp, pp2 = self._pre[gi] if self._pre else (float("nan"),) * 4
            xi = group.get("xi")
            if isinstance(xi, torch.Tensor):
                xi = float(xi.double().mean())
            self.probes.append(dict(
                group=gi, step=step, loss=loss, n=sum(p.numel() for p in ps), theta2=theta2,
                p2=p2, g2=g2, gp=gp, d2=d2, gd=gd, gdp=gdp, dp2=dp2, gpp=gpp, pp2=pp2,
                xi=xi if isinstance(xi, float) else None,
                lr=_num(group.get("lr")), gamma=_num(group.get("gamma")),
                tau=_num(group.get("tau")), scheme=str(group.get("scheme")),
                name=str(group.get("name", gi))))
        self._before = None

    @property
    def series(self) -> List[List[Dict[str, float]]]:
        """Per group: the monitor's trace entries (step, rms, kinetic, tau, lr, scale, low)."""
        out: List[List[Dict[str, float]]] = []
        for row in self.trace:
            while len(out) <= row["group"]:
                out.append([])
            out[row["group"]].append({k: v for k, v in row.items() if k != "opt"})
        return out

    def maxima(self) -> List[Dict[str, float]]:
        return [closest_approach(series) for series in self.series]


def _num(v):
    if isinstance(v, torch.Tensor):
        return float(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def closest_approach(series, growth: Optional[float] = None, rate: Optional[float] = None
                     ) -> Dict[str, Any]:
    """How near a group came to the monitor's rule: the largest RMS/scale, the largest growth
    within the window, the largest RMS/scale at checks where the growth reached ``rate``, the
    largest growth at checks where RMS/scale reached ``growth``, and kinetic temperature/tau."""
    from thermo_ext.stability import StabilityMonitor

    growth = StabilityMonitor.growth if growth is None else growth
    rate = StabilityMonitor.rate if rate is None else rate
    m: Dict[str, Any] = dict(theta=0.0, rate=0.0, theta_at_rate=0.0, rate_at_theta=0.0, kt=0.0)
    for row in series:
        if row["warned"]:
            break
        g = row["rms"] / row["scale"] if row["scale"] > 0 else math.inf
        r = row["rms"] / row["low"] if row["low"] > 0 else math.inf
        kt = row["kinetic"] / row["tau"] if row["tau"] > 0 else math.inf
        for key, v, cond in (("theta", g, True), ("rate", r, True), ("kt", kt, True),
                             ("theta_at_rate", g, r >= rate), ("rate_at_theta", r, g >= growth)):
            if cond and v > m[key]:
                m[key], m[key + "_at"] = v, row["step"]
    return m


def _tail_mean(xs: List[float]) -> float:
    k = max(5, len(xs) // 10)
    tail = xs[-k:]
    return sum(tail) / len(tail) if tail else float("nan")


def run(family: Family, method: str, seed: int, hyper: Dict[str, Any], preset: Optional[str],
        signals_every: int = 0, check_stability: Optional[bool] = None) -> Dict[str, Any]:
    """One training run. Errors while building the model or the optimizer (a keyword the
    method does not take, a missing package) are returned in ``error``, not raised."""
    named = method not in BASELINES
    if check_stability is not None and named:
        hyper = {**hyper, "check_stability": check_stability}
    res: Dict[str, Any] = dict(family=family.name, method=method, seed=seed, hyper=hyper,
                               acc=float("nan"), loss=float("nan"), loss_first=float("nan"),
                               time=0.0, warnings=[], error=None, losses=[], signals=None,
                               series=None, probes=None, layers=None, taus=None, groups=None)
    sig = Signals(signals_every) if signals_every and named else None
    try:
        if isinstance(family, DataFamily):
            family.data()  # made once per process, outside the timed run
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        model = family.make()
        if sig is not None:
            sig.names = {id(p): n for n, p in model.named_parameters()}
    except MissingPackage as e:
        res["error"] = f"MissingPackage: {e}"
        return res
    model.train()
    losses: List[float] = []
    warned: List[str] = []
    with warnings.catch_warnings(record=True) as caught, (sig or contextlib.nullcontext()):
        warnings.simplefilter("always")
        try:
            opt = build(method, model, hyper, seed, preset, family)
        except (TypeError, ValueError) as e:
            res["error"] = f"{type(e).__name__}: {e}"
            res["time"] = time.perf_counter() - t0
            return res
        for step, (x, y) in enumerate(family.batches(seed), 1):
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = family.loss(out, y)
            loss.backward()
            if sig is not None:
                sig.before(opt, step)
            try:
                opt.step()
            except FloatingPointError as e:
                warned.append(f"FloatingPointError at step {step}: {e}")
                losses.append(float(loss))
                break
            losses.append(float(loss))
            if sig is not None:
                sig.after(opt, step, losses[-1])
    stability_warning = getattr(te, "InstabilityWarning", None)
    for w in caught:
        if stability_warning is not None and issubclass(w.category, stability_warning):
            warned.append(str(w.message))
    model.eval()
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    acc = family.accuracy(model) if finite else float("nan")
    res.update(acc=acc, loss=_tail_mean(losses), time=time.perf_counter() - t0,
               loss_first=sum(losses[:3]) / max(1, len(losses[:3])), losses=losses,
               warnings=warned, signals=None if sig is None else sig.maxima(),
               series=None if sig is None else sig.series,
               probes=None if sig is None else sig.probes,
               layers=None if sig is None else sig.layers)
    if named:
        res["taus"] = [_num(g.get("tau")) for g in opt.param_groups]
        res["groups"] = [str(g.get("name", i)) for i, g in enumerate(opt.param_groups)]
    return res


# ============================================================================ main
def _value(text: str):
    """A --set/--grid value: int, float, inf, true/false/none, else the string itself
    (``--set Langevin.mass=adaptive``)."""
    if text in ("inf", "math.inf"):
        return math.inf
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _parse_sets(items: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for item in items:
        key, _, value = item.partition("=")
        method, _, name = key.partition(".")
        out.setdefault(method, {})[name] = _value(value)
    return out


def _parse_grid(items: Sequence[str]) -> Dict[str, Dict[str, List[Any]]]:
    out: Dict[str, Dict[str, List[Any]]] = {}
    for item in items:
        key, _, values = item.partition("=")
        method, _, name = key.partition(".")
        out.setdefault(method, {})[name] = [_value(v) for v in values.split(",")]
    return out


def _fmt(acc: float) -> str:
    return "  nan" if math.isnan(acc) else f"{acc:5.1f}"


def mean_std(xs: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN when any is NaN."""
    xs = list(xs)
    if not xs or any(math.isnan(x) for x in xs):
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _pm(xs: Sequence[float], digits: int = 1) -> str:
    m, s = mean_std(xs)
    if math.isnan(m):
        finite = [x for x in xs if not math.isnan(x)]
        return "nan" if not finite else f"nan ({len(xs) - len(finite)} of {len(xs)})"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _loss_pm(xs: Sequence[float]) -> str:
    m, s = mean_std(xs)
    if math.isnan(m):
        return "nan"
    d = 3 if abs(m) < 0.1 else 2
    return f"{m:.{d}f} ± {s:.{d}f}"


def summarize(rows: List[Tuple[str, Family, List[Dict[str, Any]]]], families: List[Family],
              command: str) -> str:
    """The markdown tables: metric (mean ± std), final train loss (first → final), time per
    run; errors per run below."""
    labels = list(dict.fromkeys(r[0] for r in rows))
    cell: Dict[Tuple[str, str], List[Dict[str, Any]]] = {(r[0], r[1].name): r[2] for r in rows}
    out = [f"`{command}`", "",
           "Test accuracy % (mean ± std over seeds); `error` where the run could not start:", "",
           "| method | " + " | ".join(f.name for f in families) + " |",
           "|---|" + "---|" * len(families)]
    errors: List[str] = []
    for label in labels:
        cells = []
        for f in families:
            res = cell.get((label, f.name), [])
            if not res:
                cells.append("–")
                continue
            errs = [r for r in res if r["error"]]
            if errs:
                cells.append("error: " + errs[0]["error"].split(":")[0])
                errors.extend(f"{label} / {f.name} / seed {r['seed']}: {r['error']}" for r in errs)
                continue
            note = "" if not any(r["warnings"] for r in res) else \
                f" (warned {sum(1 for r in res if r['warnings'])}/{len(res)})"
            cells.append(_pm([r["acc"] for r in res]) + note)
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "Train loss, first 3 steps → final (mean batch loss over the last 10 % of "
            "steps), mean over seeds (final ± std):", "",
            "| method | " + " | ".join(f.name for f in families) + " |",
            "|---|" + "---|" * len(families)]
    for label in labels:
        cells = []
        for f in families:
            res = [r for r in cell.get((label, f.name), []) if not r["error"]]
            if not res:
                cells.append("–")
                continue
            first = statistics.fmean(r["loss_first"] for r in res)
            cells.append(f"{first:.2f} → {_loss_pm([r['loss'] for r in res])}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    times = []
    for f in families:
        ts = [r["time"] for lab in labels for r in cell.get((lab, f.name), []) if not r["error"]]
        times.append(f"{statistics.fmean(ts):.1f}" if ts else "–")
    out += ["", "Seconds per run (mean over methods and seeds, one thread):", "",
            "| " + " | ".join(f.name for f in families) + " |",
            "|" + "---|" * len(families), "| " + " | ".join(times) + " |"]
    if errors:
        out += ["", "Errors:", ""] + [f"* {e}" for e in errors]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None, prog: str = "bench/model_families.py") -> int:
    """``prog``: the script named in the printed command (bench/new_user.py runs its own
    families through this harness)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=",".join(DEFAULT_FAMILIES),
                    help="comma-separated; 'all' = " + ",".join(ALL_FAMILIES)
                    + "; also: " + ",".join(f for f in FAMILIES if f not in ALL_FAMILIES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed0", type=int, default=0, help="first seed")
    ap.add_argument("--preset", default=None, help="named methods' preset, e.g. paper")
    ap.add_argument("--set", action="append", default=[], metavar="Method.key=value")
    ap.add_argument("--grid", action="append", default=[], metavar="Method.key=v1,v2,...")
    ap.add_argument("--signals", action="store_true", help="record instability signals")
    ap.add_argument("--every", type=int, default=8, help="steps between signal checks; 0: "
                    "per family, steps // 25 between 2 and 8")
    ap.add_argument("--dump", default=None, help="write every run (with --signals: the "
                    "signal series) to this JSON file")
    ap.add_argument("--no-check-stability", action="store_true")
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply every family's step count (quick looks)")
    ap.add_argument("--quiet-groups", action="store_true",
                    help="with --signals: no per-group lines")
    ap.add_argument("--table", nargs="+", default=None, metavar="DUMP",
                    help="print the tables of earlier --dump files (merged) and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table_from_dumps(args.table))
        return 0
    torch.set_num_threads(1)
    te.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")
    names = ALL_FAMILIES if args.families == "all" else args.families.split(",")
    families = [FAMILIES[f] for f in names]
    for f in families:
        f.steps = max(1, int(f.steps * args.steps_scale))
    methods = args.methods.split(",")
    sets = _parse_sets(args.set)
    grid = _parse_grid(args.grid)
    seeds = list(range(args.seed0, args.seed0 + args.seeds))
    command = f"python {prog} " + " ".join(sys.argv[1:] if argv is None else list(argv))
    print(f"# {command}")
    print(f"# torch {torch.__version__}, thermo_ext {te.__version__}, 1 thread, "
          f"preset={args.preset}, seeds {seeds}")
    for f in families:
        print(f"# {f.name}: {f.describe} ({f.steps} steps)")
    rows, runs = [], []
    for method in methods:
        base = sets.get(method, {})
        axes = grid.get(method, {})
        keys = list(axes)
        for combo in itertools.product(*(axes[k] for k in keys)) if keys else [()]:
            hyper = {**base, **dict(zip(keys, combo))}
            label = method + ("" if not hyper else " " + ",".join(f"{k}={v}" for k, v in
                                                                    hyper.items()))
            if method == "SGD" and "lr" not in hyper:
                label += " (0.9)"
            for f in families:
                res = []
                for s in seeds:
                    try:
                        every = args.every or max(2, min(8, f.steps // 25))
                        r = run(f, method, s, hyper, args.preset,
                                every if args.signals else 0,
                                False if args.no_check_stability else None)
                    except Exception as e:  # keep the table going; say what broke
                        r = dict(family=f.name, method=method, seed=s, hyper=hyper,
                                 acc=float("nan"), loss=float("nan"), loss_first=float("nan"),
                                 time=0.0, warnings=[], losses=[],
                                 error=f"{type(e).__name__}: {e} "
                                       f"[{traceback.format_exc().splitlines()[-3].strip()}]")
                    res.append(r)
                ok = [r for r in res if not r["error"]]
                if ok:
                    accs = [r["acc"] for r in ok]
                    note = "; ".join(w.split("\n")[0][:110] for r in ok for w in r["warnings"])
                    lr = f" lr {f.sgd_lr:g}" if method == "SGD" and "lr" not in hyper else ""
                    print(f"{label + lr:44s} {f.name:14s} " + " ".join(_fmt(a) for a in accs)
                          + f"  {_pm(accs)}  loss {ok[0]['loss_first']:.2f}->"
                          + f"{_loss_pm([r['loss'] for r in ok])}"
                          + f"  ({statistics.fmean(r['time'] for r in ok):.1f} s/run)"
                          + (f"  WARN {note}" if note else ""), flush=True)
                for r in res:
                    if r["error"]:
                        print(f"{label:44s} {f.name:14s} seed {r['seed']}: {r['error']}",
                              flush=True)
                if args.signals and not args.quiet_groups:
                    for r in ok:
                        for gi, m in enumerate(r["signals"] or []):
                            print(f"    seed {r['seed']} group {gi} {r['groups'][gi]!s:28s} "
                                  f"RMS/scale {m['theta']:6.2f}  growth {m['rate']:5.2f}  "
                                  f"RMS/scale at growth>={StabilityMonitor.rate:g}: "
                                  f"{m['theta_at_rate']:5.2f}  growth at RMS/scale>="
                                  f"{StabilityMonitor.growth:g}: {m['rate_at_theta']:5.2f}  "
                                  f"kT/tau {m['kt']:9.1f}", flush=True)
                rows.append((label, f, res))
                runs.extend(res)
                if args.dump:  # rewritten as it goes: a long job's partial results survive
                    _write_dump(args.dump, args.preset, command, runs)
    if args.dump:
        _write_dump(args.dump, args.preset, command, runs)
    print()
    print(summarize(rows, families, command))
    return 0


def dedupe(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One run per (family, method, settings, seed): the last one given wins."""
    keep: Dict[str, Dict[str, Any]] = {}
    for r in runs:
        hyper = {k: v for k, v in (r.get("hyper") or {}).items() if k != "check_stability"}
        keep[json.dumps([r["family"], r["method"], hyper, r["seed"]], sort_keys=True,
                        default=str)] = r
    return list(keep.values())


def table_from_dumps(paths: Sequence[str]) -> str:
    """The tables of several dumps merged (families and methods in their first order)."""
    runs, commands = [], []
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        commands.append(data.get("command", path))
        runs.extend(data["runs"])
    runs = dedupe(runs)
    rank = {n: i for i, n in enumerate(list(ALL_FAMILIES) + list(FAMILIES))}
    fam_names = sorted(dict.fromkeys(r["family"] for r in runs), key=lambda n: rank.get(n, 99))
    fams = [FAMILIES[n] if n in FAMILIES else Family(n, nn.Identity, 0, 0, n) for n in fam_names]
    by_name = {f.name: f for f in fams}

    def label(r):
        hyper = {k: v for k, v in (r.get("hyper") or {}).items() if k != "check_stability"}
        lab = r["method"] + ("" if not hyper else " " + ",".join(f"{k}={v}"
                                                                 for k, v in hyper.items()))
        return lab + (" (0.9)" if r["method"] == "SGD" and "lr" not in hyper else "")

    order = {m: i for i, m in enumerate(METHODS)}
    labels = sorted(dict.fromkeys(label(r) for r in runs),
                    key=lambda lab: (order.get(lab.split()[0], len(order)), lab))
    rows = []
    for lab in labels:
        for n in fam_names:
            res = [r for r in runs if label(r) == lab and r["family"] == n]
            if res:
                rows.append((lab, by_name[n], sorted(res, key=lambda r: r["seed"])))
    return summarize(rows, fams, " ; ".join(commands))


def _write_dump(path: str, preset, command: str, runs) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(dict(preset=preset, command=command, runs=runs), fh)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
