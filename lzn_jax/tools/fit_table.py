"""The fit-check table of the paper's six settings: one XLA:CPU compile per setting at the paper's device count and
global batch, read against every target with that many devices (A100 and H100 GPUs, v5e, v6e and v5p slices).

  python -m lzn_jax.tools.fit_table                                   # all six settings, then the table
  python -m lzn_jax.tools.fit_table --settings=cifar10_gen,cifar10_gen@8 --out=/tmp/fit_table.json
  python -m lzn_jax.tools.fit_table --norun                          # the table of what --out already holds

Each setting runs ``python -m lzn_jax.tools.fit --method=cpu-estimate --json=...`` in a child process (the fake CPU
device count is fixed when JAX starts, so each device count needs its own process). The per-device program of a
cpu-estimate depends only on the device count and the global batch, not on the memory the target has, so one
compile gives the verdict for every target with that device count. The reports are merged into ``--out`` under
``<setting>@<devices>`` as each finishes, so a subset can be (re)run without losing the others. docs/scaling.md,
"The paper's settings", holds the measured table.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time

from lzn_jax.tools import fit

REPO = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class PaperSetting:
    """One of the paper's six training settings and the hardware the paper trained it on.

    Attributes:
      name: the config file's stem (``configs/<name>.py``); its ``data.batch_size`` is the paper's global batch.
      devices: how many GPUs the paper used (A100-40GB in every case study).
    """

    name: str
    devices: int


# The paper's hardware, as the configs' docstrings quote it: 16 A100s for CIFAR10 (125 images each), 32 for the
# 256x256 settings (8 each), 128 for ImageNet (64 each).
PAPER_SETTINGS = (
    PaperSetting("cifar10_gen", 16),
    PaperSetting("afhq_cat_gen", 32),
    PaperSetting("celebahq_gen", 32),
    PaperSetting("lsun_bedroom_gen", 32),
    PaperSetting("imagenet_repr", 128),
    PaperSetting("cifar10_joint", 16),
)
_ORDER = {setting.name: index for index, setting in enumerate(PAPER_SETTINGS)}
_PAPER_DEVICES = {setting.name: setting.devices for setting in PAPER_SETTINGS}


@dataclasses.dataclass(frozen=True)
class TableTarget:
    """A column of the table: a device whose memory the peak is compared with.

    Attributes:
      label: the column's heading.
      memory_bytes: what a program may use on one device.
      generation: the TPU generation (a key of ``fit.TPU_GENERATIONS``) whose slices must have the row's chip
        count; None for GPUs, which come in any count.
    """

    label: str
    memory_bytes: int
    generation: str | None = None


def _tpu_column(name: str) -> TableTarget:
    generation = fit.TPU_GENERATIONS[name]
    return TableTarget(f"{name} ({generation.hbm_bytes / fit.GIB:.2f} GiB)", generation.hbm_bytes, name)


# GPUs at their nominal memory (JAX pre-allocates 75 % of it unless XLA_PYTHON_CLIENT_MEM_FRACTION says more);
# TPU chips at the HBM XLA:TPU lets a program use (fit.TPU_GENERATIONS, measured with libtpu).
TARGETS = (
    TableTarget(f"A100 40 GB ({fit.parse_memory('40GB') / fit.GIB:.2f} GiB)", fit.parse_memory("40GB")),
    TableTarget(f"A100 / H100 80 GB ({fit.parse_memory('80GB') / fit.GIB:.2f} GiB)", fit.parse_memory("80GB")),
    _tpu_column("v5e"),
    _tpu_column("v6e"),
    _tpu_column("v5p"),
)

# docs/scaling.md reads a cpu-estimate "with a margin of tens of percent, in either direction": a peak within this
# fraction of the memory, above or below, is too close for XLA:CPU's figure to decide.
MARGIN = 0.25


# ---------------------------------------------------------------------------------------------------------------
# The table: pure functions over the fit check's JSON reports.
# ---------------------------------------------------------------------------------------------------------------


def verdict(peak_bytes: int, memory_bytes: int, margin: float = MARGIN) -> str:
    """``"fits"`` when the peak is at most ``1 - margin`` of the memory, ``"does not fit"`` when it is above
    ``1 + margin`` of it, ``"borderline"`` between; with the peak's share of the memory, e.g. ``"fits (56 %)"``."""
    share = peak_bytes / memory_bytes
    if share <= 1 - margin:
        word = "fits"
    elif share > 1 + margin:
        word = "does not fit"
    else:
        word = "borderline"
    return f"{word} ({100 * share:.0f} %)"


def percent(fraction: float) -> str:
    """``0.0011 -> "0.11 %"``; below 0.01 % one significant digit (``6.2e-6 -> "0.0006 %"``), not a bare 0.00."""
    value = 100 * fraction
    return f"{value:.2f} %" if value >= 0.01 or value == 0 else f"{value:.1g} %"


def _cell(entry: dict, target: TableTarget, margin: float) -> str:
    """The verdict of one run for one target: a slice that does not exist has no verdict."""
    devices = entry["devices"]
    if target.generation and devices not in fit.TPU_GENERATIONS[target.generation].chip_counts:
        return f"no {target.generation}-{devices}"
    return verdict(entry["report"]["memory"]["peak"], target.memory_bytes, margin)


def table_row(entry: dict, targets=TARGETS, margin: float = MARGIN) -> list[str]:
    """The cells of one run: setting, global batch, devices, per-device batch, peak per device (GiB), the solver's
    share of the step's FLOPs, then a verdict per target. A run without a compiled step (it failed or was stopped)
    keeps its first three cells and says why in the rest."""
    report = entry.get("report")
    if report is None or report.get("memory") is None:
        why = entry.get("error") or (report or {}).get("compiler_refusal") or "not compiled"
        global_batch = "-" if report is None else f"{report['global_batch']:,}"
        return [entry["setting"], global_batch, str(entry["devices"])] + [why] + ["-"] * (2 + len(targets))
    return [entry["setting"], f"{report['global_batch']:,}", str(entry["devices"]),
            f"{report['per_device_batch']:,}", f"{report['memory']['peak'] / fit.GIB:.1f}",
            percent(report["flops"]["solver_share"]),
            *(_cell(entry, target, margin) for target in targets)]


def ordered(entries) -> list[dict]:
    """The runs in the paper's order of settings (unknown names last); within a setting the paper's device count
    first, then the others ascending."""
    return sorted(entries, key=lambda e: (_ORDER.get(e["setting"], len(_ORDER)), e["setting"],
                                          e["devices"] != _PAPER_DEVICES.get(e["setting"]), e["devices"]))


def render_table(entries, targets=TARGETS, margin: float = MARGIN) -> str:
    """The markdown table of the runs (``ordered``), one row each (``table_row``)."""
    heading = ["setting", "global batch", "devices", "per device", "peak per device (GiB)",
               "solver share of FLOPs", *(target.label for target in targets)]
    rows = [heading, ["---"] * len(heading)] + [table_row(entry, targets, margin) for entry in ordered(entries)]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


# ---------------------------------------------------------------------------------------------------------------
# Running the fit check.
# ---------------------------------------------------------------------------------------------------------------


def parse_setting(text: str) -> tuple[str, int]:
    """``"cifar10_gen"`` -> ``("cifar10_gen", 16)`` (the paper's device count); ``"cifar10_gen@8"`` -> 8 devices.

    Raises:
      ValueError: an unknown setting (the six are named) or a device count that is not a positive integer.
    """
    name, _, count = text.strip().partition("@")
    if name not in _PAPER_DEVICES:
        raise ValueError(f"unknown setting {name!r}; the paper's settings are {', '.join(_PAPER_DEVICES)}")
    if not count:
        return name, _PAPER_DEVICES[name]
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"{text!r}: the device count after @ must be a positive integer")
    return name, int(count)


def fit_command(name: str, devices: int, json_path: str, *, solver_alone: bool = False) -> list[str]:
    """The fit check of ``configs/<name>.py`` at its own global batch on ``devices`` fake CPU devices. The memory
    given is a placeholder: the table compares the peak with each target's memory itself."""
    return [sys.executable, "-m", "lzn_jax.tools.fit", f"--config=configs/{name}.py", f"--devices={devices}",
            "--device_memory=40GB", "--method=cpu-estimate", f"--{'' if solver_alone else 'no'}solver_alone",
            f"--json={json_path}"]


def run_fit(name: str, devices: int, *, timeout_seconds: float, solver_alone: bool = False) -> dict:
    """Runs the fit check in a child process; its output goes to this process's stdout as it comes.

    Returns:
      ``{"setting", "devices", "command", "started", "wall_seconds", "cpu_count", "report", "error"}``: the
      report as ``fit.py --json`` writes it, or None with the reason in ``error`` (a timeout or the exit status).
    """
    with tempfile.TemporaryDirectory() as scratch:
        json_path = os.path.join(scratch, "report.json")
        command = fit_command(name, devices, json_path, solver_alone=solver_alone)
        started = datetime.datetime.now().astimezone()
        start = time.perf_counter()
        report = error = None
        try:
            result = subprocess.run(command, cwd=REPO, timeout=timeout_seconds, check=False)
            if result.returncode == 0:
                report = json.loads(pathlib.Path(json_path).read_text())
            else:
                error = f"fit exited with status {result.returncode}"
        except subprocess.TimeoutExpired:
            error = f"compile stopped after {timeout_seconds / 60:.0f} min"
        wall = time.perf_counter() - start
    shown = " ".join(shlex.quote(part) for part in ["python"] + command[1:-1])  # without the scratch path
    return {"setting": name, "devices": devices, "command": shown, "started": started.isoformat(timespec="seconds"),
            "wall_seconds": round(wall, 1), "cpu_count": os.cpu_count(), "report": report, "error": error}


def _key(entry: dict) -> str:
    return f"{entry['setting']}@{entry['devices']}"


def load_runs(path: pathlib.Path) -> dict[str, dict]:
    """The runs ``--out`` holds, keyed ``<setting>@<devices>`` (empty when the file does not exist)."""
    return json.loads(path.read_text())["runs"] if path.exists() else {}


def save_runs(path: pathlib.Path, runs: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"method": "cpu-estimate", "margin": MARGIN, "runs": runs}, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------------


def _run() -> None:
    """The command line; its flags are defined only here, so importing this module defines none."""
    from absl import app, flags

    settings = flags.DEFINE_list("settings", [setting.name for setting in PAPER_SETTINGS], "Settings to compile, "
                                 "each <name> (the paper's device count) or <name>@<devices>.")
    out = flags.DEFINE_string("out", "docs/results/fit_table.json", "JSON file the runs are merged into (relative "
                              "paths: from the repository root).")
    run = flags.DEFINE_bool("run", True, "Run the fit checks; --norun only renders the table of --out.")
    timeout = flags.DEFINE_float("timeout_minutes", 25.0, "Stop a setting's fit check after this long.")
    solver_alone = flags.DEFINE_bool("solver_alone", False, "Also compile the zoning flows alone (seconds on "
                                     "XLA:CPU; their memory lands in the JSON, not in the table).")

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        try:
            wanted = [parse_setting(text) for text in settings.value]
        except ValueError as error:
            raise SystemExit(f"fit_table: {error}") from None
        path = pathlib.Path(out.value)
        path = path if path.is_absolute() else REPO / path
        runs = load_runs(path)
        if run.value:
            for name, devices in wanted:
                print(f"=== {name} on {devices} devices", flush=True)
                entry = run_fit(name, devices, timeout_seconds=60 * timeout.value, solver_alone=solver_alone.value)
                runs[_key(entry)] = entry
                save_runs(path, runs)  # after each setting: a stopped run keeps what finished
                print(f"=== {name} on {devices} devices: {entry['error'] or 'done'} in {entry['wall_seconds']:.0f} s",
                      flush=True)
        print(render_table(runs.values()))
        print(f"(runs in {path})")

    app.run(main)


if __name__ == "__main__":
    _run()
