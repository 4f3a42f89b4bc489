//! The kernel module, through wireguard-control's generic netlink `wireguard` family.

use std::path::Path;

use wireguard_control::{Backend, Device, DeviceUpdate, InterfaceName};

use super::{io_err, DeviceInfo, WgBackend, WgError};
use crate::model::IfName;

pub struct KernelBackend;

/// True when the module is loaded, or loads now.
pub fn kernel_wireguard_available() -> bool {
    if Path::new("/sys/module/wireguard").exists() {
        return true;
    }
    let loaded = std::process::Command::new("modprobe")
        .args(["-q", "wireguard"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    loaded && Path::new("/sys/module/wireguard").exists()
}

pub(super) fn wg_name(ifname: &IfName) -> InterfaceName {
    ifname.as_str().parse().expect("IfName is validated to be a valid interface name")
}

impl WgBackend for KernelBackend {
    fn kind(&self) -> crate::ownership::BackendKind {
        crate::ownership::BackendKind::Kernel
    }

    fn ensure_device(&self, ifname: &IfName) -> Result<(), WgError> {
        // wireguard-control creates the `wireguard` link when it is missing.
        DeviceUpdate::new().apply(&wg_name(ifname), Backend::Kernel).map_err(io_err("kernel", "create device", ifname))
    }

    fn read(&self, ifname: &IfName) -> Result<Option<DeviceInfo>, WgError> {
        match Device::get(&wg_name(ifname), Backend::Kernel) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) || e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("kernel", "read device", ifname)(e)),
        }
    }

    fn apply(&self, ifname: &IfName, update: DeviceUpdate) -> Result<(), WgError> {
        update.apply(&wg_name(ifname), Backend::Kernel).map_err(io_err("kernel", "configure device", ifname))
    }

    fn cleanup(&self, _ifname: &IfName) -> Result<(), WgError> {
        Ok(())
    }
}
