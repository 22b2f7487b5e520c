//! The ranker training run's learning curve: `learning_curve.md` (a table) and
//! `learning_curve.png` (validation NDCG@10 against training examples), rewritten in the run's
//! folder after every validation so a long run can be watched as it goes.

use std::path::Path;

use anyhow::{bail, Result};
use ranker_service::train::Evaluation;

/// NDCG@10 of the fused order at `weight` in `e`, when recorded.
fn fused_ndcg(e: &Evaluation, weight: f32) -> Option<f64> {
    e.fused.iter().find(|f| f.weight == weight).map(|f| f.all_users.get(10).ndcg)
}

/// The retriever's own NDCG@10 on the validation sample (the fused order at weight 0), from the
/// latest validation that recorded it (the sample is fixed for a run).
fn retriever_ndcg(all: &[Evaluation]) -> Option<f64> {
    all.iter().rev().find_map(|e| fused_ndcg(e, 0.0))
}

/// The fusion weights recorded in any validation, weight 0 (the retriever) excluded.
fn weights(all: &[Evaluation]) -> Vec<f32> {
    let mut w: Vec<f32> = all.iter().flat_map(|e| e.fused.iter().map(|f| f.weight)).filter(|&w| w > 0.0).collect();
    w.sort_by(f32::total_cmp);
    w.dedup();
    w
}

/// The markdown table: one row per validation.
pub fn table(all: &[Evaluation]) -> String {
    let ws = weights(all);
    let mut out = String::from("# Ranker training: learning curve (validation sample, all users)\n\n");
    if let Some(r) = retriever_ndcg(all) {
        out += &format!("The retriever's own order on the same users (the checkpoint the run drew its candidates from): NDCG@10 {r:.4}. Fused = the gateway's rule at weight w (`llamarec_common::fusion`).\n\n");
    }
    out += "| step | examples | train loss | LLM alone N@10 | LLM alone R@10 |";
    for w in &ws {
        out += &format!(" fused w {w} N@10 |");
    }
    out += "\n|---|---|---|---|---|";
    out += &"---|".repeat(ws.len());
    out += "\n";
    for e in all {
        let at10 = e.all_users.get(10);
        out += &format!(
            "| {} | {} | {} | {:.4} | {:.4} |",
            e.step,
            e.examples,
            e.train_loss.map(|l| format!("{l:.3}")).unwrap_or_else(|| "–".into()),
            at10.ndcg,
            at10.recall
        );
        for &w in &ws {
            out += &fused_ndcg(e, w).map(|v| format!(" {v:.4} |")).unwrap_or_else(|| " – |".into());
        }
        out += "\n";
    }
    out
}

/// Writes `learning_curve.md` and `learning_curve.png` into `dir`.
pub fn write(dir: &Path, all: &[Evaluation]) -> Result<()> {
    std::fs::write(dir.join("learning_curve.md"), table(all))?;
    draw(&dir.join("learning_curve.png"), all)
}

pub fn draw(path: &Path, all: &[Evaluation]) -> Result<()> {
    use plotters::prelude::*;

    if all.is_empty() {
        bail!("no validation to draw");
    }
    let llm: Vec<(f64, f64)> = all.iter().map(|e| (e.examples as f64, e.all_users.get(10).ndcg)).collect();
    let ws = weights(all);
    let fused: Vec<(f32, Vec<(f64, f64)>)> =
        ws.iter().map(|&w| (w, all.iter().filter_map(|e| fused_ndcg(e, w).map(|v| (e.examples as f64, v))).collect())).collect();
    let retriever = retriever_ndcg(all);
    let x_max = (llm.iter().map(|p| p.0).fold(0.0, f64::max) * 1.05).max(1.0);
    let ys = llm.iter().map(|p| p.1).chain(fused.iter().flat_map(|(_, s)| s.iter().map(|p| p.1))).chain(retriever);
    let (y_lo, y_hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let pad = ((y_hi - y_lo) * 0.1).max(0.005);
    let text = super::bench::ranker::register_font();

    let root = BitMapBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20).x_label_area_size(if text { 50 } else { 10 }).y_label_area_size(if text { 70 } else { 10 });
    if text {
        builder.caption("Ranker LoRA training: validation NDCG@10 (all sampled users)", ("sans-serif", 20));
    }
    let mut chart = builder.build_cartesian_2d(0f64..x_max, (y_lo - pad)..(y_hi + pad))?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("training examples").y_desc("NDCG@10").label_style(("sans-serif", 15)).x_label_formatter(&|x| format!("{x:.0}")).y_label_formatter(&|y| format!("{y:.3}"));
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw()?;

    let black = RGBColor(40, 40, 40);
    if let Some(r) = retriever {
        let s = chart.draw_series(LineSeries::new(vec![(0.0, r), (x_max, r)], black.stroke_width(2)))?;
        if text {
            s.label(format!("retriever alone ({r:.4})")).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], black.stroke_width(2)));
        }
    }
    let blue = RGBColor(31, 119, 180);
    let s = chart.draw_series(LineSeries::new(llm.clone(), blue.stroke_width(3)))?;
    if text {
        s.label("LLM alone (weight 1)").legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], blue.stroke_width(3)));
    }
    chart.draw_series(llm.iter().map(|p| Circle::new(*p, 4, blue.filled())))?;
    let palette = [RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(140, 86, 75)];
    for (i, (w, points)) in fused.iter().enumerate() {
        let c = palette[i % palette.len()];
        let s = chart.draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?;
        if text {
            s.label(format!("fused, weight {w}")).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(2)));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .label_font(("sans-serif", 15))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use llamarec_common::ranking_metrics::MetricAccumulator;
    use ranker_service::train::FusedValidation;

    fn eval(step: u64, llm_rank: Option<usize>, fused: &[(f32, Option<usize>)]) -> Evaluation {
        let report = |rank: Option<usize>| {
            let mut a = MetricAccumulator::default();
            a.add(rank);
            a.report()
        };
        Evaluation {
            step,
            examples: step * 8,
            train_loss: (step > 0).then_some(3.0),
            all_users: report(llm_rank),
            valid_subset: report(llm_rank),
            llm_calls: 1,
            fused: fused.iter().map(|&(weight, r)| FusedValidation { weight, all_users: report(r) }).collect(),
            seconds: 1.0,
        }
    }

    #[test]
    fn the_table_has_a_row_per_validation_and_the_retriever_baseline() {
        // Rank 1 is NDCG 1; rank 2 is 1/log2(3) = 0.6309.
        let all = [eval(0, Some(2), &[]), eval(50, Some(1), &[(0.0, Some(2)), (0.5, Some(1))])];
        let t = table(&all);
        assert!(t.contains("NDCG@10 0.6309"), "{t}");
        assert!(t.contains("| 0 | 0 | – | 0.6309 | 1.0000 | – |"), "{t}");
        assert!(t.contains("| 50 | 400 | 3.000 | 1.0000 | 1.0000 | 1.0000 |"), "{t}");
        assert!(t.contains("fused w 0.5 N@10"), "{t}");
        assert!(!t.contains("fused w 0 N@10"), "the retriever is the baseline line, not a column: {t}");
    }

    #[test]
    fn the_plot_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let all = [eval(0, Some(3), &[(0.0, Some(2))]), eval(50, Some(1), &[(0.0, Some(2)), (0.25, Some(1))])];
        write(dir.path(), &all).unwrap();
        let png = std::fs::read(dir.path().join("learning_curve.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert!(std::fs::read_to_string(dir.path().join("learning_curve.md")).unwrap().contains("| 50 | 400 |"));
    }
}
