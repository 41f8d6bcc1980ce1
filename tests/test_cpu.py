"""utils/cpu.py: the processor's bf16 instruction sets, from /proc/cpuinfo's flags."""
from utils.cpu import cpu_flags, native_bf16


def test_flags_are_read_from_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n"
                    "\nprocessor\t: 1\nflags\t\t: fpu\n")
    flags = cpu_flags(str(info))
    assert flags == {"fpu", "avx512f", "avx512_bf16", "amx_tile"}
    assert native_bf16(flags) == {"avx512_bf16": True, "amx_bf16": False}
    assert native_bf16({"amx_bf16"}) == {"avx512_bf16": False, "amx_bf16": True}


def test_unreadable_flags_are_none(tmp_path):
    assert cpu_flags(str(tmp_path / "missing")) == set()
    assert native_bf16(set()) == {"avx512_bf16": False, "amx_bf16": False}
