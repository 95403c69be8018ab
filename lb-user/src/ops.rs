//! Operator controls, like HAProxy's runtime API: `lb server NAME drain|disable|enable`.
//! The running agent listens on a Unix socket (`/run/lb/<instance>.sock`, root only); each
//! request goes to the map owner's loop, which applies it and answers.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::{mpsc, oneshot},
};
use tracing::warn;

use crate::live::Admin;

/// One operator request, with the channel its answer goes back on.
pub struct OpRequest {
    pub backend: String,
    pub admin: Admin,
    pub reply: oneshot::Sender<Result<String, String>>,
}

pub fn socket_path(instance: &str) -> PathBuf {
    Path::new("/run/lb").join(format!("{instance}.sock"))
}

pub fn parse_admin(word: &str) -> Result<Admin> {
    Ok(match word {
        "drain" => Admin::Drain,
        "disable" => Admin::Disable,
        "enable" | "ready" => Admin::Ready,
        other => bail!("unknown action {other:?}: expected drain, disable or enable"),
    })
}

/// Listens on the instance's socket; every line `BACKEND ACTION` becomes an [`OpRequest`].
pub fn listen(instance: &str, tx: mpsc::Sender<OpRequest>) -> Result<()> {
    let path = socket_path(instance);
    std::fs::create_dir_all("/run/lb").context("create /run/lb")?;
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                if tokio::io::BufReader::new(r)
                    .read_line(&mut line)
                    .await
                    .is_err()
                {
                    return;
                }
                let answer = match handle(&line, &tx).await {
                    Ok(s) => format!("ok {s}\n"),
                    Err(e) => format!("error {e:#}\n"),
                };
                if let Err(e) = w.write_all(answer.as_bytes()).await {
                    warn!("operator socket: {e}");
                }
            });
        }
    });
    Ok(())
}

async fn handle(line: &str, tx: &mpsc::Sender<OpRequest>) -> Result<String> {
    let mut words = line.split_whitespace();
    let (Some(backend), Some(action)) = (words.next(), words.next()) else {
        bail!("expected `BACKEND drain|disable|enable`");
    };
    let admin = parse_admin(action)?;
    let (reply, rx) = oneshot::channel();
    tx.send(OpRequest {
        backend: backend.to_string(),
        admin,
        reply,
    })
    .await
    .context("the agent is stopping")?;
    rx.await
        .context("the agent is stopping")?
        .map_err(|e| anyhow::anyhow!(e))
}

/// `lb server NAME ACTION`: sends the request to a running agent and returns its answer.
pub fn request(instance: &str, backend: &str, action: &str) -> Result<String> {
    parse_admin(action)?;
    let path = socket_path(instance);
    let mut s = UnixStream::connect(&path).with_context(|| {
        format!(
            "no running agent for instance {instance:?} ({} not reachable)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(s, "{backend} {action}")?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    match answer.trim().split_once(' ') {
        Some(("ok", rest)) => Ok(rest.to_string()),
        Some(("error", rest)) => bail!("{rest}"),
        _ => bail!("unexpected answer {answer:?}"),
    }
}
