//! Tails as bytes, as pure functions: checking an uploaded tail against the model it applies
//! to, and averaging tails weighted by training cases (FedAvg over the trainable layers).
//!
//! Averaging runs in f64 over the sites in the order given (the caller sorts them by name),
//! so the same tails give the same bytes on every run and after every restart.

use std::collections::{BTreeMap, HashMap};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use shared::weights::{self, Federated, METADATA_KEY, TailOf, WeightsManifest, in_layers};

/// Why a tail is refused or cannot be averaged.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FedError {
    #[error("not a tail file: {0}")]
    Format(String),
    #[error("the tail does not fit: {0}")]
    Mismatch(String),
}

fn names_shapes(st: &[u8]) -> Result<BTreeMap<String, (Dtype, Vec<usize>)>, FedError> {
    let (_, meta) =
        SafeTensors::read_metadata(st).map_err(|e| FedError::Format(format!("header: {e}")))?;
    Ok(meta.tensors().into_iter().map(|(n, i)| (n, (i.dtype, i.shape.clone()))).collect())
}

/// Checks an uploaded tail, read as it arrived, against its base model's header: it names
/// that base, holds the last `k` layers (`k` as the task asked), the same config and organ
/// map, exactly the base's tensors of those layers with their dtypes and shapes, all f32 and
/// finite. Neither file is held in memory.
pub fn check_tail_header(
    tail: &weights::Inspected,
    base: &weights::Header,
    base_sha256: &str,
    k: usize,
) -> Result<(), FedError> {
    let m = &tail.header.manifest;
    let b = &base.manifest;
    let Some(t) = &m.tail else {
        return Err(FedError::Format(
            "a full model where a tail of the task's layers was expected".into(),
        ));
    };
    if t.base_sha256 != base_sha256 {
        return Err(FedError::Mismatch(format!(
            "it applies to model {}, the task's base is {base_sha256}",
            t.base_sha256
        )));
    }
    if t.layers != k {
        return Err(FedError::Mismatch(format!(
            "it holds {} layers; the task trains {k}",
            t.layers
        )));
    }
    if m.config != b.config || m.organs != b.organs {
        return Err(FedError::Mismatch("its config or organ map is not the base model's".into()));
    }
    let layers = m.tail_layer_names().unwrap_or_default();
    let want: BTreeMap<String, (Dtype, Vec<usize>)> =
        base.tensors().into_iter().filter(|(n, _)| in_layers(n, layers)).collect();
    let have = tail.header.tensors();
    if have != want {
        let missing = want.keys().find(|n| !have.contains_key(*n));
        let extra = have.keys().find(|n| !want.contains_key(*n));
        return Err(FedError::Mismatch(match (missing, extra) {
            (Some(n), _) => format!("tensor \"{n}\" of its layers is missing"),
            (_, Some(n)) => format!("tensor \"{n}\" is not one of its layers'"),
            _ => "a tensor's dtype or shape differs from the base model's".into(),
        }));
    }
    if have.values().any(|(d, _)| *d != Dtype::F32) {
        return Err(FedError::Mismatch("tails are f32".into()));
    }
    // One NaN or infinity would spread through every average after it.
    if tail.all_finite != Some(true) {
        return Err(FedError::Mismatch("a tensor holds a NaN or infinity".into()));
    }
    Ok(())
}

/// One site's tail in an average.
#[derive(Clone, Copy, Debug)]
pub struct Contribution<'a> {
    pub bytes: &'a [u8],
    /// Training cases: the weight.
    pub cases: u32,
}

/// The weighted average of tails of one base model (weights: training cases; equal weights
/// when every count is 0), as a tail file whose provenance says how it came to be. Every
/// tensor is averaged, batch-norm statistics too: the published model needs them, and with
/// FedBN each site applies its own over them.
pub fn average(contributions: &[Contribution<'_>], fed: Federated) -> Result<Vec<u8>, FedError> {
    let first =
        contributions.first().ok_or_else(|| FedError::Mismatch("no tails to average".into()))?;
    let manifest =
        weights::read_manifest(first.bytes).map_err(|e| FedError::Format(e.to_string()))?;
    let tail: TailOf =
        manifest.tail.clone().ok_or_else(|| FedError::Format("a full model".into()))?;
    let parsed = contributions
        .iter()
        .map(|c| SafeTensors::deserialize(c.bytes).map_err(|e| FedError::Format(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let shapes = names_shapes(first.bytes)?;
    for c in &contributions[1..] {
        let m = weights::read_manifest(c.bytes).map_err(|e| FedError::Format(e.to_string()))?;
        if m.tail.as_ref() != Some(&tail)
            || m.config != manifest.config
            || m.organs != manifest.organs
        {
            return Err(FedError::Mismatch("the tails are of different models or layers".into()));
        }
        if names_shapes(c.bytes)? != shapes {
            return Err(FedError::Mismatch("the tails hold different tensors".into()));
        }
    }
    let total: f64 = contributions.iter().map(|c| f64::from(c.cases)).sum();
    let weights: Vec<f64> = if total > 0.0 {
        contributions.iter().map(|c| f64::from(c.cases) / total).collect()
    } else {
        vec![1.0 / contributions.len() as f64; contributions.len()]
    };
    let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(shapes.len());
    for (name, (dtype, shape)) in &shapes {
        if *dtype != Dtype::F32 {
            return Err(FedError::Mismatch(format!("tensor \"{name}\" is not f32")));
        }
        let mut acc: Vec<f64> = Vec::new();
        for (st, w) in parsed.iter().zip(&weights) {
            let view = st.tensor(name).map_err(|e| FedError::Format(e.to_string()))?;
            let data = view.data();
            if acc.is_empty() {
                acc = vec![0.0; data.len() / 4];
            }
            for (a, b) in acc.iter_mut().zip(data.chunks_exact(4)) {
                *a += w * f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
        let bytes: Vec<u8> = acc.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect();
        out.push((name.clone(), shape.clone(), bytes));
    }
    let averaged = WeightsManifest {
        provenance: weights::Provenance {
            parent_sha256: Some(tail.base_sha256.clone()),
            trainable_layers: Some(tail.layers),
            epochs: 0,
            seed: 0,
            site: None,
            train_slices: 0,
            federated: Some(fed),
        },
        ..manifest
    };
    let json = serde_json::to_string(&averaged).expect("manifest serialises");
    let views = out
        .iter()
        .map(|(n, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data).map(|v| (n.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| FedError::Format(e.to_string()))?;
    safetensors::serialize(views, Some(HashMap::from([(METADATA_KEY.to_owned(), json)])))
        .map_err(|e| FedError::Format(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use shared::architecture::ModelConfig;
    use shared::organs::OrganMap;

    const BASE: &str = "ab00000000000000000000000000000000000000000000000000000000000000";

    /// [`check_tail_header`] over whole files, as the coordinator reads them in a stream.
    fn check_tail(
        tail: &[u8],
        base: &[u8],
        base_sha256: &str,
        k: usize,
    ) -> Result<WeightsManifest, FedError> {
        let inspect = |bytes: &[u8]| {
            let mut i = weights::Inspect::new().checking_finite();
            i.update(bytes).and_then(|()| i.finish()).map_err(|e| FedError::Format(e.to_string()))
        };
        let tail = inspect(tail)?;
        let base = inspect(base).map_err(|e| FedError::Format(format!("base: {e}")))?;
        check_tail_header(&tail, &base.header, base_sha256, k)?;
        Ok(tail.header.manifest)
    }

    fn manifest(tail: Option<TailOf>) -> WeightsManifest {
        let config = ModelConfig::preset("tiny").unwrap();
        let organs = OrganMap::new([(1, "brainstem".to_owned())].into()).unwrap();
        let layers = config.layers(organs.num_classes()).into_iter().map(|l| l.name).collect();
        WeightsManifest {
            format: weights::FORMAT.into(),
            config,
            organs,
            layers,
            provenance: weights::Provenance::default(),
            tail,
        }
    }

    /// A weights file with `tensors` (name, values) of shape [len].
    fn file(m: &WeightsManifest, tensors: &[(&str, Vec<f32>)]) -> Vec<u8> {
        let data: Vec<(String, Vec<u8>, usize)> = tensors
            .iter()
            .map(|(n, v)| {
                (n.to_string(), v.iter().flat_map(|x| x.to_le_bytes()).collect(), v.len())
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = data
            .iter()
            .map(|(n, d, len)| (n.clone(), TensorView::new(Dtype::F32, vec![*len], d).unwrap()))
            .collect();
        let json = serde_json::to_string(m).unwrap();
        safetensors::serialize(views, Some(HashMap::from([(METADATA_KEY.to_owned(), json)])))
            .unwrap()
    }

    fn tensor(bytes: &[u8], name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(bytes).unwrap();
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    fn fed() -> Federated {
        Federated {
            round: "r".into(),
            step: 1,
            rounds: 2,
            sites: vec!["a".into(), "b".into()],
            cases: vec![1, 3],
            ..Default::default()
        }
    }

    #[test]
    fn tails_average_weighted_by_training_cases() {
        let m = manifest(Some(TailOf { base_sha256: BASE.into(), layers: 1 }));
        let head = m.layers.last().unwrap().clone();
        let (w, mean) = (format!("{head}.conv.weight"), format!("{head}.bn.running_mean"));
        let a = file(&m, &[(&w, vec![1.0, 2.0]), (&mean, vec![0.0])]);
        let b = file(&m, &[(&w, vec![5.0, 6.0]), (&mean, vec![4.0])]);
        let avg = average(
            &[Contribution { bytes: &a, cases: 1 }, Contribution { bytes: &b, cases: 3 }],
            fed(),
        )
        .unwrap();
        // (1 * a + 3 * b) / 4, statistics too.
        assert_eq!(tensor(&avg, &w), [4.0, 5.0]);
        assert_eq!(tensor(&avg, &mean), [3.0]);
        let out = weights::read_manifest(&avg).unwrap();
        assert_eq!(out.tail, m.tail);
        assert_eq!(out.provenance.parent_sha256.as_deref(), Some(BASE));
        assert_eq!(out.provenance.federated.unwrap().cases, [1, 3]);
        // Equal weights when no site counted its cases; the same inputs give the same bytes.
        let eq = average(
            &[Contribution { bytes: &a, cases: 0 }, Contribution { bytes: &b, cases: 0 }],
            fed(),
        )
        .unwrap();
        assert_eq!(tensor(&eq, &w), [3.0, 4.0]);
        let again = average(
            &[Contribution { bytes: &a, cases: 1 }, Contribution { bytes: &b, cases: 3 }],
            fed(),
        )
        .unwrap();
        assert_eq!(avg, again);
        // Tails of different tensors are not averaged.
        let c = file(&m, &[(&w, vec![1.0, 2.0])]);
        assert!(
            average(
                &[Contribution { bytes: &a, cases: 1 }, Contribution { bytes: &c, cases: 1 }],
                fed()
            )
            .is_err()
        );
    }

    #[test]
    fn a_tail_must_hold_exactly_its_layers_of_the_base() {
        let full = manifest(None);
        let names: Vec<String> = full.layers.clone();
        let (head, before) = (&names[names.len() - 1], &names[names.len() - 2]);
        let base = file(
            &full,
            &[
                (&format!("{before}.conv.weight"), vec![0.0; 3]),
                (&format!("{head}.conv.weight"), vec![0.0; 2]),
                (&format!("{head}.conv.bias"), vec![0.0]),
            ],
        );
        let tail_m = manifest(Some(TailOf { base_sha256: BASE.into(), layers: 1 }));
        let good = file(
            &tail_m,
            &[
                (&format!("{head}.conv.weight"), vec![1.0; 2]),
                (&format!("{head}.conv.bias"), vec![1.0]),
            ],
        );
        assert!(check_tail(&good, &base, BASE, 1).is_ok());
        assert!(
            matches!(check_tail(&good, &base, BASE, 2), Err(FedError::Mismatch(m)) if m.contains("holds 1 layers"))
        );
        let other = "cd".repeat(32);
        assert!(
            matches!(check_tail(&good, &base, &other, 1), Err(FedError::Mismatch(m)) if m.contains("applies to model"))
        );
        let missing = file(&tail_m, &[(&format!("{head}.conv.weight"), vec![1.0; 2])]);
        assert!(
            matches!(check_tail(&missing, &base, BASE, 1), Err(FedError::Mismatch(m)) if m.contains("missing"))
        );
        let extra = file(
            &tail_m,
            &[
                (&format!("{head}.conv.weight"), vec![1.0; 2]),
                (&format!("{head}.conv.bias"), vec![1.0]),
                (&format!("{before}.conv.weight"), vec![0.0; 3]),
            ],
        );
        assert!(
            matches!(check_tail(&extra, &base, BASE, 1), Err(FedError::Mismatch(m)) if m.contains("not one of its layers"))
        );
        let shape = file(
            &tail_m,
            &[
                (&format!("{head}.conv.weight"), vec![1.0; 3]),
                (&format!("{head}.conv.bias"), vec![1.0]),
            ],
        );
        assert!(check_tail(&shape, &base, BASE, 1).is_err());
        let nan = file(
            &tail_m,
            &[
                (&format!("{head}.conv.weight"), vec![1.0, f32::NAN]),
                (&format!("{head}.conv.bias"), vec![1.0]),
            ],
        );
        assert!(
            matches!(check_tail(&nan, &base, BASE, 1), Err(FedError::Mismatch(m)) if m.contains("NaN"))
        );
        assert!(
            matches!(check_tail(&base, &base, BASE, 1), Err(FedError::Format(_))),
            "a full model is no tail"
        );
    }
}
