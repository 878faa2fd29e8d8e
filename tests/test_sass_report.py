"""benchmarks/sass_report.py's readers of cuobjdump's and ptxas's output, on text in their
formats (the tool itself needs nvcc and cuobjdump; it is run by hand, csrc/NOTES.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "sass_report", Path(__file__).resolve().parent.parent / "benchmarks" / "sass_report.py")
sass_report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(sass_report)

_K1 = "_ZN3awq50_GLOBAL__N__b323df8c_17_int4_gemv_fold_cu_f213468916gemv_fold_kernelI13__nv_bfloat16NS0_7FoldCfgILi16ELi3ELi1EEELi2ELi1EEEvNS0_8FoldArgsE"
_K2 = "_ZN3awq50_GLOBAL__N__b323df8c_17_int4_gemv_fold_cu_f213468913fold_finalizeI6__halfEEvNS0_8FoldArgsE"

SASS = f"""
\tcode for sm_90a
\t\tFunction : {_K1}
\t.headerflags\t@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
                                                                          /* 0x000fe20000000800 */
        /*0010*/               @!P1 LDS.128 R36, [R32] ;                  /* 0x0000000000007919 */
        /*0020*/                   HMMA.16816.F32.BF16 R40, R40, R36, RZ ;/* 0x0000000000007919 */
        /*0030*/                   LOP3.LUT R44, R26, 0xf000f, R48, 0xea, !PT ;
        /*0040*/               @P0 BRA 0xc970 ;
        /*0050*/                   HMMA.16816.F32.BF16 R36, R32, R38, RZ ;
        /*fff0*/                   NOP ;
        /*10000*/                  EXIT ;
\t\tFunction : {_K2}
        /*0000*/                   S2R R0, SR_CTAID.X ;
        /*0010*/                   EXIT ;
"""

PTXAS = f"""ptxas info    : Compiling entry function '{_K2}' for 'sm_90a'
ptxas info    : Function properties for {_K2}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
ptxas info    : Compiling entry function '{_K1}' for 'sm_90a'
ptxas info    : Function properties for {_K1}
    424 bytes stack frame, 16 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 126 registers, used 1 barriers, 64 bytes smem
"""


def test_parse_sass_counts_opcodes_past_address_0xffff():
    """Opcodes in order (predicates dropped), addresses of 4 or more hex digits (a kernel over
    4096 instructions has 5), each kernel on its own."""
    code = sass_report.parse_sass(SASS)
    assert list(code) == [_K1, _K2]
    assert code[_K1] == ["LDC", "LDS", "HMMA", "LOP3", "BRA", "HMMA", "NOP", "EXIT"]
    assert code[_K2] == ["S2R", "EXIT"]
    assert sass_report.main_loop(code[_K1]) == 3 and sass_report.main_loop(code[_K2]) is None


def test_parse_ptxas_reads_registers_and_spills_per_kernel():
    assert sass_report.parse_ptxas(PTXAS) == {_K2: (32, 0), _K1: (126, 16)}


def test_stable_names_drop_the_per_file_hash(monkeypatch):
    """Two builds of one file (another anonymous-namespace hash) name a kernel alike, with c++filt
    (readable) and without it."""
    other = _K1.replace("b323df8c", "29f718e5")
    names = sass_report.stable_names([_K1, other])
    assert names[_K1] == names[other]
    monkeypatch.setattr(sass_report.shutil, "which", lambda tool: None)
    names = sass_report.stable_names([_K1, other])
    assert names[_K1] == names[other] and "b323df8c" not in names[_K1]
