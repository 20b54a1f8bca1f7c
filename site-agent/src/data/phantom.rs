//! Phantom centers: synthetic head-and-neck CT volumes with organs at risk, drawn with each
//! center's scanner and contouring protocol.
//!
//! Coordinates are in mm: `x` runs to the patient's left (left organs at `+x`), `y` anterior,
//! `z` superior; `z = 0` is the level of the third cervical vertebra. Each globe sits in
//! orbital fat. The same anatomy is drawn
//! for every center; what differs is how it is scanned and how it is contoured, the two reasons
//! the published work gives for a source model losing accuracy at a new center.
//!
//! | profile | grid (in-plane, mm) | slice | noise | HU offset | patients | contouring protocol |
//! |---|---|---|---|---|---|---|
//! | `source` | 72 x 72, 3.2 | 3.0 mm | 15 HU | 0 | size 1.00 | brainstem down to z = 52 mm (cord below); parotid superficial lobe only; temporal lobe as drawn; mandible with condyles; eye globe |
//! | `target-a` | 80 x 80, 3.0 | 2.5 mm | 24 HU | +8 | size 1.07 | brainstem down to z = 44 mm (includes the medulla); whole parotid with a 2 mm margin; temporal lobe extended 4 mm medially and inferiorly; mandible with a 2 mm margin (contoured in a soft-tissue window); globe with a 2.5 mm margin |
//! | `target-b` | 64 x 64, 3.6 | 4.0 mm | 22 HU | -6 | size 0.94 | brainstem down to z = 47 mm and up to z = 88 mm; whole parotid; temporal lobe below z = 80 mm only; mandible with condyles; globe with 1 mm margin |

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::{DataError, DataResult, Image, Labels, Manifest, ManifestCase, Split, Volume};
use shared::organs::OrganMap;

/// The phantoms' organ map: every organ fedtune knows, at its standard label
/// ([`shared::structures::KNOWN_ORGANS`]).
pub fn organ_map() -> OrganMap {
    shared::structures::standard_organ_map()
}

/// A phantom center.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Center {
    Source,
    TargetA,
    TargetB,
}

impl std::str::FromStr for Center {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "source" => Ok(Self::Source),
            "target-a" => Ok(Self::TargetA),
            "target-b" => Ok(Self::TargetB),
            other => Err(format!("unknown center \"{other}\"; use source, target-a or target-b")),
        }
    }
}

impl std::fmt::Display for Center {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Source => "source",
            Self::TargetA => "target-a",
            Self::TargetB => "target-b",
        })
    }
}

/// How a center contours (the labels it draws on the same anatomy).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Protocol {
    /// Brainstem label from this height up; the cord label below it (mm).
    pub brainstem_inferior_mm: f32,
    /// Brainstem label up to this height (mm).
    pub brainstem_superior_mm: f32,
    /// Whether the parotid's deep lobe (medial to the mandible) is contoured.
    pub parotid_deep_lobe: bool,
    /// Margin added around the parotid (mm).
    pub parotid_margin_mm: f32,
    /// Temporal lobe grown medially and inferiorly by this much (mm).
    pub temporal_medial_mm: f32,
    /// Temporal lobe contoured only below this height (mm).
    pub temporal_superior_mm: f32,
    /// Mandible contoured only up to this height (mm); the body ends at 34 mm, the rami and
    /// condyles reach about 50 mm.
    pub mandible_superior_mm: f32,
    /// Margin around the mandible (mm): bone contoured in a soft-tissue window looks wider than
    /// in a bone window.
    pub mandible_margin_mm: f32,
    /// Margin around the eye globe (mm).
    pub eye_margin_mm: f32,
}

/// How a center scans and whom it treats.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Profile {
    pub center: Center,
    pub in_plane: usize,
    pub pixel_mm: f32,
    pub slice_mm: f32,
    pub noise_hu: f32,
    pub hu_offset: f32,
    pub size_mean: f32,
    pub protocol: Protocol,
}

impl Center {
    /// The documented profile of this center (see the module table).
    pub fn profile(self) -> Profile {
        match self {
            Self::Source => Profile {
                center: self,
                in_plane: 72,
                pixel_mm: 3.2,
                slice_mm: 3.0,
                noise_hu: 15.0,
                hu_offset: 0.0,
                size_mean: 1.0,
                protocol: Protocol {
                    brainstem_inferior_mm: 52.0,
                    brainstem_superior_mm: 96.0,
                    parotid_deep_lobe: false,
                    parotid_margin_mm: 0.0,
                    temporal_medial_mm: 0.0,
                    temporal_superior_mm: 200.0,
                    mandible_superior_mm: 200.0,
                    mandible_margin_mm: 0.0,
                    eye_margin_mm: 0.0,
                },
            },
            Self::TargetA => Profile {
                center: self,
                in_plane: 80,
                pixel_mm: 3.0,
                slice_mm: 2.5,
                noise_hu: 24.0,
                hu_offset: 8.0,
                size_mean: 1.07,
                protocol: Protocol {
                    brainstem_inferior_mm: 44.0,
                    brainstem_superior_mm: 96.0,
                    parotid_deep_lobe: true,
                    parotid_margin_mm: 2.0,
                    temporal_medial_mm: 4.0,
                    temporal_superior_mm: 200.0,
                    mandible_superior_mm: 200.0,
                    mandible_margin_mm: 2.0,
                    eye_margin_mm: 2.5,
                },
            },
            Self::TargetB => Profile {
                center: self,
                in_plane: 64,
                pixel_mm: 3.6,
                slice_mm: 4.0,
                noise_hu: 22.0,
                hu_offset: -6.0,
                size_mean: 0.94,
                protocol: Protocol {
                    brainstem_inferior_mm: 47.0,
                    brainstem_superior_mm: 88.0,
                    parotid_deep_lobe: true,
                    parotid_margin_mm: 0.0,
                    temporal_medial_mm: 0.0,
                    temporal_superior_mm: 80.0,
                    mandible_superior_mm: 200.0,
                    mandible_margin_mm: 0.0,
                    eye_margin_mm: 1.0,
                },
            },
        }
    }
}

/// Height of the scanned region (mm).
const Z_EXTENT_MM: f32 = 100.0;

/// One patient's anatomy: a rigid in-plane pose, a size and small per-organ variations.
#[derive(Clone, Debug)]
struct Patient {
    scale: f32,
    cos: f32,
    sin: f32,
    shift: [f32; 3],
    /// Per-organ centre offsets (mm) and radius factors, indexed by `Part`.
    jitter: [([f32; 3], f32); 6],
}

#[derive(Clone, Copy)]
enum Part {
    Temporal = 0,
    Eye = 1,
    Tube = 2,
    Mandible = 3,
    Parotid = 4,
    Head = 5,
}

impl Patient {
    fn sample(rng: &mut ChaCha8Rng, size_mean: f32) -> Self {
        let size = Normal::new(size_mean, 0.035).expect("valid normal");
        let angle: f32 = rng.random_range(-4.0f32..4.0).to_radians();
        let mut jitter = [([0.0; 3], 1.0); 6];
        for j in &mut jitter {
            *j = (
                [
                    rng.random_range(-2.0..2.0),
                    rng.random_range(-2.0..2.0),
                    rng.random_range(-2.0..2.0),
                ],
                rng.random_range(0.93..1.07),
            );
        }
        Self {
            scale: size.sample(rng).clamp(0.8, 1.25),
            cos: angle.cos(),
            sin: angle.sin(),
            shift: [
                rng.random_range(-5.0..5.0),
                rng.random_range(-5.0..5.0),
                rng.random_range(-3.0..3.0),
            ],
            jitter,
        }
    }

    /// Scanner coordinates (mm) to canonical anatomy coordinates.
    fn canonical(&self, p: [f32; 3]) -> [f32; 3] {
        let (x, y) = (p[0] - self.shift[0], p[1] - self.shift[1]);
        let (x, y) = (self.cos * x + self.sin * y, -self.sin * x + self.cos * y);
        [x / self.scale, y / self.scale, (p[2] - self.shift[2] - 60.0) / self.scale + 60.0]
    }

    fn part(&self, part: Part, centre: [f32; 3], radii: [f32; 3]) -> ([f32; 3], [f32; 3]) {
        let (d, f) = self.jitter[part as usize];
        let c = [centre[0] + d[0], centre[1] + d[1], centre[2] + d[2]];
        (c, [radii[0] * f, radii[1] * f, radii[2] * f])
    }
}

/// Normalised ellipsoid distance: < 1 inside.
fn ell(p: [f32; 3], c: [f32; 3], r: [f32; 3]) -> f32 {
    let d = [(p[0] - c[0]) / r[0], (p[1] - c[1]) / r[1], (p[2] - c[2]) / r[2]];
    d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
}

fn ell2(x: f32, y: f32, cx: f32, cy: f32, rx: f32, ry: f32) -> f32 {
    let (dx, dy) = ((x - cx) / rx, (y - cy) / ry);
    dx * dx + dy * dy
}

fn smoothstep(a: f32, b: f32, t: f32) -> f32 {
    ((t - a) / (b - a)).clamp(0.0, 1.0)
}

/// The tissue HU and the organ (label value, before protocol) at a canonical point, mirrored
/// organs found through `|x|` with the side returned separately.
fn anatomy(pt: &Patient, p: [f32; 3], proto: &Protocol) -> (f32, u16) {
    let [x, y, z] = p;
    let ax = x.abs();
    let side_left = x > 0.0;
    // Body outline: neck below 40 mm, head above 55 mm, blended between.
    let t = smoothstep(38.0, 56.0, z);
    let (_, hf) = pt.jitter[Part::Head as usize];
    let (brx, bry, bcy) = ((58.0 + 16.0 * t) * hf, (64.0 + 24.0 * t) * hf, -4.0 + 8.0 * t);
    let body = ell2(x, y, 0.0, bcy, brx, bry);
    if body >= 1.0 || !(-20.0..150.0).contains(&z) {
        return (-1000.0, 0);
    }
    let mut hu = 45.0; // muscle
    if ell2(x, y, 0.0, bcy, brx - 5.0, bry - 5.0) >= 1.0 {
        hu = -90.0; // subcutaneous fat
    }
    let mut label = 0u16;
    let cranial = z >= 56.0;
    if cranial {
        let outer = ell2(x, y, 0.0, bcy, brx - 6.0, bry - 6.0);
        let inner = ell2(x, y, 0.0, bcy, brx - 12.0, bry - 12.0);
        if outer < 1.0 && inner >= 1.0 {
            hu = 950.0; // skull vault
        } else if inner < 1.0 {
            hu = 36.0; // brain
            if z < 62.0 && ell2(x, y, 0.0, -18.0, 17.0, 17.0) >= 1.0 {
                hu = 800.0; // skull base around the foramen magnum
            }
        }
    }
    // Temporal lobes, drawn in the middle cranial fossa.
    let (tc, tr) = pt.part(Part::Temporal, [44.0, 8.0, 76.0], [17.0, 27.0, 13.0]);
    let temporal_true = ell([ax, y, z], tc, tr) < 1.0 && cranial;
    if temporal_true {
        hu = 24.0;
    }
    let grown = {
        let m = proto.temporal_medial_mm;
        let c = [tc[0] - m / 2.0, tc[1], tc[2] - m / 2.0];
        ell([ax, y, z], c, [tr[0] + m / 2.0, tr[1], tr[2] + m / 2.0]) < 1.0 && z >= 56.0
    };
    if (temporal_true || grown) && z <= proto.temporal_superior_mm {
        label = if side_left { 6 } else { 7 };
    }
    // Brainstem and spinal cord: one tube whose centre moves back as it descends.
    let (tubec, tuber) = pt.part(Part::Tube, [0.0, -14.0, 0.0], [10.5, 9.5, 1.0]);
    let tb = smoothstep(40.0, 52.0, z);
    let (cy, rx, ry) =
        (tubec[1] - 14.0 * (1.0 - tb), tuber[0] * (0.7 + 0.3 * tb), tuber[1] * (0.7 + 0.3 * tb));
    let tube_d = ell2(x - tubec[0], y, 0.0, cy, rx, ry);
    if z < 48.0 {
        // Vertebra around the cord, and its body in front.
        if tube_d >= 1.6 && ell2(x - tubec[0], y, 0.0, cy, rx * 2.8, ry * 2.6) < 1.0 {
            hu = 700.0;
        }
        if ell2(x, y, 0.0, cy + 22.0, 13.0, 10.0) < 1.0 {
            hu = 450.0;
        }
    }
    if (1.0..1.6).contains(&tube_d) && z < 100.0 {
        hu = 6.0; // CSF around the tube
    }
    if tube_d < 1.0 && z < 96.0 {
        hu = 33.0;
        if z >= proto.brainstem_inferior_mm && z <= proto.brainstem_superior_mm {
            label = 1;
        } else if z < proto.brainstem_inferior_mm && z >= 2.0 {
            label = 2;
        }
    }
    // Mandible: a bony arch in front, rami rising to the condyles.
    let (mc, mr) = pt.part(Part::Mandible, [0.0, 8.0, 0.0], [40.0, 44.0, 1.0]);
    let mandible = |m: f32| {
        let outer = ell2(x, y, mc[0], mc[1], mr[0] + m, mr[1] + m);
        let inner = ell2(x, y, mc[0], mc[1], mr[0] - 6.0 - m, mr[1] - 6.0 - m);
        let body =
            y > mc[1] - 2.0 - m && (8.0 - m..34.0 + m).contains(&z) && outer < 1.0 && inner >= 1.0;
        let ramus = (34.0 - m..52.0 + m).contains(&z)
            && ell2(ax, y, mr[0] - 3.0, mc[1] - 6.0 - (z - 34.0) * 0.5, 3.5 + m, 6.0 + m) < 1.0;
        body || ramus
    };
    if mandible(0.0) {
        hu = 1150.0;
    }
    if mandible(proto.mandible_margin_mm) && z <= proto.mandible_superior_mm && label == 0 {
        label = 3;
    }
    // Parotids behind the rami; the deep lobe reaches medially.
    let (pc, pr) = pt.part(Part::Parotid, [47.0, -2.0, 34.0], [11.0, 17.0, 15.0]);
    let pd = ell([ax, y, z], pc, pr);
    if pd < 1.0 && hu < 300.0 {
        hu = -15.0;
    }
    let m = proto.parotid_margin_mm;
    let grown = ell([ax, y, z], pc, [pr[0] + m, pr[1] + m, pr[2] + m]) < 1.0;
    if grown && label == 0 && hu < 300.0 && (proto.parotid_deep_lobe || ax >= pc[0] - 5.0) {
        label = if side_left { 4 } else { 5 };
    }
    // Eyes last: they sit in the orbit in front of everything else.
    let (ec, er) = pt.part(Part::Eye, [30.0, 60.0, 84.0], [11.5, 11.5, 11.5]);
    let ed = ell([ax, y, z], ec, er);
    if ed < 1.0 / (0.75 * 0.75) && hu < 300.0 && label != 6 && label != 7 {
        hu = -80.0; // orbital fat around the globe
    }
    if ed < 1.0 {
        hu = if ell([ax, y, z], [ec[0], ec[1] + 8.0, ec[2]], [3.0, 2.0, 3.0]) < 1.0 {
            95.0
        } else {
            12.0
        };
    }
    let m = proto.eye_margin_mm;
    if ell([ax, y, z], ec, [er[0] + m, er[1] + m, er[2] + m]) < 1.0 {
        label = if side_left { 8 } else { 9 };
    }
    (hu, label)
}

/// One phantom case: an image in HU and its label map under the center's protocol.
pub fn generate_case(profile: &Profile, seed: u64) -> (Image, Labels) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let patient = Patient::sample(&mut rng, profile.size_mean);
    let (n, px, dz) = (profile.in_plane, profile.pixel_mm, profile.slice_mm);
    let nz = (Z_EXTENT_MM / dz).round() as usize;
    let dims = [n, n, nz];
    let spacing = [px, px, dz];
    let mut image = Volume::filled(dims, spacing, 0f32);
    let mut labels = Volume::filled(dims, spacing, 0u16);
    let noise = Normal::new(0.0f32, profile.noise_hu).expect("noise sigma is positive");
    let half = (n as f32 - 1.0) / 2.0;
    for z in 0..nz {
        let zc = (z as f32 + 0.5) * dz;
        for y in 0..n {
            for x in 0..n {
                let px_mm = (x as f32 - half) * px;
                let py_mm = (half - y as f32) * px; // row 0 is anterior
                let centre = patient.canonical([px_mm, py_mm, zc]);
                let (_, label) = anatomy(&patient, centre, &profile.protocol);
                // Partial volume through the slice thickness: average three samples.
                let mut hu = 0.0;
                for k in [-1.0f32, 0.0, 1.0] {
                    let p = patient.canonical([px_mm, py_mm, zc + k * dz / 3.0]);
                    hu += anatomy(&patient, p, &profile.protocol).0;
                }
                let i = image.index(x, y, z);
                image.data[i] = hu / 3.0 + profile.hu_offset + noise.sample(&mut rng);
                labels.data[i] = label;
            }
        }
    }
    (image, labels)
}

/// Case `index` of `center`'s patients for `seed`: the same case `write_center` writes.
pub fn center_case(center: Center, seed: u64, index: usize) -> (Image, Labels) {
    let center_salt = match center {
        Center::Source => 0x5eed_0000,
        Center::TargetA => 0x5eed_a000,
        Center::TargetB => 0x5eed_b000,
    };
    generate_case(&center.profile(), seed ^ center_salt ^ ((index as u64) << 20))
}

/// Writes `cases` phantom cases of `center` under `out` (`images/`, `labels/`, `manifest.toml`);
/// the last `test` cases form the test split. Returns the manifest.
pub fn write_center(
    center: Center,
    cases: usize,
    test: usize,
    seed: u64,
    out: &Path,
) -> DataResult<Manifest> {
    if cases == 0 || test >= cases {
        return Err(DataError::Manifest {
            path: out.join("manifest.toml"),
            reason: format!(
                "{cases} cases with {test} for testing leaves none to train on; ask for more cases"
            ),
        });
    }
    for sub in ["images", "labels"] {
        let dir = out.join(sub);
        std::fs::create_dir_all(&dir).map_err(|source| DataError::Write { path: dir, source })?;
    }
    let mut manifest_cases = Vec::with_capacity(cases);
    for i in 0..cases {
        let id = format!("{center}-{:03}", i + 1);
        let (image, labels) = center_case(center, seed, i);
        let image_path = out.join("images").join(format!("{id}.nii.gz"));
        let label_path = out.join("labels").join(format!("{id}.nii.gz"));
        super::write_image(&image_path, &image)?;
        super::write_labels(&label_path, &labels)?;
        let split = if i < cases - test { Split::Train } else { Split::Test };
        manifest_cases.push(ManifestCase { id, image: image_path, label: label_path, split });
    }
    let path: PathBuf = out.join("manifest.toml");
    let manifest = Manifest { path: path.clone(), organs: organ_map(), cases: manifest_cases };
    std::fs::write(&path, manifest.to_toml())
        .map_err(|source| DataError::Write { path, source })?;
    Ok(manifest)
}
