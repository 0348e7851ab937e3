"""``thermo-ext``: the paper's comparison on the command line.

    thermo-ext spiral        AdLaLa, LOL, LaLa, Langevin, AdL, Overdamped, SGD and Adam on the
                             paper's two-spiral problem: table, curves (JSON/CSV) and a figure
    thermo-ext digits        the same methods on scikit-learn's handwritten digits
    thermo-ext robustness    final accuracy over a grid of step sizes and initialisation scales
    thermo-ext bench         the step-time benchmark (as bench/step.py)
    thermo-ext info          what this build of the engine is and can do

Results go to ``--out`` (default ./thermo-ext-results), each command writing files named after
itself (spiral.json, spiral.png, ...). Earlier results are never replaced silently: a command
whose files already exist there stops with a message unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import datetime
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
    lines.append("SGD and Adam, the baselines, keep their settings under every preset.")
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
    o = p.add_argument_group("execution and output")
    o.add_argument("--out", default=DEFAULT_OUT,
                   help=f"directory for the results (default ./{DEFAULT_OUT})")
    o.add_argument("--overwrite", action="store_true",
                   help="replace this command's earlier results in --out (otherwise refused)")
    o.add_argument("--jobs", type=positive_int, default=None,
                   help="worker processes (default: number of cores, at most 2)")
    o.add_argument("--threads", type=positive_int, default=1,
                   help="torch/OpenMP threads per worker (default 1: fastest for tiny nets)")
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
                      "data_seed", "preset")},
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
        if (e.name or "").split(".")[0] not in ("matplotlib", "tqdm", "sklearn"):
            raise
        print(f"thermo-ext {args.command}: error: {e}; install the experiments extra: "
              f"pip install 'thermo_ext[experiments]'", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"thermo-ext {args.command}: interrupted", file=sys.stderr)
        return 130
