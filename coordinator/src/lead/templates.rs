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
        Template::Transfer => vec![base(), scratch(0), finetune(one_k()?, 0)],
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
}
