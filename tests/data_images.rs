//! Image folders as data (issue 16): values against an independent torch
//! reference, hostile folders and files, labels of 256 classes and more,
//! and `prelu diagnose --data DIR` end to end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use prelu::data::images::{self, Normalize};
use prelu::data::npy;
use prelu::model::{Arch, Model, ModelSpec};
use prelu::Activation;

mod common;
use common::{bin, tmp};

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/image_folder")
}

fn read_f32(p: &Path) -> (Vec<usize>, Vec<f32>) {
    let a = npy::read_npy(p).unwrap();
    match a.data {
        npy::NpyData::F32(v) => (a.shape, v),
        _ => panic!("{}: not f32", p.display()),
    }
}

fn mlp(input: [usize; 3], classes: usize) -> Model {
    let spec = ModelSpec::new(
        Arch::Mlp { hidden: vec![8] },
        Activation::PRelu { shared: false },
        input,
        classes,
    );
    Model::new(&spec, 3, &Device::Cpu).unwrap()
}

/// The committed 3-class folder (PNG and JPEG, grey, RGB, RGBA, 16-bit grey,
/// 5x50 to 40x36, a nested folder, three entries to skip) read for a
/// 1x12x12 and a 3x12x12 model equals torch's
/// `interpolate(bilinear, antialias=True)` of the same pixels
/// (`scripts/image_folder_vectors.py`): within 1e-5 for PNG (same pixels,
/// float arithmetic), within 2/255 for JPEG (our decoder, zune-jpeg, against
/// libjpeg-turbo's pixels in the reference).
#[test]
fn folder_matches_the_torch_reference() {
    let v = vectors();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(v.join("files.json")).unwrap()).unwrap();
    let want_files: Vec<String> = meta["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    let want_labels = match npy::read_npy(&v.join("labels.npy")).unwrap().data {
        npy::NpyData::Int(l) => l,
        _ => panic!("labels"),
    };
    for c in [1, 3] {
        let f = images::load_image_folder(&v.join("folder"), [c, 12, 12], &Normalize::default()).unwrap();
        assert_eq!(f.classes, ["ants", "bees", "wasps"]);
        let files: Vec<String> = f
            .files
            .iter()
            .map(|p| p.strip_prefix(v.join("folder")).unwrap().display().to_string())
            .collect();
        assert_eq!(files, want_files, "torchvision's ImageFolder order");
        assert_eq!(f.data.labels.iter().map(|&l| l as i64).collect::<Vec<_>>(), want_labels);
        let mut skipped: Vec<String> = f
            .skipped
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        skipped.sort();
        assert_eq!(skipped, [".DS_Store", "README.txt", "notes.txt"]);
        assert_eq!((f.data.rows, f.data.cols), (c * 12, 12));
        let (shape, want) = read_f32(&v.join(format!("expected_c{c}.npy")));
        assert_eq!(shape, [want_files.len(), c, 12, 12]);
        let per = c * 144;
        for (k, name) in want_files.iter().enumerate() {
            let jpeg = name.to_ascii_lowercase().ends_with(".jpg") || name.to_ascii_lowercase().ends_with(".jpeg");
            let tol = if jpeg { 2.0 / 255.0 } else { 1e-5 };
            let got = &f.data.images[k * per..(k + 1) * per];
            let exp = &want[k * per..(k + 1) * per];
            let worst = got.iter().zip(exp).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= tol, "{name}, {c} channels: max |diff| {worst} > {tol}");
        }
    }
}

/// `(x - mean[c]) / std[c]` per channel after scaling to [0, 1]; one value
/// applies to every channel; a wrong count or a non-positive std is refused.
#[test]
fn normalisation_per_channel_and_its_errors() {
    let dir = vectors().join("folder");
    let plain = images::load_image_folder(&dir, [3, 12, 12], &Normalize::default()).unwrap();
    let (mean, std) = (vec![0.485f32, 0.456, 0.406], vec![0.229f32, 0.224, 0.225]);
    let norm = Normalize {
        mean: mean.clone(),
        std: std.clone(),
    };
    let n = images::load_image_folder(&dir, [3, 12, 12], &norm).unwrap();
    for (i, (&a, &b)) in plain.data.images.iter().zip(&n.data.images).enumerate() {
        let ch = (i / 144) % 3;
        assert!((b - (a - mean[ch]) / std[ch]).abs() < 1e-6);
    }
    let one = Normalize {
        mean: vec![0.5],
        std: vec![0.25],
    };
    let n1 = images::load_image_folder(&dir, [3, 12, 12], &one).unwrap();
    assert!(plain
        .data
        .images
        .iter()
        .zip(&n1.data.images)
        .all(|(&a, &b)| (b - (a - 0.5) / 0.25).abs() < 1e-6));
    for (bad, want) in [
        (
            Normalize {
                mean: vec![0.1, 0.2],
                std: vec![],
            },
            "2 input mean values for a model with 3 input channels",
        ),
        (
            Normalize {
                mean: vec![],
                std: vec![0.2, 0.0, 0.1],
            },
            "input std 0 is not a positive",
        ),
    ] {
        let e = images::load_image_folder(&dir, [3, 12, 12], &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    }
    // A .npy source is fed as is: a mean/std for it is an error.
    let npy = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/onnx_keras/keras_cnn_opset13.input.npy");
    let e = prelu::data::load_source_with(npy.to_str().unwrap(), None, &mlp([1, 28, 28], 10), None, &one)
        .unwrap_err()
        .to_string();
    assert!(e.contains("image folders only") && e.contains("fed as is"), "{e}");
}

/// A 1x1 PNG (grey, value `v`).
fn png(v: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::GrayImage::from_pixel(1, 1, image::Luma([v]))
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// Files of a class folder: (name, bytes).
type Files<'a> = &'a [(&'a str, &'a [u8])];

/// A folder `root` with `classes` (name, files) written.
fn folder(root: &Path, classes: &[(&str, Files)]) {
    std::fs::create_dir_all(root).unwrap();
    for (c, files) in classes {
        std::fs::create_dir_all(root.join(c)).unwrap();
        for (name, bytes) in *files {
            std::fs::write(root.join(c).join(name), bytes).unwrap();
        }
    }
}

fn refused(dir: &Path, input: [usize; 3], want: &[&str]) {
    let e = images::load_image_folder(dir, input, &Normalize::default())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    for w in want {
        assert!(e.contains(w), "wanted `{w}` in: {e}");
    }
}

/// Hostile folders and files give errors naming the file: a truncated PNG,
/// a PNG declaring 100,000 x 100,000 pixels, text named `.png`, a GIF,
/// symbolic links (file and class folder), an empty class folder, no class
/// folders at all, a model with 2 channels.
#[test]
fn hostile_folders_and_images_are_errors() {
    let root = tmp("img-hostile");
    let good = std::fs::read(vectors().join("folder/ants/a1.png")).unwrap();
    let ok: &[(&str, &[u8])] = &[("ok.png", &good)];

    let d = root.join("truncated");
    folder(&d, &[("a", ok), ("b", &[("cut.png", &good[..good.len() / 2])])]);
    refused(&d, [1, 8, 8], &["cut.png", "not a readable PNG or JPEG"]);

    // A valid PNG header declaring 100000x100000 pixels (CRC fixed).
    let mut huge = png(7);
    huge[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    huge[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&huge[12..29]);
    huge[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    let d = root.join("huge");
    folder(&d, &[("a", ok), ("b", &[("huge.png", &huge)])]);
    refused(&d, [1, 8, 8], &["huge.png", "100000x100000"]);

    let d = root.join("text");
    folder(&d, &[("a", ok), ("b", &[("fake.png", b"hello, not a picture")])]);
    refused(&d, [1, 8, 8], &["fake.png", "not a PNG or JPEG"]);

    let d = root.join("gif");
    folder(&d, &[("a", ok), ("b", &[("anim.gif", b"GIF89a")])]);
    refused(&d, [1, 8, 8], &["anim.gif", "only PNG and JPEG are read"]);

    #[cfg(unix)]
    {
        let d = root.join("link-file");
        folder(&d, &[("a", ok), ("b", ok)]);
        std::os::unix::fs::symlink(d.join("a/ok.png"), d.join("b/link.png")).unwrap();
        refused(&d, [1, 8, 8], &["link.png", "symbolic link"]);
        let d = root.join("link-dir");
        folder(&d, &[("a", ok)]);
        std::os::unix::fs::symlink(d.join("a"), d.join("b")).unwrap();
        refused(&d, [1, 8, 8], &["link-dir/b", "symbolic link"]);
    }

    let d = root.join("empty-class");
    folder(&d, &[("a", ok), ("b", &[("notes.txt", b"x")])]);
    refused(&d, [1, 8, 8], &["empty-class/b", "no PNG or JPEG image"]);

    let d = root.join("no-classes");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("loose.png"), &good).unwrap();
    refused(&d, [1, 8, 8], &["no-classes", "no class subfolders"]);
    refused(&root.join("missing"), [1, 8, 8], &["missing"]);

    let d = root.join("two-channels");
    folder(&d, &[("a", ok)]);
    refused(&d, [2, 8, 8], &["2 input channels"]);
}

/// Labels of 300 classes: an image folder of 300 class folders for a
/// 300-output model gives labels 0..299 in sorted order, through the
/// batches as u32; `.npy` labels (int64) up to 999 for a 1000-output model;
/// a label equal to the output count, and more classes than outputs, are
/// errors.
#[test]
fn labels_of_256_classes_and_more() {
    let root = tmp("img-300").join("folder");
    let one = png(9);
    // Created in reverse to show that the order is the names', not the disk's.
    for k in (0..300).rev() {
        folder(&root, &[(&format!("c{k:03}"), &[("x.png", &one)])]);
    }
    let dir = root.to_str().unwrap();
    let m = mlp([1, 2, 2], 300);
    let s = prelu::data::load_source(dir, None, &m, None).unwrap().unwrap();
    assert!(s.labeled);
    assert_eq!(s.classes.len(), 300);
    assert_eq!(s.classes[299], "c299");
    let want: Vec<u16> = (0..300).collect();
    assert_eq!(s.data.labels, want);
    let mut got = Vec::new();
    for b in s.data.batches(64) {
        got.extend(b.unwrap().1.to_vec1::<u32>().unwrap());
    }
    assert_eq!(got, (0..300u32).collect::<Vec<_>>());
    assert!(s.data.images.iter().all(|&v| (v - 9.0 / 255.0).abs() < 1e-7));
    // The model predicts with labels over 255.
    let mut ds = s.data.clone();
    prelu::data::label_by_model(&m, &mut ds, 100).unwrap();
    assert!(ds.labels.iter().all(|&l| l < 300));

    // Fewer outputs than classes.
    let e = prelu::data::load_source(dir, None, &mlp([1, 2, 2], 200), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("300 class subfolders but the model has 200 outputs"), "{e}");

    // .npy labels, int64, of a 1000-output model.
    let d = tmp("npy-1000");
    std::fs::create_dir_all(&d).unwrap();
    let x = d.join("x.npy");
    std::fs::write(&x, npy::npy_f32_bytes(&[3, 4], &[0.5; 12])).unwrap();
    let labels = |vals: &[i64]| {
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        let mut h = format!(
            "{{'descr': '<i8', 'fortran_order': False, 'shape': ({},), }}",
            vals.len()
        );
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        b.extend((h.len() as u16).to_le_bytes());
        b.extend(h.as_bytes());
        b.extend(vals.iter().flat_map(|v| v.to_le_bytes()));
        let p = d.join(format!("l{}.npy", vals[0]));
        std::fs::write(&p, b).unwrap();
        p
    };
    let m = mlp([1, 2, 2], 1000);
    let ok = labels(&[999, 256, 0]);
    let s = prelu::data::load_source(x.to_str().unwrap(), Some(&ok), &m, None)
        .unwrap()
        .unwrap();
    assert_eq!(s.data.labels, [999, 256, 0]);
    let bad = labels(&[1000, 1, 2]);
    let e = prelu::data::load_source(x.to_str().unwrap(), Some(&bad), &m, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 1000 at index 0 is outside 0..1000"), "{e}");
    // A labels file with an image folder is refused (its folders label it).
    let e = prelu::data::load_source(dir, Some(&ok), &mlp([1, 2, 2], 300), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("labelled by its class subfolders"), "{e}");
}

/// `prelu diagnose MODEL --data DIR` end to end: a model of ours (accuracy
/// on the folder's labels, every activation layer), and MTCNN's PNet
/// imported at 12x12 with MTCNN's own input scaling as a mean and std.
#[test]
fn diagnose_reads_an_image_folder() {
    let d = tmp("img-diagnose");
    std::fs::create_dir_all(&d).unwrap();
    let dir = vectors().join("folder");
    let ck = d.join("mlp.safetensors");
    prelu::store::checkpoint::save_model(&ck, &mlp([3, 12, 12], 3), HashMap::new(), HashMap::new()).unwrap();
    let o = bin()
        .args([
            "diagnose",
            ck.to_str().unwrap(),
            "--data",
            dir.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("8 images in 3 classes (ants, bees, wasps)") && err.contains("skipped 3"),
        "{err}"
    );
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["examples"], 8);
    assert_eq!(j["labels"], true);
    assert!(j["acc"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)), "{j}");
    assert_eq!(j["layers"].as_array().unwrap().len(), 1);

    // Wrong uses are errors naming the flags.
    for (extra, want) in [
        (
            vec!["--labels", "x.npy"],
            "an image folder is labelled by its class subfolders",
        ),
        (
            vec!["--input-mean", "0.5,0.5"],
            "2 input mean values for a model with 3 input channels",
        ),
    ] {
        let o = bin()
            .args(["diagnose", ck.to_str().unwrap(), "--data", dir.to_str().unwrap()])
            .args(&extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(want) && !err.contains("panicked"),
            "{err}"
        );
    }
    let o = bin()
        .args([
            "diagnose",
            ck.to_str().unwrap(),
            "--data",
            "mnist-small",
            "--input-std",
            "0.3",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("apply to an image folder"), "{err}");

    // MTCNN's PNet: (x - 127.5) / 128 on 8-bit pixels is mean 0.5, std 128/255.
    let pnet = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/onnx_mtcnn/pnet.onnx");
    let imported = d.join("pnet.safetensors");
    let o = bin()
        .args([
            "import",
            pnet.to_str().unwrap(),
            "-o",
            imported.to_str().unwrap(),
            "--input-size",
            "12x12",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = bin()
        .args([
            "diagnose",
            imported.to_str().unwrap(),
            "--data",
            dir.to_str().unwrap(),
            "--input-mean",
            "0.5",
            "--input-std",
            "0.50196",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["examples"], 8);
    let layers: Vec<&str> = j["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["layer"].as_str().unwrap())
        .collect();
    assert_eq!(layers.len(), 3, "{layers:?}");
}
