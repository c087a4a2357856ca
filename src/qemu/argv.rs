//! The QEMU command line, built by a pure function from a [`VmSpec`].
//!
//! QEMU never opens a network device, a monitor or a console by path: the
//! supervisor creates them and hands over file descriptors, so QEMU can
//! run unprivileged under its seccomp sandbox.

use std::path::PathBuf;

/// The accelerator QEMU is started with (after `auto` was resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl Accelerator {
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

/// Firmware files, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirmwareFiles {
    /// QEMU's built-in SeaBIOS.
    Bios,
    /// OVMF code (read-only) and this VM's own copy of the variables;
    /// `secure_boot`: a Secure Boot build, which needs SMM.
    Uefi {
        code: PathBuf,
        vars: PathBuf,
        secure_boot: bool,
    },
}

/// A virtiofs device: a vhost-user-fs PCI device whose chardev is one end
/// of a socket connected to that share's virtiofsd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsDevice {
    /// The mount tag the guest sees.
    pub tag: String,
    /// Connected unix socket to virtiofsd.
    pub fd: i32,
}

/// Everything the command line depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub accel: Accelerator,
    pub firmware: FirmwareFiles,
    /// qcow2 overlay.
    pub disk: PathBuf,
    /// NoCloud seed (raw vfat).
    pub seed: PathBuf,
    pub mac: crate::state::Mac,
    /// Open TAP device (IFF_VNET_HDR).
    pub tap_fd: i32,
    /// One end of a connected socket pair for QMP.
    pub qmp_fd: i32,
    /// Listening unix socket for the serial console.
    pub console_fd: i32,
    /// Everything the serial port prints is written into this pipe (its
    /// write end); the supervisor keeps a capped log of it.
    pub serial_fd: i32,
    /// Shared folders. When there are any, guest RAM is a shared memfd
    /// backend (vhost-user needs to map it).
    pub shares: Vec<FsDevice>,
    /// Extra arguments, appended last (`.qemu-extra-args`).
    pub extra: Vec<String>,
    /// Restore a memory snapshot: QEMU waits for its state (`-incoming
    /// defer`), then reads it from this descriptor (`migrate-incoming`).
    pub incoming_fd: Option<i32>,
    /// A clone's disk: its overlay's backing file (the template's
    /// snapshot) is this read-only descriptor, not a path QEMU opens.
    pub backing_fd: Option<i32>,
}

/// The machine type for `firmware` (Secure Boot needs SMM).
pub fn machine_type(firmware: &FirmwareFiles) -> &'static str {
    match firmware {
        FirmwareFiles::Uefi {
            secure_boot: true, ..
        } => "q35,smm=on",
        _ => "q35",
    }
}

fn path(p: &std::path::Path) -> String {
    // QEMU's option parser splits on ',': a literal comma is doubled.
    p.to_string_lossy().replace(',', ",,")
}

/// The full argv (without the program name).
pub fn build_argv(spec: &VmSpec) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));

    push(&["-name", &format!("guest={},debug-threads=on", spec.name)]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    push(&["-msg", "timestamp=on"]);
    let machine = machine_type(&spec.firmware);
    match spec.accel {
        Accelerator::Kvm => push(&["-machine", &format!("{machine},accel=kvm"), "-cpu", "host"]),
        Accelerator::Tcg => push(&[
            "-machine",
            machine,
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
        ]),
    }
    push(&["-smp", &spec.cpus.to_string()]);
    push(&["-m", &format!("{}M", spec.memory_mib)]);
    if !spec.shares.is_empty() {
        // vhost-user backends map guest RAM: it must be shareable.
        push(&[
            "-object",
            &format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                spec.memory_mib
            ),
            "-numa",
            "node,memdev=mem",
        ]);
    }

    if let FirmwareFiles::Uefi {
        code,
        vars,
        secure_boot,
    } = &spec.firmware
    {
        if *secure_boot {
            // Only SMM code may write the variable store.
            push(&["-global", "driver=cfi.pflash01,property=secure,value=on"]);
        }
        push(&[
            "-drive",
            &format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                path(code)
            ),
            "-drive",
            &format!("if=pflash,format=raw,unit=1,file={}", path(vars)),
        ]);
    }

    // Monitor and console: descriptors the supervisor owns.
    push(&[
        "-chardev",
        &format!("socket,id=qmp,fd={}", spec.qmp_fd),
        "-mon",
        "chardev=qmp,mode=control",
        // The console's log goes to a descriptor (fd set 1), not a file
        // QEMU could grow without bound.
        "-add-fd",
        &format!("fd={},set=1,opaque=serial-log", spec.serial_fd),
        "-chardev",
        &format!(
            "socket,id=console,fd={},server=on,wait=off,logfile=/dev/fdset/1,logappend=on",
            spec.console_fd
        ),
        "-serial",
        "chardev:console",
    ]);

    // Disks: the overlay boots; the seed is a virtio disk (Debian's cloud
    // kernel has no AHCI driver, so a SATA CD-ROM would be invisible).
    match spec.backing_fd {
        None => push(&[
            "-drive",
            &format!(
                "if=none,id=disk0,file={},format=qcow2,cache=writeback,discard=unmap",
                path(&spec.disk)
            ),
        ]),
        Some(fd) => push(&[
            "-add-fd",
            &format!("fd={fd},set=2,opaque=backing"),
            "-drive",
            &format!(
                "if=none,id=disk0,file={},format=qcow2,cache=writeback,discard=unmap,\
                 backing.driver=qcow2,backing.read-only=on,backing.file.driver=file,\
                 backing.file.filename=/dev/fdset/2",
                path(&spec.disk)
            ),
        ]),
    }
    push(&[
        "-device",
        "virtio-blk-pci,drive=disk0,bootindex=1",
        "-drive",
        &format!(
            "if=none,id=seed,file={},format=raw,readonly=on",
            path(&spec.seed)
        ),
        "-device",
        "virtio-blk-pci,drive=seed",
    ]);

    push(&[
        "-netdev",
        &format!("tap,id=net0,fd={}", spec.tap_fd),
        "-device",
        &format!("virtio-net-pci,netdev=net0,mac={}", spec.mac),
        "-device",
        "virtio-rng-pci",
        // A new generation id at every start, restores included: the guest
        // kernel reseeds its random number generator when it changes, so a
        // restored snapshot is not a replay of the saved one.
        "-device",
        "vmgenid,guid=auto",
    ]);

    for (i, fs) in spec.shares.iter().enumerate() {
        push(&[
            "-chardev",
            &format!("socket,id=fs{i},fd={}", fs.fd),
            "-device",
            &format!("vhost-user-fs-pci,chardev=fs{i},tag={}", fs.tag),
        ]);
    }

    if spec.incoming_fd.is_some() {
        a.extend(["-incoming".to_string(), "defer".to_string()]);
    }
    a.extend(spec.extra.iter().cloned());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: "box".into(),
            cpus: 2,
            memory_mib: 2048,
            accel: Accelerator::Tcg,
            firmware: FirmwareFiles::Bios,
            disk: "/var/lib/migrant/vms/box/disk.qcow2".into(),
            seed: "/var/lib/migrant/vms/box/seed.img".into(),
            mac: crate::state::Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            tap_fd: 10,
            qmp_fd: 11,
            console_fd: 12,
            serial_fd: 13,
            shares: vec![],
            extra: vec![],
            incoming_fd: None,
            backing_fd: None,
        }
    }

    fn joined(spec: &VmSpec) -> String {
        build_argv(spec).join(" ")
    }

    /// The value that follows `flag` the `n`th time it appears.
    fn values<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn restores_wait_for_their_state_and_clones_get_their_backing_by_descriptor() {
        let plain = build_argv(&spec());
        assert!(!plain.contains(&"-incoming".to_string()));
        assert!(values(&plain, "-device").contains(&"vmgenid,guid=auto"));
        let mut s = spec();
        s.incoming_fd = Some(20);
        s.backing_fd = Some(21);
        let argv = build_argv(&s);
        assert_eq!(values(&argv, "-incoming"), ["defer"]);
        assert!(values(&argv, "-add-fd").contains(&"fd=21,set=2,opaque=backing"));
        let drive = values(&argv, "-drive")[0];
        assert!(
            drive.contains("backing.file.filename=/dev/fdset/2")
                && drive.contains("backing.read-only=on"),
            "{drive}"
        );
    }

    #[test]
    fn tcg_bios_command_line() {
        let argv = build_argv(&spec());
        assert_eq!(values(&argv, "-machine"), ["q35"]);
        assert_eq!(values(&argv, "-accel"), ["tcg,thread=multi"]);
        assert_eq!(values(&argv, "-cpu"), ["max"]);
        assert_eq!(values(&argv, "-smp"), ["2"]);
        assert_eq!(values(&argv, "-m"), ["2048M"]);
        assert!(!joined(&spec()).contains("pflash"));
        assert_eq!(values(&argv, "-netdev"), ["tap,id=net0,fd=10"]);
        assert!(
            values(&argv, "-device").contains(&"virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56")
        );
    }

    #[test]
    fn kvm_uses_host_cpu() {
        let mut s = spec();
        s.accel = Accelerator::Kvm;
        let argv = build_argv(&s);
        assert_eq!(values(&argv, "-machine"), ["q35,accel=kvm"]);
        assert_eq!(values(&argv, "-cpu"), ["host"]);
        assert!(values(&argv, "-accel").is_empty());
    }

    #[test]
    fn sandbox_is_always_on() {
        let argv = build_argv(&spec());
        assert_eq!(
            values(&argv, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );
        assert!(argv.contains(&"-nodefaults".to_string()));
        assert!(!argv.iter().any(|a| a == "-daemonize"));
    }

    #[test]
    fn monitor_and_console_use_descriptors() {
        let argv = build_argv(&spec());
        let chardevs = values(&argv, "-chardev");
        assert_eq!(chardevs[0], "socket,id=qmp,fd=11");
        assert!(chardevs[1].starts_with("socket,id=console,fd=12,server=on,wait=off,logfile="));
        assert_eq!(values(&argv, "-mon"), ["chardev=qmp,mode=control"]);
        assert_eq!(values(&argv, "-serial"), ["chardev:console"]);
    }

    #[test]
    fn seed_is_a_readonly_virtio_disk() {
        let argv = build_argv(&spec());
        let drives = values(&argv, "-drive");
        assert!(
            drives
                .iter()
                .any(|d| d.contains("seed.img,format=raw,readonly=on"))
        );
        assert!(values(&argv, "-device").contains(&"virtio-blk-pci,drive=seed"));
        assert!(values(&argv, "-device").contains(&"virtio-blk-pci,drive=disk0,bootindex=1"));
    }

    #[test]
    fn uefi_adds_two_pflash_drives() {
        let mut s = spec();
        s.firmware = FirmwareFiles::Uefi {
            code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            vars: "/var/lib/migrant/vms/box/nvram.fd".into(),
            secure_boot: false,
        };
        let argv = build_argv(&s);
        assert_eq!(values(&argv, "-machine"), ["q35"]);
        assert!(values(&argv, "-global").is_empty());
        let drives = values(&argv, "-drive");
        assert_eq!(
            drives[0],
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
        );
        assert_eq!(
            drives[1],
            "if=pflash,format=raw,unit=1,file=/var/lib/migrant/vms/box/nvram.fd"
        );
    }

    #[test]
    fn secure_boot_turns_on_smm() {
        let mut s = spec();
        s.firmware = FirmwareFiles::Uefi {
            code: "/usr/share/OVMF/OVMF_CODE_4M.ms.fd".into(),
            vars: "/v/nvram.fd".into(),
            secure_boot: true,
        };
        let argv = build_argv(&s);
        assert_eq!(values(&argv, "-machine"), ["q35,smm=on"]);
        assert_eq!(
            values(&argv, "-global"),
            ["driver=cfi.pflash01,property=secure,value=on"]
        );
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let mut s = spec();
        s.disk = "/srv/a,b/disk.qcow2".into();
        assert!(joined(&s).contains("file=/srv/a,,b/disk.qcow2,format=qcow2"));
    }

    #[test]
    fn no_shares_no_shared_memory() {
        let argv = build_argv(&spec());
        assert!(values(&argv, "-object").is_empty());
        assert!(values(&argv, "-numa").is_empty());
        assert!(!joined(&spec()).contains("vhost-user-fs"));
    }

    #[test]
    fn shares_get_a_memfd_backend_and_one_device_each() {
        let mut s = spec();
        s.shares = vec![
            FsDevice {
                tag: "workspace".into(),
                fd: 20,
            },
            FsDevice {
                tag: "data".into(),
                fd: 21,
            },
        ];
        let argv = build_argv(&s);
        assert_eq!(
            values(&argv, "-object"),
            ["memory-backend-memfd,id=mem,size=2048M,share=on"]
        );
        assert_eq!(values(&argv, "-numa"), ["node,memdev=mem"]);
        let chardevs = values(&argv, "-chardev");
        assert!(chardevs.contains(&"socket,id=fs0,fd=20"));
        assert!(chardevs.contains(&"socket,id=fs1,fd=21"));
        let devices = values(&argv, "-device");
        assert!(devices.contains(&"vhost-user-fs-pci,chardev=fs0,tag=workspace"));
        assert!(devices.contains(&"vhost-user-fs-pci,chardev=fs1,tag=data"));
        // The memory size matches -m.
        assert_eq!(values(&argv, "-m"), ["2048M"]);
    }

    #[test]
    fn extra_arguments_come_last() {
        let mut s = spec();
        s.extra = vec!["-device".into(), "virtio-balloon-pci".into()];
        let argv = build_argv(&s);
        assert_eq!(&argv[argv.len() - 2..], ["-device", "virtio-balloon-pci"]);
    }
}
