//! `llamarec data ...`.

use anyhow::{Context, Result};
use llamarec_common::config::{AssetsConfig, ConfigLayers};
use llamarec_common::data::{DataConfig, Dataset};

#[derive(Debug, clap::Subcommand)]
pub enum DataCommand {
    /// Users, items, interactions and sequence lengths after preprocessing.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(layers: &ConfigLayers, cmd: DataCommand) -> Result<()> {
    let assets = layers.section::<AssetsConfig>()?;
    let data = layers.section::<DataConfig>()?;
    match cmd {
        DataCommand::Stats { json } => {
            let dataset = Dataset::load(&data, &assets.dir).with_context(|| format!("loading data set {}", data.name))?;
            let s = dataset.stats();
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("data set             {}", s.name);
                println!("users                {}", s.users);
                println!("items                {}", s.items);
                println!("interactions         {}", s.interactions);
                println!("avg sequence length  {:.2}", s.avg_sequence_length);
                println!("max sequence length  {}", s.max_sequence_length);
                println!("density              {:.4}", s.density);
            }
        }
    }
    Ok(())
}
