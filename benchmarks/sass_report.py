"""The machine code of one kernel source, kernel by kernel, against another git revision's.

    python benchmarks/sass_report.py [--file int4_gemv_fold.cu] [--base main] [--filter REGEX] [--arch 90a]

For each kernel: registers and spill bytes (ptxas), instructions, and the main loop's length, i.e.
the instructions from its first to its last tensor-core MMA (HMMA). The decode kernels are bound
by each warp's chain of instructions (csrc/NOTES.md, sessions 7-10), so a longer main loop costs
time. In session 22 a kernel that held two norm forms behind a runtime branch grew its main loop
from 837 to 1036 instructions, and 7B's batch-1 decode ran 23% slower. The device machine is
scarce; this reads the code on the CPU before a change goes there. --base compiles the same file
from that revision's csrc/ (`git archive`) with the same flags; a kernel present on one side only
shows "-" on the other.

Needs nvcc (as awq_compile.build_kernels) and cuobjdump with nvdisasm beside it or on PATH:
$CUDA_HOME/bin, PATH, or the PyPI wheels `nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm` (both
install into nvidia/cu13/bin); c++filt for readable names where installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from awq_compile import build_kernels  # noqa: E402  (after the path: a bare checkout works too)

_FUNC = re.compile(r"Function : (\S+)")
_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_ENTRY = re.compile(r"Compiling entry function '(\S+)'")
_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores")


def parse_sass(text: str) -> dict[str, list[str]]:
    """{mangled kernel name: its opcodes in order} from `cuobjdump -sass` output."""
    out: dict[str, list[str]] = {}
    cur = None
    for line in text.splitlines():
        m = _FUNC.search(line)
        if m:
            cur = m.group(1)
            out[cur] = []
            continue
        m = _INSN.search(line)
        if cur is not None and m:
            out[cur].append(m.group(1))
    return out


def parse_ptxas(text: str) -> dict[str, tuple[int, int]]:
    """{mangled kernel name: (registers, spill-store bytes)} from `ptxas -v` output."""
    out: dict[str, tuple[int, int]] = {}
    cur, spill = None, 0
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur, spill = m.group(1), 0
            continue
        m = _SPILL.search(line)
        if m and cur is not None:
            spill = int(m.group(1))
        m = _REGS.search(line)
        if m and cur is not None:
            out[cur] = (int(m.group(1)), spill)
    return out


def main_loop(opcodes: list[str]) -> int | None:
    """Instructions from the first HMMA to the last (None without one)."""
    at = [i for i, op in enumerate(opcodes) if op == "HMMA"]
    return at[-1] - at[0] if at else None


def stable_names(mangled: list[str]) -> dict[str, str]:
    """{mangled: a name that two builds of one file give a kernel alike}: c++filt's, shortened,
    where installed, else the mangled name without its anonymous namespace's per-file hash."""
    tool = shutil.which("c++filt")
    if tool is not None:
        out = subprocess.run([tool], input="\n".join(mangled), capture_output=True, text=True).stdout.splitlines()
        if len(out) == len(mangled):
            return {m: re.sub(r"awq::\(anonymous namespace\)::|\(awq::.*\)$|^void ", "", o) for m, o in zip(mangled, out)}
    return {m: re.sub(r"_GLOBAL__N__[0-9a-f]+_", "_GLOBAL__N_", m) for m in mangled}


def _cuobjdump() -> str:
    """cuobjdump where build_kernels finds CUDA programs, else in the PyPI wheel's nvidia/cu*/bin."""
    found = build_kernels.find_cuda_tool("cuobjdump")
    spec = importlib.util.find_spec("nvidia")
    if found is None and spec is not None:
        found = next((str(c) for base in spec.submodule_search_locations or ()
                      for c in sorted(Path(base).glob("cu*/bin/cuobjdump"))), None)
    if found is None:
        raise SystemExit("sass_report: cuobjdump not found (CUDA_HOME, PATH, or pip install nvidia-cuda-cuobjdump)")
    return found


def _disassemble(obj: Path) -> str:
    """`cuobjdump -sass obj`, with cuobjdump's folder on PATH (it runs nvdisasm, which the PyPI
    wheel nvidia-cuda-nvdisasm installs beside it); its own message if it fails."""
    tool = _cuobjdump()
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(tool).parent), os.environ.get("PATH", "")]))
    r = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"sass_report: {tool} -sass failed: {r.stderr.strip() or r.stdout.strip()}"
                         " (nvdisasm missing? pip install nvidia-cuda-nvdisasm)")
    return r.stdout


def compile_report(csrc: Path, file: str, arch: str) -> dict[str, tuple]:
    """{stable name: (registers, spill bytes, instructions, main loop)} of csrc/file for sm_<arch>."""
    nvcc = build_kernels.find_nvcc()
    if nvcc is None:
        raise SystemExit("sass_report: nvcc not found")
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "k.o"
        cmd = build_kernels.nvcc_command(nvcc, csrc / file, obj, (arch,), "gemm_sm90" in file, ("-Xptxas", "-v"))
        ptxas = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
        sass = _disassemble(obj)
    regs = parse_ptxas(ptxas)
    code = parse_sass(sass)
    names = stable_names(sorted(code))
    return {names[k]: (*regs.get(k, (None, None)), len(ops), main_loop(ops)) for k, ops in code.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default="int4_gemv_fold.cu", help="a source in csrc/")
    ap.add_argument("--base", default=None, help="a git revision to compare with (e.g. main)")
    ap.add_argument("--filter", default="", help="only kernels whose readable name matches this regex")
    ap.add_argument("--arch", default="90a")
    args = ap.parse_args(argv)
    new = compile_report(ROOT / "csrc", args.file, args.arch)
    base: dict[str, tuple] = {}
    if args.base:
        with tempfile.TemporaryDirectory() as tmp:
            blob = subprocess.run(["git", "-C", str(ROOT), "archive", args.base, "csrc"], check=True,
                                  capture_output=True).stdout
            with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
                tar.extractall(tmp, filter="data")
            base = compile_report(Path(tmp) / "csrc", args.file, args.arch)
    names = sorted(set(new) | set(base))
    print(f"| kernel | registers | spill bytes | instructions | main loop |  ({args.file}, sm_{args.arch}"
          + (f", {args.base} -> working tree)" if args.base else ")"))
    print("|---|---|---|---|---|")

    def fmt(i: int, name: str) -> str:
        sides = (base, new) if args.base else (new,)
        return " -> ".join("-" if d.get(name) is None else str(d[name][i]) for d in sides)

    for name in names:
        if args.filter and not re.search(args.filter, name):
            continue
        print(f"| {name} | " + " | ".join(fmt(i, name) for i in range(4)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
