//! IDX files (raw or gzip) as data sets, named sets on their standard paths,
//! and the built-in MNIST subset.

use std::borrow::Cow;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::DataError;
use crate::fs::file_cap;

/// Default largest decompressed IDX file accepted (a resource bound against
/// hostile or corrupt input; the largest real file, MNIST's train images, is
/// 47 MB).
pub const MAX_IDX_BYTES: u64 = 1 << 30;

/// A decoded IDX array of unsigned bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

pub(crate) fn invalid(path: &str, what: impl Into<String>) -> DataError {
    DataError::Invalid {
        path: path.to_string(),
        what: what.into(),
    }
}

fn is_gzip(bytes: &[u8]) -> bool {
    bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b
}

/// Decompresses gzip input (recognised by its magic bytes) into a buffer
/// bounded by the size the IDX header declares (itself checked against the
/// cap before anything is allocated); raw input is returned as is.
fn maybe_gunzip<'a>(bytes: &'a [u8], path: &str, cap: u64) -> Result<Cow<'a, [u8]>, DataError> {
    if !is_gzip(bytes) {
        return Ok(Cow::Borrowed(bytes));
    }
    let bad = |e: std::io::Error| invalid(path, format!("bad gzip data: {e}"));
    let mut dec = flate2::read::GzDecoder::new(bytes);
    let mut out = Vec::new();
    (&mut dec).take(4).read_to_end(&mut out).map_err(bad)?;
    if out.len() == 4 && out[0] == 0 && out[1] == 0 && (1..=4).contains(&out[3]) {
        let rank = out[3] as u64;
        (&mut dec).take(4 * rank).read_to_end(&mut out).map_err(bad)?;
        if out.len() as u64 == 4 + 4 * rank {
            let declared = out[4..]
                .chunks(4)
                .try_fold(1u64, |acc, d| {
                    acc.checked_mul(u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as u64)
                })
                .filter(|&n| n <= cap);
            let Some(declared) = declared else {
                return Err(invalid(
                    path,
                    format!("declared size exceeds the {cap}-byte cap (set PRELU_MAX_FILE_BYTES to change it)"),
                ));
            };
            out.reserve_exact(declared as usize);
            // One byte more than declared, so trailing data is still noticed.
            (&mut dec).take(declared + 1).read_to_end(&mut out).map_err(bad)?;
        }
    }
    // A bad header: what was read is enough for the parser to say why.
    Ok(Cow::Owned(out))
}

/// Parses IDX bytes (raw or gzip). `path` only labels errors. The memory cap
/// is [`file_cap`]`(`[`MAX_IDX_BYTES`]`)`.
pub fn parse_idx(bytes: &[u8], path: &str) -> Result<Idx, DataError> {
    parse_idx_capped(bytes, path, file_cap(MAX_IDX_BYTES))
}

/// [`parse_idx`] with an explicit memory cap in bytes.
pub fn parse_idx_capped(bytes: &[u8], path: &str, cap: u64) -> Result<Idx, DataError> {
    parse_idx_cow(Cow::Borrowed(bytes), path, cap)
}

fn parse_idx_cow(input: Cow<'_, [u8]>, path: &str, cap: u64) -> Result<Idx, DataError> {
    let bytes = match input {
        Cow::Borrowed(b) => maybe_gunzip(b, path, cap)?,
        Cow::Owned(v) if is_gzip(&v) => Cow::Owned(maybe_gunzip(&v, path, cap)?.into_owned()),
        Cow::Owned(v) => Cow::Owned(v),
    };
    if bytes.len() < 4 {
        return Err(DataError::Truncated {
            path: path.into(),
            what: format!("{} bytes, shorter than the 4-byte header", bytes.len()),
        });
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if bytes[0] != 0 || bytes[1] != 0 || bytes[3] == 0 || bytes[3] > 4 {
        return Err(DataError::BadMagic {
            path: path.into(),
            magic,
        });
    }
    if bytes[2] != 0x08 {
        return Err(DataError::BadType {
            path: path.into(),
            code: bytes[2],
        });
    }
    let rank = bytes[3] as usize;
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(DataError::Truncated {
            path: path.into(),
            what: format!(
                "header declares {rank} dimensions but the file has {} bytes",
                bytes.len()
            ),
        });
    }
    let dims: Vec<usize> = (0..rank)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let declared = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&n| n <= cap);
    let Some(declared) = declared else {
        return Err(invalid(
            path,
            format!("declared size {dims:?} exceeds the {cap}-byte cap (set PRELU_MAX_FILE_BYTES to change it)"),
        ));
    };
    let body = bytes.len() - header;
    if (body as u64) < declared {
        return Err(DataError::Truncated {
            path: path.into(),
            what: format!("dimensions {dims:?} need {declared} data bytes, the file has {body}"),
        });
    }
    if body as u64 > declared {
        return Err(invalid(
            path,
            format!(
                "{} bytes of trailing data after the declared {dims:?} array",
                body as u64 - declared
            ),
        ));
    }
    let data = match bytes {
        // No second copy of a large array: the header is cut off in place.
        Cow::Owned(mut v) => {
            v.drain(..header);
            v
        }
        Cow::Borrowed(b) => b[header..].to_vec(),
    };
    Ok(Idx { dims, data })
}

/// Reads an IDX file (raw or gzip) through the capped reader of user files
/// ([`crate::fs::read_capped`]: regular files only, at most the cap).
pub fn read_idx(path: &Path) -> Result<Idx, DataError> {
    let p = path.display().to_string();
    let cap = file_cap(MAX_IDX_BYTES);
    let bytes = crate::fs::read_capped(path, cap).map_err(|e| match e {
        crate::error::ReadError::Io { source, .. } => DataError::Io {
            path: p.clone(),
            source,
        },
        other => DataError::Invalid {
            path: p.clone(),
            what: strip_path(&other.to_string(), &p),
        },
    })?;
    parse_idx_cow(Cow::Owned(bytes), &p, cap)
}

pub(crate) fn strip_path(msg: &str, path: &str) -> String {
    msg.strip_prefix(path)
        .map(|m| m.trim_start_matches(':').trim_start().to_string())
        .unwrap_or_else(|| msg.to_string())
}

/// Images as `f32` (in `[0, 1]` for the IDX sets), row-major
/// `[n, rows * cols]`, and labels (class indices, below [`MAX_CLASSES`]).
#[derive(Clone, Debug)]
pub struct Dataset {
    pub images: Vec<f32>,
    pub labels: Vec<u16>,
    pub rows: usize,
    pub cols: usize,
}

/// Number of classes of the named sets (labels are 0..=9).
pub const CLASSES: usize = 10;

/// Most classes a data set may have: labels are stored as `u16`
/// (ImageNet-21k has 21,841 classes).
pub const MAX_CLASSES: usize = 1 << 16;

impl Dataset {
    /// Builds a data set from decoded image (`[n, rows, cols]`) and label (`[n]`) arrays.
    pub fn from_idx(images: Idx, labels: Idx, images_path: &str, labels_path: &str) -> Result<Self, DataError> {
        if images.dims.len() != 3 {
            return Err(invalid(
                images_path,
                format!("images must have 3 dimensions [n, rows, cols], got {:?}", images.dims),
            ));
        }
        if labels.dims.len() != 1 {
            return Err(invalid(
                labels_path,
                format!("labels must have 1 dimension [n], got {:?}", labels.dims),
            ));
        }
        let (n, rows, cols) = (images.dims[0], images.dims[1], images.dims[2]);
        if rows == 0 || cols == 0 {
            return Err(invalid(images_path, format!("images of size {rows}x{cols}")));
        }
        if labels.dims[0] != n {
            return Err(DataError::Mismatch {
                images: images_path.into(),
                labels: labels_path.into(),
                what: format!("{n} images but {} labels", labels.dims[0]),
            });
        }
        if let Some((i, &l)) = labels.data.iter().enumerate().find(|&(_, &l)| l as usize >= CLASSES) {
            return Err(invalid(
                labels_path,
                format!("label {l} at index {i} is outside 0..{CLASSES}"),
            ));
        }
        // The f32 copy is 4 bytes per pixel: checked against the memory budget
        // before it is allocated.
        crate::memory::check_bytes(
            &format!("{images_path}: {n} images of {rows}x{cols} as f32"),
            (images.data.len() as u64).saturating_mul(4),
        )
        .map_err(|e| invalid(images_path, e.to_string()))?;
        Ok(Self {
            images: images.data.iter().map(|&p| p as f32 / 255.0).collect(),
            labels: labels.data.iter().map(|&l| l as u16).collect(),
            rows,
            cols,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels per image.
    pub fn features(&self) -> usize {
        self.rows * self.cols
    }

    /// The first `n` examples (all if `n >= len`).
    pub fn take(&self, n: usize) -> Self {
        let n = n.min(self.len());
        Self {
            images: self.images[..n * self.features()].to_vec(),
            labels: self.labels[..n].to_vec(),
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// The data in order, as `(images [n, features], labels [n] u32)` tensors of
    /// at most `batch` examples each (the last batch may be smaller).
    pub fn batches(
        &self,
        batch: usize,
    ) -> impl Iterator<Item = candle_core::Result<(candle_core::Tensor, candle_core::Tensor)>> + '_ {
        let (f, batch) = (self.features(), batch.max(1));
        let dev = candle_core::Device::Cpu;
        (0..self.len()).step_by(batch).map(move |start| {
            let end = (start + batch).min(self.len());
            let x = candle_core::Tensor::from_slice(&self.images[start * f..end * f], (end - start, f), &dev)?;
            let y = candle_core::Tensor::from_iter(self.labels[start..end].iter().map(|&l| l as u32), &dev)?;
            Ok((x, y))
        })
    }

    /// Mean and standard deviation over all pixels.
    pub fn pixel_stats(&self) -> (f32, f32) {
        let n = self.images.len().max(1) as f64;
        let mean = self.images.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = self.images.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean as f32, var.sqrt().max(1e-6) as f32)
    }
}

/// A train/test pair and where it came from.
#[derive(Clone, Debug)]
pub struct Split {
    pub name: String,
    pub source: String,
    pub train: Dataset,
    pub test: Dataset,
}

const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Finds `stem` or `stem.gz` in `dir`.
fn find_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    [format!("{stem}.gz"), stem.to_string()]
        .into_iter()
        .map(|f| dir.join(f))
        // Anything at the name counts (a FIFO, a dangling link...): reading
        // it then says what is wrong, instead of "not found".
        .find(|p| crate::fs::something_at(p))
}

pub(crate) fn has_set(dir: &Path) -> bool {
    FILES.iter().all(|f| find_file(dir, f).is_some())
}

/// Loads the four IDX files of an MNIST-format set from `dir`.
pub fn load_dir(dir: &Path, name: &str) -> Result<Split, DataError> {
    let path = |stem: &str| {
        find_file(dir, stem).ok_or_else(|| DataError::Io {
            path: dir.join(stem).display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found (also tried .gz)"),
        })
    };
    let [tri, trl, tei, tel] = FILES.map(path);
    let (tri, trl, tei, tel) = (tri?, trl?, tei?, tel?);
    let load = |i: &Path, l: &Path| -> Result<Dataset, DataError> {
        Dataset::from_idx(
            read_idx(i)?,
            read_idx(l)?,
            &i.display().to_string(),
            &l.display().to_string(),
        )
    };
    let train = load(&tri, &trl)?;
    let test = load(&tei, &tel)?;
    if (train.rows, train.cols) != (test.rows, test.cols) {
        return Err(invalid(
            &tei.display().to_string(),
            format!(
                "test images are {}x{} but train images are {}x{}",
                test.rows, test.cols, train.rows, train.cols
            ),
        ));
    }
    Ok(Split {
        name: name.to_string(),
        source: dir.display().to_string(),
        train,
        test,
    })
}

/// The built-in 10,000/2,000 MNIST subset.
pub fn mnist_small() -> Result<Split, DataError> {
    const TRI: &[u8] = include_bytes!("../../data/mnist-small/train-images-idx3-ubyte.gz");
    const TRL: &[u8] = include_bytes!("../../data/mnist-small/train-labels-idx1-ubyte.gz");
    const TEI: &[u8] = include_bytes!("../../data/mnist-small/t10k-images-idx3-ubyte.gz");
    const TEL: &[u8] = include_bytes!("../../data/mnist-small/t10k-labels-idx1-ubyte.gz");
    let ds = |i: &[u8], l: &[u8], what: &str| {
        let (ip, lp) = (
            format!("<built-in mnist-small {what} images>"),
            format!("<built-in mnist-small {what} labels>"),
        );
        Dataset::from_idx(parse_idx(i, &ip)?, parse_idx(l, &lp)?, &ip, &lp)
    };
    Ok(Split {
        name: "mnist-small".into(),
        source: "built in (MNIST subset)".into(),
        train: ds(TRI, TRL, "train")?,
        test: ds(TEI, TEL, "test")?,
    })
}

/// Where a named set is looked for, in order.
pub fn candidate_dirs(name: &str, data_dir: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let mut add_root = |root: PathBuf| {
        dirs.push(root.join(name));
        dirs.push(root);
    };
    if let Some(d) = data_dir {
        add_root(d.to_path_buf());
    }
    if let Some(d) = std::env::var_os("PRELU_DATA") {
        add_root(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("/usr/share/datasets").join(name));
    dirs.push(PathBuf::from("data").join(name));
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(name));
    dirs
}

/// The folder a named full set (`mnist`, `fashion-mnist`) would be loaded
/// from, without reading it; `None` when it is not installed.
pub fn locate(name: &str, data_dir: Option<&Path>) -> Option<PathBuf> {
    candidate_dirs(name, data_dir).into_iter().find(|d| has_set(d))
}

/// Loads a named set: `mnist`, `fashion-mnist` or `mnist-small` (built in). A
/// path to a folder with the four IDX files also works.
pub fn load(name: &str, data_dir: Option<&Path>) -> Result<Split, DataError> {
    match name {
        "mnist-small" => mnist_small(),
        "mnist" | "fashion-mnist" => match locate(name, data_dir) {
            Some(d) => load_dir(&d, name),
            None => Err(DataError::NotFound {
                name: name.into(),
                looked: candidate_dirs(name, data_dir)
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                hint: if name == "fashion-mnist" {
                    "; on Debian, `apt-get install dataset-fashion-mnist` installs it".into()
                } else {
                    String::new()
                },
            }),
        },
        other => {
            let p = Path::new(other);
            if p.is_dir() {
                if has_set(p) {
                    return load_dir(p, other);
                }
                return Err(invalid(
                    other,
                    format!("folder lacks the four IDX files {FILES:?} (raw or .gz)"),
                ));
            }
            Err(DataError::UnknownSet(other.into()))
        }
    }
}
