//! `plover serve`: the server on its embedded store, until a signal (or stdin's end).

use anyhow::Result;
use clap::Args;
use plover_server::config::{Config, Durability};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// TOML configuration file (see plover.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// UDP address to listen on [default: 127.0.0.1:4433].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory [default: ./plover-data].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Directory of the dev certificate [default: ./certs].
    #[arg(long)]
    certs: Option<PathBuf>,
    /// `sync` (ack after fsync) or `buffered` (ack before fsync).
    #[arg(long, value_parser = parse_durability)]
    durability: Option<Durability>,
    /// Serve /metrics, /healthz and /readyz over plain HTTP on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Also shut down cleanly when standard input ends: for a program that runs plover as its
    /// child (a test, `plover bench`) and may die without stopping it. Give plover a pipe.
    #[arg(long)]
    stop_on_stdin_eof: bool,
}

pub(crate) fn parse_durability(s: &str) -> Result<Durability, String> {
    match s {
        "sync" => Ok(Durability::Sync),
        "buffered" => Ok(Durability::Buffered),
        _ => Err(format!("{s:?} is neither `sync` nor `buffered`")),
    }
}

pub(crate) async fn serve(args: ServeArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(data) = args.data {
        config.data = data;
    }
    if let Some(certs) = args.certs {
        config.certs = certs;
    }
    if let Some(durability) = args.durability {
        config.store.durability = durability;
    }
    if let Some(metrics) = args.metrics {
        config.metrics.listen = Some(metrics);
    }
    let with_metrics = config.metrics.listen.is_some();
    let mut server = plover_server::server::Server::bind(config).await?;
    if with_metrics {
        // The global recorder belongs to the binary, not the library.
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(plover_server::metrics::LATENCY_BUCKETS)?
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    plover_server::metrics::names::COMMIT_BATCH.to_owned(),
                ),
                &[
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                ],
            )?
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    plover_server::metrics::names::STAGE_SECONDS.to_owned(),
                ),
                &plover_server::metrics::stage_buckets(),
            )?
            .install_recorder()?;
        // Histograms keep their samples until upkeep folds them into the buckets: without
        // it they grow for as long as nobody scrapes `/metrics`.
        let upkeep = handle.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                every.tick().await;
                upkeep.run_upkeep();
            }
        });
        server = server.with_metrics(std::sync::Arc::new(move || handle.render()));
    }
    if args.stop_on_stdin_eof {
        let eof = stdin_eof();
        server
            .run_draining(
                async {
                    tokio::select! {
                        () = shutdown_signal() => {}
                        () = eof => tracing::info!("standard input ended; shutting down"),
                    }
                },
                drain_signal(),
            )
            .await?;
    } else {
        server
            .run_draining(shutdown_signal(), drain_signal())
            .await?;
    }
    Ok(())
}

/// Completes on SIGUSR1: a node of a cluster then drains (moves its clients and shards to
/// the other nodes) and stops. Never elsewhere than on Unix.
async fn drain_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::user_defined1()) {
            Ok(mut usr1) => {
                usr1.recv().await;
                tracing::info!("SIGUSR1: draining, then stopping");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch SIGUSR1; drain by signal is off"),
        }
    }
    std::future::pending::<()>().await;
}

/// Completes when standard input reaches its end (or fails). The read runs on a thread of
/// its own, never joined: a blocking task would hold the runtime open at exit.
pub(crate) fn stdin_eof() -> impl Future<Output = ()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("plover-stdin".into())
        .spawn(move || {
            let mut buf = [0u8; 512];
            let mut stdin = std::io::stdin().lock();
            loop {
                match std::io::Read::read(&mut stdin, &mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            drop(tx);
        });
    async move {
        match spawned {
            // The sender is dropped at the end of input: the receiver then yields an error.
            Ok(_) => {
                let _ = rx.await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch standard input");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}
