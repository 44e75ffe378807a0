//! Wires the store, the router and the transport together and runs them until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::info;

use crate::auth::{AuthError, Idp, TokenKeys, secret_for};
use crate::config::{Config, ConfigError};
use crate::persist::{Store, StoreError};
use crate::router::{Router, RouterError};
use crate::transport::{Listener, TransportError};

/// Errors starting or stopping the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The token secret could not be loaded.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The store could not be opened or flushed.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// The router failed.
    #[error(transparent)]
    Router(#[from] RouterError),
    /// The transport could not be set up.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The node cannot join its cluster.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The media store cannot be opened.
    #[error(transparent)]
    Media(#[from] crate::media::MediaError),
    /// The admin socket cannot be set up.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
}

/// A server that is bound and ready to run.
pub struct Server {
    listener: Listener,
    router: Router,
    addr: SocketAddr,
    retention: crate::config::RetentionConfig,
    metrics: Option<tokio::net::TcpListener>,
    render: Option<crate::metrics::Render>,
    cluster: Option<crate::cluster::Cluster>,
    /// Uploads, downloads and their collector.
    media: Arc<crate::media::Media>,
    /// A cluster node's appender and applier of the replicated log.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The operator's channel (`<data>/admin.sock`).
    admin: Arc<crate::admin::Admin>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish()
    }
}

impl Server {
    /// Opens the store, starts the router and binds the endpoint.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        config.validate()?;
        let keys = TokenKeys::new(&secret_for(&config)?).with_idp(Idp::open(&config.auth)?);
        let path = config.data.clone();
        let durability = config.store.durability;
        let store = tokio::task::spawn_blocking(move || Store::open(&path, durability))
            .await
            .map_err(|e| RouterError::Internal(e.to_string()))??;
        let cluster = match &config.cluster {
            Some(c) => Some(crate::cluster::Cluster::join(c, config.transport.heartbeat).await?),
            None => None,
        };
        let store = Arc::new(store);
        let mut tasks = Vec::new();
        let router = match &cluster {
            None => Router::start(store, &config)?,
            Some(cluster) => {
                // Every write goes through the cluster's log, and this node serves once it
                // has applied what the log held (`router/replicated.rs`).
                let replica = cluster.replica().await?;
                replica.restore_if_behind(&store, &config.data).await?;
                let (router, entries) =
                    Router::start_replicated(store, &config, replica.allocator())?;
                let (ready, caught_up) = tokio::sync::oneshot::channel();
                tasks.push(tokio::spawn(
                    replica.clone().append(entries, router.clone()),
                ));
                tasks.push(tokio::spawn(replica.clone().apply(router.clone(), ready)));
                tasks.push(cluster.relay(router.presence().clone()));
                let every = config.cluster.as_ref().map_or(0, |c| c.snapshot_every);
                tasks.push(tokio::spawn(replica.snapshots(
                    router.store().clone(),
                    cluster.ownership().clone(),
                    every,
                    config.data.clone(),
                )));
                if caught_up.await.is_err() {
                    for t in &tasks {
                        t.abort();
                    }
                    let r = router.clone();
                    let _ = tokio::task::spawn_blocking(move || r.shutdown_blocking()).await;
                    return Err(ServerError::Cluster(
                        crate::cluster::ClusterError::JetStream {
                            what: "apply the cluster log",
                            reason: "the log could not be applied (see the log above)".into(),
                        },
                    ));
                }
                router
            }
        };
        let media = Arc::new(crate::media::Media::open(&config, router.clone())?);
        let listener = Listener::bind(
            &config,
            router.clone(),
            keys,
            cluster.as_ref(),
            media.clone(),
        )?;
        let addr = listener
            .local_addr()
            .map_err(|source| TransportError::Bind {
                addr: config.listen,
                source,
            })?;
        let admin = Arc::new(crate::admin::Admin::bind(
            &config.data,
            router.clone(),
            listener.devices(),
        )?);
        let metrics = match config.metrics.listen {
            Some(addr) => Some(
                crate::metrics::bind(addr)
                    .await
                    .map_err(|source| TransportError::Bind { addr, source })?,
            ),
            None => None,
        };
        Ok(Self {
            listener,
            router,
            addr,
            retention: config.retention.clone(),
            metrics,
            render: None,
            cluster,
            media,
            tasks,
            admin,
        })
    }

    /// Serves `/metrics` with this renderer (main.rs passes the Prometheus recorder's).
    pub fn with_metrics(mut self, render: crate::metrics::Render) -> Self {
        self.render = Some(render);
        self
    }

    /// The metrics address, when metrics are on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The router (tests and tools look at the store through it).
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Serves until `shutdown` completes, then closes connections, drains the router and
    /// flushes the store.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        self.run_draining(shutdown, std::future::pending()).await
    }

    /// [`Server::run`], and when `drain` completes first, a node of a cluster drains before
    /// it stops: it gives back its shards, sends new clients elsewhere, and moves its
    /// devices to the other nodes `cluster.drain_rate` a second (`plover serve` on SIGUSR1).
    pub async fn run_draining(
        self,
        shutdown: impl Future<Output = ()>,
        drain: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        info!("listening on {}", self.addr);
        let admin = tokio::spawn(self.admin.clone().serve());
        let duty = self.cluster.as_ref().map(|c| c.ownership().clone());
        let sweeper = tokio::spawn(sweep(
            self.router.clone(),
            self.retention.clone(),
            duty,
            self.media.clone(),
        ));
        let metrics = self.metrics.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                info!("metrics on http://{addr}/metrics");
            }
            let render = self
                .render
                .unwrap_or_else(|| Arc::new(|| "# no metrics recorder installed\n".to_owned()));
            let store = self.router.store().clone();
            tokio::spawn(crate::metrics::serve(
                listener,
                render,
                Arc::new(move || !store.is_poisoned()),
            ))
        });
        // The cluster task keeps this node's record and its devices' entries until the
        // listener has stopped, then removes them.
        let (stopped, stop) = tokio::sync::oneshot::channel::<()>();
        let cluster = self.cluster.map(|c| {
            let advertise = c.advertise_or(self.addr);
            tokio::spawn(c.run(advertise, async move {
                let _ = stop.await;
            }))
        });
        self.listener.run(shutdown, drain).await;
        let _ = stopped.send(());
        if let Some(task) = cluster {
            let _ = task.await;
        }
        sweeper.abort();
        admin.abort();
        self.admin.remove_socket();
        // Stopped (and dropped) before the router, so that a write made while it stops
        // fails at once instead of waiting for an append that will not come.
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        if let Some(m) = metrics {
            m.abort();
        }
        let router = self.router.clone();
        tokio::task::spawn_blocking(move || router.shutdown_blocking())
            .await
            .map_err(|e| RouterError::Internal(e.to_string()))??;
        info!("stopped; store flushed");
        Ok(())
    }
}

/// Removes expired bodies every `sweep_interval`, then the objects no message references.
/// In a cluster only the node holding shard 0 sweeps (`duty`): its removals go through the
/// log to every node, and the others would only append the same ones again.
async fn sweep(
    router: Router,
    config: crate::config::RetentionConfig,
    duty: Option<Arc<crate::cluster::Ownership>>,
    media: Arc<crate::media::Media>,
) {
    let mut tick = tokio::time::interval(config.sweep_interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        // Each node's own unfinished uploads.
        media.expire_uploads().await;
        if let Some(ownership) = &duty
            && !ownership.owned().iter().any(|(shard, _)| *shard == 0)
        {
            continue;
        }
        let r = router.clone();
        let max = config.max_undelivered;
        match tokio::task::spawn_blocking(move || r.sweep_blocking(max)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(removed = n, "retention sweep removed message bodies"),
            Ok(Err(e)) => tracing::warn!(error = %e, "retention sweep failed"),
            Err(e) => tracing::warn!(error = %e, "retention sweep panicked"),
        }
        // Then the objects whose last reference the sweep (or a deletion) removed.
        if let Err(e) = media.collect().await {
            tracing::warn!(error = %e, "media collection failed; the next pass tries again");
        }
    }
}
