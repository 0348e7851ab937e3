"""A third-party trainer drives the optimizer: Lightning's ``Trainer`` calls
``configure_optimizers``, steps with a closure (its automatic optimization) and saves and
restores the optimizer through its checkpoints. The bits must be those of a plain loop, and a
run resumed from a checkpoint must end where the straight run ends."""

from __future__ import annotations

import glob
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import thermo_ext as te

L = pytest.importorskip("lightning")

X = torch.randn(96, 12, generator=torch.Generator().manual_seed(0))
Y = (X[:, :3].sum(1) > 0).long()


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


class Module(L.LightningModule):
    def __init__(self, method):
        super().__init__()
        self.method, self.net = method, _net()

    def training_step(self, batch, i):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return getattr(te, self.method)(self.net, seed=3)


def _loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=16)


def _fit(module, epochs, root=None, ckpt=None):
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=root is not None,
                        default_root_dir=root)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*ckpt_path.*")
        trainer.fit(module, _loader(), ckpt_path=ckpt)


@pytest.mark.parametrize("method", ["Langevin", "AdLaLa"])
def test_lightning_fit_is_the_plain_loop_and_resumes_bitwise(method, tmp_path):
    straight = Module(method)
    _fit(straight, 3)

    net = _net()
    opt = getattr(te, method)(net, seed=3)
    for _ in range(3):
        for x, y in _loader():
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    start = [p.detach().clone() for p in _net().parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(start, net.parameters()))  # it moved
    for a, b in zip(net.parameters(), straight.net.parameters()):
        assert torch.equal(a, b)

    first = Module(method)
    _fit(first, 1, root=str(tmp_path))
    (ckpt,) = glob.glob(os.path.join(str(tmp_path), "**", "*.ckpt"), recursive=True)
    torch.manual_seed(123)  # the resumed run's fresh module and optimizer start elsewhere
    resumed = Module(method)
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)
    _fit(resumed, 3, ckpt=ckpt)
    for a, b in zip(resumed.net.parameters(), straight.net.parameters()):
        assert torch.equal(a, b)
