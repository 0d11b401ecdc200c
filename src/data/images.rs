//! Image folders: one subfolder per class, PNG and JPEG files, read for a
//! model's input.
//!
//! The layout is torchvision's `ImageFolder`: the class names are the
//! subfolder names in sorted order (byte order of the UTF-8 names, which is
//! Python's `sorted` order), and an image's label is the index of its class
//! folder. Files are read from each class folder and the folders below it, in
//! torchvision's order (folders by path, files by name within a folder).
//! Differences from torchvision, all deliberate: hidden entries (names that
//! start with `.`, e.g. `.ipynb_checkpoints`) are skipped; symbolic links are
//! refused (an error naming the link), not followed; files whose name does
//! not end in `.png`, `.jpg` or `.jpeg` (any case) are skipped and counted,
//! except other image formats (`.bmp`, `.gif`, `.webp`, `.tif`, ...), which
//! are an error, so that no image is silently left out.
//!
//! Each image becomes the model's input `[C, H, W]`:
//! 1. decoded (8 or 16 bits per channel) and scaled to `[0, 1]`; alpha is
//!    dropped (as PIL's `convert("RGB")` does);
//! 2. converted to the model's channels: a grey image is repeated to RGB; an
//!    RGB image becomes grey as `0.299 R + 0.587 G + 0.114 B` (ITU-R 601,
//!    torchvision's `Grayscale` and PIL's `convert("L")`);
//! 3. resized to `H x W` (the aspect ratio is not kept) by **bilinear
//!    interpolation with antialiasing**: exactly PyTorch's
//!    `F.interpolate(x, (H, W), mode="bilinear", antialias=True)`
//!    (`align_corners=False`), which is what torchvision's
//!    `Resize((H, W))` does by default on a tensor; on a PIL image
//!    torchvision gets the same filter from PIL, computed in 8-bit fixed
//!    point, which differs from ours by up to about 1/255 (0.94/255 on the
//!    test images). Up-scaling is plain bilinear. There is no center crop:
//!    torchvision's `Resize(256)` + `CenterCrop(224)` needs the images
//!    cropped beforehand.
//! 4. normalised per channel, `(x - mean[c]) / std[c]` ([`Normalize`], like
//!    torchvision's `Normalize`); none by default.
//!
//! The result is stored in `C, H, W` order, like every input here; an NHWC
//! model gets it in its own layout through the model's io, as `.npy` data
//! does.
//!
//! Every file is treated as hostile: regular files only, at most
//! [`MAX_IMAGE_FILE_BYTES`] each (`PRELU_MAX_FILE_BYTES` overrides), the
//! declared size checked against [`MAX_IMAGE_PIXELS`] before any pixel is
//! decoded, the whole data set's size checked against the memory budget
//! before it is allocated, and a corrupt file is an error naming it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::dataset::{invalid, strip_path, Dataset, MAX_CLASSES};
use crate::error::DataError;
use crate::fs::file_cap;

/// Largest image file read (64 MiB; `PRELU_MAX_FILE_BYTES` overrides).
pub const MAX_IMAGE_FILE_BYTES: u64 = 64 << 20;
/// Most pixels an image may declare (2^25, e.g. 6,000 x 5,592), checked
/// against its header before it is decoded.
pub const MAX_IMAGE_PIXELS: u64 = 1 << 25;
/// Deepest folder level read below a class folder.
pub const MAX_DEPTH: usize = 16;

/// File name endings read as images.
const READ: [&str; 3] = ["png", "jpg", "jpeg"];
/// Image formats that are refused rather than skipped.
const OTHER_IMAGES: [&str; 17] = [
    "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm", "pbm", "pnm", "ico", "avif", "heic", "heif", "tga", "dds",
    "exr", "hdr",
];

/// Per-channel normalisation `(x - mean[c]) / std[c]` of pixels in `[0, 1]`.
/// Empty vectors mean none; one value applies to every channel.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Normalize {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalize {
    /// Whether it changes nothing (no mean and no std given).
    pub fn is_none(&self) -> bool {
        self.mean.is_empty() && self.std.is_empty()
    }

    /// The mean and std of each of `channels` channels: each list must have
    /// no value (0 and 1), one value, or one per channel; every std must be
    /// positive and finite, every mean finite.
    pub fn per_channel(&self, channels: usize) -> crate::error::Result<(Vec<f32>, Vec<f32>)> {
        let expand = |v: &[f32], what: &str, default: f32| -> crate::error::Result<Vec<f32>> {
            match v.len() {
                0 => Ok(vec![default; channels]),
                1 => Ok(vec![v[0]; channels]),
                n if n == channels => Ok(v.to_vec()),
                n => Err(crate::error::Error::Invalid(format!(
                    "{n} input {what} values for a model with {channels} input channel{}; give one value, or one per channel",
                    if channels == 1 { "" } else { "s" }
                ))),
            }
        };
        let mean = expand(&self.mean, "mean", 0.0)?;
        let std = expand(&self.std, "std", 1.0)?;
        if let Some(m) = mean.iter().find(|m| !m.is_finite()) {
            return Err(crate::error::Error::Invalid(format!("input mean {m} is not finite")));
        }
        if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(crate::error::Error::Invalid(format!(
                "input std {s} is not a positive finite number"
            )));
        }
        Ok((mean, std))
    }
}

/// The files of an image folder, before any is decoded.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// The class names (subfolder names), sorted; a label is an index here.
    pub classes: Vec<String>,
    /// Every image with its label, in reading order.
    pub files: Vec<(PathBuf, usize)>,
    /// Entries passed over: hidden entries and files that are not images by
    /// their name.
    pub skipped: Vec<PathBuf>,
}

/// An image folder read for a model.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    pub classes: Vec<String>,
    /// The images (`[n, C*H*W]`, `C, H, W` order) and their labels.
    pub data: Dataset,
    /// The images' files, in the data's order.
    pub files: Vec<PathBuf>,
    pub skipped: Vec<PathBuf>,
}

fn err(path: &Path, what: impl Into<String>) -> crate::error::Error {
    crate::error::Error::Data(invalid(&path.display().to_string(), what))
}

/// The entries of `dir`, sorted by name (bytes), with their types (links
/// not followed).
fn entries(dir: &Path) -> crate::error::Result<Vec<(OsString, PathBuf, std::fs::FileType)>> {
    let io = |e: std::io::Error| {
        crate::error::Error::Data(DataError::Io {
            path: dir.display().to_string(),
            source: e,
        })
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io)? {
        let e = e.map_err(io)?;
        let t = e.file_type().map_err(io)?;
        out.push((e.file_name(), e.path(), t));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn is_hidden(name: &OsString) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

fn refuse_link(path: &Path) -> crate::error::Error {
    err(
        path,
        "a symbolic link; an image folder is read only through regular files and folders (copy the files in)",
    )
}

fn refuse_special(path: &Path) -> crate::error::Error {
    err(path, "not a regular file or folder")
}

/// Collects the images below a class folder: `(folder, files)` per folder,
/// to be sorted by folder path as torchvision does.
fn walk(
    dir: &Path,
    depth: usize,
    label: usize,
    out: &mut Vec<(PathBuf, Vec<(PathBuf, usize)>)>,
    skipped: &mut Vec<PathBuf>,
) -> crate::error::Result<()> {
    if depth > MAX_DEPTH {
        return Err(err(
            dir,
            format!("folders nested over {MAX_DEPTH} levels deep below a class folder"),
        ));
    }
    let mut files = Vec::new();
    for (name, path, t) in entries(dir)? {
        if is_hidden(&name) {
            skipped.push(path);
        } else if t.is_symlink() {
            return Err(refuse_link(&path));
        } else if t.is_dir() {
            walk(&path, depth + 1, label, out, skipped)?;
        } else if t.is_file() {
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            if READ.contains(&ext.as_str()) {
                files.push((path, label));
            } else if OTHER_IMAGES.contains(&ext.as_str()) {
                return Err(err(
                    &path,
                    format!("a .{ext} image; only PNG and JPEG are read (convert it, or move it out of the folder)"),
                ));
            } else {
                skipped.push(path);
            }
        } else {
            return Err(refuse_special(&path));
        }
    }
    out.push((dir.to_path_buf(), files));
    Ok(())
}

/// Lists an image folder: its class subfolders (sorted) and their images,
/// without decoding any. Errors: no class subfolders, a class without
/// images, a symbolic link or special file, a non-UTF-8 class name, an image
/// format other than PNG and JPEG.
pub fn list_image_folder(dir: &Path) -> crate::error::Result<Listing> {
    let meta = std::fs::symlink_metadata(dir).map_err(|e| {
        crate::error::Error::Data(DataError::Io {
            path: dir.display().to_string(),
            source: e,
        })
    })?;
    if meta.file_type().is_symlink() {
        // The folder given itself may be a link: the user chose it.
        if !dir.is_dir() {
            return Err(err(dir, "not a folder"));
        }
    } else if !meta.is_dir() {
        return Err(err(dir, "not a folder"));
    }
    let mut listing = Listing::default();
    let mut class_dirs = Vec::new();
    for (name, path, t) in entries(dir)? {
        if is_hidden(&name) {
            listing.skipped.push(path);
        } else if t.is_symlink() {
            return Err(refuse_link(&path));
        } else if t.is_dir() {
            let Some(name) = name.to_str() else {
                return Err(err(&path, "a class folder whose name is not UTF-8"));
            };
            class_dirs.push((name.to_string(), path));
        } else if t.is_file() {
            listing.skipped.push(path);
        } else {
            return Err(refuse_special(&path));
        }
    }
    if class_dirs.is_empty() {
        return Err(err(
            dir,
            "no class subfolders: an image folder holds one subfolder of images per class \
             (like torchvision's ImageFolder)",
        ));
    }
    for (label, (name, path)) in class_dirs.into_iter().enumerate() {
        let mut folders = Vec::new();
        walk(&path, 0, label, &mut folders, &mut listing.skipped)?;
        folders.sort_by(|a, b| {
            a.0.as_os_str()
                .as_encoded_bytes()
                .cmp(b.0.as_os_str().as_encoded_bytes())
        });
        let before = listing.files.len();
        listing.files.extend(folders.into_iter().flat_map(|f| f.1));
        if listing.files.len() == before {
            return Err(err(&path, "a class folder with no PNG or JPEG image"));
        }
        listing.classes.push(name);
    }
    Ok(listing)
}

/// A decoded image: `channels` (1 grey, 3 RGB) planes of `height x width`
/// values in `[0, 1]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// `[channels, height, width]`.
    pub planes: Vec<f32>,
}

/// Decodes a PNG or JPEG file: regular files only, at most
/// [`MAX_IMAGE_FILE_BYTES`] (or `PRELU_MAX_FILE_BYTES`), at most
/// [`MAX_IMAGE_PIXELS`] declared pixels (checked before decoding).
pub fn decode_image(path: &Path) -> crate::error::Result<Decoded> {
    use image::ImageDecoder;
    let p = path.display().to_string();
    let bytes = crate::fs::read_capped(path, file_cap(MAX_IMAGE_FILE_BYTES)).map_err(|e| {
        crate::error::Error::Data(DataError::Invalid {
            path: p.clone(),
            what: strip_path(&e.to_string(), &p),
        })
    })?;
    let bad = |e: &dyn std::fmt::Display| err(path, format!("not a readable PNG or JPEG image: {e}"));
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes[..]))
        .with_guessed_format()
        .map_err(|e| bad(&e))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg) => {}
        Some(f) => return Err(err(path, format!("a {f:?} image; only PNG and JPEG are read"))),
        None => return Err(err(path, "not a PNG or JPEG image (unknown content)")),
    }
    let side = u32::try_from(MAX_IMAGE_PIXELS).unwrap_or(u32::MAX);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    // The decoded image at 16 bits per channel with alpha, and some room.
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8 + (16 << 20));
    reader.limits(limits);
    // A decoder should never panic on bad input; if one does, it is this
    // file's error, not a crash.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> crate::error::Result<_> {
        let decoder = reader.into_decoder().map_err(|e| bad(&e))?;
        let (w, h) = decoder.dimensions();
        let pixels = w as u64 * h as u64;
        if pixels == 0 {
            return Err(err(path, format!("an image of {w}x{h} pixels")));
        }
        if pixels > MAX_IMAGE_PIXELS {
            return Err(err(
                path,
                format!("declares {w}x{h} pixels, over the cap of {MAX_IMAGE_PIXELS} pixels per image"),
            ));
        }
        crate::memory::check_bytes(&format!("{p}: a {w}x{h} image as f32"), pixels * 3 * 4)
            .map_err(|e| err(path, e.to_string()))?;
        image::DynamicImage::from_decoder(decoder).map_err(|e| bad(&e))
    }))
    .map_err(|_| err(path, "the image decoder failed on this file (corrupt image)"))??;
    let (width, height) = (decoded.width() as usize, decoded.height() as usize);
    let (channels, planes) = if decoded.color().has_color() {
        let rgb = decoded.to_rgb32f();
        let px = rgb.as_raw();
        let n = width * height;
        let mut planes = vec![0f32; 3 * n];
        for (i, p) in px.chunks_exact(3).enumerate() {
            for c in 0..3 {
                planes[c * n + i] = p[c];
            }
        }
        (3, planes)
    } else {
        (1, decoded.to_luma32f().into_raw())
    };
    Ok(Decoded {
        channels,
        height,
        width,
        planes,
    })
}

/// The taps of antialiased bilinear resampling from `input` to `output`
/// samples: for each output sample, the first input index and the weights
/// (PIL's and PyTorch's `antialias=True` rule: a triangle filter widened by
/// the scale when shrinking, weights normalised to sum 1).
fn taps(input: usize, output: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = input as f64 / output as f64;
    let (support, inv) = if scale >= 1.0 { (scale, 1.0 / scale) } else { (1.0, 1.0) };
    (0..output)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            // C's (int) cast, as PIL and PyTorch use: truncation.
            let lo = ((center - support + 0.5).trunc() as i64).max(0) as usize;
            let hi = ((center + support + 0.5).trunc() as i64).clamp(0, input as i64) as usize;
            let w: Vec<f64> = (lo..hi.max(lo))
                .map(|x| (1.0 - ((x as f64 - center + 0.5) * inv).abs()).max(0.0))
                .collect();
            let total: f64 = w.iter().sum();
            let w = w
                .iter()
                .map(|&v| if total > 0.0 { (v / total) as f32 } else { 0.0 })
                .collect();
            (lo, w)
        })
        .collect()
}

/// Resizes one `sh x sw` plane to `dh x dw` by antialiased bilinear
/// interpolation (see the module notes), rows first, then columns.
pub fn resize_bilinear(src: &[f32], (sh, sw): (usize, usize), (dh, dw): (usize, usize)) -> Vec<f32> {
    debug_assert_eq!(src.len(), sh * sw);
    if (sh, sw) == (dh, dw) {
        return src.to_vec();
    }
    let tx = taps(sw, dw);
    let mut mid = vec![0f32; sh * dw];
    for (row, out) in src.chunks_exact(sw).zip(mid.chunks_exact_mut(dw)) {
        for (o, (lo, w)) in out.iter_mut().zip(&tx) {
            *o = w.iter().zip(&row[*lo..]).map(|(a, b)| a * b).sum();
        }
    }
    let ty = taps(sh, dh);
    let mut out = vec![0f32; dh * dw];
    for (orow, (lo, w)) in out.chunks_exact_mut(dw).zip(&ty) {
        for (k, &wk) in w.iter().enumerate() {
            let r = &mid[(lo + k) * dw..(lo + k + 1) * dw];
            for (o, &v) in orow.iter_mut().zip(r) {
                *o += wk * v;
            }
        }
    }
    out
}

/// A decoded image as a model input `[C, H, W]` (`input`), in `C, H, W`
/// order: channels converted, resized, normalised (see the module notes).
/// `mean` and `std` have one value per channel.
pub fn to_input(img: &Decoded, input: [usize; 3], mean: &[f32], std: &[f32]) -> Result<Vec<f32>, String> {
    let [c, h, w] = input;
    let n = img.height * img.width;
    let planes: Vec<f32> = match (img.channels, c) {
        (a, b) if a == b => img.planes.clone(),
        (1, 3) => img.planes.repeat(3),
        (3, 1) => (0..n)
            .map(|i| 0.299 * img.planes[i] + 0.587 * img.planes[n + i] + 0.114 * img.planes[2 * n + i])
            .collect(),
        (_, c) => {
            return Err(format!(
                "the model takes {c} input channels; images give 1 (grey) or 3 (RGB)"
            ))
        }
    };
    let mut out = Vec::with_capacity(c * h * w);
    for (ch, plane) in planes.chunks_exact(n).enumerate() {
        let r = resize_bilinear(plane, (img.height, img.width), (h, w));
        out.extend(r.iter().map(|&v| (v - mean[ch]) / std[ch]));
    }
    Ok(out)
}

/// Reads an image folder for a model taking `[C, H, W]` inputs (`input`;
/// `C` 1 or 3): every image decoded, converted, resized and normalised as
/// the module notes say, labelled with its class folder's index. The
/// result's order is the listing's (deterministic); the memory it needs is
/// checked against the budget before it is allocated.
pub fn load_image_folder(dir: &Path, input: [usize; 3], norm: &Normalize) -> crate::error::Result<ImageFolder> {
    let [c, h, w] = input;
    if !matches!(c, 1 | 3) {
        return Err(err(
            dir,
            format!("the model takes {c} input channels; an image folder gives 1 (grey) or 3 (RGB)"),
        ));
    }
    if h == 0 || w == 0 {
        return Err(err(dir, format!("the model's input is {c}x{h}x{w}")));
    }
    let (mean, std) = norm.per_channel(c)?;
    let listing = list_image_folder(dir)?;
    if listing.classes.len() > MAX_CLASSES {
        return Err(err(
            dir,
            format!(
                "{} classes; at most {} are supported",
                listing.classes.len(),
                MAX_CLASSES
            ),
        ));
    }
    let f = c * h * w;
    let n = listing.files.len();
    crate::memory::check_bytes(
        &format!("{}: {n} images of {c}x{h}x{w} as f32", dir.display()),
        (n as u64).saturating_mul(f as u64).saturating_mul(4),
    )
    .map_err(|e| err(dir, e.to_string()))?;
    let mut images = vec![0f32; n * f];
    // In parallel, one image per task; the first error in the listing's
    // order is the one reported.
    let results: Vec<crate::error::Result<()>> = images
        .par_chunks_mut(f)
        .zip(listing.files.par_iter())
        .map(|(out, (path, _))| {
            let img = decode_image(path)?;
            let v = to_input(&img, input, &mean, &std).map_err(|e| err(path, e))?;
            out.copy_from_slice(&v);
            Ok(())
        })
        .collect();
    results.into_iter().collect::<crate::error::Result<Vec<()>>>()?;
    let (files, labels): (Vec<PathBuf>, Vec<u16>) = listing.files.into_iter().map(|(p, l)| (p, l as u16)).unzip();
    Ok(ImageFolder {
        classes: listing.classes,
        data: Dataset {
            images,
            labels,
            rows: c * h,
            cols: w,
        },
        files,
        skipped: listing.skipped,
    })
}
