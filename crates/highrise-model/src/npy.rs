//! NumPy `.npy` files of little-endian float32, C order: what `highrise logits` and `highrise inspect`
//! write, and what the reference fixtures are.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

pub fn write_f32(path: &Path, dims: &[usize], data: &[f32]) -> Result<()> {
    let mut w = NpyWriter::create(path, dims)?;
    w.write(data)?;
    w.finish()
}

/// A float32 `.npy` written a piece at a time, for an array too large to hold whole (a long
/// prompt's attention patterns at every layer): the header names the whole shape, then each piece
/// goes out as it comes; `finish` checks that the values added up to the shape.
pub struct NpyWriter {
    file: BufWriter<std::fs::File>,
    path: PathBuf,
    dims: Vec<usize>,
    left: usize,
}

impl NpyWriter {
    pub fn create(path: &Path, dims: &[usize]) -> Result<NpyWriter> {
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
        let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let mut w = NpyWriter { file: BufWriter::with_capacity(1 << 20, file), path: path.to_path_buf(), dims: dims.to_vec(), left: dims.iter().product() };
        let mut start = b"\x93NUMPY\x01\x00".to_vec();
        start.extend_from_slice(&(header.len() as u16).to_le_bytes());
        start.extend_from_slice(header.as_bytes());
        w.file.write_all(&start).map_err(|e| Error::io(path, e))?;
        Ok(w)
    }

    /// The next values in C order.
    pub fn write(&mut self, data: &[f32]) -> Result<()> {
        if data.len() > self.left {
            return Err(self.mismatch(format!("{} values more than its shape holds", data.len() - self.left)));
        }
        self.left -= data.len();
        for chunk in data.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.file.write_all(&bytes).map_err(|e| Error::io(&self.path, e))?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        if self.left > 0 {
            return Err(self.mismatch(format!("{} values short of its shape", self.left)));
        }
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }

    fn mismatch(&self, detail: String) -> Error {
        Error::Format { path: self.path.clone(), detail: format!("npy of shape {:?}: {detail}", self.dims) }
    }
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
        assert_eq!(super::read_f32(&path).unwrap(), (vec![2, 3, 4], data.clone()));
        super::write_f32(&path, &[5], &[1.0; 5]).unwrap();
        assert_eq!(super::read_f32(&path).unwrap().0, vec![5], "a 1-d shape is written (5,)");
        // Piece by piece, the same file.
        let mut w = super::NpyWriter::create(&path, &[2, 3, 4]).unwrap();
        for piece in data.chunks(7) {
            w.write(piece).unwrap();
        }
        w.finish().unwrap();
        assert_eq!(super::read_f32(&path).unwrap(), (vec![2, 3, 4], data.clone()));
        // Values that do not add up to the shape are an error naming the file, not a panic.
        let e = super::write_f32(&path, &[2, 3], &data).unwrap_err().to_string();
        assert!(e.contains("highrise-npy") && e.contains("18 values more than its shape holds"), "{e}");
        let mut w = super::NpyWriter::create(&path, &[2, 3]).unwrap();
        w.write(&data[..4]).unwrap();
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("npy of shape [2, 3]: 2 values short of its shape"), "{e}");
        let _ = std::fs::remove_file(&path);
    }
}
