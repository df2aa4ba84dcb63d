"""PNG plots of a sweep's rows (matplotlib, Agg backend, no display needed).

  speedup_vs_flops_b<B>.png  measured speedup (median, p10-p90 bars) against the
                             FLOPs reduction, with the ideal line speedup = FLOPs
                             ratio; one file per batch size
  latency_vs_ratio.png       pruned latency against the ratio, a panel per batch size
  memory_vs_ratio.png        pruned peak memory against the ratio, likewise
  accuracy_vs_speedup.png    top-1 against the speedup, where rows have accuracy

One series per criterion and round_to; only rows with status ok are drawn. The
figures depend on the rows only, so the same rows give the same files.
"""

from __future__ import annotations

import io
import os
from typing import Any, Optional, Sequence

import matplotlib
matplotlib.use("Agg")
from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
from matplotlib import figure as figure_lib  # pylint: disable=g-import-not-at-top
from matplotlib import ticker  # pylint: disable=g-import-not-at-top

from graph_prune import files  # pylint: disable=g-import-not-at-top
from graph_prune.sweep import rows as rows_lib  # pylint: disable=g-import-not-at-top

_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
            "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))


def _series(rows: Sequence[dict[str, Any]]) -> list[tuple[str, dict, list[dict[str, Any]]]]:
  """(label, line style, rows sorted by ratio) per criterion, round_to and allocation,
  in order of first appearance."""
  criteria, round_tos, groups = [], [], {}
  for r in rows:
    if r["criterion"] not in criteria:
      criteria.append(r["criterion"])
    if r["round_to"] not in round_tos:
      round_tos.append(r["round_to"])
    groups.setdefault((r["criterion"], r["round_to"], r.get("allocation")), []).append(r)
  allocations = list(dict.fromkeys(k[2] for k in groups))
  out = []
  for (criterion, round_to, allocation), members in groups.items():
    used = members[0].get("round_to_used")
    label = f"{criterion}, round_to {round_to}"
    if str(round_to) == "auto" and used is not None:
      label += f" ({used})"
    if allocation and allocations != ["uniform"]:
      label += f", {allocation}"
    line, marker = _STYLES[(round_tos.index(round_to) + allocations.index(allocation))
                           % len(_STYLES)]
    style = {"color": _COLOURS[criteria.index(criterion) % len(_COLOURS)], "linestyle": line,
             "marker": marker, "markersize": 4, "linewidth": 1.2}
    out.append((label, style, sorted(members, key=lambda r: r["ratio"])))
  return out


def _subtitle(rows: Sequence[dict[str, Any]], model: str) -> str:
  first = rows[0] if rows else {}
  runtime = {"tensorflow-xla": "TensorFlow XLA", "tensorflow": "TensorFlow, no XLA",
             "onnxruntime": "ONNX Runtime"}.get(first.get("runtime"), first.get("runtime"))
  device = first.get("device_name") or first.get("device") or "device unknown"
  return f"{model} on {device} [{first.get('device', '?')}, {runtime}]"


def _first(rows: Sequence[dict[str, Any]], column: str) -> Optional[float]:
  for r in rows:
    if r.get(column) is not None:
      return r[column]
  return None


def _median(values: Sequence[float]) -> Optional[float]:
  values = sorted(v for v in values if v is not None)
  if not values:
    return None
  mid = len(values) // 2
  return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _save(fig: figure_lib.Figure, path: str) -> None:
  backend_agg.FigureCanvasAgg(fig)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  files.write_atomic(path, buf.getvalue())


def _empty(ax) -> None:
  ax.text(0.5, 0.5, "no successful runs", ha="center", va="center", transform=ax.transAxes)


def _points(members, x_col: str, y_col: str, order: Optional[str] = None):
  """(x, y, row) of the rows that have both, sorted by x or by the column `order`."""
  pts = [(r[x_col], r[y_col], r) for r in members
         if r.get(x_col) is not None and r.get(y_col) is not None]
  return sorted(pts, key=lambda p: p[0] if order is None else p[2][order])


def _ratio_axis(axis) -> None:
  """A log2 axis of ratios, labelled 1x, 2x, 4x, ..."""
  axis.set_major_locator(ticker.LogLocator(base=2))
  axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
  axis.set_minor_formatter(ticker.NullFormatter())


def speedup_vs_flops(rows, batch: int, model: str, path: str) -> None:
  """Log-log, so that FLOPs ratios from 1.1x to 70x fit and the ideal line stays
  the diagonal; it runs off the top where the speedup falls short."""
  fig = figure_lib.Figure(figsize=(7.5, 5.5))
  ax = fig.add_subplot()
  col = rows_lib.batch_column
  x_top, y_low, y_top = 2.0, 1.0, 2.0
  for label, style, members in _series(rows):
    pts = _points(members, "flops_reduction", col(batch, "speedup_median"))
    if not pts:
      continue
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    lo = [max(0.0, y - (p[2].get(col(batch, "speedup_p10")) or y)) for y, p in zip(ys, pts)]
    hi = [max(0.0, (p[2].get(col(batch, "speedup_p90")) or y) - y) for y, p in zip(ys, pts)]
    ax.errorbar(xs, ys, yerr=[lo, hi], label=label, capsize=2, **style)
    x_top = max(x_top, max(xs))
    y_low = min(y_low, min(y - l for y, l in zip(ys, lo)))
    y_top = max(y_top, max(y + h for y, h in zip(ys, hi)))
  if not rows:
    _empty(ax)
  ax.plot([1.0, x_top], [1.0, x_top], color="black", linewidth=1,
          label="ideal: speedup = FLOPs ratio")
  ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log", base=2)
  ax.set_xlim(0.9, x_top * 1.15)
  ax.set_ylim(max(0.05, y_low * 0.9), y_top * 1.25)
  _ratio_axis(ax.xaxis)
  _ratio_axis(ax.yaxis)
  ax.set_xlabel("FLOPs reduction (original FLOPs / pruned FLOPs), log scale")
  ax.set_ylabel("speedup (original / pruned latency), log scale\n"
                "median of A-B pairs, bars p10-p90")
  ax.set_title(f"Speedup vs FLOPs reduction, batch {batch}\n{_subtitle(rows, model)}",
               fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  if ax.get_legend_handles_labels()[0]:  # nothing measured: no empty legend
    ax.legend(fontsize=7, loc="lower right")
  _save(fig, path)


def _per_batch(rows, batch_sizes, model: str, path: str, title: str, y_col: str, y_label: str,
               orig_col: str, scale: float = 1.0, per_run_original: bool = False) -> None:
  """A panel per batch size: y_col (scaled) against the ratio, with the original's
  median line (and with per_run_original its figure from each run)."""
  fig = figure_lib.Figure(figsize=(5.5 * len(batch_sizes), 5.0))
  axes = fig.subplots(1, len(batch_sizes), squeeze=False)[0]
  col = rows_lib.batch_column
  for ax, b in zip(axes, batch_sizes):
    for label, style, members in _series(rows):
      pts = _points(members, "ratio", col(b, y_col))
      if pts:
        ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], label=label, **style)
    if per_run_original:
      # Measured next to each pruned model: shows how far the machine drifted.
      pts = _points(rows, "ratio", col(b, orig_col))
      if pts:
        ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], linestyle="none", marker="x",
                color="black", alpha=0.5, markersize=4, label="original, same run")
    orig = _median([r.get(col(b, orig_col)) for r in rows])
    if orig is not None:
      ax.axhline(orig * scale, color="black", linewidth=1, label="original, median")
    if not rows:
      _empty(ax)
    ax.set_xlabel("pruning ratio (fraction of channels removed per group)")
    ax.set_ylabel(y_label)
    ax.set_title(f"batch {b}", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing measured: no empty legend
      ax.legend(fontsize=7)
  fig.suptitle(f"{title}\n{_subtitle(rows, model)}", fontsize=10)
  fig.tight_layout()
  _save(fig, path)


def accuracy_vs_speedup(rows, batch_sizes, model: str, path: str) -> None:
  recovered = any(r.get("top1_recovered") is not None for r in rows)
  # With recovery a second row zooms in on the recovered models, whose accuracies
  # sit within a point or two of the original's.
  nrows = 2 if recovered else 1
  fig = figure_lib.Figure(figsize=(5.5 * len(batch_sizes), 5.0 * nrows))
  grid = fig.subplots(nrows, len(batch_sizes), squeeze=False)
  col = rows_lib.batch_column
  orig = _first(rows, "top1_orig")
  for row_index in range(nrows):
    zoom = row_index == 1
    for ax, b in zip(grid[row_index], batch_sizes):
      for label, style, members in _series(rows):
        # Joined in ratio order: the path a criterion takes as it prunes more.
        if not zoom:
          pts = _points(members, col(b, "speedup_median"), "top1", order="ratio")
          if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
        pts = _points(members, col(b, "speedup_median"), "top1_recovered", order="ratio")
        if pts:
          ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{label}, recovered",
                  **dict(style, markerfacecolor="none", linestyle=":"))
      if orig is not None:
        ax.axhline(orig, color="black", linewidth=1, label=f"original ({orig:.4f})")
        if zoom:
          ax.axhline(orig - 0.005, color="black", linewidth=1, linestyle="--",
                     label="original - 0.5 point")
      if not rows:
        _empty(ax)
      ax.set_xlabel(f"speedup at batch {b} (original / pruned latency)")
      if zoom:
        ax.set_ylabel("top-1 accuracy after recovery")
        ax.set_title(f"batch {b}, recovered models", fontsize=10)
      else:
        ax.set_ylabel("top-1 accuracy" + (" (filled: pruned, hollow: recovered)" if recovered
                                          else " (pruned, no recovery)"))
        ax.set_title(f"batch {b}", fontsize=10)
        ax.set_ylim(0, 1)
      ax.grid(True, alpha=0.3)
      if ax.get_legend_handles_labels()[0]:  # nothing measured: no empty legend
        ax.legend(fontsize=7)
  fig.suptitle(f"Top-1 accuracy vs speedup\n{_subtitle(rows, model)}", fontsize=10)
  fig.tight_layout()
  _save(fig, path)


def write_all(all_rows: Sequence[dict[str, Any]], batch_sizes: Sequence[int], model: str,
              out_dir: str) -> list[str]:
  """Writes every plot into out_dir (created if missing); returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  ok = [r for r in all_rows if r.get("status") == rows_lib.STATUS_OK]
  paths = []
  for b in batch_sizes:
    paths.append(os.path.join(out_dir, f"speedup_vs_flops_b{b}.png"))
    speedup_vs_flops(ok, b, model, paths[-1])
  paths.append(os.path.join(out_dir, "latency_vs_ratio.png"))
  _per_batch(ok, batch_sizes, model, paths[-1], "Latency of the pruned model vs ratio",
             "latency_pruned_median_ms", "latency, median (ms)", "latency_orig_median_ms",
             per_run_original=True)
  paths.append(os.path.join(out_dir, "memory_vs_ratio.png"))
  _per_batch(ok, batch_sizes, model, paths[-1], "Peak memory of the pruned model vs ratio",
             "peak_pruned_bytes", "peak memory (MiB)", "peak_orig_bytes", scale=2.0**-20)
  if any(r.get("top1") is not None for r in ok):
    paths.append(os.path.join(out_dir, "accuracy_vs_speedup.png"))
    accuracy_vs_speedup(ok, batch_sizes, model, paths[-1])
  return paths
