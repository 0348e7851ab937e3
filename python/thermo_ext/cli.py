"""``thermo-ext``: the paper's comparison on the command line.

    thermo-ext spiral        AdLaLa, LOL, LaLa, Langevin, AdL, Overdamped, SGD and Adam on the
                             paper's two-spiral problem: table, curves (JSON/CSV) and a figure
    thermo-ext digits        the same methods on scikit-learn's handwritten digits
    thermo-ext robustness    final accuracy over a grid of step sizes and initialisation scales
    thermo-ext mnist1d       the three claims (faster, more accurate, more robust) on MNIST-1D
                             with an MLP and a 1-D CNN, and the sampler's own answer: last
                             iterates, posterior-predictive averages, Adam, a deep ensemble, SWA
    thermo-ext bench         the step-time benchmark (as bench/step.py)
    thermo-ext info          what this build of the engine is and can do

Results go to ``--out`` (default ./thermo-ext-results), each command writing files named after
itself (spiral.json, spiral.png, ...). Earlier results are never replaced silently: a command
whose files already exist there stops with a message unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import sys
import textwrap
import time
from typing import Callable, Dict, List, Optional, Sequence

DEFAULT_OUT = "thermo-ext-results"
ALL_METHODS = "AdLaLa,LOL,LaLa,Langevin,AdL,Overdamped,SGD,Adam"

#: Defaults of the experiment commands, chosen so that each finishes in about two minutes on a
#: two-core machine without a GPU (docs/RESULTS.md has the measured times). The paper's run is
#: ``thermo-ext spiral --epochs 4000 --seeds 5``.
SPIRAL_DEFAULTS = dict(epochs=1000, seeds=3, eval_every=10)
DIGITS_DEFAULTS = dict(epochs=50, seeds=5, eval_every=1)
ROBUSTNESS_DEFAULTS = dict(epochs=300, seeds=1, eval_every=50)
#: ``thermo-ext mnist1d``: the six named methods and the three baselines.
MNIST1D_METHODS = "AdLaLa,LOL,LaLa,Langevin,AdL,Overdamped,SGD,Adam,AdamW"
#: ... the named methods with the unit mass of the paper's methods (``preset="unit"``): the claims
#: are the paper's, and ``--temperature`` sets a posterior's tau, which the adaptive defaults'
#: mass floor does not suit (docs/DESIGN.md §3); ``--preset default`` runs the adaptive defaults.
MNIST1D_PRESET = "unit"
#: The default takes minutes on two cores; the long run (docs/RESULTS.md) is --epochs 48
#: --grid-seeds 3: 6000 steps of batch 32, the mnist1d benchmark's number of training steps.
MNIST1D_DEFAULTS = dict(epochs=10, seeds=3, grid_seeds=1)
#: Test accuracy % that "epochs to target" counts to, per network (--targets).
MNIST1D_TARGETS = {"MLP": 60.0, "CNN": 85.0}


class UsageError(Exception):
    """A bad option value found after parsing (names the option in its message)."""


# ============================================================================ option types
def _number(kind: Callable, test: Callable, expect: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expect}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {expect}, got {text!r}")
        return value
    parse.__name__ = expect  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
nonnegative_float = _number(float, lambda v: v >= 0 and v == v and v != float("inf"),
                            "a finite number >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a finite number > 0")
fraction = _number(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")
at_least_two = _number(int, lambda v: v >= 2, "an integer >= 2")


def positive_floats(text: str) -> List[float]:
    """A comma-separated list of positive numbers, e.g. '0.25,0.5,1,2,4'."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text!r}")
    return sorted(set(values))


# ============================================================================ the parser
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="thermo-ext", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Partitioned thermodynamic parameterization of neural networks "
                    "(Leimkuhler, Matthews, Vlaar 2019): the paper's experiments.",
        epilog="Run 'thermo-ext COMMAND --help' for a command's options.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, help_, description, defaults, add_options in (
            ("spiral", "the paper's two-spiral comparison of all methods",
             "Trains the paper's 2-100-1 net on two spirals with every method and several "
             "seeds; prints a table and writes curves and a figure. The paper's run: --epochs "
             "4000 --seeds 5.", SPIRAL_DEFAULTS, _add_spiral_options),
            ("digits", "the same comparison on scikit-learn's digits",
             "Trains a 64-100-10 net on scikit-learn's handwritten digits (shipped with "
             "scikit-learn, no download) with every method.", DIGITS_DEFAULTS,
             _add_digits_options)):
        p = sub.add_parser(name, help=help_, description=textwrap.fill(description))
        _add_run_options(p, **defaults)
        add_options(p)

    rb = sub.add_parser("robustness", help="final accuracy over step sizes x init scales",
                        description=textwrap.fill(
                            "Final test accuracy of every method over a grid of step sizes "
                            "(multiples of each method's default) and initialisation scales "
                            "(every initial parameter times s): the paper's robustness claim."))
    _add_run_options(rb, **ROBUSTNESS_DEFAULTS)
    rb.add_argument("--task", choices=("spiral", "digits"), default="spiral",
                    help="problem (default spiral; its data options below)")
    rb.add_argument("--lr-factors", type=positive_floats, default=[0.25, 0.5, 1.0, 2.0, 4.0],
                    metavar="F,F,...",
                    help="step size = F x the method's default (default 0.25,0.5,1,2,4)")
    rb.add_argument("--init-scales", type=positive_floats, default=[0.5, 1.0, 2.0, 4.0],
                    metavar="S,S,...",
                    help="every initial parameter times S (default 0.5,1,2,4)")
    _add_spiral_options(rb)
    rb.add_argument("--test-fraction", type=fraction, default=0.25,
                    help="digits: share of each class held out for testing (default 0.25)")

    _add_mnist1d_parser(sub)

    from . import benchmark

    bn = sub.add_parser("bench", help="step-time benchmark (as bench/step.py)",
                        description=benchmark.__doc__.split("\n\n")[0])
    benchmark.add_arguments(bn)

    sub.add_parser("info", help="build_info() as a table",
                   description="What this build of thermo_ext is and can do on this machine.")
    return ap


def _format_settings(values: Dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in values.items())


def _methods_epilog() -> str:
    """The settings each method runs with, read from the method table (itself reading the
    optimizers' signatures and presets) when the help is asked for: never a copy."""
    from .experiments import METHODS, PAPER_PRESET, describe_preset, preset_names

    lines = [textwrap.fill(f"methods and their settings with --preset {PAPER_PRESET} (the "
                           f"default: {describe_preset(PAPER_PRESET)}); change one with --set "
                           f"METHOD.KEY=VALUE:")]
    for m in METHODS.values():
        lines.append(f"  {m.name:<10} {_format_settings(m.settings(PAPER_PRESET))}; also "
                     f"settable: {', '.join(m.extra)}")
    for preset in preset_names():
        if preset == PAPER_PRESET:
            continue
        differ = [(m.name, m.settings(preset)) for m in METHODS.values()
                  if m.settings(preset) != m.settings(PAPER_PRESET)]
        lines.append(textwrap.fill(f"with --preset {preset} ({describe_preset(preset)})"
                                   + (", where they differ:" if differ else
                                      ": the same values")))
        lines += [f"  {name:<10} {_format_settings(values)}" for name, values in differ]
    lines.append("The baselines (SGD, Adam, AdamW) keep their settings under every preset.")
    return "\n".join(lines)


def _add_run_options(p: argparse.ArgumentParser, *, epochs: int, seeds: int,
                     eval_every: int) -> None:
    from .experiments import PAPER_PRESET, preset_names

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _methods_epilog()
    g = p.add_argument_group("runs")
    g.add_argument("--methods", default=ALL_METHODS, metavar="M,M,...",
                   help=f"methods to compare, comma-separated (default {ALL_METHODS})")
    g.add_argument("--epochs", type=positive_int, default=epochs,
                   help=f"training epochs per run (default {epochs})")
    g.add_argument("--seeds", type=positive_int, default=seeds,
                   help=f"number of seeds per method (default {seeds})")
    g.add_argument("--first-seed", type=nonnegative_int, default=0,
                   help="seeds are first-seed, first-seed+1, ... (default 0)")
    g.add_argument("--eval-every", type=positive_int, default=eval_every,
                   help=f"evaluate on the training and test sets every N epochs "
                        f"(default {eval_every})")
    g.add_argument("--batch", type=positive_int, default=25, help="batch size (default 25)")
    g.add_argument("--preset", choices=preset_names(), default=PAPER_PRESET,
                   help=f"hyperparameters of the thermodynamic methods: {PAPER_PRESET} (default: "
                        f"the paper's tuned two-spiral setting, as in docs/RESULTS.md) or default "
                        f"(the optimizers' own defaults, as te.AdLaLa(model)); the values are "
                        f"listed below")
    g.add_argument("--set", dest="settings", action="append", default=[],
                   metavar="METHOD.KEY=VALUE",
                   help="override a method's hyperparameter, e.g. --set AdLaLa.lr=0.2 "
                        "(repeatable; lists as 0.1,0.2; see docs/RESULTS.md for the keys)")
    g.add_argument("--data-seed", type=nonnegative_int, default=None,
                   help="draw the data once from this seed for every run (default: each seed "
                        "draws its own data set / split)")
    g.add_argument("--hidden", type=positive_int, default=100,
                   help="hidden units of the net (default 100)")
    _add_output_options(p, "torch/OpenMP threads per worker (default 1: fastest for tiny nets)")


def _add_output_options(p: argparse.ArgumentParser, threads_help: str) -> None:
    """The experiment commands' "execution and output" options."""
    o = p.add_argument_group("execution and output")
    o.add_argument("--out", default=DEFAULT_OUT,
                   help=f"directory for the results (default ./{DEFAULT_OUT})")
    o.add_argument("--overwrite", action="store_true",
                   help="replace this command's earlier results in --out (otherwise refused)")
    o.add_argument("--jobs", type=positive_int, default=None,
                   help="worker processes (default: number of cores, at most 2)")
    o.add_argument("--threads", type=positive_int, default=1, help=threads_help)
    o.add_argument("--quiet", action="store_true", help="no progress output on stderr")


def _add_spiral_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("spiral data (defaults as the paper's notebook)")
    g.add_argument("--turns", type=positive_float, default=4.0,
                   help="turns of each spiral arm (default 4)")
    g.add_argument("--noise", type=nonnegative_float, default=0.02,
                   help="standard deviation of the Gaussian noise on each coordinate "
                        "(default 0.02)")
    g.add_argument("--train", type=at_least_two, default=500,
                   help="training points, half per class (default 500)")
    g.add_argument("--test", type=at_least_two, default=1000,
                   help="test points, half per class (default 1000)")
    g.add_argument("--loss", choices=("logits", "sigmoid"), default="logits",
                   help="BCE computed from the logit (default: stable, exact gradient) or on "
                        "sigmoid outputs with torch's BCELoss, exactly as the paper's notebook")


def _add_digits_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("digits data")
    g.add_argument("--test-fraction", type=fraction, default=0.25,
                   help="share of each class held out for testing (default 0.25)")


def targets(text: str) -> Dict[str, float]:
    """'MLP=60,CNN=85': the test accuracy % each network's 'epochs to target' counts to."""
    out = dict(MNIST1D_TARGETS)
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        key = {k.lower(): k for k in MNIST1D_TARGETS}.get(name.strip().lower())
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or key is None or not 0 < number <= 100:
            raise argparse.ArgumentTypeError(
                f"expected NET=ACC,... with NET in {', '.join(MNIST1D_TARGETS)} and 0 < ACC <= "
                f"100, got {text!r}")
        out[key] = number
    return out


def _mnist1d_epilog() -> str:
    from .experiments import METHODS, describe_preset
    from .experiments.mnist1d import BASELINES

    lines = [textwrap.fill(f"The named methods run with --preset {MNIST1D_PRESET} "
                           f"({describe_preset(MNIST1D_PRESET)}), read from thermo_ext when the "
                           f"command runs:")]
    for m in METHODS.values():
        if m.named:
            lines.append(f"  {m.name:<10} {_format_settings(m.settings(MNIST1D_PRESET))}")
    lines.append("the baselines at their usual settings (not changed by --preset):")
    for name, values in BASELINES.items():
        lines.append(f"  {name:<10} {_format_settings(values)}")
    lines.append(textwrap.fill("Change any with --set METHOD.KEY=VALUE. The long run of "
                               "docs/RESULTS.md: --epochs 48 --grid-seeds 3 (6000 steps, the "
                               "mnist1d benchmark's number)."))
    return "\n".join(lines)


def _add_mnist1d_parser(sub) -> None:
    from .experiments import preset_names

    d = MNIST1D_DEFAULTS
    p = sub.add_parser(
        "mnist1d", help="the three claims and the sampler's answer on MNIST-1D",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_mnist1d_epilog(),
        description=textwrap.fill(
            "MNIST-1D (the mnist1d package's procedural generator, built here: 4000 train / "
            "1000 test signals) with the mnist1d benchmark's MLP and 1-D CNN. Every named "
            "method at its defaults against SGD with momentum, Adam and AdamW: (i) faster: "
            "epochs to a target test accuracy; (ii) more accurate: final test accuracy, NLL "
            "and ECE; (iii) more robust: the same over step sizes x1/4 ... x4 of each "
            "method's default; and (iv) at equal gradient evaluations, each method's last "
            "iterate and its posterior-predictive average (te.PosteriorPredictive) against one "
            "Adam model, a deep ensemble of Adam models and SWA. Prints the tables and writes "
            "JSON, CSV and a figure."))
    g = p.add_argument_group("runs")
    g.add_argument("--nets", default="MLP,CNN", metavar="NET,NET",
                   help="networks: MLP, CNN or both (default MLP,CNN)")
    g.add_argument("--methods", default=MNIST1D_METHODS, metavar="M,M,...",
                   help=f"methods to compare (default {MNIST1D_METHODS})")
    g.add_argument("--epochs", type=positive_int, default=d["epochs"],
                   help=f"training epochs per run (default {d['epochs']})")
    g.add_argument("--seeds", type=positive_int, default=d["seeds"],
                   help=f"seeds per method and network (default {d['seeds']})")
    g.add_argument("--first-seed", type=nonnegative_int, default=0,
                   help="seeds are first-seed, first-seed+1, ... (default 0)")
    g.add_argument("--batch", type=positive_int, default=32, help="batch size (default 32)")
    g.add_argument("--preset", choices=preset_names(), default=MNIST1D_PRESET,
                   help=f"hyperparameters of the named methods: {MNIST1D_PRESET} (the unit-mass "
                        f"defaults, the default here), default (their own defaults: the "
                        f"adaptive mass) or paper (the paper's two-spiral setting)")
    g.add_argument("--set", dest="settings", action="append", default=[],
                   metavar="METHOD.KEY=VALUE",
                   help="override a method's hyperparameter, e.g. --set SGD.lr=0.1 "
                        "(repeatable)")
    g.add_argument("--temperature", type=nonnegative_float, default=None, metavar="T",
                   help="run the named methods at the tempered posterior of the training set: "
                        "every tau (tau, tau1, tau2) = te.posterior_temperature(N, "
                        "temperature=T) = T/N for N training signals and the mean loss (1 = "
                        "the Bayesian posterior, < 1 cold); a --set of a tau wins (default: "
                        "each method's own tau)")
    g.add_argument("--targets", type=targets, default=dict(MNIST1D_TARGETS),
                   metavar="NET=ACC,...",
                   help="test accuracy %% for (i), per network (default " +
                        ",".join(f"{k}={v:g}" for k, v in MNIST1D_TARGETS.items()) + ")")
    g.add_argument("--lr-factors", type=positive_floats, default=[0.25, 0.5, 1.0, 2.0, 4.0],
                   metavar="F,F,...",
                   help="(iii): step size = F x the method's default lr; must include 1 "
                        "(default 0.25,0.5,1,2,4)")
    g.add_argument("--grid-seeds", type=positive_int, default=d["grid_seeds"],
                   help=f"(iii): seeds per step size, the first of --seeds (default "
                        f"{d['grid_seeds']}; x1 is the main runs')")
    g.add_argument("--pp-burn-in", type=fraction, default=0.5,
                   help="the prediction average starts after this fraction of the epochs "
                        "(default 0.5)")
    g.add_argument("--pp-per-epoch", type=positive_int, default=4,
                   help="prediction-average samples per epoch after the burn-in (default 4)")
    g.add_argument("--comparison", action=argparse.BooleanOptionalAction, default=True,
                   help="(iv): also train the deep ensembles and SWA (default: yes)")
    g.add_argument("--ensemble", type=at_least_two, default=4,
                   help="(iv): Adam models per deep ensemble (default 4)")
    g.add_argument("--swa-start", type=fraction, default=0.75,
                   help="(iv): SWA averages the SGD iterates at the end of every epoch after "
                        "this fraction of the epochs (default 0.75)")
    g.add_argument("--samples", type=_number(int, lambda v: v >= 100, "an integer >= 100"),
                   default=5000, help="signals generated, 80%% for training (default 5000, "
                                      "the standard 4000 / 1000)")
    g.add_argument("--data-seed", type=nonnegative_int, default=42,
                   help="the generator's seed (default 42, the standard data set)")
    _add_output_options(p, "torch/OpenMP threads per worker (default 1)")


# ============================================================================ commands
def _task(args, name: str):
    from .experiments import DigitsTask, SpiralTask

    if name == "spiral":
        return SpiralTask(turns=args.turns, noise=args.noise, train=args.train, test=args.test,
                          hidden=args.hidden, data_seed=args.data_seed,
                          loss_form=args.loss)
    return DigitsTask(test_fraction=args.test_fraction, hidden=args.hidden,
                      data_seed=args.data_seed)


def _prepare(args, task, files: Sequence[str]):
    """Validates methods and settings and the output directory; returns (methods, hyper)."""
    from .experiments import check_settings, parse_settings, resolve_methods

    methods = resolve_methods(args.methods.split(","))
    hyper = parse_settings(args.settings, methods, preset=args.preset)
    check_settings(task, hyper)
    train_size = getattr(task, "train", None)
    if train_size is not None and args.batch > train_size:
        raise UsageError(f"--batch: {args.batch} is larger than the training set "
                         f"(--train {train_size})")
    _check_out(args.out, files, args.overwrite)
    return methods, hyper


def _check_out(out: str, files: Sequence[str], overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out: {out!r} exists and is not a directory")
    existing = [f for f in files if os.path.exists(os.path.join(out, f))]
    if existing and not overwrite:
        raise UsageError(f"--out: {out!r} already holds results of an earlier run "
                         f"({', '.join(existing)}); pass --overwrite to replace them or choose "
                         f"another --out")
    os.makedirs(out, exist_ok=True)


def _seeds(args) -> List[int]:
    return list(range(args.first_seed, args.first_seed + args.seeds))


def _announce(args, hyper: Dict) -> None:
    """The preset and every method's settings as run (after --set), before the runs start."""
    from .experiments import describe_preset

    print(f"preset {args.preset} ({describe_preset(args.preset)}); settings:")
    for m, values in hyper.items():
        print(f"  {m:<10} {_format_settings(values)}")
    sys.stdout.flush()


def _header(args, task, methods) -> Dict:
    from .experiments import METHODS, machine_info

    return {
        "command": "thermo-ext " + " ".join(shlex.quote(a) for a in args._argv),
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "task": task,
        "settings": {k: getattr(args, k) for k in
                     ("epochs", "seeds", "first_seed", "eval_every", "batch", "jobs", "threads",
                      "data_seed", "preset") if hasattr(args, k)},
        "method_sources": {m: METHODS[m].source for m in methods},
    }


def cmd_compare(args, name: str) -> int:
    """spiral and digits: every method x seed, then the table, the records and the figure."""
    from . import experiments as ex

    task = _task(args, name)
    files = [f"{name}.json", f"{name}_curves.csv", f"{name}_summary.csv", f"{name}_table.txt",
             f"{name}.png"]
    methods, hyper = _prepare(args, task, files)
    seeds = _seeds(args)
    jobs = args.jobs or ex.default_jobs()
    args.jobs = jobs
    specs = [ex.RunSpec(task, m, hyper[m], seed=s, epochs=args.epochs,
                        eval_every=args.eval_every, batch=args.batch,
                        keep_model=name == "spiral")
             for m in methods for s in seeds]
    print(f"thermo-ext {name}: {task.describe()}; batch {args.batch}, {args.epochs} epochs, "
          f"{len(seeds)} seed(s), {len(methods)} method(s): {len(specs)} runs on {jobs} "
          f"process(es)", flush=True)
    _announce(args, hyper)
    t0 = time.perf_counter()
    results = ex.run_many(specs, jobs=jobs, threads=args.threads, quiet=args.quiet)
    wall = time.perf_counter() - t0

    rows = ex.summarize(results, methods)
    title = (f"{task.describe()}; batch {args.batch}, {args.epochs} epochs, seeds "
             f"{seeds[0]}..{seeds[-1]}")
    table = ex.format_summary(rows, title)
    print()
    print(table)
    print(f"total wall time {wall:.1f} s on {jobs} process(es)")

    out = args.out
    boundary = []
    if name == "spiral":  # the decision boundaries of the best AdLaLa and Adam nets
        picks = [m for m in ("AdLaLa", "Adam") if m in methods] or methods[:1]
        for m in picks:
            runs = [r for r in results if r["method"] == m]
            boundary.append(max(runs, key=lambda r: r["final_test_acc"]))
    payload = _header(args, task, methods)
    payload.update({
        "hyper": hyper, "wall_s": wall, "summary": rows, "table": table,
        "best_nets": {r["method"]: {"seed": r["seed"], "state": r["model_state"]}
                      for r in boundary},
        "runs": [{k: v for k, v in r.items() if k != "model_state"} for r in results],
    })
    ex.write_json(os.path.join(out, f"{name}.json"), payload)
    ex.write_csv(os.path.join(out, f"{name}_curves.csv"), *ex.curve_rows(results))
    keys = list(rows[0]) if rows else []
    ex.write_csv(os.path.join(out, f"{name}_summary.csv"), keys,
                 [[r[k] for k in keys] for r in rows])
    with open(os.path.join(out, f"{name}_table.txt"), "w") as f:
        f.write(f"$ {payload['command']}\n{table}\ntotal wall time {wall:.1f} s on {jobs} "
                f"process(es)\n")
    ex.plot_comparison(os.path.join(out, f"{name}.png"), task, results, methods,
                       f"{task.describe()}\nbatch {args.batch}, {args.epochs} epochs, "
                       f"{len(seeds)} seed(s)", boundary)
    print(f"wrote {', '.join(os.path.join(out, f) for f in files)}")
    return 0


def cmd_robustness(args) -> int:
    from . import experiments as ex

    task = _task(args, args.task)
    files = ["robustness.json", "robustness.csv", "robustness_table.txt", "robustness.png"]
    methods, hyper = _prepare(args, task, files)
    seeds = _seeds(args)
    jobs = args.jobs or ex.default_jobs()
    args.jobs = jobs
    specs = [ex.RunSpec(task, m, hyper[m], seed=s, epochs=args.epochs,
                        eval_every=args.eval_every, batch=args.batch, lr_factor=f,
                        init_scale=sc)
             for m in methods for sc in args.init_scales for f in args.lr_factors
             for s in seeds]
    print(f"thermo-ext robustness: {task.describe()}; {len(args.lr_factors)} step sizes x "
          f"{len(args.init_scales)} init scales x {len(seeds)} seed(s) x {len(methods)} "
          f"method(s), {args.epochs} epochs: {len(specs)} runs on {jobs} process(es)",
          flush=True)
    _announce(args, hyper)
    t0 = time.perf_counter()
    results = ex.run_many(specs, jobs=jobs, threads=args.threads, quiet=args.quiet)
    wall = time.perf_counter() - t0
    table = ex.robustness_table(results, methods, args.lr_factors, args.init_scales, hyper)
    title = f"{task.describe()}; batch {args.batch}, {args.epochs} epochs, {len(seeds)} seed(s)"
    text = ex.format_robustness(table, args.lr_factors, args.init_scales, title)
    print()
    print(text)
    print(f"total wall time {wall:.1f} s on {jobs} process(es)")

    out = args.out
    payload = _header(args, task, methods)
    payload["settings"].update(lr_factors=args.lr_factors, init_scales=args.init_scales)
    payload.update({"hyper": hyper, "wall_s": wall, "grid": table, "table": text,
                    "runs": [{k: v for k, v in r.items() if k != "curves"} for r in results]})
    ex.write_json(os.path.join(out, "robustness.json"), payload)
    ex.write_csv(os.path.join(out, "robustness.csv"),
                 ["method", "init_scale", "lr_factor", "lr", "seed", "final_test_acc",
                  "final_test_loss", "diverged_at", "wall_s"],
                 [[r["method"], r["init_scale"], r["lr_factor"], r["hyper"]["lr"], r["seed"],
                   f"{r['final_test_acc']:.2f}", f"{r['final_test_loss']:.6g}",
                   "" if r["diverged_at"] is None else r["diverged_at"], f"{r['wall_s']:.2f}"]
                  for r in results])
    with open(os.path.join(out, "robustness_table.txt"), "w") as f:
        f.write(f"$ {payload['command']}\n{text}\ntotal wall time {wall:.1f} s\n")
    ex.plot_robustness(os.path.join(out, "robustness.png"), table, args.lr_factors,
                       args.init_scales,
                       f"final test accuracy after {args.epochs} epochs (batch {args.batch}, "
                       f"{len(seeds)} seed(s))\n{task.describe()}", task.chance)
    print(f"wrote {', '.join(os.path.join(out, f) for f in files)}")
    return 0


def _resolve_nets(text: str) -> List[str]:
    from .experiments.mnist1d import ARCHS

    lookup = {k.lower(): k for k in ARCHS}
    nets = []
    for name in filter(None, (t.strip() for t in text.split(","))):
        key = lookup.get(name.lower())
        if key is None:
            raise UsageError(f"--nets: unknown network {name!r}; choose from {', '.join(ARCHS)}")
        if key not in nets:
            nets.append(key)
    if not nets:
        raise UsageError("--nets: expected at least one network")
    return nets


def cmd_mnist1d(args) -> int:
    from . import experiments as ex
    from .experiments import mnist1d as mx

    nets = _resolve_nets(args.nets)
    methods = ex.resolve_methods(args.methods.split(","))
    hyper = ex.parse_settings(args.settings, methods, preset=args.preset, base=mx.BASELINES)
    task = mx.Mnist1dTask(samples=args.samples, data_seed=args.data_seed)
    n_train = task.sizes[0]
    tau = None
    if args.temperature is not None:
        from .posterior import posterior_temperature

        tau = posterior_temperature(n_train, temperature=args.temperature)
        given = {tuple(item.partition("=")[0].strip().lower().split(".", 1))
                 for item in args.settings}
        for m in methods:
            if ex.METHODS[m].named:
                for key in ("tau", "tau1", "tau2"):
                    if key in hyper[m] and (m.lower(), key) not in given:
                        hyper[m][key] = tau
    if 1.0 not in args.lr_factors:
        raise UsageError(f"--lr-factors: must include 1 (the main runs), got "
                         f"{','.join(f'{f:g}' for f in args.lr_factors)}")
    if args.grid_seeds > args.seeds:
        raise UsageError(f"--grid-seeds: {args.grid_seeds} is more than --seeds {args.seeds}")
    comparison = args.comparison
    if comparison and not {"Adam", "SGD"} <= set(methods):
        raise UsageError("--comparison needs Adam and SGD among --methods (the single model, "
                         "the ensembles' members and SWA's base); pass --no-comparison")
    if comparison and args.epochs < args.ensemble:
        raise UsageError(f"--epochs: {args.epochs} is fewer than --ensemble {args.ensemble} "
                         f"(each member of the equal-budget ensemble trains epochs/ensemble "
                         f"epochs); pass --no-comparison or more epochs")
    if args.batch > n_train:
        raise UsageError(f"--batch: {args.batch} is larger than the training set ({n_train})")
    for net in nets:  # every optimizer is built once on each network: bad values fail here
        model = task.model(net)
        for m, hp in hyper.items():
            try:
                ex.METHODS[m].build(model, hp, seed=0)
            except (TypeError, ValueError) as e:
                shown = ", ".join(f"{k}={v}" for k, v in hp.items())
                raise ex.SettingsError(f"--set {m}: the optimizer rejected {shown}: {e}") \
                    from None
    files = ["mnist1d.json", "mnist1d_curves.csv", "mnist1d_summary.csv", "mnist1d_table.txt",
             "mnist1d.png"]
    _check_out(args.out, files, args.overwrite)
    seeds = _seeds(args)
    jobs = args.jobs or ex.default_jobs()
    args.jobs = jobs
    pp_burn_in = int(round(args.pp_burn_in * args.epochs))
    swa_start = int(round(args.swa_start * args.epochs))
    runs = mx.plan_runs(task, nets, methods, hyper, seeds, epochs=args.epochs,
                        batch=args.batch, lr_factors=args.lr_factors,
                        grid_seeds=args.grid_seeds, pp_burn_in=pp_burn_in,
                        pp_per_epoch=args.pp_per_epoch, comparison=comparison,
                        ensemble=args.ensemble, swa_start=swa_start)
    print(f"thermo-ext mnist1d: {task.describe()}; nets {', '.join(nets)}; batch {args.batch}, "
          f"{args.epochs} epochs, {len(seeds)} seed(s), {len(methods)} method(s), step sizes "
          f"x{','.join(f'{f:g}' for f in args.lr_factors)} on {args.grid_seeds} seed(s)"
          f"{', ensembles and SWA' if comparison else ''}: {len(runs)} runs on {jobs} "
          f"process(es)", flush=True)
    tempered = ("" if tau is None else f", tau = te.posterior_temperature({n_train}, "
                f"temperature={args.temperature:g}) = {tau:g}")
    print("settings (the named methods: --preset "
          f"{args.preset}{tempered}; the baselines: their usual settings):")
    for m, values in hyper.items():
        print(f"  {m:<10} {_format_settings(values)}")
    sys.stdout.flush()
    task.data()  # built once here (and once per worker process)
    t0 = time.perf_counter()
    results = ex.run_many(runs, jobs=jobs, threads=args.threads, quiet=args.quiet)
    wall = time.perf_counter() - t0
    _, (_, y_test) = task.data()

    faster = mx.faster_rows(results, nets, methods, args.targets)
    accurate = mx.accuracy_rows(results, nets, methods)
    robust = mx.robustness_rows(results, nets, methods, args.lr_factors, args.grid_seeds)
    compared = mx.comparison_rows(results, nets, methods, args.ensemble, y_test)
    title = (f"{task.describe()}; batch {args.batch}, {args.epochs} epochs, seeds "
             f"{seeds[0]}..{seeds[-1]}")
    text = "\n\n".join([title, mx.format_faster(faster, nets, methods),
                         mx.format_accuracy(accurate, nets), mx.format_robustness(robust, nets),
                         mx.format_comparison(compared, nets)])
    print()
    print(text)
    print(f"total wall time {wall:.1f} s on {jobs} process(es)")

    out = args.out
    payload = _header(args, task, methods)
    payload["settings"] = {k: getattr(args, k) for k in
                           ("epochs", "seeds", "first_seed", "batch", "jobs", "threads",
                            "preset", "lr_factors", "grid_seeds", "pp_burn_in", "pp_per_epoch",
                            "comparison", "ensemble", "swa_start", "samples", "data_seed",
                            "temperature")}
    payload["settings"].update(nets=nets, targets=args.targets, pp_burn_in_epochs=pp_burn_in,
                               swa_start_epoch=swa_start, posterior_tau=tau)
    payload["method_sources"].update({m: f"the usual setting: torch.optim.{m}("
                                         f"{_format_settings(hyper[m])})"
                                      for m in methods if m in mx.BASELINES})
    payload.update({"hyper": hyper, "wall_s": wall, "faster": faster, "accurate": accurate,
                    "robust": robust, "comparison": compared, "table": text,
                    "runs": [{k: v for k, v in r.items() if k != "probs"} for r in results]})
    ex.write_json(os.path.join(out, "mnist1d.json"), payload)
    header = ["net", "method", "role", "seed", "member", "lr_factor", "epoch", "train_loss",
              "train_acc", "test_loss", "test_acc"]
    rows = []
    for r in results:
        c = r["curves"]
        for k in range(len(c["epoch"])):
            rows.append([r["arch"], r["method"], r["role"], r["seed"], r["member"],
                         r["lr_factor"], c["epoch"][k], f"{c['train_loss'][k]:.6g}",
                         f"{c['train_acc'][k]:.2f}", f"{c['test_loss'][k]:.6g}",
                         f"{c['test_acc'][k]:.2f}"])
    ex.write_csv(os.path.join(out, "mnist1d_curves.csv"), header, rows)
    ex.write_csv(os.path.join(out, "mnist1d_summary.csv"),
                 ["net", "predictor", "kind", "epochs", "seeds", "acc", "acc_std", "nll",
                  "nll_std", "ece", "ece_std"],
                 [[r["arch"], r["predictor"], r["kind"], r["epochs"], r["seeds"],
                   *(f"{r[k]:.6g}" for k in ("acc", "acc_std", "nll", "nll_std", "ece",
                                             "ece_std"))] for r in compared])
    with open(os.path.join(out, "mnist1d_table.txt"), "w") as f:
        f.write(f"$ {payload['command']}\n{text}\ntotal wall time {wall:.1f} s on {jobs} "
                f"process(es)\n")
    mx.plot_mnist1d(os.path.join(out, "mnist1d.png"), results, robust, nets, methods,
                    f"{task.describe()}\nbatch {args.batch}, {args.epochs} epochs, "
                    f"{len(seeds)} seed(s); step sizes on {args.grid_seeds} seed(s)", compared)
    print(f"wrote {', '.join(os.path.join(out, f) for f in files)}")
    return 0


def cmd_bench(args) -> int:
    from . import benchmark

    return benchmark.run(args, prog="thermo-ext bench")


def _cuda_version(value) -> str:
    """CUDA's integer versions (1000 * major + 10 * minor, 0 when unknown) as text."""
    if isinstance(value, bool) or not isinstance(value, int):
        return str(value)
    return f"{value // 1000}.{value % 1000 // 10}" if value > 0 else "unknown"


def cuda_status(info: Dict) -> List[str]:
    """Plain lines: which CUDA engine library serves this torch (and why), whether the engine can
    run here, and why not."""
    import torch

    compiled = bool(info.get("cuda"))
    chosen = info.get("cuda_library_why")
    if not compiled:
        built = f"no ({chosen or 'no CUDA engine library is installed'})"
    elif info.get("cuda_archs"):
        built = f"yes (architectures {info['cuda_archs']})"
    else:
        built = "yes"
    lines = [f"CUDA engine library for this torch: {built}"]
    if "cuda_libraries" in info:
        lines.append(f"  installed: {', '.join(info['cuda_libraries']) or 'none'}")
    if compiled and chosen:
        lines.append(f"  chosen: {chosen}")
    if info.get("cuda_library"):
        floor = f" (needs a driver >= {info['cuda_min_driver']})" \
            if info.get("cuda_min_driver") else ""
        lines.append(f"  loaded: {info['cuda_library']}{floor}")
    if not compiled:
        why = "no engine library for this torch: CUDA tensors step with the torch-op fallback"
    elif torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is built without CUDA"
    elif not torch.cuda.is_available():
        why = "no CUDA device visible (torch.cuda.is_available() is False)"
    elif info.get("cuda_fallback"):
        why = f"CUDA tensors step with the torch-op fallback: {info['cuda_fallback']}"
    else:
        why = ""
    if info.get("cuda_available") and not why:
        devices = ", ".join(torch.cuda.get_device_name(i)
                            for i in range(torch.cuda.device_count()))
        lines.append(f"CUDA engine usable here: yes ({devices})")
    else:
        why = why or "build_info() reports it unavailable"
        lines.append(f"CUDA engine usable here: no ({why})")
    # The versions, where this build reports them (keys named after the driver and the runtime).
    versions = [(k, v) for k, v in info.items()
                if ("driver" in k or "runtime" in k) and k != "cuda_min_driver"]
    if versions:
        lines.append("CUDA versions: " + ", ".join(f"{k.replace('_', ' ')} {_cuda_version(v)}"
                                                   for k, v in versions))
    return lines


def cmd_info(args) -> int:
    import torch

    from . import build_info, cuda_library

    # A diagnostic: load the library this torch would use (and ask whether it runs on device 0
    # where there is one), so that the table says what a CUDA step would find.
    if cuda_library.choose().path is not None:
        if torch.cuda.is_available():
            cuda_library.verdict(torch.cuda.current_device())
        else:
            cuda_library.load()
    info = build_info()
    for line in cuda_status(info):
        print(line)
    info["torch threads"] = torch.get_num_threads()
    width = max(len(k) for k in info)
    print("\nthermo_ext build")
    for k, v in info.items():
        if isinstance(v, (list, tuple)):
            v = ", ".join(map(str, v))
        print(f"  {k:<{width}}  {v}")
    return 0


# ============================================================================ entry point
def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``thermo-ext`` console script; returns the exit status (2 for bad options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its message (or the help)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    args._argv = argv
    try:
        if args.command in ("spiral", "digits"):
            return cmd_compare(args, args.command)
        if args.command == "robustness":
            return cmd_robustness(args)
        if args.command == "mnist1d":
            return cmd_mnist1d(args)
        if args.command == "bench":
            return cmd_bench(args)
        return cmd_info(args)
    except (UsageError, ValueError) as e:
        from .experiments import SettingsError

        if not isinstance(e, (UsageError, SettingsError)):
            raise
        print(f"thermo-ext {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        if (e.name or "").split(".")[0] not in ("matplotlib", "tqdm", "sklearn", "mnist1d"):
            raise
        print(f"thermo-ext {args.command}: error: {e}; install the experiments extra: "
              f"pip install 'thermo_ext[experiments]'", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"thermo-ext {args.command}: interrupted", file=sys.stderr)
        return 130
