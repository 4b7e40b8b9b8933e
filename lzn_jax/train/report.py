"""What a person watching a run sees: one progress line per log interval on the terminal, TensorBoard and a
JSON-lines log of every metric in the workdir, PNG grids and curves, and a summary at the end."""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from clu import metric_writers

METRICS_FILE = "metrics.jsonl"


class JsonLinesWriter(metric_writers.MetricWriter):
    """Appends ``{"step": s, "name": value, ...}`` per ``write_scalars`` call to ``workdir/metrics.jsonl``.

    Appending keeps the lines of an earlier, resumed part of the run; ``read_metrics`` keeps the last value per
    step, so steps repeated after a resume from an older checkpoint do not appear twice.
    """

    def __init__(self, path: pathlib.Path):
        self._path = pathlib.Path(path)
        self._file = open(self._path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), **{name: float(value) for name, value in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        # Whole lines reach the file at once: a run killed hard (SIGKILL, OOM) keeps what it logged, and never
        # leaves half a line for the resumed run to append to.
        self._file.flush()

    def write_summaries(self, step, values, metadata=None):
        del step, values, metadata

    def write_images(self, step, images):
        del step, images

    def write_videos(self, step, videos):
        del step, videos

    def write_audios(self, step, audios, *, sample_rate):
        del step, audios, sample_rate

    def write_texts(self, step, texts):
        del step, texts

    def write_histograms(self, step, arrays, num_buckets=None):
        del step, arrays, num_buckets

    def write_hparams(self, hparams):
        del hparams

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def make_writer(workdir: pathlib.Path, *, is_main_process: bool) -> metric_writers.MetricWriter:
    """TensorBoard (``workdir/tensorboard``) plus the JSON-lines log on process 0; nothing on the others."""
    if not is_main_process:
        return metric_writers.MultiWriter([])
    tensorboard = metric_writers.SummaryWriter(str(workdir / "tensorboard"))
    return metric_writers.MultiWriter(
        [metric_writers.AsyncWriter(tensorboard), JsonLinesWriter(workdir / METRICS_FILE)]
    )


def read_metrics(workdir: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (steps, values)}`` from the JSON-lines log, the last record of each step winning."""
    by_step: dict[int, dict[str, float]] = {}
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(record.pop("step"), {}).update(record)
    series: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for name, value in by_step[step].items():
            series.setdefault(name, []).append((step, value))
    return {name: (np.array([s for s, _ in points]), np.array([v for _, v in points])) for name, points in
            series.items()}


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class ProgressLine:
    """One terminal line per log interval: step, the main losses, steps/s, ETA and where the time went."""

    SHOWN = ("train/loss", "train/rf_loss", "train/label_loss", "train/log_loss", "train/assignment_acc",
             "train/grad_norm")

    def __init__(self, *, first_step: int, last_step: int, enabled: bool):
        self.first_step, self.last_step, self.enabled = first_step, last_step, enabled
        self._start = time.perf_counter()
        self._last_time, self._last_step = self._start, first_step
        self.seconds = {"data": 0.0, "step": 0.0, "eval": 0.0, "checkpoint": 0.0}

    def add(self, section: str, seconds: float) -> None:
        self.seconds[section] += seconds

    def line(self, step: int, metrics: Mapping[str, float]) -> str:
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        remaining = (self.last_step - step) / rate if rate > 0 else math.inf
        parts = [f"step {step}/{self.last_step}"]
        for name in self.SHOWN:
            if name in metrics:
                parts.append(f"{name.split('/', 1)[1]} {metrics[name]:.4g}")
        if metrics.get("train/skipped_total", 0):
            parts.append(f"skipped {int(metrics['train/skipped_total'])}")
        total = sum(self.seconds.values()) or 1.0
        split = " ".join(f"{name} {100 * value / total:.0f}%" for name, value in self.seconds.items() if value)
        eta = format_duration(remaining) if math.isfinite(remaining) else "?"
        parts += [f"{rate:.2f} steps/s", f"ETA {eta}", split]
        return " | ".join(parts)

    def show(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.enabled:
            print(self.line(step, metrics), flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self._start


def write_png(path: pathlib.Path, image: np.ndarray) -> None:
    """Writes a uint8 (H, W, C) picture (C = 1 or 3) as PNG, enlarged (nearest) to at least 512 pixels wide."""
    from PIL import Image

    picture = image[..., 0] if image.shape[-1] == 1 else image
    scale = max(1, 512 // picture.shape[1])
    Image.fromarray(picture).resize((picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST).save(path)


def plot_curves(workdir: pathlib.Path, path: pathlib.Path, names: tuple[str, ...] | None = None) -> list[str]:
    """One panel per logged metric (or per name in ``names``) against the step; returns the names plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(workdir)
    # Flags and counters that are constant in a healthy run stay out of the default panels.
    hidden = ("train/enabled", "train/skipped", "uptime")
    names = [name for name in (names or sorted(series))
             if name in series and (names is not None or not name.startswith(hidden))]
    if "train/skipped_total" in series and series["train/skipped_total"][1].any() and "train/skipped_total" not in names:
        names.append("train/skipped_total")
    if not names:
        return []
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names):
        steps, values = series[name]
        axis.plot(steps, values, linewidth=1.2)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return names


def write_json(path: pathlib.Path, values: Any) -> None:
    """``values`` as indented JSON in ``path``, whole or not at all: written beside it, then renamed into place (a
    run killed mid-write leaves the previous file, never half of one)."""
    path = pathlib.Path(path)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(values, indent=1, default=str) + "\n")
    temporary.replace(path)


def write_summary(workdir: pathlib.Path, summary: dict[str, Any]) -> str:
    """Writes ``summary.json`` and returns a short human-readable version of it."""
    (pathlib.Path(workdir) / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    lines = [f"  {name:<28} {value:.4g}" if isinstance(value, float) else f"  {name:<28} {value}"
             for name, value in summary.items()]
    return "\n".join(lines)
