"""refusalbench reports: hypothesis registry, ``measure`` records, JSON/HTML reports, baseline gate.

The pytest plugin is :mod:`reports.plugin`; ``python -m reports`` compares and renders
stored JSON reports. It never imports ``fixtures``, and from ``probes`` only
``probes.models.native_bf16``, lazily in :mod:`reports.provenance`: a report records the
same bfloat16 check that ``--dtype auto`` used to pick the dtype.
"""

from reports.baseline import Comparison, compare
from reports.document import ReportError, load_report, validate
from reports.measure import ClaimError, HypothesisFailure, Measure
from reports.registry import Hypothesis, Registry, RegistryError, evaluate, load_registry

__all__ = [
    "ClaimError",
    "Comparison",
    "Hypothesis",
    "HypothesisFailure",
    "Measure",
    "Registry",
    "RegistryError",
    "ReportError",
    "compare",
    "evaluate",
    "load_registry",
    "load_report",
    "validate",
]
