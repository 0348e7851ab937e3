"""The model-family benchmark's own code (bench/model_families.py, bench/divergence.py): the
synthetic tasks, the hand-written ResNet, per-run errors that keep the table going, the signal
probes and the divergence labels. Fast: no third-party model packages, a few tiny steps."""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import divergence  # noqa: E402
import model_families as mf  # noqa: E402


def test_set_values_pass_through():
    assert mf._value("adaptive") == "adaptive"
    assert mf._value("3") == 3 and mf._value("0.5") == 0.5 and mf._value("inf") == math.inf
    assert mf._value("true") is True and mf._value("None") is None
    assert mf._parse_sets(["Langevin.mass=adaptive", "Langevin.mass_beta=0.999"]) == {
        "Langevin": {"mass": "adaptive", "mass_beta": 0.999}}


def test_shapes_task_is_fixed_and_balanced():
    (x, y), (xt, yt) = mf.shapes()
    assert x.shape == (2560, 3, 32, 32) and xt.shape == (1000, 3, 32, 32)
    assert torch.bincount(y, minlength=10).min() > 200
    assert torch.equal(mf.shapes.__wrapped__()[0][0], x)  # deterministic without the cache


def test_copy_batch_targets_the_copied_half():
    x, y = mf.copy_batch(4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 2 * mf.COPY_LEN) and (x[:, mf.COPY_LEN] == mf.COPY_SEP).all()
    assert (y[:, :mf.COPY_LEN] == -100).all()
    assert torch.equal(y[:, mf.COPY_LEN:], x[:, :mf.COPY_LEN])


def test_own_resnet_zero_init_last():
    net = mf.OwnResNet(width=4, zero_init_last=True)
    blocks = [m for m in net.modules() if isinstance(m, mf.BasicBlock)]
    assert len(blocks) == 8 and all((b.bn2.weight == 0).all() for b in blocks)
    assert all((b.bn2.weight == 1).all() for b in mf.OwnResNet(width=4).modules()
               if isinstance(b, mf.BasicBlock))
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def _tiny_family(steps: int = 3) -> mf.DataFamily:
    (x, y), (xt, yt) = mf.shapes()
    data = ((x[:64], y[:64]), (xt[:32], yt[:32]))
    return mf.DataFamily("tiny", lambda: mf.OwnResNet(width=4), steps, 16, "tiny",
                         lambda: data)


def test_a_keyword_the_method_lacks_is_reported_per_run():
    f = _tiny_family()
    bad = mf.run(f, "Langevin", 0, {"not_a_keyword": 1}, None)
    assert bad["error"].startswith("TypeError") and math.isnan(bad["acc"])
    good = mf.run(f, "AdamW", 0, {}, None)
    assert good["error"] is None and len(good["losses"]) == 3
    table = mf.summarize([("Langevin", f, [bad]), ("AdamW", f, [good])], [f], "cmd")
    assert "error: TypeError" in table and " ± " in table and "Errors:" in table


def test_signal_probes_and_labels():
    f = _tiny_family(steps=4)
    r = mf.run(f, "LaLa", 0, {}, None, signals_every=2)
    steps = sorted({p["step"] for p in r["probes"]})
    assert steps == [1, 2, 4]
    groups = {p["group"] for p in r["probes"]}
    assert len(groups) == len(r["groups"]) > 1
    p = r["probes"][-1]
    assert p["theta2"] > 0 and p["p2"] > 0 and p["g2"] > 0 and p["d2"] > 0
    series = divergence.group_series(r)
    assert set(series[0][-1]["sig"]) == set(divergence.SIGNALS)
    # Labels: a climbing loss is failing, a near-AdamW one healthy.
    ref = dict(family="tiny", method="AdamW", seed=0, acc=80.0, loss=0.5, loss_first=2.3,
               losses=[2.3] * 10, warnings=[], error=None)
    climb = dict(ref, method="Langevin", acc=10.0, loss=4.0, losses=[2.3] + [4.0] * 9)
    spike = dict(ref, method="LOL", acc=80.0, loss=0.5, losses=[2.3] + [4.0] * 5 + [0.5] * 9)
    fine = dict(ref, method="LaLa", acc=78.0, loss=0.6)
    slow = dict(ref, method="AdL", acc=50.0, loss=1.5)
    runs = [ref, climb, fine, slow, spike]
    divergence.label_runs(runs)
    assert [x["label"] for x in runs] == ["baseline", "failing", "healthy", "slow", "failing"]
    assert climb["onset"] == 5 and spike["onset"] == 5


def test_terminal_start_brings_the_momentum_methods_to_adamws_loss_on_a_resnet():
    """The hand-written ResNet-18 (torchvision's init, a quarter as wide, BatchNorm), 50 steps:
    from p = 0 the adaptive Langevin defaults end at 1.2x AdamW's loss (the momentum builds up
    over ~10 steps where Adam's bias correction takes whole steps from the first); from the
    terminal momentum (the default) at AdamW's (measured, seeds 0 and 2: AdamW 0.98, terminal
    1.00, zero 1.22; docs/GUIDE.md §1). Mean final loss over two seeds, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fam = mf.FAMILIES["resnet_own"]

        def loss(method, hyper):
            runs = [mf.run(fam, method, seed, hyper, None) for seed in (0, 2)]
            assert not any(r["error"] or r["warnings"] for r in runs), runs
            return sum(r["loss"] for r in runs) / len(runs)

        adamw = loss("AdamW", {})
        terminal = loss("Langevin", {})
        zero = loss("Langevin", {"momentum_init": "zero"})
    finally:
        torch.set_num_threads(threads)
    assert terminal <= 1.1 * adamw, (terminal, adamw)
    assert zero >= 1.15 * adamw, (zero, adamw)


def test_new_user_families_run_through_the_family_harness(monkeypatch, capsys):
    import new_user as nu  # (bench/, on the path above)

    x, y = nu.count_batch(64, torch.Generator().manual_seed(0))
    assert x.shape == (64, nu.COUNT_LEN + 1) and (x[:, 0] == 1).all()
    assert ((x[:, 1:] >= 2) & (x[:, 1:] <= 11)).all()
    assert torch.equal(y, ((x == 3).sum(1) > (x == 4).sum(1)).long())
    assert 0 < int(y.sum()) < 64

    class Tiny(torch.nn.Module):  # bert's task without transformers: mean of token embeddings
        def __init__(self):
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(12, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.emb(x).mean(1))

    fam = nu.CountFamily("count_tiny", Tiny, 3, 8, "tiny count")
    monkeypatch.setattr(nu, "FAMILIES", (fam,))
    monkeypatch.setattr(mf, "FAMILIES", dict(mf.FAMILIES))
    assert nu.main(["--families", "count_tiny", "--methods", "AdamW,Langevin",
                    "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# python bench/new_user.py --families count_tiny --methods "
                          "AdamW,Langevin --seeds 1")
    rows = [line.split()[:2] for line in out.splitlines() if line[:1] not in "#| "]
    assert [r for r in rows if r[1:] == ["count_tiny"]] == [["AdamW", "count_tiny"],
                                                            ["Langevin", "count_tiny"]]
    r = mf.run(fam, "Langevin", 0, {}, None)
    assert len(r["losses"]) == 3 and 0.0 <= r["acc"] <= 100.0 and r["error"] is None
