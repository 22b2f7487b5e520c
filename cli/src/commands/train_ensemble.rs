//! `llamarec train retriever --seeds A,B,... [--recipe-seeds FILE=C,D,...]`: one member per seed
//! with the configured recipe (and per seed of each recipe file, the configured recipe with the
//! file's overrides), trained side by side as child processes (each on `[retriever.train]
//! compute_threads` threads, one by default, so two members use the two cores of the reference
//! machine), then served together as an equal-weight ensemble (`retriever_service::ensemble`).

use anyhow::{bail, Context, Result};
use llamarec_common::config::{ConfigLayers, ENV_PREFIX};
use llamarec_common::data::{Dataset, Split};
use llamarec_common::ranking_metrics::format_table;
use retriever_service::checkpoint::{read_json, write_json, REPORT_FILE, TRAINER_STATE_FILE};
use retriever_service::ensemble::{EnsembleManifest, EnsembleReport, MemberSummary, ENSEMBLE_FILE};
use retriever_service::train::evaluate::{evaluate, split_cases};
use retriever_service::train::TrainerState;
use retriever_service::service_config::RetrieverServiceConfig;
use retriever_service::{Retriever, TrainConfig, TrainReport};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The prefix of the environment overrides that reach `[retriever.train]`.
const TRAIN_ENV_PREFIX: &str = "LLAMAREC_RETRIEVER__TRAIN__";

/// `--recipe-seeds FILE=SEEDS`: members trained with the configured recipe plus a recipe file's
/// `[retriever.train]` keys (an LRURec configuration can add SASRec members, or the reverse).
#[derive(Debug, Clone)]
pub struct RecipeSeeds {
    /// The file's stem: names the members (`<name>-seed-<seed>`) and their lines.
    pub name: String,
    /// The file, for messages.
    pub path: PathBuf,
    /// The file's keys as environment overrides, which the member's configuration reads above
    /// its file (`LLAMAREC_RETRIEVER__TRAIN__MODEL__KIND=sasrec`, ...).
    pub overrides: Vec<(String, String)>,
    /// One member per seed.
    pub seeds: Vec<u64>,
}

impl std::str::FromStr for RecipeSeeds {
    type Err = String;

    /// `path/to/recipe.toml=1,2,3`.
    fn from_str(arg: &str) -> Result<Self, String> {
        let (file, seeds) = arg.rsplit_once('=').ok_or_else(|| format!("expected FILE=SEEDS (e.g. sasrec.toml=1,2), got {arg:?}"))?;
        let seeds = seeds
            .split(',')
            .map(|s| s.trim().parse::<u64>().map_err(|_| format!("seed {s:?} in {arg:?} is not a whole number")))
            .collect::<Result<Vec<_>, _>>()?;
        let path = PathBuf::from(file);
        let name = path.file_stem().and_then(|s| s.to_str()).filter(|s| !s.is_empty()).ok_or_else(|| format!("{file:?} names no file"))?.to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| format!("reading recipe {file}: {e}"))?;
        let overrides = recipe_overrides(&text).map_err(|e| format!("recipe {file}: {e}"))?;
        Ok(Self { name, path, overrides, seeds })
    }
}

/// A recipe file's keys as `LLAMAREC_RETRIEVER__TRAIN__...` overrides. Only `[retriever.train]`
/// (and its sub-tables) may appear: a recipe says how a member trains, not how anything serves.
fn recipe_overrides(text: &str) -> Result<Vec<(String, String)>, String> {
    let doc: toml_edit::DocumentMut = text.parse().map_err(|e| format!("not TOML: {e}"))?;
    let root = doc.as_table();
    if let Some((key, _)) = root.iter().find(|(k, _)| *k != "retriever") {
        return Err(format!("only [retriever.train] may be set, found `{key}`"));
    }
    let retriever = root.get("retriever").and_then(|i| i.as_table_like()).ok_or("no [retriever.train] table")?;
    if let Some((key, _)) = retriever.iter().find(|(k, _)| *k != "train") {
        return Err(format!("only [retriever.train] may be set, found `retriever.{key}`"));
    }
    let train = retriever.get("train").and_then(|i| i.as_table_like()).ok_or("no [retriever.train] table")?;
    let mut out = Vec::new();
    flatten(train, TRAIN_ENV_PREFIX, "retriever.train", &mut out)?;
    if out.is_empty() {
        return Err("[retriever.train] sets nothing".into());
    }
    Ok(out)
}

fn flatten(table: &dyn toml_edit::TableLike, prefix: &str, path: &str, out: &mut Vec<(String, String)>) -> Result<(), String> {
    for (key, item) in table.iter() {
        let (env, key_path) = (format!("{prefix}{}", key.to_uppercase()), format!("{path}.{key}"));
        if let Some(sub) = item.as_table_like() {
            flatten(sub, &format!("{env}__"), &key_path, out)?;
            continue;
        }
        let value = item.as_value().ok_or_else(|| format!("`{key_path}` has no value"))?;
        let text = match value {
            toml_edit::Value::String(s) => s.value().clone(),
            toml_edit::Value::Integer(i) => i.value().to_string(),
            toml_edit::Value::Float(f) => f.value().to_string(),
            toml_edit::Value::Boolean(b) => b.value().to_string(),
            _ => return Err(format!("`{key_path}`: only strings, numbers and booleans can be set")),
        };
        out.push((env, text));
    }
    Ok(())
}

/// One member's training process.
struct Member<'a> {
    seed: u64,
    /// The recipe file it adds to the configured recipe, if any.
    recipe: Option<&'a RecipeSeeds>,
    /// Its directory's name inside the ensemble's ([`Member::dir_name`]).
    name: String,
    dir: PathBuf,
    child: Option<Child>,
    epochs_seen: usize,
}

impl Member<'_> {
    /// `seed 3` or `sasrec-d03-h2 seed 3`, in progress lines and errors.
    fn label(&self) -> String {
        match self.recipe {
            Some(r) => format!("{} seed {}", r.name, self.seed),
            None => format!("seed {}", self.seed),
        }
    }

    /// The directory name inside the ensemble's: `seed-3` or `sasrec-d03-h2-seed-3`.
    fn dir_name(recipe: Option<&RecipeSeeds>, seed: u64) -> String {
        match recipe {
            Some(r) => format!("{}-seed-{seed}", r.name),
            None => format!("seed-{seed}"),
        }
    }
}

/// The members of `--seeds` and `--recipe-seeds`, refusing one listed twice (it would be the
/// same model) and a recipe whose keys the configuration does not accept (before any starts).
fn members<'a>(layers: &ConfigLayers, out: &Path, seeds: &[u64], recipes: &'a [RecipeSeeds]) -> Result<Vec<Member<'a>>> {
    let mut members = Vec::new();
    let groups = std::iter::once((None, seeds)).chain(recipes.iter().map(|r| (Some(r), r.seeds.as_slice())));
    for (recipe, seeds) in groups {
        if let Some(r) = recipe {
            check_recipe(layers, r)?;
        }
        for &seed in seeds {
            let name = Member::dir_name(recipe, seed);
            if let Some(earlier) = members.iter().find(|m: &&Member| m.name == name) {
                match (earlier.recipe, recipe) {
                    // Same stem, different files: not the same model, but the same directory.
                    (Some(a), Some(b)) if a.path != b.path => bail!(
                        "recipes {} and {} would both train into {name} (members are named by the file's stem): rename one",
                        a.path.display(),
                        b.path.display()
                    ),
                    _ => bail!("{name} is listed twice: the members would be the same model"),
                }
            }
            members.push(Member { seed, recipe, dir: out.join(&name), name, child: None, epochs_seen: 0 });
        }
    }
    if members.is_empty() {
        bail!("no members: give --seeds or --recipe-seeds");
    }
    Ok(members)
}

/// Reads the configuration as the member will (file, environment, then the recipe's keys) so a
/// misspelt key or a bad value is refused by name now, not in a member's log.
fn check_recipe(layers: &ConfigLayers, recipe: &RecipeSeeds) -> Result<()> {
    let mut env: Vec<(String, String)> =
        std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX) && !recipe.overrides.iter().any(|(o, _)| o == k)).collect();
    env.extend(recipe.overrides.iter().cloned());
    let member = ConfigLayers::load_with_env(layers.file(), Some(env))?;
    member.section::<RetrieverServiceConfig>().with_context(|| format!("recipe {}", recipe.path.display()))?;
    Ok(())
}

/// Trains the members into `out/seed-<seed>` and `out/<recipe>-seed-<seed>` (resuming each
/// unless `fresh`), writes `out/ensemble.json` and `out/report.json`, and returns the report.
#[allow(clippy::too_many_arguments)]
pub fn train(
    layers: &ConfigLayers,
    dataset: &Dataset,
    recipe: &TrainConfig,
    out: &Path,
    seeds: &[u64],
    recipes: &[RecipeSeeds],
    parallel: usize,
    fresh: bool,
) -> Result<EnsembleReport> {
    let mut members = members(layers, out, seeds, recipes)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if out.join(REPORT_FILE).is_file() && !out.join(ENSEMBLE_FILE).is_file() {
        bail!("{} holds a single model's checkpoint; train the ensemble into another directory", out.display());
    }
    let exe = std::env::current_exe().context("locating the llamarec binary to run the members")?;
    let parallel = parallel.max(1);
    let started = Instant::now();
    eprintln!("training {} members ({} at a time) into {}", members.len(), parallel, out.display());
    let mut next = 0;
    loop {
        let running = members.iter().filter(|m| m.child.is_some()).count();
        if running < parallel && next < members.len() {
            let member = &mut members[next];
            member.child = Some(spawn_member(&exe, layers.file(), member, fresh)?);
            eprintln!("  {}: started ({:.0} s)", member.label(), started.elapsed().as_secs_f64());
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
                    failure = Some(format!("member {} failed ({status}); {}:\n{}", member.label(), log.display(), tail.join("\n")));
                    break;
                }
                eprintln!("  {}: done ({:.0} s)", member.label(), started.elapsed().as_secs_f64());
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
            dir: PathBuf::from(&member.name),
            seed: member.seed,
            recipe: member.recipe.map(|r| r.path.display().to_string()),
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
    if let Some(recipe) = member.recipe {
        cmd.envs(recipe.overrides.iter().map(|(k, v)| (k, v)));
    }
    cmd.env(format!("{TRAIN_ENV_PREFIX}SEED"), member.seed.to_string())
        .env(format!("{TRAIN_ENV_PREFIX}PROGRESS"), "false")
        .env(format!("{TRAIN_ENV_PREFIX}EVAL_THREADS"), "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Each member reads `compute_threads` from the same configuration and sets its own threads.
    cmd.spawn().with_context(|| format!("starting {} for {}", exe.display(), member.label()))
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
        "  {}: epoch {:>3}  loss {:.4}  val R@10 {:.4}  N@10 {:.4}  (best R@10 {:.4} at epoch {})  {:.0} s",
        member.label(),
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
            "member {}: best epoch {} of {}, {:.0} s to best, val R@10 {:.4} N@10 {:.4}",
            m.dir.display(),
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
