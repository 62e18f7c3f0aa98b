"""toolchain.runtime is what a device installs: it must import with torch and transformers absent."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO

# Makes torch and the HF training stack unimportable, as on a device that installed only `.[runtime]`.
BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'peft', 'optimum', 'accelerate'):
            raise ImportError('blocked on a device: ' + name)
sys.meta_path.insert(0, Block())
"""
BLOCK = BLOCK_TORCH + """
import pkgutil
import toolchain.runtime as rt
mods = [m.name for m in pkgutil.walk_packages(rt.__path__, 'toolchain.runtime.')]
for m in mods:
    __import__(m)
from toolchain.runtime import metrics
assert metrics.exact_match(['a ', 'b'], ['a', 'c']) == 0.5
print('ok', len(mods))
"""


def test_runtime_imports_without_torch():
    r = subprocess.run([sys.executable, "-c", BLOCK], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")
