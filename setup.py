"""Build of the C++ kernel extension ``revsgd._cpp`` (everything else lives in setup.cfg).

Portable flags only: no -march=native (it changes float results through FMA contraction and breaks on other
CPUs); -ffp-contract=off keeps every product a separately rounded IEEE operation, as in NumPy.
"""
import os
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

extra = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
link = []
if sys.platform != "win32" and os.environ.get("REVSGD_NO_OPENMP") != "1":
    extra.append("-fopenmp")
    link.append("-fopenmp")

setup(
    ext_modules=[
        Pybind11Extension(
            "revsgd._cpp",
            ["csrc/kernels.cpp"],
            cxx_std=17,
            extra_compile_args=extra,
            extra_link_args=link,
        )
    ],
    cmdclass={"build_ext": build_ext},
)
