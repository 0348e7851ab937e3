"""A new user's try on models that neither the tests nor bench/model_families.py's table contain,
with nothing but the README's two lines (``te.Method(model)``, defaults) against AdamW(lr=1e-3)
at the same steps, one CPU thread. Two more families for bench/model_families.py, run by its
harness (same runs, seeds, table and options: ``--methods``, ``--seeds``, ``--set``, ``--grid``,
``--signals``, ``--dump``):

* ``bert``: transformers' ``BertForSequenceClassification`` from a config (2 layers, 64 wide, 4
  heads, no dropout) deciding whether a sequence of 16 tokens holds more 3s than 4s; fresh
  batches of 32, 400 steps; accuracy on 1000 held-out sequences.
* ``vit``: timm's ``vit_tiny_patch16_224`` at 32x32 with patches of 4 (5.4 M parameters,
  LayerNorm) on the family bench's *shapes* (gratings, 10 classes), batch 32, 150 steps.

    python bench/new_user.py                                # bert, every method, seeds 0, 1
    .venv-tv/bin/python bench/new_user.py --families vit    # timm (docs/GUIDE.md §1.3)
    python bench/new_user.py --methods AdamW,LaLa --seeds 6
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_families as mf  # noqa: E402

COUNT_LEN = 16  # tokens 2..11 after a CLS token 1; label: more 3s than 4s


class Bert(nn.Module):
    """transformers' BertForSequenceClassification from a config; forward gives the logits."""

    def __init__(self):
        super().__init__()
        tf = mf._need("transformers", "pip install -e '.[families]'")
        tf.logging.set_verbosity_error()
        cfg = tf.BertConfig(vocab_size=12, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128,
                            max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        self.bert = tf.BertForSequenceClassification(cfg)

    def forward(self, x):
        return self.bert(input_ids=x).logits


def count_batch(n: int, g: torch.Generator):
    x = torch.randint(2, 12, (n, COUNT_LEN), generator=g)
    y = ((x == 3).sum(1) > (x == 4).sum(1)).long()
    return torch.cat([torch.ones(n, 1, dtype=torch.long), x], 1), y


class CountFamily(mf.Family):
    """Fresh batches per step; accuracy on a fixed held-out set."""

    classes = 2

    def batches(self, seed: int):
        g = mf.generator(seed, "count-train")
        for _ in range(self.steps):
            yield count_batch(self.batch, g)

    @torch.no_grad()
    def accuracy(self, model) -> float:
        x, y = count_batch(1000, mf.generator(0, "count-test"))
        return 100.0 * (model(x).argmax(-1) == y).float().mean().item()


def vit() -> nn.Module:
    timm = mf._need("timm", mf.TV_HINT)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10)


FAMILIES = (
    CountFamily("bert", Bert, 400, 32, "transformers BertForSequenceClassification 2 layers 64 "
                "wide, more 3s than 4s in 16 tokens, batch 32, 1000 held-out sequences"),
    mf.DataFamily("vit", vit, 150, 32, "timm vit_tiny_patch16_224 at 32x32, patch 4, "
                  + mf._SHAPES + ", batch 32", mf.shapes),
)


def main(argv: Optional[Sequence[str]] = None) -> int:
    for f in FAMILIES:
        mf.FAMILIES[f.name] = f
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {"--families": "bert", "--methods": ",".join(("AdamW",) + mf.NAMED),
                "--seeds": "2"}
    for flag, value in defaults.items():
        if not any(a == flag or a.startswith(flag + "=") for a in argv):
            argv += [flag, value]
    return mf.main(argv, prog="bench/new_user.py")


if __name__ == "__main__":
    sys.exit(main())
