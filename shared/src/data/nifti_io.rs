//! NIfTI-1 reading and writing through the `nifti` crate.
//!
//! Files are read whole (gzip is detected by its magic bytes, not the file name), the header size
//! is checked first so that NIfTI-2 gets a clear refusal, and the `nifti` crate then decodes any
//! integer or float datatype in either byte order, applying `scl_slope`/`scl_inter`.

use std::io::Read;
use std::path::Path;

use ndarray::ShapeBuilder;
use nifti::{IntoNdArray, NiftiObject, NiftiType};

use super::{DataError, DataResult, Image, Labels, Volume};

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

/// Decodes a NIfTI-1 single file into `f64` values in NIfTI order, with dims and spacing.
fn read_f64(path: &Path) -> DataResult<Volume<f64>> {
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
    let header = obj.header();
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
    let mut spacing = [1f32; 3];
    for (i, s) in spacing.iter_mut().enumerate() {
        let p = header.pixdim[i + 1].abs();
        if !p.is_finite() || p <= 0.0 || i >= rank {
            if i < rank {
                return Err(DataError::nifti(
                    path,
                    format!(
                        "pixdim[{}] = {} is not a positive voxel size",
                        i + 1,
                        header.pixdim[i + 1]
                    ),
                ));
            }
        } else {
            *s = p;
        }
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
    let volume = nifti::InMemNiftiVolume::from_raw_fields(
        raw_dim,
        datatype,
        slope,
        inter,
        obj.into_volume().into_raw_data(),
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
    Ok(Volume { dims, spacing, data })
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

/// Reads a CT image in HU from a NIfTI-1 file (`.nii` or `.nii.gz`).
pub fn read_image(path: &Path) -> DataResult<Image> {
    let v = read_f64(path)?;
    Ok(Volume {
        dims: v.dims,
        spacing: v.spacing,
        data: v.data.iter().map(|&x| x as f32).collect(),
    })
}

/// Reads a label map; every value must be a non-negative integer below 65536.
pub fn read_labels(path: &Path) -> DataResult<Labels> {
    let v = read_f64(path)?;
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
    Ok(Volume { dims: v.dims, spacing: v.spacing, data })
}

fn header_for(dims: [usize; 3], spacing: [f32; 3], datatype: NiftiType) -> nifti::NiftiHeader {
    let mut h = nifti::NiftiHeader {
        dim: [3, dims[0] as u16, dims[1] as u16, dims[2] as u16, 1, 1, 1, 1],
        pixdim: [1.0, spacing[0], spacing[1], spacing[2], 1.0, 1.0, 1.0, 1.0],
        datatype: datatype as i16,
        xyzt_units: 2, // millimetres
        ..Default::default()
    };
    h.sform_code = 1;
    h.qform_code = 0;
    h.srow_x = [spacing[0], 0.0, 0.0, 0.0];
    h.srow_y = [0.0, spacing[1], 0.0, 0.0];
    h.srow_z = [0.0, 0.0, spacing[2], 0.0];
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

/// Writes a CT image as int16 HU (values are rounded to whole HU).
pub fn write_image(path: &Path, image: &Image) -> DataResult<()> {
    let header = header_for(image.dims, image.spacing, NiftiType::Int16);
    let data: Vec<i16> = image
        .data
        .iter()
        .map(|&hu| hu.round().clamp(i16::MIN as f32, i16::MAX as f32) as i16)
        .collect();
    write_array(path, &header, image.dims, data)
}

/// Writes a label map as uint8 when every label fits, else uint16.
pub fn write_labels(path: &Path, labels: &Labels) -> DataResult<()> {
    if labels.data.iter().all(|&l| l <= u8::MAX as u16) {
        let header = header_for(labels.dims, labels.spacing, NiftiType::Uint8);
        write_array(path, &header, labels.dims, labels.data.iter().map(|&l| l as u8).collect())
    } else {
        let header = header_for(labels.dims, labels.spacing, NiftiType::Uint16);
        write_array(path, &header, labels.dims, labels.data.clone())
    }
}
