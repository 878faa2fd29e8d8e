"""Build the CUDA kernels of csrc/ into a plain shared library (C ABI, no torch headers).

    python -m awq_compile.build_kernels                 # sm_90a + sm_80 -> awq_compile/_lib/
    python -m awq_compile.build_kernels --arch 90a      # Hopper only (faster build)
    python -m awq_compile.build_kernels --out /path/libawq_int4.so

The library does not link against torch, so one build serves any torch version; awq_compile._cuda
loads it with ctypes from $AWQ_COMPILE_CUDA_LIB or awq_compile/_lib/libawq_int4.so
(docs/kernels.md). Needs nvcc (CUDA 12.x or 13.x) on PATH or in $CUDA_HOME/bin, and CUTLASS's
headers for the sm_90 prefill GEMM (the nvidia-cutlass package, `pip install -e .[cuda]`, or
$CUTLASS_DIR).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["SOURCES", "default_output", "find_cuda_tool", "find_nvcc", "cutlass_include", "nvcc_command",
           "compile_objects", "build"]

SOURCES = ("int4_common.cu", "int4_gemv_mma.cu", "int4_gemv_simt.cu", "int4_gemv_tc.cu", "int4_gemv_pc.cu",
           "int4_gemv_fold.cu", "int4_dequant.cu", "int4_gemm_sm90.cu", "rope_cache.cu",
           "decode_attention.cu", "add_rms_norm.cu")
ARCHS = ("90a", "80")
# -DNDEBUG: CUTLASS's device asserts are calls that split the wgmma pipeline (ptxas C7510).
_FLAGS = ("-O3", "-std=c++17", "-DNDEBUG", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr")


def default_output() -> Path:
    """Where awq_compile._cuda looks for the library when $AWQ_COMPILE_CUDA_LIB is unset."""
    return Path(__file__).resolve().parent / "_lib" / "libawq_int4.so"


def _csrc() -> Path:
    return Path(__file__).resolve().parent.parent / "csrc"


def find_cuda_tool(name: str) -> str | None:
    """A CUDA toolkit program (nvcc, cuobjdump, ...) from $CUDA_HOME/bin, else PATH, else None."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / name).exists():
        return str(Path(home) / "bin" / name)
    return shutil.which(name)


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/bin, else PATH, else None."""
    return find_cuda_tool("nvcc")


def cutlass_include() -> Path:
    """CUTLASS's headers: $CUTLASS_DIR/include, else the nvidia-cutlass package's copy."""
    env = os.environ.get("CUTLASS_DIR")
    if env:
        inc = Path(env) / "include"
    else:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or spec.origin is None:
            raise FileNotFoundError("CUTLASS headers not found: pip install nvidia-cutlass "
                                    "(or set CUTLASS_DIR to a CUTLASS checkout)")
        inc = Path(spec.origin).parent / "source" / "include"
    if not (inc / "cutlass" / "cutlass.h").exists():
        raise FileNotFoundError(f"CUTLASS headers not found under {inc}")
    return inc


def _gencode(arch: str) -> list[str]:
    # The -gencode form: `-arch=sm_90a` also runs a plain sm_90 pass on some nvcc versions.
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def nvcc_command(nvcc: str, src: Path, obj: Path, archs=ARCHS, cutlass: bool = False, extra=()) -> list[str]:
    """The nvcc command line that compiles one source to an object as the library's build does,
    with CUTLASS's headers where `cutlass`, and `extra` flags (e.g. -Xptxas -v) before the files."""
    includes = [f"-I{cutlass_include()}"] if cutlass else []
    gencodes = [flag for a in archs for flag in _gencode(a)]
    return [nvcc, *_FLAGS, *includes, *gencodes, *extra, "-c", str(src), "-o", str(obj)]


def compile_objects(
    out_dir: Path, archs=ARCHS, sources=SOURCES, nvcc: str | None = None, jobs: int = 2
) -> list[Path]:
    """Compile each source to an object in out_dir; raises CalledProcessError with nvcc's output."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found: set CUDA_HOME or put nvcc on PATH")
    cutlass = any("gemm_sm90" in s for s in sources)

    def one(src: str) -> Path:
        obj = out_dir / (Path(src).stem + ".o")
        subprocess.run(nvcc_command(nvcc, _csrc() / src, obj, archs, cutlass), check=True, capture_output=True,
                       text=True)
        return obj

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, sources))


def build(out: Path | None = None, archs=ARCHS, nvcc: str | None = None, jobs: int = 2, sources=SOURCES) -> Path:
    """Compile and link libawq_int4.so (static CUDA runtime: no libcudart needed at load time);
    `sources`, a subset of SOURCES, only for tests of part of the library."""
    out = Path(out or default_output())
    out.parent.mkdir(parents=True, exist_ok=True)
    nvcc = nvcc or find_nvcc()
    with tempfile.TemporaryDirectory() as tmp:
        objs = compile_objects(Path(tmp), archs, sources, nvcc=nvcc, jobs=jobs)
        gencodes = [flag for a in archs for flag in _gencode(a)]
        tmp_out = Path(tmp) / out.name
        cmd = [nvcc, "-shared", "-cudart", "static", *gencodes, *map(str, objs), "-o", str(tmp_out)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        shutil.move(str(tmp_out), out)  # atomic enough: a half-written .so is never loaded
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help=f"default: {default_output()}")
    p.add_argument("--arch", default=",".join(ARCHS), help="comma list, e.g. 90a,80 (default)")
    p.add_argument("--nvcc", default=None)
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    args = p.parse_args(argv)
    try:
        path = build(args.out, tuple(args.arch.split(",")), args.nvcc, args.jobs)
    except subprocess.CalledProcessError as e:
        sys.stderr.write(f"build failed: {' '.join(e.cmd)}\n{e.stdout}{e.stderr}")
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
