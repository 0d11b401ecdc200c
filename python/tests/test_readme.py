"""The README's PyTorch quick start, run as written, and what it claims."""

import os
import re

import numpy as np
import torch

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def quick_start():
    """The Python block under the README's `tested: python/tests/test_readme.py` mark."""
    text = open(README, encoding="utf-8").read()
    m = re.search(r"<!-- tested: python/tests/test_readme.py -->\n```python\n(.*?)```", text, re.S)
    assert m, "the README lost its tested quick start"
    return m.group(1)


def test_the_readme_quick_start_runs_as_written(capsys):
    torch.manual_seed(0)
    scope = {}
    exec(compile(quick_start(), "README.md", "exec"), scope)
    layers, d, net, x, page = scope["layers"], scope["d"], scope["net"], scope["x"], scope["page"]
    assert [l["layer"] for l in layers] == ["2"] and [l["layer"] for l in d["layers"]] == ["2"]
    assert "<svg" in page.html
    # The canonical weights loaded into the user's module compute what it computed.
    with torch.no_grad():
        np.testing.assert_allclose(net(x).numpy(), scope["model"](x), rtol=1e-4, atol=1e-4)
    assert capsys.readouterr().out.startswith("2 ")
