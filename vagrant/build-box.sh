#!/usr/bin/env bash
# The guest image of `make vm-image` (build/vm/disk.qcow2) as a vagrant-libvirt box:
# build/vagrant/interceptor.box (box.img, metadata.json and a Vagrantfile), rebuilt when
# the image changes. The image has no boot loader: the project's Vagrantfile boots its
# kernel directly (libvirt's kernel/initrd), which is why the box is libvirt-only.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=build/vm/disk.qcow2
OUT=build/vagrant
BOX=$OUT/interceptor.box
if [ ! -f "$IMAGE" ]; then
    echo "build-box: no $IMAGE; run \`make vm-image\`" >&2
    exit 1
fi
if [ -f "$BOX" ] && [ "$BOX" -nt "$IMAGE" ]; then
    echo "build-box: up to date ($BOX)"
    exit 0
fi
start=$SECONDS
rm -rf "$OUT/box.new" && mkdir -p "$OUT/box.new"
ln "$IMAGE" "$OUT/box.new/box.img" 2>/dev/null || cp "$IMAGE" "$OUT/box.new/box.img"
size_gb=$(( ( $(qemu-img info --output=json "$IMAGE" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])') + (1 << 30) - 1 ) >> 30 ))
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$size_gb" > "$OUT/box.new/metadata.json"
cat > "$OUT/box.new/Vagrantfile" <<'VF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.disk_bus = "virtio"
  end
end
VF
tar -C "$OUT/box.new" -cf "$BOX.new" metadata.json Vagrantfile box.img
rm -rf "$OUT/box.new"
mv "$BOX.new" "$BOX"
echo "build-box: $BOX in $((SECONDS - start)) s"
