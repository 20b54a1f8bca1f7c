"""Reference values for site-agent/tests/it/metrics.rs, from independent tools.

Run: python3 site-agent/tests/reference/reference_values.py
Needs: numpy, scipy, medpy (pip install numpy scipy; pip install --no-deps medpy).
The masks and samples are defined by formulas that the Rust tests rebuild exactly.
"""
import numpy as np
from medpy.metric.binary import dc, hd95
from scipy import stats

DIMS = (20, 24, 16)
SPACING = (0.9, 1.1, 2.5)


def ellipsoid(c, r):
    x, y, z = np.meshgrid(*[np.arange(d) for d in DIMS], indexing="ij")
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 < 1.0


def box(lo, hi):
    m = np.zeros(DIMS, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


pairs = {
    "ellipsoid_vs_box": (ellipsoid((9.5, 11.0, 7.0), (6.0, 7.0, 4.0)), box((5, 6, 3), (15, 17, 11))),
    "edge_touching": (ellipsoid((2.0, 11.0, 7.0), (5.0, 6.0, 3.0)), box((0, 4, 4), (6, 18, 12))),
    "far_apart": (box((1, 1, 1), (4, 5, 3)), ellipsoid((15.0, 18.0, 12.0), (3.0, 4.0, 2.5))),
}
for name, (pred, truth) in pairs.items():
    print(f"{name}: dice={dc(pred, truth)!r} hd95={hd95(pred, truth, voxelspacing=SPACING)!r}")


def sample(n, seed, scale):
    # A small LCG so the Rust test regenerates the same numbers.
    state = seed
    out = []
    for _ in range(n):
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        out.append(((state >> 11) / 2**53 - 0.5) * scale)
    return np.array(out)


cases = {
    "exact_n10": (sample(10, 1, 0.2) + 0.05, sample(10, 2, 0.2)),
    "exact_n20": (sample(20, 3, 0.1) + 0.03, sample(20, 4, 0.1)),
    "ties_and_zeros": (
        np.array([0.81, 0.75, 0.90, 0.66, 0.70, 0.88, 0.79, 0.91, 0.72, 0.85, 0.60, 0.77]),
        np.array([0.80, 0.70, 0.85, 0.66, 0.65, 0.83, 0.80, 0.86, 0.72, 0.80, 0.62, 0.70]),
    ),
    "large_n60": (sample(60, 5, 0.3) + 0.02, sample(60, 6, 0.3)),
}
for name, (x, y) in cases.items():
    d = x - y
    exact = len(d) <= 50 and not np.any(d == 0) and len(np.unique(np.abs(d))) == len(d)
    w = stats.wilcoxon(x, y, method="exact" if exact else "asymptotic", correction=False)
    t = stats.ttest_rel(x, y)
    print(f"{name}: wilcoxon_method={'exact' if exact else 'asymptotic'} W={w.statistic!r} p={w.pvalue!r} "
          f"t={t.statistic!r} t_p={t.pvalue!r}")

# The real NIfTI files in ../shared/testdata/nifti (read with nibabel).
import os
import nibabel as nib

root = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "shared", "testdata", "nifti")
for f in ["anatomical.nii", "standard.nii.gz", "example4d.nii.gz"]:
    img = nib.load(os.path.join(root, f))
    data = np.asanyarray(img.dataobj).astype(np.float64)
    h = img.header
    print(f"{f}: shape={img.shape} dtype={h.get_data_dtype()} zooms={h.get_zooms()} "
          f"slope={h['scl_slope']} inter={h['scl_inter']} sum={data.sum()!r} "
          f"v000={data.flat[0]!r} v_last={data.reshape(-1, order='F')[-1]!r} "
          f"v123={data[1, 2, 3] if data.ndim == 3 else None!r}")

# The same files as fedtune reads them: reoriented to LPS (fedtune's canonical order).
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

for f in ["anatomical.nii", "standard.nii.gz"]:
    img = nib.load(os.path.join(root, f))
    t = ornt_transform(io_orientation(img.affine), axcodes2ornt(("L", "P", "S")))
    lps = apply_orientation(np.asanyarray(img.dataobj).astype(np.float64), t)
    aff = img.affine @ inv_ornt_aff(t, img.shape)
    print(f"{f} as LPS: v000={lps[0, 0, 0]!r} v123={lps[1, 2, 3]!r} v223={lps[2, 2, 3]!r} "
          f"v001={lps[0, 0, 1]!r} v_last={lps.reshape(-1, order='F')[-1]!r} affine={aff[:3].tolist()}")

std = np.asanyarray(nib.load(os.path.join(root, "standard.nii.gz")).dataobj) > 0
shifted = np.zeros_like(std)
shifted[1:, :, :] = std[:-1, :, :]
zooms = nib.load(os.path.join(root, "standard.nii.gz")).header.get_zooms()
print(f"standard_shifted_x1: dice={dc(shifted, std)!r} hd95={hd95(shifted, std, voxelspacing=zooms)!r}")
