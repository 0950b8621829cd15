"""What nvcc makes of csrc/: properties of the sm_90 (and sm_80) PTX and SASS that a CPU can check.

* NaN propagation: clipping compiles to ``min.NaN.f32`` / ``max.NaN.f32`` (SASS ``FMNMX.NAN``), and
  no kernel has a plain ``min.f32`` / ``max.f32``, which return the non-NaN operand.
* 16-byte accesses: no kernel stores (or loads) 16 bytes as several narrower accesses to one
  16-byte block (nvcc 13 split the fp16/bf16 ``uint4`` stores of ``store8`` into four ``STG.E``).
* Capped grids: every kernel launched with ``grid_for`` (at most 2^20 blocks) has a grid-stride
  loop (reads ``%nctaid.x``), or the elements past 2^20 blocks are never written.
* Launch shapes (csrc/launch_shapes.h, through the extension): block counts for EDM2 shapes.

The .cu files are compiled alone (``nvcc -ptx``, then ``ptxas``) with the extension's flags, once
per session; SASS comes from ``cuobjdump`` (the ``nvidia-cuda-cuobjdump`` package of the ``test``
extra, or the toolkit's). Without nvcc or cuobjdump the tests skip and say why.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from mpkernels.cuda import _build

CU_FILES = _build.CUDA_SOURCES


# ------------------------------------------------------------------------------------------------
# Tools and compilation (once per session)

def _nvcc() -> str | None:
    home = _build.find_cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA toolkit, or the nvidia-cuda-cuobjdump wheel (nvidia/cu*/bin)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = _build.find_cuda_home()
    cands = [os.path.join(home, "bin", "cuobjdump")] if home else []
    for base in sys.path:
        cands += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "bin", "cuobjdump")), reverse=True)
        cands += glob.glob(os.path.join(base, "nvidia", "cuda_cuobjdump", "bin", "cuobjdump"))
    return next((c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def nvcc_flags() -> list[str]:
    """The extension's nvcc flags (csrc/ build): its own plus PyTorch's common ones."""
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    except ImportError:  # pragma: no cover - older torch
        COMMON_NVCC_FLAGS = []
    return list(_build.NVCC_FLAGS) + list(COMMON_NVCC_FLAGS) + ["-std=c++17", "-I", _build.CSRC]


class Compiled:
    """PTX and SASS of each .cu file for one architecture, split per kernel (mangled name)."""

    def __init__(self, arch: str, out_dir: str):
        nvcc = _nvcc()
        if nvcc is None or not os.path.isfile(nvcc):
            pytest.skip("nvcc (the CUDA toolkit) is not here: cannot inspect the compiled kernels")
        cuobjdump = find_cuobjdump()
        if cuobjdump is None:
            pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump, part of the 'test' extra)")
        ptxas = os.path.join(os.path.dirname(nvcc), "ptxas")
        self.arch = arch
        self.ptx, self.sass = {}, {}
        procs = {}
        for f in CU_FILES:  # front ends in parallel: the slow part
            ptx = os.path.join(out_dir, f"{f}.{arch}.ptx")
            cmd = [nvcc, *nvcc_flags(), "-ptx", f"-arch={arch}", "-o", ptx, os.path.join(_build.CSRC, f)]
            procs[f] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), ptx)
        for f, (p, ptx) in procs.items():
            out = p.communicate(timeout=900)[0]
            assert p.returncode == 0, f"nvcc -ptx {f} failed:\n{out[-4000:]}"
            cubin = ptx[:-4] + ".cubin"
            r = subprocess.run([ptxas, f"-arch={arch}", "-O3", ptx, "-o", cubin], capture_output=True, text=True,
                               timeout=900)
            assert r.returncode == 0, f"ptxas {f} failed:\n{r.stderr[-4000:]}"
            # cuobjdump -sass runs nvdisasm: the wheel puts it next to cuobjdump, which may not be on PATH
            env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(cuobjdump), os.environ.get("PATH", "")]))
            r = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, timeout=300, env=env)
            assert r.returncode == 0, f"cuobjdump {cubin} failed:\n{r.stderr[-2000:]}"
            with open(ptx) as fh:
                self.ptx[f] = split_ptx(fh.read())
            self.sass[f] = split_sass(r.stdout)

    def kernels(self, pattern: str, kind: str = "sass") -> dict[str, str]:
        table = self.sass if kind == "sass" else self.ptx
        return {name: body for funcs in table.values() for name, body in funcs.items() if re.search(pattern, name)}


def split_ptx(text: str) -> dict[str, str]:
    """{mangled kernel name: body} of the .entry functions of a PTX file."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\S+)\s*\(", text):
        end = text.find("\n}", m.end())
        out[m.group(1)] = text[m.end():end]
    return out


def split_sass(text: str) -> dict[str, str]:
    parts = re.split(r"\n\s*Function : (\S+)\n", text)
    return dict(zip(parts[1::2], parts[2::2]))


_CACHE: dict[str, Compiled] = {}


def compiled(arch: str, tmp_path_factory) -> Compiled:
    if arch not in _CACHE:
        _CACHE[arch] = Compiled(arch, str(tmp_path_factory.mktemp(f"codegen_{arch}")))
    return _CACHE[arch]


@pytest.fixture(scope="session")
def sm90(tmp_path_factory):
    return compiled("sm_90", tmp_path_factory)


ARCHES = ["sm_90", pytest.param("sm_80", marks=pytest.mark.slow)]


# ------------------------------------------------------------------------------------------------
# SASS / PTX analysis helpers

_ACCESS = re.compile(r"\b(STG|LDG)\.E((?:\.[A-Z0-9]+)*)\s+(?:desc\[[^\]]*\])?\[(R\d+)(?:\.64)?(?:\+(0x[0-9a-f]+|-0x[0-9a-f]+))?\]")
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def split_16B_accesses(sass: str, op: str) -> list[str]:
    """Narrow global accesses (`op` = STG / LDG) that together cover a whole 16-byte-aligned block
    at one base register: a 16-byte access the compiler split into pieces."""
    by_base = collections.defaultdict(set)
    for m in _ACCESS.finditer(sass):
        if m.group(1) != op:
            continue
        mods = [x for x in m.group(2).split(".") if x]
        width = next((_WIDTH[x] for x in mods if x in _WIDTH), 4)
        if width >= 16:
            continue
        off = int(m.group(4), 16) if m.group(4) else 0
        by_base[(m.group(3), width)].add(off)
    found = []
    for (reg, width), offs in by_base.items():
        for o in offs:
            if o % 16 == 0 and all(o + k in offs for k in range(0, 16, width)):
                found.append(f"{16 // width} x {width}-byte {op} at [{reg}+{o:#x}]")
    return found


def demangle_short(name: str) -> str:
    m = re.search(r"(\d+)([a-z_]+_kernel|pixel_norm_[a-z_]+|map_kernel)I?(.*)", name)
    return (m.group(2) + "<" + m.group(3)[:60] + ">") if m else name[:80]


# ------------------------------------------------------------------------------------------------
# NaN propagation

@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_clip_is_nan_propagating_min_max(arch, tmp_path_factory):
    """mp_sum_clip's clamp is max.NaN / min.NaN (FMNMX.NAN): a NaN stays NaN, as with torch.clamp."""
    c = compiled(arch, tmp_path_factory)
    fwd = c.kernels(r"MpSumClipFwdOp", "ptx")
    assert len(fwd) == 3, sorted(fwd)  # fp32, fp16, bf16
    for name, body in fwd.items():
        assert "max.NaN.f32" in body and "min.NaN.f32" in body, f"{demangle_short(name)}: clip without NaN min/max"
    for name, body in c.kernels(r"MpSumClipFwdOp", "sass").items():
        assert re.search(r"FMNMX\.NAN\b", body), f"{demangle_short(name)}: no FMNMX.NAN in the SASS"


@pytest.mark.slow
def test_no_kernel_uses_nan_dropping_min_max(sm90):
    """fminf / fmaxf (min.f32 / max.f32, FMNMX without .NAN) return the non-NaN operand: none anywhere."""
    bad = []
    for kind in ("ptx", "sass"):
        for name, body in sm90.kernels(".", kind).items():
            if kind == "ptx":
                hits = re.findall(r"\b(?:min|max)(?:\.ftz)?\.f(?:16|32|64)\b", body)
            else:
                hits = [h for h in re.findall(r"\bFMNMX(?:\.[A-Z0-9]+)*", body) if ".NAN" not in h]
            if hits:
                bad.append(f"{kind} {demangle_short(name)}: {sorted(set(hits))}")
    assert not bad, "NaN-dropping min/max in:\n" + "\n".join(bad)


# ------------------------------------------------------------------------------------------------
# 16-byte accesses

# Kernels whose vector path (U = 8) stores fp16/bf16 through store8: the ones the review found split.
VECTOR_KERNELS = [r"modulated_fwd_kernel", r"modulated_bwd_rows_kernel", r"modulated_bwd_pixels_kernel",
                  r"pixel_norm_fwd_cfirst", r"pixel_norm_fwd_apply_cfirst", r"pixel_norm_bwd_cfirst",
                  r"pixel_norm_bwd_apply_cfirst", r"pixel_norm_fwd_clast", r"pixel_norm_bwd_clast"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_16_byte_stores_are_single_instructions(arch, tmp_path_factory):
    """fp16/bf16 16-byte stores are one STG.E.128, never four STG.E (or any split of a 16-byte block)."""
    c = compiled(arch, tmp_path_factory)
    bad, checked = [], 0
    for name, body in c.kernels(".").items():
        for op in ("STG", "LDG"):
            for hit in split_16B_accesses(body, op):
                bad.append(f"{demangle_short(name)}: {hit}")
    for pat in VECTOR_KERNELS:
        for dtype in ("6__half", "13__nv_bfloat16"):
            ks = c.kernels(pat + r"I" + dtype + r"(?:Lb[01]E)?Li8E")  # U = 8: the vector path
            assert ks, f"no {pat}<{dtype}, 8> kernel in the {arch} code"
            for name, body in ks.items():
                checked += 1
                assert re.search(r"\bSTG\.E\.128\b", body), f"{demangle_short(name)}: no 128-bit store"
    assert checked >= 2 * len(VECTOR_KERNELS)
    assert not bad, "16-byte accesses split into narrower ones:\n" + "\n".join(bad)


def test_split_detector_finds_a_split_store():
    """The detector above on SASS lines as nvcc 13 wrote them for the old store8."""
    old = """
        STG.E desc[UR12][R10.64], R7 ;
        STG.E desc[UR12][R10.64+0x4], R13 ;
        STG.E desc[UR12][R10.64+0x8], R9 ;
        STG.E desc[UR12][R10.64+0xc], R15 ;
        STG.E desc[UR12][R4.64], R1 ;
        STG.E.U16 desc[UR12][R2.64+0x10], R1 ;
    """
    assert split_16B_accesses(old, "STG") == ["4 x 4-byte STG at [R10+0x0]"]
    assert split_16B_accesses("STG.E.128 desc[UR12][R10.64], R4 ;", "STG") == []


# ------------------------------------------------------------------------------------------------
# Capped grids need grid-stride loops

def grid_for_kernels(source: str) -> set[str]:
    """Names of the kernels a .cu file launches with a grid from grid_for (directly, or through a
    variable assigned from it in the same function)."""
    names = set()
    for fn in re.split(r"\n\}", source):  # top-level functions end with a '}' in column 0
        capped_vars = set(re.findall(r"(\w+)\s*=\s*grid_for\(", fn))
        for m in re.finditer(r"(\w+)(?:<[^<>;]*(?:<[^<>;]*>[^<>;]*)*>)?\s*<<<\s*([^,>]+)", fn):
            grid = m.group(2).strip()
            if grid.startswith("grid_for(") or grid in capped_vars:
                names.add(m.group(1))
    return names


@pytest.mark.slow
def test_kernels_on_capped_grids_loop_over_the_grid(sm90):
    """grid_for caps a grid at 2^20 blocks: each kernel launched with it must stride by the grid
    (read %nctaid.x), or entries past 2^20 blocks stay unwritten (modulated_gc_sum_kernel did)."""
    launched = {}
    for f in CU_FILES:
        with open(os.path.join(_build.CSRC, f)) as fh:
            for k in grid_for_kernels(fh.read()):
                launched[k] = f
    assert {"map_kernel", "modulated_fwd_kernel", "modulated_gc_sum_kernel"} <= set(launched), launched
    for kernel, f in sorted(launched.items()):
        entries = {n: b for n, b in sm90.ptx[f].items() if re.search(rf"\d{kernel}(?:I|E)", n)}
        assert entries, f"{kernel}: not found in the PTX of {f}"
        for name, body in entries.items():
            assert "%nctaid.x" in body, f"{kernel} ({f}) is launched with grid_for but has no grid-stride loop"


def test_grid_for_caps_the_grid(cuda_backend):
    ext = cuda_backend.build()
    assert ext._grid_for(0, 256) == 1
    assert ext._grid_for(1000, 256) == 4
    assert ext._grid_for(2 ** 28 + 1, 256) == 2 ** 20  # capped: kernels must loop past it


# ------------------------------------------------------------------------------------------------
# Launch shapes of EDM2 shapes (csrc/launch_shapes.h through the extension), H100: 132 SMs

SMS = 132
H100_SMEM_BUDGET = min(232448, 233472 // 2 - 2048)  # opt-in per block, per SM / 2 - 2 KiB


@pytest.mark.parametrize("elem", [2, 4], ids=["16bit", "fp32"])
@pytest.mark.parametrize("forward", [True, False], ids=["fwd", "bwd"])
@pytest.mark.parametrize("res", [8, 16, 32, 64])
@pytest.mark.parametrize("C", [192, 256, 384, 512, 768, 1024])
def test_pixel_norm_nchw_grid_fills_the_gpu(cuda_backend, C, res, forward, elem):
    """EDM2 shapes at batch 32 get >= 2 waves of blocks on 132 SMs (or, for the smallest, every
    thread busy), channel chunks keep every channel group busy, and the tile fits shared memory."""
    ext = cuda_backend.build()
    N, L = 32, res * res
    p = ext._plan_pixel_norm_nchw(N, C, L, 8, elem, SMS, H100_SMEM_BUDGET, forward)
    groups = 256 // p["px"]
    busy = -(-N * C * (L // 8) // 256)
    assert p["blocks"] == N * p["tiles"] * p["splits"]
    assert p["tiles"] == -(-L // (8 * p["px"]))
    assert p["blocks"] >= min(2 * SMS, busy), p
    assert p["splits"] == 1 or p["chunk"] >= groups, p  # no idle channel group
    assert p["chunk"] * p["splits"] >= C > p["chunk"] * (p["splits"] - 1)
    assert p["px"] * 8 * elem >= 32, p  # whole 32-byte sectors per channel row
    if forward and p["splits"] == 1:
        assert p["cache"] and p["smem"] <= H100_SMEM_BUDGET, p  # x read once


def test_pixel_norm_nchw_plan_examples(cuda_backend):
    """The shapes the review measured: 32 blocks (8x8) and 128 blocks (16x16) before."""
    ext = cuda_backend.build()
    p = ext._plan_pixel_norm_nchw(32, 768, 64, 8, 2, SMS, H100_SMEM_BUDGET, True)
    assert p["blocks"] >= 264 and p["splits"] > 1
    p = ext._plan_pixel_norm_nchw(32, 768, 256, 8, 2, SMS, H100_SMEM_BUDGET, True)
    assert p["blocks"] >= 264
    # big images: one phase, the whole tile in shared memory
    p = ext._plan_pixel_norm_nchw(32, 1024, 4096, 8, 2, SMS, H100_SMEM_BUDGET, True)
    assert p["splits"] == 1 and p["cache"] and p["blocks"] >= 32 * 64
    # a tile that does not fit at 8 pixel threads gets narrower instead of reading x twice
    p = ext._plan_pixel_norm_nchw(32, 1024, 1024, 8, 2, SMS, H100_SMEM_BUDGET, True)
    assert p["px"] < 8 and p["cache"]
    with pytest.raises(ValueError, match="unit"):
        ext._plan_pixel_norm_nchw(32, 1024, 1024, 4, 2, SMS, H100_SMEM_BUDGET, True)


@pytest.mark.parametrize("res", [8, 16, 32, 64])
@pytest.mark.parametrize("C", [192, 1024])
def test_modulated_bwd_rows_use_their_threads(cuda_backend, C, res):
    """NCHW modulated_mp_silu backward: at most half of a row group's threads idle on EDM2 rows
    (was 120 of 128 at 8x8), and >= 2 waves of blocks on 132 SMs."""
    ext = cuda_backend.build()
    N, L = 32, res * res
    p = ext._plan_modulated_rows(N, C, L, 8)
    units = L // 8
    assert p["row_threads"] * p["rows_per_block"] == 128
    assert p["blocks"] == -(-N * C // p["rows_per_block"])
    assert units >= p["row_threads"] / 2 or p["row_threads"] == 8, p
    assert p["blocks"] >= 2 * SMS, p
    if res == 8:
        assert p["row_threads"] == 8 and p["rows_per_block"] == 16


@pytest.mark.slow
def test_modulated_bwd_rows_kernel_variants_compiled(sm90):
    """The row-group widths of plan_modulated_rows exist as kernels (8, 32, 128 threads per row),
    and the narrow ones reduce with warp shuffles."""
    rows = sm90.kernels(r"modulated_bwd_rows_kernel", "sass")
    for rt in (8, 32, 128):
        assert any(re.search(rf"Li{rt}EEEv", n) for n in rows), f"no modulated_bwd_rows_kernel with {rt} threads/row"
    for name, body in rows.items():
        if re.search(r"Li8EEEv", name):
            assert "SHFL.BFLY" in body, f"{demangle_short(name)}: no warp-shuffle reduction"


# ------------------------------------------------------------------------------------------------
# Device queries and kernel attributes: once per device, not per call


def test_device_queries_happen_once_per_device():
    """cudaDeviceGetAttribute / cudaFuncSetAttribute cost microseconds (more than a small kernel) and
    a per-call attribute change races between host threads: each sits inside a std::call_once."""
    calls = 0
    for f in sorted(os.listdir(_build.CSRC)):
        if not f.endswith((".cu", ".cuh", ".cpp", ".h")):
            continue
        with open(os.path.join(_build.CSRC, f)) as fh:
            lines = fh.read().split("\n")
        for i, line in enumerate(lines):
            if re.search(r"\bcuda(DeviceGetAttribute|GetDeviceProperties|FuncSetAttribute)\s*\(", line):
                calls += 1
                before = "\n".join(lines[max(0, i - 8):i])
                assert "std::call_once(" in before, f"{f}:{i + 1}: device query outside std::call_once: {line.strip()}"
    assert calls >= 2
