//! `llamarec eval-report --out EVAL.md`: the paper's Tables 1 and 3 for this deployment. On a
//! split (test by default), over all users and over the valid subset (users whose ground truth
//! is among the retriever's top N), Recall/NDCG/MRR at 5 and 10 of: the retriever alone, the
//! untuned ranker, the tuned ranker (when an adapter is configured or passed), and the tuned
//! ranker fused with the retriever at the configured `[gateway] ranker_weight` (what Recommend
//! returns). The LLM runs only for users whose ground truth is a candidate: for the others every
//! method's rank is beyond N, a miss at every K <= N.

use anyhow::{Context, Result};
use llamarec_common::config::ConfigLayers;
use llamarec_common::data::Split;
use llamarec_common::ranking_metrics::{MetricReport, TwoStageAccumulator, TwoStageReport};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::calibrate::{collect_cases, load_ranker, Case, EvalSetup};

#[derive(Debug, clap::Args)]
pub struct EvalReportArgs {
    /// Split: validation or test.
    #[arg(long, default_value = "test")]
    pub split: Split,
    /// Only the first N users of the split (a quick estimate; the full split is the report).
    #[arg(long)]
    pub sample: Option<usize>,
    /// PEFT adapter of the tuned ranker [default: `[ranker] adapter`; none = no tuned rows].
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Fusion weight of the fused row [default: `[gateway] ranker_weight`].
    #[arg(long)]
    pub weight: Option<f32>,
    /// Markdown report.
    #[arg(long, default_value = "EVAL.md")]
    pub out: PathBuf,
    /// Also write the figures as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Render the report from the JSON an earlier run wrote (`--json`) instead of running the
    /// models: to add a section without repeating ~15 minutes of LLM calls.
    #[arg(long, conflicts_with_all = ["split", "sample", "adapter", "weight", "json"])]
    pub from_json: Option<PathBuf>,
    /// A ranker training run's folder (`llamarec train ranker --out DIR`): append its validation
    /// learning curve as a table, and draw it as `docs/ranker_learning_curve.png` beside `--out`.
    #[arg(long)]
    pub learning_curve: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Row {
    method: String,
    report: TwoStageReport,
}

#[derive(Debug, Serialize, Deserialize)]
struct Report {
    dataset: String,
    split: Split,
    users: usize,
    split_users: usize,
    candidates: usize,
    valid_users: usize,
    llm_calls: usize,
    adapter: Option<String>,
    ranker_weight: f32,
    wall_seconds: f64,
    rows: Vec<Row>,
}

fn cells(r: &MetricReport) -> String {
    let (a, b) = (r.get(5), r.get(10));
    format!("{:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4}", a.mrr, a.ndcg, a.recall, b.mrr, b.ndcg, b.recall)
}

/// `provenance`: the sentence saying which command produced the figures.
fn markdown(report: &Report, provenance: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Evaluation: {} {:?} split\n", report.dataset, report.split);
    let _ = writeln!(s, "{provenance}\n");
    let _ = writeln!(
        s,
        "{} of {} users{}; candidates: the retriever's top {} (history excluded); {} users ({:.1}%) have their ground truth among them (the valid subset), and only those run the LLM ({} calls). Fusion weight (`[gateway] ranker_weight`): {}. Tuned adapter: {}.\n",
        report.users,
        report.split_users,
        if report.users < report.split_users { " (a sample: the first users of the split)" } else { "" },
        report.candidates,
        report.valid_users,
        100.0 * report.valid_users as f64 / report.users.max(1) as f64,
        report.llm_calls,
        report.ranker_weight,
        report.adapter.as_deref().unwrap_or("none configured (tuned rows omitted)")
    );
    let base = report.rows[0].report.all_users.get(10).ndcg;
    for (title, valid) in [("All users (paper Table 1)", false), ("Valid subset: ground truth among the candidates (paper Table 3)", true)] {
        let _ = writeln!(s, "## {title}\n");
        let _ = writeln!(s, "| method | M@5 | N@5 | R@5 | M@10 | N@10 | R@10 | N@10 vs retriever |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for row in &report.rows {
            let r = if valid { &row.report.valid_subset } else { &row.report.all_users };
            let rel = if valid { r.get(10).ndcg / report.rows[0].report.valid_subset.get(10).ndcg.max(1e-12) } else { r.get(10).ndcg / base.max(1e-12) };
            let _ = writeln!(s, "| {} | {} | {:.3}x |", row.method, cells(r), rel);
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "M = MRR, N = NDCG, R = Recall (= hit rate; one ground-truth item per user). Users whose ground truth is not among the candidates count as misses in \"all users\". The ranker rows order the candidates by the LLM's letter logits alone (weight 1); the fused row mixes the retriever's and the LLM's log-softmax scores as the gateway does."
    );
    s
}

/// The command line as typed, the program's directory left out.
fn command_line() -> String {
    std::env::args()
        .enumerate()
        .map(|(i, a)| if i == 0 { a.rsplit('/').next().unwrap_or(&a).to_string() } else if a.contains(' ') { format!("{a:?}") } else { a })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The learning-curve section of a ranker training run (its validations, as the run's own
/// `learning_curve.md`), drawing the curve to `png` and linking it relative to the report.
fn learning_curve_section(run: &Path, png: &Path, link: &str) -> Result<String> {
    let (evaluations, examples) = ranker_service::train::checkpoint_evaluations(run)?;
    if evaluations.is_empty() {
        anyhow::bail!("{} has no validation yet", run.display());
    }
    if let Some(dir) = png.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    super::learning_curve::draw(png, &evaluations)?;
    let table = super::learning_curve::table(&evaluations);
    let body = table.split_once("\n\n").map_or(table.as_str(), |(_, rest)| rest);
    Ok(format!(
        "\n## Ranker training: learning curve (validation sample)\n\nRun `{}` ({} training examples seen); the adapter is validated on a fixed sample of validation users as it trains. ![learning curve]({link})\n\n{body}",
        run.display(),
        examples
    ))
}

pub fn run(layers: &ConfigLayers, args: EvalReportArgs) -> Result<()> {
    if let Some(from) = &args.from_json {
        let text = std::fs::read_to_string(from).with_context(|| format!("reading {}", from.display()))?;
        let report: Report = serde_json::from_str(&text).with_context(|| format!("parsing {}", from.display()))?;
        let provenance = format!(
            "Rendered by `{}` from the figures an earlier `llamarec eval-report --json` run saved ({:.0} s of model calls on its machine).",
            command_line(),
            report.wall_seconds
        );
        return write_report(&report, &provenance, &args);
    }
    let start = Instant::now();
    let EvalSetup { dataset, retriever, gateway, adapter } = EvalSetup::load(layers, args.adapter.clone())?;
    let weight = args.weight.unwrap_or(gateway.ranker_weight);
    let untuned = load_ranker(layers, None)?;
    let tuned = adapter.as_deref().map(|a| load_ranker(layers, Some(a))).transpose()?;
    let mut rankers = vec![&untuned];
    rankers.extend(tuned.as_ref());
    let split_users = dataset.eval_examples(args.split).count();
    let examples: Vec<_> = dataset.eval_examples(args.split).take(args.sample.unwrap_or(usize::MAX)).collect();
    let n = gateway.default_candidates as usize;
    let collect_start = Instant::now();
    let cases = collect_cases(&dataset, &retriever, &rankers, &examples, n, gateway.prompt_history as usize, "eval report")?;
    let per_user = collect_start.elapsed().as_secs_f64() / examples.len().max(1) as f64;
    let fixed = collect_start.duration_since(start).as_secs_f64();

    let row = |method: &str, f: &dyn Fn(&Case) -> Option<usize>| {
        let mut acc = TwoStageAccumulator::default();
        for c in &cases {
            // The valid subset is defined by the retriever's candidates for every method.
            match (c.target_pos, f(c)) {
                (Some(_), rank) => {
                    acc.all_users.add(rank);
                    acc.valid_subset.add(rank);
                }
                (None, _) => acc.all_users.add(None),
            }
        }
        Row { method: method.to_string(), report: acc.report() }
    };
    let retriever_row = format!("retriever alone ({})", retriever.encoder().family());
    let mut rows = vec![row(&retriever_row, &|c| c.retriever_rank()), row("untuned ranker (LLM alone)", &|c| c.fused_rank(0, 1.0))];
    if tuned.is_some() {
        rows.push(row("tuned ranker (LLM alone)", &|c| c.fused_rank(1, 1.0)));
        rows.push(row(&format!("tuned ranker fused (weight {weight})"), &|c| c.fused_rank(1, weight)));
    } else {
        rows.push(row(&format!("untuned ranker fused (weight {weight})"), &|c| c.fused_rank(0, weight)));
    }
    let valid_users = cases.iter().filter(|c| c.target_pos.is_some()).count();
    let report = Report {
        dataset: dataset.name.clone(),
        split: args.split,
        users: cases.len(),
        split_users,
        candidates: n,
        valid_users,
        llm_calls: valid_users * rankers.len(),
        adapter: adapter.as_ref().map(|a| a.display().to_string()),
        ranker_weight: weight,
        wall_seconds: start.elapsed().as_secs_f64(),
        rows,
    };
    write_report(&report, &format!("Produced by `{}` in {:.0} s on this machine.", command_line(), report.wall_seconds), &args)?;
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    let full = fixed + per_user * split_users as f64;
    eprintln!("{} took {:.0} s; the full {:?} split of {split_users} users would take about {:.0} s at this rate", args.out.display(), report.wall_seconds, args.split, full);
    Ok(())
}

/// Writes the markdown report (and the learning-curve section and plot when asked).
fn write_report(report: &Report, provenance: &str, args: &EvalReportArgs) -> Result<()> {
    let mut md = markdown(report, provenance);
    if let Some(run) = &args.learning_curve {
        let base = args.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        md += &learning_curve_section(run, &base.join("docs/ranker_learning_curve.png"), "docs/ranker_learning_curve.png")?;
    }
    print!("{md}");
    std::fs::write(&args.out, &md).with_context(|| format!("writing {}", args.out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    #[test]
    fn a_saved_report_renders_its_figures_and_a_run_its_learning_curve() {
        let saved = repo().join("docs/bench/eval-report.json");
        let report: Report = serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
        let md = markdown(&report, "Rendered by a test.");
        // The retriever's test NDCG@10 and Recall@10 of the saved run, in the first table's row.
        let retriever = md.lines().find(|l| l.starts_with("| retriever alone")).unwrap();
        assert!(retriever.contains("(ensemble)") && retriever.contains("0.1120") && retriever.contains("0.2078") && retriever.ends_with("1.000x |"), "{retriever}");
        assert_eq!(md.matches("| tuned ranker (LLM alone)").count(), 2, "both tables");

        let dir = std::env::temp_dir().join(format!("eval-report-test-{}", std::process::id()));
        let png = dir.join("docs/curve.png");
        let run = repo().join("ranker-service/training/ml-100k-all-linear");
        let section = learning_curve_section(&run, &png, "docs/curve.png").unwrap();
        assert!(section.starts_with("\n## Ranker training: learning curve"), "{section}");
        assert!(section.contains("![learning curve](docs/curve.png)"));
        // One row per validation of the run, step 0 first.
        let rows: Vec<&str> = section.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| step")).collect();
        assert!(rows.len() >= 18 && rows[0].starts_with("| 0 | 0 | – |"), "{rows:?}");
        assert!(std::fs::metadata(&png).unwrap().len() > 10_000, "the curve is drawn");
        let missing = learning_curve_section(&dir, &png, "x").unwrap_err();
        assert!(format!("{missing:#}").contains("trainer_state.json"), "{missing:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
