"""Model-level workflows built on the weight-level rounding: ``quantize_sequential`` quantizes a model stage by
stage against a float copy of itself (``sequential.py``). Nothing under ``lrq_ao.rounding`` imports from here."""

from lrq_ao.workflows.sequential import drift_trust_factor, linear_stages, quantize_sequential

__all__ = ["drift_trust_factor", "linear_stages", "quantize_sequential"]
