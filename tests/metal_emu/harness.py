"""Run a Metal kernel of `dla_mlx.ops.metal` on the CPU: the emulation harness of the Metal kernels.

`emulate(launch)` takes a `dla_mlx.ops.metal.Launch` exactly as `dla_mlx.ops.metal.run` hands it to
``mx.fast.metal_kernel`` and does what MLX does around the kernel body: it writes the signature MLX
generates (template parameters, ``const device`` / ``const constant`` inputs, ``device`` outputs, the
thread-position attributes that the body names), compiles the header and body with the system C++
compiler against `metal_shim.h`, and runs the launch's grid, one OS thread per GPU thread. Outputs are
poisoned (NaN, or the largest integer) first, as MLX leaves them uninitialized.

What this proves: indexing, arithmetic and synchronization (a missing barrier races, a wrong index reads
the wrong element). What only a Mac proves: that Apple's compiler accepts the source, and speed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from dla_mlx.ops import metal

SHIM = Path(__file__).with_name("metal_shim.h")
CACHE = Path(os.environ.get("DLA_METAL_EMU_CACHE", Path(tempfile.gettempdir()) / "dla_metal_emu"))
MAX_CONSTANT_ARRAY = 8  # MLX passes smaller inputs in the constant address space
TYPES = {mx.float32: ("float", np.float32), mx.float16: ("half", np.float16), mx.bfloat16: ("bfloat16_t", np.uint16),
         mx.int64: ("int64_t", np.int64), mx.int32: ("int", np.int32), mx.int16: ("int16_t", np.int16),
         mx.uint32: ("uint32_t", np.uint32), mx.uint8: ("uint8_t", np.uint8), mx.bool_: ("bool", np.bool_)}
SCALARS = {bool: ("bool", np.bool_), int: ("int", np.int32), float: ("float", np.float32)}
# Metal attribute: (C++ type, field of dla_emu::Thread or an expression of the launch)
ATTRIBUTES = {
    "thread_position_in_grid": ("uint3", "dla_emu::self.grid_pos"),
    "threadgroup_position_in_grid": ("uint3", "dla_emu::self.group_pos"),
    "thread_position_in_threadgroup": ("uint3", "dla_emu::self.pos_in_group"),
    "thread_index_in_threadgroup": ("uint", "dla_emu::self.index_in_group"),
    "thread_index_in_simdgroup": ("uint", "dla_emu::self.lane"),
    "simdgroup_index_in_threadgroup": ("uint", "dla_emu::self.simdgroup"),
    "threads_per_threadgroup": ("uint3", "uint3{{{tx}, {ty}, {tz}}}"),
    "threads_per_grid": ("uint3", "uint3{{{gx}, {gy}, {gz}}}"),
    "threadgroups_per_grid": ("uint3", "uint3{{{gx} / {tx}, {gy} / {ty}, {gz} / {tz}}}"),
    "threads_per_simdgroup": ("uint", "32u"),
}
# Builtins MLX knows that the shim does not emulate: a kernel naming one fails here instead of passing.
UNSUPPORTED = ("quadgroup", "dispatch_", "grid_origin", "grid_size", "thread_execution_width",
               "simdgroups_per_threadgroup")
DECLARATION = re.compile(r"\bthreadgroup\s+([A-Za-z_]\w*)\s+([A-Za-z_]\w*)\s*\[([^\]]+)\]\s*;")


def translate(launch: metal.Launch, header: str, body: str) -> str:
    """The C++ translation unit for one launch: shim, header, the kernel with MLX's signature, a launcher."""
    for name in UNSUPPORTED:
        if name in body:
            raise NotImplementedError(f"the Metal emulation harness does not emulate {name!r} (kernel {launch.name})")
    input_names, output_names = metal.NAMES[launch.name]
    params, args = [], []
    for i, (name, x) in enumerate(zip(input_names, launch.inputs)):
        if any(f"{name}_{suffix}" in body for suffix in ("shape", "strides", "ndim")):
            raise NotImplementedError(f"the harness does not pass {name}_shape / _strides / _ndim")
        if isinstance(x, mx.array):
            space = "constant" if x.size < MAX_CONSTANT_ARRAY else "device"
            params.append(f"const {space} {TYPES[x.dtype][0]}* {name}")
            args.append(f"static_cast<const {TYPES[x.dtype][0]}*>(buffers[{i}])")
        else:
            ctype = SCALARS[type(x)][0]
            params.append(f"const constant {ctype}& {name}")
            args.append(f"*static_cast<const {ctype}*>(buffers[{i}])")
    for i, (name, dtype) in enumerate(zip(output_names, launch.output_dtypes), start=len(input_names)):
        params.append(f"device {TYPES[dtype][0]}* {name}")
        args.append(f"static_cast<{TYPES[dtype][0]}*>(buffers[{i}])")
    (gx, gy, gz), (tx, ty, tz) = launch.grid, launch.threadgroup
    for attr, (ctype, value) in ATTRIBUTES.items():
        if attr in body:
            params.append(f"{ctype} {attr}")
            args.append(value.format(gx=gx, gy=gy, gz=gz, tx=tx, ty=ty, tz=tz))
    kinds = ", ".join(f"{'bool' if isinstance(v, bool) else 'int'} {n}" for n, v in launch.template)
    values = ", ".join(str(v).lower() if isinstance(v, bool) else str(int(v)) for _, v in launch.template)
    # Threadgroup arrays become the group's block of emulated threadgroup memory.
    body = DECLARATION.sub(lambda m: f"auto& {m[2]} = dla_emu::threadgroup_memory<{m[1]}[{m[3]}]>({m.start()});",
                           body)
    sep = ",\n    "
    return (f'#include "{SHIM.name}"\n{header}\n'
            f"template <{kinds}>\nvoid {launch.name}(\n    {sep.join(params)}) {{\n{body}\n}}\n\n"
            f'extern "C" void launch(void** buffers) {{\n'
            f"  dla_emu::run_grid(uint3{{{gx}, {gy}, {gz}}}, uint3{{{tx}, {ty}, {tz}}}, [&] {{\n"
            f"    {launch.name}<{values}>(\n        {(',' + chr(10) + '        ').join(args)});\n  }});\n}}\n")


def compile_source(cpp: str) -> ctypes.CDLL:
    """Compile (once per distinct source, cached on disk) and load."""
    CACHE.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256((cpp + SHIM.read_text()).encode()).hexdigest()[:20]
    lib = CACHE / f"{key}.so"
    if not lib.exists():
        src = CACHE / f"{key}.cpp"
        src.write_text(cpp)
        tmp = CACHE / f"{key}.{os.getpid()}.so"
        result = subprocess.run(["c++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{SHIM.parent}",
                                 "-o", str(tmp), str(src)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"the kernel does not compile under the Metal shim ({src}):\n{result.stderr[-4000:]}")
        tmp.replace(lib)
    return ctypes.CDLL(str(lib))


def emulate(launch: metal.Launch, edit=None) -> list:
    """Run ``launch`` on the CPU; returns its outputs as MLX arrays, as `dla_mlx.ops.metal.run` does.

    ``edit(header, body) -> (header, body)`` changes the sources first (to show that a broken kernel fails).
    """
    header, body = metal.source(metal.HEADER), metal.source(f"{launch.name}.metal")
    if edit is not None:
        header, body = edit(header, body)
    lib = compile_source(translate(launch, header, body))
    buffers = []
    for x in launch.inputs:
        if isinstance(x, mx.array):
            buffers.append(np.ascontiguousarray(np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)))
        else:
            buffers.append(np.array([x], SCALARS[type(x)][1]))
    outputs = []
    for shape, dtype in zip(launch.output_shapes, launch.output_dtypes):
        np_dtype = TYPES[dtype][1]
        poison = np.nan if np.issubdtype(np_dtype, np.floating) and dtype != mx.bfloat16 else (
            np.iinfo(np_dtype).max if np.issubdtype(np_dtype, np.integer) else True)
        outputs.append(np.full(shape, poison, np_dtype))
    pointers = (ctypes.c_void_p * (len(buffers) + len(outputs)))(*(a.ctypes.data for a in buffers + outputs))
    lib.launch(pointers)
    return [mx.array(o).view(mx.bfloat16) if d == mx.bfloat16 else mx.array(o)
            for o, d in zip(outputs, launch.output_dtypes)]
