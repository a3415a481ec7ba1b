"""``numbasparse.learn`` is the :mod:`learn` package (L0 gates, gated layers,
``DynamicSparsity``) under a name that a user's own ``learn.py`` cannot shadow.

Where ``import learn`` finds this library's package, both names give the same module
objects, submodules included.  Where something else answers to ``learn`` (a script
named ``learn.py`` next to the user's code), the package is loaded under this name
only, and that other module is left alone.
"""
import importlib
import importlib.util
import os
import pkgutil
import sys

_PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "learn")
_INIT = os.path.join(_PACKAGE, "__init__.py")


def _found_learn_is_ours() -> bool:
    loaded = sys.modules.get("learn")
    if loaded is not None:
        return os.path.abspath(getattr(loaded, "__file__", "") or "") == _INIT
    spec = importlib.util.find_spec("learn")
    return spec is not None and spec.origin is not None and os.path.abspath(spec.origin) == _INIT


if _found_learn_is_ours():
    _learn = importlib.import_module("learn")
    for _info in pkgutil.iter_modules(_learn.__path__):
        sys.modules[f"{__name__}.{_info.name}"] = importlib.import_module(f"learn.{_info.name}")
else:
    _spec = importlib.util.spec_from_file_location(__name__, _INIT, submodule_search_locations=[_PACKAGE])
    _learn = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _learn
    _spec.loader.exec_module(_learn)
sys.modules[__name__] = _learn
