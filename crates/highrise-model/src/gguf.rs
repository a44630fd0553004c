//! GGUF: llama.cpp's single-file model format. A header, typed key/value metadata, a table of tensors
//! (name, dims, ggml type, offset) and the aligned tensor data, all memory-mapped. Every offset and
//! length is checked against the file, so a truncated or corrupt file is an error naming it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use highrise_core::DType;
use memmap2::Mmap;

use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Array),
}

/// A metadata array, kept as compactly as the file holds it: a vocabulary of 49k strings or a
/// million scores costs about what it takes in the file, never 32 bytes an element.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
    Array(Vec<Array>),
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as strings, if it is an array of strings.
    pub fn strings(&self) -> Option<&[String]> {
        match self {
            Array::String(v) => Some(v),
            _ => None,
        }
    }

    /// The elements as f32, if it is an array of floats (SentencePiece scores).
    pub fn f32s(&self) -> Option<Vec<f32>> {
        match self {
            Array::F32(v) => Some(v.clone()),
            Array::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            _ => None,
        }
    }

    /// The elements as non-negative integers, if it is an array of integers and all are.
    pub fn u64s(&self) -> Option<Vec<u64>> {
        fn all<T: Copy>(v: &[T], f: impl Fn(T) -> Option<u64>) -> Option<Vec<u64>> {
            v.iter().map(|&x| f(x)).collect()
        }
        match self {
            Array::U8(v) => all(v, |x| Some(x as u64)),
            Array::U16(v) => all(v, |x| Some(x as u64)),
            Array::U32(v) => all(v, |x| Some(x as u64)),
            Array::U64(v) => all(v, Some),
            Array::I8(v) => all(v, |x| u64::try_from(x).ok()),
            Array::I16(v) => all(v, |x| u64::try_from(x).ok()),
            Array::I32(v) => all(v, |x| u64::try_from(x).ok()),
            Array::I64(v) => all(v, |x| u64::try_from(x).ok()),
            _ => None,
        }
    }
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major dims, outermost first (GGUF stores them innermost first; they are reversed here).
    pub dims: Vec<usize>,
    pub dtype: DType,
    /// Byte range in the file.
    pub start: usize,
    pub len: usize,
}

/// A parsed, memory-mapped GGUF file.
pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    mmap: Arc<Mmap>,
}

/// ggml's type numbers for the types highrise reads.
fn ggml_dtype(t: u32) -> Option<DType> {
    Some(match t {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Q4_0,
        3 => DType::Q4_1,
        8 => DType::Q8_0,
        12 => DType::Q4K,
        14 => DType::Q6K,
        30 => DType::BF16,
        _ => return None,
    })
}

fn ggml_type_name(t: u32) -> String {
    let names = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K",
        "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S",
        "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    names.get(t as usize).map_or_else(|| format!("type {t}"), |n| n.to_string())
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is mapped read-only; highrise never writes to a model file it reads.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut r = Reader { buf: &mmap, pos: 0, path };
        let magic = r.bytes(4, "magic")?;
        if magic != MAGIC {
            return Err(r.fail(format!("not a GGUF file (magic {magic:?}, expected \"GGUF\")")));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(r.fail(format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each entry takes at least 8 bytes: counts beyond the file size are corruption.
        if n_tensors > mmap.len() as u64 / 8 || n_kv > mmap.len() as u64 / 8 {
            return Err(r.fail(format!("header claims {n_tensors} tensors and {n_kv} metadata entries")));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key {i}"))?;
            let ty = r.u32(&format!("type of metadata {key}"))?;
            let v = r.value(ty, &key)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(r.fail(format!("metadata {key} appears twice")));
            }
        }
        let mut raw = Vec::new();
        for i in 0..n_tensors {
            let name = r.string(&format!("name of tensor {i}"))?;
            let n_dims = r.u32(&format!("rank of tensor {name}"))?;
            if n_dims == 0 || n_dims > 4 {
                return Err(r.fail(format!("tensor {name}: {n_dims} dimensions")));
            }
            let mut dims = Vec::new();
            for _ in 0..n_dims {
                dims.push(r.u64(&format!("dims of tensor {name}"))? as usize);
            }
            dims.reverse();
            let ty = r.u32(&format!("type of tensor {name}"))?;
            let offset = r.u64(&format!("offset of tensor {name}"))?;
            raw.push((name, dims, ty, offset));
        }
        let alignment = metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(32) as usize;
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(r.fail(format!("general.alignment {alignment} is not a power of two")));
        }
        let data_start = r.pos.next_multiple_of(alignment);
        let mut tensors = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (name, dims, ty, offset) in raw {
            if !seen.insert(name.clone()) {
                return Err(Error::Tensor { path: path.to_path_buf(), tensor: name, detail: "appears twice in the tensor table".into() });
            }
            if offset % alignment as u64 != 0 {
                return Err(Error::Tensor {
                    path: path.to_path_buf(),
                    tensor: name,
                    detail: format!("data offset {offset} is not a multiple of the file's alignment {alignment}"),
                });
            }
            let dtype = ggml_dtype(ty).ok_or_else(|| Error::Tensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                detail: format!(
                    "quantization type {} is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K are)",
                    ggml_type_name(ty)
                ),
            })?;
            let fail = |detail: String| Error::Tensor { path: path.to_path_buf(), tensor: name.clone(), detail };
            let numel = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let row_ok = dims.last().is_some_and(|&c| c % dtype.block_len() == 0);
            let len = match numel.and_then(|n| dtype.storage_bytes(n)) {
                Some(len) if row_ok => len,
                _ => return Err(fail(format!("shape {dims:?} does not fit {dtype} blocks"))),
            };
            let start = (data_start as u64).checked_add(offset);
            match start.and_then(|s| s.checked_add(len as u64)) {
                Some(end) if end <= mmap.len() as u64 => {}
                _ => {
                    return Err(fail(format!(
                        "data at offset {offset} (+{len} bytes) lies past the end of the file ({} bytes): \
                         the file is truncated or corrupt",
                        mmap.len()
                    )))
                }
            }
            tensors.push(TensorInfo { name, dims, dtype, start: start.unwrap() as usize, len });
        }
        Ok(Gguf { path: path.to_path_buf(), version, metadata, tensors, mmap: Arc::new(mmap) })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of a tensor, in the file's layout.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.start..t.start + t.len]
    }

    pub fn mmap(&self) -> &Arc<Mmap> {
        &self.mmap
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn fail(&self, detail: String) -> Error {
        Error::Format { path: self.path.to_path_buf(), detail }
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.buf.len() => {
                let b = &self.buf[self.pos..end];
                self.pos = end;
                Ok(b)
            }
            _ => Err(self.fail(format!(
                "truncated: {what} needs {n} bytes at offset {}, the file has {}",
                self.pos,
                self.buf.len()
            ))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.bytes(N, what)?.try_into().unwrap())
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).map_err(|_| self.fail(format!("{what}: length {len}")))?;
        let b = self.bytes(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.fail(format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 => Value::Array(self.array_value(key, 0)?),
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            _ => return Err(self.fail(format!("metadata {key}: unknown value type {ty}"))),
        })
    }

    /// An array (its element type and count, then the elements), nested at most `MAX_NESTING`
    /// deep. The count is checked against the bytes left at the smallest size an element of its
    /// type takes, before anything is allocated: a count in a small file cannot buy large memory.
    fn array_value(&mut self, key: &str, depth: u32) -> Result<Array> {
        const MAX_NESTING: u32 = 3;
        let ety = self.u32(key)?;
        let n = self.u64(key)?;
        let min_size: u64 = match ety {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            _ => return Err(self.fail(format!("metadata {key}: array of unknown value type {ety}"))),
        };
        let left = (self.buf.len() - self.pos) as u64;
        if n.checked_mul(min_size).is_none_or(|b| b > left) {
            return Err(self.fail(format!(
                "metadata {key}: an array of {n} items of type {ety} needs at least {} bytes, the file has {left} left \
                 (truncated or corrupt)",
                n.saturating_mul(min_size)
            )));
        }
        if ety == 9 && depth + 1 >= MAX_NESTING {
            return Err(self.fail(format!("metadata {key}: arrays nested deeper than {MAX_NESTING}")));
        }
        let n = n as usize;
        fn many<T>(n: usize, mut f: impl FnMut() -> Result<T>) -> Result<Vec<T>> {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(f()?);
            }
            Ok(v)
        }
        Ok(match ety {
            0 => Array::U8(self.bytes(n, key)?.to_vec()),
            1 => Array::I8(self.bytes(n, key)?.iter().map(|&b| b as i8).collect()),
            2 => Array::U16(many(n, || Ok(u16::from_le_bytes(self.array(key)?)))?),
            3 => Array::I16(many(n, || Ok(i16::from_le_bytes(self.array(key)?)))?),
            4 => Array::U32(many(n, || self.u32(key))?),
            5 => Array::I32(many(n, || Ok(i32::from_le_bytes(self.array(key)?)))?),
            6 => Array::F32(many(n, || Ok(f32::from_le_bytes(self.array(key)?)))?),
            7 => Array::Bool(self.bytes(n, key)?.iter().map(|&b| b != 0).collect()),
            8 => Array::String(many(n, || self.string(key))?),
            9 => Array::Array(many(n, || self.array_value(key, depth + 1))?),
            10 => Array::U64(many(n, || self.u64(key))?),
            11 => Array::I64(many(n, || Ok(i64::from_le_bytes(self.array(key)?)))?),
            _ => Array::F64(many(n, || Ok(f64::from_le_bytes(self.array(key)?)))?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_read_as_integers_and_strings_where_they_are() {
        assert_eq!(Array::I32(vec![1, 4, 3]).u64s(), Some(vec![1, 4, 3]));
        assert_eq!(Array::I32(vec![1, -1]).u64s(), None, "a negative token type is not a type");
        assert_eq!(Array::F32(vec![1.0]).u64s(), None);
        let s = Array::String(vec!["a".into(), "b".into()]);
        assert_eq!((s.len(), s.strings().map(|v| v.len())), (2, Some(2)));
        assert!(Array::U8(Vec::new()).is_empty());
        assert_eq!(ggml_type_name(6), "Q5_0");
        assert_eq!(ggml_type_name(400), "type 400");
        assert_eq!(ggml_dtype(14), Some(DType::Q6K));
    }
}
