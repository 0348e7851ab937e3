"""A new user's try on models that neither the tests nor bench/model_families.py contain, with
nothing but the README's two lines (``te.Method(model)``, defaults) against AdamW(lr=1e-3) at
the same steps, one CPU thread:

* ``bert``: transformers' ``BertForSequenceClassification`` from a config (2 layers, 64 wide, 4
  heads, no dropout) deciding whether a sequence of 16 tokens holds more 3s than 4s; fresh
  batches of 32, 400 steps; accuracy on 1000 held-out sequences.
* ``vit``: timm's ``vit_tiny_patch16_224`` at 32x32 with patches of 4 (5.4 M parameters,
  LayerNorm) on bench/model_families.py's *shapes* (gratings, 10 classes), batch 32, 150 steps.

    python bench/new_user.py bert            # torch 2.13.0 venv (transformers)
    .venv-tv/bin/python bench/new_user.py vit  # timm (docs/GUIDE.md §1.3)

Prints test accuracy % (mean, then per seed), the final train loss (last 10 % of steps) and how
many runs raised an InstabilityWarning. SEEDS and METHODS (comma-separated) in the environment
choose the runs.
"""

from __future__ import annotations

import os
import statistics as st
import sys
import warnings

import torch
import torch.nn.functional as F

import thermo_ext as te

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_families as mf  # noqa: E402  (the shapes task)


def vit():
    import timm
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10)


def bert():
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=12, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=32, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def count_batch(n: int, g: torch.Generator):
    """Token 1 (CLS) then 16 tokens from 2..11; label: more 3s than 4s."""
    x = torch.randint(2, 12, (n, 16), generator=g)
    y = ((x == 3).sum(1) > (x == 4).sum(1)).long()
    return torch.cat([torch.ones(n, 1, dtype=torch.long), x], 1), y


def run(task: str, method: str, seed: int):
    torch.manual_seed(seed)
    if task == "vit":
        model, steps = vit(), 150
        (x, y), (xt, yt) = mf.shapes()
    else:
        model, steps = bert(), 400
        g = torch.Generator().manual_seed(100 + seed)
        xt, yt = count_batch(1000, torch.Generator().manual_seed(7))
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if method == "AdamW"
           else getattr(te, method)(model))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", te.InstabilityWarning)
        model.train()
        for _ in range(steps):
            if task == "vit":
                idx = torch.randint(0, len(x), (32,), generator=gen)
                out, yb = model(x[idx]), y[idx]
            else:
                xb, yb = count_batch(32, g)
                out = model(input_ids=xb).logits
            loss = F.cross_entropy(out, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    warned = any(issubclass(w.category, te.InstabilityWarning) for w in caught)
    model.eval()
    with torch.no_grad():
        out = model(xt) if task == "vit" else model(input_ids=xt).logits
        acc = 100.0 * (out.argmax(1) == yt).float().mean().item()
    k = max(1, steps // 10)
    return acc, sum(losses[-k:]) / k, warned


def main(argv) -> int:
    torch.set_num_threads(1)
    te.set_num_threads(1)
    seeds = [int(s) for s in os.environ.get("SEEDS", "0,1").split(",")]
    methods = os.environ.get("METHODS", "AdamW,Langevin,LaLa,AdL,AdLaLa,LOL,Overdamped").split(",")
    for task in (argv[0] if argv else "bert").split(","):
        for method in methods:
            rs = [run(task, method, s) for s in seeds]
            print(f"{task:5s} {method:10s} acc {st.mean(r[0] for r in rs):5.1f} "
                  f"({', '.join(f'{r[0]:.1f}' for r in rs)})  loss "
                  f"{st.mean(r[1] for r in rs):.3f}  warned {sum(r[2] for r in rs)}/{len(rs)}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
