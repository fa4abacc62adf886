"""Builds the one native part the Python package uses: libfusar_tiles, the C reader of the
AEF tile store (native/tiles/, also built by CMakeLists.txt for C/C++ users).

It is compiled as a plain shared library that Python loads with ctypes (it has no Python C
API), and it is optional: without a C compiler the install still succeeds and the tile
store falls back to its numpy reference path. Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fusar_edge._fusar_tiles",
            sources=["native/tiles/fusar_tiles.c"],
            include_dirs=["native/tiles"],
            define_macros=[("FUSAR_TILES_BUILDING", "1")],
            # same results as numpy bit for bit: no FMA contraction, no fast-math (flags as CMakeLists.txt)
            extra_compile_args=["-std=c99", "-O2", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno"],
            libraries=["m"],
            optional=True,
        )
    ]
)
