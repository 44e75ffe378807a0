//! `plover nodes`: the nodes of a cluster and each one's load and shards, from the cluster's
//! own bucket.

use anyhow::{Context, Result, bail};
use clap::Args;
use plover_server::cluster::{self, NodeRecord};
use plover_server::config::Config;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct NodesArgs {
    /// A node's configuration file: its `[cluster]` section says where NATS is.
    #[arg(long, conflicts_with = "nats")]
    config: Option<PathBuf>,
    /// NATS servers of the cluster, comma-separated (instead of --config).
    #[arg(long, env = "PLOVER_NATS", value_delimiter = ',')]
    nats: Vec<String>,
    /// One JSON object per node instead of the table.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn nodes(args: NodesArgs) -> Result<()> {
    let mut cluster = match &args.config {
        Some(path) => Config::from_file(path)?
            .cluster
            .with_context(|| format!("{} has no [cluster] section", path.display()))?,
        None if !args.nats.is_empty() => plover_server::config::ClusterConfig::client(args.nats),
        None => bail!("say where the cluster is: --config FILE or --nats URL[,URL...]"),
    };
    cluster.node = "plover-nodes".into();
    let js = cluster::connect(&cluster).await?;
    let records = cluster::nodes::list(&js).await?;
    if args.json {
        for r in &records {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    if records.is_empty() {
        println!("no nodes");
        return Ok(());
    }
    println!(
        "{:<16} {:<24} {:<10} {:>11} {:>6} {:>6} {:<9} UP",
        "NODE", "ADVERTISE", "ZONE", "CONNECTIONS", "SHARDS", "CPU", "STATE"
    );
    for r in &records {
        println!("{}", line(r));
    }
    Ok(())
}

fn line(r: &NodeRecord) -> String {
    let cpu = r.cpu.map_or_else(|| "-".into(), |c| format!("{c:.2}"));
    let up = humantime::format_duration(std::time::Duration::from_secs(
        r.updated_ms.saturating_sub(r.started_ms) / 1000,
    ));
    let state = if r.draining { "draining" } else { "serving" };
    format!(
        "{:<16} {:<24} {:<10} {:>11} {:>6} {:>6} {:<9} {}",
        r.node,
        r.advertise,
        r.zone.as_deref().unwrap_or("-"),
        r.connections,
        r.shards,
        cpu,
        state,
        up
    )
}
