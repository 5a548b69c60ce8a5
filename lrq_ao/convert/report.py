"""The validation report of a conversion: one record per tensor plus totals, as a table, JSON and a PNG plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPORT_VERSION = 1


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


@dataclass
class LayerRecord:
    """One quantized layer: format written, any fallback, weight SQNR (dB, float64 against the input weight),
    the rounding objective before/after (None for round-to-nearest), and seconds spent."""

    layer: str
    format: str
    shape: list[int]
    sqnr_db: float
    objective_before: float | None = None
    objective_after: float | None = None
    seconds: float = 0.0
    fallback: str | None = None
    rounding: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["sqnr_db"] = _finite_or_str(self.sqnr_db)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayerRecord:
        d = dict(d)
        d["sqnr_db"] = float(d["sqnr_db"])
        return cls(**d)


def _finite_or_str(x: float) -> float | str:
    # JSON has no Infinity; an all-zero weight quantizes exactly and has infinite SQNR.
    return x if math.isfinite(x) else str(x)


@dataclass
class ConversionReport:
    input: str
    output: str
    preset: str
    layers: list[LayerRecord]
    kept: dict[str, str]
    removed: dict[str, str]
    input_bytes: int
    output_bytes: int
    seconds: float
    resumed_tensors: int = 0
    peak_rss_bytes: int | None = None
    verify: dict[str, Any] | None = None

    @property
    def compression(self) -> float:
        return self.input_bytes / self.output_bytes if self.output_bytes else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "input": self.input,
            "output": self.output,
            "preset": self.preset,
            "layers": [r.to_json() for r in self.layers],
            "kept": self.kept,
            "removed": self.removed,
            "totals": {
                "quantized_layers": len(self.layers),
                "kept_tensors": len(self.kept),
                "removed_tensors": len(self.removed),
                "fallbacks": sum(1 for r in self.layers if r.fallback),
                "input_bytes": self.input_bytes,
                "output_bytes": self.output_bytes,
                "compression": self.compression,
                "seconds": self.seconds,
                "resumed_tensors": self.resumed_tensors,
                "peak_rss_bytes": self.peak_rss_bytes,
                "min_sqnr_db": _finite_or_str(min((r.sqnr_db for r in self.layers), default=math.inf)),
            },
            "verify": self.verify,
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def table(self, max_rows: int | None = None) -> str:
        rows = self.layers if max_rows is None else self.layers[:max_rows]
        width = max((len(r.layer) for r in rows), default=5)
        head = f"{'layer':<{width}}  {'format':<24} {'shape':>14} {'SQNR dB':>8} {'obj before':>11} {'obj after':>10}"
        head += f" {'s':>6}"
        lines = [head, "-" * len(head)]
        for r in rows:
            lines.append(
                f"{r.layer:<{width}}  {r.format:<24} {str(r.shape):>14} {r.sqnr_db:8.2f} {_num(r.objective_before):>11}"
                f" {_num(r.objective_after):>10} {r.seconds:6.2f}" + ("  (fallback)" if r.fallback else "")
            )
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more layers in the JSON report")
        for r in self.layers:
            if r.fallback:
                lines.append(f"fallback {r.layer}: {r.fallback}")
        t = self.to_json()["totals"]
        lines.append(
            f"{t['quantized_layers']} quantized, {t['kept_tensors']} kept, {t['removed_tensors']} removed; "
            f"{human_bytes(self.input_bytes)} -> {human_bytes(self.output_bytes)} ({self.compression:.2f}x) "
            f"in {self.seconds:.1f} s; min SQNR {_db(t['min_sqnr_db'])} dB"
            + (f"; {self.resumed_tensors} tensors resumed" if self.resumed_tensors else "")
        )
        return "\n".join(lines)

    def plot(self, path: str | Path) -> None:
        """A PNG bar chart of per-layer SQNR (needs matplotlib: ``pip install lrq_ao[plot]``)."""
        plot_sqnr(self.layers, path, title=f"{Path(self.output).name}: weight SQNR per layer")


def _db(x: float | str) -> str:
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def plot_sqnr(records: list[LayerRecord], path: str | Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib; install it with `pip install 'lrq_ao[plot]'`") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [r.sqnr_db if math.isfinite(r.sqnr_db) else 0.0 for r in records]
    colors = ["tab:orange" if r.fallback else "tab:blue" for r in records]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(records)), 4.0))
    ax.bar(range(len(records)), values, color=colors)
    ax.set_xlabel("layer (file order; orange = fallback format)")
    ax.set_ylabel("weight SQNR (dB)")
    ax.set_title(title)
    if len(records) <= 40:
        ax.set_xticks(range(len(records)), [r.layer for r in records], rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
