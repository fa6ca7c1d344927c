"""Only here to build the cffi extension (xxnode.kernel._clone3); metadata is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["xxnode/kernel/_clone3_build.py:ffibuilder"])
