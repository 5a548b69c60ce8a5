"""Suite-wide test settings.

Inductor's FX-graph cache and AOTAutograd's cache live on disk (``/tmp/torchinductor_$USER``) across runs, and
their keys do not cover what lrq_ao's tensor subclasses do at dispatch (the Python code that picks a backend and
emits its ops): a graph compiled by an earlier checkout would be served again after that code changed, and a test
of the generated code would check a stale graph. Seen here when the W8A8 backends started emitting their GEMM op
under ``torch.compile``. Every compile in the tests is therefore a real compile.
"""

from __future__ import annotations

import torch._functorch.config
import torch._inductor.config

torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False
