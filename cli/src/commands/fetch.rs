//! `llamarec fetch`.

use anyhow::Result;
use llamarec_common::assets::{fetch_all, FetchOutcome, SHIPPED};
use llamarec_common::config::{AssetsConfig, ConfigLayers};

#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    /// Python interpreter that runs `pip download`.
    #[arg(long, default_value = "python3", env = "LLAMAREC_PYTHON")]
    python: String,
}

pub fn run(layers: &ConfigLayers, args: FetchArgs) -> Result<()> {
    let assets = layers.section::<AssetsConfig>()?;
    let outcomes = fetch_all(&assets.dir, &args.python, &SHIPPED)?;
    for (asset, outcome) in SHIPPED.iter().zip(outcomes) {
        let what = match outcome {
            FetchOutcome::UpToDate => "up to date",
            FetchOutcome::Extracted => "extracted",
        };
        for (_, dest) in asset.files {
            println!("{:<11} {}", what, assets.dir.join(dest).display());
        }
    }
    Ok(())
}
