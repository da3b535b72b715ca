"""Names of a package that load on first use, so that importing the package stays cheap."""

import importlib


def lazy_names(package, where):
    """`(__getattr__, __all__)` for `package`, whose names `where` maps to the submodule
    (relative to `package`) that defines each; a module assigns both to its globals."""

    def __getattr__(name):
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(where)
