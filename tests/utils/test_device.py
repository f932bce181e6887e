"""Device helpers: which CPUs multiply bf16 natively (read from /proc/cpuinfo's flags)."""

from __future__ import annotations

from r1mega.utils.device import cpu_has_native_bf16

EPYC_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
EPYC_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx512f amx_tile amx_bf16 amx_int8\n"


def test_native_bf16_is_read_from_the_flags() -> None:
    assert not cpu_has_native_bf16(EPYC_AVX2)
    assert cpu_has_native_bf16(EPYC_BF16)
    assert cpu_has_native_bf16(SAPPHIRE_RAPIDS)
    assert not cpu_has_native_bf16("model name\t: avx512_bf16 lookalike\nflags\t\t: avx2\n")  # flags line only
    assert isinstance(cpu_has_native_bf16(), bool)  # this machine's /proc/cpuinfo (or True where there is none)
