"""Tie torch.compile's on-disk caches to the code lrq_ao runs at dispatch.

Inductor's FX-graph cache and AOTAutograd's cache (``/tmp/torchinductor_$USER``) key a compiled graph by its FX
graph, input metadata, configs and torch's version — not by the Python a tensor subclass runs inside
``__torch_dispatch__``. lrq_ao picks linear backends and emits their ops there, so after an upgrade (or an edit of an
editable install) a graph compiled by the old code would be served again: seen in this project's tests when the
W8A8 backends changed which op they emit. Importing lrq_ao therefore appends a digest of that code to
``torch.compiler.config.cache_key_tag``, which every torch.compile cache key includes: changed code, new keys; the
same code, the caches work as before. A tag the user set is kept (ours is appended to it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

PACKAGE_ROOT = Path(__file__).parent
# What decides the ops of a compiled graph: layouts (dispatch, backend selection), kernels (the ops), the formats
# (their scale and dequantization rules) and the quantization arithmetic they share.
DISPATCH_CODE = ("layouts/*.py", "kernels/*.py", "formats/*.py", "primitives.py")


def dispatch_code_digest(root: Path = PACKAGE_ROOT) -> str:
    """A short hash over the files in ``DISPATCH_CODE`` under ``root`` (names and bytes, in sorted order)."""
    digest = hashlib.sha256()
    for pattern in DISPATCH_CODE:
        for path in sorted(root.glob(pattern)):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def tag_compile_caches() -> str:
    """Append ``lrq_ao:<digest>`` to ``torch.compiler.config.cache_key_tag`` (once); returns the tag."""
    tag = f"lrq_ao:{dispatch_code_digest()}"
    current = torch.compiler.config.cache_key_tag
    if tag not in current.split("|"):
        torch.compiler.config.cache_key_tag = f"{current}|{tag}" if current else tag
    return tag
