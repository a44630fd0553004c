#!/usr/bin/env python3
"""Writes a GGUF with every tensor of another dequantized to f32, metadata unchanged, so llama.cpp
multiplies the same weight values in f32 (the reference for benches/results/*-q8-agreement.md).

    pip install gguf numpy    # or gguf-py from llama.cpp's tree on PYTHONPATH
    scripts/gguf-to-f32.py IN.gguf OUT.gguf
"""
import sys

import gguf
import numpy as np

src, dst = sys.argv[1], sys.argv[2]
r = gguf.GGUFReader(src)
arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()
w = gguf.GGUFWriter(dst, arch=arch, endianess=r.endianess)
for f in r.fields.values():
    if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith('GGUF.'):
        continue
    vt = f.types[0]
    st = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
    if f.name == "general.file_type":
        w.add_key_value(f.name, 0, vt); continue
    w.add_key_value(f.name, f.contents(), vt, sub_type=st)
datas = []
for t in r.tensors:
    x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    datas.append(x)
    w.add_tensor_info(t.name, x.shape, x.dtype, x.nbytes, gguf.GGMLQuantizationType.F32)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file()
for x in datas:
    w.write_tensor_data(x)
w.close()
print("wrote", dst)
