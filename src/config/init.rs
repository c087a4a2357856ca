//! The files `migrant init` writes into a new project folder.

/// Stands for the managed public key in `cloud-init.yml`; replaced with the
/// real key when the seed is built, so project folders can be shared
/// without anyone's key in them.
pub const PUBKEY_PLACEHOLDER: &str = "__MIGRANT_PUBKEY__";

/// The default `Migrantfile` (TOML): every setting, commented, with its
/// default.
pub const INIT_MIGRANTFILE: &str = r#"# Migrantfile: one throwaway VM, defined in TOML.
# Relative paths below are relative to this file's folder.

# VM name (letters, digits, _ . -). Defaults to this folder's name.
#name = "my-vm"

# Base image: an image name, an https:// URL, a file:// URL or a local
# .qcow2 file. Names: debian-12, debian-13 (debian), ubuntu-22.04,
# ubuntu-24.04, ubuntu-26.04 (ubuntu-lts), ubuntu-26.10 (ubuntu): the
# distribution's official cloud image, checked against its published
# checksum list. `migrant image list` shows what is cached.
image = "debian-13"

# How to verify an https:// image: "sha256:<hex>", "sha512:<hex>" or the
# URL of a checksum list. Without it, a SHA512SUMS or SHA256SUMS file
# beside the image is used.
#image_checksum = "sha512:..."

# Resources. Sizes take a unit: K, M, G or T (powers of 1024).
cpus = 2
memory = "2G"
disk = "20G"

# "bios" or "uefi" (some images, e.g. Debian's generic one, need uefi).
#firmware = "bios"

# UEFI Secure Boot with the distribution's keys enrolled (uefi only).
#secure_boot = false

# "auto" (KVM when available), "kvm" or "tcg" (software, slow).
#accel = "auto"

# Seconds `migrant halt` waits for a clean shutdown before forcing it.
#halt_timeout = 60

# After `migrant up`: "none", "ssh" or "console".
#autoconnect = "none"

# Host 127.0.0.1 ports that `migrant tunnel` forwards to the guest's
# 127.0.0.1 when run without arguments.
#tunnel_ports = [3000, 5432]

# Wait for cloud-init to finish before `migrant up` returns.
#wait_cloud_init = true

# Shared folders, one [[share]] block each. With isolation (the default)
# the guest writes into a size-capped image that migrant mounts on the
# host; without it the guest gets the host folder itself.
#[[share]]
#host = "workspace"                 # created if missing
#tag = "workspace"                  # default: the folder's name
#guest = "/home/migrant/workspace"  # mount point in the guest (optional)
#size = "10G"
#isolation = true

[network]
# "direct": internet access, with the host and private networks blocked;
# "none": no network access at all.
egress = "direct"
#subnet = "10.0.2.0/24"

# Exceptions to the isolation:
#   allow-host-port tcp/8080                      the host's port 8080
#   allow-lan-host 192.168.1.50                   one machine on the LAN
#   forward-port tcp/11434 100.64.0.6:11434       gateway:11434 to that address
#   ... via-tunnel                                 either: through WireGuard
rules = []

# Domains the guest may reach ("*." for every subdomain).
#allow_domains = ["deb.debian.org", "*.pypi.org"]

# Route all guest traffic through WireGuard (a wg-quick file). A
# wireguard.conf beside this file is used without being named here.
#wireguard = "wireguard.conf"
# Seconds `up` waits for the tunnel's first handshake before giving up.
#wireguard_timeout = 10
# A wg-quick file without `DNS =` is refused (the guest's DNS would leave
# outside the tunnel) unless the host's resolvers are chosen explicitly.
#dns = "host"

# IPv6 egress through the same wall as IPv4 (off: every IPv6 packet is
# dropped and DNS gives no IPv6 addresses). With WireGuard, through the
# tunnel (its file needs an IPv6 Address).
#ipv6 = false

[ssh]
# The user created by cloud-init.yml.
user = "migrant"
# Private key; "~/" is your home. Default: ~/.ssh/migrant
#key = "~/.ssh/migrant"

# A credential the guest uses through a placeholder, for the listed
# hosts only (checked; brokering comes next: docs/secrets.md).
#[secrets.GITHUB_TOKEN]
#from = "env:GITHUB_TOKEN"   # or "file:PATH", "command:COMMAND"
#hosts = ["api.github.com"]
"#;

/// The default `cloud-init.yml`: the `migrant` user with passwordless sudo,
/// bash, and the managed key (through [`PUBKEY_PLACEHOLDER`]).
pub const INIT_CLOUD_INIT: &str = r#"#cloud-config
# First-boot setup of the guest. migrant replaces __MIGRANT_PUBKEY__ with
# the public half of its SSH key (~/.ssh/migrant.pub) when building the VM.
users:
  - name: migrant
    sudo: "ALL=(ALL) NOPASSWD:ALL"
    shell: /bin/bash
    lock_passwd: true
    ssh_authorized_keys:
      - __MIGRANT_PUBKEY__

# Examples:
#package_update: true
#packages:
#  - git
#runcmd:
#  - echo "ready" > /var/tmp/first-boot
"#;
