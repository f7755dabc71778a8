#!/usr/bin/env bash
# `make vm-bench`: the cross-node benchmark between two real VMs made by Vagrant.
#
#   1. the project's box (vagrant/build-box.sh, from `make vm-image`)
#   2. libvirt's daemons, started by hand where none runs (no systemd on this machine
#      kind), stopped again by their PIDs
#   3. `vagrant up` of node1 and node2 (vagrant/Vagrantfile), each provisioned by
#      scripts/setup.sh: KVM when it works (tried first), QEMU's emulation otherwise
#   4. `bench --serve` on node2, `bench xnode --peer node2` on node1: iptables and eBPF
#      modes interleaved, both machines' CPU measured; results in build/vm-bench/
#   5. clean-up, whatever happened: VMs destroyed and undefined, libvirt's networks,
#      volumes and pool removed (those this run made), daemons stopped, the forwarding
#      setting and the iptables chains libvirt added restored/removed.
#
# Environment: VM_BENCH_ARGS (extra `bench xnode` options, default "--runs 3"),
# VM_BENCH_MODES (default iptables,ebpf-nobypass: the datapath as loaded by default), INTERCEPTOR_VM_ACCEL (kvm|qemu:
# skip the trial).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/build/vagrant
OUT=$ROOT/build/vm-bench
LOG=$OUT/steps.log
mkdir -p "$WORK" "$OUT"
: > "$LOG"

if [ "$(id -u)" -ne 0 ]; then
    echo "vm-bench: run as root (libvirt's system daemons)" >&2
    exit 1
fi
need=()
for p in vagrant vagrant-libvirt libvirt-daemon-system libvirt-daemon-system-sysv libvirt-daemon-driver-qemu \
         libvirt-clients dnsmasq-base qemu-system-x86; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "vm-bench: installing ${need[*]}"
    # without recommends: libvirt's pull in systemd, lvm2 and a kernel image
    # (libvirt-daemon-system makes the libvirt-qemu user; -sysv: no systemd units needed)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi

step() {   # step NAME COMMAND...: run it, log how long it took
    local name=$1 start=$SECONDS
    shift
    echo "vm-bench: $name"
    "$@"
    echo "$name: $((SECONDS - start)) s" | tee -a "$LOG"
}

export VAGRANT_HOME=$WORK/home                 # the box is added here, not in ~/.vagrant.d
export VAGRANT_DOTFILE_PATH=$WORK/dot
export VAGRANT_DEFAULT_PROVIDER=libvirt
export VAGRANT_CHECKPOINT_DISABLE=1
export VAGRANT_CWD=$ROOT/vagrant
BOX_NAME=interceptor/debian12

# --- what this run finds, to restore it ------------------------------------------------
forward_before=$(cat /proc/sys/net/ipv4/ip_forward)
chains_before=$( (iptables-save; ip6tables-save) 2>/dev/null | grep -c '^:LIBVIRT_' || true)
started_pids=()
pool_made=no
run_dir_made=no

cleanup() {
    set +e
    echo "vm-bench: cleaning up"
    if [ -d "$VAGRANT_DOTFILE_PATH" ]; then
        vagrant destroy -f >/dev/null 2>&1
    fi
    if virsh -c qemu:///system version >/dev/null 2>&1; then
        for dom in $(virsh -c qemu:///system list --all --name | grep '^vagrant_node[12]$'); do
            virsh -c qemu:///system destroy "$dom" >/dev/null 2>&1
            virsh -c qemu:///system undefine "$dom" --remove-all-storage >/dev/null 2>&1
        done
        for net in $(virsh -c qemu:///system net-list --all --name | grep -E '^vagrant-'); do
            virsh -c qemu:///system net-destroy "$net" >/dev/null 2>&1
            virsh -c qemu:///system net-undefine "$net" >/dev/null 2>&1
        done
        if [ ${#started_pids[@]} -gt 0 ]; then   # our daemon: stop what it autostarted too
            for net in $(virsh -c qemu:///system net-list --name); do
                virsh -c qemu:///system net-destroy "$net" >/dev/null 2>&1
            done
        fi
        for vol in $(virsh -c qemu:///system vol-list default 2>/dev/null | awk '/interceptor-VAGRANTSLASH|vagrant_node/ {print $1}'); do
            virsh -c qemu:///system vol-delete --pool default "$vol" >/dev/null 2>&1
        done
        if [ "$pool_made" = yes ]; then
            virsh -c qemu:///system pool-destroy default >/dev/null 2>&1
            virsh -c qemu:///system pool-undefine default >/dev/null 2>&1
        fi
    fi
    for pid in "${started_pids[@]}"; do
        kill "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
    rm -rf "$VAGRANT_HOME" "$VAGRANT_DOTFILE_PATH"
    rm -f /var/log/libvirt/qemu/vagrant_node[12].log
    if [ ${#started_pids[@]} -gt 0 ] && [ "$run_dir_made" = yes ]; then
        rm -rf /run/libvirt
    fi
    if [ "$chains_before" = 0 ]; then       # libvirt's chains and the jumps into them
        for cmd in iptables ip6tables; do
            for table in filter nat mangle; do
                $cmd -t "$table" -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j LIBVIRT_' | sed 's/^-A/-D/' |
                    while read -r rule; do eval "$cmd -t $table $rule"; done
                for chain in $($cmd -t "$table" -S 2>/dev/null | awk '/^-N LIBVIRT_/ {print $2}'); do
                    $cmd -t "$table" -F "$chain"; $cmd -t "$table" -X "$chain"
                done
            done
        done
    fi
    echo "$forward_before" > /proc/sys/net/ipv4/ip_forward
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. the box ----------------------------------------------------------------------------
step "image (make vm-image)" bash vm/build-image.sh
step "box (vagrant/build-box.sh)" bash vagrant/build-box.sh

# --- 2. libvirt --------------------------------------------------------------------------
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
    [ -d /run/libvirt ] || run_dir_made=yes
    mkdir -p /run/libvirt /var/log/libvirt/qemu
    virtlogd -d -p "$WORK/virtlogd.pid"
    started_pids+=("$(cat "$WORK/virtlogd.pid")")
    libvirtd -d -p "$WORK/libvirtd.pid"
    started_pids+=("$(cat "$WORK/libvirtd.pid")")
    for _ in $(seq 100); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
fi
if ! virsh -c qemu:///system pool-info default >/dev/null 2>&1; then
    mkdir -p /var/lib/libvirt/images
    virsh -c qemu:///system pool-define-as default dir --target /var/lib/libvirt/images >/dev/null
    virsh -c qemu:///system pool-start default >/dev/null
    pool_made=yes
fi

# --- 3. the VMs ----------------------------------------------------------------------------
if [ -z "${INTERCEPTOR_VM_ACCEL:-}" ]; then
    INTERCEPTOR_VM_ACCEL=$(.venv/bin/python vm/matrix.py --probe-accel)
    [ "$INTERCEPTOR_VM_ACCEL" = tcg ] && INTERCEPTOR_VM_ACCEL=qemu    # libvirt's name for it
fi
export INTERCEPTOR_VM_ACCEL
echo "vm-bench: libvirt driver $INTERCEPTOR_VM_ACCEL" | tee -a "$LOG"
step "vagrant up (two VMs, provisioned)" vagrant up --provider libvirt

# --- 4. the benchmark ----------------------------------------------------------------------
PEER=$(sed -n 's/^ *"node2" => "\([0-9.]*\)".*/\1/p' vagrant/Vagrantfile)
MODES=${VM_BENCH_MODES:-iptables,ebpf-nobypass}
ARGS=${VM_BENCH_ARGS:---runs 3}
vagrant ssh node2 -c "sudo /interceptor/.venv/bin/interceptor bench --serve 15599" > "$OUT/node2.log" 2>&1 &
server=$!
for _ in $(seq 60); do    # its listener, as seen from node2 (a guest takes seconds to start it)
    vagrant ssh node2 -c "ss -Hltn 'sport = :15599'" 2>/dev/null | grep -q LISTEN && break
    sleep 2
done
bench() {
    vagrant ssh node1 -c "sudo rm -rf /tmp/bench-x-vm && sudo /interceptor/.venv/bin/interceptor bench xnode \
        --peer $PEER:15599 --modes $MODES $ARGS --out /tmp/bench-x-vm" 2>&1 | tee "$OUT/node1.log"
}
step "bench xnode (node1 -> node2)" bench
wait "$server" || true
for f in results.json summary.txt; do
    vagrant ssh node1 -c "sudo cat /tmp/bench-x-vm/$f" > "$OUT/$f" 2>/dev/null
done
uname_guest=$(vagrant ssh node1 -c "uname -r" 2>/dev/null | tr -d '\r')
{
    echo "# two VMs on this machine: libvirt driver $INTERCEPTOR_VM_ACCEL, guest kernel $uname_guest"
    echo "# $(date -u +%FT%TZ); under emulation (qemu driver) the numbers measure the emulator as much as the datapath"
} > "$OUT/environment.txt"
echo "vm-bench: results in $OUT (summary.txt, results.json, steps.log)"
cat "$LOG"
# The run passes when every cross-node scenario has samples from every mode.
python3 - "$OUT/results.json" "$MODES" <<'PY'
import json, sys
samples = json.load(open(sys.argv[1]))["samples"]
modes = sys.argv[2].split(",")
xnode = {k: v for k, v in samples.items() if k.startswith("x-machine")}   # bench xnode --peer's
missing = [f"{k}: {m}" for k, v in xnode.items() for m in modes if not v.get(m)]
if not xnode or missing:
    sys.exit("vm-bench: FAILED, no cross-node samples for " + (", ".join(missing) or "any scenario"))
print(f"vm-bench: ok, {len(xnode)} cross-node scenarios x {len(modes)} modes")
PY
