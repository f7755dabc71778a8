"""Compiled BPF instructions, as BCC hands them out (`BPF.dump_func`): finding the
64-bit immediates (map references, constants) and patching them. Used where a program
is loaded from saved instructions against maps other than those it was compiled with:
the per-pod XDP stubs (xdp.py) and an in-place upgrade (upgrade.py)."""
import struct

LD_IMM64 = 0x18
PSEUDO_MAP_FD = 1
_INSN = struct.Struct("<BBhi")


def imm64s(insns):
    """(index, src register, 64-bit value) of every LD_IMM64 (two slots each): src
    PSEUDO_MAP_FD means the value is a map fd."""
    count = len(insns) // 8
    i = 0
    while i < count:
        code, regs, _off, imm = _INSN.unpack_from(insns, i * 8)
        if code == LD_IMM64:
            hi = _INSN.unpack_from(insns, (i + 1) * 8)[3]
            yield i, regs >> 4, (imm & 0xFFFFFFFF) | ((hi & 0xFFFFFFFF) << 32)
            i += 2
            continue
        i += 1


def set_imm64(buf, index, value):
    """Patch the LD_IMM64 at index (buf: a bytearray) to load value."""
    struct.pack_into("<I", buf, index * 8 + 4, value & 0xFFFFFFFF)
    struct.pack_into("<I", buf, (index + 1) * 8 + 4, value >> 32)


def map_refs(insns):
    """{instruction index: map fd} of the program's map references."""
    return {i: value for i, src, value in imm64s(insns) if src == PSEUDO_MAP_FD}
