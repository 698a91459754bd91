"""setuptools needs a setup.py only to name the cffi extension module."""
from setuptools import setup

setup(cffi_modules=["vfuserver/_build.py:ffibuilder"])
