"""Reference values for site-agent/tests/it/dicom.rs, from independent tools.

Run: python3 site-agent/tests/reference/dicom_reference.py > site-agent/tests/reference/dicom_reference.json
Needs: pip install numpy pydicom rt-utils (rt-utils 1.2.7 brings opencv-python).

- The dicompyler BODY contour rasterised by rt-utils (cv2.fillPoly on the CT grid), as runs
  of set pixels in rt-utils' (row, column) order of the one slice.
- pydicom's HU (pixel_array * RescaleSlope + RescaleIntercept) of CT_small and of the CT5N
  series in the order of ImagePositionPatient along the slice normal, and each series'
  voxel-to-patient affine built from ImagePositionPatient, ImageOrientationPatient and
  PixelSpacing (LPS, as DICOM).
"""
import json
import os

import numpy as np
import pydicom
import rt_utils.rtstruct_builder
import warnings
from rt_utils import RTStructBuilder

# rt-utils 1.2.7 calls warnings.warn with warn_only=True but never imports warnings.
rt_utils.rtstruct_builder.warnings = warnings

root = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "shared", "testdata", "dicom")
out = {}

# rt-utils reads every DICOM file in the folder that has pixels; ct.0.dcm is the only one.
rt = RTStructBuilder.create_from(
    dicom_series_path=os.path.join(root, "dicompyler"),
    rt_struct_path=os.path.join(root, "dicompyler", "rtss.dcm"),
    warn_only=True,  # the structure set references 100 more slices than the one shipped
)
body = rt.get_roi_mask_by_name("BODY")  # (rows, columns, slices)
flat = body[:, :, 0].reshape(-1)
runs, start = [], None
for i, v in enumerate(np.append(flat, False)):
    if v and start is None:
        start = i
    elif not v and start is not None:
        runs.append([start, i - start])
        start = None
out["dicompyler_body"] = {"tool": "rt-utils " + __import__("importlib.metadata").metadata.version("rt-utils"),
                          "voxels": int(flat.sum()), "runs": runs}


def series(files):
    ds = [pydicom.dcmread(f) for f in files]
    iop = np.array(ds[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    ds.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, float), normal)))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in ds])
    ps = [float(v) for v in ds[0].PixelSpacing]
    origin = np.array(ds[0].ImagePositionPatient, float)
    step = (np.array(ds[-1].ImagePositionPatient, float) - origin) / max(len(ds) - 1, 1)
    if len(ds) == 1:
        step = normal * float(ds[0].SliceThickness)
    aff = np.eye(4)
    aff[:3, 0] = iop[:3] * ps[1]
    aff[:3, 1] = iop[3:] * ps[0]
    aff[:3, 2] = step
    aff[:3, 3] = origin
    return {
        "instance_numbers": [int(d.InstanceNumber) for d in ds],
        "shape_kji": list(hu.shape),
        "slice_sums": [float(s.sum()) for s in hu],
        "v_k0_j2_i3": float(hu[0, 2, 3]),
        "v_last": float(hu[-1, -1, -1]),
        "affine_lps": aff[:3].tolist(),
    }


ct5n = os.path.join(root, "pydicom", "CT5N")
out["ct5n"] = series([os.path.join(ct5n, f) for f in sorted(os.listdir(ct5n))])
out["ct_small"] = series([os.path.join(root, "pydicom", "CT_small.dcm")])
print(json.dumps(out))
