"""Calibration: per-linear input statistics captured from real data.

    with lrq_ao.calibrate(model) as calib:
        for batch in batches:
            model(**batch)
    calib.save("stats.safetensors")          # for the converter: lrq-convert ... --calib stats.safetensors

For every ``nn.Linear`` we keep the running second moment ``H = E[x xᵀ]`` (K × K, float32), the mean ``E[x]``
and the number of input rows. Linears that read the *same tensor* in a forward pass (q/k/v projections) share one
accumulator — detected by tensor identity — so memory is one K × K matrix per distinct input.

Held-out split: with ``holdout_every=k`` (default 5; 0 disables) the model's forward calls number k, 2k, 3k, …
(counted from 1) feed a second accumulator ``H_holdout`` instead of ``H``. The rounding fits only ``H``; the held-out
part only measures it (``output_sqnr_heldout_db`` in the report), because rounding overfits the statistics it was
fitted to. Cost: one more K × K float32 matrix per distinct input, allocated at the first held-out call, and 1/k of
the calibration tokens no longer inform the fit.

File format (``.safetensors``): tensors ``<module name>.h`` (K × K float32), ``<module name>.mean`` (K,
float32), ``<module name>.count`` (int64, shape [1]) for every module that owns statistics, plus
``<module name>.h_holdout`` (K × K float32) and ``<module name>.count_holdout`` (int64, [1]) when it has held-out
statistics (files without them still load, with none); the header metadata ``lrq_ao_calibration`` holds the format
version, ``aliases`` a JSON object mapping each sharing module's name to the name of the module whose tensors it
uses, and ``holdout_every``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

FILE_VERSION = "1"


@dataclass
class LinearStats:
    """Input statistics of one linear layer: ``h = E[x xᵀ]`` (K × K), ``mean = E[x]`` (K,), ``count`` rows.

    Captured against a float reference model (``calibrate(model, reference=...)``), ``x`` is the input the
    partially quantized model feeds the layer and, with ``d = x_ref − x`` the drift from the reference,
    ``cross = E[d xᵀ]``, ``drift_h = E[d dᵀ]`` and ``drift_mean = E[d]``; the rounding can then also compensate
    the error of the layers before it (see ``objectives.output_objective``).

    ``h_holdout = E[x xᵀ]`` over the held-out forward calls (``count_holdout`` rows), never used for fitting; None
    when no held-out call ran.

    ``cross_half = E[d xᵀ]`` over the odd-numbered fitting calls only (``count_half`` rows): the difference of the two
    halves measures how noisy ``cross`` is (``lrq_ao.workflows.sequential.drift_trust_factor``). Captured, not saved
    to files.
    """

    h: torch.Tensor
    mean: torch.Tensor
    count: int
    cross: torch.Tensor | None = None
    drift_h: torch.Tensor | None = None
    drift_mean: torch.Tensor | None = None
    h_holdout: torch.Tensor | None = None
    count_holdout: int = 0
    cross_half: torch.Tensor | None = None
    count_half: int = 0


def _rows(x: torch.Tensor, mask: torch.Tensor | None, device) -> torch.Tensor:
    """The input as (rows, K) float32; with a token mask of the input's leading shape, only the kept tokens."""
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
        x = x[mask.to(device=x.device, dtype=torch.bool)]
    return x.reshape(-1, x.shape[-1]).to(device=device, dtype=torch.float32)


class _Accumulator:
    def __init__(self, k: int, device: torch.device, paired: bool = False) -> None:
        self.sum_xx = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.sum_x = torch.zeros(k, dtype=torch.float64, device=device)
        self.count = 0
        self.sum_dx = torch.zeros(k, k, dtype=torch.float32, device=device) if paired else None
        self.sum_dd = torch.zeros(k, k, dtype=torch.float32, device=device) if paired else None
        self.sum_d = torch.zeros(k, dtype=torch.float64, device=device) if paired else None
        self.sum_xx_holdout: torch.Tensor | None = None  # allocated by the first held-out call
        self.count_holdout = 0
        self.sum_dx_half = torch.zeros(k, k, dtype=torch.float32, device=device) if paired else None
        self.count_half = 0

    @torch.no_grad()
    def add_holdout(self, rows: torch.Tensor) -> None:
        if self.sum_xx_holdout is None:
            self.sum_xx_holdout = torch.zeros_like(self.sum_xx)
        self.sum_xx_holdout.addmm_(rows.T, rows)
        self.count_holdout += rows.shape[0]

    @torch.no_grad()
    def add(self, rows: torch.Tensor, ref_rows: torch.Tensor | None = None, first_half: bool = False) -> None:
        self.sum_xx.addmm_(rows.T, rows)
        self.sum_x += rows.sum(dim=0, dtype=torch.float64)
        self.count += rows.shape[0]
        if self.sum_dx is not None:
            d = ref_rows - rows
            self.sum_dx.addmm_(d.T, rows)
            if first_half:
                self.sum_dx_half.addmm_(d.T, rows)
                self.count_half += rows.shape[0]
            self.sum_dd.addmm_(d.T, d)
            self.sum_d += d.sum(dim=0, dtype=torch.float64)

    def copy(self) -> _Accumulator:
        out = _Accumulator.__new__(_Accumulator)
        for key, value in vars(self).items():
            setattr(out, key, value.clone() if isinstance(value, torch.Tensor) else value)
        return out

    def stats(self) -> LinearStats:
        n = max(self.count, 1)
        st = LinearStats(self.sum_xx / n, (self.sum_x / n).float(), self.count)
        if self.sum_dx is not None:
            st.cross, st.drift_h, st.drift_mean = self.sum_dx / n, self.sum_dd / n, (self.sum_d / n).float()
        if self.count_holdout > 0:
            st.h_holdout, st.count_holdout = self.sum_xx_holdout / self.count_holdout, self.count_holdout
        if self.sum_dx_half is not None and 0 < self.count_half < self.count:
            st.cross_half, st.count_half = self.sum_dx_half / self.count_half, self.count_half
        return st


class Calibration:
    """Statistics of each linear's input, keyed by module name (see the module docstring)."""

    def __init__(self, holdout_every: int = 5) -> None:
        if not isinstance(holdout_every, int) or holdout_every < 0 or holdout_every == 1:
            raise ValueError(
                f"holdout_every must be 0 (no held-out split) or an int >= 2 (every k-th forward call is held out), "
                f"got {holdout_every!r}"
            )
        self.holdout_every = holdout_every
        self._forward_calls = 0
        self._acc: dict[str, _Accumulator] = {}
        self._stats: dict[str, LinearStats] = {}
        self._alias: dict[str, str] = {}
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._ref_inputs: dict[str, torch.Tensor] = {}
        self.paired = False
        # Set to the batch's (B, T) attention mask before each forward to leave padding tokens out.
        self.token_mask: torch.Tensor | None = None

    # -- capture -------------------------------------------------------------------------------------------
    def _observe(self, name: str, x: torch.Tensor, device: torch.device | None) -> None:
        hit = self._seen.get(id(x))
        owner = hit[1] if hit is not None and hit[0] is x else None
        if name in self._alias and self._alias[name] == owner:
            self._ref_inputs.pop(name, None)
            return
        if name in self._alias:
            # This layer shared its input so far but not now: it gets its own copy of the shared sums.
            self._acc[name] = self._acc[self._alias.pop(name)].copy()
        if owner is not None and owner != name and name not in self._acc:
            self._alias[name] = owner
            self._ref_inputs.pop(name, None)
            return
        dev = device or x.device
        ref_rows = None
        if self.paired:
            if name not in self._ref_inputs:
                raise RuntimeError(
                    f"calibrate(model, reference=...): {name!r} ran in the model before the reference model saw "
                    f"this batch; call reference(batch) first, then model(batch)"
                )
            ref_rows = _rows(self._ref_inputs.pop(name), self.token_mask, dev)
        if name not in self._acc:
            self._acc[name] = _Accumulator(x.shape[-1], dev, paired=self.paired)
        if self._in_holdout_call():
            self._acc[name].add_holdout(_rows(x, self.token_mask, dev))
        else:
            self._acc[name].add(
                _rows(x, self.token_mask, dev), ref_rows, first_half=self._fitting_call_index() % 2 == 1
            )
        self._seen[id(x)] = (x, name)
        self._stats.pop(name, None)

    def _fitting_call_index(self) -> int:
        """1, 2, 3, … over the forward calls that feed the fit (held-out calls skipped)."""
        k = self.holdout_every
        return self._forward_calls - (self._forward_calls // k if k > 0 else 0)

    def _in_holdout_call(self) -> bool:
        k = self.holdout_every
        return k > 0 and self._forward_calls % k == 0

    def _reset_forward(self) -> None:
        self._forward_calls += 1
        self._seen.clear()

    def _end_forward(self) -> None:
        self._seen.clear()
        self._ref_inputs.clear()

    def _observe_reference(self, name: str, x: torch.Tensor) -> None:
        self._ref_inputs[name] = x.detach()

    def record_call(
        self,
        inputs: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
        token_mask: torch.Tensor | None = None,
        device: torch.device | None = None,
    ) -> None:
        """Account one forward call in which the linear ``name`` read ``x`` (and, when paired, its reference read
        ``x_ref``), for every ``name: (x, x_ref)`` of ``inputs``: what the ``calibrate`` hooks do for one call of
        ``reference`` then ``model``, for callers that hold the inputs themselves (``quantize_sequential``)."""
        self._reset_forward()
        self.token_mask = token_mask
        for name, (x, x_ref) in inputs.items():
            if x_ref is not None:
                self._observe_reference(name, x_ref)
            self._observe(name, x, device)
        self._end_forward()

    def share(self, name: str, owner: str) -> None:
        """Let the linear ``name`` use ``owner``'s statistics (it reads the same tensor); no-op if ``owner`` has no
        statistics."""
        if owner in self._acc or owner in self._stats:
            self._alias[name] = owner

    def set_stats(self, name: str, stats: LinearStats | None) -> None:
        """Give the linear ``name`` its own ``stats`` (no longer shared with another linear); None: leave it as is."""
        if stats is not None:
            self._alias.pop(name, None)
            self._stats[name] = stats

    # -- access --------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(set(self._acc) | set(self._stats) | set(self._alias))

    def __contains__(self, name: str) -> bool:
        return name in self._acc or name in self._stats or name in self._alias

    def owner_of(self, name: str) -> str:
        return self._alias.get(name, name)

    def stats(self, name: str) -> LinearStats | None:
        """Statistics of the linear called ``name`` (shared ones resolved), or None if it never ran."""
        owner = self.owner_of(name)
        if owner not in self._stats:
            if owner not in self._acc:
                return None
            self._stats[owner] = self._acc[owner].stats()
        return self._stats[owner]

    # -- files ---------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for name in sorted(set(self._acc) | set(self._stats)):
            st = self.stats(name)
            tensors[f"{name}.h"] = st.h.float().contiguous().cpu()
            tensors[f"{name}.mean"] = st.mean.float().contiguous().cpu()
            tensors[f"{name}.count"] = torch.tensor([st.count], dtype=torch.int64)
            for extra in ("cross", "drift_h", "drift_mean", "h_holdout"):
                if getattr(st, extra) is not None:
                    tensors[f"{name}.{extra}"] = getattr(st, extra).float().contiguous().cpu()
            if st.h_holdout is not None:
                tensors[f"{name}.count_holdout"] = torch.tensor([st.count_holdout], dtype=torch.int64)
        meta = {
            "lrq_ao_calibration": FILE_VERSION,
            "aliases": json.dumps(self._alias, sort_keys=True),
            "holdout_every": str(self.holdout_every),
        }
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Calibration:
        """Read a statistics file written by ``save``; raises ``ValueError`` naming the file if it is not one."""
        from safetensors import safe_open

        path = os.fspath(path)
        out = cls()
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("lrq_ao_calibration") != FILE_VERSION:
                raise ValueError(
                    f"{path} is not an lrq_ao calibration file (version {FILE_VERSION}); write one with "
                    f"lrq_ao.calibrate(model) ... calib.save(path)"
                )
            keys = set(f.keys())
            owners = {k.rsplit(".", 1)[0] for k in keys}
            for name in owners:
                out._stats[name] = LinearStats(
                    f.get_tensor(f"{name}.h"), f.get_tensor(f"{name}.mean"), int(f.get_tensor(f"{name}.count")[0])
                )
                for extra in ("cross", "drift_h", "drift_mean", "h_holdout"):
                    if f"{name}.{extra}" in keys:
                        setattr(out._stats[name], extra, f.get_tensor(f"{name}.{extra}"))
                if f"{name}.count_holdout" in keys:
                    out._stats[name].count_holdout = int(f.get_tensor(f"{name}.count_holdout")[0])
        # Files written before the held-out split existed have no holdout_every: they held nothing out.
        out.holdout_every = int(meta.get("holdout_every", "0"))
        out._alias = json.loads(meta.get("aliases", "{}"))
        missing = set(out._alias.values()) - set(out._stats)
        if missing:
            raise ValueError(f"{path}: aliases point at modules without statistics: {sorted(missing)}")
        return out


@contextlib.contextmanager
def calibrate(
    model: nn.Module,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    device: str | torch.device | None = None,
    reference: nn.Module | None = None,
    holdout_every: int = 5,
) -> Iterator[Calibration]:
    """Capture input statistics of every ``nn.Linear`` in ``model`` (those ``filter_fn(module, name)`` accepts)
    while the ``with`` block runs forward passes. ``device`` holds the accumulators (default: the input's).

    With ``reference`` (the float model, same module names) every batch must run through ``reference`` first and
    then through ``model``; the statistics then also describe how far ``model``'s inputs drifted from the
    reference's (``LinearStats.cross``), which lets the rounding compensate earlier layers' error.
    Set ``calib.token_mask`` to the batch's attention mask before its forward passes to skip padding tokens.
    Every ``holdout_every``-th forward call of ``model`` goes to the held-out statistics only (0: none; see the
    module docstring). Raises ``ValueError`` if no ``nn.Linear`` passes the filter or ``holdout_every`` is invalid.
    """
    calib = Calibration(holdout_every)
    calib.paired = reference is not None
    dev = torch.device(device) if device is not None else None
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and (filter_fn is None or filter_fn(m, n))
    }
    if not linears:
        raise ValueError("calibrate(model): the model has no nn.Linear that the filter accepts; nothing to capture")
    # Identity of inputs only means something within one forward pass: forget them before and after each.
    handles = [
        model.register_forward_pre_hook(lambda mod, args: calib._reset_forward()),
        model.register_forward_hook(lambda mod, args, out: calib._end_forward()),
    ]
    for name, mod in linears.items():

        def hook(mod, args, name=name):
            calib._observe(name, args[0], dev)

        handles.append(mod.register_forward_pre_hook(hook))
    if reference is not None:
        for name, mod in reference.named_modules():
            if name in linears:

                def ref_hook(mod, args, name=name):
                    calib._observe_reference(name, args[0])

                handles.append(mod.register_forward_pre_hook(ref_hook))
    try:
        yield calib
    finally:
        for h in handles:
            h.remove()
        calib._end_forward()


def stats_for(calibration, fqn: str, module: nn.Module | None = None) -> LinearStats | None:
    """The statistics ``quantize_weight`` needs for the linear ``fqn``: None without calibration or when the layer
    never ran. ``calibration`` is a ``Calibration`` or the path of a saved statistics file."""
    if calibration is None:
        return None
    if isinstance(calibration, str | os.PathLike):
        calibration = _load_cached(os.fspath(calibration))
    st = calibration.stats(fqn)
    if st is not None and module is not None and getattr(module, "in_features", st.h.shape[0]) != st.h.shape[0]:
        raise ValueError(
            f"calibration statistics for {fqn!r} have {st.h.shape[0]} input features but the module has "
            f"{module.in_features}; the statistics belong to another model"
        )
    return st


_CACHE: dict[str, Calibration] = {}


def _load_cached(path: str) -> Calibration:
    if path not in _CACHE:
        _CACHE[path] = Calibration.load(path)
    return _CACHE[path]
