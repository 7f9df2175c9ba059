"""Build a C++ CPU kernel of this package with the host compiler, once, with the host's SIMD flags.

``load_cpu_extension(name, source)`` compiles ``source`` (a file beside the
caller) through ``torch.utils.cpp_extension.load`` (cached under the torch
extensions directory; a later process loads the cached library) with ``-O3
-fopenmp`` (``at::parallel_for`` is inline OpenMP in ATen's headers, serial
without it; the library then needs libgomp.so.1, the runtime torch already
loaded, so one thread pool serves both) and ``-mavx2 -mfma -mf16c`` where
/proc/cpuinfo lists all three flags, else as portable scalar code (the
extension's name says which: ``<name>_avx2`` / ``<name>_scalar``). Returns None
when no compiler works, logging why once; callers keep their torch path.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

SIMD_FLAGS = ("avx2", "fma", "f16c")


def cpu_flags() -> set[str]:
    """The host CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def vnni_flags() -> tuple[str, list[str]]:
    """(name suffix, compiler flags) of the host's 256-bit integer dot-product instructions (``vpdpbusd`` on
    ymm registers): AVX-VNNI (``__AVXVNNI__``), else AVX512-VNNI with AVX512VL (``__AVX512VNNI__``), else none."""
    flags = cpu_flags()
    if "avx_vnni" in flags:
        return "_avxvnni", ["-mavxvnni"]
    if {"avx512_vnni", "avx512vl"} <= flags:
        return "_avx512vnni", ["-mavx512vnni", "-mavx512vl"]
    return "", []


AVX512_FLAGS = ("avx512f", "avx512bw")
AMX_FLAGS = ("amx_tile", "amx_int8")


def load_cpu_extension(name: str, source: str | list[str], what: str, extra_cflags: tuple[str, ...] = (),
                       vnni: bool = False, avx512: bool = False, amx: bool = False):
    """The compiled extension of ``source`` (one file or several linked into one library) or None (``what``
    names the kernel in the warning; ``extra_cflags`` go after the common flags). ``vnni``: also the host's
    VNNI flags where it has them (``vnni_flags``), ``avx512``: ``-mavx512f -mavx512bw`` where it has both,
    ``amx`` (with ``avx512``): ``-mamx-tile -mamx-int8`` where it also lists AMX-TILE and AMX-INT8; the name
    says which, for a source that uses them when its compiler macros say so."""
    from torch.utils import cpp_extension

    simd = all(f in cpu_flags() for f in SIMD_FLAGS)
    flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma", "-mf16c"] if simd else []) + list(extra_cflags)
    suffix = "_avx2" if simd else "_scalar"
    if simd and vnni:
        vnni_suffix, vflags = vnni_flags()
        suffix, flags = suffix + vnni_suffix, flags + vflags
    if simd and avx512 and all(f in cpu_flags() for f in AVX512_FLAGS):
        suffix, flags = suffix + "_avx512", flags + ["-mavx512f", "-mavx512bw"]
        if amx and all(f in cpu_flags() for f in AMX_FLAGS):
            suffix, flags = suffix + "_amx", flags + ["-mamx-tile", "-mamx-int8"]
    try:
        return cpp_extension.load(name=name + suffix, sources=[source] if isinstance(source, str) else source,
                                  extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no headers
        logger.warning("%s unavailable (%s): %s", what, type(exc).__name__, exc)
        return None
