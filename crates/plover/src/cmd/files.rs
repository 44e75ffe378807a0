//! `plover send --file` and `plover fetch`: files encrypted on this device, uploaded and
//! downloaded on streams of their own, resumed after a cut connection.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use plover_client::media::{Prepared, Through, prepare};
use plover_client::{ClientConfig, ClientError, Connection};
use plover_proto::content::{Attachment, Content};
use plover_proto::{ClientMsgId, Target};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::args::{ClientArgs, Which};

/// How many times a transfer is tried (each resuming where the last stopped).
const ATTEMPTS: u32 = 8;

#[derive(Args)]
pub(crate) struct FetchArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    which: Which,
    /// The message that carries the attachment.
    #[arg(long)]
    seq: u64,
    /// Where to write the file (default: its name, in the current directory).
    #[arg(short = 'o', long)]
    output: Option<PathBuf>,
}

/// A progress bar on stderr, hidden when stderr is not a terminal.
fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

/// Whether an error of a transfer is worth another attempt on a new connection: anything
/// but a refusal, unless the server said to try again (`unavailable`, `shutdown`, `moved`).
fn retry(e: &ClientError) -> bool {
    e.is_retryable() || !matches!(e, ClientError::Refused { .. } | ClientError::Protocol(_))
}

/// Runs `transfer` up to [`ATTEMPTS`] times, on `conn` first and then on new connections,
/// while it fails with an error worth another attempt (a cut connection, a server stopping
/// or busy). Each attempt resumes where the last stopped. Returns the connection the
/// transfer completed on; clears the progress bar either way.
async fn with_attempts(
    config: &ClientConfig,
    mut conn: Option<Connection>,
    progress: &ProgressBar,
    what: &str,
    mut transfer: impl AsyncFnMut(&Connection) -> Result<(), ClientError>,
) -> Result<Connection> {
    let mut last = None;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
        }
        let c = match conn.take() {
            Some(c) => c,
            None => match Connection::connect(config).await {
                Ok(c) => c,
                Err(e) if retry(&e) => {
                    last = Some(e);
                    continue;
                }
                Err(e) => {
                    progress.finish_and_clear();
                    return Err(e.into());
                }
            },
        };
        match transfer(&c).await {
            Ok(()) => {
                progress.finish_and_clear();
                return Ok(c);
            }
            Err(e) if retry(&e) => {
                progress.println(format!("{what} interrupted ({e}); resuming"));
                last = Some(e);
            }
            Err(e) => {
                progress.finish_and_clear();
                c.close().await;
                return Err(e.into());
            }
        }
    }
    progress.finish_and_clear();
    let why = format!("the {what} did not complete after {ATTEMPTS} attempts");
    match last {
        Some(e) => Err(anyhow::Error::from(e).context(why)),
        None => Err(anyhow::anyhow!(why)),
    }
}

/// `plover send --file PATH [--caption TEXT]`.
pub(crate) async fn send_file(
    client: &ClientArgs,
    target: Target,
    path: &Path,
    caption: Option<String>,
) -> Result<()> {
    let config = client.config()?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("--file names no file")?;
    let prepared = prepare(path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    let progress = bar(prepared.size, &format!("uploading {name}"));
    let conn = with_attempts(&config, None, &progress, "upload", async |c| {
        let p = progress.clone();
        c.upload(&prepared, &mut move |held| p.set_position(held))
            .await
            .map(drop)
    })
    .await?;
    let attachment = attachment(&prepared, name, caption);
    let body = Bytes::from(Content::Attachment(attachment).encode());
    let sent = async {
        let conv = conn.open(target, true).await?;
        conv.send_referencing(ClientMsgId::random(), body, vec![prepared.object])
            .await
    }
    .await;
    conn.close().await;
    let ack = sent?;
    println!("sent conversation={} seq={}", ack.conversation, ack.seq);
    Ok(())
}

/// The pointer a message carries to a prepared (and uploaded) file; for an image, its
/// dimensions and a small thumbnail, made here (the server never sees the image).
pub(crate) fn attachment(prepared: &Prepared, name: String, caption: Option<String>) -> Attachment {
    let media_type = media_type(&name);
    let (dimensions, thumbnail) = if media_type.starts_with("image/") {
        preview(&prepared.path)
    } else {
        (None, None)
    };
    Attachment {
        dimensions,
        thumbnail,
        caption,
        ..prepared.attachment(name, media_type)
    }
}

/// The longest side of a thumbnail, in pixels.
const THUMBNAIL: u32 = 96;

/// An image's width and height, and a JPEG thumbnail of at most [`THUMBNAIL`] pixels a side
/// (a few kB, inline in the message); nothing for a file the `image` crate cannot read, or
/// one too large to decode here (over 64 Mpixels).
fn preview(path: &Path) -> (Option<(u32, u32)>, Option<Bytes>) {
    let Ok(reader) = image::ImageReader::open(path).and_then(|r| r.with_guessed_format()) else {
        return (None, None);
    };
    let Ok(dimensions) = reader.into_dimensions() else {
        return (None, None);
    };
    if u64::from(dimensions.0) * u64::from(dimensions.1) > 64_000_000 {
        return (Some(dimensions), None);
    }
    let thumbnail = image::open(path).ok().and_then(|img| {
        let small = img.thumbnail(THUMBNAIL, THUMBNAIL).into_rgb8();
        let mut out = std::io::Cursor::new(Vec::new());
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 70)
            .encode_image(&small)
            .ok()?;
        Some(Bytes::from(out.into_inner()))
    });
    (Some(dimensions), thumbnail)
}

/// A media type from a file name's extension.
fn media_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "mp4" => "video/mp4",
        "mov" => "video/quicktime",
        "mp3" => "audio/mpeg",
        "m4a" => "audio/mp4",
        "ogg" | "opus" => "audio/ogg",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

/// `plover fetch --conversation C --seq N [-o FILE]`.
pub(crate) async fn fetch(args: FetchArgs) -> Result<()> {
    let config = args.client.config()?;
    let target = args.which.target()?;
    let conn = Connection::connect(&config).await?;
    let found = async {
        let conv = conn.open(target, false).await?;
        let (page, _) = conv
            .history(None, Some(args.seq.saturating_sub(1)), 1)
            .await?;
        Ok::<_, ClientError>((conv.id(), page.into_iter().find(|m| m.seq == args.seq)))
    }
    .await;
    let (conversation, message) = match found {
        Ok(found) => found,
        Err(e) => {
            conn.close().await;
            return Err(e.into());
        }
    };
    let Some(message) = message else {
        conn.close().await;
        bail!(
            "conversation {conversation} has no message #{} that you can see",
            args.seq
        );
    };
    let Some(Content::Attachment(attachment)) = Content::decode(&message.body) else {
        conn.close().await;
        bail!(
            "message #{} of conversation {conversation} carries no attachment",
            args.seq
        );
    };
    // Only the file's name, never a path it might carry.
    let name = Path::new(&attachment.name)
        .file_name()
        .map(|n| n.to_owned())
        .unwrap_or_else(|| "attachment".into());
    let out = args.output.unwrap_or_else(|| PathBuf::from(name));
    let through = Through {
        conversation,
        seq: args.seq,
    };
    let progress = bar(attachment.size, &format!("fetching {}", attachment.name));
    with_attempts(&config, Some(conn), &progress, "download", async |c| {
        let p = progress.clone();
        c.download(&attachment, through, &out, &mut move |held| {
            p.set_position(held)
        })
        .await
    })
    .await?
    .close()
    .await;
    println!(
        "saved {} ({} bytes, {})",
        out.display(),
        attachment.plain_size,
        attachment.media_type
    );
    Ok(())
}
