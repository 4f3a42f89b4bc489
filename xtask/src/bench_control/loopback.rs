//! A release control plane on loopback (plaintext; SQLite in a temporary directory, or a
//! PostgreSQL database shared with other replicas) for the benches whose agents are
//! simulated in this process.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use wirefence_control::admin_client::AdminClient;

pub struct Loopback {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub addr: SocketAddr,
    pub admin: AdminClient,
    _dir: wirefence_tests::TempDir,
}

impl Loopback {
    /// Starts it for `agents` simulated agents, all from 127.0.0.1 with one reusable key.
    pub async fn start(control: &Path, agents: usize) -> Result<Loopback> {
        Loopback::start_on(control, agents, None).await
    }

    /// [`Loopback::start`] on the PostgreSQL database at `db` (`None`: SQLite of its own).
    pub async fn start_on(control: &Path, agents: usize, db: Option<&str>) -> Result<Loopback> {
        Loopback::start_with(control, agents, db, &[]).await
    }

    /// [`Loopback::start_on`] with more `serve` arguments.
    pub async fn start_with(control: &Path, agents: usize, db: Option<&str>, extra: &[&str]) -> Result<Loopback> {
        let dir = wirefence_tests::TempDir::new();
        let admin_socket = dir.0.join("admin.sock");
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        drop(listener);
        let mut child = tokio::process::Command::new(control)
            .arg("--admin-socket")
            .arg(&admin_socket)
            .arg("serve")
            .arg("--db")
            .arg(db.map_or_else(|| dir.0.join("control.db").into_os_string(), Into::into))
            .args(["--listen", &addr.to_string(), "--insecure", "--overlay-v4", "10.64.0.0/16"])
            .args(["--enroll-burst", "1000000"])
            .args(["--max-connections-per-source", &(agents + 16).to_string()])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start wirefence-control")?;
        let pid = child.id().context("control plane pid")?;
        let admin = loop {
            match wirefence_control::admin_client::connect(&admin_socket).await {
                Ok(a) => break a,
                Err(_) if child.try_wait()?.is_none() => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => bail!("control plane exited: {e}"),
            }
        };
        Ok(Loopback { child, pid, addr, admin, _dir: dir })
    }
}

/// Enrolls a simulated agent named `hostname` with `key` (a fresh key pair, the challenge
/// answered) over `channel`.
pub async fn enroll(
    channel: tonic::transport::Channel,
    hostname: String,
    key: String,
) -> Result<wirefence_proto::v1::RegisterResponse> {
    use wirefence_proto::v1;
    let mut client = v1::agent_service_client::AgentServiceClient::new(channel);
    let private: [u8; 32] = rand::random();
    let mut req = v1::RegisterRequest {
        public_key: wirefence_proto::possession::public_key(&private).to_vec(),
        hostname,
        enrollment_key: key,
        endpoints: vec![v1::SocketAddress::from(SocketAddr::from(([192, 0, 2, 1], 51820)))],
        ..Default::default()
    };
    let challenge = client.enroll_challenge(v1::EnrollChallengeRequest {}).await?.into_inner();
    wirefence_proto::possession::answer(&mut req, &private, &challenge)?;
    Ok(client.register(req).await?.into_inner())
}
