//! NumPy `.npy` files of little-endian float32, C order: what `highrise logits` and `highrise inspect`
//! write, and what the reference fixtures are.

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

pub fn write_f32(path: &Path, dims: &[usize], data: &[f32]) -> Result<()> {
    assert_eq!(dims.iter().product::<usize>(), data.len(), "npy: shape {dims:?} vs {} values", data.len());
    let shape = match dims {
        [d] => format!("({d},)"),
        _ => format!("({})", dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is padded to a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(&out).map_err(|e| Error::io(path, e))
}

/// Reads a float32 `.npy`: (dims, values).
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let fail = |d: &str| Error::Format { path: path.to_path_buf(), detail: format!("npy: {d}") };
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(fail("bad magic"));
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
    };
    let header = std::str::from_utf8(bytes.get(hstart..hstart + hlen).ok_or_else(|| fail("truncated header"))?)
        .map_err(|_| fail("header is not text"))?;
    if !header.contains("'descr': '<f4'") || header.contains("'fortran_order': True") {
        return Err(fail("only little-endian float32 in C order is read"));
    }
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| fail("no shape"))?;
    let dims: Vec<usize> =
        shape.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse().map_err(|_| fail("bad shape"))).collect::<Result<_>>()?;
    let data = &bytes[hstart + hlen..];
    let n: usize = dims.iter().product();
    if data.len() != n * 4 {
        return Err(fail(&format!("{} data bytes for shape {dims:?}", data.len())));
    }
    Ok((dims, data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn float32_arrays_come_back_as_written() {
        let path = std::env::temp_dir().join(format!("highrise-npy-{}.npy", std::process::id()));
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        super::write_f32(&path, &[2, 3, 4], &data).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        assert_eq!((bytes.len() - data.len() * 4) % 64, 0, "the header is padded to 64 bytes");
        assert_eq!(super::read_f32(&path).unwrap(), (vec![2, 3, 4], data));
        super::write_f32(&path, &[5], &[1.0; 5]).unwrap();
        assert_eq!(super::read_f32(&path).unwrap().0, vec![5], "a 1-d shape is written (5,)");
        let _ = std::fs::remove_file(&path);
    }
}
