"""The optional compiled loops (`shared/_scan.c`, the decision scan; `shared/_decode.c`, the one-token step;
both include `shared/_common.h`); everything else is in pyproject.toml. Without a C compiler the build goes on
and `dla_shared` falls back on its numpy scan and the backends on their ops steps."""

from setuptools import Extension, setup

loops = [Extension(f"dla_shared.{name}", [f"shared/{name}.c"], depends=["shared/_common.h"], optional=True)
         for name in ("_scan", "_decode")]
setup(ext_modules=loops)
