//! The bottle's image, made present on the engine before anything starts: a local one as it is, an archive (`docker
//! save`'s, named by a path) loaded, a missing one pulled by the engine. Progress goes to stderr, where the user is
//! looking; a failure says what the engine said and how to make the image present.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::models::{BuildInfo, CreateImageInfo};
use bollard::query_parameters::{CreateImageOptions, ImportImageOptions};
use futures_util::StreamExt;

use super::api::{Api, ApiError};

/// A pull or a load that says nothing for this long is given up.
const STALL: Duration = Duration::from_secs(300);
/// At most one progress line a layer this often (status changes always show).
const TICK: Duration = Duration::from_secs(2);

/// What `image` names: an archive when it is a path (`/…`, `./…`, `../…`), else an image reference.
#[derive(Debug, PartialEq, Eq)]
pub enum Source<'a> {
    Reference(&'a str),
    Archive(&'a Path),
}

pub fn source(image: &str) -> Source<'_> {
    if image.starts_with('/') || image.starts_with("./") || image.starts_with("../") {
        Source::Archive(Path::new(image))
    } else {
        Source::Reference(image)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "image `{image}` is not on this engine and the engine could not pull it ({why}): `docker load -i FILE` (or \
         `--image ./FILE.tar`), `docker build -t {image} .`, or `docker pull {image}` with your registry login"
    )]
    Pull { image: String, why: String },
    #[error("cannot read the image archive {}: {source}", path.display())]
    Archive {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the engine could not load the image archive {} ({why}); it takes what `docker save` writes", path.display())]
    Load { path: PathBuf, why: String },
    #[error(
        "the image archive {} holds {} images ({}); give the one to run with --image NAME after `docker load -i {}`",
        path.display(), names.len(), names.join(", "), path.display()
    )]
    Ambiguous { path: PathBuf, names: Vec<String> },
    #[error(transparent)]
    Engine(#[from] ApiError),
}

/// The reference of `image` on the engine once it is there: loaded from its archive, or pulled if missing.
pub fn ensure(api: &Api, image: &str, progress: &mut dyn Write) -> Result<String, ImageError> {
    match source(image) {
        Source::Archive(path) => load(api, path, progress),
        Source::Reference(name) => {
            if !api.has_image(name)? {
                pull(api, name, progress)?;
            }
            Ok(name.to_string())
        }
    }
}

fn pull(api: &Api, image: &str, progress: &mut dyn Write) -> Result<(), ImageError> {
    let _ = writeln!(progress, "bot-bottle: pulling image {image} (not on this engine)");
    // A reference without a tag or digest means `latest` (an empty tag would pull every tag).
    let last = image.rsplit('/').next().unwrap_or(image);
    let tag = (!last.contains(':') && !image.contains('@')).then(|| "latest".to_string());
    let options = CreateImageOptions {
        from_image: Some(image.to_string()),
        tag,
        ..Default::default()
    };
    let stream = api.docker.create_image(Some(options), None, None).map(|item| {
        item.map(|i: CreateImageInfo| Event {
            error: i.error_detail.map(|d| d.message.unwrap_or_default()),
            id: i.id,
            status: i.status,
            detail: i.progress_detail,
            stream: None,
        })
    });
    let mut shown = Shown::default();
    drain(api, stream, |e| shown.line(progress, e.id, e.status, e.detail)).map_err(|why| ImageError::Pull {
        image: image.to_string(),
        why,
    })?;
    let _ = writeln!(progress, "bot-bottle: pulled {image}");
    Ok(())
}

fn load(api: &Api, path: &Path, progress: &mut dyn Write) -> Result<String, ImageError> {
    let archive = |source| ImageError::Archive {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(archive)?;
    if !file.metadata().map_err(archive)?.is_file() {
        return Err(archive(std::io::Error::other("not a regular file")));
    }
    let _ = writeln!(progress, "bot-bottle: loading image archive {}", path.display());
    // The archive streamed in chunks; a read error ends the upload and the engine's answer says so.
    let chunks = futures_util::stream::poll_fn(move |_| {
        let mut buf = vec![0u8; 1 << 20];
        std::task::Poll::Ready(match file.read(&mut buf) {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some(Ok::<_, std::io::Error>(bytes::Bytes::from(buf)))
            }
            Err(e) => Some(Err(e)),
        })
    });
    let stream = api
        .docker
        .import_image_stream(ImportImageOptions::default(), chunks, None)
        .map(|item| {
            item.map(|i: BuildInfo| Event {
                error: i.error_detail.map(|d| d.message.unwrap_or_default()),
                id: i.id,
                status: i.status,
                detail: i.progress_detail,
                stream: i.stream,
            })
        });
    let fail = |why: String| ImageError::Load {
        path: path.to_path_buf(),
        why,
    };
    let mut names = Vec::new();
    let mut shown = Shown::default();
    drain(api, stream, |e| {
        if let Some(line) = &e.stream {
            names.extend(loaded(line));
        }
        shown.line(progress, e.id, e.status, e.detail);
    })
    .map_err(fail)?;
    match names.as_slice() {
        [one] => {
            let _ = writeln!(progress, "bot-bottle: loaded {one}");
            Ok(one.clone())
        }
        [] => Err(fail("it named no image it loaded".into())),
        _ => Err(ImageError::Ambiguous {
            path: path.to_path_buf(),
            names,
        }),
    }
}

/// One message of a pull's or a load's progress stream.
struct Event {
    id: Option<String>,
    status: Option<String>,
    detail: Option<bollard::models::ProgressDetail>,
    /// A load's words (`Loaded image: …`).
    stream: Option<String>,
    error: Option<String>,
}

/// Reads the stream to its end, each message to `on`; the engine's error, a broken stream or a stall as the reason.
fn drain(
    api: &Api,
    mut stream: impl futures_util::Stream<Item = Result<Event, bollard::errors::Error>> + Unpin,
    mut on: impl FnMut(Event),
) -> Result<(), String> {
    api.rt.block_on(async {
        loop {
            match tokio::time::timeout(STALL, stream.next()).await {
                Err(_) => return Err(format!("no progress for {STALL:?}")),
                Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(Some(Ok(Event { error: Some(why), .. }))) => {
                    return Err(if why.is_empty() {
                        "an error without a message".into()
                    } else {
                        why
                    });
                }
                Ok(Some(Ok(event))) => on(event),
            }
        }
    })
}

/// The image a load's output line names: `Loaded image: NAME` (tagged) or `Loaded image ID: sha256:…` (untagged).
fn loaded(line: &str) -> Option<String> {
    let line = line.trim();
    line.strip_prefix("Loaded image: ")
        .or_else(|| line.strip_prefix("Loaded image ID: "))
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(String::from)
}

/// Progress lines, one a layer per status change and at most one a `TICK` while its bytes move.
#[derive(Default)]
struct Shown {
    last: BTreeMap<String, (String, Instant)>,
}

impl Shown {
    fn line(
        &mut self,
        out: &mut dyn Write,
        id: Option<String>,
        status: Option<String>,
        detail: Option<bollard::models::ProgressDetail>,
    ) {
        let Some(status) = status else { return };
        let id = id.unwrap_or_default();
        let bytes = detail
            .and_then(|d| Some((d.current?, d.total?)))
            .filter(|(_, t)| *t > 0);
        let now = Instant::now();
        let same = self
            .last
            .get(&id)
            .is_some_and(|(s, at)| *s == status && now.duration_since(*at) < TICK);
        if same {
            return;
        }
        self.last.insert(id.clone(), (status.clone(), now));
        let id = if id.is_empty() {
            String::new()
        } else {
            format!("{id}: ")
        };
        let _ = match bytes {
            Some((cur, total)) => writeln!(out, "  {id}{status} {} / {} MiB", mib(cur), mib(total)),
            None => writeln!(out, "  {id}{status}"),
        };
    }
}

fn mib(bytes: i64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_an_archive_and_anything_else_a_reference() {
        assert_eq!(source("/srv/img.tar"), Source::Archive(Path::new("/srv/img.tar")));
        assert_eq!(source("./img.tar"), Source::Archive(Path::new("./img.tar")));
        assert_eq!(source("../img.tar"), Source::Archive(Path::new("../img.tar")));
        assert_eq!(source("debian:12"), Source::Reference("debian:12"));
        assert_eq!(
            source("127.0.0.1:5000/a/b:1"),
            Source::Reference("127.0.0.1:5000/a/b:1")
        );
    }

    #[test]
    fn the_loaded_image_is_read_from_the_engines_words() {
        assert_eq!(loaded("Loaded image: local/a:1\n").as_deref(), Some("local/a:1"));
        assert_eq!(loaded("Loaded image ID: sha256:ab\n").as_deref(), Some("sha256:ab"));
        assert_eq!(loaded("Loading layer  1.2MB/3MB"), None);
        assert_eq!(loaded("Loaded image: "), None);
    }

    #[test]
    fn progress_shows_each_status_once_a_tick() {
        let mut shown = Shown::default();
        let mut out = Vec::new();
        let detail = |c| {
            Some(bollard::models::ProgressDetail {
                current: Some(c),
                total: Some(4 << 20),
            })
        };
        shown.line(&mut out, Some("l1".into()), Some("Pulling fs layer".into()), None);
        shown.line(&mut out, Some("l1".into()), Some("Downloading".into()), detail(1 << 20));
        shown.line(&mut out, Some("l1".into()), Some("Downloading".into()), detail(2 << 20));
        shown.line(&mut out, Some("l1".into()), Some("Pull complete".into()), None);
        shown.line(&mut out, None, Some("Digest: sha256:00".into()), None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "  l1: Pulling fs layer\n  l1: Downloading 1.0 / 4.0 MiB\n  l1: Pull complete\n  Digest: sha256:00\n"
        );
    }
}
