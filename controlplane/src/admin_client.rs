//! A client of the admin service over its Unix socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use wirefence_proto::v1::admin_service_client::AdminServiceClient;

use crate::Error;

pub type AdminClient = AdminServiceClient<Channel>;

/// Connects to the admin socket at `path` (the URI below is required by tonic and
/// otherwise unused).
/// Largest admin reply the client accepts.
const MAX_REPLY: usize = 256 << 20;

pub async fn connect(path: &Path) -> Result<AdminClient, Error> {
    let path: PathBuf = path.to_owned();
    let channel = Endpoint::from_static("http://admin.socket")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await?;
    // Replies from the local server may be large (100,000 flow records): above tonic's
    // default limit of 4 MiB.
    Ok(AdminServiceClient::new(channel).max_decoding_message_size(MAX_REPLY))
}
