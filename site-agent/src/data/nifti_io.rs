//! NIfTI-1 reading and writing through the `nifti` crate.
//!
//! Files are read whole (gzip is detected by its magic bytes, not the file name), the header size
//! is checked first so that NIfTI-2 gets a clear refusal, and the `nifti` crate then decodes any
//! integer or float datatype in either byte order, applying `scl_slope`/`scl_inter`.
//!
//! The voxel-to-world affine is taken as nibabel's `get_best_affine` does: the sform when
//! `sform_code > 0`, else the qform when `qform_code > 0`, else the Analyze-style affine from
//! `pixdim` (x flipped, centred on the volume). Readers return volumes in canonical LPS order
//! (see `geometry`); writers store the affine as both sform and qform (code 1, scanner).

use std::io::Read;
use std::path::Path;

use ndarray::ShapeBuilder;
use nifti::{IntoNdArray, NiftiHeader, NiftiObject, NiftiType};

use super::{Affine, DataError, DataResult, Image, Labels, Orientation, Volume};

/// Files above this size (after decompression) are refused rather than filling memory.
const MAX_DECODED_BYTES: u64 = 4 << 30;

fn read_bytes(path: &Path) -> DataResult<Vec<u8>> {
    let io = |source| DataError::Io { path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut raw = Vec::new();
    file.take(MAX_DECODED_BYTES).read_to_end(&mut raw).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .take(MAX_DECODED_BYTES)
            .read_to_end(&mut out)
            .map_err(|e| {
                DataError::nifti(
                    path,
                    format!(
                        "the gzip stream is damaged ({e}); copy the file again from its source"
                    ),
                )
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Decodes a NIfTI-1 single file into `f64` values in stored order, with its affine and header.
fn read_f64(path: &Path) -> DataResult<(Volume<f64>, NiftiHeader)> {
    let bytes = read_bytes(path)?;
    if bytes.len() < 352 {
        return Err(DataError::nifti(
            path,
            format!(
                "only {} bytes, too short for a NIfTI-1 header (352); the file is truncated or not NIfTI",
                bytes.len()
            ),
        ));
    }
    let size_le = i32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    let size_be = i32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if size_le == 540 || size_be == 540 {
        return Err(DataError::nifti(
            path,
            "this is a NIfTI-2 file, which fedtune does not read; convert it to NIfTI-1 \
             (for example with nibabel: nib.Nifti1Image(img.dataobj, img.affine).to_filename(...))",
        ));
    }
    if size_le != 348 && size_be != 348 {
        return Err(DataError::nifti(
            path,
            format!("header size is {size_le}, not 348: this is not a NIfTI-1 file"),
        ));
    }
    if &bytes[344..348] != b"n+1\0" {
        return Err(DataError::nifti(
            path,
            "header magic is not \"n+1\": only single-file NIfTI-1 (.nii, .nii.gz) is read; \
             convert .hdr/.img pairs to .nii",
        ));
    }
    let obj = nifti::InMemNiftiObject::from_reader(std::io::Cursor::new(&bytes))
        .map_err(|e| describe_nifti_error(path, e))?;
    let header = obj.header().clone();
    let dim = header.dim().map_err(|e| describe_nifti_error(path, e))?;
    let rank = dim.len();
    if rank > 3 && dim[3..].iter().any(|&d| d > 1) {
        return Err(DataError::nifti(
            path,
            format!(
                "{rank}-D volume with dims {dim:?}: fedtune reads 3-D volumes only; \
                 split the series into one 3-D file per volume"
            ),
        ));
    }
    let dims = [
        dim.first().copied().unwrap_or(1) as usize,
        dim.get(1).copied().unwrap_or(1) as usize,
        dim.get(2).copied().unwrap_or(1) as usize,
    ];
    for i in 0..rank.min(3) {
        let p = header.pixdim[i + 1].abs();
        if !p.is_finite() || p <= 0.0 {
            return Err(DataError::nifti(
                path,
                format!(
                    "pixdim[{}] = {} is not a positive voxel size",
                    i + 1,
                    header.pixdim[i + 1]
                ),
            ));
        }
    }
    let affine = best_affine(&header, dims);
    if !affine.is_usable() {
        return Err(DataError::nifti(
            path,
            format!(
                "its voxel-to-world affine {:?} (sform_code {}, qform_code {}) is singular or not \
                 finite, so fedtune cannot tell left from right; rewrite the header with a valid \
                 sform (for example with nibabel or 3D Slicer)",
                affine.0, header.sform_code, header.qform_code
            ),
        ));
    }
    let datatype = header.data_type().map_err(|e| describe_nifti_error(path, e))?;
    if matches!(
        datatype,
        NiftiType::Complex64 | NiftiType::Complex128 | NiftiType::Rgb24 | NiftiType::Rgba32
    ) {
        return Err(DataError::nifti(
            path,
            format!(
                "datatype {datatype:?} is not a scalar CT or label type; store it as an integer or float type"
            ),
        ));
    }
    // NIfTI: scl_slope 0 means "no scaling"; nibabel also treats a non-finite slope that way.
    let (slope, inter) = if header.scl_slope.is_finite() && header.scl_slope != 0.0 {
        (header.scl_slope, if header.scl_inter.is_finite() { header.scl_inter } else { 0.0 })
    } else {
        (1.0, 0.0)
    };
    let (raw_dim, endianness) = (header.dim, header.endianness);
    let obj_volume = obj.into_volume();
    let volume = nifti::InMemNiftiVolume::from_raw_fields(
        raw_dim,
        datatype,
        slope,
        inter,
        obj_volume.into_raw_data(),
        endianness,
    )
    .map_err(|e| describe_nifti_error(path, e))?;
    let arr = volume.into_ndarray::<f64>().map_err(|e| describe_nifti_error(path, e))?;
    // `arr` has shape (x, y, z[, 1...]); its transpose iterates x fastest, which is NIfTI order.
    let data: Vec<f64> = arr.t().iter().copied().collect();
    if data.len() != dims[0] * dims[1] * dims[2] {
        return Err(DataError::nifti(
            path,
            format!("header dims {dims:?} do not match the {} voxels decoded", data.len()),
        ));
    }
    Ok((Volume { dims, data, affine }, header))
}

/// The affine nibabel's `get_best_affine` gives: sform, else qform, else from pixdim.
fn best_affine(h: &NiftiHeader, dims: [usize; 3]) -> Affine {
    let f = f64::from;
    if h.sform_code > 0 {
        let r = [h.srow_x, h.srow_y, h.srow_z];
        return Affine(r.map(|row| row.map(f)));
    }
    let pix = |i: usize| {
        let p = f(h.pixdim[i]);
        if p > 0.0 { p } else { 1.0 }
    };
    if h.qform_code > 0 {
        // nifti1_io.c quatern_to_mat44.
        let (b, c, d) = (f(h.quatern_b), f(h.quatern_c), f(h.quatern_d));
        let mut a = 1.0 - (b * b + c * c + d * d);
        let (b, c, d) = if a < 1e-7 {
            let n = 1.0 / (b * b + c * c + d * d).sqrt();
            a = 0.0;
            (b * n, c * n, d * n)
        } else {
            a = a.sqrt();
            (b, c, d)
        };
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let (xd, yd, zd) = (pix(1), pix(2), pix(3) * qfac);
        let r = [
            [a * a + b * b - c * c - d * d, 2.0 * (b * c - a * d), 2.0 * (b * d + a * c)],
            [2.0 * (b * c + a * d), a * a + c * c - b * b - d * d, 2.0 * (c * d - a * b)],
            [2.0 * (b * d - a * c), 2.0 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ];
        let t = [f(h.quatern_x), f(h.quatern_y), f(h.quatern_z)];
        return Affine(std::array::from_fn(|i| [r[i][0] * xd, r[i][1] * yd, r[i][2] * zd, t[i]]));
    }
    // nibabel's Analyze base affine: x flipped, the volume centred on the origin.
    let z = [-pix(1), pix(2), pix(3)];
    Affine(std::array::from_fn(|i| {
        let mut row = [0.0; 4];
        row[i] = z[i];
        row[3] = -z[i] * (dims[i].saturating_sub(1)) as f64 / 2.0;
        row
    }))
}

/// The NIfTI-1 quaternion form (b, c, d, qfac) of an affine whose columns are orthogonal,
/// after nifti1_io.c `nifti_mat44_to_quatern`; `None` for a sheared affine.
fn quaternion(a: &Affine) -> Option<([f64; 3], f64)> {
    let sp = a.spacing().map(f64::from);
    let mut r: [[f64; 3]; 3] = std::array::from_fn(|i| std::array::from_fn(|j| a.0[i][j] / sp[j]));
    for i in 0..3 {
        for j in i + 1..3 {
            let dot: f64 = (0..3).map(|k| r[k][i] * r[k][j]).sum();
            if dot.abs() > 1e-4 {
                return None;
            }
        }
    }
    let qfac = if super::geometry::det3(r) < 0.0 {
        for row in &mut r {
            row[2] = -row[2];
        }
        -1.0
    } else {
        1.0
    };
    let trace = r[0][0] + r[1][1] + r[2][2] + 1.0;
    let qa;
    let (mut b, mut c, mut d);
    if trace > 0.5 {
        qa = 0.5 * trace.sqrt();
        b = 0.25 * (r[2][1] - r[1][2]) / qa;
        c = 0.25 * (r[0][2] - r[2][0]) / qa;
        d = 0.25 * (r[1][0] - r[0][1]) / qa;
    } else {
        let xd = 1.0 + r[0][0] - (r[1][1] + r[2][2]);
        let yd = 1.0 + r[1][1] - (r[0][0] + r[2][2]);
        let zd = 1.0 + r[2][2] - (r[0][0] + r[1][1]);
        if xd > 1.0 {
            b = 0.5 * xd.sqrt();
            c = 0.25 * (r[0][1] + r[1][0]) / b;
            d = 0.25 * (r[0][2] + r[2][0]) / b;
            qa = 0.25 * (r[2][1] - r[1][2]) / b;
        } else if yd > 1.0 {
            c = 0.5 * yd.sqrt();
            b = 0.25 * (r[0][1] + r[1][0]) / c;
            d = 0.25 * (r[1][2] + r[2][1]) / c;
            qa = 0.25 * (r[0][2] - r[2][0]) / c;
        } else {
            d = 0.5 * zd.sqrt();
            b = 0.25 * (r[0][2] + r[2][0]) / d;
            c = 0.25 * (r[1][2] + r[2][1]) / d;
            qa = 0.25 * (r[1][0] - r[0][1]) / d;
        }
    }
    if qa < 0.0 {
        (b, c, d) = (-b, -c, -d);
    }
    Some(([b, c, d], qfac))
}

fn describe_nifti_error(path: &Path, e: nifti::NiftiError) -> DataError {
    let reason = match e {
        nifti::NiftiError::IncompatibleLength(got, want) => format!(
            "the header promises {want} bytes of voxels but the file holds {got}: \
             the file is truncated or its header dims are wrong"
        ),
        nifti::NiftiError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the file ends early: it is truncated; copy it again from its source".to_owned()
        }
        other => format!("not a readable NIfTI-1 file: {other}"),
    };
    DataError::nifti(path, reason)
}

/// What a prediction needs to be written back the way its image was stored: the image's own
/// header, and how its voxels were reordered to canonical.
#[derive(Clone, Debug)]
pub struct NiftiSource {
    pub header: NiftiHeader,
    pub orientation: Orientation,
}

fn to_image(v: Volume<f64>) -> Image {
    v.with_data(v.data.iter().map(|&x| x as f32).collect())
}

/// Reads a CT image in HU from a NIfTI-1 file (`.nii` or `.nii.gz`), in canonical order.
pub fn read_image(path: &Path) -> DataResult<Image> {
    Ok(read_image_with_source(path)?.0)
}

/// Reads a CT image in canonical order, with what [`write_labels_like`] needs to write a label
/// map back onto the file's own grid and header.
pub fn read_image_with_source(path: &Path) -> DataResult<(Image, NiftiSource)> {
    let (v, header) = read_f64(path)?;
    let (canonical, orientation) = to_image(v).to_canonical();
    Ok((canonical, NiftiSource { header, orientation }))
}

/// Reads a label map in canonical order; every value must be a non-negative integer below
/// 65536.
pub fn read_labels(path: &Path) -> DataResult<Labels> {
    let (v, _) = read_f64(path)?;
    let mut data = Vec::with_capacity(v.data.len());
    for (i, &x) in v.data.iter().enumerate() {
        if !(x.fract() == 0.0 && (0.0..=65535.0).contains(&x)) {
            let (nx, ny) = (v.dims[0], v.dims[1]);
            return Err(DataError::nifti(
                path,
                format!(
                    "label value {x} at voxel ({}, {}, {}) is not an integer label between 0 and 65535",
                    i % nx,
                    (i / nx) % ny,
                    i / (nx * ny)
                ),
            ));
        }
        data.push(x as u16);
    }
    Ok(v.with_data(data).to_canonical().0)
}

/// A header holding `affine` as both sform and qform (code 1: scanner anatomical).
fn header_for(dims: [usize; 3], affine: &Affine, datatype: NiftiType) -> NiftiHeader {
    let spacing = affine.spacing();
    let mut h = NiftiHeader {
        dim: [3, dims[0] as u16, dims[1] as u16, dims[2] as u16, 1, 1, 1, 1],
        pixdim: [1.0, spacing[0], spacing[1], spacing[2], 1.0, 1.0, 1.0, 1.0],
        datatype: datatype as i16,
        xyzt_units: 2, // millimetres
        ..Default::default()
    };
    h.sform_code = 1;
    [h.srow_x, h.srow_y, h.srow_z] = affine.0.map(|row| row.map(|v| v as f32));
    if let Some(([b, c, d], qfac)) = quaternion(affine) {
        h.qform_code = 1;
        h.pixdim[0] = qfac as f32;
        (h.quatern_b, h.quatern_c, h.quatern_d) = (b as f32, c as f32, d as f32);
        (h.quatern_x, h.quatern_y, h.quatern_z) =
            (affine.0[0][3] as f32, affine.0[1][3] as f32, affine.0[2][3] as f32);
    } else {
        h.qform_code = 0;
    }
    h
}
fn write_array<T: nifti::DataElement + bytemuck::Pod>(
    path: &Path,
    header: &nifti::NiftiHeader,
    dims: [usize; 3],
    data: Vec<T>,
) -> DataResult<()> {
    if dims.iter().any(|&d| d > u16::MAX as usize) {
        return Err(DataError::nifti(path, format!("dims {dims:?} exceed NIfTI-1's 32767 limit")));
    }
    let arr =
        ndarray::Array::from_shape_vec((dims[0], dims[1], dims[2]).f(), data).map_err(|e| {
            DataError::nifti(path, format!("volume shape does not match its data: {e}"))
        })?;
    // Write beside the target and rename, so a crash never leaves a half-written volume.
    // The nifti writer derives its output name by replacing the last extension, so the temp
    // name carries no dots but the final `.nii` or `.nii.gz`.
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let gz = path.extension().is_some_and(|e| e == "gz");
    let tmp = path.with_file_name(format!(
        "fedtune-tmp-{}-{n}.{}",
        std::process::id(),
        if gz { "nii.gz" } else { "nii" }
    ));
    let result = nifti::writer::WriterOptions::new(&tmp)
        .reference_header(header)
        .write_nifti(&arr)
        .map_err(|e| match e {
            nifti::NiftiError::Io(source) => DataError::Write { path: path.to_owned(), source },
            other => DataError::nifti(path, format!("cannot write NIfTI: {other}")),
        })
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .map_err(|source| DataError::Write { path: path.to_owned(), source })
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes a CT image as int16 HU (values are rounded to whole HU), with its affine.
pub fn write_image(path: &Path, image: &Image) -> DataResult<()> {
    let header = header_for(image.dims, &image.affine, NiftiType::Int16);
    let data: Vec<i16> = image
        .data
        .iter()
        .map(|&hu| hu.round().clamp(i16::MIN as f32, i16::MAX as f32) as i16)
        .collect();
    write_array(path, &header, image.dims, data)
}

/// Writes a label map with its affine, as uint8 when every label fits, else uint16.
pub fn write_labels(path: &Path, labels: &Labels) -> DataResult<()> {
    let header = header_for(labels.dims, &labels.affine, NiftiType::Uint8);
    write_label_data(path, header, labels.dims, &labels.data)
}

/// Writes a canonical label map back onto the grid, voxel order and header of the image it
/// was predicted from (`source`), so that it overlays that image in any viewer.
pub fn write_labels_like(path: &Path, labels: &Labels, source: &NiftiSource) -> DataResult<()> {
    let o = &source.orientation;
    if labels.dims != o.canonical_dims() {
        return Err(DataError::nifti(
            path,
            format!(
                "label map dims {:?} do not match its image's {:?}",
                labels.dims,
                o.canonical_dims()
            ),
        ));
    }
    let mut header = source.header.clone();
    // A label map is never scaled, and its display range is its labels.
    (header.scl_slope, header.scl_inter, header.cal_min, header.cal_max) = (1.0, 0.0, 0.0, 0.0);
    header.intent_code = 0;
    header.descrip = b"fedtune prediction".to_vec();
    header.descrip.resize(80, 0);
    write_label_data(path, header, o.stored_dims, &o.to_stored(&labels.data))
}

fn write_label_data(
    path: &Path,
    mut header: NiftiHeader,
    dims: [usize; 3],
    data: &[u16],
) -> DataResult<()> {
    // The writer sets datatype and bitpix from the array type.
    if data.iter().all(|&l| l <= u8::MAX as u16) {
        header.datatype = NiftiType::Uint8 as i16;
        write_array(path, &header, dims, data.iter().map(|&l| l as u8).collect())
    } else {
        header.datatype = NiftiType::Uint16 as i16;
        write_array(path, &header, dims, data.to_vec())
    }
}
