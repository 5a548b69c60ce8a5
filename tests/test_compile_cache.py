"""torch.compile's cache keys follow lrq_ao's dispatch code (``lrq_ao._compile_cache``)."""

from __future__ import annotations

import shutil

import pytest
import torch

import lrq_ao  # noqa: F401  (importing tags the caches)
from lrq_ao._compile_cache import PACKAGE_ROOT, dispatch_code_digest, tag_compile_caches


def test_import_appends_the_digest_once_and_keeps_a_user_tag():
    tag = f"lrq_ao:{dispatch_code_digest()}"
    assert tag in torch.compiler.config.cache_key_tag.split("|")
    with torch.compiler.config.patch(cache_key_tag="mine"):
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
    for dispatch_file in ("layouts/registry.py", "kernels/row_gemm.py", "formats/convrot.py"):
        edited = root / dispatch_file
        edited.write_text(edited.read_text() + "\n# one more line\n")
        after = dispatch_code_digest(root)
        assert after != before, dispatch_file
        before = after


@pytest.mark.slow  # three small CPU compiles
def test_a_changed_tag_misses_the_fx_graph_cache(monkeypatch, tmp_path):
    """The mechanism the digest relies on: the same tag hits Inductor's FX-graph cache, another tag misses it."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x = torch.randn(17)

    def compile_once(tag: str) -> dict:
        torch._dynamo.reset()
        counters.clear()
        with torch.compiler.config.patch(cache_key_tag=tag):
            torch.compile(lambda t: (t.sin() * 3).sum())(x)
        return dict(counters["inductor"])

    # config.patch, not monkeypatch: pytest >= 9.2 undoes a module attribute with delattr when it is not in the
    # module's __dict__, and torch's config module answers delattr by hiding the option for the rest of the process
    # (every later compile then fails with "fx_graph_cache does not exist").
    with inductor_config.patch(fx_graph_cache=True):  # tests/conftest.py turns it off for the suite
        assert compile_once("lrq_ao:a").get("fxgraph_cache_miss") == 1
        assert compile_once("lrq_ao:a").get("fxgraph_cache_hit") == 1
        assert compile_once("lrq_ao:b").get("fxgraph_cache_miss") == 1
    assert inductor_config.fx_graph_cache is False
