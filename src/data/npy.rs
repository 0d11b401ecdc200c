//! NumPy `.npy` files (format versions 1-3), read with a bound: the header
//! is parsed and the array's size checked against the file's length and the
//! memory budget before anything is allocated. Only C-order arrays of
//! little-endian `float32` (inputs) and `int64` / `int32` / `uint8` (labels)
//! are read; anything else is a clear error naming the file.

use std::path::Path;

use super::dataset::{invalid, strip_path};
use crate::error::DataError;
use crate::fs::file_cap;

/// Largest `.npy` file read (1 GiB; `PRELU_MAX_FILE_BYTES` overrides).
pub const MAX_NPY_BYTES: u64 = 1 << 30;

/// A decoded array.
#[derive(Clone, Debug, PartialEq)]
pub struct Npy {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

/// The values of an array: floats as read, integers widened.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyData {
    F32(Vec<f32>),
    Int(Vec<i64>),
}

/// The value of `key` in the header dict: the text up to the next top-level
/// `,` or `}` (a tuple kept whole).
fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = header[at + key.len() + 2..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(rest[..end].trim())
}

/// Parses a `.npy` file's bytes; `path` names it in errors.
pub fn parse_npy(bytes: &[u8], path: &str) -> Result<Npy, DataError> {
    let bad = |what: String| invalid(path, what);
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a NumPy .npy file (no \\x93NUMPY magic)".into()));
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => {
            return Err(bad(format!(
                ".npy format version {v} is not supported (1, 2 and 3 are)"
            )))
        }
    };
    if len > 1 << 16 || start + len > bytes.len() {
        return Err(DataError::Truncated {
            path: path.into(),
            what: format!("header of {len} bytes in a file of {}", bytes.len()),
        });
    }
    let header =
        std::str::from_utf8(&bytes[start..start + len]).map_err(|_| bad("the .npy header is not text".into()))?;
    let descr = field(header, "descr")
        .map(|d| d.trim_matches(['\'', '"']))
        .ok_or_else(|| bad("the .npy header has no `descr`".into()))?;
    match field(header, "fortran_order") {
        Some("False") => {}
        Some("True") => {
            return Err(bad(
                "the array is in Fortran order; save it in C order (np.ascontiguousarray)".into(),
            ))
        }
        _ => return Err(bad("the .npy header has no valid `fortran_order`".into())),
    }
    let shape_text = field(header, "shape").ok_or_else(|| bad("the .npy header has no `shape`".into()))?;
    let shape: Vec<usize> = shape_text
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| bad(format!("the .npy shape {shape_text} is not a tuple of sizes")))
        })
        .collect::<Result<_, _>>()?;
    if shape.len() > 8 {
        return Err(bad(format!("an array of {} dimensions", shape.len())));
    }
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= 1 << 32)
        .ok_or_else(|| bad(format!("the array's shape {shape:?} is implausibly large")))?;
    let item = match descr {
        "<f4" => 4,
        "<i8" => 8,
        "<i4" => 4,
        "|u1" | "<u1" => 1,
        d if d.starts_with('>') => {
            return Err(bad(format!(
                "dtype `{d}` is big-endian; save it little-endian (arr.astype('<f4'))"
            )))
        }
        d => {
            return Err(bad(format!(
                "dtype `{d}` is not supported: inputs must be float32 (`<f4`), labels int64, int32 or uint8"
            )))
        }
    };
    let body = &bytes[start + len..];
    let need = count.saturating_mul(item);
    if body.len() != need {
        return Err(DataError::Truncated {
            path: path.into(),
            what: format!(
                "shape {shape:?} of `{descr}` needs {need} bytes of data, the file has {}",
                body.len()
            ),
        });
    }
    // The decoded copy is checked against the memory budget first.
    crate::memory::check_bytes(&format!("{path}: {count} values"), (count as u64).saturating_mul(8))
        .map_err(|e| bad(e.to_string()))?;
    let data = match descr {
        "<f4" => NpyData::F32(
            body.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        "<i8" => NpyData::Int(
            body.chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect(),
        ),
        "<i4" => NpyData::Int(
            body.chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                .collect(),
        ),
        _ => NpyData::Int(body.iter().map(|&b| b as i64).collect()),
    };
    Ok(Npy { shape, data })
}

/// Reads a `.npy` file (regular files only, at most [`MAX_NPY_BYTES`]).
pub fn read_npy(path: &Path) -> Result<Npy, DataError> {
    let p = path.display().to_string();
    let bytes = crate::fs::read_capped(path, file_cap(MAX_NPY_BYTES)).map_err(|e| DataError::Invalid {
        path: p.clone(),
        what: strip_path(&e.to_string(), &p),
    })?;
    parse_npy(&bytes, &p)
}

/// Writes a C-order little-endian `float32` array as `.npy` (version 1).
pub fn npy_f32_bytes(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    out
}
