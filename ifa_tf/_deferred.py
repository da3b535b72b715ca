"""A package whose submodules import before, and without, its `__init__`.

`import tensorflow` runs TensorFlow's `__init__`, which loads all of TensorFlow: seconds,
tens of seconds on a busy machine. Its generated protos (`tf.train.Example`, the
`TensorProto` of TF Serving's API) need none of it, but a plain import of
`tensorflow.core.framework.tensor_pb2` runs that `__init__` first. `defer("tensorflow")`
registers the package without running it: its submodules then import on their own (TF
Serving's API protos in about 0.2 s), and the first use of a name the `__init__` defines
(`tf.constant`, `tf.__version__`, what Keras does) runs it, in place, once. So a process
that only needs the protos never loads TensorFlow, and one that needs it gets the same
module it would have had.

    from ifa_tf import _deferred
    _deferred.defer("tensorflow")          # nothing loads
    from tensorflow_serving.apis import predict_pb2    # only the protos
    import tensorflow as tf
    tf.constant(1)                         # TensorFlow's __init__ runs here

`is_loaded(name)` tells a loaded package from a deferred one (`name in sys.modules` no
longer does).

A deferred package stays so until used: right for a process whose imports this project
controls (the console scripts, `ifa-query`), where only protos import before it runs. Any
other part of TensorFlow imported directly before its `__init__` would start without what
the `__init__` sets up first (TF2 behaviour): `load(name)` runs it before such imports
(the console scripts do, before Keras). In a user's process, `imported_alone` defers it
only while the protos import, then takes it back out of `sys.modules`: a later `import
tensorflow` runs TensorFlow's `__init__` as usual (its API modules such as
`tensorflow.compat` exist only after it), finds the protos already imported, and gets them
as its attributes.
"""

import contextlib
import importlib.util
import sys
import threading
import types

import wrapt

_LOCK = threading.RLock()


class _DeferredPackage(types.ModuleType):
    """A package module whose `__init__` has not run: the first name looked up that it
    lacks runs it (Python calls `__getattr__` only for missing names; `__path__`, `__spec__`
    and the submodules imported so far are there)."""

    def __getattr__(self, name):
        with _LOCK:
            if self.__dict__.get("_deferred_loading"):  # the __init__ probing its names
                raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
            self._deferred_run()
        return getattr(self, name)

    def _deferred_run(self):
        if type(self) is not _DeferredPackage:
            return
        self.__dict__["_deferred_loading"] = True
        try:
            self.__spec__.loader.exec_module(self)
        finally:
            del self.__dict__["_deferred_loading"]
            self.__class__ = types.ModuleType


def defer(name):
    """Registers package `name` without running its `__init__` (see the module docstring);
    returns False, doing nothing, when it is already imported or not installed."""
    with _LOCK:
        if name in sys.modules:
            return False
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None:
            return False
        module = importlib.util.module_from_spec(spec)
        module.__class__ = _DeferredPackage
        sys.modules[name] = module
        return True


def load(name):
    """Runs a deferred package's `__init__` now (nothing when it is loaded or absent): before
    importing what uses it, so that its start-up runs with no other import half done."""
    module = sys.modules.get(name)
    if isinstance(module, _DeferredPackage):
        with _LOCK:
            module._deferred_run()


def is_loaded(name):
    """Whether package `name` is imported with its `__init__` run."""
    module = sys.modules.get(name)
    return module is not None and not isinstance(module, _DeferredPackage)


@contextlib.contextmanager
def imported_alone(name):
    """Within: package `name` deferred, so its submodules import without its `__init__`.
    After: a package deferred here and still unused is removed from `sys.modules` again
    (the submodules imported meanwhile stay), so that a later import runs it as usual."""
    deferred = defer(name)
    try:
        yield
    finally:
        if deferred and not is_loaded(name):
            with _LOCK:
                del sys.modules[name]
            wrapt.register_post_import_hook(_adopt_submodules, name)


def _adopt_submodules(package):
    """Sets the submodules imported before `package` ran as its attributes, as an import
    after it would have (`package.core` for `package.core.framework.tensor_pb2`)."""
    prefix = package.__name__ + "."
    for name, module in list(sys.modules.items()):
        child = name[len(prefix):]
        if name.startswith(prefix) and "." not in child and not hasattr(package, child):
            setattr(package, child, module)
