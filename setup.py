"""The optional compiled decision scan (`shared/_scan.c`); everything else is in pyproject.toml. Without a
C compiler the build goes on and `dla_shared.scan` uses its numpy loop."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("dla_shared._scan", ["shared/_scan.c"], optional=True)])
