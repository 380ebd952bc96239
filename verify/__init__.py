"""m3-verify (the package ``m3_verify``, the folder ``verify/``): proves an m3-convert output complete, intact and
faithful. ``from m3_verify import verify`` is the Python API (:mod:`.api`); ``m3-verify`` the command line over it."""


def __getattr__(name):
    if name in ("verify", "Report"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'm3_verify' has no attribute {name!r}")
