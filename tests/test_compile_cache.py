"""torch.compile's cache keys follow lrq_ao's dispatch code (``lrq_ao._compile_cache``)."""

from __future__ import annotations

import shutil

import torch

import lrq_ao  # noqa: F401  (importing tags the caches)
from lrq_ao._compile_cache import PACKAGE_ROOT, dispatch_code_digest, tag_compile_caches


def test_import_appends_the_digest_once_and_keeps_a_user_tag(monkeypatch):
    tag = f"lrq_ao:{dispatch_code_digest()}"
    assert tag in torch.compiler.config.cache_key_tag.split("|")
    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "mine")
    tag_compile_caches()
    tag_compile_caches()
    assert torch.compiler.config.cache_key_tag == f"mine|{tag}"


def test_digest_changes_with_dispatch_code_only(tmp_path):
    root = tmp_path / "lrq_ao"
    shutil.copytree(PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    before = dispatch_code_digest(root)
    assert before == dispatch_code_digest(PACKAGE_ROOT)  # the digest depends on the files, not on where they are
    (root / "demo.py").write_text("# not dispatch code\n")
    assert dispatch_code_digest(root) == before
    backends = root / "kernels" / "backends.py"
    backends.write_text(backends.read_text() + "\n# one more line\n")
    assert dispatch_code_digest(root) != before
