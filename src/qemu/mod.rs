//! QEMU: the argv builder (pure), the process launcher and the QMP client.

pub mod accel;
pub mod argv;
pub mod extra;
pub mod process;
pub mod qmp;

pub use argv::{Accelerator, FirmwareFiles, FsDevice, VmSpec, build_argv, machine_type};
