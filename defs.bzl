"""Build macros of graph_prune: one target per Python module, named after it.

Every library module and tool is one target whose only source is `<name>.py`
(with the package's `__init__.py` for the first module of a package), so the
BUILD files say just what each module may import: its deps.
"""

def _srcs(name, init):
    return (["__init__.py"] if init else []) + [name + ".py"]

def py_module(name, deps = [], init = False, **kwargs):
    """A py_library of the module `name`.py (plus `__init__.py` when `init`)."""
    native.py_library(name = name, srcs = _srcs(name, init), deps = deps, **kwargs)

def py_tool(name, deps = [], init = False, **kwargs):
    """A py_binary whose entry point is `name`.py (plus `__init__.py` when `init`)."""
    native.py_binary(name = name, srcs = _srcs(name, init), deps = deps, **kwargs)
