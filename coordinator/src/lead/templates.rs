//! Study templates: the task a transfer round sends every target site, as arms.
//!
//! - `transfer`: Model_S as it is, Model_T from scratch, Model_ST fine-tuned with k layers (the
//!   published experiment).
//! - `sweep`: Model_S and Model_ST for every k of a list (the retrained-layer study).
//! - `cases-sweep`: Model_S, then Model_T and Model_ST for every training-set size of a list
//!   (how many contoured cases a new center needs).
//!
//! Model_S is the study's base model, or is trained by a source site in the same round.

use proto::pb;

/// Which template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Template {
    Transfer,
    Sweep,
    CasesSweep,
}

impl Template {
    pub fn as_str(self) -> &'static str {
        match self {
            Template::Transfer => "transfer",
            Template::Sweep => "sweep",
            Template::CasesSweep => "cases-sweep",
        }
    }
}

/// Hyperparameters of a template; zero means the agent's default.
#[derive(Clone, Debug, Default)]
pub struct TemplateOptions {
    /// Layers fine-tuned for Model_ST: one for transfer and cases-sweep (empty: the paper's
    /// share of the model's layers), the list for sweep.
    pub trainable_layers: Vec<u32>,
    /// Training-set sizes for cases-sweep.
    pub train_cases: Vec<u32>,
    /// Model_T epochs (and the task default).
    pub epochs: u32,
    /// Model_ST epochs.
    pub finetune_epochs: u32,
    pub learning_rate: f64,
    pub finetune_learning_rate: f64,
    pub batch_size: u32,
    pub seed: u64,
    /// Model config of Model_T when the study has a base model; of Model_S with a source.
    pub config: String,
}

fn base() -> pb::ArmSpec {
    pb::ArmSpec { kind: pb::ArmKind::Base as i32, ..Default::default() }
}

/// The target sites' task spec of a template.
pub fn target_spec(t: Template, o: &TemplateOptions) -> Result<pb::TaskSpec, String> {
    let scratch = |n: u32| pb::ArmSpec {
        kind: pb::ArmKind::Scratch as i32,
        train_cases: n,
        epochs: o.epochs,
        learning_rate: o.learning_rate,
        ..Default::default()
    };
    let finetune = |k: u32, n: u32| pb::ArmSpec {
        kind: pb::ArmKind::Finetune as i32,
        trainable_layers: k,
        train_cases: n,
        epochs: o.finetune_epochs,
        learning_rate: o.finetune_learning_rate,
        share: false,
    };
    let one_k = || match o.trainable_layers.as_slice() {
        [] => Ok(0),
        [k] => Ok(*k),
        more => Err(format!(
            "{} takes one --trainable-layers value, not {}; use --task sweep for a list",
            t.as_str(),
            more.len()
        )),
    };
    let arms = match t {
        // Model_ST's tail is offered to the study (uploaded where the site's policy shares
        // weights) so that cross-eval can score it at the other sites.
        Template::Transfer => {
            vec![base(), scratch(0), pb::ArmSpec { share: true, ..finetune(one_k()?, 0) }]
        }
        Template::Sweep => {
            if o.trainable_layers.is_empty() {
                return Err("sweep needs --trainable-layers K1,K2,...".into());
            }
            std::iter::once(base())
                .chain(o.trainable_layers.iter().map(|&k| finetune(k, 0)))
                .collect()
        }
        Template::CasesSweep => {
            if o.train_cases.is_empty() || o.train_cases.contains(&0) {
                return Err("cases-sweep needs --train-cases N1,N2,... (each at least 1)".into());
            }
            let k = one_k()?;
            std::iter::once(base())
                .chain(o.train_cases.iter().flat_map(|&n| [scratch(n), finetune(k, n)]))
                .collect()
        }
    };
    Ok(pb::TaskSpec {
        kind: pb::TaskKind::TransferTarget as i32,
        epochs: o.epochs,
        batch_size: o.batch_size,
        learning_rate: o.learning_rate,
        seed: o.seed,
        config: o.config.clone(),
        arms,
        template: t.as_str().into(),
        ..Default::default()
    })
}

/// A federated round's options.
#[derive(Clone, Copy, Debug, Default)]
pub struct FedOptions {
    pub rounds: u32,
    pub keep_local_bn: bool,
    pub prox_mu: f64,
}

/// A federated round: FedAvg of the last k layers (one `trainable_layers` value, or the
/// paper's share) over `fed.rounds` steps of `epochs` local epochs each.
pub fn fedavg_spec(o: &TemplateOptions, fed: FedOptions) -> Result<pb::TaskSpec, String> {
    let k = match o.trainable_layers.as_slice() {
        [] => 0,
        [k] => *k,
        _ => return Err("fedavg takes one --trainable-layers value".into()),
    };
    if fed.rounds == 0 {
        return Err("fedavg needs --rounds R (at least 1)".into());
    }
    Ok(pb::TaskSpec {
        kind: pb::TaskKind::Fedavg as i32,
        trainable_layers: k,
        epochs: o.epochs,
        batch_size: o.batch_size,
        learning_rate: o.learning_rate,
        seed: o.seed,
        fed: Some(pb::FedSpec {
            rounds: fed.rounds,
            keep_local_bn: fed.keep_local_bn,
            prox_mu: fed.prox_mu,
            step: 0,
        }),
        template: "fedavg".into(),
        ..Default::default()
    })
}

/// Every model of the study scored at every site (the coordinator fills in the models).
pub fn cross_eval_spec() -> pb::TaskSpec {
    pb::TaskSpec {
        kind: pb::TaskKind::CrossEval as i32,
        template: "cross-eval".into(),
        ..Default::default()
    }
}

/// The specs of replicate `i` (0-based) of `n` of a series: the seed moves by `i` (the
/// default seed, 17, when none was given), for the targets and the source alike.
pub fn replicate(
    spec: &pb::TaskSpec,
    source: Option<&pb::TaskSpec>,
    i: u32,
    n: u32,
    series: &str,
) -> (pb::TaskSpec, Option<pb::TaskSpec>) {
    let seed = if spec.seed == 0 { 17 } else { spec.seed } + u64::from(i);
    let mark = |s: &pb::TaskSpec| pb::TaskSpec {
        seed,
        replicate: i + 1,
        replicates: n,
        series: series.to_owned(),
        ..s.clone()
    };
    (mark(spec), source.map(mark))
}

/// The source site's task spec: train Model_S with `epochs`, evaluate, upload.
pub fn source_spec(o: &TemplateOptions, epochs: u32) -> pb::TaskSpec {
    pb::TaskSpec {
        kind: pb::TaskKind::TransferSource as i32,
        epochs,
        batch_size: o.batch_size,
        learning_rate: o.learning_rate,
        seed: o.seed,
        config: o.config.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_expand_to_arms() {
        let o = TemplateOptions { trainable_layers: vec![3], ..Default::default() };
        let s = target_spec(Template::Transfer, &o).unwrap();
        let kinds: Vec<i32> = s.arms.iter().map(|a| a.kind).collect();
        assert_eq!(kinds, [1, 2, 3]);
        assert_eq!(s.arms[2].trainable_layers, 3);
        assert_eq!(s.template, "transfer");

        let o = TemplateOptions { trainable_layers: vec![1, 2, 4], ..Default::default() };
        let s = target_spec(Template::Sweep, &o).unwrap();
        assert_eq!(s.arms.len(), 4);
        assert!(target_spec(Template::Transfer, &o).is_err(), "transfer takes one k");

        let o = TemplateOptions { train_cases: vec![1, 3], ..Default::default() };
        let s = target_spec(Template::CasesSweep, &o).unwrap();
        let arms: Vec<(i32, u32)> = s.arms.iter().map(|a| (a.kind, a.train_cases)).collect();
        assert_eq!(arms, [(1, 0), (2, 1), (3, 1), (2, 3), (3, 3)]);
        assert!(target_spec(Template::CasesSweep, &TemplateOptions::default()).is_err());
        assert!(target_spec(Template::Sweep, &TemplateOptions::default()).is_err());
    }

    #[test]
    fn replicates_move_the_seed_and_share_a_series() {
        let o = TemplateOptions { seed: 5, ..Default::default() };
        let t = target_spec(Template::Transfer, &o).unwrap();
        assert!(t.arms[2].share, "Model_ST's tail is offered to the study");
        let s = source_spec(&o, 3);
        let (t2, s2) = replicate(&t, Some(&s), 2, 3, "x");
        assert_eq!((t2.seed, t2.replicate, t2.replicates, t2.series.as_str()), (7, 3, 3, "x"));
        assert_eq!(s2.unwrap().seed, 7);
        let (d, _) = replicate(
            &target_spec(Template::Transfer, &TemplateOptions::default()).unwrap(),
            None,
            0,
            2,
            "y",
        );
        assert_eq!(d.seed, 17, "the agent's default seed, made explicit");
        let f = fedavg_spec(
            &TemplateOptions { trainable_layers: vec![2], epochs: 3, ..Default::default() },
            FedOptions { rounds: 4, keep_local_bn: true, prox_mu: 0.1 },
        )
        .unwrap();
        assert_eq!((f.kind, f.trainable_layers, f.epochs), (pb::TaskKind::Fedavg as i32, 2, 3));
        assert_eq!(f.fed.unwrap().rounds, 4);
        assert!(fedavg_spec(&o, FedOptions::default()).is_err(), "no rounds");
    }
}
