//! Terminal progress for long-running work; drawn on stderr only when it is a terminal.

use indicatif::{ProgressBar, ProgressStyle};

use crate::train::TrainEvent;

/// A progress bar that follows a training run of `epochs` epochs.
#[derive(Debug)]
pub struct TrainProgress {
    bar: ProgressBar,
    label: String,
    epochs: usize,
}

impl TrainProgress {
    pub fn new(label: &str, epochs: usize, quiet: bool) -> Self {
        let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} steps {msg} ({elapsed}, eta {eta})",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_owned());
        Self { bar, label: label.to_owned(), epochs }
    }

    pub fn on_event(&mut self, event: &TrainEvent) {
        match *event {
            TrainEvent::Caching { done, total } => {
                self.bar.set_message(format!("caching frozen prefix {done}/{total}"));
            }
            TrainEvent::Step { epoch, step, steps_per_epoch, loss } => {
                if self.bar.length() == Some(0) {
                    self.bar.set_length((steps_per_epoch * self.epochs) as u64);
                }
                self.bar.set_position((epoch * steps_per_epoch + step + 1) as u64);
                self.bar.set_message(format!("epoch {}/{} loss {loss:.4}", epoch + 1, self.epochs));
            }
            TrainEvent::Epoch { epoch, mean_loss } => {
                tracing::info!(arm = %self.label, epoch = epoch + 1, mean_loss, "epoch done");
            }
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
