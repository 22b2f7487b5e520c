//! `llamarec train retriever --seeds A,B,...`: one member per seed with the same recipe, trained
//! side by side as child processes (each on `[retriever.train] compute_threads` threads, one by
//! default, so two members use the two cores of the reference machine), then served together
//! as an equal-weight ensemble (`retriever_service::ensemble`).

use anyhow::{bail, Context, Result};
use llamarec_common::config::ConfigLayers;
use llamarec_common::data::{Dataset, Split};
use llamarec_common::ranking_metrics::format_table;
use retriever_service::checkpoint::{read_json, write_json, REPORT_FILE, TRAINER_STATE_FILE};
use retriever_service::ensemble::{EnsembleManifest, EnsembleReport, MemberSummary, ENSEMBLE_FILE};
use retriever_service::train::evaluate::{evaluate, split_cases};
use retriever_service::train::TrainerState;
use retriever_service::{Retriever, TrainConfig, TrainReport};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One member's training process.
struct Member {
    seed: u64,
    dir: PathBuf,
    child: Option<Child>,
    epochs_seen: usize,
}

/// Trains the members into `out/seed-<seed>` (resuming each unless `fresh`), writes
/// `out/ensemble.json` and `out/report.json`, and returns the report.
pub fn train(layers: &ConfigLayers, dataset: &Dataset, recipe: &TrainConfig, out: &Path, seeds: &[u64], parallel: usize, fresh: bool) -> Result<EnsembleReport> {
    let mut unique = seeds.to_vec();
    unique.sort_unstable();
    unique.dedup();
    if unique.len() != seeds.len() {
        bail!("--seeds lists a seed twice ({seeds:?}): the members would be the same model");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if out.join(REPORT_FILE).is_file() && !out.join(ENSEMBLE_FILE).is_file() {
        bail!("{} holds a single model's checkpoint; train the ensemble into another directory", out.display());
    }
    let exe = std::env::current_exe().context("locating the llamarec binary to run the members")?;
    let parallel = parallel.max(1);
    let started = Instant::now();
    let mut members: Vec<Member> =
        seeds.iter().map(|&seed| Member { seed, dir: out.join(format!("seed-{seed}")), child: None, epochs_seen: 0 }).collect();
    eprintln!("training {} members ({} at a time) into {}", members.len(), parallel, out.display());
    let mut next = 0;
    loop {
        let running = members.iter().filter(|m| m.child.is_some()).count();
        if running < parallel && next < members.len() {
            let member = &mut members[next];
            member.child = Some(spawn_member(&exe, layers.file(), member, fresh)?);
            eprintln!("  seed {}: started ({:.0} s)", member.seed, started.elapsed().as_secs_f64());
            next += 1;
            continue;
        }
        if running == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        let mut failure = None;
        for member in &mut members {
            report_progress(member, &started);
            let Some(child) = member.child.as_mut() else { continue };
            if let Some(status) = child.try_wait()? {
                member.child = None;
                if !status.success() {
                    let log = member.dir.join("train.log");
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
                    failure = Some(format!("member seed {} failed ({status}); {}:\n{}", member.seed, log.display(), tail.join("\n")));
                    break;
                }
                eprintln!("  seed {}: done ({:.0} s)", member.seed, started.elapsed().as_secs_f64());
            }
        }
        if let Some(failure) = failure {
            // The other members would be thrown away: stop them rather than leave them running.
            for child in members.iter_mut().filter_map(|m| m.child.as_mut()) {
                let _ = child.kill();
                let _ = child.wait();
            }
            bail!(failure);
        }
    }
    let wall_time_s = started.elapsed().as_secs_f64();

    let mut summaries = Vec::with_capacity(members.len());
    let mut data = None;
    for member in &members {
        let report: TrainReport = read_json(&member.dir.join(REPORT_FILE))?;
        data.get_or_insert(report.data.clone());
        summaries.push(MemberSummary {
            dir: PathBuf::from(format!("seed-{}", member.seed)),
            seed: member.seed,
            best_epoch: report.best_epoch,
            epochs: report.epochs,
            time_to_best_s: report.time_to_best_s,
            validation: report.validation,
        });
    }
    write_json(&out.join(ENSEMBLE_FILE), &EnsembleManifest { members: summaries.iter().map(|m| m.dir.clone()).collect() })?;
    let retriever = Retriever::load(out).with_context(|| format!("loading the ensemble {}", out.display()))?;
    let threads = recipe.eval_threads.max(1);
    let validation = evaluate(retriever.encoder(), &split_cases(dataset, Split::Validation), threads)?;
    let test = evaluate(retriever.encoder(), &split_cases(dataset, Split::Test), threads)?;
    let report = EnsembleReport {
        data: data.expect("at least one member"),
        config: recipe.clone(),
        members: summaries,
        parallel,
        wall_time_s,
        validation,
        test,
    };
    write_json(&out.join(REPORT_FILE), &report)?;
    Ok(report)
}

fn spawn_member(exe: &Path, config_file: Option<&Path>, member: &Member, fresh: bool) -> Result<Child> {
    std::fs::create_dir_all(&member.dir).with_context(|| format!("creating {}", member.dir.display()))?;
    let log_path = member.dir.join("train.log");
    let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new(exe);
    if let Some(file) = config_file {
        cmd.arg("--config").arg(file);
    }
    cmd.args(["train", "retriever", "--out"]).arg(&member.dir);
    if fresh {
        cmd.arg("--fresh");
    }
    // The environment carries the parent's overrides; these set what differs per member. Each
    // member validates on one thread: the members run side by side.
    cmd.env("LLAMAREC_RETRIEVER__TRAIN__SEED", member.seed.to_string())
        .env("LLAMAREC_RETRIEVER__TRAIN__PROGRESS", "false")
        .env("LLAMAREC_RETRIEVER__TRAIN__EVAL_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Each member reads `compute_threads` from the same configuration and sets its own threads.
    cmd.spawn().with_context(|| format!("starting {} for seed {}", exe.display(), member.seed))
}

/// Prints a line for each epoch a member finished since the last call (from its
/// `trainer_state.json`, which the member rewrites after every epoch).
fn report_progress(member: &mut Member, started: &Instant) {
    let Ok(state) = read_json::<TrainerState>(&member.dir.join(TRAINER_STATE_FILE)) else { return };
    if state.epochs_done <= member.epochs_seen {
        return;
    }
    member.epochs_seen = state.epochs_done;
    let (Some(last), Some(best)) = (state.history.last(), state.best_validation.as_ref()) else { return };
    eprintln!(
        "  seed {}: epoch {:>3}  loss {:.4}  val R@10 {:.4}  N@10 {:.4}  (best R@10 {:.4} at epoch {})  {:.0} s",
        member.seed,
        last.epoch,
        last.train_loss,
        last.val_recall_at_10,
        last.val_ndcg_at_10,
        best.get(10).recall,
        state.best_epoch,
        started.elapsed().as_secs_f64()
    );
}

/// Prints the ensemble's summary as `llamarec train retriever` prints a single model's.
pub fn print_report(report: &EnsembleReport, out: &Path, show_test: bool) {
    for m in &report.members {
        println!(
            "member seed {}: best epoch {} of {}, {:.0} s to best, val R@10 {:.4} N@10 {:.4}",
            m.seed,
            m.best_epoch,
            m.epochs,
            m.time_to_best_s,
            m.validation.get(10).recall,
            m.validation.get(10).ndcg
        );
    }
    println!("ensemble of {}: {:.0} s in all ({} at a time)", report.members.len(), report.wall_time_s, report.parallel);
    print!("{}", format_table("validation", &report.validation));
    if show_test {
        print!("{}", format_table("test", &report.test));
    } else {
        println!("test metrics: in {}/report.json (--show-test prints them; choose on validation)", out.display());
    }
}
