//! `tally replay <projection>`: a replay from the command line, with a progress bar.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use projections::admin::ReplayProgress;
use projections::replay::ReplayLock;
use projections::{Kind, Progress, Projectors};

use crate::config::ReplayArgs;

/// Rebuilds one read model and swaps it in, drawing a bar while it runs.
pub async fn run(args: &ReplayArgs) -> anyhow::Result<()> {
    // Checked by the command line already; a name it allows and `Kind` does not know is
    // a bug, named as such.
    let kind = Kind::from_name(&args.projection).with_context(|| {
        let names: Vec<&str> = Kind::ALL.into_iter().map(Kind::name).collect();
        format!(
            "no projection {:?}; choose one of {}",
            args.projection,
            names.join(", ")
        )
    })?;
    let state = crate::prepare(&args.common).await?;
    let projectors = Projectors::new(state.kafka, state.projector_pool, Progress::default())?;
    let lock = ReplayLock::try_acquire(&projectors, kind)
        .await?
        .with_context(|| {
            format!(
                "a replay of {} is running already (in this or another process); try again when it has finished",
                kind.name()
            )
        })?;
    let progress = ReplayProgress::new();
    let slot = Arc::new(Mutex::new(Some(progress.clone())));

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg} [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    bar.set_message(format!("replaying {}", kind.name()));
    let (ticker_bar, ticker_slot, processed) =
        (bar.clone(), slot.clone(), progress.processed.clone());
    let ticker = tokio::spawn(async move {
        loop {
            if let Some(p) = ticker_slot
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                ticker_bar.set_length(p.total);
            }
            ticker_bar.set_position(processed.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let result = projections::replay::replay(&projectors, kind, lock, progress, &slot, None).await;
    ticker.abort();
    let summary = result?;
    bar.finish_with_message(format!("replayed {}", kind.name()));
    println!(
        "{}: {} events in {:.1} s ({:.0} events/s); the new tables are live",
        kind.name(),
        summary.records,
        summary.seconds,
        summary.per_second
    );
    Ok(())
}
