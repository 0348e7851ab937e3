"""The experiments behind ``thermo-ext``: methods, tasks, training runs, tables and figures.

The paper's comparison (Leimkuhler, Matthews, Vlaar 2019; docs/DESIGN.md, The methods) is a set of *runs*, one
per (method, seed[, grid cell]); a run trains one small network from scratch and records its
learning curves. Runs are independent, so :func:`run_many` spreads them over processes.

Where to find what:

* :mod:`.methods`  the optimizers compared, their settings (read from the named methods'
  signatures, with presets on top) and ``--set`` parsing;
* :mod:`.tasks`    the problems (two spirals, digits) and the networks' initialisation;
* :mod:`.gradient` the closed-form gradient that makes the tiny nets' runs twice as fast;
* :mod:`.training` one run (:class:`RunSpec`, :func:`train_run`);
* :mod:`.runner`   many runs, in worker processes, with progress on stderr;
* :mod:`.tables`   summaries and the robustness grid as text;
* :mod:`.records`  JSON and CSV files; :mod:`.machine` what a result was measured on;
* :mod:`.figures`  the plots (matplotlib, imported only when drawing);
* :mod:`.mnist1d`  ``thermo-ext mnist1d``: its networks, runs, tables and figure (imported by
  the command).
"""

from __future__ import annotations

from .figures import plot_comparison, plot_robustness
from .gradient import MLPGradient
from .machine import available_cores, machine_info
from .methods import (DEFAULT_PRESET, METHODS, PAPER_PRESET, Method, SettingsError,
                      check_settings, describe_preset, optimizer_settings, parse_settings,
                      preset_names, resolve_methods, signature_defaults)
from .records import curve_rows, write_csv, write_json
from .runner import default_jobs, run_many
from .tables import format_robustness, format_summary, robustness_table, summarize
from .tasks import LOSS_FORMS, DigitsTask, SpiralTask, Task, init_model
from .training import RunSpec, train_run

__all__ = ["METHODS", "Method", "SettingsError", "SpiralTask", "DigitsTask", "LOSS_FORMS",
           "MLPGradient", "RunSpec", "init_model", "parse_settings", "check_settings",
           "resolve_methods", "train_run", "run_many", "default_jobs", "summarize",
           "format_summary", "robustness_table", "format_robustness", "machine_info",
           "curve_rows", "plot_comparison", "plot_robustness", "write_json", "write_csv",
           "optimizer_settings", "Task", "available_cores", "DEFAULT_PRESET", "PAPER_PRESET",
           "preset_names", "describe_preset", "signature_defaults"]
