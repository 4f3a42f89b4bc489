//! A real PostgreSQL server for tests: Debian's `postgresql` package, a cluster made with
//! `initdb` in a directory of its own, listening on a Unix socket only (no port to collide
//! on), run as `nobody` when the test runs as root (PostgreSQL refuses root). Stopped on
//! drop; its directory goes with the test's temporary directory.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The cluster's superuser (trust authentication on its socket).
pub const USER: &str = "wirefence";

pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
}

/// The newest server installed under /usr/lib/postgresql/<major>/bin.
fn server_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|major| root.join(major.to_string()).join("bin/initdb").exists())
        .max();
    match newest {
        Some(major) => root.join(major.to_string()).join("bin"),
        None => panic!("no PostgreSQL server under {}: run scripts/install.sh (Debian's postgresql)", root.display()),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The uid/gid the server runs as: `nobody` under root, else ourselves.
const NOBODY: u32 = 65534;

impl Postgres {
    /// Starts the cluster in `dir` (made with initdb the first time; started again as it
    /// was after a [`Postgres::stop`] or by a later test step).
    pub fn start(dir: &Path) -> Postgres {
        let pg = Postgres { dir: dir.to_owned(), bin: server_bin() };
        if !pg.data().join("PG_VERSION").exists() {
            std::fs::create_dir_all(pg.sockets()).expect("create the PostgreSQL directory");
            for d in [dir, &pg.sockets()] {
                // Whatever the umask was (the process's other threads may change it).
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).expect("chmod");
            }
            if is_root() {
                // The server's user must reach its directory: walk up, making each
                // directory on the way traversable (tempdirs are 0700).
                for d in [dir, &pg.sockets()] {
                    std::os::unix::fs::chown(d, Some(NOBODY), Some(NOBODY)).expect("chown the PostgreSQL directory");
                }
                let mut up = dir.parent();
                while let Some(d) = up.filter(|d| *d != Path::new("/")) {
                    let mode = std::fs::metadata(d).expect("stat").permissions().mode();
                    if mode & 0o001 == 0 {
                        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o001)).expect("chmod");
                    }
                    up = d.parent();
                }
            }
            let data = pg.data();
            pg.run("initdb", &["-D", path(&data), "-U", USER, "--auth=trust", "--no-sync", "-E", "UTF8"]);
        }
        pg.run_start();
        pg
    }

    fn run_start(&self) {
        let (data, log, sockets) = (self.data(), self.dir.join("server.log"), self.sockets());
        // fsync off: a test cluster need not survive a power loss, only a process crash.
        let options = format!("-k {} -c listen_addresses='' -c fsync=off -c max_connections=200", sockets.display());
        self.run("pg_ctl", &["start", "-w", "-t", "30", "-D", path(&data), "-l", path(&log), "-o", &options]);
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn sockets(&self) -> PathBuf {
        self.dir.join("sock")
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.args(args);
        if is_root() {
            cmd.uid(NOBODY).gid(NOBODY).env("HOME", &self.dir);
        }
        let out = cmd.output().unwrap_or_else(|e| panic!("run {tool}: {e}"));
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            panic!(
                "{tool} {args:?} failed: {}{}\nserver log:\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    /// The URL of database `db` on this server (through its socket).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@localhost/{db}?host={}", self.sockets().display())
    }

    /// Creates database `db`; returns its URL.
    pub fn create_database(&self, db: &str) -> String {
        let sockets = self.sockets();
        self.run("createdb", &["-h", path(&sockets), "-U", USER, db]);
        self.url(db)
    }

    /// Stops the server (fast shutdown: open sessions are ended).
    pub fn stop(&self) {
        if self.data().join("postmaster.pid").exists() {
            self.run("pg_ctl", &["stop", "-w", "-m", "fast", "-D", path(&self.data())]);
        }
    }

    /// Starts the server again after [`Postgres::stop`].
    pub fn restart(&self) {
        self.run_start();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let mut cmd = Command::new(self.bin.join("pg_ctl"));
            cmd.args(["stop", "-w", "-m", "immediate", "-D"]).arg(self.data());
            if is_root() {
                cmd.uid(NOBODY).gid(NOBODY);
            }
            let _ = cmd.output();
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}
